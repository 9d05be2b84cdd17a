"""Error types shared across the system package."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


class VideoWriteError(RuntimeError):
    """Writing an mp4 failed (ffmpeg exited or its pipe broke, the disk filled up, the folder
    cannot be written); the message names the output file, ``__cause__`` holds the original.
    Not a decode failure: :class:`impl.vae_decode.BlockDecoder` passes it through unwrapped.
    Defined here (torch-free) so command lines can map it to exit 1 without importing torch."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every cleanup path for KeyboardInterrupt (temp files,
    ffmpeg, half-written checkpoints) runs for it too; command lines exit 143."""


def error_summary(e: BaseException) -> str:
    """``Type: first line`` of an exception from a file reader (torch.load, safetensors, DCP),
    for one-line errors: torch.load's weights-only refusal reduced to its reason, a long first
    line of torch's zip reader cut before its paragraph of advice."""
    msg = str(e)
    if "WeightsUnpickler error:" in msg:   # torch.load(weights_only=True): the reason, not the advice
        tail = msg.split("WeightsUnpickler error:", 1)[1]
        reason = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")
        return f"torch.load(weights_only=True) refused it: {reason}"
    line = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    if len(line) > 160 and ". " in line:   # torch's zip-reader errors append a paragraph of advice
        line = line.split(". ", 1)[0] + "."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__

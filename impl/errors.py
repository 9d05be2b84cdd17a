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

"""How values and variants are written in tables and plots.

Numbers to 3 significant figures (:func:`fmt_num`), a record's hardware and commit, and the
short variant labels of bars and legends: only the keys that differ between the records, in
words (``"fp8 2-step compiled, tae stream"``), with the usual settings left out unless they
are needed to tell rows apart (:func:`short_labels`), and the settings all records share
(:func:`common_label`).
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

COMMIT_LEN = 7   # one commit-hash length in every table (and in paper_vs_measured.md)


def fmt_num(x: Any) -> str:
    """3 significant figures without scientific notation for everyday magnitudes."""
    if x is None:
        return ""
    if isinstance(x, (bool, str)) or not isinstance(x, numbers.Real):
        return str(x)
    if isinstance(x, numbers.Integral):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return ""
    if x == 0 or not math.isfinite(x):
        return str(x)
    mag = math.floor(math.log10(abs(x)))
    if mag >= 6 or mag < -4:
        return f"{x:.3g}"
    return f"{round(x, 2 - mag):.{max(0, 2 - mag)}f}"


def is_number(x: Any) -> bool:
    """A finite int or float (not a bool): a value a table cell or a plot can show as a number."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def hardware_label(hw: dict[str, Any]) -> str:
    if hw.get("device") == "cuda" and hw.get("gpu_name"):
        count = int(hw.get("gpu_count") or 1)
        return hw["gpu_name"] + (f" x{count}" if count > 1 else "")
    return "cpu"


def short_sha(sha: Any) -> str:
    """A git hash cut to :data:`COMMIT_LEN` characters (anything else as it is)."""
    sha = str(sha or "unknown")
    return sha[:COMMIT_LEN] if re.fullmatch(r"[0-9a-f]{7,40}", sha) else sha


def short_commit(record: dict[str, Any]) -> str:
    return short_sha(record.get("commit")) + ("-dirty" if record.get("dirty") else "")


# ---------------------------------------------------------------- variant labels

_PRECISION_WORDS = {"bf16": "bf16", "fp8": "fp8", "nvfp4": "nvfp4", "nvfp4_weight_only": "nvfp4 weight-only",
                    "nvfp4_emulated": "nvfp4 W4A4 emulated", "nvfp4_te": "nvfp4 TE"}
_VALUE_WORDS: dict[str, dict[Any, str]] = {
    "precision": _PRECISION_WORDS,
    "mode": _PRECISION_WORDS,
    "attention": {"sdpa": "SDPA", "fa3": "FA3 BF16", "fa3_fp8": "FA3 FP8", "fp8_triton": "fp8 attn (Triton)",
                  "fp8_cudnn": "fp8 attn (cuDNN)", "fp8_emulated": "fp8 attn (emulated)"},
    "bf16_attention_steps": {"none": "one attention kernel every step", "last": "BF16 attn last step",
                             "first": "BF16 attn first step"},
    "frame_format": {"float32": "float32 frames", "uint8": "uint8 frames"},
    "train_precision": {"bf16": "bf16-trained", "nvfp4_emulated": "nvfp4-trained"},
    "model": {"real": "ground truth", "teacher": "teacher", "lora": "LoRA student"},
    "vae_mode": {"sync": "sync", "stream": "stream", "device": "other device"},
    "decoder": {"wan": "wan", "lightvae_p50": "lightvae-50%", "lightvae_p75": "lightvae-75%", "tae": "tae"},
}
_FORMATS = {"steps": "{}-step", "kv_cache": "{} KV", "sp_size": "SP {}", "frames": "{} frames", "keys": "{} keys",
            "num_layers": "{} layers", "m": "m={}", "n": "n={}", "k": "k={}", "rows": "{} rows", "cols": "{} cols",
            "heads": "{} heads", "tokens_per_block": "{} tokens/slot", "halo": "halo {}", "dtype": "{} compute",
            "kv_comm": "{} K/V exchange", "source": "{} inputs",
            "shape": "{}", "sp_layout": "{}", "rule": "{}", "op": "{}", "data": "{} data", "preset": "{}",
            "attention_backend": "{} attention"}
# bool key -> (word when true, word when false)
_BOOL_WORDS = {"compile": ("compiled", "eager"), "cuda_graphs": ("CUDA graphs", "no CUDA graphs"),
               "vae_channels_last": ("channels-last", "channels-first"), "channels_last": ("channels-last", "channels-first"),
               "vae_compile": ("VAE compiled", "VAE eager"), "cudnn_benchmark": ("cuDNN autotune", "no autotune"),
               "sink": ("sink", "no sink"), "distilled": ("DMD student", "teacher"),
               "gradient_checkpointing": ("checkpointing", "no checkpointing")}
# The usual setting of a key, left out of a label unless it is needed to tell rows apart, so a
# label names what is special about a row ("nvfp4 KV", "no sink") rather than everything.
_QUIET = {("kv_cache", "bf16"), ("bf16_attention_steps", "none"), ("sink", True), ("cuda_graphs", False), ("vae_channels_last", False),
          ("vae_compile", False), ("channels_last", False), ("cudnn_benchmark", False),
          ("train_precision", "bf16"), ("gradient_checkpointing", True)}
# Keys named first in a label (then the benchmark's field order), so related words stay together.
_LABEL_ORDER = ("model", "distilled", "train_precision", "mode", "precision", "steps", "compile", "kv_cache",
                "attention", "cuda_graphs", "sink")
_VAE_KEYS = ("decoder", "vae_mode", "vae_channels_last", "vae_compile", "frame_format")


def _phrase(key: str, value: Any, explicit: bool = False) -> str:
    if value is None:
        return ""
    if not explicit and (key, value) in _QUIET:
        return ""
    if isinstance(value, bool):
        yes, no = _BOOL_WORDS.get(key, (key.replace("_", " "), f"no {key.replace('_', ' ')}"))
        return yes if value else no
    if key == "num_layers" and value == 0:
        return "the preset's depth"
    if key == "guidance_scale":
        return "no CFG" if float(value) == 1.0 else f"CFG {fmt_num(value)}"
    if value in _VALUE_WORDS.get(key, {}):
        return _VALUE_WORDS[key][value]
    if key in _FORMATS:
        return _FORMATS[key].format(fmt_num(value) if isinstance(value, float) else value)
    return f"{key}={fmt_num(value) if isinstance(value, float) else value}"


def _phrases(variant: dict[str, Any], keys: list[str], explicit: bool, sep: str = " ") -> str:
    """DiT settings, then (after a comma) the decoder's, each in a fixed order."""
    main = [p for k in keys if k not in _VAE_KEYS for p in [_phrase(k, variant.get(k), explicit)] if p]
    vae = [p for k in _VAE_KEYS if k in keys for p in [_phrase(k, variant.get(k), explicit)] if p]
    return ", ".join(part for part in (sep.join(main), sep.join(vae)) if part)


def _key_order(records: list[dict[str, Any]], order: list[str] | None) -> list[str]:
    keys = [k for k in _LABEL_ORDER if any(k in r["variant"] for r in records)]
    keys += [k for k in (order or []) if k not in keys]
    for r in records:
        keys += [k for k in r["variant"] if k not in keys]
    return keys


def short_labels(records: list[dict[str, Any]], order: list[str] | None = None) -> list[str]:
    """One short, readable label per record naming only the variant keys that differ between
    ``records``, e.g. ``"fp8 2-step compiled, tae stream"`` (``order``: key order, e.g. the
    benchmark's field order). Labels are unique whenever the variants are."""
    keys = _key_order(records, order)
    varying = [k for k in keys if len({repr(r["variant"].get(k)) for r in records}) > 1]
    if not varying:
        return ["(one variant)"] * len(records)
    labels = [_phrases(r["variant"], varying, explicit=False) for r in records]
    ids = [repr(sorted(r["variant"].items())) for r in records]
    for i, lab in enumerate(labels):   # spell out the usual settings only where needed
        if not lab or any(labels[j] == lab and ids[j] != ids[i] for j in range(len(records))):
            labels[i] = _phrases(records[i]["variant"], varying, explicit=True)
    if all(labels) and len({(lab, i) for lab, i in zip(labels, ids)}) == len(set(labels)) == len(set(ids)):
        return labels
    return [", ".join(f"{k}={r['variant'].get(k)}" for k in varying) for r in records]


def common_label(records: list[dict[str, Any]], order: list[str] | None = None,
                 skip: tuple[str, ...] = ("preset",)) -> str:
    """The settings every record shares (for a panel subtitle)."""
    keys = [k for k in _key_order(records, order) if k not in skip]
    same = [k for k in keys if len({repr(r["variant"].get(k)) for r in records}) == 1]
    return _phrases(records[0]["variant"], same, explicit=True, sep=", ") if records else ""

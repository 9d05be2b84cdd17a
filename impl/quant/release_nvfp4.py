"""The release's pre-quantized NVFP4 generator (``model_4o6.pt``) in our NVFP4 representation.

The release's ``scripts/save_merged_nvfp4_generator.py --backend fouroversix`` writes
``{"generator": state dict, "checkpoint_format": "longlive_generator_nvfp4",
"checkpoint_version": 1, "quantization": {...}, ...}`` (code study sections 5.1, 5.4, 5.8).
Every block linear (300 in the 5B model) holds, instead of ``weight``, four buffers:

* ``quantized_weight_values``: uint8 ``[R_pad, C_pad / 2]``, two E2M1 codes per byte;
* ``quantized_weight_scale_factors``: the E4M3 block scales of the ``[R_pad, C_pad / 16]``
  scale matrix, flattened in the Blackwell block-scaled-GEMM swizzle (below);
* ``quantized_weight_amax``: float32 ``[1]``, max |W| over the whole matrix;
* ``quantized_weight_metadata``: int32 ``[rows, cols, padded rows, padded cols]``

(rows padded to a multiple of 128, cols to a multiple of 64), plus the BF16 ``bias``;
optionally the same four for ``quantized_weight_transposed_*`` (W^T, only for training LoRA on a
frozen FP4 base: not needed for inference, dropped here).

How each piece maps onto :class:`impl.quant.nvfp4_format.NVFP4Tensor` (packed, scales, gd):

* codes: the release's element code is sign * 8 + exp * 2 + mantissa, i.e. sign in bit 3 and
  the index of the magnitude in (0, .5, 1, 1.5, 2, 3, 4, 6) in bits 0-2, the even element in
  the low nibble: exactly our code and nibble order (:func:`~impl.quant.nvfp4_format.pack_codes`),
  so the bytes of ``values[:rows, :cols / 2]`` are our ``packed`` as they are (bit-exact, no
  re-quantization);
* block scales: E4M3 bytes, un-swizzled (:func:`unswizzle_scales`) and cut to
  ``[rows, cols / 16]``: bit-exact;
* tensor scale: the release decodes ``x = code * s * amax / (Q * M)`` with (Q, M) of the weight
  scale rule (6 * 256 for the 4-over-6 rules mse / mae / abs_max, 6 * 448 for static_6, 4 * 448
  for static_4). Our decode factor is ``gd = fp32(amax / (Q * M))``
  (:func:`~impl.quant.nvfp4_format.global_decode_scale`), one correctly rounded float32
  division: what our own quantizer stores for the same amax. So ``code * s`` (exact in BF16)
  is bit-exact and ``gd`` is the float32 value of the release's factor. The one thing that can
  differ from a release GEMM is rounding order in float32, not data: the release's W4A4 GEMM
  applies ``alpha = amax_a * amax_b / ((Q_a M_a)(Q_b M_b))`` once, we multiply the two float32
  factors ``gd_a * gd_b`` (at most a few float32 ulps apart on the scalar), and its block
  scales came from its own quantizer (its choice between the 4 and 6 candidates may differ from
  ours on < 0.1 % of blocks, study section 5.2): loading takes the stored scales as they are.

The rule is read from the file's ``quantization`` metadata (:func:`weight_rule_from_metadata`);
a file without one is taken as 4-over-6 (``mse``: the ``_4o6`` export, study section 5.6) with a
warning, because a wrong rule scales every weight by a constant factor.

Blackwell scale swizzle (cuBLAS / CUTLASS block-scaled layout, study section 5.1): the
``[R, C]`` scale matrix (R a multiple of 128, C of 4, zero-padded otherwise) is cut into
128 x 4 tiles stored tile-row-major (tile ``(i, j)`` at ``(i * C / 4 + j) * 512``); inside a
tile, entry ``(r, c)`` sits at ``(r mod 32) * 16 + (r div 32) * 4 + c`` (32 x 16 interleave).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from impl.quant import nvfp4
from impl.quant.nvfp4_format import GROUP, SCALE_RULES, NVFP4Tensor, global_decode_scale

FORMAT = "longlive_generator_nvfp4"
FORMAT_VERSION = 1
PREFIX = "quantized_weight_"
TRANSPOSED_PREFIX = "quantized_weight_transposed_"
BUFFERS = ("values", "scale_factors", "amax", "metadata")
DEFAULT_RULE = "mse"             # the release's FourOverSix inference weight rule (model_4o6.pt)
TILE_ROWS, TILE_COLS = 128, 4    # one swizzle tile of the scale matrix
ROW_PAD, COL_PAD = 128, 64       # the release pads the value matrix to these multiples


class ReleaseNVFP4Error(ValueError):
    """Buffers that are not the release's NVFP4 weight layout; the message says what is wrong."""


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


# ----------------------------------------------------------------------------- swizzle

def swizzled_scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """The padded scale matrix the swizzle stores for ``[rows, cols]`` scales."""
    return _ceil(rows, TILE_ROWS), _ceil(cols, TILE_COLS)


def swizzled_offset(r: int, c: int, cols: int) -> int:
    """Flat offset of scale ``(r, c)`` of a ``[*, cols]`` scale matrix (the formula, for tests)."""
    tile = (r // TILE_ROWS) * (_ceil(cols, TILE_COLS) // TILE_COLS) + c // TILE_COLS
    r, c = r % TILE_ROWS, c % TILE_COLS
    return tile * TILE_ROWS * TILE_COLS + (r % 32) * 16 + (r // 32) * 4 + c


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    if t.dtype in (torch.uint8, torch.int8):
        return t.view(torch.uint8)
    raise ReleaseNVFP4Error(f"scale factors must be float8_e4m3fn or uint8 bytes, got {t.dtype}")


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` E4M3 scales -> the flat swizzled layout (zero-padded to 128 x 4 tiles).
    Returns the dtype it was given (float8_e4m3fn or uint8)."""
    if scales.dim() != 2:
        raise ReleaseNVFP4Error(f"swizzle: expected a 2-D scale matrix, got shape {tuple(scales.shape)}")
    raw = _as_bytes(scales.contiguous())
    rows, cols = raw.shape
    rp, cp = swizzled_scale_shape(rows, cols)
    padded = torch.zeros(rp, cp, dtype=torch.uint8, device=raw.device)
    padded[:rows, :cols] = raw
    # row = i*128 + a*32 + b, col = j*4 + c  ->  offset ((i*C/4 + j)*32 + b)*16 + a*4 + c
    out = padded.reshape(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4).reshape(-1)
    return out.view(scales.dtype) if scales.dtype == torch.float8_e4m3fn else out


def unswizzle_scales(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`swizzle_scales`: flat swizzled scales -> ``[rows, cols]``
    float8_e4m3fn (the padding is dropped). ``flat`` may have any shape of the right size."""
    raw = _as_bytes(flat).reshape(-1)
    rp, cp = swizzled_scale_shape(rows, cols)
    if raw.numel() != rp * cp:
        raise ReleaseNVFP4Error(f"scale factors: {raw.numel()} entries, but a [{rows}, {cols}] scale matrix "
                                f"in 128x4 swizzle tiles needs {rp * cp}")
    t = raw.reshape(rp // 128, cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(rp, cp)
    return t[:rows, :cols].contiguous().view(torch.float8_e4m3fn)


# ----------------------------------------------------------------------------- one linear

def release_buffers(t: NVFP4Tensor, amax: torch.Tensor, *, rule: str | None = None) -> dict[str, torch.Tensor]:
    """Our quantized weight ``t`` ([out, in], one tensor scale) in the release's four buffers
    (values padded to 128 x 64, scales swizzled). ``amax`` is the max |W| ``t`` was quantized
    with; it must give ``t``'s decode factor under ``rule`` (default ``t.rule``)."""
    rule = rule or t.rule
    if t.packed.dim() != 2 or t.global_scale.numel() != 1:
        raise ReleaseNVFP4Error("release buffers: need a 2-D weight with one tensor scale")
    amax = amax.detach().float().reshape(1).cpu()
    if not torch.equal(global_decode_scale(amax, rule).reshape(()), t.global_scale.float().reshape(()).cpu()):
        raise ReleaseNVFP4Error(f"release buffers: amax {float(amax)} does not give the tensor's decode factor "
                                f"{float(t.global_scale)} under rule {rule!r}")
    rows, cols = t.shape
    prow, pcol = _ceil(rows, ROW_PAD), _ceil(cols, COL_PAD)
    values = torch.zeros(prow, pcol // 2, dtype=torch.uint8)
    values[:rows, :cols // 2] = t.packed.cpu()
    scales = torch.zeros(prow, pcol // GROUP, dtype=torch.uint8)
    scales[:rows, :cols // GROUP] = t.scales.cpu().view(torch.uint8)
    return {PREFIX + "values": values,
            PREFIX + "scale_factors": swizzle_scales(scales.view(torch.float8_e4m3fn)),
            PREFIX + "amax": amax,
            PREFIX + "metadata": torch.tensor([rows, cols, prow, pcol], dtype=torch.int32)}


def quantize_to_release(weight: torch.Tensor, rule: str = DEFAULT_RULE) -> dict[str, torch.Tensor]:
    """Quantize a weight [out, in] with our quantizer (amax over the matrix) and return the
    release's buffers (what ``_materialize_quantized_weights_for_inference`` stores)."""
    amax = weight.detach().abs().amax().float()
    return release_buffers(nvfp4.quantize(weight.detach(), rule, amax=amax), amax, rule=rule)


def from_release_buffers(buffers: Mapping[str, torch.Tensor], rule: str = DEFAULT_RULE) -> NVFP4Tensor:
    """The release's four buffers of one linear (keys with or without the ``quantized_weight_``
    prefix) -> :class:`NVFP4Tensor` ``[rows, cols]``: codes and scales bit-exact, ``gd =
    fp32(amax / (Q * M))`` of ``rule``. Raises :class:`ReleaseNVFP4Error` on any layout mismatch."""
    if rule not in SCALE_RULES:
        raise ReleaseNVFP4Error(f"unknown scale rule {rule!r}; allowed: {sorted(SCALE_RULES)}")
    b = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in buffers.items()}
    missing = [n for n in BUFFERS if n not in b]
    if missing:
        raise ReleaseNVFP4Error(f"missing {', '.join(PREFIX + n for n in missing)}")
    values, scales, amax, meta = (b[n] for n in BUFFERS)
    if meta.numel() != 4 or meta.is_floating_point():
        raise ReleaseNVFP4Error(f"{PREFIX}metadata must be 4 integers (rows, cols, padded rows, padded cols), "
                                f"got {meta.dtype} of shape {tuple(meta.shape)}")
    rows, cols, prow, pcol = (int(v) for v in meta.reshape(-1).tolist())
    if not (0 < rows <= prow and 0 < cols <= pcol) or pcol % GROUP:
        raise ReleaseNVFP4Error(f"{PREFIX}metadata {[rows, cols, prow, pcol]} is not (rows, cols, padded rows, "
                                f"padded cols) with padded cols a multiple of {GROUP}")
    if cols % GROUP:
        # Our container keeps whole 16-element blocks of the logical matrix; the 5B model's block
        # linears (3072, 14336 wide) and every preset's are multiples of 16.
        raise ReleaseNVFP4Error(f"{cols} columns is not a multiple of {GROUP}: not representable as our NVFP4 "
                                f"weight without changing the layer's in_features")
    if values.dtype != torch.uint8 or tuple(values.shape) not in ((prow, pcol // 2), (rows, cols // 2)):
        raise ReleaseNVFP4Error(f"{PREFIX}values must be uint8 [{prow}, {pcol // 2}] (the metadata's padded shape), "
                                f"got {values.dtype} {tuple(values.shape)}")
    if amax.numel() != 1 or not amax.is_floating_point():
        raise ReleaseNVFP4Error(f"{PREFIX}amax must be one float, got {amax.dtype} of shape {tuple(amax.shape)}")
    amax = amax.detach().float().reshape(())
    if not bool(torch.isfinite(amax)) or float(amax) < 0:
        raise ReleaseNVFP4Error(f"{PREFIX}amax is {float(amax)}; expected a finite max |W| >= 0")
    s = unswizzle_scales(scales, prow, pcol // GROUP)[:rows, :cols // GROUP].contiguous()
    if bool(((s.view(torch.uint8) & 0x7F) == 0x7F).any()):
        raise ReleaseNVFP4Error(f"{PREFIX}scale_factors hold NaN entries (E4M3 0x7F / 0xFF)")
    packed = values[:rows, :cols // 2].contiguous()
    return NVFP4Tensor(packed, s, global_decode_scale(amax, rule), rule)


# ----------------------------------------------------------------------------- whole checkpoints

def is_prequantized(sd: Mapping[str, Any]) -> bool:
    """The release's test: any key ending in ``quantized_weight_values``."""
    return any(k.endswith(PREFIX + "values") for k in sd)


def _rule_name(v: Any) -> str | None:
    if not isinstance(v, str):
        return None
    name = v.rsplit(".", 1)[-1].strip().lower()     # "mse", "ScaleRule.mse", "scale_rule.MSE"
    return name if name in SCALE_RULES else None


def _walk(obj: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk(v, (*path, str(k).lower()))
    elif any("rule" in p for p in path):
        name = _rule_name(obj)
        if name is not None:
            yield path, name


def weight_rule_from_metadata(quantization: Any) -> str | None:
    """The weight scale rule recorded in a checkpoint's ``quantization`` metadata, or None.

    Looks for string values under keys containing ``rule`` (``weight_scale_rule``,
    ``{"weight": {"scale_rule": ...}}``, ``ScaleRule.mse`` spellings): one whose path names the
    weight wins; else a single rule not tied to activations / gradients / the KV cache.
    Conflicting weight rules raise :class:`ReleaseNVFP4Error`."""
    found = list(_walk(quantization))
    weight = {r for p, r in found if "weight" in ".".join(p) and "transpos" not in ".".join(p)}
    if len(weight) > 1:
        raise ReleaseNVFP4Error(f"quantization metadata names several weight scale rules {sorted(weight)}")
    if weight:
        return weight.pop()
    other = ("activation", "act_", "input", "grad", "kv", "cache")
    generic = {r for p, r in found if not any(o in ".".join(p) for o in other)}
    return generic.pop() if len(generic) == 1 else None


def resolve_rule(quantization: Any, where: str, rule: str | None = None) -> str:
    """``rule`` if given, else the metadata's weight rule, else :data:`DEFAULT_RULE` (warned)."""
    if rule is not None:
        if rule not in SCALE_RULES:
            raise ReleaseNVFP4Error(f"unknown scale rule {rule!r}; allowed: {sorted(SCALE_RULES)}")
        return rule
    found = weight_rule_from_metadata(quantization)
    if found is None:
        warnings.warn(f"{where}: the pre-quantized NVFP4 checkpoint records no weight scale rule; assuming "
                      f"{DEFAULT_RULE!r} (4-over-6, tensor factor amax / (6 * 256), as model_4o6.pt). A static_6 "
                      f"export would decode 1.75x too large: pass nvfp4_rule= if you know better", stacklevel=3)
        return DEFAULT_RULE
    return found


def split_prequantized(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                dict[str, dict[str, torch.Tensor]]]:
    """(the other tensors, module name -> its four ``quantized_weight_*`` buffers); the
    transposed copies (``quantized_weight_transposed_*``) are dropped."""
    plain: dict[str, torch.Tensor] = {}
    quant: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        if leaf.startswith(TRANSPOSED_PREFIX):
            continue
        if leaf.startswith(PREFIX) and leaf[len(PREFIX):] in BUFFERS:
            quant.setdefault(module, {})[leaf] = value
        else:
            plain[key] = value
    return plain, quant


def build_prequantized_layers(model: nn.Module, quant: Mapping[str, Mapping[str, torch.Tensor]],
                              plain: Mapping[str, torch.Tensor], rule: str, mode: str = "nvfp4_weight_only",
                              ) -> dict[str, nn.Module]:
    """One NVFP4 layer (``mode``: ``nvfp4_weight_only`` or ``nvfp4_emulated``) per quantized
    module, holding the file's codes, on the model's device; ``plain`` gives each one's bias.
    Nothing in ``model`` changes. Raises :class:`ReleaseNVFP4Error` naming the module."""
    from impl.quant.apply import block_linear_names
    from impl.quant.config import QuantConfig
    from impl.quant.linear import nvfp4_linear_from_packed

    cfg = QuantConfig.for_inference(mode)
    linears = set(block_linear_names(model))
    layers: dict[str, nn.Module] = {}
    for name in sorted(quant):
        if name not in linears:
            raise ReleaseNVFP4Error(f"{name}: quantized buffers on a module that is not one of the model's block "
                                    f"linears (only the 10 linears of each block are NVFP4 in the release)")
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ReleaseNVFP4Error(f"{name}: the model's layer is already {type(base).__name__}, not nn.Linear")
        try:
            t = from_release_buffers(quant[name], rule)
        except ReleaseNVFP4Error as e:
            raise ReleaseNVFP4Error(f"{name}: {e}") from None
        if tuple(t.shape) != (base.out_features, base.in_features):
            raise ReleaseNVFP4Error(f"{name}: quantized weight is [{t.shape[0]}, {t.shape[1]}], the model needs "
                                    f"[{base.out_features}, {base.in_features}] (a checkpoint of another width?)")
        bias = plain.get(f"{name}.bias")
        if (bias is None) != (base.bias is None):
            raise ReleaseNVFP4Error(f"{name}: bias {'missing' if bias is None else 'unexpected'}")
        if bias is not None and tuple(bias.shape) != (base.out_features,):
            raise ReleaseNVFP4Error(f"{name}: bias shape {tuple(bias.shape)}, the model needs ({base.out_features},)")
        device = base.weight.device
        t = NVFP4Tensor(t.packed.to(device), t.scales.to(device), t.global_scale.to(device), t.rule)
        bias = None if bias is None else bias.detach().to(device=device, dtype=base.bias.dtype)
        layer = nvfp4_linear_from_packed(t, bias, cfg)
        layer.prequantized = True        # impl.quant.apply.quantize_model keeps these codes
        layers[name] = layer
    return layers


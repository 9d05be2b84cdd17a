"""The rates the analytic cost models (``sp_training_cost``, ``sp_inference_cost``) assume: one
table, :class:`Rates`, whose every field is also a benchmark measure field (default, bounds,
help), defaulting to what our H100 measured (DESIGN.md, the records named in each help) and to
NVLink 4's nominal bandwidth. Each model declares the rates it uses with :func:`rate_fields`
and reads them back with :meth:`Rates.from_measure`.

The leading underscore keeps this module out of the benchmark registry scan.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from typing import Any, Mapping

from repro.benchmark import FieldSpec


def _rate(default: float, help: str, *, min: float = 0.0, max: float | None = None) -> Any:
    """A :class:`Rates` field whose measure field (``metadata["field"]``) has this default."""
    return dataclasses.field(default=default, metadata={"field": FieldSpec(float, default, min=min, max=max, help=help)})


@dataclass(frozen=True)
class Rates:
    gemm_tflops: float = _rate(750.0, "BF16 GEMM rate (measured on our H100, DESIGN.md)", min=1e-6)
    attn_tflops: float = _rate(650.0, "attention rate (measured SDPA on our H100, DESIGN.md)", min=1e-6)
    link_gbps: float = _rate(450.0, "per-rank link bandwidth in GB/s (1e9 B/s) per direction; 450 = H100 "
                                    "NVLink 4 nominal, not measured", min=1e-6)
    vae_encode_tflops: float = _rate(322.0, "VAE encode rate, TFLOP/s: assumed equal to the full Wan2.2 VAE "
                                            "decoder's measured on our H100 (results/vae_decode, BF16 eager: "
                                            "322); no encode was timed", min=1e-6)
    compute_efficiency: float = _rate(0.8, "fraction of the roofline reached; 0.8 ~ the compiled BF16 one-GPU "
                                           "runs on our H100 (results/inference_speed: 0.81)", min=1e-3, max=1.0)
    latency_us: float = _rate(20.0, "fixed cost per collective (nominal NCCL on NVLink)")
    vae_block_ms: float = _rate(1660.0, "VAE decode per block on the SP root (measured on our H100, "
                                        "results/inference_speed vae_block_ms_p50)")
    quantize_ms_1blk: float = _rate(0.313, "NVFP4 quantize (mse) of 168960 x 128, H100 record")
    quantize_ms_4blk: float = _rate(0.512, "NVFP4 quantize (mse) of 675840 x 128, H100 record")
    decode_ms_1blk: float = _rate(0.0806, "dequantize_kv of 168960 x 128, H100 record")
    decode_ms_4blk: float = _rate(0.151, "dequantize_kv of 675840 x 128, H100 record")

    @classmethod
    def from_measure(cls, measure: Mapping[str, Any]) -> "Rates":
        """The rates of a run's measure settings; a rate it does not set keeps its default."""
        return cls(**{f.name: measure[f.name] for f in dataclasses.fields(cls) if f.name in measure})


RATE_FIELDS: dict[str, FieldSpec] = {f.name: f.metadata["field"] for f in dataclasses.fields(Rates)}


def rate_fields(*names: str) -> dict[str, FieldSpec]:
    """The measure fields of the rates ``names``, in that order."""
    return {name: RATE_FIELDS[name] for name in names}


def analytic_label(record: dict, rates: str) -> str:
    """How tables and plots name a record of an analytic cost model: not the CPU it was computed
    on, but the rates it assumes. ``rates`` is a phrase naming rates in braces, e.g.
    ``"GEMM {gemm_tflops} TFLOP/s"``, filled from the record's ``measure``; "H100 rates" when
    every value is the field's default (our H100's, see the fields' help), else "assumed rates"."""
    measure = record.get("measure") or {}
    keys = [name for _, name, _, _ in string.Formatter().parse(rates) if name]
    values = {k: measure.get(k, RATE_FIELDS[k].default) for k in keys}
    which = "H100 rates" if all(values[k] == RATE_FIELDS[k].default for k in keys) else "assumed rates"
    return f"analytic model, {which}: " + rates.format(**{k: f"{v:g}" for k, v in values.items()})

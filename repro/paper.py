"""The LongLive-2.0 paper's published numbers, and matching them to measured records.

Transcribed from the paper abstract (arXiv 2605.18739) and the official release's model
table; the repo must not read reference material at runtime. GPU is "unknown" wherever
the sources do not state it. ``match`` says which records measure the same thing
(list values mean any-of; ``select`` "max" picks the best record, "latest" the newest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from repro.records import load_records
from repro.spec import matches_subset

NVFP4_PRECISIONS = ["nvfp4_te", "nvfp4_emulated", "nvfp4_weight_only"]


@dataclass(frozen=True)
class PaperNumber:
    key: str
    description: str
    value: float
    unit: str
    setting: str
    gpu: str = "unknown"
    match: dict[str, Any] | None = None  # {"experiment", "variant", "metric", "select"}
    note: str = ""

    def display(self) -> str:
        prefix = "up to " if self.unit == "x" else ""
        return f"{prefix}{self.value:g}{'x' if self.unit == 'x' else ' ' + self.unit}"


_5B = "LongLive-2.0-5B (Wan2.2-TI2V-5B), 1280x704"
_VBENCH_NOTE = ("VBench needs its networks and the real 5B weights; repro.quality.vbench_adapter runs it where "
                "installed; weight-free proxy comparison: results/tables/quality.md")

PAPER_NUMBERS: tuple[PaperNumber, ...] = (
    PaperNumber("bf16_fps", "LongLive-2.0-5B BF16 inference FPS", 24.8, "FPS",
                f"{_5B}, BF16, 4 steps (release model table)",
                match={"experiment": "inference_speed",
                       "variant": {"preset": "wan22_ti2v_5b", "precision": "bf16", "steps": 4},
                       "metric": "e2e_fps", "select": "max"}),
    PaperNumber("nvfp4_4step_fps", "LongLive-2.0-5B NVFP4 4-step inference FPS", 29.7, "FPS",
                f"{_5B}, NVFP4, 4 steps (release model table)",
                match={"experiment": "inference_speed",
                       "variant": {"preset": "wan22_ti2v_5b", "precision": NVFP4_PRECISIONS, "steps": 4},
                       "metric": "e2e_fps", "select": "max"}),
    PaperNumber("nvfp4_2step_fps", "LongLive-2.0-5B NVFP4 2-step inference FPS", 45.7, "FPS",
                f"{_5B}, NVFP4, 2 steps (abstract and release model table)",
                match={"experiment": "inference_speed",
                       "variant": {"preset": "wan22_ti2v_5b", "precision": NVFP4_PRECISIONS, "steps": 2},
                       "metric": "e2e_fps", "select": "max"}),
    PaperNumber("inference_speedup", "Inference speedup", 1.84, "x",
                "NVFP4 W4A4 + NVFP4 KV cache + async VAE vs BF16 (abstract); 45.7/24.8 = 1.84 "
                "suggests 2-step NVFP4 vs 4-step BF16",
                match={"experiment": "inference_speed",
                       "variant": {"preset": "wan22_ti2v_5b", "precision": NVFP4_PRECISIONS,
                                   "kv_cache": "nvfp4"},
                       "metric": "speedup_vs_baseline", "select": "max"}),
    PaperNumber("training_speedup", "Training speedup", 2.15, "x",
                "Balanced SP + NVFP4 vs baseline (abstract; GPU Blackwell per paper, exact "
                "baseline in the paper's tables)", gpu="Blackwell (model unknown)",
                match={"experiment": "training_speed",
                       "variant": {"sp_layout": "balanced", "precision": NVFP4_PRECISIONS},
                       "metric": "speedup_vs_baseline", "select": "max"}),
    PaperNumber("longlive1_fps", "LongLive 1.0 (1.3B) inference FPS", 20.7, "FPS",
                "LongLive-1.3B, Wan2.1-T2V base, 832x480 (arXiv 2509.22622)", gpu="H100",
                note="different model; not measured by this harness"),
    PaperNumber("vbench_bf16", "VBench total, LongLive-2.0-5B BF16", 85.06, "VBench",
                f"{_5B}, BF16 (release model table)", note=_VBENCH_NOTE),
    PaperNumber("vbench_nvfp4_4step", "VBench total, LongLive-2.0-5B NVFP4 4-step", 84.51, "VBench",
                f"{_5B}, NVFP4, 4 steps (release model table)", note=_VBENCH_NOTE),
    PaperNumber("vbench_nvfp4_2step", "VBench total, LongLive-2.0-5B NVFP4 2-step", 83.14, "VBench",
                f"{_5B}, NVFP4, 2 steps (release model table)", note=_VBENCH_NOTE),
)


def matching_records(entry: PaperNumber, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if entry.match is None:
        return []
    m = entry.match
    return [r for r in records
            if r.get("experiment") == m["experiment"]
            and matches_subset(r.get("variant", {}), m.get("variant", {}))
            and isinstance(r.get("metrics", {}).get(m["metric"]), (int, float))]


def best_record(entry: PaperNumber, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The record to compare with: highest value ("max") or newest ("latest"); cuda preferred."""
    recs = matching_records(entry, records)
    if not recs:
        return None
    metric = entry.match["metric"]  # type: ignore[index]
    gpu_first = [r for r in recs if r.get("hardware", {}).get("device") == "cuda"] or recs
    if entry.match.get("select", "latest") == "max":  # type: ignore[union-attr]
        return max(gpu_first, key=lambda r: (r["metrics"][metric], str(r.get("created", ""))))
    return max(gpu_first, key=lambda r: str(r.get("created", "")))


def compare_rows(results_dir: str) -> list[dict[str, str]]:
    """One row per paper number: claim, paper value/setting/GPU, our best measurement."""
    from repro.report import fmt_num, hardware_label, short_commit

    records = load_records(results_dir)
    rows = []
    for e in PAPER_NUMBERS:
        best = best_record(e, records)
        if best is not None:
            metric = e.match["metric"]  # type: ignore[index]
            val = fmt_num(best["metrics"][metric]) + ("x" if e.unit == "x" else f" {e.unit}")
            ours = (f"{val} on {hardware_label(best['hardware'])} "
                    f"({best.get('variant_slug', '')}; commit {short_commit(best)})")
        elif e.match is None:
            ours = f"not measured ({e.note})" if e.note else "not measured"
        else:
            ours = "not measured yet"
        rows.append({"claim": e.description, "paper": e.display(), "setting": e.setting,
                     "paper GPU": e.gpu, "measured": ours})
    return rows


def paper_table_markdown(results_dir: str) -> str:
    rows = compare_rows(results_dir)
    cols = ["claim", "paper", "setting", "paper GPU", "measured"]
    lines = ["# Paper vs. measured", "",
             "Paper values from LongLive-2.0 (arXiv 2605.18739) and its release model table; "
             "measured values are the best matching record under the results folder.", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r[c].replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"

"""The LongLive-2.0 paper's published numbers, and like-for-like comparisons with our records.

Transcribed from the paper abstract (arXiv 2605.18739), the official release's README model
table and project page, and users' measurements of the release (public issue #103 of the
official repository); the repo must not read reference material at runtime, so the facts are
written down here. GPU is "not stated" wherever the sources do not state it.

What is known about how the paper's FPS were measured: the release's README table gives 24.8
(BF16), 29.7 (NVFP4 4-step) and 45.7 (NVFP4 2-step) FPS but names no GPU, no VAE and no timing
method; the project page states 45.7 FPS on GB200 with 2 steps. The release has no FPS harness:
an environment switch times each AR block with CUDA events (FPS = 32 frames / block time), so
a synchronous decode falls inside the block and an asynchronous one does not. Whether the table
is DiT-only or end to end is therefore unknown, and :func:`paper_table_markdown` shows both of
our figures side by side, each from one record (one commit, one named GPU).

The paper's "up to 1.84x" is 45.7 / 24.8: NVFP4 2-step against BF16 4-step. Our ratio rows
compare the same thing we can run: our best 2-step path against our BF16 4-step path with every
other setting equal, DiT-only and end to end, from one run where the records allow. Hopper has
no FP4 tensor cores, so our fast 2-step path uses FP8 W8A8 block linears.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from repro.errors import HarnessError
from repro.records import load_records
from repro.spec import matches_subset

NVFP4_PRECISIONS = ["nvfp4_te", "nvfp4_emulated", "nvfp4_weight_only", "nvfp4"]
FAST_PRECISIONS = ["fp8", *NVFP4_PRECISIONS]
PRESET_5B = "wan22_ti2v_5b"
# Experiments measuring streaming speed at 5B size, in order of preference: `realtime` holds the
# fast paths (one run per commit on one GPU), `inference_speed` the older one-factor sweep.
SPEED_EXPERIMENTS = ("realtime", "inference_speed")
# Values of inference_speed variant keys that records written before the key existed ran with.
VARIANT_DEFAULTS = {"dtype": "bf16", "kv_cache": "bf16", "decoder": "wan", "vae_channels_last": False,
                    "vae_compile": False, "attention": "sdpa", "compile": False, "cuda_graphs": False,
                    "guidance_scale": 1.0, "vae_mode": "sync"}


@dataclass(frozen=True)
class PaperNumber:
    key: str
    description: str
    value: float
    unit: str
    setting: str
    gpu: str = "not stated"
    note: str = ""

    def display(self) -> str:
        prefix = "up to " if self.unit == "x" else ""
        return f"{prefix}{self.value:g}{'x' if self.unit == 'x' else ' ' + self.unit}"


_5B = "LongLive-2.0-5B (Wan2.2-TI2V-5B), 1280x704"
_VBENCH_NOTE = ("VBench needs its networks and the real 5B weights; repro.quality.vbench_adapter runs it where "
                "installed; weight-free proxy comparison: results/tables/quality.md")

PAPER_NUMBERS: tuple[PaperNumber, ...] = (
    PaperNumber("bf16_fps", "LongLive-2.0-5B BF16 inference FPS", 24.8, "FPS",
                f"{_5B}, BF16, 4 steps (release model table)"),
    PaperNumber("nvfp4_4step_fps", "LongLive-2.0-5B NVFP4 4-step inference FPS", 29.7, "FPS",
                f"{_5B}, NVFP4, 4 steps (release model table)"),
    PaperNumber("nvfp4_2step_fps", "LongLive-2.0-5B NVFP4 2-step inference FPS", 45.7, "FPS",
                f"{_5B}, NVFP4, 2 steps (abstract, release model table)", gpu="GB200 (project page)"),
    PaperNumber("inference_speedup", "Inference speedup", 1.84, "x",
                "NVFP4 W4A4 + NVFP4 KV cache + async VAE vs BF16 (abstract); 45.7 / 24.8 = 1.84, i.e. "
                "NVFP4 2-step vs BF16 4-step"),
    PaperNumber("training_speedup", "Training speedup", 2.15, "x",
                "Balanced SP + NVFP4 vs baseline (abstract; exact baseline in the paper's tables)",
                gpu="Blackwell (model not stated)"),
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
_BY_KEY = {p.key: p for p in PAPER_NUMBERS}


@dataclass(frozen=True)
class Twin:
    """A measured figure of the same kind as a paper number, shown for every hardware with a
    record: records of ``experiment`` matching ``variant``. With ``ratio`` = (key, fast, base),
    the figure is ``metric`` of the ``fast`` record over the ``base`` record whose variants differ
    only in ``key`` (inverted where ``lower_is_better``), the best such pair per hardware; else
    ``metric`` itself with its ``<metric>_ci95``, from the newest matching record."""

    label: str
    experiment: str
    metric: str
    variant: dict[str, Any] = field(default_factory=dict)
    ratio: tuple[str, Any, Any] | None = None
    lower_is_better: bool = False


_QUALITY_BASE = {"train_precision": "bf16", "sink": True, "attention": "sdpa", "decoder": "wan", "switch": "cut"}
_PROXY = "quality proxy's prompt adherence (not VBench: a weight-free proxy, results/tables/quality.md)"
TWINS: dict[str, tuple[Twin, ...]] = {
    "training_speedup": (
        Twin("FP8 vs BF16 training step on one GPU, same clip and depth", "train_step", "step_s",
             ratio=("precision", "fp8", "bf16"), lower_is_better=True),
        Twin("NVFP4 (emulated) vs BF16 training step on one GPU", "train_step", "step_s",
             ratio=("precision", "nvfp4_emulated", "bf16"), lower_is_better=True),
        Twin("Balanced vs naive sequence parallelism, tokens/s (gloo processes)", "sp_training", "tokens_per_s",
             ratio=("sp_layout", "balanced", "naive")),
    ),
    "vbench_bf16": (
        Twin(f"BF16 8-step teacher, {_PROXY}", "quality", "q_adherence",
             {**_QUALITY_BASE, "model": "teacher", "precision": "bf16", "kv_cache": "bf16", "steps": 8}),),
    "vbench_nvfp4_4step": (
        Twin(f"NVFP4 (emulated) 4-step LoRA student with the NVFP4 KV cache, {_PROXY}", "quality", "q_adherence",
             {**_QUALITY_BASE, "model": "lora", "precision": "nvfp4_emulated", "kv_cache": "nvfp4", "steps": 4}),),
    "vbench_nvfp4_2step": (
        Twin(f"NVFP4 (emulated) 2-step LoRA student with the NVFP4 KV cache, {_PROXY}", "quality", "q_adherence",
             {**_QUALITY_BASE, "model": "lora", "precision": "nvfp4_emulated", "kv_cache": "nvfp4", "steps": 2}),),
}

METHOD_NOTES = (
    "The release's README model table gives 24.8 FPS (BF16), 29.7 (NVFP4 4-step) and 45.7 (NVFP4 2-step) "
    "but names no GPU, no VAE and no timing method.",
    "The release's project page states 45.7 FPS on GB200 with 2 steps; the BF16 and 4-step rows' GPU is not "
    "stated. Blackwell has FP4 tensor cores; Hopper (our H100/H200) does not.",
    "The release has no FPS harness: an environment switch times each AR block with CUDA events and reports "
    "FPS = 32 frames / block time, so a synchronous VAE decode falls inside the block and an asynchronous one "
    "(side stream or another GPU) does not. The release ships three VAEs (wan, mg_lightvae, mg_lightvae_v2) "
    "and the table does not say which it used.",
    "So the paper's figure may be DiT-only or end to end: below, each of our paths shows both, DiT-only "
    "(denoising + KV re-cache, decode excluded) and end to end (every frame decoded and delivered), from one "
    "record, i.e. one commit on one named GPU. Our runs use random 5B weights at 1280x704, 8-latent blocks "
    "(speed does not depend on weight values).",
)


@dataclass(frozen=True)
class OurPath:
    """One of our configurations to set beside a paper row: records whose variant matches
    ``variant`` (lists mean any-of; keys a record lacks take :data:`VARIANT_DEFAULTS`); the one
    with the highest ``select`` metric is shown."""

    label: str
    variant: dict[str, Any]
    select: str = "e2e_fps"
    gpu: str | None = None   # substring the GPU name must contain (e.g. "H100"), None = any


@dataclass(frozen=True)
class FpsRow:
    paper: str                       # PAPER_NUMBERS key
    paths: tuple[OurPath, ...] = field(default_factory=tuple)


FPS_ROWS: tuple[FpsRow, ...] = (
    FpsRow("bf16_fps", (
        OurPath("the decoder setting of today's path",
                {"precision": "bf16", "steps": 4, "kv_cache": "bf16", "decoder": "wan", "vae_mode": "sync"},
                select="dit_fps"),
        OurPath("our fastest BF16 4-step end to end", {"precision": "bf16", "steps": 4, "kv_cache": "bf16"}),
    )),
    FpsRow("nvfp4_4step_fps", (
        OurPath("NVFP4 on Hopper: weight-only or emulated W4A4, no FP4 tensor cores",
                {"precision": NVFP4_PRECISIONS, "steps": 4}),
        OurPath("FP8, our Hopper stand-in for NVFP4; fastest end to end",
                {"precision": "fp8", "steps": 4}),
    )),
    FpsRow("nvfp4_2step_fps", (
        OurPath("NVFP4 on Hopper: weight-only or emulated W4A4", {"precision": NVFP4_PRECISIONS, "steps": 2}),
        OurPath("today's path: the realtime spec's baseline",
                {"precision": "fp8", "steps": 2, "compile": True, "decoder": "wan", "vae_mode": "sync",
                 "attention": "sdpa", "cuda_graphs": False, "vae_compile": False, "vae_channels_last": False},
                select="dit_fps"),
        OurPath("our fastest 2-step end to end", {"precision": "fp8", "steps": 2}),
    )),
)


@dataclass(frozen=True)
class UserReport:
    """Users' measurements of the official release (public issue #103 of NVlabs/LongLive)."""

    gpu: str
    setting: str
    denoise_fps: float
    e2e_fps: float
    ours: OurPath | None = None


ISSUE_103 = "public issue #103 of the official repository (NVlabs/LongLive): users' runs of the release"
USER_REPORTS: tuple[UserReport, ...] = (
    UserReport("H100", "BF16", 18.6, 14.1,
               OurPath("ours on H100",
                       {"precision": "bf16", "steps": 4, "compile": False, "kv_cache": "bf16", "vae_mode": "sync",
                        "decoder": "wan"}, select="dit_fps", gpu="H100")),
    UserReport("H100", "FP8 W8A8 + compile", 15.5, 12.3,
               OurPath("ours on H100",
                       {"precision": "fp8", "steps": 4, "compile": True, "vae_mode": "sync", "decoder": "wan"},
                       select="dit_fps", gpu="H100")),
    UserReport("B200", "NVFP4 4-step", 20.4, 16.4),
    UserReport("B200", "NVFP4 2-step", 33.8, 24.1),
)


# ---------------------------------------------------------------- choosing records

def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _filled(record: dict[str, Any]) -> dict[str, Any]:
    return {**VARIANT_DEFAULTS, **record.get("variant", {})}


def speed_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """5B streaming-speed records on a GPU with both DiT-only and end-to-end FPS."""
    return [r for r in records if r.get("experiment") in SPEED_EXPERIMENTS
            and r.get("variant", {}).get("preset") == PRESET_5B and r.get("hardware", {}).get("device") == "cuda"
            and _num(r.get("metrics", {}).get("dit_fps")) and _num(r.get("metrics", {}).get("e2e_fps"))]


def _hw(record: dict[str, Any]) -> str:
    from repro.hardware import hardware_tag

    return hardware_tag(record.get("hardware", {}))


def _commit_age(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """(experiment, hardware tag, commit) -> the newest record time of that run."""
    age: dict[tuple[str, str, str], str] = {}
    for r in records:
        key = (r["experiment"], _hw(r), str(r.get("commit")))
        age[key] = max(age.get(key, ""), str(r.get("created", "")))
    return age


def gpu_types(records: list[dict[str, Any]]) -> list[str]:
    """Hardware tags (one per GPU type and count) of the 5B speed records, in name order."""
    return sorted({_hw(r) for r in speed_records(records)})


def pick(records: list[dict[str, Any]], path: OurPath, hw: str | None = None) -> dict[str, Any] | None:
    """The record for ``path`` (on hardware tag ``hw``; None: the GPU with the newest matching
    record): from the first experiment of :data:`SPEED_EXPERIMENTS` that has a match there, the
    newest commit (run) that has a match, and within that run the highest ``path.select`` value."""
    speed = speed_records(records)
    cands = [r for r in speed if matches_subset(_filled(r), path.variant)
             and (path.gpu is None or path.gpu in str(r["hardware"].get("gpu_name", "")))
             and (hw is None or _hw(r) == hw)]
    if not cands:
        return None
    exp = next(e for e in SPEED_EXPERIMENTS if any(r["experiment"] == e for r in cands))
    cands = [r for r in cands if r["experiment"] == exp]
    hw = max(cands, key=lambda r: str(r.get("created", "")))
    cands = [r for r in cands if _hw(r) == _hw(hw)]
    age = _commit_age(speed)
    run = max({str(r.get("commit")) for r in cands}, key=lambda c: age[(exp, _hw(hw), c)])
    cands = [r for r in cands if str(r.get("commit")) == run]
    return max(cands, key=lambda r: (float(r["metrics"][path.select]), str(r.get("created", ""))))


def _pair_key(record: dict[str, Any]) -> tuple:
    v = _filled(record)
    return (record["experiment"], _hw(record),
            tuple(sorted((k, repr(x)) for k, x in v.items() if k not in ("precision", "steps"))))


def ratio_pairs(records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(2-step fast record, BF16 4-step record) pairs from one experiment on one GPU whose
    variants differ only in precision and steps."""
    speed = speed_records(records)
    four: dict[tuple, list[dict[str, Any]]] = {}
    for r in speed:
        if _filled(r).get("precision") == "bf16" and r["variant"].get("steps") == 4:
            four.setdefault(_pair_key(r), []).append(r)
    return [(a, b) for a in speed
            if a["variant"].get("steps") == 2 and _filled(a).get("precision") in FAST_PRECISIONS
            for b in four.get(_pair_key(a), [])]


@dataclass(frozen=True)
class RatioRow:
    label: str
    fast: dict[str, Any]
    bf16: dict[str, Any]

    @property
    def same_run(self) -> bool:
        return self.fast.get("commit") == self.bf16.get("commit")

    def ratio(self, metric: str) -> float:
        return float(self.fast["metrics"][metric]) / float(self.bf16["metrics"][metric])

    def ratio_range(self, metric: str) -> tuple[float, float] | None:
        """The ratio's [low, high] from the two records' spreads over their timed videos (None
        when either record timed one video)."""
        lo_f, hi_f = _spread(self.fast, metric)
        lo_b, hi_b = _spread(self.bf16, metric)
        if None in (lo_f, hi_f, lo_b, hi_b) or lo_b <= 0:
            return None
        return lo_f / hi_b, hi_f / lo_b


def ratio_rows(records: list[dict[str, Any]], hw: str) -> list[RatioRow]:
    """Our counterparts of the paper's 1.84x on hardware tag ``hw``: the best 2-step path end to
    end against the BF16 4-step path with the same other settings; the best such pair from one run
    (one commit) if that is another pair; and the pair with the full Wan decoder in the loop
    (today's path) if that is yet another. Pairs come from the first experiment of
    :data:`SPEED_EXPERIMENTS` that has one on that hardware."""
    pairs = [(a, b) for a, b in ratio_pairs(records) if _hw(a) == hw]
    if not pairs:
        return []
    exp = next(e for e in SPEED_EXPERIMENTS if any(a["experiment"] == e for a, _ in pairs))
    pairs = [(a, b) for a, b in pairs if a["experiment"] == exp]

    def best(cands, metric="e2e_fps"):
        return max(cands, key=lambda p: (float(p[0]["metrics"][metric]), p[0].get("commit") == p[1].get("commit"),
                                         str(p[1].get("created", ""))), default=None)

    rows = []
    top = best(pairs)
    rows.append(RatioRow("our best 2-step path end to end vs BF16 4-step, other settings equal", *top))
    same = best([p for p in pairs if p[0].get("commit") == p[1].get("commit")])
    if same is not None and same != top:
        rows.append(RatioRow("the best such pair measured in one run (one commit)", *same))
    full = best([p for p in pairs if _filled(p[0])["decoder"] == "wan" and _filled(p[0])["vae_mode"] == "sync"],
                "dit_fps")
    if full is not None and all(full != (r.fast, r.bf16) for r in rows):
        rows.append(RatioRow("with the full Wan decoder in the loop (today's path)", *full))
    return rows


# ---------------------------------------------------------------- describing records

_PRECISION_TEXT = {"bf16": "BF16", "fp8": "FP8 W8A8", "nvfp4_weight_only": "NVFP4 weight-only",
                   "nvfp4_emulated": "NVFP4 W4A4 emulated", "nvfp4_te": "NVFP4 (Transformer Engine)",
                   "nvfp4": "NVFP4"}
_DECODER_TEXT = {"wan": "full Wan2.2 decoder", "tae": "tiny TAE decoder", "lightvae_p50": "MG-LightVAE -50%",
                 "lightvae_p75": "MG-LightVAE -75%"}
_VAE_MODE_TEXT = {"sync": "in the loop", "stream": "on a side stream", "device": "on another device"}


def describe(record: dict[str, Any]) -> str:
    """A short plain description of a speed record's configuration."""
    v = _filled(record)
    parts = [f"{_PRECISION_TEXT.get(v['precision'], v['precision'])} {v.get('steps')}-step",
             "compiled" if v["compile"] else "eager"]
    if v["kv_cache"] != "bf16":
        parts.append(f"{v['kv_cache'].upper()} KV")
    if v["attention"] != "sdpa":
        parts.append(f"{v['attention']} attention")
    if v["cuda_graphs"]:
        parts.append("CUDA graphs")
    dec = f"{_DECODER_TEXT.get(v['decoder'], v['decoder'])} {_VAE_MODE_TEXT.get(v['vae_mode'], v['vae_mode'])}"
    extras = [x for x, on in (("channels-last", v["vae_channels_last"]), ("compiled", v["vae_compile"])) if on]
    return " ".join(parts) + ", " + dec + (f" ({', '.join(extras)})" if extras else "")


def _gpu(record: dict[str, Any]) -> str:
    from repro.report import hardware_label

    return hardware_label(record.get("hardware", {}))


def _fps(x: Any) -> str:
    from repro.report import fmt_num

    return fmt_num(x) if _num(x) else ""


def _spread(record: dict[str, Any], metric: str) -> tuple[float | None, float | None]:
    """``metric``'s min and max over the record's timed videos (None, None: one video timed)."""
    m = record.get("metrics", {})
    lo, hi = m.get(f"{metric}_min"), m.get(f"{metric}_max")
    return (float(lo), float(hi)) if _num(lo) and _num(hi) else (None, None)


def _fps_cell(record: dict[str, Any], metric: str) -> str:
    """The median FPS with its [min, max] over the timed videos where the record has them."""
    lo, hi = _spread(record, metric)
    value = _fps(record["metrics"][metric])
    return value if lo is None else f"{value} [{_fps(lo)}, {_fps(hi)}]"


def _ratio_cell(row: RatioRow, metric: str) -> str:
    interval = row.ratio_range(metric)
    text = f"{row.ratio(metric):.2f}x"
    return text if interval is None else f"{text} [{interval[0]:.2f}, {interval[1]:.2f}]"


def _differences(row: RatioRow) -> str:
    """What separates our pair from the paper's NVFP4 2-step vs BF16 4-step comparison."""
    from repro.report import short_commit

    v = _filled(row.fast)
    out = []
    if v["precision"] == "fp8":
        out.append("FP8 W8A8 block linears instead of NVFP4 W4A4 (Hopper has no FP4 tensor cores)")
    elif v["precision"] in ("nvfp4_weight_only", "nvfp4_emulated"):
        out.append(f"{_PRECISION_TEXT[v['precision']]} instead of NVFP4 W4A4 on FP4 tensor cores (Hopper has none)")
    if v["kv_cache"] != "nvfp4":
        out.append(f"{v['kv_cache'].upper()} KV cache instead of NVFP4")
    out.append(f"{_gpu(row.fast)} instead of the paper's GB200 (2-step; the BF16 row's GPU is not stated)")
    out.append(f"decoder: {_DECODER_TEXT.get(v['decoder'], v['decoder'])} {_VAE_MODE_TEXT.get(v['vae_mode'])} "
               "(the paper's VAE and decode timing are not stated)")
    if row.same_run:
        out.append(f"both from one run (commit {short_commit(row.fast)})")
    else:
        out.append(f"2-step from commit {short_commit(row.fast)}, BF16 4-step from commit "
                   f"{short_commit(row.bf16)} (no single run measured both of these paths)")
    return "; ".join(out)


# ---------------------------------------------------------------- the table

def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _table(cols: list[str], rows: list[list[str]]) -> list[str]:
    return [_md_row(cols), "|" + "|".join("---" for _ in cols) + "|", *(_md_row(r) for r in rows)]


def fps_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """One row per (paper FPS row, our path, GPU type with a matching record): the paper's figure
    and setting on the first row of each paper row; our DiT-only and end-to-end FPS (median with
    [min, max] over the timed videos), GPU, commit and experiment from one record."""
    from repro.report import short_commit

    rows = []
    for fr in FPS_ROWS:
        paper = _BY_KEY[fr.paper]
        head = [paper.description.replace("LongLive-2.0-5B ", "").replace(" inference FPS", ""),
                paper.display(), paper.gpu]
        for path in fr.paths:
            recs = [r for r in (pick(records, path, hw) for hw in gpu_types(records)) if r is not None]
            if not recs:
                rows.append(head + [path.label, "", "", "no matching record", "", ""])
                head = ["", "", ""]
            for rec in recs:
                rows.append(head + [f"{describe(rec)} ({path.label})", _fps_cell(rec, "dit_fps"),
                                    _fps_cell(rec, "e2e_fps"), _gpu(rec), short_commit(rec), rec["experiment"]])
                head = ["", "", ""]
    return rows


def paper_table_markdown(results_dir: str) -> str:
    """``results/tables/paper_vs_measured.md``; raises HarnessError when there are no records."""
    from repro.report import fmt_num, short_commit

    records = load_records(results_dir)
    if not records:
        raise HarnessError(f"--results {results_dir}: no result records under this folder, so there is nothing "
                           f"to compare with the paper; run an experiment first (`python -m repro run SPEC`)")
    lines = ["# Paper vs. measured", "",
             "Generated by `python paper_tables.py` from the records under the results folder; do not edit by "
             "hand. Paper values: LongLive-2.0 (arXiv 2605.18739), the release's README model table and project "
             "page.", "", "## How the paper's FPS were measured (as far as the sources say)", ""]
    lines += [f"- {n}" for n in METHOD_NOTES]
    lines += ["", "## FPS: the paper's rows and our paths", "",
              "DiT-only FPS: video frames / DiT time (denoising steps + KV re-cache), no decode. End-to-end FPS: "
              "video frames / wall time until the last frame is decoded and delivered. Each row is one record "
              "(one commit, one GPU), from the newest run on that GPU type that has the path; every GPU type "
              "with such a record gets its own row. Figures are medians over the record's timed videos with "
              "[min, max] over them; a figure without brackets comes from a record that timed one video.", ""]
    lines += _table(["paper row", "paper FPS", "paper GPU", "our path", "DiT-only FPS", "end-to-end FPS", "GPU",
                     "commit", "experiment"], fps_rows(records))

    lines += ["", "## Speedup: the paper's 1.84x and ours", "",
              "The paper's 1.84x is 45.7 / 24.8 FPS: NVFP4 2-step against BF16 4-step, timing method not stated. "
              "Ours divide a 2-step path by the BF16 4-step path with every other setting equal, DiT-only and end "
              "to end, on each GPU type; [low, high] bounds the ratio by the two records' spreads over their timed "
              "videos.", ""]
    rrows = [["NVFP4 2-step vs BF16 4-step (45.7 / 24.8)", "1.84x", "", "", "", "GB200 (2-step); BF16: not stated",
              "paper abstract, README table, project page"]]
    for hw in gpu_types(records):
        for row in ratio_rows(records, hw):
            rrows.append([row.label, "", _ratio_cell(row, "dit_fps"), _ratio_cell(row, "e2e_fps"),
                          f"{describe(row.fast)}: {_fps(row.fast['metrics']['dit_fps'])} / "
                          f"{_fps(row.fast['metrics']['e2e_fps'])} FPS; vs {describe(row.bf16)}: "
                          f"{_fps(row.bf16['metrics']['dit_fps'])} / {_fps(row.bf16['metrics']['e2e_fps'])} FPS",
                          _gpu(row.fast), _differences(row)])
    if len(rrows) == 1:
        rrows.append(["ours", "", "", "", "no 2-step / BF16 4-step pair with equal other settings yet", "", ""])
    lines += _table(["ratio", "paper", "ours DiT-only", "ours end to end", "our 2-step path / BF16 4-step path "
                     "(DiT-only / end-to-end FPS)", "GPU", "what differs from the paper's comparison"], rrows)

    lines += ["", "## The official release as users measured it", "",
              f"Source: {ISSUE_103}. 1280x704, 8-latent blocks; \"denoise\" FPS corresponds to our DiT-only FPS, "
              "\"end-to-end streaming\" to our end-to-end FPS. Reference rows, not measured here; where we have "
              "records on the same kind of GPU they are set beside them.", ""]
    urows = []
    for u in USER_REPORTS:
        recs = [r for r in (pick(records, u.ours, hw) for hw in gpu_types(records))
                if r is not None] if u.ours is not None else []
        ours = "; ".join(f"{describe(rec)}: {_fps_cell(rec, 'dit_fps')} / {_fps_cell(rec, 'e2e_fps')} FPS "
                         f"({_gpu(rec)}, commit {short_commit(rec)})" for rec in recs) or f"no {u.gpu} records"
        urows.append([u.gpu, u.setting, fmt_num(u.denoise_fps), fmt_num(u.e2e_fps), ours, "issue #103"])
    lines += _table(["GPU", "release setting", "denoise FPS", "end-to-end FPS", "ours (DiT-only / end-to-end)",
                     "source"], urows)

    lines += ["", "## Other published numbers", ""]
    orows = []
    for e in PAPER_NUMBERS:
        if e.key in {fr.paper for fr in FPS_ROWS} or e.key == "inference_speedup":
            continue
        orows.append([e.description, e.display(), e.setting, e.gpu, _other_measured(e, records)])
    lines += _table(["claim", "paper", "setting", "paper GPU", "measured"], orows)
    return "\n".join(lines) + "\n"


def _other_measured(e: PaperNumber, records: list[dict[str, Any]]) -> str:
    twins = TWINS.get(e.key, ())
    found = [cell for cell in (_twin_cell(twin, records) for twin in twins) if cell]
    if found:
        return "; ".join(found)
    if twins:
        return "not measured yet (" + "; ".join(t.label for t in twins) + ")"
    return f"not measured ({e.note})" if e.note else "not measured"


# Variant keys that say which training pair a ratio twin compares (the others are settings
# every such pair shares).
_PAIR_KEYS = ("frames", "num_layers", "sharding", "compile", "sp_size", "precision")


def _twin_cell(twin: Twin, records: list[dict[str, Any]]) -> str:
    """``twin``'s figure on each hardware that has records of it, with the records' commits
    ("" when none has)."""
    from repro.report import fmt_num, short_commit

    recs = [r for r in records if r.get("experiment") == twin.experiment
            and matches_subset(r.get("variant", {}), twin.variant)
            and _num(r.get("metrics", {}).get(twin.metric))]
    parts = []
    for hw in sorted({_hw(r) for r in recs}):
        here = [r for r in recs if _hw(r) == hw]
        if twin.ratio is None:
            best = max(here, key=lambda r: str(r.get("created", "")))
            ci = best["metrics"].get(f"{twin.metric}_ci95")
            value = fmt_num(best["metrics"][twin.metric]) + (f" +- {fmt_num(ci)} (95%)" if _num(ci) else
                                                              " (one seed, no interval)")
            parts.append(f"{_gpu(best)} {value}, commit {short_commit(best)}")
            continue
        pairs = _ratio_pairs(here, twin)
        if not pairs:
            continue
        ratio, fast, base = max(pairs, key=lambda p: p[0])
        v = fast["variant"]
        setting = ", ".join(f"{k} {'all' if k == 'num_layers' and v[k] == 0 else v[k]}" for k in _PAIR_KEYS
                            if k in v and k != twin.ratio[0])
        commits = short_commit(fast) if fast.get("commit") == base.get("commit") else \
            f"{short_commit(fast)} / {short_commit(base)}"
        parts.append(f"{_gpu(fast)} {ratio:.2f}x (best of {len(pairs)} pair(s): {setting}; commit {commits})")
    return f"{twin.label}: " + "; ".join(parts) if parts else ""


def _ratio_pairs(records: list[dict[str, Any]], twin: Twin) -> list[tuple[float, dict[str, Any], dict[str, Any]]]:
    """(ratio, fast record, base record) for records whose variants differ only in the twin's key."""
    key, fast_value, base_value = twin.ratio

    def rest(r: dict[str, Any]) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in r["variant"].items() if k != key))

    bases = {rest(r): r for r in records if r["variant"].get(key) == base_value}
    out = []
    for fast in (r for r in records if r["variant"].get(key) == fast_value):
        base = bases.get(rest(fast))
        if base is None:
            continue
        a, b = float(fast["metrics"][twin.metric]), float(base["metrics"][twin.metric])
        if a > 0 and b > 0:
            out.append((b / a if twin.lower_is_better else a / b, fast, base))
    return out

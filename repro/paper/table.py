"""``results/tables/paper_vs_measured.md``: the paper's numbers, our records beside them in words,
per GPU type with their spreads and intervals."""

from __future__ import annotations

from typing import Any

from repro.errors import HarnessError
from repro.paper.choose import RatioRow, filled, gpu_types, hw_tag, pick, ratio_rows, spread, twin_pairs
from repro.paper.numbers import (BY_KEY, FPS_ROWS, ISSUE_103, METHOD_NOTES, PAPER_NUMBERS, TWINS, USER_REPORTS,
                                 PaperNumber, Twin)
from repro.records import load_records
from repro.spec import matches_subset
from repro.stats import is_number


# ---------------------------------------------------------------- describing records

_PRECISION_TEXT = {"bf16": "BF16", "fp8": "FP8 W8A8", "nvfp4_weight_only": "NVFP4 weight-only",
                   "nvfp4_emulated": "NVFP4 W4A4 emulated", "nvfp4_te": "NVFP4 (Transformer Engine)",
                   "nvfp4": "NVFP4"}
_DECODER_TEXT = {"wan": "full Wan2.2 decoder", "tae": "tiny TAE decoder", "lightvae_p50": "MG-LightVAE -50%",
                 "lightvae_p75": "MG-LightVAE -75%"}
_VAE_MODE_TEXT = {"sync": "in the loop", "stream": "on a side stream", "device": "on another device"}


def describe(record: dict[str, Any]) -> str:
    """A short plain description of a speed record's configuration."""
    v = filled(record)
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

    return fmt_num(x) if is_number(x) else ""


def _fps_cell(record: dict[str, Any], metric: str) -> str:
    """The median FPS with its [min, max] over the timed videos where the record has them."""
    lo, hi = spread(record, metric)
    value = _fps(record["metrics"][metric])
    return value if lo is None else f"{value} [{_fps(lo)}, {_fps(hi)}]"


def _ratio_cell(row: RatioRow, metric: str) -> str:
    interval = row.ratio_range(metric)
    text = f"{row.ratio(metric):.2f}x"
    return text if interval is None else f"{text} [{interval[0]:.2f}, {interval[1]:.2f}]"


def _differences(row: RatioRow) -> str:
    """What separates our pair from the paper's NVFP4 2-step vs BF16 4-step comparison."""
    from repro.report import short_commit

    v = filled(row.fast)
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
        paper = BY_KEY[fr.paper]
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
            and is_number(r.get("metrics", {}).get(twin.metric))]
    parts = []
    for hw in sorted({hw_tag(r) for r in recs}):
        here = [r for r in recs if hw_tag(r) == hw]
        if twin.ratio is None:
            best = max(here, key=lambda r: str(r.get("created", "")))
            ci = best["metrics"].get(f"{twin.metric}_ci95")
            value = fmt_num(best["metrics"][twin.metric]) + (f" +- {fmt_num(ci)} (95%)" if is_number(ci) else
                                                              " (one seed, no interval)")
            parts.append(f"{_gpu(best)} {value}, commit {short_commit(best)}")
            continue
        pairs = twin_pairs(here, twin)
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

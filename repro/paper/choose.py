"""Choosing the records set beside the paper's numbers: 5B speed records per GPU type (the
newest run that has a path), like-for-like 2-step / BF16 4-step pairs, and pairs of records that
differ in one key for the measured twins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from repro.paper.numbers import (FAST_PRECISIONS, PRESET_5B, SPEED_EXPERIMENTS, VARIANT_DEFAULTS, OurPath,
                                 Twin)
from repro.spec import matches_subset
from repro.stats import is_number



def filled(record: dict[str, Any]) -> dict[str, Any]:
    return {**VARIANT_DEFAULTS, **record.get("variant", {})}


def speed_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """5B streaming-speed records on a GPU with both DiT-only and end-to-end FPS."""
    return [r for r in records if r.get("experiment") in SPEED_EXPERIMENTS
            and r.get("variant", {}).get("preset") == PRESET_5B and r.get("hardware", {}).get("device") == "cuda"
            and is_number(r.get("metrics", {}).get("dit_fps")) and is_number(r.get("metrics", {}).get("e2e_fps"))]


def hw_tag(record: dict[str, Any]) -> str:
    from repro.hardware import hardware_tag

    return hardware_tag(record.get("hardware", {}))


def _commit_age(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """(experiment, hardware tag, commit) -> the newest record time of that run."""
    age: dict[tuple[str, str, str], str] = {}
    for r in records:
        key = (r["experiment"], hw_tag(r), str(r.get("commit")))
        age[key] = max(age.get(key, ""), str(r.get("created", "")))
    return age


def gpu_types(records: list[dict[str, Any]]) -> list[str]:
    """Hardware tags (one per GPU type and count) of the 5B speed records, in name order."""
    return sorted({hw_tag(r) for r in speed_records(records)})


def pick(records: list[dict[str, Any]], path: OurPath, hw: str | None = None) -> dict[str, Any] | None:
    """The record for ``path`` (on hardware tag ``hw``; None: the GPU with the newest matching
    record): from the first experiment of :data:`SPEED_EXPERIMENTS` that has a match there, the
    newest commit (run) that has a match, and within that run the highest ``path.select`` value."""
    speed = speed_records(records)
    cands = [r for r in speed if matches_subset(filled(r), path.variant)
             and (path.gpu is None or path.gpu in str(r["hardware"].get("gpu_name", "")))
             and (hw is None or hw_tag(r) == hw)]
    if not cands:
        return None
    exp = next(e for e in SPEED_EXPERIMENTS if any(r["experiment"] == e for r in cands))
    cands = [r for r in cands if r["experiment"] == exp]
    hw = max(cands, key=lambda r: str(r.get("created", "")))
    cands = [r for r in cands if hw_tag(r) == hw_tag(hw)]
    age = _commit_age(speed)
    run = max({str(r.get("commit")) for r in cands}, key=lambda c: age[(exp, hw_tag(hw), c)])
    cands = [r for r in cands if str(r.get("commit")) == run]
    return max(cands, key=lambda r: (float(r["metrics"][path.select]), str(r.get("created", ""))))


def _pair_key(record: dict[str, Any]) -> tuple:
    v = filled(record)
    return (record["experiment"], hw_tag(record),
            tuple(sorted((k, repr(x)) for k, x in v.items() if k not in ("precision", "steps"))))


def ratio_pairs(records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(2-step fast record, BF16 4-step record) pairs from one experiment on one GPU whose
    variants differ only in precision and steps."""
    speed = speed_records(records)
    four: dict[tuple, list[dict[str, Any]]] = {}
    for r in speed:
        if filled(r).get("precision") == "bf16" and r["variant"].get("steps") == 4:
            four.setdefault(_pair_key(r), []).append(r)
    return [(a, b) for a in speed
            if a["variant"].get("steps") == 2 and filled(a).get("precision") in FAST_PRECISIONS
            for b in four.get(_pair_key(a), [])]


def spread(record: dict[str, Any], metric: str) -> tuple[float | None, float | None]:
    """``metric``'s min and max over the record's timed videos (None, None: one video timed)."""
    m = record.get("metrics", {})
    lo, hi = m.get(f"{metric}_min"), m.get(f"{metric}_max")
    return (float(lo), float(hi)) if is_number(lo) and is_number(hi) else (None, None)


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
        lo_f, hi_f = spread(self.fast, metric)
        lo_b, hi_b = spread(self.bf16, metric)
        if None in (lo_f, hi_f, lo_b, hi_b) or lo_b <= 0:
            return None
        return lo_f / hi_b, hi_f / lo_b


def ratio_rows(records: list[dict[str, Any]], hw: str) -> list[RatioRow]:
    """Our counterparts of the paper's 1.84x on hardware tag ``hw``: the best 2-step path end to
    end against the BF16 4-step path with the same other settings; the best such pair from one run
    (one commit) if that is another pair; and the pair with the full Wan decoder in the loop
    (today's path) if that is yet another. Pairs come from the first experiment of
    :data:`SPEED_EXPERIMENTS` that has one on that hardware."""
    pairs = [(a, b) for a, b in ratio_pairs(records) if hw_tag(a) == hw]
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
    full = best([p for p in pairs if filled(p[0])["decoder"] == "wan" and filled(p[0])["vae_mode"] == "sync"],
                "dit_fps")
    if full is not None and all(full != (r.fast, r.bf16) for r in rows):
        rows.append(RatioRow("with the full Wan decoder in the loop (today's path)", *full))
    return rows


def twin_pairs(records: list[dict[str, Any]], twin: Twin) -> list[tuple[float, dict[str, Any], dict[str, Any]]]:
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

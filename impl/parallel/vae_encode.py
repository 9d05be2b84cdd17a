"""SP-aware chunked VAE encoding with a halo (code study, section 4).

Command line: ``python -m impl.parallel.vae_encode --latents 96 --sp 4 --halo 28`` prints the
per-rank window table (``--json`` for JSON; ``--preset P`` adds that preset's VAE receptive
field). The protocol itself is :mod:`impl.parallel.sp_vae_encode` (windows, halo, exchange);
the receptive field is :mod:`impl.parallel.vae_receptive_field`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Sequence

from impl.config import raw_frames_for_latents
from impl.parallel.sp_vae_encode import DEFAULT_HALO, RawWindow, window_table

__all__ = ["format_window_table", "main"]


def format_window_table(windows: Sequence[RawWindow]) -> str:
    """A plain-text table: rank, keep, halo_start, raw window, raw frames, drop."""
    header = ("rank", "keep", "halo_start", "raw window", "raw frames", "drop")
    rows = [(str(r), f"[{w.latent_start},{w.latent_stop})", str(w.halo_start),
             f"[{w.raw_start},{w.raw_stop})", str(w.raw_frames), str(w.drop))
            for r, w in enumerate(windows)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(wd) for h, wd in zip(header, widths))]
    lines += ["  ".join(c.rjust(wd) for c, wd in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the per-rank window table (or JSON) for F latents, sp ranks and a halo."""
    parser = argparse.ArgumentParser(prog="python -m impl.parallel.vae_encode",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--latents", type=int, default=96, help="latent frames F of the clip")
    parser.add_argument("--sp", type=int, default=4, help="sequence-parallel size")
    parser.add_argument("--halo", type=int, default=DEFAULT_HALO, help="halo in latents")
    parser.add_argument("--temporal-factor", type=int, default=4, help="raw frames per latent")
    parser.add_argument("--preset", default=None,
                        help="also print this preset's VAE receptive field (built on meta)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        windows = window_table(args.latents, args.sp, args.halo, args.temporal_factor)
    except ValueError as exc:
        parser.error(str(exc))
    raw_frames = raw_frames_for_latents(args.latents, args.temporal_factor)  # both validated above
    rf = None
    if args.preset is not None:
        from impl.config import get_preset
        from impl.parallel.vae_receptive_field import receptive_field_for_config
        rf = receptive_field_for_config(get_preset(args.preset).vae)
    if args.json:
        out = {"latents": args.latents, "sp": args.sp, "halo": args.halo, "raw_frames": raw_frames,
               "windows": [dict(asdict(w), rank=r, raw_frames=w.raw_frames)
                           for r, w in enumerate(windows)]}
        if rf is not None:
            out["receptive_field_latents"] = rf
        print(json.dumps(out, indent=1))
        return 0
    print(f"F={args.latents} latents ({raw_frames} raw frames), sp={args.sp}, halo={args.halo}")
    print(format_window_table(windows))
    if rf is not None:
        exact = "exact" if args.halo >= rf else f"NOT exact (< {rf})"
        print(f"{args.preset} VAE receptive field: {rf} latents; halo {args.halo} is {exact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Print (and write) the paper's published numbers next to our measured ones.

Usage: python paper_tables.py [--results DIR] [--out results/tables/paper_vs_measured.md]

Exits 2 with a one-line message (and writes nothing) when DIR holds no result records or the
output cannot be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from impl.io import write_text
from repro.errors import HarnessError
from repro.paper import paper_table_markdown
from repro.records import check_output_file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare LongLive-2.0 paper numbers with our result records.")
    ap.add_argument("--results", default="results", metavar="DIR",
                    help="folder holding result records (default: results)")
    ap.add_argument("--out", default=None, metavar="FILE",
                    help="Markdown file to write (default: <results>/tables/paper_vs_measured.md)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.results) / "tables" / "paper_vs_measured.md"
    try:
        if not Path(args.results).is_dir():
            raise HarnessError(f"--results {args.results}: no such folder")
        check_output_file(out, "--out")
        text = paper_table_markdown(args.results)
        write_text(out, text)   # atomic, mode 0644
    except (HarnessError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    sys.stdout.write(text)
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

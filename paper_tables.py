"""Print (and write) the paper's published numbers next to our measured ones.

Usage: python paper_tables.py [--results DIR] [--out results/tables/paper_vs_measured.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from repro.paper import paper_table_markdown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare LongLive-2.0 paper numbers with our result records.")
    ap.add_argument("--results", default="results", help="folder holding result records (default: results)")
    ap.add_argument("--out", default=None,
                    help="Markdown file to write (default: <results>/tables/paper_vs_measured.md)")
    args = ap.parse_args(argv)
    text = paper_table_markdown(args.results)
    out = Path(args.out) if args.out else Path(args.results) / "tables" / "paper_vs_measured.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    sys.stdout.write(text)
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rewrite README.md's reference-figure blocks from benchmarks/expected.json (the one source of truth).

    python benchmarks/sync_readme.py            # rewrite README.md
    python benchmarks/sync_readme.py --check    # exit 1 if README.md is out of date

tests/test_readme_figures.py fails while the two disagree.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from patchcsra.bench import sync_readme

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 when README.md differs")
    ap.add_argument("--expected", default=str(REPO / "benchmarks" / "expected.json"))
    args = ap.parse_args()
    readme = REPO / "README.md"
    text = readme.read_text()
    new = sync_readme(text, json.loads(Path(args.expected).read_text()))
    if args.check:
        print("README.md is up to date" if new == text else "README.md differs from expected.json")
        return 0 if new == text else 1
    if new != text:
        tmp = readme.with_name(".README.md.tmp")
        tmp.write_text(new)
        tmp.replace(readme)
        print("README.md rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())

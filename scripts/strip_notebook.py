#!/usr/bin/env python3
"""Strip notebooks to their committed form: outputs and execution counts kept, metadata dropped.

    python scripts/strip_notebook.py notebooks/*.ipynb            # rewrite in place
    python scripts/strip_notebook.py --check notebooks/*.ipynb    # exit 1 if any is not clean

The logic is `slc.render.strip`; to re-execute a notebook before committing it, use
`python -m slc.render --update notebooks/NN_name.ipynb` (executes in a fresh kernel, then strips).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from slc.render import strip, strip_file  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--check", action="store_true", help="report notebooks that are not stripped; change nothing")
    a = p.parse_args(argv)
    dirty = []
    for path in a.paths:
        if a.check:
            text = path.read_text(encoding="utf-8")
            if nbformat.writes(strip(nbformat.reads(text, as_version=4))) + "\n" != text:
                dirty.append(path)
        elif strip_file(path):
            print(f"stripped {path}")
    for path in dirty:
        print(f"{path} is not stripped: run python scripts/strip_notebook.py {path}", file=sys.stderr)
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())

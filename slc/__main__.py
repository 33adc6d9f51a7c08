"""`python -m slc ...` is the `slc` command (slc.cli)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

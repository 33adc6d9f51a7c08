"""A short fuzzing run inside the suite (< 30 s); `make fuzz` runs the long one.

1. The fuzz target of bench/fuzz.py on seeded random mutations of valid streams, tensors and a
   model file, in this process, for 7 s: every input decodes or raises FormatError. Crashes
   already pinned by strict xfail tests (tests/known_open.py) are tolerated, nothing else, and the
   model's config is left alone (its open problems are pinned the same way).
2. atheris, coverage-guided, on the stream and tensor parsers for 5 s in a child process (the way
   `make fuzz` runs it): 0 crashes. Skipped where atheris is not installed.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from known_open import known_open

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("slc_bench_fuzz", ROOT / "bench" / "fuzz.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_random_mutations_decode_or_raise_format_error(tmp_path):
    fuzz = _fuzz_module()
    rec = fuzz.loop(7, seed=int(os.environ.get("SLC_FUZZ_SEED", "0")), crash_dir=tmp_path, quiet=True)
    unexpected = [f"{fuzz.signature(e)}: {e}" for e in rec.exceptions if not known_open(e)]
    assert rec.inputs > 300, f"only {rec.inputs} inputs in 7 s"
    assert not unexpected, f"{len(unexpected)} crashes in {rec.inputs} inputs: {unexpected[:3]}"


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_atheris_finds_no_crash_in_the_stream_and_tensor_parsers(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz.py"), "--seconds", "5", "--targets",
                          "stream,tensor", "--workdir", str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=100)
    m = re.search(r"fuzz \(atheris\): (\d+) inputs in \d+ s, (\d+) crashes", res.stdout)
    assert m, res.stdout[-1000:] + res.stderr[-2000:]
    inputs, crashes = int(m.group(1)), int(m.group(2))
    assert inputs > 1000 and crashes == 0, res.stdout[-2000:]

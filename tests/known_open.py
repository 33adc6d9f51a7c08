"""Crashes the fuzzer and the property tests found that are not fixed yet, one line each.

Each is pinned by a strict xfail test in tests/test_reliability.py; the property tests and the
short fuzz run tolerate exactly these and nothing else. Delete an entry once its xfail test passes.
Keyed by (exception type, innermost function in slc/nn.py, code on that line).
"""
import traceback

KNOWN_OPEN: dict = {}   # all fixed; add a line here (with its strict xfail test) when a new crash is found


def known_open(exc: BaseException) -> bool:
    """Is this one of KNOWN_OPEN: raised at (or right under) that line of slc/nn.py?"""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith("slc/nn.py")]
    return bool(frames) and any((type(exc).__name__, frames[-1].name) == k[:2] and k[2] in (frames[-1].line or "")
                                for k in KNOWN_OPEN)

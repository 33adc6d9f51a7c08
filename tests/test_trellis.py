"""slc.trellis: the Viterbi search is optimal and within 2 steps, the three decoders (levels, levels_torch,
levels_inplace) agree with a plain scan of the state machine, GPTQ's block search reduces to Viterbi, bad input."""
import itertools

import numpy as np
import pytest
import torch

from slc import trellis
from slc.trellis import NEXT, QUANTIZER, levels, levels_inplace, levels_torch, scan_scratch, search_block, viterbi


def scan(codes) -> list:
    """The levels of one row of codes, by the definition: state 0, level 2k - Q[state] sign k, next NEXT[s, k & 1]."""
    s, out = 0, []
    for k in (int(c) for c in codes):
        out.append(2 * k - int(QUANTIZER[s]) * ((k > 0) - (k < 0)))
        s = int(NEXT[s, k & 1])
    return out


def path_errors(x: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Squared error of every code sequence (rows of `candidates`) against x, the machine run on all at once."""
    s = np.zeros(len(candidates), dtype=np.int64)
    err = np.zeros(len(candidates))
    for t in range(candidates.shape[1]):
        k = candidates[:, t]
        err += (x[t] - (2 * k - QUANTIZER[s] * np.sign(k))) ** 2
        s = NEXT[s, k & 1]
    return err


def test_viterbi_stays_within_two_steps():
    x = np.random.default_rng(0).standard_normal((7, 500)) * np.array([0.3, 1, 3, 10, 40, 200, 1e4])[:, None]
    k = viterbi(x)
    assert k.dtype == np.int64 and k.shape == x.shape
    assert np.abs(x - levels(k)).max() <= 2.0


@pytest.mark.parametrize("seed", range(12))
def test_viterbi_path_is_optimal_by_brute_force(seed):
    """No sequence of the machine beats Viterbi's. Candidates: every code near x_t / 2 (the nearest level of each
    parity on either quantiser lies among them, and a code's parity alone decides the next state)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    x = rng.standard_normal(n) * rng.choice([0.7, 2.0, 6.0])
    near = [range(int(np.floor(v / 2)) - 2, int(np.floor(v / 2)) + 4) for v in x]
    candidates = np.array(list(itertools.product(*near)), dtype=np.int64)
    best = path_errors(x, candidates).min()
    k = viterbi(x)
    got = float(((x - levels(k)) ** 2).sum())
    assert got <= best + 1e-9
    assert got == pytest.approx(best, abs=1e-9)                     # and it is one of the machine's paths
    assert path_errors(x, k[None]).item() == pytest.approx(got)


def test_the_three_decoders_agree_with_the_definition():
    rng = np.random.default_rng(1)
    codes = rng.integers(-40, 41, (9, 57))
    codes[rng.random(codes.shape) < 0.05] = rng.choice([2 ** 24 - 1, -(2 ** 24) + 3, 70_001])
    want = np.array([scan(r) for r in codes], dtype=np.float64)
    np.testing.assert_array_equal(levels(codes), want)
    np.testing.assert_array_equal(levels(codes.astype(np.int32)), want)
    np.testing.assert_array_equal(levels(codes.astype(np.float64)), want)       # integer-valued floats
    got = levels(torch.from_numpy(codes))
    assert isinstance(got, torch.Tensor) and torch.equal(got, torch.from_numpy(want))
    assert torch.equal(levels_torch(torch.from_numpy(codes)), torch.from_numpy(want).float())
    for dtype in (np.float32, np.float64):                          # float codes in a flat buffer, one row at a time
        buf = np.concatenate([[5.0], codes.reshape(-1), [7.0]]).astype(dtype)
        for r in range(codes.shape[0]):
            levels_inplace(buf[1 + r * codes.shape[1]:1 + (r + 1) * codes.shape[1]], scan_scratch(codes.shape[1]))
        np.testing.assert_array_equal(buf[1:-1].reshape(codes.shape), want.astype(dtype))
        assert buf[0] == 5.0 and buf[-1] == 7.0                     # nothing outside the rows touched
    assert not np.array_equal(want, 2.0 * codes)                    # the states matter: not ECSQ's 2k
    np.testing.assert_array_equal(levels(codes.reshape(3, 3, 57)), want.reshape(3, 3, 57))   # rows = last axis


def test_levels_torch_in_chunks_of_rows(monkeypatch):
    codes = np.random.default_rng(3).integers(-30, 31, (37, 21))
    want = torch.from_numpy(levels(codes)).float()
    monkeypatch.setattr(trellis, "TORCH_CHUNK", 50)                   # two rows a chunk, the last one alone
    assert torch.equal(levels_torch(torch.from_numpy(codes)), want)
    assert levels_torch(torch.zeros(0, 5, dtype=torch.int64)).shape == (0, 5)


def test_the_scan_eight_codes_at_a_time_at_every_row_length():
    rng = np.random.default_rng(7)
    for n in [*range(1, 26), 63, 64, 65, 576]:                     # every remainder modulo 8, and rows of one word
        codes = rng.integers(-9, 10, (3, n))
        want = np.array([scan(r) for r in codes], dtype=np.float64)
        np.testing.assert_array_equal(levels(codes), want)
        assert torch.equal(levels_torch(torch.from_numpy(codes)), torch.from_numpy(want).float())
        buf = codes.astype(np.float32).reshape(-1)
        scratch = scan_scratch(n + 13)                              # longer than needed, reused across rows
        scratch[:] = 255                                            # stale bytes must not leak into the states
        for r in range(3):
            levels_inplace(buf[r * n:(r + 1) * n], scratch)
        np.testing.assert_array_equal(buf.reshape(3, n), want.astype(np.float32))


def test_every_row_starts_in_state_zero():
    row = np.array([1, 3, -2, 5, 1, 1])
    both = np.stack([row, row])
    np.testing.assert_array_equal(levels(both)[1], scan(row))
    np.testing.assert_array_equal(levels(row), scan(row))


def test_search_block_with_identity_is_viterbi():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 40))
    step = rng.uniform(0.1, 0.5, 6)
    codes, errs, ends = search_block(w, np.eye(40), step, np.zeros(6, dtype=np.int64))
    k = viterbi(w / step[:, None])
    e_block = ((w - levels(codes) * step[:, None]) ** 2).sum(1)
    e_vit = ((w - levels(k) * step[:, None]) ** 2).sum(1)
    np.testing.assert_allclose(e_block, e_vit, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(errs, w - levels(codes) * step[:, None], atol=1e-12)   # U_ii = 1: the plain errors
    s = np.zeros(6, dtype=np.int64)
    for t in range(40):                                             # the end states are where the codes lead
        s = NEXT[s, codes[:, t] & 1]
    np.testing.assert_array_equal(ends, s)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        viterbi(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="NaN"):
        viterbi(np.array([np.inf]))
    with pytest.raises(ValueError, match="1-D"):
        viterbi(np.float64(1.0))
    with pytest.raises(ValueError, match="1-D"):
        levels(np.int64(3))
    with pytest.raises(ValueError, match="2\\*\\*30"):
        viterbi(np.array([2.0 ** 31]))
    with pytest.raises(TypeError, match="integers"):
        levels(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="rows, cols"):
        levels_torch(torch.zeros(4, dtype=torch.int64))
    assert viterbi(np.zeros((3, 0))).shape == (3, 0) and levels(np.zeros((0, 4), np.int64)).shape == (0, 4)


def test_module_docstring_example():
    import doctest
    assert doctest.testmod(trellis).failed == 0

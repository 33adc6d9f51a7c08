"""Trellis-coded quantisation: ECSQ's grid, with the choice of level tied along each row by an 8-state machine.

ECSQ rounds every weight to its own nearest level and sits a quarter of a bit above the Shannon bound
(slc.ecsq.shannon_gap). A trellis-coded quantiser (Marcellin & Fischer 1990; here in the form of the
"dependent quantisation" of H.266/VVC, with 8 states) codes the weights of a row as one sequence. Two scalar
quantisers share the step d:

    Q0   levels 2k d                    ..., -4d, -2d, 0, 2d, 4d, ...
    Q1   levels (2k - sign k) d         ..., -3d, -d, 0, d, 3d, ...

and a state machine says which one the next weight uses: even states Q0, odd states Q1, and the parity of
each code k moves it on (NEXT below). Each weight still costs one code k, entropy-coded exactly as an ECSQ
code (zig-zag symbols, the same rANS streams and escapes), but a row's codes are picked together by a
Viterbi search over the 8 states, so the reconstruction points of a row form a denser packing than a grid.
On a Gaussian, 2.6-4.4 bits/weight, it sits 0.09-0.16 bits above the Shannon bound instead of ECSQ's
0.25-0.27 (VVC's 4-state machine: 0.11-0.19); on SmolLM2's rotated layers (off their Q4_1 grid) with GPTQ it lowers the
layers' output error by about 15 % at the same rate.

Decoding is a scan along each row: state 0 at the row's start, then level(k, state) and the next state,
one code after another (`levels`), after which the weight is levels x scale as for ECSQ.

    codes      k, signed integers (the stored symbols)
    level      2k - QUANTIZER[state] * sign(k), in units of the quantiser's absolute step d
    next state NEXT[state, k & 1]

Error bound: whatever the state, each parity of k offers a level within 2d of any weight, so the plain
search (`viterbi`) keeps every weight within 2 steps (ECSQ: half a step of its own, twice as coarse step).
`search_block` is the search GPTQ uses (slc.gptq): each of the 8 surviving paths carries its own
error-fed-back copy of the block's remaining weights, and the path metric is GPTQ's loss,
sum_i (err_i / U_ii)^2 with U the upper Cholesky factor of the inverse Hessian.

Both searches minimise the error alone. An entropy-constrained search (error + lambda x each code's order-0
length, re-estimated over four passes; each state may also take the code one step of its parity nearer zero) was
measured on a Gaussian (64 x 1024) and not adopted: at about 3.5 bits it came 0.103 bits above the bound at
best (lambda 0.4 step^2 per bit) against the plain search's 0.116, at 2.9 bits 0.114 against 0.139; larger lambdas
were worse.

>>> import numpy as np
>>> x = np.random.default_rng(0).standard_normal((2, 1000)) / 0.3     # weights in units of d
>>> k = viterbi(x)
>>> bool(np.abs(x - levels(k)).max() <= 2.0)
True
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from numba import njit

STATES = 8
QUANTIZER = np.array([0, 1, 0, 1, 0, 1, 0, 1], dtype=np.int64)   # state -> which quantiser (Q0 or Q1)
# (state, code parity) -> next state: the 8-state table of VVC's successor (ECM); chosen with QUANTIZER above as
# the best of every balanced assignment of the quantisers to its states (Gaussian, 2.6-4.4 bits)
NEXT = np.array([[0, 2], [5, 7], [1, 3], [6, 4], [2, 0], [4, 6], [3, 1], [7, 5]], dtype=np.int64)
assert NEXT.shape == (STATES, 2)
# ECSQ step -> the trellis step of the same rate (order-0 entropy of the codes), both x row RMS, measured on a
# Gaussian (256 x 1024, rows of unit RMS; bisection on the trellis step): about half the step at high rate, where a
# trellis code spends its parity on the state, nearly the same step below a bit, where most codes are 0 either way.
# SmolLM2's rotated layers agree at 3.5 bits (trellis 0.19 -> 3.548 bits, ECSQ 0.36 -> 3.529).
_SAME_RATE = ((0.1, 0.0509), (0.2, 0.1038), (0.36, 0.1928), (0.5, 0.2757), (0.7, 0.4033), (1.0, 0.6174),
              (1.4, 0.9658), (2.0, 1.6788), (3.0, 2.8415))      # (ECSQ step, trellis step), rates 5.37 .. 0.70 bits
_INF = 1e300


@njit(cache=True, nogil=True)
def _level(k, q):
    """The level of code k on quantiser q, in steps."""
    if q == 0 or k == 0:
        return 2.0 * k
    return 2.0 * k - 1.0 if k > 0 else 2.0 * k + 1.0


@njit(cache=True, nogil=True)
def _nearest(x, q, p):
    """The code of parity p on quantiser q whose level is nearest x (in steps)."""
    if q == 0:                                   # levels 4m + 2p
        m = np.floor((x - 2.0 * p) / 4.0 + 0.5)
        return np.int64(2.0 * m + p)
    k0 = np.int64(np.floor(x / 2.0))             # Q1: levels 2k - sign k; the nearest of parity p is near x / 2
    best, bd = np.int64(0), _INF
    for k in range(k0 - 2, k0 + 4):
        if (k & 1) != p:
            continue
        d = x - _level(k, 1)
        if d * d < bd:
            bd, best = d * d, k
    return best


@njit(cache=True, nogil=True)
def _viterbi_rows(x, qs, nxt, out):
    rows, n = x.shape
    S = qs.size
    back = np.empty((n, S), np.int64)
    code = np.empty((n, S), np.int64)
    for r in range(rows):
        J = np.full(S, _INF)
        J[0] = 0.0
        for t in range(n):
            Jn = np.full(S, _INF)
            v = x[r, t]
            for s in range(S):
                if J[s] >= _INF:
                    continue
                q = qs[s]
                for p in range(2):
                    k = _nearest(v, q, p)
                    e = v - _level(k, q)
                    c = J[s] + e * e
                    ns = nxt[s, p]
                    if c < Jn[ns]:
                        Jn[ns], back[t, ns], code[t, ns] = c, s, k
            J = Jn
        s = 0
        for u in range(S):
            if J[u] < J[s]:
                s = u
        for t in range(n - 1, -1, -1):
            out[r, t] = code[t, s]
            s = back[t, s]



def _byte_tables(qs: np.ndarray, nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The machine eight codes at a time: for state s and b, the parities of eight codes (bit i: code i),
    STEP8[256 s + b] is 256 x the state after them and QBITS8[256 s + b] the quantiser of each of them, one per
    byte (byte i: code i, little-endian)."""
    step = np.zeros(qs.size * 256, dtype=np.int64)
    qbits = np.zeros(qs.size * 256, dtype=np.uint64)
    for s0 in range(qs.size):
        for b in range(256):
            s, q = s0, 0
            for i in range(8):
                q |= int(qs[s]) << (8 * i)
                s = int(nxt[s, (b >> i) & 1])
            step[256 * s0 + b], qbits[256 * s0 + b] = 256 * s, q
    return step, qbits


STEP8, QBITS8 = _byte_tables(QUANTIZER, NEXT)
assert sys.byteorder == "little", "levels_inplace reads eight parity bytes as one little-endian word"


@njit(cache=True, nogil=True)
def scan_scratch(n):
    """Work space for levels_inplace on rows of up to n codes."""
    return np.zeros(2 * ((n + 7) // 8 * 8), dtype=np.uint8)


@njit(cache=True, nogil=True, fastmath=True)
def levels_inplace(w, scratch):
    """w, one row of float codes (a contiguous 1-D view), replaced by its levels; scratch from scan_scratch(len(w))
    or longer (the fused decode kernels call this, with one scratch per call).

    The scan's only sequential part is the state, and it needs only the codes' parities. So: the parities in one
    vector pass; the states eight codes at a time through STEP8 / QBITS8 (one table lookup per eight codes, which
    also gives their eight quantisers); then level = 2k - q sign(k) in one vector pass. 0.6 ns a weight (1536 x
    576 codes, one thread) against 1.4 for a branch-free scan one code at a time, 7.6 for a table lookup per
    code."""
    n = w.size
    m = (n + 7) // 8
    par = scratch[:8 * m]
    qq = scratch[8 * m:16 * m]
    for t in range(n):
        par[t] = np.int64(w[t]) & 1
    for t in range(n, 8 * m):
        par[t] = 0
    p64 = par.view(np.uint64)
    q64 = qq.view(np.uint64)
    e = np.int64(0)                          # 256 x the state entering the group of eight
    for j in range(m):
        x = p64[j]                           # eight parity bytes -> one byte b, bit i = code i's parity
        x |= x >> np.uint64(7)
        x |= x >> np.uint64(14)
        x |= x >> np.uint64(28)
        e += np.int64(x & np.uint64(255))    # 256 s + b
        q64[j] = QBITS8[e]
        e = STEP8[e]
    for t in range(n):
        v = np.float64(w[t])
        a = np.float64(qq[t])
        w[t] = 2 * v - min(max(v, -a), a)   # q sign(k) for an integer k and q in {0, 1}: exact


@njit(cache=True, nogil=True)
def _levels_rows(buf, n):
    """Every row (n codes each) of the flat float buffer replaced by its levels."""
    scratch = scan_scratch(n)
    for o in range(0, buf.size, n):
        levels_inplace(buf[o:o + n], scratch)


def _same_rate(step: float, inverse: bool) -> float:
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0 or not np.isfinite(step):
        raise ValueError(f"step={step!r} must be a positive number")
    e, t = (np.log(np.array(c)) for c in zip(*_SAME_RATE, strict=True))
    x, y = (t, e) if inverse else (e, t)
    ratio = np.interp(np.log(step), x, y - x)           # log(step ratio), held at the table's ends beyond them
    return float(step * np.exp(ratio))


def step_for_ecsq(step: float) -> float:
    """The trellis step that costs about what ECSQ at `step` costs (both relative to the row RMS): 0.51-0.95 x it,
    from 5.4 bits down to 0.7 (Gaussian weights); how slc.recipe turns an allocation's ECSQ step into a trellis one.

    >>> round(step_for_ecsq(0.36), 4), round(ecsq_step_for(step_for_ecsq(0.7)), 4)
    (0.1928, 0.7)
    """
    return _same_rate(step, inverse=False)


def ecsq_step_for(step: float) -> float:
    """The inverse of step_for_ecsq: the ECSQ step of about the rate of trellis codes at `step`."""
    return _same_rate(step, inverse=True)


def _rows(a: np.ndarray) -> np.ndarray:
    if a.ndim == 0:
        raise ValueError("a trellis runs along a row: give at least a 1-D array")
    return a.reshape(-1, a.shape[-1]) if a.ndim != 2 else a


def viterbi(x) -> np.ndarray:
    """Codes (int64, x's shape) of the trellis path nearest to x (in units of the step) along its last axis,
    every row starting in state 0: the least sum of squared errors over all paths of the machine."""
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("trellis input holds NaN/Inf")
    flat = np.ascontiguousarray(_rows(x))
    if float(np.abs(flat).max(initial=0.0)) >= 2 ** 30:
        raise ValueError("codes would exceed 2**30: use a larger step")
    out = np.empty(flat.shape, dtype=np.int64)
    if flat.size:
        _viterbi_rows(flat, QUANTIZER, NEXT, out)
    return out.reshape(x.shape)


def levels(codes):
    """The levels (float64 numpy, or float torch for a torch tensor) of trellis codes, row by row along the last
    axis: what the codes stand for in steps. Exact for any code below 2**52."""
    if isinstance(codes, torch.Tensor):
        return torch.from_numpy(levels(codes.detach().cpu().numpy())).to(codes.device)
    c = np.asarray(codes)
    if c.dtype.kind not in "iu" and not (c.dtype.kind == "f" and np.array_equal(c, np.round(c))):
        raise TypeError(f"trellis codes are integers, got {c.dtype}")
    out = np.array(_rows(c), dtype=np.float64).reshape(-1)          # a copy: the codes, scanned in place
    if out.size:
        _levels_rows(out, c.shape[-1])
    return out.reshape(c.shape)


TORCH_CHUNK = 1 << 20          # codes levels_torch scans at once: bounds its temporaries (about 25 bytes a code)


def levels_torch(codes: torch.Tensor) -> torch.Tensor:
    """levels() on any device without leaving it, in a fixed number of vector steps (a GPU decoder's scan).
    codes (rows, cols) integer -> float32 levels.

    As levels_inplace, the states go eight codes at a time: each group of eight parities is a map of the states
    (STEP8), and the state entering every group comes from composing those maps along the row with a
    Hillis-Steele prefix scan (log2(cols / 8) gathers), so no step loops over the columns. Rows are scanned
    TORCH_CHUNK codes at a time, so the int64 temporaries stay small beside the float32 result."""
    if codes.dim() != 2:
        raise ValueError(f"levels_torch takes (rows, cols) codes, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    dev = codes.device
    out = torch.empty(rows, cols, dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out
    m = -(-cols // 8)
    shift = torch.arange(8, dtype=torch.uint8, device=dev)
    step = torch.as_tensor(STEP8 // 256, device=dev)
    qbytes = torch.as_tensor(QBITS8.view(np.uint8).reshape(-1, 8), device=dev)      # (states x 256, 8) uint8
    first = 256 * torch.arange(STATES, device=dev)
    per = max(1, TORCH_CHUNK // cols)
    for r0 in range(0, rows, per):
        k = codes[r0:r0 + per].to(torch.int64)
        n = k.shape[0]
        par = torch.nn.functional.pad((k & 1).to(torch.uint8), (0, 8 * m - cols)).reshape(n, m, 8)
        b = (par << shift).sum(-1, dtype=torch.int64)                            # (n, m): one byte per group
        maps = step[first + b[..., None]]                                         # (n, m, 8): state -> state after
        d = 1
        while d < m:                                                              # maps[j] := maps[j] o maps[j - d]
            maps[:, d:] = torch.gather(maps[:, d:], 2, maps[:, :-d])
            d *= 2
        enter = torch.cat([torch.zeros(n, 1, dtype=torch.int64, device=dev), maps[:, :-1, 0]], dim=1)
        del maps
        q = qbytes[256 * enter + b].reshape(n, 8 * m)[:, :cols]                   # each code's quantiser, 0 or 1
        out[r0:r0 + n] = 2 * k - q.to(torch.int64) * torch.sign(k)                # exact, rounded once to float32
    return out


@njit(cache=True, nogil=True)
def _search_rows(w, U, d, start, qs, nxt, codes, errs, ends):
    rows, B = w.shape
    S = qs.size
    for r in range(rows):
        J = np.full(S, _INF)
        J[start[r]] = 0.0
        res = np.empty((S, B))
        for s in range(S):
            res[s, :] = w[r, :]
        pk = np.zeros((S, B), np.int64)
        pe = np.zeros((S, B))
        nres = np.empty((S, B))
        npk = np.empty((S, B), np.int64)
        npe = np.empty((S, B))
        src = np.empty(S, np.int64)
        kk = np.empty(S, np.int64)
        ee = np.empty(S)
        Jn = np.empty(S)
        for i in range(B):
            uii = U[i, i]
            for s in range(S):
                Jn[s], src[s] = _INF, -1
            for s in range(S):
                if J[s] >= _INF:
                    continue
                v = res[s, i] / d[r, i]
                q = qs[s]
                for p in range(2):
                    k = _nearest(v, q, p)
                    e = (res[s, i] - _level(k, q) * d[r, i]) / uii
                    c = J[s] + e * e
                    ns = nxt[s, p]
                    if c < Jn[ns]:
                        Jn[ns], src[ns], kk[ns], ee[ns] = c, s, k, e
            for ns in range(S):
                s = src[ns]
                if s < 0:
                    continue
                nres[ns, :] = res[s, :]
                npk[ns, :i] = pk[s, :i]
                npe[ns, :i] = pe[s, :i]
                e = ee[ns]
                for j in range(i + 1, B):
                    nres[ns, j] -= e * U[i, j]
                npk[ns, i], npe[ns, i] = kk[ns], e
            res, nres = nres, res
            pk, npk = npk, pk
            pe, npe = npe, pe
            J, Jn = Jn, J
        best = 0
        for s in range(S):
            if J[s] < J[best]:
                best = s
        ends[r] = best
        codes[r, :] = pk[best, :]
        errs[r, :] = pe[best, :]


def search_block(w: np.ndarray, U: np.ndarray, step: np.ndarray, start: np.ndarray):
    """GPTQ's trellis search over one block of columns.

    w (rows, B) the block's weights (errors of earlier blocks already fed back), U (B, B) the block's part of
    the upper Cholesky factor of the inverse Hessian, step (rows,) each row's absolute step (or (rows, B), one
    per weight: grouped scales), start (rows,) each row's state entering the block. Returns (codes (rows, B)
    int64, errs (rows, B) = GPTQ's scaled errors (w'_i - q_i) / U_ii for the lazy update of later blocks, end
    states (rows,)): the path minimising sum_i (err_i)^2, each of the 8 surviving paths feeding its own errors
    forward inside the block."""
    w = np.ascontiguousarray(w, dtype=np.float64)
    rows, B = w.shape
    codes = np.empty((rows, B), dtype=np.int64)
    errs = np.empty((rows, B), dtype=np.float64)
    ends = np.empty(rows, dtype=np.int64)
    step = np.broadcast_to(np.asarray(step, dtype=np.float64).reshape(rows, -1), (rows, B))
    _search_rows(w, np.ascontiguousarray(U, dtype=np.float64), np.ascontiguousarray(step),
                 np.ascontiguousarray(start, dtype=np.int64), QUANTIZER, NEXT, codes, errs, ends)
    return codes, errs, ends

"""Fused decode x matmul: y = x @ W^T straight from a tiled rANS stream, for generation (x of 1..8 rows).

A weight W (out, in) is coded row-major as a `slc.tiles.TiledStream`, so a tile is a block of
output rows. Each thread takes a contiguous range of tiles and works on two of them side by side
(two independent decode chains): it decodes a block of whole rows (>= FUSED_BLOCK symbols) of each
into a small buffer (about 10 KiB each, in L1), the slot table giving float codes directly (the
symbol -> code mapping is folded into the table), and multiplies every finished row with x right away:

    y[i, r] = sum_g scale[r, g] * (sum_{t in g} x[i, t] * code[r, t]  -  zp[r, g] * sum_{t in g} x[i, t])

Nothing bigger than those buffers is materialised; the coded words are read once, in order.

Symbol kinds (what a symbol means; the mapping is folded into the decode table, built once):
    affine  code = symbol + qmin. int8 per channel (groups = 1, qmin = -127) or grouped int4
            (groups = in / group_size), symmetric (no zero point) or asymmetric (float zero point).
    ecsq    code = unzigzag(symbol) = (s >> 1) ^ -(s & 1), one scale per row (or group); the escape
            symbol E stands for a code kept apart (int32, row-major order): the table maps E to a
            sentinel, the kernel replaces sentinels by the next escaped codes of its tile (the
            stream's tile_escapes says where each tile's escapes start) and checks the count.
            trellis=True (slc.trellis): the same codes stand for levels picked by an 8-state machine along
            each row; the kernels turn every finished row of codes (escapes patched) into its levels with
            slc.trellis.levels_inplace before scaling it, the torch decoder with levels_torch. Rows are whole
            rows of W, so the scan never crosses a tile or a block. Codes must stay below MAX_TRELLIS_CODE.

Threads: numba `nogil` kernels on slc.tiles' persistent ThreadPoolExecutor (the caller's thread
takes the first share). numba's prange was the alternative: its OpenMP layer kills processes
that fork after using it, and the fork-safe workqueue layer costs 80-150 us a launch, more than
a whole 576 x 576 layer; bench/tiles.py measures both (bench/results/tiles.md). By default a weight is
split over slc.tiles.default_threads(): all CPUs when torch's OpenMP workers sleep between ops
(OMP_WAIT_POLICY=PASSIVE set before torch loads), fewer when they spin (libgomp's default), because a
spinning worker holds the core a decode thread needs; small weights (< SYMBOLS_PER_THREAD per thread)
stay on one thread. Generation from entropy-coded layers is fastest with OMP_WAIT_POLICY=PASSIVE
(bench/results/generation.md measures both policies).

>>> import numpy as np, torch
>>> from slc.tiles import encode_tiled
>>> codes = np.random.default_rng(0).integers(-127, 128, (64, 96))
>>> scale = np.full((64, 1), 0.01, dtype=np.float32)
>>> fw = FusedWeight(encode_tiled(codes + 127, tile_rows=16), "affine", scale, qmin=-127)
>>> x = torch.randn(2, 96)
>>> assert torch.allclose(fw.linear(x), x @ torch.from_numpy(fw.dequantize()).T, atol=1e-4)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from numba import njit

from slc.errors import FormatError
from slc.tiles import (TiledDecoder, TiledStream, decode_block, decode_tiles_kernel, decode_tiles_torch, decode_two,
                       default_threads, run_tiles, tile_ok)
from slc.trellis import levels_inplace, levels_torch, scan_scratch

KINDS = ("affine", "ecsq")
MAX_ROWS = 16                   # rows of x the fused kernel is for; more rows: decode once, dense GEMM (bench/tiles.py
                                # section 5, quiet: at 16 rows fused is 1.1-1.7 x faster on every SmolLM2 shape,
                                # from 24-32 rows the GEMM path wins or ties on q/o and gate/up)
SYMBOLS_PER_THREAD = 160_000    # a second thread pays for its ~50 us launch only above about this many weights
                                # (bench/tiles.py section 4: 192 x 576 runs faster on 1 thread than on 2)
FUSED_BLOCK = 2048              # symbols decoded per call: amortises the calls, two buffers stay in L1
BUFFER_BYTES_PER_WEIGHT = 32   # torch decoder: int32 symbols, int64 codes and temporaries, float32 rows (bound)
SENTINEL = np.float32(2.0 ** 100)  # table value of the escape symbol: no int32 code comes near it
_SENTINEL_MIN = np.float32(2.0 ** 90)  # compare against this (fastmath-safe, no inf/nan involved)
MAX_TRELLIS_CODE = 2 ** 24      # trellis codes sit in float32 buffers: exact (parity included) only below this


@njit(cache=True, nogil=True, fastmath=True)
def _dot_row(x, xsum, buf, o, r, scale, zp, has_zp, gs, y):
    """y[:, r] = the row in buf[o:o + cols] times every row of x, group by group.
    (1-D slices: numba vectorises these dot products, not the same loops over 2-D indices.)"""
    nx, cols = x.shape
    G = scale.shape[1]
    w = buf[o:o + cols]
    for i in range(nx):
        xi = x[i]
        acc = np.float32(0.0)
        for g in range(G):
            xg = xi[g * gs:(g + 1) * gs]
            wg = w[g * gs:(g + 1) * gs]
            a = np.float32(0.0)
            for t in range(gs):
                a += xg[t] * wg[t]
            if has_zp:
                a -= zp[r, g] * xsum[i, g]
            acc += a * scale[r, g]
        y[i, r] = acc


@njit(cache=True, nogil=True)
def _count_sentinels(buf, o, cols):
    """How many of buf[o:o + cols] are escape sentinels (a 1-D slice and a count: vectorised)."""
    w = buf[o:o + cols]
    k = 0
    for t in range(cols):
        k += w[t] >= _SENTINEL_MIN
    return k


@njit(cache=True, nogil=True)
def _patch_escapes(buf, o, cols, escapes, k, k_end):
    """Replace sentinels in buf[o:o + cols] by escapes[k], escapes[k + 1], ...; returns the new k,
    or -1 when the row has more escapes than its tile may use."""
    for t in range(o, o + cols):
        if buf[t] >= _SENTINEL_MIN:
            if k >= k_end:
                return -1
            buf[t] = np.float32(escapes[k])
            k += 1
    return k


@njit(cache=True, nogil=True)
def _consume_rows(buf, b0, fill, row, x, xsum, scale, zp, has_zp, gs, y, has_esc, escapes, k, k_end, trellis,
                  scratch):
    """Multiply every complete row in buf[b0:b0 + fill] with x (escapes patched first, then trellis codes turned
    into levels), move the rest to buf[b0:]. Returns (fill, row, k); k = -1 when the tile has more escapes than
    its index allows."""
    cols = x.shape[1]
    o = b0
    while b0 + fill - o >= cols:
        if has_esc and _count_sentinels(buf, o, cols):
            k = _patch_escapes(buf, o, cols, escapes, k, k_end)
            if k < 0:
                return fill, row, k
        if trellis:
            levels_inplace(buf[o:o + cols], scratch)
        _dot_row(x, xsum, buf, o, row, scale, zp, has_zp, gs, y)
        row += 1
        o += cols
    rest = b0 + fill - o
    for c in range(rest):
        buf[b0 + c] = buf[o + c]
    return rest, row, k


@njit(cache=True, nogil=True)
def fused_tiles_kernel(x, xsum, states, words, tile_words, tile_rows, tile_escapes, fb, values, scale_bits,
                       scale, zp, has_zp, escapes, has_esc, trellis, y, lo, hi):
    """y[:, rows of tiles lo..hi-1] = x @ W[those rows]^T, decoding W about a row at a time, two tiles
    side by side (as slc.tiles.decode_tiles_kernel: two independent chains keep the core busier).

    x (nx, cols) f32; xsum (nx, groups) per-group sums of x; values: f32 code per slot (escape: SENTINEL);
    trellis: codes are trellis codes, each row scanned by slc.trellis.levels_inplace.
    Returns -1, or the first tile that is corrupt (lanes, words or escape count)."""
    nx, cols = x.shape
    lanes = states.shape[1]
    gs = cols // scale.shape[1]
    if cols % lanes == 0:                                 # whole rows and whole steps: no leftovers to move
        blk = cols * ((FUSED_BLOCK + cols - 1) // cols)
    else:                                                 # whole steps covering at least a row
        blk = lanes * ((max(cols, FUSED_BLOCK) + lanes - 1) // lanes)
    half = blk + cols                                     # each tile's buffer: < one row + one block
    buf = np.empty(2 * half, dtype=np.float32)            # tile t at buf[0:], tile t + 1 at buf[half:]
    xa = np.empty(lanes, dtype=np.uint32)
    xb = np.empty(lanes, dtype=np.uint32)
    scratch = scan_scratch(cols if trellis else 0)
    t = lo
    while t < hi:
        pair = t + 1 < hi and lanes % 32 == 0
        nb = 2 if pair else 1
        for n in range(lanes):
            xa[n] = states[t, n]
            if pair:
                xb[n] = states[t + 1, n]
        pa, ea = tile_words[t], tile_words[t + 1]
        pb, eb = tile_words[t + 1], tile_words[t + nb]
        ra, rb = tile_rows[t], tile_rows[t + 1]
        na = (tile_rows[t + 1] - ra) * cols
        nbs = (tile_rows[t + nb] - rb) * cols if pair else 0
        ka = tile_escapes[t] if has_esc else 0
        kb = tile_escapes[t + 1] if has_esc else 0
        ka_end = tile_escapes[t + 1] if has_esc else 0
        kb_end = tile_escapes[t + nb] if has_esc else 0
        da = db = fa = fbl = 0                            # symbols decoded, symbols waiting in each buffer
        while da < na or db < nbs:
            ma = min(blk, na - da)                        # only a tile's last block ends inside a step
            mb = min(blk, nbs - db)
            both = 0
            if ma == blk and mb == blk:
                pa, pb, both = decode_two(xa, xb, fb, values, words, pa, ea, pb, eb, scale_bits, buf, fa,
                                          half + fbl, blk)
            if ma:
                pa = decode_block(xa, fb, values, words, pa, ea, scale_bits, buf, fa + both, ma - both)
                da += ma
                fa, ra, ka = _consume_rows(buf, 0, fa + ma, ra, x, xsum, scale, zp, has_zp, gs, y, has_esc,
                                           escapes, ka, ka_end, trellis, scratch)
                if ka < 0:
                    return t
            if mb:
                pb = decode_block(xb, fb, values, words, pb, eb, scale_bits, buf, half + fbl + both, mb - both)
                db += mb
                fbl, rb, kb = _consume_rows(buf, half, fbl + mb, rb, x, xsum, scale, zp, has_zp, gs, y, has_esc,
                                            escapes, kb, kb_end, trellis, scratch)
                if kb < 0:
                    return t + 1
        if not tile_ok(xa, pa, ea) or ka != ka_end:
            return t
        if pair and (not tile_ok(xb, pb, eb) or kb != kb_end):
            return t + 1
        t += nb
    return -1


@njit(cache=True, nogil=True)
def _patch_tile(out, a, b, escapes, k, k_end) -> bool:
    """Escape sentinels in out[a:b] replaced by escapes[k:k_end] in order; False unless exactly that many."""
    for i in range(a, b):
        if out[i] >= _SENTINEL_MIN:
            if k >= k_end:
                return False
            out[i] = np.float32(escapes[k])
            k += 1
    return k == k_end


@njit(cache=True, nogil=True, fastmath=True)
def _scale_rows(out, r0, r1, cols, scale, zp, has_zp):
    """out rows r0..r1-1 (flat, `cols` wide) := (code - zp) * scale, group by group, in place."""
    G = scale.shape[1]
    gs = cols // G
    for r in range(r0, r1):
        for g in range(G):
            o = r * cols + g * gs
            w = out[o:o + gs]
            s = scale[r, g]
            if has_zp:
                z = zp[r, g]
                for t in range(gs):
                    w[t] = (w[t] - z) * s
            else:
                for t in range(gs):
                    w[t] = w[t] * s


@njit(cache=True, nogil=True)
def dense_tiles_kernel(states, words, tile_words, tile_rows, tile_syms, fb, values, scale_bits, scale, zp, has_zp,
                       escapes, has_esc, tile_escapes, trellis, out, lo, hi):
    """out (flat f32) rows of tiles lo..hi-1 := the de-quantised weight: two tiles decoded side by side
    straight to float codes (slc.tiles.decode_tiles_kernel with the float table), escapes patched, trellis codes
    turned into levels row by row, then scaled while the rows are still in cache. Returns -1, or the first
    corrupt tile."""
    cols = out.size // max(tile_rows[-1], 1)
    scratch = scan_scratch(cols if trellis else 0)
    t = lo
    while t < hi:
        nb = 2 if t + 1 < hi else 1
        bad = decode_tiles_kernel(states, words, tile_words, tile_syms, fb, values, scale_bits, -1, tile_escapes,
                                  out, t, t + nb)
        if bad >= 0:
            return bad
        for u in range(t, t + nb):
            if has_esc and not _patch_tile(out, tile_syms[u], tile_syms[u + 1], escapes, tile_escapes[u],
                                           tile_escapes[u + 1]):
                return u
            if trellis:
                for r in range(tile_rows[u], tile_rows[u + 1]):
                    levels_inplace(out[r * cols:(r + 1) * cols], scratch)
            _scale_rows(out, tile_rows[u], tile_rows[u + 1], cols, scale, zp, has_zp)
        t += nb
    return -1


def _trellis(meta: dict) -> bool:
    """A fused weight header's "trellis" flag (absent: False, as in every header from before trellis codes)."""
    t = meta.get("trellis", False)
    if not isinstance(t, bool) or (t and meta.get("kind") != "ecsq"):
        raise FormatError(f"fused weight: trellis {t!r} must be true or false, and true only for kind 'ecsq'")
    return t


def _as_f32_2d(a, rows: int, what: str) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.size % max(rows, 1) or (rows and a.size == 0):
        raise ValueError(f"{what} must hold a whole number of values per row ({rows} rows), got shape {a.shape}")
    return a.reshape(rows, -1) if rows else a.reshape(0, 1)


@dataclass
class FusedWeight:
    """A weight (rows = out, cols = in) kept coded; `linear(x)` decodes and multiplies tile by tile.

    stream: the symbols, tiled by rows; kind: "affine" (code = symbol + qmin) or "ecsq" (code =
    unzigzag(symbol), escapes apart); scale (rows, groups) float32; zero_point (rows, groups) float32
    or None; escapes: int32 codes of the escape symbols in row-major order (ecsq only); trellis: the ecsq
    codes are trellis codes (slc.trellis: W = levels(codes) x scale, each row scanned from state 0).

    >>> import numpy as np, torch
    >>> from slc.tiles import encode_tiled
    >>> z = np.array([[0, 1, 2, 5], [4, 3, 0, 5]])            # zig-zag symbols; 5 = escape
    >>> fw = FusedWeight(encode_tiled(z, escape=5, tile_rows=1), "ecsq", np.ones((2, 1)),
    ...                  escapes=np.array([1000, -7], dtype=np.int32))
    >>> fw.dequantize().tolist()
    [[0.0, -1.0, 1.0, 1000.0], [2.0, -2.0, 0.0, -7.0]]
    >>> assert torch.equal(fw.linear(torch.ones(1, 4)), torch.tensor([[1000.0, -7.0]]))
    """
    stream: TiledStream
    kind: str
    scale: np.ndarray
    zero_point: np.ndarray | None = None
    qmin: int = 0
    escapes: np.ndarray | None = None
    trellis: bool = False
    decoder: TiledDecoder = field(init=False, repr=False)     # float codes per slot: linear()
    symbols: TiledDecoder = field(init=False, repr=False)     # symbols per slot: codes(), dequantize()

    def __post_init__(self):
        s = self.stream.validate()
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.trellis, bool) or (self.trellis and self.kind != "ecsq"):
            raise ValueError(f"trellis={self.trellis!r}: True or False, and True only for the 'ecsq' kind")
        self.scale = _as_f32_2d(self.scale, s.rows, "scale")
        groups = self.scale.shape[1]
        if s.cols % groups:
            raise ValueError(f"{groups} scale groups per row do not divide {s.cols} columns")
        if self.zero_point is not None:
            self.zero_point = _as_f32_2d(self.zero_point, s.rows, "zero_point")
            if self.zero_point.shape != self.scale.shape:
                raise ValueError(f"zero_point {self.zero_point.shape} must match scale {self.scale.shape}")
        sym = np.arange(len(s.freqs), dtype=np.int64)
        if self.kind == "affine":
            values = (sym + int(self.qmin)).astype(np.float32)
            if s.escape is not None or self.escapes is not None:
                raise ValueError("escapes belong to the 'ecsq' kind")
        else:
            values = ((sym >> 1) ^ -(sym & 1)).astype(np.float32)   # unzigzag
            if s.escape is not None:
                if s.escape < len(values):
                    values[s.escape] = SENTINEL
                esc = np.zeros(0, np.int32) if self.escapes is None else self.escapes
                esc = esc.detach().cpu().numpy() if isinstance(esc, torch.Tensor) else np.asarray(esc)
                self.escapes = np.ascontiguousarray(esc, dtype=np.int32).reshape(-1)
                if self.escapes.size != int(s.tile_escapes[-1]):
                    raise FormatError(f"{self.escapes.size} escaped codes, the tile index counts "
                                      f"{int(s.tile_escapes[-1])}")
                if self.trellis and np.abs(self.escapes.astype(np.int64)).max(initial=0) >= MAX_TRELLIS_CODE:
                    raise FormatError(f"a trellis code of {MAX_TRELLIS_CODE} (2**24) or more cannot be decoded "
                                      "exactly in float32 buffers")
            elif self.escapes is not None and len(self.escapes):
                raise ValueError("escaped codes given but the stream has no escape symbol")
        self.decoder = TiledDecoder(s, values)                         # once, at load
        self.symbols = TiledDecoder(s)

    @property
    def shape(self) -> tuple[int, int]:
        return self.stream.shape

    @property
    def group_size(self) -> int:
        return self.stream.cols // self.scale.shape[1]

    # --- buffers / meta: what a module keeps --------------------------------------------------
    def buffers(self) -> dict[str, torch.Tensor]:
        out = self.stream.buffers()
        out["scale"] = torch.from_numpy(self.scale.copy())
        if self.zero_point is not None:
            out["zero_point"] = torch.from_numpy(self.zero_point.copy())
        if self.escapes is not None:
            out["escapes"] = torch.from_numpy(self.escapes.copy())
        return out

    @property
    def meta(self) -> dict:
        """The stream's header with kind and qmin ("trellis": true only when set: other headers are as before)."""
        trellis = {"trellis": True} if self.trellis else {}
        return {**self.stream.meta, "kind": self.kind, "qmin": int(self.qmin), **trellis}

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor], meta: dict) -> "FusedWeight":
        """Inverse of (buffers(), meta); raises FormatError on malformed input."""
        stream = TiledStream.from_buffers(buffers, meta)
        if meta.get("kind") not in KINDS or "scale" not in buffers:
            raise FormatError(f"fused weight: kind {meta.get('kind')!r} or its scale is missing")
        try:
            return cls(stream, meta["kind"], buffers["scale"], buffers.get("zero_point"), int(meta.get("qmin", 0)),
                       buffers.get("escapes"), _trellis(meta))
        except (ValueError, TypeError) as e:
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"fused weight buffers do not fit the stream: {e}") from e

    # --- compute ------------------------------------------------------------------------------
    def codes(self, threads: int | None = None) -> np.ndarray:
        """The integer codes (rows, cols) int64 (decoded with the fast decoder; trellis: the codes, not levels)."""
        s = self.stream
        sym = self.symbols.decode(threads).astype(np.int64)
        if self.kind == "affine":
            return sym + int(self.qmin)
        codes = (sym >> 1) ^ -(sym & 1)
        if s.escape is not None:
            codes[sym == s.escape] = self.escapes                   # counts checked by decode_tiled
        return codes

    def dequantize(self, threads: int | None = None) -> np.ndarray:
        """W (rows, cols) float32, the whole matrix (the prefill path and the reference for linear()):
        decoded straight to float codes and scaled tile by tile on `threads` threads, one pass."""
        s, d = self.stream, self.decoder
        out = np.empty(s.n_symbols, dtype=np.float32)
        if s.n_tiles and s.cols:
            zp = self.zero_point if self.zero_point is not None else self.scale
            esc = self.escapes if self.escapes is not None and self.escapes.size else np.zeros(1, np.int32)
            args = (d.states, d.words, d.tile_words, d.tile_rows, d.tile_syms, d.tables.fb, d.tables.values,
                    s.scale_bits, self.scale, zp, self.zero_point is not None, esc, s.escape is not None,
                    d.tile_escapes, self.trellis, out)
            self._raise_bad(run_tiles(dense_tiles_kernel, args, d.split(self.threads(threads))))
        return out.reshape(self.shape)

    def threads(self, threads: int | None = None) -> int:
        """Threads worth using for one pass over this weight: `threads` (default all CPUs), fewer for small
        weights (SYMBOLS_PER_THREAD each), never more than its tiles."""
        want = default_threads() if threads is None else max(1, int(threads))
        return max(1, min(want, self.stream.n_symbols // SYMBOLS_PER_THREAD, self.stream.n_tiles))

    @staticmethod
    def _raise_bad(errs: list) -> None:
        bad = [e for e in errs if e >= 0]
        if bad:
            raise FormatError(f"tile {bad[0]}: corrupt (its lanes do not end at L having used exactly their "
                              "words, or its escape count is wrong)")

    def linear(self, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """x @ W^T for float32 x (..., cols) on the CPU. Up to MAX_ROWS rows: fused, tile by tile on
        `threads` threads (default all CPUs); more rows: decode W once and use torch's GEMM."""
        rows, cols = self.shape
        if x.shape[-1] != cols:
            raise ValueError(f"x has {x.shape[-1]} features, the weight expects {cols}")
        x2 = x.detach().reshape(-1, cols).to(torch.float32).contiguous()
        if x2.shape[0] > MAX_ROWS or x.device.type != "cpu":
            w = torch.from_numpy(self.dequantize(threads)).to(x.device)
            return (x2.to(x.device) @ w.T).reshape(*x.shape[:-1], rows).to(x.dtype)
        y = torch.empty(x2.shape[0], rows, dtype=torch.float32)
        self.linear_into(x2.numpy(), y.numpy(), threads)
        return y.reshape(*x.shape[:-1], rows).to(x.dtype)

    def linear_into(self, x: np.ndarray, y: np.ndarray, threads: int | None = None) -> None:
        """y (nx, rows) = x (nx, cols) @ W^T, float32 numpy arrays, nx <= MAX_ROWS (no checks on the hot path
        beyond the stream's own)."""
        s, d = self.stream, self.decoder
        if s.n_tiles == 0 or x.shape[0] == 0 or s.cols == 0:
            y[:] = 0
            return
        G = self.scale.shape[1]
        xsum = x.reshape(x.shape[0], G, -1).sum(axis=2, dtype=np.float32) if self.zero_point is not None \
            else np.zeros((x.shape[0], G), dtype=np.float32)
        zp = self.zero_point if self.zero_point is not None else self.scale
        esc = self.escapes if self.escapes is not None and self.escapes.size else np.zeros(1, np.int32)
        args = (x, xsum, d.states, d.words, d.tile_words, d.tile_rows, d.tile_escapes, d.tables.fb, d.tables.values,
                s.scale_bits, self.scale, zp, self.zero_point is not None, esc, s.escape is not None, self.trellis, y)
        self._raise_bad(run_tiles(fused_tiles_kernel, args, d.split(self.threads(threads))))


class TorchFusedWeight:
    """FusedWeight's counterpart for a GPU (and the CPU torch backend, where the same code is tested): the
    coded buffers stay on their device, and linear(x) decodes a group of tiles at a time
    (slc.tiles.decode_tiles_torch: one tile per row of the batch, as a thread block per tile would),
    de-quantises those rows, multiplies them with x and drops them. Nothing but the coded bytes and one
    group's buffers (at most `buffer_bytes`) is ever resident, whatever the batch.

    Built from the buffers and meta a CompressedLinear holds (FusedWeight.buffers() / .meta); the index is
    validated once here (FormatError), the per-tile lane and escape checks run on every decode.
    """

    def __init__(self, buffers: dict[str, torch.Tensor], meta: dict, buffer_bytes: int = 64 << 20):
        stream = TiledStream.from_buffers({k: v for k, v in buffers.items() if k not in ("scale", "zero_point",
                                                                                         "escapes")}, meta)
        if meta.get("kind") not in KINDS or "scale" not in buffers:
            raise FormatError(f"fused weight: kind {meta.get('kind')!r} or its scale is missing")
        self.kind, self.qmin, self.escape = meta["kind"], int(meta.get("qmin", 0)), stream.escape
        self.trellis = _trellis(meta)
        self.rows, self.cols, self.lanes, self.scale_bits = stream.rows, stream.cols, stream.lanes, stream.scale_bits
        dev = buffers["words"].device
        self.words = buffers["words"].reshape(-1)
        self.states = buffers["states"].reshape(-1, stream.lanes)
        self.freqs = buffers["freqs"].to(dev, torch.int64)
        self.slot_table = torch.repeat_interleave(torch.arange(self.freqs.numel(), device=dev), self.freqs)
        self.tile_rows = [int(r) for r in stream.tile_rows]                 # host: group bounds, row offsets
        self.tile_words = torch.as_tensor(stream.tile_words, dtype=torch.int64, device=dev)
        self.tile_rows_dev = torch.as_tensor(stream.tile_rows, dtype=torch.int64, device=dev)
        self.tile_escapes = None if stream.escape is None else [int(e) for e in stream.tile_escapes]
        esc = buffers.get("escapes")
        self.escapes = None if esc is None else esc.reshape(-1).to(dev, torch.int64)
        if self.escape is not None and (self.escapes is None or self.escapes.numel() != self.tile_escapes[-1]):
            raise FormatError(f"{0 if self.escapes is None else self.escapes.numel()} escaped codes, the tile index "
                              f"counts {self.tile_escapes[-1]}")
        G = buffers["scale"].numel() // max(self.rows, 1)
        if G < 1 or buffers["scale"].numel() != G * self.rows or self.cols % G:
            raise FormatError(f"scale of {buffers['scale'].numel()} values does not fit {self.rows} x {self.cols}")
        self.scale = buffers["scale"].reshape(self.rows, G).to(dev, torch.float32)
        zp = buffers.get("zero_point")
        self.zero_point = None if zp is None else zp.reshape(self.rows, G).to(dev, torch.float32)
        self.groups = self._groups(buffer_bytes)

    def _groups(self, buffer_bytes: int) -> list[tuple[int, int]]:
        """Tile ranges whose decode buffers (int32 symbols, int64 codes and temporaries, float32 rows: at most
        BUFFER_BYTES_PER_WEIGHT bytes a weight) fit buffer_bytes; at least one tile each."""
        out, lo, per_row = [], 0, self.cols * BUFFER_BYTES_PER_WEIGHT
        for t in range(len(self.tile_rows) - 1):
            if t > lo and (self.tile_rows[t + 1] - self.tile_rows[lo]) * per_row > buffer_bytes:
                out.append((lo, t))
                lo = t
        if len(self.tile_rows) > 1:
            out.append((lo, len(self.tile_rows) - 1))
        return out

    def codes(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Integer codes (rows of tiles lo..hi-1, cols) int64 on the device."""
        hi = len(self.tile_rows) - 1 if hi is None else hi
        sym = decode_tiles_torch(self.words, self.states, self.tile_words, self.tile_rows_dev, self.cols, self.freqs,
                                 self.scale_bits, lo, hi, self.slot_table).to(torch.int64)
        if self.kind == "affine":
            return sym + self.qmin
        codes = (sym >> 1) ^ -(sym & 1)                                      # unzigzag
        if self.escape is not None:
            hit = sym == self.escape
            rel = torch.as_tensor(self.tile_rows[lo:hi + 1], device=sym.device) - self.tile_rows[lo]
            per_row = torch.cat([hit.new_zeros(1, dtype=torch.int64), hit.sum(1).cumsum(0)])
            got = per_row[rel].diff().cpu().tolist()
            want = [self.tile_escapes[t + 1] - self.tile_escapes[t] for t in range(lo, hi)]
            if got != want:
                t = next(i for i in range(len(got)) if got[i] != want[i])
                raise FormatError(f"tile {lo + t}: {got[t]} escape symbols, the index says {want[t]}")
            codes = codes.masked_scatter(hit, self.escapes[self.tile_escapes[lo]:self.tile_escapes[hi]])
        return codes

    def dequantize(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """W's rows of tiles lo..hi-1, float32 on the device (trellis codes: their levels, row by row)."""
        hi = len(self.tile_rows) - 1 if hi is None else hi
        r0, r1 = self.tile_rows[lo], self.tile_rows[hi]
        G = self.scale.shape[1]
        c = self.codes(lo, hi)
        c = (levels_torch(c) if self.trellis else c.to(torch.float32)).reshape(r1 - r0, G, -1)
        if self.zero_point is not None:
            c = c - self.zero_point[r0:r1, :, None]
        return (c * self.scale[r0:r1, :, None]).reshape(r1 - r0, self.cols)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T, group of tiles by group of tiles (x on the buffers' device, any number of rows)."""
        if x.shape[-1] != self.cols:
            raise ValueError(f"x has {x.shape[-1]} features, the weight expects {self.cols}")
        x2 = x.reshape(-1, self.cols).to(torch.float32)
        y = torch.empty(x2.shape[0], self.rows, dtype=torch.float32, device=x.device)
        for lo, hi in self.groups:
            y[:, self.tile_rows[lo]:self.tile_rows[hi]] = x2 @ self.dequantize(lo, hi).T
        return y.reshape(*x.shape[:-1], self.rows).to(x.dtype)


def fused_linear(x: torch.Tensor, weight: FusedWeight, bias: torch.Tensor | None = None,
                 threads: int | None = None) -> torch.Tensor:
    """F.linear for a FusedWeight: x @ W^T (+ bias)."""
    y = weight.linear(x, threads=threads)
    return y if bias is None else y + bias.to(y.dtype)

"""Tiled rANS streams: a 2-D array of 16-bit symbols coded as independent tiles of rows.

Read me first
-------------
`slc.rans` codes a whole tensor as one stream: its lanes share one word stream, so one thread
has to decode it front to back. A tiled stream cuts the (rows, cols) array into tiles of
consecutive rows and codes each tile as its own interleaved rANS stream: its own lanes, final
states and words. Everything else is shared: one frequency table per tensor and one word array
with a tile index (word offsets) into it. So tiles decode independently, in any order, on any
core (or GPU block), and a matmul can consume a tile of output rows as soon as it is decoded
(slc/fused.py).

Each tile, taken alone, is exactly a `rans.RansStream` with the shared table: symbol i of the
tile (row-major over its rows) goes to lane i % N at step i // N, words in decode order, the
same three surprises. The encoder is `rans.encode_kernel`, unchanged.

Byte layout (`TiledStream.to_bytes`, all little-endian)
-------------------------------------------------------
    offset  size          field
    0       4             magic b"SLCX"
    4       1             format version (1)
    5       1             flags: bit 0 = table sparse (as in rans), bit 1 = escape index present
    6       1             scale_bits, 0..16 (a one-symbol table uses scale_bits 0..15)
    7       1             log2(lanes per tile), 0..12
    8       4             rows
    12      4             cols
    16      4             n_tiles
    20      4             n_words
    24      4             table_nbytes
    28      4             escape symbol (0xFFFFFFFF when none)
    32      4*(T+1)       tile_rows: tile t holds rows tile_rows[t] .. tile_rows[t+1]-1
    ...     4*(T+1)       tile_words: its words are words[tile_words[t] : tile_words[t+1]]
    ...     4*(T+1)       tile_escapes (flag bit 1 only): escape symbols before tile t
    ...     4*T*N         final states, tile by tile, lane order
    ...     2*W           words
    ...     table_nbytes  the shared frequency table (`rans.pack_table`)
    end-4   4             CRC32 of everything before it

The index costs 8 bytes a tile, the states 4 per lane of which about 2 are pure overhead (each
lane ends at L = 2**16). With 32 lanes a tile and tiles of ~88 KB that is about 0.1 % of
an int8 weight's stream; `choose_tiles` sizes them by coded bytes (bench/tiles.py measures the whole model).

Why 32 lanes a tile: the fast decoder runs 16 lanes at once as one AVX-512 vector (a gather for
the slot table, an expand-load for the renormalisation words, see `decode_step16`); one vector
is latency-bound (each step needs the previous state), two or more independent vectors per step
keep the core busy. 16 lanes a tile were no faster than the single-stream decoder, 32 about twice
as fast, 64 a few per cent more for twice the states (bench/results/tiles.md has the figures).
A slot -> symbol byte table with small per-symbol tables (all in L1) was slower: three dependent
gathers instead of two.

Checks: parsing (`from_bytes`, `from_buffers`, `validate`) checks the index: tiles cover the rows
in order without gaps or overlap, word ranges lie inside the words and fit the tile's symbols,
escape counts are monotone. Decoding checks every tile's lanes end at L having used exactly
their words; the compiled kernels never read outside a tile's words (reads are clamped and the
tile then fails that check). Any failure is a FormatError naming the tile.

>>> import numpy as np
>>> sym = np.random.default_rng(0).integers(0, 40, (300, 64)).astype(np.uint16)
>>> ts = encode_tiled(sym, tile_rows=100)
>>> assert ts.n_tiles == 3 and np.array_equal(decode_tiled(ts), sym)
>>> assert np.array_equal(decode_tiled(TiledStream.from_bytes(ts.to_bytes()), backend="numpy"), sym)
"""
from __future__ import annotations

import math
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import llvmlite.ir as llir
import numpy as np
import torch
from numba import njit, types
from numba.extending import intrinsic

from slc import rans
from slc.errors import FormatError

L = rans.L
MAGIC = b"SLCX"
VERSION = 1
FLAG_SPARSE = rans.FLAG_SPARSE
FLAG_ESCAPES = 2
NO_ESCAPE = 0xFFFFFFFF
_HEADER = struct.Struct("<4sBBBBIIIIII")  # magic, version, flags, scale_bits, log2 lanes, rows, cols,
#                                            n_tiles, n_words, table_nbytes, escape
_CRC_BYTES = 4
TILE_LANES = 32            # lanes per tile: two AVX-512 vectors of 16 (see the read-me)
TILE_BYTES = 88 * 1024     # target coded bytes per tile: ~90 bytes of states + index per tile stay ~0.1 %
MAX_TILES = 1 << 24        # sanity bound for parsers
VECTOR = 16                # lanes per SIMD decode step (16 x uint32 = one 512-bit vector)
NUMPY_GROUP_LANES = 6144   # NumPy reference: lanes stepped together (measured best on SmolLM2: 4-8 K)


# ----------------------------------------------------------------------------
# tile sizes

def choose_tiles(rows: int, cols: int, bits_per_symbol: float = 8.0, tile_bytes: int = TILE_BYTES,
                 multiple: int = 4) -> np.ndarray:
    """Row offsets (n_tiles + 1,) int64 splitting `rows` into tiles of about `tile_bytes` coded bytes
    (at `bits_per_symbol`), so that a tile's states and index cost the same fraction at any rate.

    A tensor of half a tile to 1.5 tiles gets two tiles; above that the count is rounded up to a
    multiple of `multiple` (when there are enough rows) so that 2 or 4 threads get equal shares; rows
    are spread evenly (tiles differ by at most one row).
    """
    rows, cols = int(rows), int(cols)
    if rows < 0 or cols < 0:
        raise ValueError(f"rows and cols must be >= 0, got {rows} x {cols}")
    if rows == 0:
        return np.zeros(1, dtype=np.int64)
    coded = rows * cols * max(float(bits_per_symbol), 0.5) / 8
    n = max(1, round(coded / max(int(tile_bytes), 1)))
    if n == 1 and coded >= tile_bytes / 2:          # e.g. SmolLM2's k/v (192 x 576): two tiles, two threads
        n = 2
    elif n > 1 and multiple > 1:
        n = -(-n // multiple) * multiple
    n = min(n, rows)
    return np.round(np.linspace(0, rows, n + 1)).astype(np.int64)


def default_lanes(rows: int, cols: int) -> int:
    """TILE_LANES, or fewer for tiny tensors (one lane per 1024 symbols, a power of two)."""
    n = max(int(rows) * int(cols), 1)
    return 1 << min(TILE_LANES.bit_length() - 1, max(0, (n // 1024).bit_length() - 1))


# ----------------------------------------------------------------------------
# the stream

@dataclass
class TiledStream:
    """A (rows, cols) array of 16-bit symbols as independent rANS tiles of rows with one shared table.

    >>> ts = encode_tiled(np.arange(12, dtype=np.uint16).reshape(4, 3), tile_rows=[0, 1, 4])
    >>> assert decode_tiled(ts).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    """
    rows: int
    cols: int
    lanes: int                  # N interleaved states per tile, a power of two
    scale_bits: int             # frequencies sum to M = 2**scale_bits
    freqs: np.ndarray           # (alphabet_size,) uint32, shared by all tiles
    tile_rows: np.ndarray       # (n_tiles + 1,) int64 row offsets: 0, ..., rows
    tile_words: np.ndarray      # (n_tiles + 1,) int64 word offsets: 0, ..., n_words
    states: np.ndarray          # (n_tiles, lanes) uint32: each tile's decoder start
    words: np.ndarray           # (n_words,) uint16, tile after tile, each in decode order
    escape: int | None = None   # ECSQ: the escape symbol (its codes are kept by the caller, in order)
    tile_escapes: np.ndarray | None = None  # (n_tiles + 1,) int64: escape symbols before each tile

    @property
    def n_tiles(self) -> int:
        return len(self.tile_rows) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def n_symbols(self) -> int:
        return self.rows * self.cols

    def tile_symbols(self) -> np.ndarray:
        """(n_tiles,) symbols in each tile (without the padding to a multiple of lanes)."""
        return np.diff(self.tile_rows) * self.cols

    @property
    def nbytes(self) -> int:
        """Size of to_bytes(), without building it."""
        idx = 3 if self.escape is not None else 2
        return (_HEADER.size + 4 * idx * (self.n_tiles + 1) + 4 * self.states.size + 2 * len(self.words)
                + rans.table_nbytes(self.freqs) + _CRC_BYTES)

    # --- bytes ----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        self.validate()
        flags, table = rans.pack_table(self.freqs)
        esc = self.escape is not None
        head = _HEADER.pack(MAGIC, VERSION, flags | (FLAG_ESCAPES if esc else 0), self.scale_bits,
                            self.lanes.bit_length() - 1, self.rows, self.cols, self.n_tiles, len(self.words),
                            len(table), NO_ESCAPE if not esc else self.escape)
        index = [self.tile_rows, self.tile_words] + ([self.tile_escapes] if esc else [])
        parts = [head] + [np.asarray(a).astype("<u4").tobytes() for a in index]
        parts += [self.states.astype("<u4", copy=False).tobytes(), self.words.astype("<u2", copy=False).tobytes(),
                  table]
        return rans.framed(parts)

    @classmethod
    def from_bytes(cls, data) -> "TiledStream":
        """Parse and validate (index, table, CRC); raises FormatError naming the bad field or tile."""
        buf = memoryview(data).cast("B")
        if len(buf) < _HEADER.size + _CRC_BYTES:
            raise FormatError(f"tiled stream is truncated: {len(buf)} bytes, a header alone needs "
                              f"{_HEADER.size + _CRC_BYTES}")
        (magic, version, flags, scale_bits, lanes_log2, rows, cols, n_tiles, n_words, n_table,
         escape) = _HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise FormatError(f"bad magic {bytes(magic)!r}: not an slc tiled stream (expected {MAGIC!r})")
        if version != VERSION:
            raise FormatError(f"unsupported tiled format version {version} (this slc reads version {VERSION})")
        if flags & ~(FLAG_SPARSE | FLAG_ESCAPES):
            raise FormatError(f"unknown flags 0x{flags:02x}")
        if lanes_log2 > rans.MAX_LANES_LOG2 or scale_bits > rans.MAX_SCALE_BITS:
            raise FormatError(f"lanes 2**{lanes_log2} or scale_bits {scale_bits} out of range")
        if n_tiles > MAX_TILES or n_table > rans.MAX_TABLE_BYTES:
            raise FormatError(f"n_tiles {n_tiles} or table_nbytes {n_table} out of range")
        esc = bool(flags & FLAG_ESCAPES)
        n_idx = 3 if esc else 2
        lanes = 1 << lanes_log2
        expected = _HEADER.size + 4 * n_idx * (n_tiles + 1) + 4 * n_tiles * lanes + 2 * n_words + n_table + _CRC_BYTES
        if len(buf) != expected:
            raise FormatError(f"tiled stream length {len(buf)} does not match its header (n_tiles={n_tiles}, "
                              f"lanes={lanes}, n_words={n_words}, table_nbytes={n_table} -> {expected} bytes)"
                              + ("; truncated?" if len(buf) < expected else ""))
        body = buf[:-_CRC_BYTES]
        (crc,) = struct.unpack_from("<I", buf, len(body))
        if zlib.crc32(body) != crc:
            raise FormatError("CRC32 mismatch: the tiled stream is corrupt")
        pos = _HEADER.size
        index = []
        for _ in range(n_idx):
            index.append(np.frombuffer(buf, dtype="<u4", count=n_tiles + 1, offset=pos).astype(np.int64))
            pos += 4 * (n_tiles + 1)
        states = np.frombuffer(buf, dtype="<u4", count=n_tiles * lanes, offset=pos).reshape(n_tiles, lanes)
        pos += 4 * n_tiles * lanes
        words = np.frombuffer(buf, dtype="<u2", count=n_words, offset=pos)
        freqs = rans.unpack_table(bytes(body[len(body) - n_table:]), bool(flags & FLAG_SPARSE), scale_bits)
        if esc == (escape == NO_ESCAPE):
            raise FormatError("escape flag and escape symbol disagree")
        return cls(rows, cols, lanes, scale_bits, freqs, index[0], index[1], states.astype(np.uint32, copy=False),
                   words.astype(np.uint16, copy=False), escape if esc else None,
                   index[2] if esc else None).validate()

    # --- buffers: what a torch module keeps --------------------------------------------------
    def buffers(self) -> dict[str, torch.Tensor]:
        """Flat tensors (int views of the unsigned arrays, copies: safe to register as buffers)."""
        out = {
            "words": torch.from_numpy(np.array(self.words, dtype=np.uint16).view(np.int16)),
            "states": torch.from_numpy(np.array(self.states, dtype=np.uint32).view(np.int32)),
            "freqs": torch.from_numpy(np.asarray(self.freqs).astype(np.int32)),
            "tile_rows": torch.from_numpy(np.asarray(self.tile_rows, dtype=np.int64).copy()),
            "tile_words": torch.from_numpy(np.asarray(self.tile_words, dtype=np.int64).copy()),
        }
        if self.escape is not None:
            out["tile_escapes"] = torch.from_numpy(np.asarray(self.tile_escapes, dtype=np.int64).copy())
        return out

    @property
    def meta(self) -> dict:
        """JSON-able header: with buffers() it is the whole stream."""
        return {"layout": "tiled", "version": VERSION, "shape": [self.rows, self.cols], "lanes": self.lanes,
                "scale_bits": self.scale_bits, "escape": self.escape}

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor], meta: dict) -> "TiledStream":
        """Inverse of (buffers(), meta); validates the index (raises FormatError)."""
        try:
            if meta.get("layout") != "tiled" or meta.get("version") != VERSION:
                raise FormatError(f"not a tiled stream of version {VERSION}: layout {meta.get('layout')!r}, "
                                  f"version {meta.get('version')!r}")
            rows, cols = (int(v) for v in meta["shape"])
            esc = meta.get("escape")
            b = {k: v.detach().cpu().numpy() for k, v in buffers.items()}
            lanes = int(meta["lanes"])
            if lanes < 1 or lanes & (lanes - 1) or lanes > 1 << rans.MAX_LANES_LOG2:
                raise FormatError(f"lanes {lanes} is not a power of two in 1..4096")
            states = b["states"].view(np.uint32)
            ts = cls(rows, cols, lanes, int(meta["scale_bits"]), b["freqs"].astype(np.uint32),
                     b["tile_rows"].astype(np.int64), b["tile_words"].astype(np.int64),
                     states.reshape(-1, lanes), b["words"].view(np.uint16).reshape(-1),
                     None if esc is None else int(esc),
                     None if esc is None else b["tile_escapes"].astype(np.int64))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"tiled stream buffers/meta are malformed: {e!r}") from e
        return ts.validate()

    # --- checks ------------------------------------------------------------------------------
    def validate(self) -> "TiledStream":
        """Check the header, table and tile index fit together. Raises FormatError naming the tile."""
        N = self.lanes
        if not (isinstance(N, (int, np.integer)) and 1 <= N <= 1 << rans.MAX_LANES_LOG2 and N & (N - 1) == 0):
            raise FormatError(f"lanes must be a power of two in 1..4096, got {N}")
        if not (0 <= self.rows < 1 << 32 and 0 <= self.cols < 1 << 32 and self.rows * self.cols <= rans.MAX_SYMBOLS):
            raise FormatError(f"shape {self.rows} x {self.cols} is out of range (at most 2**31 symbols)")
        if not 0 <= self.scale_bits <= rans.MAX_SCALE_BITS:
            raise FormatError(f"scale_bits {self.scale_bits} is outside 0..16")
        f = np.asarray(self.freqs)
        M = 1 << self.scale_bits
        if f.ndim != 1 or not 1 <= f.size <= rans.ALPHABET_LIMIT or f.dtype.kind not in "iu":
            raise FormatError(f"freqs must be a 1-D integer array of 1..65536 entries, got {f.dtype} {f.shape}")
        if int(f.astype(np.int64).sum()) != M or f.min() < 0:
            raise FormatError(f"freqs do not sum to 2**scale_bits = {M}")
        if int(f.max()) >= 1 << 16:
            raise FormatError("a one-symbol table must use scale_bits < 16 in a tiled stream")
        tr, tw = np.asarray(self.tile_rows), np.asarray(self.tile_words)
        T = len(tr) - 1
        if tr.ndim != 1 or T < 0 or tw.shape != tr.shape:
            raise FormatError(f"tile index: tile_rows {tr.shape} and tile_words {tw.shape} must both be (n_tiles+1,)")
        if T > MAX_TILES or (T == 0 and self.rows > 0):
            raise FormatError(f"{T} tiles for {self.rows} rows")
        if tr[0] != 0 or tr[-1] != self.rows:
            raise FormatError(f"tile index covers rows {tr[0]}..{tr[-1]}, not 0..{self.rows}: missing rows")
        bad = np.flatnonzero(np.diff(tr) <= 0)
        if bad.size:
            raise FormatError(f"tile {bad[0]}: rows {tr[bad[0]]}..{tr[bad[0] + 1]} overlap or are empty")
        if tw[0] != 0 or tw[-1] != len(self.words):
            raise FormatError(f"tile index: word offsets run {tw[0]}..{tw[-1]}, the stream has "
                              f"{len(self.words)} words (truncated or padded?)")
        nw = np.diff(tw)
        padded = -(-np.diff(tr) * self.cols // N) * N
        bad = np.flatnonzero((nw < 0) | (nw > padded))
        if bad.size:
            t = bad[0]
            raise FormatError(f"tile {t}: word range {tw[t]}..{tw[t + 1]} is reversed or longer than its "
                              f"{padded[t]} symbols can produce (tile index points outside the tile)")
        if np.shape(self.states) != (T, N) or np.asarray(self.states).dtype != np.uint32:
            raise FormatError(f"states must be ({T}, {N}) uint32, got {np.asarray(self.states).dtype} "
                              f"{np.shape(self.states)}")
        if np.ndim(self.words) != 1 or np.asarray(self.words).dtype != np.uint16:
            raise FormatError("words must be a 1-D uint16 array")
        if T and self.cols and (np.asarray(self.states) < L).any():
            t = int(np.argmax((np.asarray(self.states) < L).any(axis=1)))
            raise FormatError(f"tile {t}: a state is below L = 2**16: corrupt states")
        # each D shrinks x by >= log2(M / f_max) bits less a rounding slack; a tile holds at most
        # 16 bits per word plus 16 per lane: a forged shape cannot make a short tile decode for long
        bits_min = math.log2(M / int(f.max())) - math.log2(1 + M / L)
        if bits_min > 0:
            bad = np.flatnonzero(padded * bits_min > 16 * (N + nw) + 1)
            if bad.size:
                raise FormatError(f"tile {bad[0]}: {padded[bad[0]]} symbols need more than its {nw[bad[0]]} words")
        if self.escape is not None:
            te = self.tile_escapes
            if not 0 <= self.escape < rans.ALPHABET_LIMIT or te is None or np.shape(te) != (T + 1,):
                raise FormatError(f"escape symbol {self.escape} needs a (n_tiles+1,) escape index")
            te = np.asarray(te)
            ne = np.diff(te)
            bad = np.flatnonzero((ne < 0) | (ne > np.diff(tr) * self.cols))
            if te[0] != 0 or bad.size:
                t = bad[0] if bad.size else 0
                raise FormatError(f"tile {t}: escape index {te[t]}..{te[t + 1]} is not a count of its symbols")
        elif self.tile_escapes is not None:
            raise FormatError("an escape index without an escape symbol")
        return self

    def tile(self, t: int) -> rans.RansStream:
        """Tile t alone, as a rans.RansStream (for checking and for the NumPy reference of one tile)."""
        a, b = int(self.tile_words[t]), int(self.tile_words[t + 1])
        n = int(self.tile_rows[t + 1] - self.tile_rows[t]) * self.cols
        return rans.RansStream(n, self.lanes, self.scale_bits, np.asarray(self.freqs, dtype=np.uint32),
                               np.asarray(self.states[t], dtype=np.uint32), self.words[a:b])


# ----------------------------------------------------------------------------
# encoding

def encode_tiled(symbols, tile_rows=None, lanes: int | None = None, scale_bits: int | None = None,
                 escape: int | None = None) -> TiledStream:
    """Encode a 2-D integer array (rows, cols) of symbols < 2**16 (1-D: one row) into tiles of rows.

    tile_rows: None (choose_tiles), an int (rows per tile, the last may be shorter) or explicit
    row offsets [0, ..., rows]. lanes: per tile (default_lanes). escape: the ECSQ escape symbol;
    the per-tile escape counts go into the index so tiles find their escaped codes independently.
    """
    arr = symbols.detach().cpu().numpy() if isinstance(symbols, torch.Tensor) else np.asarray(symbols)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"symbols must be 2-D (rows, cols) or 1-D, got shape {arr.shape}")
    rows, cols = arr.shape
    sym = np.ascontiguousarray(rans.as_symbols(arr), dtype=np.uint16).reshape(rows, cols)
    if sym.size > rans.MAX_SYMBOLS:
        raise ValueError(f"{sym.size} symbols > 2**31; split the array")
    N = default_lanes(rows, cols) if lanes is None else int(lanes)
    if N < 1 or N & (N - 1) or N > 1 << rans.MAX_LANES_LOG2:
        raise ValueError(f"lanes must be a power of two in 1..4096, got {N}")
    counts = rans.count_symbols(sym) if sym.size else np.ones(1, dtype=np.int64)
    if tile_rows is None:
        c = counts[counts > 0].astype(np.float64)
        bounds = choose_tiles(rows, cols, float((c * np.log2(c.sum() / c)).sum() / c.sum()))
    elif np.ndim(tile_rows) == 0:
        step = int(tile_rows)
        if step < 1:
            raise ValueError(f"tile_rows must be >= 1, got {step}")
        bounds = np.append(np.arange(0, rows, step), rows).astype(np.int64) if rows else np.zeros(1, np.int64)
    else:
        bounds = np.asarray(tile_rows, dtype=np.int64)
        if bounds.ndim != 1 or bounds[0] != 0 or bounds[-1] != rows or (rows and (np.diff(bounds) <= 0).any()):
            raise ValueError(f"tile_rows must rise strictly from 0 to rows={rows}, got {bounds.tolist()}")
    if int((counts > 0).sum()) == 1:
        scale_bits = 0                                  # one symbol: f = M = 1, no words at all
    elif scale_bits is None:
        scale_bits = rans.auto_scale_bits(counts)
    freqs = rans.build_freqs(counts, int(scale_bits))
    tab = rans.symbol_table(freqs)
    pad_sym = int(np.argmax(counts))                    # padding: the cheapest symbol; the decoder drops it
    n_tiles = len(bounds) - 1
    states = np.empty((n_tiles, N), dtype=np.uint32)
    words, offsets = [], [0]
    for t in range(n_tiles):
        s = sym[bounds[t]:bounds[t + 1]].reshape(-1)
        pad = -s.size % N
        if pad:
            s = np.concatenate([s, np.full(pad, pad_sym, dtype=np.uint16)])
        buf = np.empty(s.size, dtype=np.uint16)
        x, pos = rans.encode_kernel(s, N, tab, int(scale_bits), buf)
        states[t] = x
        words.append(buf[pos:])
        offsets.append(offsets[-1] + buf.size - pos)
    tile_esc = None
    if escape is not None:
        if not 0 <= int(escape) < rans.ALPHABET_LIMIT:
            raise ValueError(f"escape symbol {escape} must be in 0..65535")
        per_row = (sym == int(escape)).sum(axis=1)
        tile_esc = np.concatenate([[0], np.cumsum(per_row)])[bounds].astype(np.int64)
    w = np.concatenate(words) if words else np.zeros(0, dtype=np.uint16)
    return TiledStream(rows, cols, N, int(scale_bits), freqs, bounds, np.asarray(offsets, dtype=np.int64),
                       states, w, None if escape is None else int(escape), tile_esc)


# ----------------------------------------------------------------------------
# tables, built once per stream (at load), never on the hot path

@dataclass(frozen=True)
class DecodeTables:
    """Per slot: fb = f | (slot - c) << 16 (uint32: D(x) = (fb & 0xFFFF) * (x >> scale_bits) + (fb >> 16))
    and the value written out for that slot (uint32 symbol, or float32 weight code for slc.fused)."""
    scale_bits: int
    fb: np.ndarray
    values: np.ndarray


def decode_tables(freqs: np.ndarray, scale_bits: int, values: np.ndarray | None = None) -> DecodeTables:
    """Slot tables for the fast kernels. values: per symbol (default: the symbol itself, uint32)."""
    f = np.asarray(freqs).astype(np.int64)
    s = np.repeat(np.arange(len(f), dtype=np.int64), f)                 # (M,) slot -> symbol
    c = np.cumsum(f) - f
    if int(f.max()) >= 1 << 16:
        raise FormatError("frequency 2**16 does not fit the 16-bit field of the tiled decoder's table")
    fb = (f[s] | ((np.arange(1 << scale_bits, dtype=np.int64) - c[s]) << 16)).astype(np.uint32)
    vals = s.astype(np.uint32) if values is None else np.ascontiguousarray(np.asarray(values)[s])
    if vals.dtype.itemsize != 4:
        raise TypeError(f"table values must be 4-byte (uint32 symbols or float32 codes), got {vals.dtype}")
    return DecodeTables(int(scale_bits), fb, vals)


# ----------------------------------------------------------------------------
# the decoder core: 16 lanes at once (AVX-512 gather + expand-load; LLVM lowers both to scalar
# code on CPUs without them), and a scalar step for the rest (short tiles, ends of tiles)

_I32, _I16, _I64, _I1 = llir.IntType(32), llir.IntType(16), llir.IntType(64), llir.IntType(1)
_V32, _V16, _V64, _VB = (llir.VectorType(t, VECTOR) for t in (_I32, _I16, _I64, _I1))
_PTR = llir.PointerType()
_VPTR = llir.VectorType(_PTR, VECTOR)


def _llvm_fn(module, name, ret, args):
    try:
        return module.get_global(name)
    except KeyError:
        return llir.Function(module, llir.FunctionType(ret, args), name=name)


def _splat(builder, value, vtype):
    undef = llir.Constant(vtype, llir.Undefined)
    v = builder.insert_element(undef, value, llir.Constant(_I32, 0))
    return builder.shuffle_vector(v, undef, llir.Constant(llir.VectorType(_I32, VECTOR), [0] * VECTOR))


@intrinsic
def decode_step16(typingctx, x, xo, fb, values, words, ptr, scale_bits, out, oo):
    """One rANS decode step of 16 lanes x[xo:xo+16] (uint32 states, updated in place):

        slot = x & (M - 1);  out[oo + n] = values[slot];  x = D(x) = f * (x >> scale_bits) + slot - c
        lanes with x < L take the next words[ptr], words[ptr + 1], ... in lane order (expand-load)

    Returns the words used (0..16). The caller guarantees words[ptr:ptr + 16] exist. out is uint16
    (values truncated: symbols) or any 4-byte dtype (values' bits stored as they are).
    """
    out_bytes = out.dtype.bitwidth // 8

    def codegen(context, builder, sig, args):
        xa, xo_, fba, va, wa, ptr_, sb_, oa, oo_ = args
        xp, fbp, vp, wp, op = (context.make_array(sig.args[i])(context, builder, a).data
                               for i, a in ((0, xa), (2, fba), (3, va), (4, wa), (7, oa)))
        xptr = builder.gep(xp, [xo_])
        xv = builder.load(builder.bitcast(xptr, _V32.as_pointer()), align=4)
        sb = builder.trunc(sb_, _I32)
        mask = builder.sub(builder.shl(llir.Constant(_I32, 1), sb), llir.Constant(_I32, 1))
        slot4 = builder.mul(builder.zext(builder.and_(xv, _splat(builder, mask, _V32)), _V64),
                            _splat(builder, llir.Constant(_I64, 4), _V64))
        gather = _llvm_fn(builder.module, "llvm.masked.gather.v16i32.v16p0", _V32, [_VPTR, _VB, _V32])
        every, zero32 = llir.Constant(_VB, [1] * VECTOR), llir.Constant(_V32, [0] * VECTOR)

        def lookup(base):
            ptrs = builder.inttoptr(builder.add(_splat(builder, builder.ptrtoint(base, _I64), _V64), slot4), _VPTR)
            return builder.call(gather, [ptrs, every, zero32])
        e, v = lookup(fbp), lookup(vp)
        obase = builder.gep(op, [oo_])
        if out_bytes == 2:
            builder.store(builder.trunc(v, _V16), builder.bitcast(obase, _V16.as_pointer()), align=2)
        else:
            builder.store(v, builder.bitcast(obase, _V32.as_pointer()), align=4)
        f = builder.and_(e, _splat(builder, llir.Constant(_I32, 0xFFFF), _V32))
        bias = builder.lshr(e, _splat(builder, llir.Constant(_I32, 16), _V32))
        xd = builder.add(builder.mul(f, builder.lshr(xv, _splat(builder, sb, _V32))), bias)     # x = D(x)
        need = builder.icmp_unsigned("<", xd, _splat(builder, llir.Constant(_I32, L), _V32))
        expand = _llvm_fn(builder.module, "llvm.masked.expandload.v16i16", _V16, [_PTR, _VB, _V16])
        w = builder.call(expand, [builder.gep(wp, [ptr_]), need, llir.Constant(_V16, [0] * VECTOR)])
        refilled = builder.or_(builder.shl(xd, _splat(builder, llir.Constant(_I32, 16), _V32)), builder.zext(w, _V32))
        builder.store(builder.select(need, refilled, xd), builder.bitcast(xptr, _V32.as_pointer()), align=4)
        ctpop = _llvm_fn(builder.module, "llvm.ctpop.i16", _I16, [_I16])
        return builder.zext(builder.call(ctpop, [builder.bitcast(need, _I16)]), _I64)

    if not (isinstance(x, types.Array) and x.dtype == types.uint32 and isinstance(words, types.Array)
            and words.dtype == types.uint16 and fb.dtype == types.uint32 and values.dtype.bitwidth == 32
            and out.dtype.bitwidth in (16, 32) and x.layout == "C" and out.layout == "C"
            and words.layout == "C" and fb.layout == "C" and values.layout == "C"):
        return None
    return types.int64(x, xo, fb, values, words, ptr, scale_bits, out, oo), codegen


@njit(cache=True, nogil=True)
def decode_scalar(x, a, b, fb, values, words, ptr, end, scale_bits, out, oo, nvalid):
    """One step of lanes x[a:b] the plain way; writes only the first nvalid symbols of the step
    (out[oo + n - a] for n - a < nvalid). Word reads are clamped to the tile's last word (a tile that
    runs short then fails the end check). Returns the new ptr."""
    mask = (1 << scale_bits) - 1
    last = max(end - 1, 0)
    for n in range(a, b):
        xx = np.int64(x[n])
        slot = xx & mask
        e = np.int64(fb[slot])
        if n - a < nvalid:
            out[oo + n - a] = values[slot]
        xx = (e & 0xFFFF) * (xx >> scale_bits) + (e >> 16)                 # x = D(x)
        need = np.int64(xx < L)
        w = np.int64(words[min(ptr, last)]) if words.size else 0
        x[n] = (xx << (need << 4)) | (w & -need)
        ptr += need
    return ptr


@njit(cache=True, nogil=True)
def decode_block(x, fb, values, words, ptr, end, scale_bits, out, oo, n):
    """Decode the next n symbols of a tile (whole steps, except a tile's last step) into out[oo:oo + n]."""
    lanes = x.size
    full = n // lanes
    simd = lanes % (2 * VECTOR) == 0
    for t in range(full):
        base = oo + t * lanes
        if simd and ptr + lanes <= end:                 # a whole step's words are there: no checks inside
            for v in range(0, lanes, 2 * VECTOR):         # two independent vectors in flight (lanes >= 32)
                ptr += decode_step16(x, v, fb, values, words, ptr, scale_bits, out, base + v)
                ptr += decode_step16(x, v + VECTOR, fb, values, words, ptr, scale_bits, out, base + v + VECTOR)
        else:
            ptr = decode_scalar(x, 0, lanes, fb, values, words, ptr, end, scale_bits, out, base, lanes)
    rest = n - full * lanes
    if rest:
        ptr = decode_scalar(x, 0, lanes, fb, values, words, ptr, end, scale_bits, out, oo + full * lanes, rest)
    return ptr


@njit(cache=True, nogil=True)
def tile_ok(x, ptr, end) -> bool:
    """A tile decoded correctly iff it used exactly its words and every lane is back at L."""
    if ptr != end:
        return False
    for n in range(x.size):
        if x[n] != L:
            return False
    return True


@njit(cache=True, nogil=True)
def decode_two(xa, xb, fb, values, words, pa, ea, pb, eb, scale_bits, out, oa, ob, n):
    """The first whole steps of two tiles (n symbols each at most) decoded together: two independent
    chains interleaved, four vectors in flight (10 % faster than one tile at a time). Stops where either
    tile runs short of a step's words. Returns (pa, pb, symbols done in each)."""
    lanes = xa.size
    T = n // lanes
    t = 0
    while t < T and pa + lanes <= ea and pb + lanes <= eb:
        ba = oa + t * lanes
        bb = ob + t * lanes
        for v in range(0, lanes, 2 * VECTOR):
            pa += decode_step16(xa, v, fb, values, words, pa, scale_bits, out, ba + v)
            pb += decode_step16(xb, v, fb, values, words, pb, scale_bits, out, bb + v)
            pa += decode_step16(xa, v + VECTOR, fb, values, words, pa, scale_bits, out, ba + v + VECTOR)
            pb += decode_step16(xb, v + VECTOR, fb, values, words, pb, scale_bits, out, bb + v + VECTOR)
        t += 1
    return pa, pb, t * lanes


@njit(cache=True, nogil=True)
def _escapes_ok(out, a, b, escape, tile_escapes, t) -> bool:
    if escape < 0:
        return True
    k = 0
    for i in range(a, b):
        k += out[i] == escape
    return k == tile_escapes[t + 1] - tile_escapes[t]


@njit(cache=True, nogil=True)
def decode_tiles_kernel(states, words, tile_words, tile_syms, fb, values, scale_bits, escape, tile_escapes, out,
                        lo, hi):
    """Decode tiles lo..hi-1 into out[tile_syms[t]:tile_syms[t+1]] (uint16 symbols), two at a time;
    with escape >= 0, also check each tile holds tile_escapes[t+1] - tile_escapes[t] escape symbols.

    Returns -1 when all are fine, else the first bad tile."""
    lanes = states.shape[1]
    xa = np.empty(lanes, dtype=np.uint32)
    xb = np.empty(lanes, dtype=np.uint32)
    t = lo
    while t < hi:
        pair = t + 1 < hi and lanes % (2 * VECTOR) == 0
        for n in range(lanes):
            xa[n] = states[t, n]
            if pair:
                xb[n] = states[t + 1, n]
        a, b, c = tile_syms[t], tile_syms[t + 1], tile_syms[min(t + 2, hi)]
        pa, pb, done = tile_words[t], tile_words[t + 1], 0
        if pair:
            pa, pb, done = decode_two(xa, xb, fb, values, words, pa, tile_words[t + 1], pb, tile_words[t + 2],
                                      scale_bits, out, a, b, min(b - a, c - b))
        pa = decode_block(xa, fb, values, words, pa, tile_words[t + 1], scale_bits, out, a + done, b - a - done)
        if not tile_ok(xa, pa, tile_words[t + 1]) or not _escapes_ok(out, a, b, escape, tile_escapes, t):
            return t
        if pair:
            pb = decode_block(xb, fb, values, words, pb, tile_words[t + 2], scale_bits, out, b + done, c - b - done)
            if not tile_ok(xb, pb, tile_words[t + 2]) or not _escapes_ok(out, b, c, escape, tile_escapes, t + 1):
                return t + 1
        t += 2 if pair else 1
    return -1


# ----------------------------------------------------------------------------
# threads: one persistent pool; numba kernels release the GIL (nogil=True)

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _reset_pool():
    global _POOL
    _POOL = None                                # a forked child has the pool object but not its threads


os.register_at_fork(after_in_child=_reset_pool)


def cpus() -> int:
    """The CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def omp_spinning() -> bool:
    """Whether torch's OpenMP workers busy-wait after each parallel region (libgomp's default policy, read
    when torch loads; OMP_WAIT_POLICY=PASSIVE or GOMP_SPINCOUNT=0 turn it off). Between the torch ops of a
    forward pass they then hold the cores a second decode thread would need: measured on SmolLM2 with 2
    torch threads on 2 cores, the fused layers ran 1.6 x slower on 2 threads than with PASSIVE, and no
    faster than on one (bench/generation.py runs both policies)."""
    if torch.get_num_threads() <= 1:
        return False
    return os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" and os.environ.get("GOMP_SPINCOUNT") != "0"


def default_threads() -> int:
    """Threads for tile-parallel work when the caller does not say: the CPUs less the ones torch's spinning
    OpenMP workers keep busy (see omp_spinning), at least one."""
    n = cpus()
    if omp_spinning():
        n -= torch.get_num_threads() - 1
    return max(1, n)


def pool() -> ThreadPoolExecutor:
    """The shared worker pool (cpus() - 1 workers; the caller's thread does a share too)."""
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = ThreadPoolExecutor(max_workers=max(1, cpus() - 1), thread_name_prefix="slc-tiles")
    return _POOL


def split_tiles(cost: np.ndarray, parts: int) -> np.ndarray:
    """Boundaries (parts + 1,) of contiguous tile ranges of about equal total cost."""
    cost = np.asarray(cost, dtype=np.float64)
    n = len(cost)
    parts = max(1, min(int(parts), n))
    if n == 0:
        return np.zeros(2, dtype=np.int64)
    cum = np.concatenate([[0.0], np.cumsum(cost)])
    cut = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts)
    return np.concatenate([[0], np.clip(cut, 1, n - 1) if n > 1 else [], [n]]).astype(np.int64)


def run_tiles(kernel, args: tuple, bounds: np.ndarray) -> list:
    """kernel(*args, lo, hi) for each range [bounds[i], bounds[i+1]) (split_tiles), one per thread; this
    thread runs the first. Returns the kernels' results in range order."""
    if len(bounds) <= 2:
        return [kernel(*args, int(bounds[0]), int(bounds[-1]))]
    futures = [pool().submit(kernel, *args, int(bounds[i]), int(bounds[i + 1])) for i in range(1, len(bounds) - 1)]
    first = kernel(*args, int(bounds[0]), int(bounds[1]))
    return [first] + [f.result() for f in futures]


# ----------------------------------------------------------------------------
# public decoders

BACKENDS = ("fast", "numpy")


class TiledDecoder:
    """Everything the fast decoder needs, checked and built once (at load): the validated index, the slot
    tables, contiguous arrays and the tile split for each thread count. decode() is the hot path.

    values: what each symbol decodes to (default: the symbol, uint16 out); slc.fused passes float codes.
    """

    def __init__(self, stream: TiledStream, values: np.ndarray | None = None):
        self.stream = stream.validate()
        self.tables = decode_tables(stream.freqs, stream.scale_bits, values)
        c = np.ascontiguousarray
        self.states = c(stream.states, dtype=np.uint32)
        self.words = c(stream.words, dtype=np.uint16) if len(stream.words) else np.zeros(1, np.uint16)
        self.tile_words = c(stream.tile_words, dtype=np.int64)
        self.tile_rows = c(stream.tile_rows, dtype=np.int64)
        self.tile_syms = self.tile_rows * stream.cols
        self.escape = -1 if stream.escape is None else int(stream.escape)
        self.tile_escapes = c(stream.tile_escapes if stream.escape is not None else self.tile_words, dtype=np.int64)
        self._splits: dict[int, np.ndarray] = {}

    def split(self, threads: int | None) -> np.ndarray:
        """Tile ranges for `threads` threads (default_threads()), equal in symbols; cached."""
        threads = default_threads() if threads is None else max(1, int(threads))
        if threads not in self._splits:
            self._splits[threads] = split_tiles(np.diff(self.tile_syms), threads)
        return self._splits[threads]

    def decode(self, threads: int | None = None) -> np.ndarray:
        """(rows, cols) uint16 symbols; FormatError naming the first bad tile."""
        s = self.stream
        out = np.empty(s.n_symbols, dtype=np.uint16)
        if s.n_tiles and s.cols:
            tb = self.tables
            errs = run_tiles(decode_tiles_kernel, (self.states, self.words, self.tile_words, self.tile_syms, tb.fb,
                                                   tb.values, s.scale_bits, self.escape, self.tile_escapes, out),
                             self.split(threads))
            bad = [e for e in errs if e >= 0]
            if bad:
                raise FormatError(f"tile {bad[0]}: corrupt (its lanes do not end at L having used exactly their "
                                  "words, or its escape count disagrees with the index)")
        return out.reshape(s.rows, s.cols)


def decode_tiled(stream: TiledStream, backend: str = "fast", threads: int | None = None) -> np.ndarray:
    """Decode into a (rows, cols) uint16 array. Raises FormatError naming the first bad tile.

    backend "fast": numba kernels, tiles split over `threads` threads (default: all CPUs); for repeated
    decoding build a TiledDecoder once instead. "numpy": the reference (decode_many_numpy).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return decode_many_numpy([stream])[0]
    return TiledDecoder(stream).decode(threads)


def decode_tiles_torch(words: torch.Tensor, states: torch.Tensor, tile_words: torch.Tensor, tile_rows: torch.Tensor,
                       cols: int, freqs: torch.Tensor, scale_bits: int, lo: int = 0, hi: int | None = None,
                       slot_table: torch.Tensor | None = None) -> torch.Tensor:
    """Tiles lo..hi-1 decoded together on words.device with torch: (rows of those tiles, cols) int32 symbols.

    One tile per row of a (tiles, lanes) state array, every step a handful of whole-array operations: what
    a GPU thread block per tile does, written with torch ops so that the same code runs (and is tested) on
    the CPU. No host synchronisation inside the step loop; one at the end to check every tile's lanes came
    back to L having used exactly its words (FormatError naming the first bad tile otherwise).
    words (W,) int16 (uint16 bits); states (n_tiles, lanes) int32 (uint32 bits); tile_words, tile_rows
    (n_tiles + 1,) int64; freqs (alphabet,) integer; slot_table: precomputed slot -> symbol (optional).
    """
    dev = words.device
    n_tiles, lanes = states.shape
    hi = n_tiles if hi is None else int(hi)
    lo = int(lo)
    if not 0 <= lo <= hi <= n_tiles:
        raise ValueError(f"tiles {lo}..{hi} are outside 0..{n_tiles}")
    tw = tile_words[lo:hi + 1].to(dev, torch.int64)
    nsym = (tile_rows[lo + 1:hi + 1] - tile_rows[lo:hi]).to(dev, torch.int64) * int(cols)
    B = hi - lo
    if B == 0 or cols == 0:
        return torch.zeros((0 if B == 0 else int(nsym.sum()) // max(cols, 1), cols), dtype=torch.int32, device=dev)
    steps = (nsym + lanes - 1) // lanes
    T = int(steps.max())
    f = freqs.to(dev, torch.int64)
    c = torch.cumsum(f, 0) - f
    sym_of = (torch.repeat_interleave(torch.arange(f.numel(), device=dev), f) if slot_table is None
              else slot_table.to(dev, torch.int64))
    w = words.reshape(-1)
    w = w.view(torch.int16) if w.dtype == torch.uint16 else w
    if w.numel() == 0:
        w = torch.zeros(1, dtype=torch.int16, device=dev)                # reads are clamped; give them one word
    last = w.numel() - 1
    mask = (1 << scale_bits) - 1
    x = states[lo:hi].to(dev, torch.int64) & 0xFFFFFFFF
    ptr = tw[:-1].clone()
    out = torch.empty((B, T, lanes), dtype=torch.int32, device=dev)
    for t in range(T):
        live = (steps > t)[:, None]                                      # tiles with symbols left at this step
        slot = x & mask
        sy = sym_of[slot]
        out[:, t] = sy.to(torch.int32)
        xn = f[sy] * (x >> scale_bits) + slot - c[sy]                    # D(x)
        need = (xn < L) & live
        idx = ptr[:, None] + torch.cumsum(need, 1) - 1                   # a tile's needing lanes read its next words
        word = w[idx.clamp(0, last)].to(torch.int64) & 0xFFFF
        x = torch.where(live, torch.where(need, (xn << 16) | word, xn), x)
        ptr = ptr + need.sum(1)
    ok = (x == L).all(1) & (ptr == tw[1:])
    if not bool(ok.all()):
        raise FormatError(f"tile {lo + int((~ok).nonzero()[0, 0])}: corrupt (its lanes do not end at L having used "
                          "exactly their words)")
    keep = torch.arange(T * lanes, device=dev)[None, :] < nsym[:, None]
    return out.reshape(B, T * lanes)[keep].reshape(-1, cols)


def check_escapes(stream: TiledStream, sym: np.ndarray) -> None:
    """FormatError naming the tile whose escape count disagrees with the index."""
    if stream.escape is None or stream.n_tiles == 0:
        return
    per_row = (sym == stream.escape).sum(axis=1)
    got = np.concatenate([[0], np.cumsum(per_row)])[np.asarray(stream.tile_rows)]
    bad = np.flatnonzero(np.diff(got) != np.diff(stream.tile_escapes))
    if bad.size:
        t = bad[0]
        raise FormatError(f"tile {t}: {got[t + 1] - got[t]} escape symbols, the index says "
                          f"{stream.tile_escapes[t + 1] - stream.tile_escapes[t]}")


def decode_many_numpy(streams: list[TiledStream]) -> list[np.ndarray]:
    """The NumPy reference: decode several tiled streams at once. Every tile of every stream (with
    the same lanes) is a row of one (tiles, lanes) state array, and the step loop runs whole-array
    operations over all of them (tiles sorted by length, so the live tiles are always a prefix).
    Returns (rows, cols) uint16 arrays; raises FormatError naming the stream and the tile.
    """
    for s in streams:
        s.validate()
    outs = [np.empty((s.rows, s.cols), dtype=np.uint16) for s in streams]
    for lanes in sorted({s.lanes for s in streams}):
        same = [k for k, s in enumerate(streams) if s.lanes == lanes]
        group, n_lanes = [], 0
        for i, k in enumerate(same):           # groups of ~NUMPY_GROUP_LANES lanes: enough for whole-array steps,
            group.append(k)                    # few enough that the group's tables stay in cache
            n_lanes += streams[k].n_tiles * lanes
            if n_lanes >= NUMPY_GROUP_LANES or i == len(same) - 1:
                _decode_group_numpy([streams[j] for j in group], [outs[j] for j in group], group)
                group, n_lanes = [], 0
    for k, s in enumerate(streams):
        check_escapes(s, outs[k])
    return outs


def _decode_group_numpy(streams, outs, names):
    """decode_many_numpy for streams of equal lanes N: state x is (tiles, N); uint32 arithmetic is exact
    (D(x) < 2**32 and x << 16 | w < 2**32 when x < L)."""
    N = streams[0].lanes
    tabs, tab_base, tiles, base = [], [], [], 0
    for k, s in enumerate(streams):
        f = np.asarray(s.freqs).astype(np.int64)
        sl = np.repeat(np.arange(len(f), dtype=np.int64), f)
        c = np.cumsum(f) - f
        tabs.append(sl | (f[sl] << 16) | ((np.arange(len(sl)) - c[sl]) << 40))   # symbol | f << 16 | (slot-c) << 40
        tab_base.append(base)
        base += len(sl)
        if s.cols:
            tiles += [(-(-int(s.tile_rows[t + 1] - s.tile_rows[t]) * s.cols // N), k, t) for t in range(s.n_tiles)]
    if not tiles:
        return
    tiles.sort(key=lambda e: -e[0])
    table = np.concatenate(tabs)
    t_sym = (table & 0xFFFF).astype(np.uint16)
    t_f = ((table >> 16) & 0xFFFFFF).astype(np.uint16)             # f < 2**16 (validate), slot - c < f
    t_bias = (table >> 40).astype(np.uint16)
    steps = np.array([e[0] for e in tiles], dtype=np.int64)
    word_base = np.concatenate([[0], np.cumsum([len(s.words) for s in streams])])
    words = np.concatenate([np.asarray(s.words, dtype=np.uint32) for s in streams] + [np.zeros(1, np.uint32)])
    ptr = np.array([word_base[k] + streams[k].tile_words[t] for _, k, t in tiles], dtype=np.int64)
    end = np.array([word_base[k] + streams[k].tile_words[t + 1] for _, k, t in tiles], dtype=np.int64)
    x = np.stack([np.asarray(streams[k].states[t], dtype=np.uint32) for _, k, t in tiles])       # (tiles, N)
    tb = np.array([tab_base[k] for _, k, _ in tiles], dtype=np.int64)[:, None]
    sb = np.array([streams[k].scale_bits for _, k, _ in tiles], dtype=np.uint32)[:, None]
    mask = (np.uint32(1) << sb) - np.uint32(1)
    out = np.empty((int(steps[0]), len(tiles), N), dtype=np.uint16)
    live = len(tiles)
    for t in range(int(steps[0])):
        while steps[live - 1] <= t:                       # sorted by steps: the live tiles are a prefix
            live -= 1
        xs = x[:live]
        slot = (xs & mask[:live]) + tb[:live]
        t_sym.take(slot, out=out[t, :live])
        xs = t_f.take(slot).astype(np.uint32) * (xs >> sb[:live]) + t_bias.take(slot)   # x = D(x)
        need = xs < L
        # a tile's needing lanes read its next words, in lane order (surprise 3)
        before = np.cumsum(need, axis=1, dtype=np.int64)
        count = before[:, -1].copy()
        before -= need
        if (ptr[:live] + count > end[:live]).any():
            _, k, tt = tiles[int(np.argmax(ptr[:live] + count > end[:live]))]
            raise FormatError(f"stream {names[k]}, tile {tt}: needs more than its words: corrupt tile")
        idx = ptr[:live, None] + before                   # <= the tile's end <= len(words) - 1
        n16 = need.astype(np.uint32)
        x[:live] = (xs << (n16 << 4)) | (words.take(idx) * n16)         # x = x << 16 | word where needed
        ptr[:live] += count
    bad = (ptr != end) | (x != L).any(axis=1)
    if bad.any():
        _, k, tt = tiles[int(np.argmax(bad))]
        raise FormatError(f"stream {names[k]}, tile {tt}: lanes do not end at L having used exactly their words: "
                          "corrupt tile")
    for i, (nsteps, k, t) in enumerate(tiles):
        s = streams[k]
        r0, r1 = int(s.tile_rows[t]), int(s.tile_rows[t + 1])
        outs[k][r0:r1] = out[:nsteps, i].reshape(-1)[:(r1 - r0) * s.cols].reshape(r1 - r0, s.cols)

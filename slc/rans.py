"""Interleaved rANS: a lossless entropy coder for arrays of 16-bit symbols.

Read me first
-------------
rANS keeps the whole message in one integer state x. With symbol s quantised to
frequency f[s] out of M = 2**scale_bits, and c[s] = f[0] + ... + f[s-1],

    encode   x = C(s, x) = (x // f[s]) * M + c[s] + x % f[s]   # x grows by log2(M / f[s]) bits
    decode   slot = x % M,  s = the symbol with c[s] <= slot < c[s] + f[s]
             x = D(x)    = f[s] * (x // M) + slot - c[s]       # exactly undoes C

To keep x in 32 bits the encoder pushes out its low 16 bits before C whenever C
would overflow, and the decoder pulls 16 bits back in after D whenever x < L.
Three things surprise everyone the first time:

1. Encoding runs in reverse. x is a stack: the decoder pops what was pushed
   last. So the encoder walks the symbols from last to first, and the decoder
   then produces them first to last.
2. The output is written backwards. For the same reason the words come out in
   the reverse of the order the decoder wants them: the encoder fills its buffer
   from the end, and the decoder reads it front to back.
3. Interleaved lanes share one word stream. N independent states ("lanes") take
   the symbols t*N + n. The encoder walks steps t = T-1..0 and, inside a step,
   lanes n = N-1..0, which is exactly decode order reversed. So at decode step t
   the lanes that need a word take the next words of a single stream, in lane
   order. A NumPy decoder is then a loop over steps whose body is a handful of
   whole-array operations, and a compiled decoder is a plain double loop; both
   read (and the encoders write) the very same bytes.

Stream layout (`RansStream.to_bytes`, all little-endian)
--------------------------------------------------------
    offset      size   field
    0           4      magic b"SLCR"
    4           1      format version (1)
    5           1      flags: bit 0 = table stored sparse (else dense); others 0
    6           1      scale_bits, 0..16
    7           1      log2(lanes), 0..12
    8           4      n_symbols (the padding to a multiple of lanes is not counted)
    12          4      n_words
    16          4      table_nbytes
    20          4*N    the encoder's final states = the decoder's start, lane order
    20+4N       2*W    16-bit words, in decode order
    20+4N+2W    ...    frequency table: Rice-coded differences of neighbouring
                       frequencies (dense) or varint (gap, freq) pairs (sparse),
                       whichever is smaller; see `pack_table`
    end-4       4      CRC32 (zlib.crc32) of everything before it

States and words come first so that they are aligned in the buffer and can be
used in place. Total size = 24 + 4*N + 2*W + table bytes; for int8 weights the
table is ~100-200 bytes, which is why it is not a plain list of 16-bit counts.
Parsing checks every field against the byte length, the CRC and the table
(sum = M) before any word is touched, and the decoders check at the end that
every word was used and every lane is back at L: anything else is FormatError.

Why the constants are what they are
-----------------------------------
- L = 2**16, 32-bit state, 16-bit words: x lives in [L, 2**32). The encoder
  renormalises when x >= 2**(32 - scale_bits) * f[s]; one 16-bit shift then
  always brings x into C's input range, and the decoder, after D, needs at most
  one word to get back above L. So each lane moves at most one word per step:
  no inner while loop, which is what makes the whole-array decoder possible.
- scale_bits <= 16: L must be a multiple of M for C and D to keep x exactly
  inside [L, 2**32). Within that, `encode` picks scale_bits per stream
  (`auto_scale_bits`): a finer M quantises the frequencies better, but makes
  the table bigger and loses more to the rounding inside C (x // f[s] is
  coarse when x is near L). For int8 weights it lands on 12 to 15.
- lanes (`choose_lanes`): each lane ends with a 4-byte state, of which about
  2 bytes are pure overhead; one lane per 8192 symbols keeps the states under
  0.1 % of the output for sources of >= 3 bits/symbol while the NumPy loop runs
  over n/N steps. Capped at 4096 lanes.

Backends: "numpy" (the readable reference), "fast" (numba kernels, same bytes),
"torch" (decode only, on the tensor's device). Symbols come back as a 1-D
np.uint16 array, or from "torch" as a 1-D torch.int32 tensor (torch has no
general-purpose uint16).

>>> import numpy as np
>>> sym = np.random.default_rng(0).integers(0, 40, 10_000).astype(np.uint16)
>>> data = encode(sym)
>>> assert np.array_equal(decode(data), sym)
>>> assert np.array_equal(decode(data, backend="numpy"), sym)
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from numba import njit

from .errors import FormatError

# ----------------------------------------------------------------------------
# constants

STATE_BITS = 32           # x in [L, 2**32): fits a uint32 on the wire; products fit an int64
WORD_BITS = 16            # one renormalisation word; with L = 2**16, at most one per step
L = 1 << 16               # lower bound of the normalised interval; a multiple of every M
MAX_SCALE_BITS = 16       # M = 2**scale_bits must divide L
ALPHABET_LIMIT = 1 << 16  # symbols are non-negative integers < 2**16 (uint16)
MAX_LANES_LOG2 = 12       # at most 4096 lanes: 16 KiB of states
SYMBOLS_PER_LANE = 8192   # choose_lanes: one lane per this many symbols
MAX_SYMBOLS = 1 << 31     # one stream holds at most 2**31 symbols (sanity bound for parsers)
MAX_TABLE_BYTES = 1 << 19  # 65536 entries of <= 6 bytes (sparse) or <= 20 bits (dense) fit easily

MAGIC = b"SLCR"
VERSION = 1
FLAG_SPARSE = 1
_HEADER = struct.Struct("<4sBBBBIII")  # magic, version, flags, scale_bits, log2 lanes, n_symbols, n_words, table_nbytes
_CRC_BYTES = 4
BACKENDS = ("numpy", "fast", "torch")


# ----------------------------------------------------------------------------
# inputs and statistics

def as_symbols(symbols) -> np.ndarray:
    """Validate and flatten (C order) an integer array into a 1-D array of symbols < 2**16."""
    if type(symbols).__module__.startswith("torch"):
        symbols = symbols.detach().cpu().numpy()
    arr = np.asarray(symbols)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iu":
        raise TypeError(f"symbols must be an integer array, got dtype {arr.dtype}; "
                        "quantise first and pass integer codes (e.g. codes.astype(np.uint16))")
    arr = arr.reshape(-1)
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise ValueError(f"symbols must be >= 0, got min {arr.min()}; shift signed codes first, "
                         "e.g. int8 codes + 128 (see int8_to_symbols)")
    if arr.size and arr.dtype.itemsize > 2 and arr.max() >= ALPHABET_LIMIT:
        raise ValueError(f"symbols must be < 2**16, got max {arr.max()}; "
                         "split wider values into 16-bit pieces")
    return arr


def int8_to_symbols(codes) -> np.ndarray:
    """int8 codes (numpy or torch) -> uint16 symbols in 0..255 (code + 128)."""
    if type(codes).__module__.startswith("torch"):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.dtype != np.int8:
        raise TypeError(f"expected int8 codes, got {codes.dtype}")
    return (codes.reshape(-1).astype(np.int16) + 128).astype(np.uint16)


def symbols_to_int8(symbols) -> np.ndarray:
    """Inverse of int8_to_symbols."""
    return (np.asarray(symbols).astype(np.int16) - 128).astype(np.int8)


@njit(cache=True, nogil=True)
def _count_kernel(sym, size):
    """Histogram of uint16 symbols < size; four sub-histograms so that runs of one
    symbol do not serialise on a single counter."""
    h = np.zeros((4, size), dtype=np.int64)
    n4 = sym.size - sym.size % 4
    for i in range(0, n4, 4):
        h[0, sym[i]] += 1
        h[1, sym[i + 1]] += 1
        h[2, sym[i + 2]] += 1
        h[3, sym[i + 3]] += 1
    for i in range(n4, sym.size):
        h[0, sym[i]] += 1
    return h.sum(axis=0)


def count_symbols(symbols) -> np.ndarray:
    """counts[s] = occurrences of s (int64, length max symbol + 1; empty for no symbols)."""
    sym = np.ascontiguousarray(as_symbols(symbols), dtype=np.uint16)
    if sym.size == 0:
        return np.zeros(0, dtype=np.int64)
    return _count_kernel(sym, int(sym.max()) + 1)


def build_freqs(counts: np.ndarray, scale_bits: int) -> np.ndarray:
    """Quantise counts to frequencies summing to 2**scale_bits, >= 1 wherever counts > 0.

    Minimises the coded size sum(counts * -log2(f / M)). The real-valued optimum
    is f = max(1, lam * counts) (proportional, with rare symbols pinned at 1);
    take its floor, hand the units left over to the symbols where one more unit
    saves the most bits, then swap single units while a swap still saves bits.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iu":
        raise TypeError(f"counts must be a 1-D integer array, got {counts.dtype} with shape {counts.shape}")
    if not 0 <= scale_bits <= MAX_SCALE_BITS:
        raise ValueError(f"scale_bits must be in 0..{MAX_SCALE_BITS}, got {scale_bits}")
    if counts.size and counts.min() < 0:
        raise ValueError("counts must be >= 0")
    M = 1 << scale_bits
    present = counts > 0
    K = int(present.sum())
    if K == 0:
        raise ValueError("counts are all zero: no symbol occurs, nothing to build a table for")
    if K > M:
        raise ValueError(f"{K} distinct symbols do not fit in 2**{scale_bits} slots; "
                         f"use scale_bits >= {math.ceil(math.log2(K))}")
    c = counts.astype(np.float64)
    # water-filling: pin the p rarest symbols at 1 and share the rest in proportion,
    # with the smallest p for which every unpinned symbol still gets >= 1
    cs = np.sort(c[present])
    p = np.arange(K)
    lam = (M - p) / (cs.sum() - np.concatenate([[0.0], np.cumsum(cs)[:-1]]))
    p0 = int(np.argmax(cs * lam >= 1))  # p = K - 1 always qualifies (lam * cs[-1] = M - K + 1 >= 1)
    f = np.where(present, np.maximum(1, np.floor(c * lam[p0])), 0).astype(np.int64)
    f = np.minimum(f, M - (K - 1))  # guards the float rounding; the fix-up below restores the sum
    with np.errstate(divide="ignore", invalid="ignore"):
        def gain():  # bits saved by giving a symbol one more unit
            return np.where(present, c * np.log2((f + 1) / f), -np.inf)

        def loss():  # bits lost by taking one unit away (never below 1)
            return np.where(f > 1, c * np.log2(f / (f - 1)), np.inf)

        while (short := M - int(f.sum())) != 0:
            if short > 0:  # units left over: give them where they help most
                k = min(short, K)
                f[np.argpartition(-gain(), k - 1)[:k]] += 1
            else:          # overspent: take back where it hurts least
                lo = loss()
                k = min(-short, int(np.isfinite(lo).sum()))
                f[np.argpartition(lo, k - 1)[:k]] -= 1
        for _ in range(64):  # polish: swap single units while a swap saves bits
            g, lo = gain(), loss()
            i, j = int(np.argmax(g)), int(np.argmin(lo))
            if i == j or not g[i] > lo[j] * (1 + 1e-12):
                break
            f[i] += 1
            f[j] -= 1
    assert f.sum() == M and (f[present] >= 1).all() and (f[~present] == 0).all()
    return f.astype(np.uint32)


def choose_lanes(n_symbols: int) -> int:
    """Number of interleaved lanes for a message of n_symbols: a power of two in 1..4096.

    One lane per 8192 symbols: the N final states (4 bytes each) stay under 0.1 %
    of the output for sources of >= 3 bits/symbol, and the NumPy decoder loops
    over n/N steps.
    """
    n = int(n_symbols)
    if n < 0:
        raise ValueError(f"n_symbols must be >= 0, got {n}")
    lanes_log2 = max(0, (n // SYMBOLS_PER_LANE).bit_length() - 1)
    return 1 << min(lanes_log2, MAX_LANES_LOG2)


# ----------------------------------------------------------------------------
# the frequency table on the wire, in whichever of two forms is smaller:
#   dense   varint lo, varint count, byte k, then `count` Rice(k) codes of the
#           zigzagged differences f[s] - f[s-1] over lo..lo+count-1 (bits MSB
#           first, zero-padded to a byte). Neighbouring frequencies of a smooth
#           histogram are close, so most differences cost a few bits.
#   sparse  varint count, then (gap since the previous present symbol, freq)
#           varint pairs: for a few symbols scattered over a wide range.

def _varint_nbytes(v: np.ndarray) -> int:
    v = np.asarray(v, dtype=np.int64)
    return int(v.size + (v >= 1 << 7).sum() + (v >= 1 << 14).sum() + (v >= 1 << 21).sum())


def _varints(values) -> bytes:
    out = bytearray()
    for v in values:  # LEB128: 7 bits a byte, low bits first, high bit = "more follows"
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _zigzag(d: np.ndarray) -> np.ndarray:
    """0, -1, 1, -2, 2, ... -> 0, 1, 2, 3, 4, ...: small magnitudes get small codes."""
    return np.where(d >= 0, 2 * d, -2 * d - 1)


def _rice_bits(fs: np.ndarray, sym: np.ndarray):
    """Bits of the dense table for each row of fs (S, K), the frequencies of the present
    symbols `sym`, and the Rice parameter k that gives them. Works on the K present
    symbols only: the differences across a gap of absent symbols are -f, 0, ..., 0, +f."""
    gap = np.diff(sym) - 1
    adjacent = gap == 0
    d = np.concatenate([fs[:, :1],                                                # f[lo] - 0
                        np.where(adjacent, fs[:, 1:] - fs[:, :-1], fs[:, 1:]),    # into each symbol
                        -fs[:, :-1][:, ~adjacent]], axis=1)                       # out, before a gap
    zeros = int(np.maximum(gap - 1, 0).sum())                                     # inside the gaps
    z = _zigzag(d)
    # the best k sits near log2 of the mean code: try 7 values around it, per row
    k0 = np.log2(z.mean(axis=1) + 1).astype(np.int64)
    k = np.clip(k0[:, None] + np.arange(-3, 4), 0, 18)                            # (S, 7)
    bits = ((z[:, :, None] >> k[:, None, :]) + 1 + k[:, None, :]).sum(axis=1) + zeros * (1 + k)
    best = bits.argmin(axis=1)
    rows = np.arange(len(k))
    return bits[rows, best], k[rows, best]


def _sparse_values(freqs: np.ndarray) -> np.ndarray:
    sym = np.flatnonzero(freqs)
    gaps = np.diff(sym, prepend=-1) - 1
    return np.concatenate([[sym.size], np.stack([gaps, freqs[sym]], axis=1).reshape(-1)]).astype(np.int64)


def _table_sizes(freqs: np.ndarray) -> tuple[int, int, int]:
    """(dense bytes, sparse bytes, Rice k for dense)."""
    sym = np.flatnonzero(freqs)
    bits, k = _rice_bits(freqs[sym].astype(np.int64)[None], sym)
    dense = _varint_nbytes([sym[0], sym[-1] - sym[0] + 1]) + 1 + -(-int(bits[0]) // 8)
    sparse = _varint_nbytes([sym.size]) + _varint_nbytes(np.diff(sym, prepend=-1) - 1) + _varint_nbytes(freqs[sym])
    return dense, sparse, int(k[0])


def table_nbytes(freqs: np.ndarray) -> int:
    """Bytes the frequency table takes in the stream."""
    dense, sparse, _ = _table_sizes(freqs)
    return min(dense, sparse)


def pack_table(freqs: np.ndarray) -> tuple[int, bytes]:
    """(flags, table bytes) for a dense freqs array with at least one nonzero."""
    dense_n, sparse_n, k = _table_sizes(freqs)
    if sparse_n < dense_n:
        return FLAG_SPARSE, _varints(_sparse_values(freqs).tolist())
    sym = np.flatnonzero(freqs)
    lo, hi = int(sym[0]), int(sym[-1])
    z = _zigzag(np.diff(freqs[lo:hi + 1].astype(np.int64), prepend=0))
    # Rice code of each z: (z >> k) zeros, a 1, then the low k bits of z, MSB first
    length = (z >> k) + 1 + k
    stop = np.cumsum(length) - length + (z >> k)  # where each code's 1 goes
    bits = np.zeros(-(-int(length.sum()) // 8) * 8, dtype=np.uint8)
    bits[stop] = 1
    for j in range(k):
        bits[stop + 1 + j] = (z >> (k - 1 - j)) & 1
    out = _varints([lo, z.size]) + bytes([k]) + np.packbits(bits).tobytes()
    assert len(out) == dense_n
    return 0, out


def _read_varints(buf: bytes, count: int, pos: int) -> tuple[list[int], int]:
    """Read `count` varints (each < 2**21: 3 bytes at most) from buf[pos:]."""
    values = []
    for _ in range(count):
        v = shift = 0
        while True:
            if pos >= len(buf):
                raise FormatError("frequency table is truncated")
            b = buf[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift > 14:
                raise FormatError("frequency table has a varint longer than 3 bytes")
        values.append(v)
    return values, pos


def unpack_table(buf: bytes, sparse: bool, scale_bits: int) -> np.ndarray:
    """Parse and validate a table; returns dense freqs (uint32, len = max symbol + 1)."""
    M = 1 << scale_bits
    if sparse:
        (k,), pos = _read_varints(buf, 1, 0)
        if not 1 <= k <= min(M, ALPHABET_LIMIT):
            raise FormatError(f"frequency table: {k} symbols for 2**{scale_bits} slots")
        values, pos = _read_varints(buf, 2 * k, pos)
        if pos != len(buf):
            raise FormatError(f"frequency table: {len(buf) - pos} trailing bytes")
        sym = np.cumsum(np.asarray(values[0::2], dtype=np.int64) + 1) - 1
        f = np.asarray(values[1::2], dtype=np.int64)
        if sym[-1] >= ALPHABET_LIMIT:
            raise FormatError(f"frequency table: symbol {sym[-1]} is >= 2**16")
        if (f == 0).any():
            raise FormatError("frequency table: a listed symbol has frequency 0")
        freqs = np.zeros(int(sym[-1]) + 1, dtype=np.int64)
        freqs[sym] = f
    else:
        (lo, count), pos = _read_varints(buf, 2, 0)
        if not (1 <= count and lo + count <= ALPHABET_LIMIT):
            raise FormatError(f"frequency table: symbol range {lo}..{lo + count - 1} is outside 0..65535")
        if pos >= len(buf) or buf[pos] > 18:
            raise FormatError("frequency table: missing or bad Rice parameter")
        k = buf[pos]
        bits = format(int.from_bytes(buf[pos + 1:], "big"), f"0{8 * (len(buf) - pos - 1)}b")
        z, i = [], 0
        for _ in range(count):
            j = bits.find("1", i)  # unary quotient ends at the next 1
            if j < 0 or j + 1 + k > len(bits):
                raise FormatError("frequency table is truncated")
            z.append(((j - i) << k) | (int(bits[j + 1:j + 1 + k], 2) if k else 0))
            i = j + 1 + k
        if len(bits) - i >= 8 or "1" in bits[i:]:
            raise FormatError("frequency table: trailing bytes after the Rice codes")
        z = np.asarray(z, dtype=np.int64)
        freqs = np.zeros(lo + count, dtype=np.int64)
        freqs[lo:] = np.cumsum(np.where(z & 1, -(z + 1) // 2, z // 2))
        if (freqs < 0).any() or freqs[lo] == 0 or freqs[-1] == 0:
            raise FormatError("frequency table: a frequency is negative, or the range has no symbol at an end")
    if int(freqs.sum()) != M:
        raise FormatError(f"frequency table sums to {int(freqs.sum())}, not 2**scale_bits = {M}")
    return freqs.astype(np.uint32)


# ----------------------------------------------------------------------------
# the stream

def framed(parts) -> bytes:
    """The parts joined, then the CRC32 of all of them (little-endian u32): how slc streams end."""
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return b"".join([*parts, struct.pack("<I", crc)])


@dataclass
class RansStream:
    """One encoded message: parameters, table, final states and words.

    >>> s = encode_stream(np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint16))
    >>> t = RansStream.from_bytes(s.to_bytes())
    >>> assert decode_stream(t).tolist() == [3, 1, 4, 1, 5, 9, 2, 6]
    """
    n_symbols: int      # message length (without the padding to a multiple of lanes)
    lanes: int          # N interleaved states, a power of two
    scale_bits: int     # frequencies sum to M = 2**scale_bits
    freqs: np.ndarray   # (alphabet_size,) uint32; freqs[s] = quantised frequency of s, 0 if absent
    states: np.ndarray  # (lanes,) uint32: encoder's final states = decoder's initial states
    words: np.ndarray   # (n_words,) uint16, in decode order

    @property
    def alphabet_size(self) -> int:
        return len(self.freqs)

    @property
    def nbytes(self) -> int:
        """Size of to_bytes(), without building it."""
        return _HEADER.size + 4 * self.lanes + 2 * len(self.words) + table_nbytes(self.freqs) + _CRC_BYTES

    def to_bytes(self) -> bytes:
        flags, table = pack_table(self.freqs)
        head = _HEADER.pack(MAGIC, VERSION, flags, self.scale_bits, self.lanes.bit_length() - 1,
                            self.n_symbols, len(self.words), len(table))
        return framed([head, self.states.astype("<u4", copy=False).data, self.words.astype("<u2", copy=False).data,
                       table])

    @classmethod
    def from_bytes(cls, data) -> "RansStream":
        """Parse and validate; raises FormatError naming the bad field. Words are a view when aligned."""
        buf = memoryview(data).cast("B")
        if len(buf) < _HEADER.size + _CRC_BYTES:
            raise FormatError(f"stream is truncated: {len(buf)} bytes, a header alone needs "
                              f"{_HEADER.size + _CRC_BYTES}")
        magic, version, flags, scale_bits, lanes_log2, n_symbols, n_words, n_table = _HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise FormatError(f"bad magic {bytes(magic)!r}: not an slc rANS stream (expected {MAGIC!r})")
        if version != VERSION:
            raise FormatError(f"unsupported format version {version} (this slc reads version {VERSION})")
        if flags & ~FLAG_SPARSE:
            raise FormatError(f"unknown flags 0x{flags:02x}")
        if scale_bits > MAX_SCALE_BITS:
            raise FormatError(f"scale_bits {scale_bits} > {MAX_SCALE_BITS}")
        if lanes_log2 > MAX_LANES_LOG2:
            raise FormatError(f"lanes 2**{lanes_log2} > 2**{MAX_LANES_LOG2}")
        lanes = 1 << lanes_log2
        if n_symbols > MAX_SYMBOLS:
            raise FormatError(f"n_symbols {n_symbols} > 2**31")
        if n_table > MAX_TABLE_BYTES:
            raise FormatError(f"table_nbytes {n_table} > {MAX_TABLE_BYTES}, more than any real table takes")
        n_padded = -(-n_symbols // lanes) * lanes
        if n_words > n_padded:  # each lane moves at most one word per step
            raise FormatError(f"n_words {n_words} > {n_padded}, the most {n_symbols} symbols can produce")
        expected = _HEADER.size + 4 * lanes + 2 * n_words + n_table + _CRC_BYTES
        if len(buf) != expected:
            raise FormatError(f"stream length {len(buf)} does not match its header "
                              f"(lanes={lanes}, n_words={n_words}, table_nbytes={n_table} -> {expected} bytes)"
                              + ("; truncated?" if len(buf) < expected else ""))
        body = buf[:-_CRC_BYTES]
        (crc,) = struct.unpack_from("<I", buf, len(body))
        if zlib.crc32(body) != crc:
            raise FormatError("CRC32 mismatch: the stream is corrupt")
        pos = _HEADER.size
        states = np.frombuffer(buf, dtype="<u4", count=lanes, offset=pos)
        words = np.frombuffer(buf, dtype="<u2", count=n_words, offset=pos + 4 * lanes)
        freqs = unpack_table(bytes(body[len(body) - n_table:]), bool(flags & FLAG_SPARSE), scale_bits)
        return cls(n_symbols, lanes, scale_bits, freqs, states, words).validate()

    def validate(self) -> "RansStream":
        """Check that the fields fit together (cheap; the decoders rely on it). Raises FormatError."""
        if not (isinstance(self.lanes, (int, np.integer)) and 1 <= self.lanes <= 1 << MAX_LANES_LOG2
                and self.lanes & (self.lanes - 1) == 0):
            raise FormatError(f"lanes must be a power of two in 1..{1 << MAX_LANES_LOG2}, got {self.lanes}")
        if not 0 <= self.scale_bits <= MAX_SCALE_BITS:
            raise FormatError(f"scale_bits {self.scale_bits} is outside 0..{MAX_SCALE_BITS}")
        if not 0 <= self.n_symbols <= MAX_SYMBOLS:
            raise FormatError(f"n_symbols {self.n_symbols} is outside 0..2**31")
        f = np.asarray(self.freqs)
        if f.ndim != 1 or not 1 <= f.size <= ALPHABET_LIMIT or f.dtype.kind not in "iu":
            raise FormatError(f"freqs must be a 1-D integer array of 1..65536 entries, got {f.dtype} {f.shape}")
        if int(f.astype(np.int64).sum()) != 1 << self.scale_bits or f.min() < 0:
            raise FormatError(f"freqs sum to {int(f.astype(np.int64).sum())}, "
                              f"not 2**scale_bits = {1 << self.scale_bits}")
        if np.shape(self.states) != (self.lanes,) or np.asarray(self.states).dtype != np.uint32:
            raise FormatError(f"states must be {self.lanes} uint32 values, got {np.asarray(self.states).dtype} "
                              f"{np.shape(self.states)}")
        if self.n_symbols and (self.states < L).any():
            raise FormatError("a final state is below L = 2**16: corrupt states")
        n_padded = -(-self.n_symbols // self.lanes) * self.lanes
        if np.ndim(self.words) != 1 or np.asarray(self.words).dtype != np.uint16 or len(self.words) > n_padded:
            raise FormatError(f"words must be at most {n_padded} uint16 values (one per symbol), "
                              f"got {np.asarray(self.words).dtype} {np.shape(self.words)}")
        # ... and at least this many: every D shrinks x by >= M / f_max, less a rounding slack
        # (x' + 1 <= f (x + M) / M with x >= L), while a lane holds < 32 - 16 bits more than
        # the final L and each word adds 16. So a stream that ends at L obeys
        #   n_padded * (log2(M / f_max) - log2(1 + M / L)) < 16 * (lanes + n_words).
        # This stops a forged n_symbols from making a short stream decode for minutes.
        bits_min = math.log2((1 << self.scale_bits) / int(f.max())) - math.log2(1 + (1 << self.scale_bits) / L)
        if n_padded * bits_min > 16 * (self.lanes + len(self.words)) + 1:
            raise FormatError(f"n_symbols {self.n_symbols} needs more than the {len(self.words)} words "
                              "in the stream: corrupt n_symbols or words")
        return self


# ----------------------------------------------------------------------------
# NumPy reference: loops over steps, whole-array operations over lanes

def _encode_numpy(sym2d: np.ndarray, freqs: np.ndarray, scale_bits: int):
    """sym2d: (T, N) symbols. Returns (final states, words in decode order)."""
    T, N = sym2d.shape
    f = freqs.astype(np.int64)
    c = np.cumsum(f) - f                           # c[s] = f[0] + ... + f[s-1]
    x_max = ((L >> scale_bits) << 16) * f          # renormalise when x >= x_max[s]
    x = np.full(N, L, dtype=np.int64)              # every lane starts at L
    steps = []                                     # words emitted per step, lane order
    for t in range(T - 1, -1, -1):                 # surprise 1: encode in reverse
        s = sym2d[t]
        big = x >= x_max[s]
        steps.append((x[big] & 0xFFFF).astype(np.uint16))
        x = np.where(big, x >> 16, x)
        x = ((x // f[s]) << scale_bits) + x % f[s] + c[s]   # x = C(s, x)
    words = np.concatenate(steps[::-1]) if steps else np.zeros(0, np.uint16)  # surprise 2: reverse
    return x.astype(np.uint32), words


def _decode_numpy(states, words, freqs, scale_bits: int, T: int) -> np.ndarray:
    """Returns (T, N) uint16 symbols; raises FormatError if the words do not add up."""
    N = len(states)
    f = freqs.astype(np.int64)
    c = np.cumsum(f) - f
    slot_to_sym = np.repeat(np.arange(len(f), dtype=np.uint16), f)  # (M,)
    mask = (1 << scale_bits) - 1
    x = states.astype(np.int64)
    out = np.empty((T, N), dtype=np.uint16)
    ptr = 0
    for t in range(T):
        slot = x & mask
        s = slot_to_sym[slot]
        out[t] = s
        x = f[s] * (x >> scale_bits) + slot - c[s]  # D(x)
        need = x < L                               # surprise 3: these lanes read the next words, in order
        k = int(np.count_nonzero(need))
        if ptr + k > len(words):
            raise FormatError(f"stream needs more than its {len(words)} words: corrupt")
        x[need] = (x[need] << 16) | words[ptr:ptr + k]
        ptr += k
    _check_end(x, ptr, len(words))
    return out


def _check_end(x, ptr: int, n_words: int):
    if ptr != n_words:
        raise FormatError(f"decoding used {ptr} of {n_words} words: corrupt stream")
    if (np.asarray(x) != L).any():
        raise FormatError("final decoder states are not L: corrupt stream")


# ----------------------------------------------------------------------------
# fast: the same two loops compiled with numba. Branch-free inner bodies (the
# renormalisation happens for ~40 % of symbols, at random: a branch there would
# mispredict constantly), and tables packed so that one load fetches all a
# symbol needs.

@njit(cache=True, nogil=True)
def encode_kernel(sym, lanes, sym_tab, scale_bits, buf):
    """sym: (T*N,) padded symbols; sym_tab[s] = f | c << 17. Fills buf from the end.

    Returns (final states, index in buf of the first word).
    """
    x = np.full(lanes, L, dtype=np.int64)
    pos = buf.size  # each symbol emits at most one word, so pos - 1 >= 0 below
    T = sym.size // lanes
    x_max_shift = 32 - scale_bits  # x_max = ((L >> scale_bits) << 16) * f = f << (32 - scale_bits)
    for t in range(T - 1, -1, -1):         # surprise 1: encode in reverse
        base = t * lanes
        for n in range(lanes - 1, -1, -1):
            e = sym_tab[sym[base + n]]
            f = e & 0x1FFFF
            xx = x[n]
            big = np.int64(xx >= (f << x_max_shift))
            buf[pos - 1] = xx & 0xFFFF      # surprise 2: written backwards; kept only if big
            pos -= big
            xx >>= big << 4
            q = xx // f
            x[n] = (q << scale_bits) + (xx - q * f) + (e >> 17)  # x = C(s, x)
    return x, pos


@njit(cache=True, nogil=True)
def _decode_kernel(states, words, slot_tab, scale_bits, T, out):
    """out: (T*N,) uint16; slot_tab[slot] = s | f << 16 | (slot - c) << 40.

    Never reads outside words, whatever they hold: a step runs unchecked only
    when a whole step's worth (N words) is left. Returns (states, words used).
    """
    lanes = states.size
    n_words = words.size
    x = states.astype(np.int64)
    mask = (1 << scale_bits) - 1
    ptr = 0
    for t in range(T):
        base = t * lanes
        if ptr + lanes <= n_words:
            for n in range(lanes):
                xx = x[n]
                e = slot_tab[xx & mask]                                # slot = x & (M - 1)
                out[base + n] = e & 0xFFFF
                xx = ((e >> 16) & 0x1FFFF) * (xx >> scale_bits) + (e >> 40)  # D(x)
                need = np.int64(xx < L)                                # surprise 3: one shared stream
                xx = (xx << (need << 4)) | (words[ptr] & -need)
                ptr += need
                x[n] = xx
        else:  # the last steps (or a corrupt stream): clamp the reads
            for n in range(lanes):
                xx = x[n]
                e = slot_tab[xx & mask]
                out[base + n] = e & 0xFFFF
                xx = ((e >> 16) & 0x1FFFF) * (xx >> scale_bits) + (e >> 40)
                need = np.int64(xx < L)
                w = np.int64(words[min(ptr, n_words - 1)]) if n_words > 0 else 0
                xx = (xx << (need << 4)) | (w & -need)
                ptr += need
                x[n] = xx
    return x, ptr


def symbol_table(freqs: np.ndarray) -> np.ndarray:
    """Per symbol: f | c << 17 (int64), for the fast encoder."""
    f = freqs.astype(np.int64)
    return f | ((np.cumsum(f) - f) << 17)


def _slot_table(freqs: np.ndarray, scale_bits: int) -> np.ndarray:
    """Per slot: s | f << 16 | (slot - c) << 40 (int64), for the fast decoder."""
    f = freqs.astype(np.int64)
    s = np.repeat(np.arange(len(f), dtype=np.int64), f)  # (M,) slot -> symbol
    c = np.cumsum(f) - f
    return s | (f[s] << 16) | ((np.arange(1 << scale_bits, dtype=np.int64) - c[s]) << 40)


# ----------------------------------------------------------------------------
# public API

def _check_backend(backend: str, allowed=("numpy", "fast")):
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")


# The coder itself loses a little to the integer rounding in C, growing ~4x per
# extra bit of scale (measured: ~0.005 bits/symbol at scale_bits = 16, 0.3 %
# of that at 12), while a finer scale quantises the frequencies better but
# makes the table bigger. auto_scale_bits weighs all three.
_CODER_LOSS_AT_16 = 0.005  # bits per symbol at scale_bits = 16


def auto_scale_bits(counts: np.ndarray) -> int:
    """The scale_bits minimising payload + coder loss + table, estimated for all at once.

    The estimate rounds counts * M / n (at least 1) instead of running build_freqs
    for every candidate: the payload of that table, normalised by its own sum,
    is within a hair of the optimum's, and the table size is computed as stored.
    """
    present = counts > 0
    K = int(present.sum())
    if K <= 1:
        return 0  # one symbol: f = M = 1, and every symbol costs nothing
    sym = np.flatnonzero(present)
    c = counts[sym].astype(np.float64)                          # (K,)
    n = c.sum()
    sb = np.arange(math.ceil(math.log2(K)), MAX_SCALE_BITS + 1)  # (S,) candidates
    f = np.maximum(1, np.round(c * (2.0 ** sb[:, None] / n))).astype(np.int64)  # (S, K)
    payload = (c * np.log2(f.sum(axis=1, keepdims=True) / f)).sum(axis=1)
    coder = n * _CODER_LOSS_AT_16 * 4.0 ** (sb - 16)
    dense = _rice_bits(f, sym)[0] / 8 + 5
    sparse = _varint_nbytes(np.diff(sym, prepend=-1) - 1) + K + (f >= 128).sum(axis=1) + (f >= 1 << 14).sum(axis=1)
    table = 8 * np.minimum(dense, sparse)
    return int(sb[np.argmin(payload + coder + table)])


def encode_stream(symbols, scale_bits: int | None = None, lanes: int | None = None,
                  backend: str = "fast") -> RansStream:
    """Encode an integer array (flattened, values in [0, 2**16)) into a RansStream."""
    _check_backend(backend)
    sym = np.ascontiguousarray(as_symbols(symbols), dtype=np.uint16)
    n = sym.size
    if n > MAX_SYMBOLS:
        raise ValueError(f"{n} symbols > 2**31; split the array into several streams")
    lanes = choose_lanes(n) if lanes is None else int(lanes)
    if lanes < 1 or lanes & (lanes - 1) or lanes > 1 << MAX_LANES_LOG2:
        raise ValueError(f"lanes must be a power of two in 1..{1 << MAX_LANES_LOG2}, got {lanes}")
    counts = count_symbols(sym) if n else np.ones(1, dtype=np.int64)  # empty: a dummy one-symbol table
    if scale_bits is None:
        scale_bits = auto_scale_bits(counts)
    freqs = build_freqs(counts, int(scale_bits))
    T = -(-n // lanes)
    pad = T * lanes - n
    if pad:  # pad with the most frequent symbol (cheapest); the decoder drops it
        sym = np.concatenate([sym, np.full(pad, np.argmax(counts), dtype=sym.dtype)])
    if backend == "numpy":
        states, words = _encode_numpy(sym.reshape(T, lanes), freqs, scale_bits)
    else:
        buf = np.empty(T * lanes, dtype=np.uint16)
        x, pos = encode_kernel(sym, lanes, symbol_table(freqs), scale_bits, buf)
        states, words = x.astype(np.uint32), buf[pos:]
    return RansStream(n, lanes, int(scale_bits), freqs, states, words)


def decode_stream(stream: RansStream, backend: str = "fast") -> np.ndarray:
    """Decode a RansStream into a 1-D uint16 array. Raises FormatError if it is corrupt."""
    _check_backend(backend)
    stream.validate()
    if int(np.max(stream.freqs)) == 1 << stream.scale_bits:
        # One symbol owns every slot, so D(x) = x: no lane ever reads a word. Answer at once
        # instead of stepping: a forged 31-byte stream may claim 2**31 symbols (measured 45 s).
        _check_end(stream.states, 0, len(stream.words))
        return np.full(stream.n_symbols, int(np.argmax(stream.freqs)), dtype=np.uint16)
    N = stream.lanes
    T = -(-stream.n_symbols // N)
    if backend == "numpy":
        out = _decode_numpy(stream.states, stream.words, stream.freqs, stream.scale_bits, T)
        return out.reshape(-1)[:stream.n_symbols]
    words = stream.words
    if not words.flags.aligned or not words.flags.c_contiguous or words.dtype != np.uint16:
        words = np.ascontiguousarray(words, dtype=np.uint16)
    out = np.empty(T * N, dtype=np.uint16)
    x, ptr = _decode_kernel(np.ascontiguousarray(stream.states, dtype=np.uint32), words,
                            _slot_table(stream.freqs, stream.scale_bits), stream.scale_bits, T, out)
    _check_end(x, ptr, len(words))
    return out[:stream.n_symbols]


def encode(symbols, scale_bits: int | None = None, backend: str = "fast", lanes: int | None = None) -> bytes:
    """Integer array (flattened, values in [0, 2**16)) -> bytes. scale_bits/lanes default to automatic."""
    return encode_stream(symbols, scale_bits=scale_bits, lanes=lanes, backend=backend).to_bytes()


def decode(data, backend: str = "fast", device=None):
    """Bytes -> 1-D np.uint16 array of symbols, or for backend="torch" a torch.int32 tensor on `device`."""
    _check_backend(backend, BACKENDS)
    stream = RansStream.from_bytes(data)
    if backend != "torch":
        return decode_stream(stream, backend=backend)
    import torch
    words = torch.from_numpy(stream.words.view(np.int16).copy()).to(device)
    states = torch.from_numpy(stream.states.astype(np.int64)).to(device)
    freqs = torch.from_numpy(stream.freqs.astype(np.int64)).to(device)
    return decode_torch(words, states, freqs, stream.n_symbols, stream.lanes, stream.scale_bits)


# ----------------------------------------------------------------------------
# torch: the NumPy step loop in tensor ops, on whatever device the words live

def decode_torch(words, states, freqs, n_symbols: int, lanes: int, scale_bits: int, slot_table=None):
    """Decode on words.device; returns a 1-D torch.int32 tensor of n_symbols symbols.

    words: (W,) int16/uint16/int32 tensor of the 16-bit words (int16 read as its bits),
           left as it is: only the N words a step needs are widened;
    states: (lanes,) integer tensor; freqs: (alphabet_size,) integer tensor;
    slot_table: optional precomputed (M,) symbol per slot (e.g. kept with the words).
    No host synchronisation inside the loop; one at the end to check the stream.
    """
    import torch
    dev = words.device
    N, T = int(lanes), -(-int(n_symbols) // int(lanes))
    n_words = words.numel()
    if states.numel() != N:
        raise ValueError(f"states has {states.numel()} entries, expected lanes={N}")
    f = freqs.to(dev, torch.int64)
    c = torch.cumsum(f, 0) - f
    if slot_table is None:
        slot_table = torch.repeat_interleave(torch.arange(f.numel(), device=dev), f)
    slot_to_sym = slot_table.to(dev, torch.int64)
    if slot_to_sym.numel() != 1 << scale_bits:
        raise FormatError(f"slot table has {slot_to_sym.numel()} slots, expected 2**{scale_bits}")
    w = words.reshape(-1)
    if w.dtype == torch.uint16:
        w = w.view(torch.int16)  # same bits; int16 supports every op we need
    if n_words == 0:
        w = torch.zeros(1, dtype=torch.int16, device=dev)  # reads are clamped; give them one word
    mask = (1 << scale_bits) - 1
    x = states.to(dev, torch.int64) & 0xFFFFFFFF              # states may arrive as int32 views of uint32
    out = torch.empty((T, N), dtype=torch.int32, device=dev)
    ptr = torch.zeros((), dtype=torch.int64, device=dev)  # stays on the device: no sync per step
    for t in range(T):
        slot = x & mask
        s = slot_to_sym[slot]
        out[t] = s.to(torch.int32)
        x = f[s] * (x >> scale_bits) + slot - c[s]            # D(x)
        need = x < L
        idx = ptr + torch.cumsum(need, 0) - 1                  # the needing lanes take the next words, in order
        word = w[idx.clamp(0, w.numel() - 1)].to(torch.int64) & 0xFFFF
        x = torch.where(need, (x << 16) | word, x)
        ptr = ptr + need.sum()
    _check_end(x.cpu().numpy(), int(ptr), n_words)
    return out.reshape(-1)[:n_symbols]

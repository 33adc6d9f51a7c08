"""slc.rans: exact round trips on every backend, identical bytes, size bounds, corrupt input."""
import doctest
import heapq
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from slc import rans
from slc.symbols import entropy_bits
from slc.errors import FormatError

ENCODERS = ["numpy", "fast"]
DECODERS = ["numpy", "fast", "torch"]
HYPO = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode(data, backend):
    out = rans.decode(data, backend=backend)
    if backend == "torch":
        assert out.dtype == torch.int32
        return out.numpy()
    assert out.dtype == np.uint16
    return out


def triangular(n, seed):
    """|a - b| for uniform bytes a, b: skewed, and integer-only so it is the same on every machine."""
    rng = np.random.default_rng(seed)
    return np.abs(rng.integers(0, 256, n) - rng.integers(0, 256, n)).astype(np.uint16)


def laplace_int8(n, seed, scale=20.0):
    """Like int8 weight codes: a Laplacian clipped to [-127, 127], shifted to 1..255."""
    v = np.random.default_rng(seed).laplace(0, scale, n)
    return rans.int8_to_symbols(np.clip(np.round(v), -127, 127).astype(np.int8))


rng = np.random.default_rng(0)
CASES = {
    "empty": np.zeros(0, np.uint16),
    "one symbol": np.array([42], np.uint16),
    "repeated": np.full(3000, 7, np.uint16),
    "all 256": rng.permutation(np.repeat(np.arange(256, dtype=np.uint16), 20)),
    "65536 alphabet": rng.permutation(np.arange(1 << 16)).astype(np.uint16),
    "sparse wide": rng.choice(np.array([0, 999, 40000, 65535], np.uint16), 5000),
    "very skewed": np.minimum(rng.geometric(0.9, 8000), 300).astype(np.uint16),
    "uniform": rng.integers(0, 256, 8000).astype(np.uint16),
    "laplace int8": laplace_int8(12_001, 1),
}


# ----------------------------------------------------------------------------
# round trips

@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", list(CASES))
def test_round_trip(name, encoder, decoder):
    sym = CASES[name]
    data = rans.encode(sym, backend=encoder)
    out = decode(data, decoder)
    assert out.shape == sym.shape and np.array_equal(out, sym)


@pytest.mark.parametrize("lanes", [1, 2, 8, 64, 512, 4096])
def test_explicit_lanes_and_odd_lengths(lanes):
    sym = triangular(5003, 2)  # 5003 is prime: never a multiple of the lanes
    data = rans.encode(sym, lanes=lanes, backend="fast")
    assert data == rans.encode(sym, lanes=lanes, backend="numpy")
    assert rans.RansStream.from_bytes(data).lanes == lanes
    for decoder in DECODERS:
        assert np.array_equal(decode(data, decoder), sym)


@pytest.mark.parametrize("scale_bits", [8, 12, 16])
def test_explicit_scale_bits(scale_bits):
    sym = triangular(4000, 3)
    data = rans.encode(sym, scale_bits=scale_bits)
    assert rans.RansStream.from_bytes(data).scale_bits == scale_bits
    assert np.array_equal(decode(data, "fast"), sym)
    with pytest.raises(ValueError, match="scale_bits"):
        rans.encode(np.arange(300, dtype=np.uint16), scale_bits=8)  # 300 symbols need 9 bits


@st.composite
def symbols_and_params(draw):
    alphabet = draw(st.sampled_from([1, 2, 5, 256, 4096, 1 << 16]))
    sym = draw(hnp.arrays(np.uint16, st.integers(0, 5000), elements=st.integers(0, alphabet - 1)))
    k = len(np.unique(sym))
    scale_bits = draw(st.one_of(st.none(), st.integers(math.ceil(math.log2(max(k, 1))), 16)))
    lanes = draw(st.sampled_from([None, 1, 4, 32]))
    return sym, scale_bits, lanes


@HYPO
@given(symbols_and_params())
def test_round_trip_hypothesis(args):
    sym, scale_bits, lanes = args
    data = rans.encode(sym, scale_bits=scale_bits, lanes=lanes, backend="fast")
    assert np.array_equal(rans.decode(data, backend="fast"), sym)
    assert np.array_equal(rans.decode(data, backend="numpy"), sym)


def test_numpy_and_fast_emit_identical_bytes():
    for seed in range(3):
        sym = laplace_int8(20_000 + seed, seed)
        s_np = rans.encode_stream(sym, backend="numpy")
        s_fast = rans.encode_stream(sym, backend="fast")
        assert np.array_equal(s_np.states, s_fast.states) and np.array_equal(s_np.words, s_fast.words)
        assert s_np.to_bytes() == s_fast.to_bytes()


def test_pinned_bytes():
    # Pins the format: a change to the table, the header, the lane or scale choice,
    # or the coder itself changes these numbers. Update them only on purpose.
    data = rans.encode(triangular(100_000, 7))
    s = rans.RansStream.from_bytes(data)
    assert (s.lanes, s.scale_bits, len(s.words)) == (PINNED_LANES, PINNED_SCALE_BITS, PINNED_WORDS)
    assert len(data) == PINNED_NBYTES
    assert zlib.crc32(data) == PINNED_CRC


PINNED_LANES, PINNED_SCALE_BITS, PINNED_WORDS, PINNED_NBYTES, PINNED_CRC = 8, 12, 48262, 96671, 558161692


def test_stream_object_round_trip():
    sym = triangular(10_000, 4)
    s = rans.encode_stream(sym)
    data = s.to_bytes()
    assert s.nbytes == len(data)
    t = rans.RansStream.from_bytes(data)
    assert (t.n_symbols, t.lanes, t.scale_bits) == (s.n_symbols, s.lanes, s.scale_bits)
    assert np.array_equal(t.freqs, s.freqs) and np.array_equal(t.states, s.states)
    assert np.array_equal(rans.decode_stream(t), sym)
    assert np.array_equal(rans.RansStream.from_bytes(bytearray(data)).words, s.words)
    # an unaligned buffer still decodes (the words are copied to an aligned array)
    odd = memoryview(b"x" + data)[1:]
    assert np.array_equal(rans.decode(odd), sym)


def test_decode_torch_with_resident_tensors():
    sym = triangular(3000, 5)
    s = rans.encode_stream(sym, lanes=16)
    words = torch.from_numpy(s.words.view(np.int16).copy())  # how a caller keeps 16-bit words in a tensor
    states = torch.from_numpy(s.states.astype(np.int64))
    freqs = torch.from_numpy(s.freqs.astype(np.int64))
    slot_table = torch.repeat_interleave(torch.arange(len(s.freqs)), freqs)
    for table in (None, slot_table):
        out = rans.decode_torch(words, states, freqs, s.n_symbols, s.lanes, s.scale_bits, slot_table=table)
        assert out.dtype == torch.int32 and np.array_equal(out.numpy(), sym)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_round_trip():
    sym = laplace_int8(50_000, 6)
    out = rans.decode(rans.encode(sym), backend="torch", device="cuda")
    assert out.device.type == "cuda"
    assert np.array_equal(out.cpu().numpy(), sym)


# ----------------------------------------------------------------------------
# statistics, tables and sizes

def _exact_freqs(counts, scale_bits):
    """Greedy unit-by-unit allocation: optimal for this convex separable cost (slow reference)."""
    f = (counts > 0).astype(np.int64)
    heap = [(-c * math.log2(2), i) for i, c in enumerate(counts.tolist()) if c > 0]
    heapq.heapify(heap)
    for _ in range((1 << scale_bits) - int(f.sum())):
        _, i = heapq.heappop(heap)
        f[i] += 1
        heapq.heappush(heap, (-counts[i] * math.log2((f[i] + 1) / f[i]), i))
    return f


def _cost(counts, f, scale_bits):
    m = counts > 0
    return float(-(counts[m] * np.log2(f[m] / (1 << scale_bits))).sum())


@HYPO
@given(hnp.arrays(np.int64, st.integers(1, 300), elements=st.integers(0, 10_000)), st.integers(0, 16))
def test_build_freqs_properties(counts, scale_bits):
    k = int((counts > 0).sum())
    if k == 0 or k > 1 << scale_bits:
        with pytest.raises(ValueError):
            rans.build_freqs(counts, scale_bits)
        return
    f = rans.build_freqs(counts, scale_bits)
    assert f.dtype == np.uint32 and f.shape == counts.shape
    assert int(f.sum()) == 1 << scale_bits
    assert (f[counts > 0] >= 1).all() and (f[counts == 0] == 0).all()
    if scale_bits <= 10:  # as cheap as the optimum
        assert _cost(counts, f, scale_bits) <= _cost(counts, _exact_freqs(counts, scale_bits), scale_bits) + 1e-6


def test_build_freqs_many_rare_symbols_is_fast_and_valid():
    counts = np.bincount(np.random.default_rng(0).zipf(1.3, 200_000).clip(0, 65535))
    f = rans.build_freqs(counts, 16)
    assert int(f.sum()) == 1 << 16 and (f[counts > 0] >= 1).all()


def test_entropy_bits():
    assert entropy_bits(np.arange(256, dtype=np.uint16)) == pytest.approx(256 * 8)
    assert entropy_bits(np.full(100, 3, np.uint16)) == 0.0
    assert entropy_bits(np.zeros(0, np.uint16)) == 0.0


def test_choose_lanes():
    assert rans.choose_lanes(0) == 1 and rans.choose_lanes(8191) == 1
    assert rans.choose_lanes(100_000) == 8 and rans.choose_lanes(600_000) == 64
    assert rans.choose_lanes(10**9) == 4096
    for n in [0, 1, 10**4, 10**5, 10**6, 10**7, 10**8]:
        N = rans.choose_lanes(n)
        assert N & (N - 1) == 0 and 1 <= N <= 4096


def test_coded_size_within_0_3_percent_of_entropy():
    # all overhead included: header, table, final states, CRC, frequency quantisation
    sym = laplace_int8(500_000, 8)
    data = rans.encode(sym)
    ratio = 8 * len(data) / entropy_bits(sym)
    assert 1.0 < ratio <= 1.003, ratio


def test_single_symbol_costs_nothing():
    data = rans.encode(np.full(100_000, 9, np.uint16))
    assert len(data) <= 64  # header, one table entry, the states; no words


# ----------------------------------------------------------------------------
# input validation

def test_rejects_bad_symbols_with_a_fix():
    with pytest.raises(TypeError, match="integer"):
        rans.encode(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"\+ 128"):
        rans.encode(np.array([-1, 2], np.int8))
    with pytest.raises(ValueError, match="2\\*\\*16"):
        rans.encode(np.array([1, 70_000]))
    with pytest.raises(ValueError, match="backend"):
        rans.encode(np.array([1, 2]), backend="cuda")
    with pytest.raises(ValueError, match="lanes"):
        rans.encode(np.array([1, 2]), lanes=3)


def test_accepts_any_integer_array_and_flattens():
    sym = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert np.array_equal(rans.decode(rans.encode(sym)), sym.reshape(-1))
    codes = torch.tensor([[-128, 0, 127]], dtype=torch.int8)
    assert np.array_equal(rans.symbols_to_int8(rans.decode(rans.encode(rans.int8_to_symbols(codes)))),
                          codes.numpy().reshape(-1))


# ----------------------------------------------------------------------------
# corrupt input: always FormatError, never anything else

SMALL = rans.encode(laplace_int8(3000, 9), lanes=4)


def _fix_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _all_decoders_reject_or_agree(data):
    """Every backend raises FormatError, or all return the same symbols (a CRC-valid forgery may decode)."""
    results = []
    for decoder in DECODERS:
        try:
            results.append(decode(data, decoder))
        except FormatError:
            results.append(None)
    if any(r is None for r in results):
        assert all(r is None for r in results), "backends disagree on a corrupt stream"
    else:
        assert all(np.array_equal(r, results[0]) for r in results)


def test_every_truncation_is_a_format_error():
    for n in list(range(0, 64)) + list(range(64, len(SMALL), 97)) + [len(SMALL) - 1]:
        with pytest.raises(FormatError):
            rans.decode(SMALL[:n])
    with pytest.raises(FormatError):
        rans.decode(SMALL + b"\0")


@pytest.mark.parametrize("offset, value, match", [
    (0, b"XLCR", "magic"),
    (4, b"\x02", "version"),
    (5, b"\x80", "flags"),
    (6, b"\x11", "scale_bits"),
    (7, b"\x0d", "lanes"),
    (8, struct.pack("<I", 2**31 + 1), "n_symbols"),
    (8, struct.pack("<I", 10**9), "n_symbols"),  # within the limit, but far more than the words can hold
    (12, struct.pack("<I", 10**6), "n_words"),
    (16, struct.pack("<I", 3), "length"),
    (16, struct.pack("<I", 2**20), "table_nbytes"),
])
def test_bad_header_fields_are_named(offset, value, match):
    body = bytearray(SMALL[:-4])
    body[offset:offset + len(value)] = value
    with pytest.raises(FormatError, match=match):
        rans.decode(_fix_crc(bytes(body)))


def test_crc_mismatch():
    data = bytearray(SMALL)
    data[30] ^= 1
    with pytest.raises(FormatError, match="CRC"):
        rans.decode(bytes(data))


@HYPO
@given(st.integers(0, 8 * len(SMALL) - 1))
def test_single_bit_flip(bit):
    data = bytearray(SMALL)
    data[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FormatError):
        rans.decode(bytes(data))


@settings(HYPO, max_examples=25)
@given(st.integers(0, 8 * (len(SMALL) - 4) - 1))
def test_single_bit_flip_with_valid_crc(bit):
    body = bytearray(SMALL[:-4])
    body[bit // 8] ^= 1 << (bit % 8)
    _all_decoders_reject_or_agree(_fix_crc(bytes(body)))


@HYPO
@given(st.binary(max_size=200))
def test_random_bytes(data):
    with pytest.raises(FormatError):
        rans.decode(data)
    with pytest.raises(FormatError):
        rans.decode(rans.MAGIC + bytes([rans.VERSION]) + data)


@HYPO
@given(st.binary(min_size=1, max_size=40))
def test_random_table_with_valid_crc(table):
    s = rans.RansStream.from_bytes(SMALL)
    head = struct.pack("<4sBBBBIII", rans.MAGIC, rans.VERSION, table[0] & 1, s.scale_bits, 2,
                       s.n_symbols, len(s.words), len(table) - 1)
    _all_decoders_reject_or_agree(_fix_crc(head + s.states.tobytes() + s.words.tobytes() + table[1:]))


def test_words_left_over_or_missing():
    s = rans.RansStream.from_bytes(SMALL)
    extra = rans.RansStream(s.n_symbols, s.lanes, s.scale_bits, s.freqs, s.states,
                            np.concatenate([s.words, np.zeros(1, np.uint16)]))
    short = rans.RansStream(s.n_symbols, s.lanes, s.scale_bits, s.freqs, s.states, s.words[:-1].copy())
    for stream in (extra, short):
        for decoder in ENCODERS:
            with pytest.raises(FormatError, match="words"):
                rans.decode_stream(stream, backend=decoder)


def test_decode_stream_validates_hand_made_streams():
    s = rans.RansStream.from_bytes(SMALL)
    bad = rans.RansStream(s.n_symbols, s.lanes, s.scale_bits, s.freqs[:-1], s.states, s.words)
    with pytest.raises(FormatError, match="sum"):
        rans.decode_stream(bad)


def test_docstring_examples():
    assert doctest.testmod(rans).failed == 0

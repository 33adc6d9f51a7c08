"""slc.tiles: tiled rANS streams round-trip exactly, cost little over one stream, and reject bad input."""
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slc import rans, tiles
from slc.errors import FormatError
from slc.tiles import TiledStream, decode_many_numpy, decode_tiled, encode_tiled

BACKENDS = ["fast", "numpy"]


def _symbols(rows, cols, alphabet, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(alphabet, 0.3))
    return rng.choice(alphabet, size=(rows, cols), p=p).astype(np.uint16)


def _roundtrip(ts, sym):
    for backend in BACKENDS:
        assert np.array_equal(decode_tiled(ts, backend=backend), sym), backend
    again = TiledStream.from_bytes(ts.to_bytes())
    assert len(ts.to_bytes()) == ts.nbytes
    assert np.array_equal(decode_tiled(again, threads=2), sym)
    fb = TiledStream.from_buffers(ts.buffers(), ts.meta)
    assert np.array_equal(decode_tiled(fb), sym)


@pytest.mark.parametrize("rows,cols,tile_rows,lanes", [
    (300, 64, 100, None), (576, 576, None, 32), (37, 130, 5, 32), (1, 1, None, None), (1, 1000, 1, 64),
    (1000, 1, 7, 16), (64, 96, [0, 1, 2, 63, 64], 32), (5, 3, 2, 1), (40, 50, 3, 8),
])
def test_roundtrip_shapes(rows, cols, tile_rows, lanes):
    sym = _symbols(rows, cols, 200, seed=rows + cols)
    _roundtrip(encode_tiled(sym, tile_rows=tile_rows, lanes=lanes), sym)


def test_tiles_are_rans_streams_with_the_shared_table():
    """Each tile alone is a rans stream (same bytes as rans.encode_stream with that table would give)."""
    sym = _symbols(96, 64, 50)
    ts = encode_tiled(sym, tile_rows=32, lanes=32, scale_bits=12)
    assert ts.n_tiles == 3 and ts.scale_bits == 12
    for t in range(ts.n_tiles):
        assert np.array_equal(rans.decode_stream(ts.tile(t)), sym[32 * t:32 * (t + 1)].reshape(-1))
        assert np.array_equal(rans.decode_stream(ts.tile(t), backend="numpy"), sym[32 * t:32 * (t + 1)].reshape(-1))


def test_exact_bytes_for_a_fixed_seed():
    sym = _symbols(64, 64, 30, seed=7)
    data = encode_tiled(sym, tile_rows=16).to_bytes()
    assert data[:4] == b"SLCX" and len(data) == encode_tiled(sym, tile_rows=16).nbytes
    assert data == encode_tiled(sym, tile_rows=16).to_bytes()          # deterministic
    assert zlib.crc32(data) == zlib.crc32(encode_tiled(torch.from_numpy(sym.astype(np.int32)), tile_rows=16)
                                          .to_bytes())


def test_one_symbol_and_empty():
    sym = np.full((7, 9), 5, dtype=np.uint16)
    ts = encode_tiled(sym, tile_rows=3)
    assert ts.scale_bits == 0 and len(ts.words) == 0
    _roundtrip(ts, sym)
    for shape in [(0, 5), (4, 0), (0, 0)]:
        e = np.zeros(shape, dtype=np.uint16)
        ts = encode_tiled(e)
        assert decode_tiled(ts).shape == shape and decode_tiled(ts, backend="numpy").shape == shape
        assert decode_tiled(TiledStream.from_bytes(ts.to_bytes())).shape == shape


def test_escape_index():
    sym = _symbols(50, 40, 20)
    sym[3, 4] = sym[40, 0] = sym[40, 1] = 19
    ts = encode_tiled(sym, tile_rows=10, escape=19)
    want = np.concatenate([[0], np.cumsum((sym == 19).sum(axis=1))])[::10]
    assert ts.tile_escapes.tolist() == want.tolist()
    _roundtrip(ts, sym)


def test_decode_many_numpy_mixes_streams():
    a, b, c = _symbols(100, 64, 40, 1), _symbols(33, 10, 300, 2), _symbols(64, 64, 3, 3)
    streams = [encode_tiled(a, tile_rows=9), encode_tiled(b, lanes=4, tile_rows=4), encode_tiled(c, tile_rows=64)]
    for got, want in zip(decode_many_numpy(streams), [a, b, c], strict=True):
        assert np.array_equal(got, want)


def test_choose_tiles():
    b = tiles.choose_tiles(576, 576)
    assert len(tiles.choose_tiles(192, 576, 7.2)) - 1 == 2            # half a tile to 1.5 tiles: two
    assert b[0] == 0 and b[-1] == 576 and (len(b) - 1) % 4 == 0 and np.ptp(np.diff(b)) <= 1
    assert tiles.choose_tiles(3, 5).tolist() == [0, 3]
    assert tiles.choose_tiles(0, 5).tolist() == [0]
    assert tiles.split_tiles(np.ones(5), 2).tolist() == [0, 3, 5]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), alphabet=st.integers(1, 600),
       lanes=st.sampled_from([1, 2, 4, 16, 32, 64]), cuts=st.lists(st.integers(1, 39), max_size=6),
       seed=st.integers(0, 2 ** 16))
def test_roundtrip_hypothesis(rows, cols, alphabet, lanes, cuts, seed):
    sym = _symbols(rows, cols, alphabet, seed)
    bounds = sorted({0, rows, *[c for c in cuts if c < rows]})
    _roundtrip(encode_tiled(sym, tile_rows=bounds, lanes=lanes), sym)


# ----------------------------------------------------------------------------
# real weights: size against one stream

def _int8_symbols(w):
    from slc.quant import Quantizer
    q = Quantizer(bits=8, granularity="channel")
    return (q.quantize(w).codes.numpy().astype(np.int16) - q.qmin).astype(np.uint16)


def test_size_overhead_real_weights(minilm_weights):
    """Tiles cost <= 0.2 % over the single stream (all MiniLM linear weights, int8 per channel)."""
    tiled = single = 0
    for w in minilm_weights.values():
        sym = _int8_symbols(w)
        ts = encode_tiled(sym)
        assert np.array_equal(decode_tiled(ts), sym)
        tiled += ts.nbytes
        single += rans.encode_stream(sym).nbytes
    assert tiled <= single * 1.002, tiled / single - 1


# ----------------------------------------------------------------------------
# bad input: FormatError naming the tile, never a crash, hang or wrong output

def _valid():
    sym = _symbols(48, 64, 60, seed=3)
    return sym, encode_tiled(sym, tile_rows=12, lanes=32)


def _rebuilt(ts, **changes):
    d = {k: getattr(ts, k) for k in ("rows", "cols", "lanes", "scale_bits", "freqs", "tile_rows", "tile_words",
                                     "states", "words", "escape", "tile_escapes")}
    d.update(changes)
    return TiledStream(**d)


@pytest.mark.parametrize("change,message", [
    (lambda ts: {"tile_words": ts.tile_words + np.array([0, 0, 0, 0, 5])}, "word offsets"),
    (lambda ts: {"tile_words": np.array([0, 500, 400, 1200, ts.tile_words[-1]])}, "tile 1"),
    (lambda ts: {"tile_rows": np.array([0, 12, 10, 36, 48])}, "tile 1"),
    (lambda ts: {"tile_rows": np.array([0, 12, 24, 36, 40])}, "missing rows"),
    (lambda ts: {"tile_rows": np.array([0, 12, 12, 36, 48])}, "tile 1"),
    (lambda ts: {"states": ts.states[:3]}, "states"),
    (lambda ts: {"escape": 3}, "escape"),
])
def test_bad_index(change, message):
    _, ts = _valid()
    with pytest.raises(FormatError, match=message):
        _rebuilt(ts, **change(ts)).validate()


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_tile_is_named(backend):
    sym, ts = _valid()
    w = ts.words.copy()
    w[int(ts.tile_words[2]) + 10] ^= 0x1234                                  # inside tile 2
    with pytest.raises(FormatError, match="tile 2"):
        decode_tiled(_rebuilt(ts, words=w), backend=backend)
    s = ts.states.copy()
    s[1, 5] ^= 0x10000                                                         # tile 1's start
    with pytest.raises(FormatError, match="tile 1"):
        decode_tiled(_rebuilt(ts, states=s), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tile_words_shifted_between_tiles(backend):
    """Tile 0 gets one word of tile 1: both still lie inside the words, but neither decodes."""
    sym, ts = _valid()
    tw = ts.tile_words.copy()
    tw[1] += 1
    with pytest.raises(FormatError, match="tile [01]"):
        decode_tiled(_rebuilt(ts, tile_words=tw), backend=backend)


def test_wrong_escape_count():
    sym = _symbols(40, 30, 20)
    sym[5, 5] = 19
    ts = encode_tiled(sym, tile_rows=10, escape=19)
    with pytest.raises(FormatError, match="tile 0"):
        decode_tiled(_rebuilt(ts, tile_escapes=np.array([0, 0, 1, 1, 1])))


def test_truncated_and_bad_bytes():
    _, ts = _valid()
    data = ts.to_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(FormatError):
            TiledStream.from_bytes(data[:cut])
    with pytest.raises(FormatError, match="CRC"):
        TiledStream.from_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(FormatError, match="magic"):
        TiledStream.from_bytes(b"XXXX" + data[4:])


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_bytes(data):
    """Mutated bytes: the CRC rejects them. With the CRC fixed up (so the parser and the decoders
    themselves are tested): FormatError, or both decoders agree on symbols of the right shape; never a
    crash or hang. (rANS decoding is a bijection: a mutated word can decode to *other* symbols whose
    lanes still end at L, about 1 in 10**4 mutations, see test_false_accept_rate: the CRC is what catches
    those.)"""
    sym, ts = _valid()
    good = ts.to_bytes()
    raw = bytearray(good[:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if bytes(raw) != good[:-4]:
        with pytest.raises(FormatError):
            TiledStream.from_bytes(bytes(raw) + good[-4:])
    try:
        got = TiledStream.from_bytes(_with_crc(bytes(raw)))
    except FormatError:
        return
    outs = []
    for backend in BACKENDS:
        try:
            outs.append(decode_tiled(got, backend=backend))
        except FormatError:
            outs.append(None)
    assert (outs[0] is None) == (outs[1] is None)
    if outs[0] is not None:
        assert outs[0].shape == got.shape and np.array_equal(outs[0], outs[1])


def test_false_accept_rate():
    """Single-byte mutations of a valid stream with the CRC fixed up: the index and lane checks reject
    all but a few (measured 3 in 20 000 on this stream)."""
    sym, ts = _valid()
    raw = ts.to_bytes()[:-4]
    rng = np.random.default_rng(0)
    wrong = 0
    for _ in range(3000):
        b = bytearray(raw)
        i = int(rng.integers(0, len(b)))
        b[i] = (b[i] + int(rng.integers(1, 256))) % 256
        try:
            out = decode_tiled(TiledStream.from_bytes(_with_crc(bytes(b))))
        except FormatError:
            continue
        wrong += not (out.shape == sym.shape and np.array_equal(out, sym))
    assert wrong <= 10


def _decode_in_child(q):
    sym = _symbols(64, 64, 30, seed=5)
    q.put(bool(np.array_equal(decode_tiled(encode_tiled(sym, tile_rows=8), threads=2), sym)))


def test_thread_pool_survives_fork():
    """The pool is recreated in a forked child (a child inherits the pool object, not its threads)."""
    import multiprocessing as mp
    sym = _symbols(64, 64, 30, seed=5)
    assert np.array_equal(decode_tiled(encode_tiled(sym, tile_rows=8), threads=2), sym)   # parent uses the pool
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_decode_in_child, args=(q,))
    p.start()
    p.join(60)
    assert p.exitcode == 0 and q.get(timeout=5)


def test_default_threads_leave_spinning_openmp_workers_their_cores(monkeypatch):
    """With torch's OpenMP workers spinning (libgomp's default), the default split leaves their cores alone."""
    from slc import tiles

    monkeypatch.setattr(tiles, "cpus", lambda: 8)
    monkeypatch.setattr(tiles.torch, "get_num_threads", lambda: 4)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert tiles.omp_spinning() and tiles.default_threads() == 5
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert not tiles.omp_spinning() and tiles.default_threads() == 8
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert tiles.default_threads() == 8
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setattr(tiles, "cpus", lambda: 2)
    monkeypatch.setattr(tiles.torch, "get_num_threads", lambda: 2)
    assert tiles.default_threads() == 1
    monkeypatch.setattr(tiles.torch, "get_num_threads", lambda: 1)
    assert not tiles.omp_spinning() and tiles.default_threads() == 2

"""slc.fused: decode x matmul from tiled streams equals dequantise-then-matmul, and rejects bad input."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slc.errors import FormatError
from slc.fused import FusedWeight, TorchFusedWeight, fused_linear
from slc.quant import Quantizer
from slc.tiles import TiledStream, encode_tiled

try:                                    # slc.symbols after the module restructuring, slc.ecsq before it
    from slc.symbols import split_escapes
except ImportError:
    from slc.ecsq import split_escapes


def _reference(codes, scale, zero_point, x, absolute=False):
    """x @ W^T with W dequantised in float64 from the integer codes (independent of slc.fused); absolute=True:
    |x| @ |W|^T, the sum of the terms' sizes that bounds a float32 dot product's rounding error."""
    rows, cols = codes.shape
    g = scale.shape[1]
    c = codes.astype(np.float64).reshape(rows, g, -1)
    if zero_point is not None:
        c = c - zero_point.astype(np.float64)[:, :, None]
    w = (c * scale.astype(np.float64)[:, :, None]).reshape(rows, cols)
    xs = x.double().numpy()
    if absolute:
        w, xs = np.abs(w), np.abs(xs)
    return torch.from_numpy((xs @ w.T).astype(np.float32))


def _affine(w, q, tile_rows=None):
    """(FusedWeight, codes, scale, zero point) for a Quantizer's affine codes of w."""
    qt = q.quantize(w)
    rows, cols = w.shape
    codes = qt.codes.numpy().astype(np.int64).reshape(rows, cols)
    g = 1 if q.granularity == "channel" else cols // q.group_size
    scale = qt.scale.float().numpy().reshape(rows, g)
    zp = None if qt.zero_point is None else qt.zero_point.float().numpy().reshape(rows, g)
    fw = FusedWeight(encode_tiled(codes - q.qmin, tile_rows=tile_rows), "affine", scale, zp, qmin=q.qmin)
    return fw, codes, scale, zp


def _ecsq(w, step, escape=None, tile_rows=None):
    qt = Quantizer(mode="ecsq", step=step).quantize(w)
    codes = qt.codes.numpy().astype(np.int64)
    sym, E, esc = split_escapes(codes, escape)
    scale = qt.scale.float().numpy().reshape(w.shape[0], 1)
    fw = FusedWeight(encode_tiled(sym.reshape(w.shape), escape=E, tile_rows=tile_rows), "ecsq", scale, escapes=esc)
    return fw, codes, scale, None


QUANTIZERS = [
    Quantizer(bits=8, granularity="channel"),
    Quantizer(bits=4, granularity="group", group_size=32),
    Quantizer(bits=4, granularity="group", group_size=64, scheme="asymmetric"),
    Quantizer(bits=4, granularity="group", group_size=128),
]


@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: q.describe())
@pytest.mark.parametrize("nx", [1, 3, 8])
def test_affine_random(q, nx):
    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(nx))
    fw, codes, scale, zp = _affine(w, q)
    x = torch.randn(nx, 256)
    want = _reference(codes, scale, zp, x)
    assert np.allclose(fw.dequantize(), q.quantize(w).dequantize().numpy(), atol=1e-6)
    for threads in (1, 2):
        assert torch.allclose(fw.linear(x, threads=threads), want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(fw.linear(x), x @ torch.from_numpy(fw.dequantize()).T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("step", [0.05, 0.2, 1.0])
def test_ecsq_with_escapes(step):
    w = torch.randn(200, 192, generator=torch.Generator().manual_seed(1))
    w[7, 3] = 80.0                                                   # far outliers: escaped codes
    w[150, 0] = -300.0
    fw, codes, scale, _ = _ecsq(w, step, escape=7)                   # zig-zag symbols >= 7 escape
    assert fw.escapes.size >= 2 and fw.stream.escape == 7
    assert np.array_equal(fw.codes(), codes)
    x = torch.randn(4, 192)
    want = _reference(codes, scale, None, x)
    for threads in (1, 2):
        assert torch.allclose(fw.linear(x, threads=threads), want, atol=1e-3, rtol=1e-4)


def test_real_weights():
    from slc.models import linear_weights
    ws = linear_weights("smollm2-135m")
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"]:
        w = ws[name]
        x = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0))
        for fw, codes, scale, zp in [_affine(w, QUANTIZERS[0]), _affine(w, QUANTIZERS[2]), _ecsq(w, 0.2)]:
            assert torch.allclose(fw.linear(x), _reference(codes, scale, zp, x), atol=1e-4, rtol=1e-3), name


def test_many_rows_and_shapes():
    q = QUANTIZERS[0]
    fw, codes, scale, zp = _affine(torch.randn(40, 64), q)
    x = torch.randn(3, 7, 64)                                        # > MAX_ROWS rows: decode once + GEMM
    assert fw.linear(x).shape == (3, 7, 40)
    assert torch.allclose(fw.linear(x), _reference(codes, scale, zp, x.reshape(-1, 64)).reshape(3, 7, 40),
                          atol=1e-4)
    b = torch.randn(40)
    assert torch.allclose(fused_linear(x[0, :2], fw, b), _reference(codes, scale, zp, x[0, :2]) + b, atol=1e-4)
    with pytest.raises(ValueError, match="features"):
        fw.linear(torch.randn(1, 63))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 30), cols=st.integers(1, 70), nx=st.integers(1, 8), lanes=st.sampled_from([1, 4, 32]),
       tile=st.integers(1, 30), kind=st.sampled_from(["int8", "grouped", "ecsq"]), seed=st.integers(0, 1000))
def test_hypothesis_shapes(rows, cols, nx, lanes, tile, kind, seed):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((nx, cols)).astype(np.float32))
    zp, esc, E = None, None, None
    if kind == "ecsq":                                       # zig-zag symbols, >= E escaped (int32 extremes too)
        codes = rng.integers(-6, 7, (rows, cols))
        codes[rng.random((rows, cols)) < 0.05] = rng.choice([2 ** 31 - 1, -2 ** 31, 1000, -77])
        z = np.where(codes >= 0, 2 * codes, -2 * codes - 1)
        E = 9
        sym, esc = np.where(z >= E, E, z), codes[z >= E].astype(np.int32)
        scale = rng.random((rows, 1)).astype(np.float32)
        qmin = 0
    else:
        groups = [g for g in range(1, cols + 1) if cols % g == 0]
        g = groups[seed % len(groups)] if kind == "grouped" else 1
        codes = rng.integers(0, 16, (rows, cols))
        qmin = 0 if kind == "grouped" else -8
        codes = codes + qmin
        sym = codes - qmin
        scale = rng.random((rows, g)).astype(np.float32)
        zp = (rng.random((rows, g)) * 15).astype(np.float32) if kind == "grouped" else None
    fw = FusedWeight(encode_tiled(sym, tile_rows=tile, lanes=lanes, escape=E), "ecsq" if kind == "ecsq" else "affine",
                     scale, zp, qmin=qmin, escapes=esc)
    assert np.array_equal(fw.codes(), codes)
    # escapes up to 2^31 make terms of ~1e9 that can cancel: float32's rounding, at most cols * 2^-24 times the sum
    # of the terms' sizes, comes on top of the usual tolerances
    ref, err = _reference(codes, scale, zp, x), (fw.linear(x) - _reference(codes, scale, zp, x)).abs()
    assert torch.all(err <= 1e-3 + 1e-4 * ref.abs() + cols * 2.0 ** -24 * _reference(codes, scale, zp, x, True))


def test_buffers_roundtrip():
    w = torch.randn(64, 128)
    w[0, 0] = 50.0
    for fw, *_ in [_affine(w, QUANTIZERS[2]), _ecsq(w, 0.1, escape=40)]:
        again = FusedWeight.from_buffers(fw.buffers(), fw.meta)
        x = torch.randn(1, 128)
        assert torch.equal(again.linear(x), fw.linear(x))


def test_bad_input():
    w = torch.randn(64, 128)
    w[10, 0] = 50.0
    w[40, 0] = 50.0
    fw, codes, scale, _ = _ecsq(w, 0.1, escape=40, tile_rows=16)
    assert fw.stream.n_tiles == 4 and fw.escapes.size >= 2
    x = torch.randn(1, 128)
    with pytest.raises(FormatError, match="escaped codes"):
        FusedWeight(fw.stream, "ecsq", scale, escapes=fw.escapes[:-1])
    s = fw.stream
    te = s.tile_escapes.copy()
    te[1:-1] = te[-1]                                                # every escape moved to tile 0
    moved = TiledStream(s.rows, s.cols, s.lanes, s.scale_bits, s.freqs, s.tile_rows, s.tile_words, s.states,
                        s.words, s.escape, te)
    assert te.tolist() != s.tile_escapes.tolist()
    with pytest.raises(FormatError, match="tile"):
        FusedWeight(moved, "ecsq", scale, escapes=fw.escapes).linear(x)
    words = s.words.copy()
    words[int(s.tile_words[-2]) + 3] ^= 0xFF                         # last tile
    bad = TiledStream(s.rows, s.cols, s.lanes, s.scale_bits, s.freqs, s.tile_rows, s.tile_words, s.states,
                      words, s.escape, s.tile_escapes)
    with pytest.raises(FormatError, match=f"tile {s.n_tiles - 1}"):
        FusedWeight(bad, "ecsq", scale, escapes=fw.escapes).linear(x)
    with pytest.raises(ValueError, match="kind"):
        FusedWeight(s, "int3", scale)


def _dense_reference(codes, scale, zp):
    """W in float32 from integer codes, the way QuantizedTensor does it: (code - zp) * scale, group by group."""
    rows, cols = codes.shape
    c = codes.astype(np.float32).reshape(rows, scale.shape[1], -1)
    if zp is not None:
        c = c - zp[:, :, None]
    return (c * scale[:, :, None]).reshape(rows, cols)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_dequantize_one_pass_equals_codes(threads):
    """dequantize() (decoded straight to float codes, scaled tile by tile) is bit-identical to codes() -> float."""
    w = torch.randn(200, 128)
    w[5, 7] = 40.0                                                   # an escape
    for fw, codes, scale, zp in [_affine(w, q, 16) for q in QUANTIZERS] + [_ecsq(w, 0.1, escape=60, tile_rows=8)]:
        assert fw.stream.n_tiles >= 2
        np.testing.assert_array_equal(fw.codes(threads), codes)
        np.testing.assert_array_equal(fw.dequantize(threads), _dense_reference(codes, scale, zp))


def test_dequantize_rejects_bad_tiles():
    w = torch.randn(64, 128)
    w[10, 0] = w[40, 0] = 50.0
    fw, codes, scale, _ = _ecsq(w, 0.1, escape=40, tile_rows=16)
    s = fw.stream
    te = s.tile_escapes.copy()
    te[1:-1] = te[-1]                                                # the index puts every escape in tile 0
    moved = TiledStream(s.rows, s.cols, s.lanes, s.scale_bits, s.freqs, s.tile_rows, s.tile_words, s.states,
                        s.words, s.escape, te)
    with pytest.raises(FormatError, match="tile 0"):
        FusedWeight(moved, "ecsq", scale, escapes=fw.escapes).dequantize()
    words = s.words.copy()
    words[int(s.tile_words[1]) + 2] ^= 0x5A                          # tile 1's words
    bad = TiledStream(s.rows, s.cols, s.lanes, s.scale_bits, s.freqs, s.tile_rows, s.tile_words, s.states,
                      words, s.escape, s.tile_escapes)
    for threads in (1, 2):
        with pytest.raises(FormatError, match="tile 1"):
            FusedWeight(bad, "ecsq", scale, escapes=fw.escapes).dequantize(threads)


def test_threads_for_small_weights():
    """A second thread only where there is work for it: small weights run on one (its launch costs more)."""
    small = _affine(torch.randn(192, 576), QUANTIZERS[0])[0]
    big = _affine(torch.randn(1536, 576), QUANTIZERS[0])[0]
    assert small.threads(2) == 1 and big.threads(2) == 2 and big.threads(1) == 1
    assert big.threads(64) <= big.stream.n_tiles
    x = torch.randn(1, 576)
    assert torch.equal(small.linear(x, threads=2), small.linear(x, threads=1))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_fused(data):
    """Mutated bytes (CRC fixed up): FormatError, or exactly the matmul of what the stream decodes to
    (rANS may decode a mutated word to other valid symbols: see tests/test_tiles.py)."""
    import struct
    import zlib
    rng = np.random.default_rng(0)
    codes = rng.integers(-20, 20, (48, 64))
    raw = bytearray(encode_tiled(codes + 20, tile_rows=12, lanes=32).to_bytes()[:-4])
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    x = torch.from_numpy(rng.standard_normal((2, 64)).astype(np.float32))
    scale = np.full((48, 1), 0.5, np.float32)
    try:
        ts = TiledStream.from_bytes(bytes(raw) + struct.pack("<I", zlib.crc32(raw)))
        if ts.shape != codes.shape:                                  # another tensor: the caller's header check
            return
        fw = FusedWeight(ts, "affine", scale, qmin=-20)
        y = fw.linear(x, threads=2)
    except FormatError:
        return
    assert torch.allclose(y, _reference(fw.codes(), fw.scale, None, x), atol=1e-4)


# --- the torch decoder (GPU path; tested here with the CPU torch backend) ----------------------------

def _torch_cases():
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))      # seeded: the same words every run
    w[3, 5] = w[70, 1] = 40.0                                      # escapes in two tiles
    return [_affine(w, QUANTIZERS[0], 16), _affine(w, QUANTIZERS[2], 12), _ecsq(w, 0.1, escape=40, tile_rows=16)]


def test_torch_weight_matches_fused():
    for fw, codes, scale, zp in _torch_cases():
        tw = TorchFusedWeight(fw.buffers(), fw.meta, buffer_bytes=20_000)     # several groups of tiles
        assert len(tw.groups) > 1
        assert torch.equal(tw.codes(), torch.from_numpy(codes))
        assert torch.equal(tw.dequantize(), torch.from_numpy(_dense_reference(codes, scale, zp)))
        x = torch.randn(3, 64)
        torch.testing.assert_close(tw.linear(x), fw.linear(x), atol=1e-4, rtol=1e-4)
        assert tw.linear(x[:0]).shape == (0, 96)


def test_decode_tiles_torch_any_range():
    from slc.tiles import decode_tiles_torch

    fw = _torch_cases()[0][0]
    b, s = fw.buffers(), fw.stream
    want = fw.symbols.decode(1)
    for lo, hi in [(0, s.n_tiles), (1, 3), (2, 2), (s.n_tiles - 1, s.n_tiles)]:
        got = decode_tiles_torch(b["words"], b["states"].reshape(-1, s.lanes), b["tile_words"], b["tile_rows"],
                                 s.cols, b["freqs"], s.scale_bits, lo, hi)
        r0, r1 = int(s.tile_rows[lo]), int(s.tile_rows[hi])
        assert torch.equal(got, torch.from_numpy(want[r0:r1].astype(np.int32)))


def test_torch_weight_rejects_bad_tiles():
    fw = _torch_cases()[2][0]
    s = fw.stream
    b = fw.buffers()
    words = b["words"].clone()
    words[int(s.tile_words[2]) + 1] ^= 0x0F0F                        # tile 2's words
    with pytest.raises(FormatError, match="tile 2"):
        TorchFusedWeight({**b, "words": words}, fw.meta).linear(torch.randn(1, 64))
    te = b["tile_escapes"].clone()
    te[1:-1] = te[-1]                                                # every escape claimed by tile 0
    with pytest.raises(FormatError, match="tile 0"):
        TorchFusedWeight({**b, "tile_escapes": te}, fw.meta).codes()
    with pytest.raises(FormatError, match="escaped codes"):
        TorchFusedWeight({**b, "escapes": b["escapes"][:-1]}, fw.meta)
    with pytest.raises(FormatError, match="scale"):
        TorchFusedWeight({**b, "scale": b["scale"][:5]}, fw.meta)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_weight_cuda_memory():
    """On a GPU only the coded bytes and one group's buffers are resident: max_memory_allocated during
    linear() stays below the coded bytes + buffer_bytes (+ x and y)."""
    w = torch.randn(4096, 1024)
    fw = _affine(w, QUANTIZERS[0])[0]
    budget = 8 << 20
    bufs = {k: v.cuda() for k, v in fw.buffers().items()}
    tw = TorchFusedWeight(bufs, fw.meta, buffer_bytes=budget)
    x = torch.randn(4, 1024, device="cuda")
    coded = sum(v.numel() * v.element_size() for v in bufs.values())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = tw.linear(x)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= budget + 4 * 4096 * 4 + (1 << 20)
    torch.testing.assert_close(y.cpu(), fw.linear(x.cpu()), atol=1e-3, rtol=1e-3)
    assert coded < w.numel()                                         # the weight stays coded (< 8 bits a weight)


# --- trellis codes (slc.trellis): ecsq codes whose levels depend on a state machine along each row -------------

def _tcq(w, q, escape=None, tile_rows=None, lanes=None):
    """(FusedWeight of q's trellis codes of w, the QuantizedTensor they come from)."""
    qt = q.quantize(w)
    sym, E, esc = split_escapes(qt.codes.numpy().astype(np.int64), escape)
    scale = qt.scale.float().numpy().reshape(w.shape[0], -1)
    stream = encode_tiled(sym.reshape(w.shape), escape=E, tile_rows=tile_rows, lanes=lanes)
    return FusedWeight(stream, "ecsq", scale, escapes=esc, trellis=True), qt


TRELLIS_CASES = [   # (rows, cols, quantizer, escape symbol, tile rows, lanes): rows within one block or across
    (200, 96, Quantizer(mode="ecsq", step=0.2, trellis=True), 7, 16, None),
    (90, 64, Quantizer(mode="ecsq", step=0.3, trellis=True, granularity="group", group_size=32), 9, 7, 32),
    (75, 70, Quantizer(mode="ecsq", step=0.15, trellis=True), 11, 9, 4),           # cols % lanes != 0
    (40, 2500, Quantizer(mode="ecsq", step=0.2, trellis=True), 7, 3, 32),          # a row > FUSED_BLOCK
]


@pytest.mark.parametrize("rows,cols,q,escape,tile,lanes", TRELLIS_CASES, ids=["channel", "group32", "odd-cols", "wide"])
def test_trellis_codes_decode_to_the_quantised_weight(rows, cols, q, escape, tile, lanes):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    w[3, 5], w[rows - 10, 1] = 60.0, -90.0                           # outliers: escaped codes in two tiles
    fw, qt = _tcq(w, q, escape, tile, lanes)
    assert fw.stream.n_tiles >= 3 and fw.escapes.size >= 2 and fw.meta["trellis"] is True
    ref = qt.dequantize()                                            # float32: levels x scale
    np.testing.assert_array_equal(fw.codes(), qt.codes.numpy())     # codes() stays the codes
    for threads in (1, 2):
        np.testing.assert_array_equal(fw.dequantize(threads), ref.numpy())
    xs = [torch.randn(n, cols, generator=torch.Generator().manual_seed(n)) for n in (1, 8, 40)]
    for x in xs:                                                     # fused (1, 8 rows) and decode + GEMM (40)
        want = x.double() @ ref.double().T
        for threads in (1, 2):
            torch.testing.assert_close(fw.linear(x, threads=threads).double(), want, rtol=1e-4, atol=1e-3)
    again = FusedWeight.from_buffers(fw.buffers(), fw.meta)
    assert again.trellis and torch.equal(again.linear(xs[0]), fw.linear(xs[0]))
    tw = TorchFusedWeight(fw.buffers(), fw.meta, buffer_bytes=cols * 32 * 20)  # several groups of tiles
    assert tw.trellis and len(tw.groups) > 1
    assert torch.equal(tw.dequantize(), ref)
    torch.testing.assert_close(tw.linear(xs[1]).double(), xs[1].double() @ ref.double().T, rtol=1e-4, atol=1e-3)
    # without the trellis scan the same stream means other weights: the checks above can fail
    plain = FusedWeight(fw.stream, "ecsq", fw.scale, escapes=fw.escapes)
    assert not np.allclose(plain.dequantize(), ref.numpy(), atol=1e-3)
    assert not torch.allclose(plain.linear(xs[0]), fw.linear(xs[0]), atol=1e-3)


def test_trellis_flag_in_meta_and_bad_input():
    w = torch.randn(64, 128)
    w[10, 0] = 50.0
    fw, _ = _tcq(w, Quantizer(mode="ecsq", step=0.2, trellis=True), escape=9, tile_rows=16)
    assert "trellis" not in _ecsq(w, 0.1, escape=40)[0].meta        # other headers are as they were
    b, meta = fw.buffers(), fw.meta
    for bad in ("yes", 1, None):
        with pytest.raises(FormatError, match="trellis"):
            FusedWeight.from_buffers(b, {**meta, "trellis": bad})
        with pytest.raises(FormatError, match="trellis"):
            TorchFusedWeight(b, {**meta, "trellis": bad})
    affine = _affine(w, QUANTIZERS[0])[0]
    with pytest.raises(FormatError, match="trellis"):
        FusedWeight.from_buffers(affine.buffers(), {**affine.meta, "trellis": True})
    with pytest.raises(ValueError, match="trellis"):
        FusedWeight(affine.stream, "affine", affine.scale, trellis=True)
    esc = fw.escapes.copy()
    esc[0] = 2 ** 24                                                 # float32 would round it (and its parity)
    with pytest.raises(FormatError, match="2\\*\\*24"):
        FusedWeight(fw.stream, "ecsq", fw.scale, escapes=esc, trellis=True)
    FusedWeight(fw.stream, "ecsq", fw.scale, escapes=esc)           # plain ecsq codes: rounded like dequantize

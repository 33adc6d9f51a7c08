"""CompressedTensor: exact equality with the quantiser, sizes, predictors, bytes, bad input."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from slc import CompressedTensor, FormatError, Quantizer
from slc.quant import QuantizedTensor
from slc.symbols import apply_predictor, entropy_bits, undo_predictor
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

QUANTIZERS = [
    Quantizer(bits=8),
    Quantizer(bits=8, scheme="asymmetric", granularity="tensor"),
    Quantizer(bits=4, granularity="group", group_size=64),
    Quantizer(bits=3, scheme="asymmetric", granularity="group", group_size=32),
]


@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: q.describe())
@pytest.mark.parametrize("predictor", ["none", "left", "auto"])
def test_decompress_is_bit_identical_to_dequantize(q, predictor, minilm_query):
    w = minilm_query[:128]
    ct = CompressedTensor.compress(w, q, predictor=predictor)
    assert torch.equal(ct.decompress(), q.quantize(w).dequantize())
    assert torch.equal(CompressedTensor.from_bytes(ct.to_bytes()).decompress(), ct.decompress())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_original_dtype_default_and_override(dtype):
    w = torch.randn(32, 64).to(dtype)
    ct = CompressedTensor.compress(w)
    assert ct.decompress().dtype == dtype
    assert ct.decompress(torch.float32).dtype == torch.float32
    assert ct.decompress(backend="torch").dtype == dtype
    assert torch.equal(ct.decompress(backend="torch"), ct.decompress())


def test_predictor_round_trip_is_exact():
    rng = np.random.default_rng(0)
    for bits in (2, 5, 8):
        s = rng.integers(0, 2 ** bits, size=12 * 7).astype(np.uint16)
        r = apply_predictor(s, "left", bits, (12, 7))
        assert r.max() < 2 ** bits
        assert np.array_equal(undo_predictor(r, "left", bits, (12, 7)), s)
        assert torch.equal(undo_predictor(torch.from_numpy(r.astype(np.int64)), "left", bits, (12, 7)),
                           torch.from_numpy(s.astype(np.int64)))


def test_auto_picks_lower_entropy_and_reports_both():
    smooth = torch.linspace(-1, 1, 4096).reshape(4, 1024)         # neighbours nearly equal: left wins
    ct = CompressedTensor.compress(smooth, predictor="auto")
    assert ct.predictor == "left" and ct.predictor_entropies["left"] < ct.predictor_entropies["none"]
    noise = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))   # independent: none wins
    ct = CompressedTensor.compress(noise, predictor="auto")
    assert ct.predictor == "none" and set(ct.predictor_entropies) == {"none", "left"}


def test_left_predictor_raises_entropy_on_real_weights(minilm_query):
    """The CodecLLM prototype called LEFT 'very effective on actual weight matrices'; on real int8
    weights it raises the entropy."""
    ct = CompressedTensor.compress(minilm_query, predictor="auto")
    assert ct.predictor_entropies["left"] > ct.predictor_entropies["none"]
    assert ct.predictor == "none"


def test_coded_size_close_to_entropy_bound_on_real_weights(minilm_weights):
    """Words + states + table + stream header within 0.3 % of the order-0 bound (a 1536 x 384 tensor)."""
    w = minilm_weights["encoder.layer.0.intermediate.dense.weight"]
    ct = CompressedTensor.compress(w)
    assert ct.coded_bits <= 1.003 * ct.entropy_bits
    assert ct.coded_bits >= ct.entropy_bits * 0.999     # and no magic below the bound


def test_sizes_count_everything(minilm_query):
    ct = CompressedTensor.compress(minilm_query)
    assert ct.nbytes == len(ct.to_bytes())
    assert ct.nbytes > ct.coded_bits / 8 + ct.scale.numel() * 4       # scales and header on top
    assert ct.bits_per_weight == pytest.approx(8 * ct.nbytes / minilm_query.numel())
    r = ct.ratios()
    assert r["vs_fp32"] == pytest.approx(2 * r["vs_fp16"]) == pytest.approx(4 * r["vs_int8"])
    assert 1.0 < r["vs_int8"] < 1.3       # real int8 weights carry ~7.2-7.4 bits of entropy


def test_entropy_bits_known_value():
    assert entropy_bits(np.array([0, 1, 0, 1], dtype=np.uint16)) == pytest.approx(4.0)
    assert entropy_bits(np.zeros(10, dtype=np.uint16)) == 0.0
    assert entropy_bits(np.array([70000, -3, 70000, -3])) == pytest.approx(4.0)      # any integer range


def test_buffers_round_trip():
    w = torch.randn(16, 48, dtype=torch.bfloat16)
    ct = CompressedTensor.compress(w, Quantizer(bits=4, scheme="asymmetric", granularity="group", group_size=16))
    back = CompressedTensor.from_buffers(ct.buffers(), ct.meta)
    assert torch.equal(back.decompress(), ct.decompress())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_decode_matches_cpu():
    ct = CompressedTensor.compress(torch.randn(256, 512, dtype=torch.float16))
    assert torch.equal(ct.decompress(device="cuda").cpu(), ct.decompress())


def test_corrupt_bytes_raise_format_error(minilm_query):
    data = bytearray(CompressedTensor.compress(minilm_query[:32]).to_bytes())
    for bad in (bytes(data[:-1]), bytes(data[:20]), b"", b"XXXX" + bytes(data[4:])):
        with pytest.raises(FormatError):
            CompressedTensor.from_bytes(bad)
    for i in (5, 40, len(data) // 2, len(data) - 2):
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        with pytest.raises(FormatError):
            CompressedTensor.from_bytes(bytes(flipped))


@pytest.mark.parametrize("bad, err", [
    (dict(tensor=torch.arange(8).reshape(2, 4)), TypeError),
    (dict(tensor=torch.randn(2, 4), predictor="up"), ValueError),
    (dict(tensor=torch.randn(2, 4), quantizer="int8"), TypeError),
    (dict(tensor=torch.tensor([[float("nan"), 1.0]])), ValueError),
    (dict(tensor=torch.empty(0)), ValueError),
])
def test_bad_input(bad, err):
    with pytest.raises(err):
        CompressedTensor.compress(**bad)


@pytest.mark.parametrize("quantizer,predictor", [
    (Quantizer(), "none"), (Quantizer(), "left"),
    (Quantizer(bits=4, scheme="asymmetric", granularity="group", group_size=16), "left"),
    (Quantizer(mode="ecsq", step=0.002), "none"),                  # fine step: large codes, and an outlier
])
def test_decode_codes_torch_backend_equals_numba(quantizer, predictor):
    """decode_codes with the torch decoder (the CUDA path, run on CPU) gives the very same codes, dtype included."""
    from slc.tensor import decode_codes
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    w[0, 0] = 40.0                                                  # an outlier: escapes in ecsq
    ct = CompressedTensor.compress(w, quantizer, predictor=predictor) if quantizer.mode != "ecsq" \
        else CompressedTensor.compress(w, quantizer)
    numba_codes = decode_codes(ct.buffers(), ct.meta)
    torch_codes = decode_codes(ct.buffers(), ct.meta, backend="torch")
    assert numba_codes.dtype == torch_codes.dtype and torch.equal(numba_codes, torch_codes)
    assert torch.equal(numba_codes.to(torch.int64), quantizer.quantize(w).codes.to(torch.int64))
    with pytest.raises(ValueError, match="backend"):
        decode_codes(ct.buffers(), ct.meta, backend="cuda")


@pytest.mark.parametrize("q,shape,dtype", [
    (Quantizer(mode="ecsq", step=0.2, trellis=True), (64, 96), torch.float32),
    (Quantizer(mode="ecsq", step=1e-4, trellis=True), (48, 64), torch.float16),          # escapes
    (Quantizer(mode="ecsq", step=0.3, trellis=True, granularity="group", group_size=16), (4, 6, 32), torch.bfloat16),
], ids=["channel", "escapes-fp16", "group16-3d"])
def test_trellis_codes_decompress_to_their_levels(q, shape, dtype):
    """Trellis codes (slc.trellis) in a CompressedTensor: every decoder gives QuantizedTensor.dequantize()."""
    from slc.tensor import decode_codes, decompress_buffers
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    w.view(-1, shape[-1])[1, 2] = 60.0
    w = w.to(dtype)
    qt = q.quantize(w)
    ref = qt.dequantize()
    ct = CompressedTensor.compress(w, q)
    assert ct.meta["quantizer"]["trellis"] is True and ct.to_bytes()[4] == 2      # ecsq's format, version 2
    if q.step < 1e-3:
        assert ct.meta["n_escapes"] > 0
    assert torch.equal(ct.decompress(), ref) and ct.decompress().dtype == dtype
    assert torch.equal(CompressedTensor.from_bytes(ct.to_bytes()).decompress(), ref)
    assert torch.equal(CompressedTensor.from_buffers(ct.buffers(), ct.meta).decompress(), ref)
    assert torch.equal(ct.decompress(backend="torch"), ref)          # the CUDA path, run on the CPU
    assert torch.equal(decompress_buffers(ct.buffers(), ct.meta), ref)
    assert torch.equal(decode_codes(ct.buffers(), ct.meta, backend="torch").to(torch.int64), qt.codes.to(torch.int64))
    plain = QuantizedTensor(qt.codes, qt.scale, None, replace(q, trellis=False), qt.original_shape, dtype)
    assert not torch.allclose(plain.dequantize().float(), ref.float(), atol=1e-2)   # the tests above can fail


def test_trellis_header_field():
    w = torch.randn(16, 32)
    plain = CompressedTensor.compress(w, Quantizer(mode="ecsq", step=0.2))
    assert "trellis" not in plain.meta["quantizer"]                 # other files are as they were
    ct = CompressedTensor.compress(w, Quantizer(mode="ecsq", step=0.2, trellis=True))
    assert CompressedTensor.from_bytes(ct.to_bytes()).quantizer.trellis
    for value in (False, "true", 1):
        meta = {**ct.meta, "quantizer": {**ct.meta["quantizer"], "trellis": value}}
        with pytest.raises(FormatError, match="trellis"):
            CompressedTensor.from_buffers(ct.buffers(), meta)

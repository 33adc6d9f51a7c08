"""Quantizer: stated error bound, dtype matrix, shapes, bad input."""
import numpy as np
import pytest
import torch

from slc import Quantizer, QuantizedTensor
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

QUANTIZERS = [
    Quantizer(bits=8),
    Quantizer(bits=8, scheme="asymmetric"),
    Quantizer(bits=4, granularity="group", group_size=32),
    Quantizer(bits=4, scheme="asymmetric", granularity="group", group_size=64),
    Quantizer(bits=2, granularity="tensor"),
    Quantizer(bits=3, granularity="channel", axis=1),
    Quantizer(bits=6, scheme="asymmetric", granularity="channel", axis=-1),
]


def _ulp_slack(w: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """Rounding the result to w's dtype adds up to half an ulp of the output (eps * |x| is a full ulp)."""
    return torch.maximum(w.float().abs(), back.float().abs()) * torch.finfo(w.dtype).eps + 1e-7


@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: q.describe())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_error_within_half_step_and_dtype_restored(q, dtype, minilm_query):
    w = minilm_query[:, :256].to(dtype)
    qt = q.quantize(w)
    back = qt.dequantize()
    assert back.dtype == dtype and back.shape == w.shape
    err = (back.float() - w.float()).abs()
    assert bool((err <= qt.max_error() * (1 + 1e-5) + _ulp_slack(w, back)).all()), float((err - qt.max_error()).max())
    assert qt.codes.dtype == (torch.uint8 if q.scheme == "asymmetric" else torch.int8)
    assert int(qt.codes.min()) >= q.qmin and int(qt.codes.max()) <= q.qmax


@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: q.describe())
def test_scale_count_matches_granularity(q):
    w = torch.randn(6, 128)
    qt = q.quantize(w)
    expected = {"tensor": 1, "channel": w.shape[q.axis], "group": w.numel() // (q.group_size or 1)}[q.granularity]
    assert qt.scale.numel() == expected
    assert qt.bits_per_weight == pytest.approx(q.bits + 8 * qt.scale_nbytes / w.numel())


def test_symbols_round_trip_codes():
    q = Quantizer(bits=5, scheme="symmetric", granularity="channel")
    qt = q.quantize(torch.randn(8, 40))
    sym = qt.symbols()
    assert sym.dtype == np.uint16 and sym.max() < 2 ** 5
    assert torch.equal(QuantizedTensor.codes_from_symbols(sym, q, qt.original_shape), qt.codes)


def test_numpy_input_and_non_contiguous_views():
    w = torch.randn(16, 64)
    q = Quantizer(bits=8)
    assert torch.equal(q.quantize(w.numpy()).dequantize(), q.quantize(w).dequantize())
    t = w.t()                                        # a transposed, non-contiguous view
    assert not t.is_contiguous()
    assert torch.equal(q.quantize(t).dequantize(), q.quantize(t.contiguous()).dequantize())


def test_all_zero_rows_are_exact():
    w = torch.zeros(4, 128)
    w[1] = torch.linspace(-1, 1, 128)
    for q in QUANTIZERS:
        own_block = q.granularity == "group" or (q.granularity == "channel" and q.axis == 0)
        if q.scheme == "symmetric" or own_block:      # zero is on every symmetric grid; a lone zero block is exact
            back = q.quantize(w).dequantize()
            assert torch.equal(back[0], w[0]), q.describe()


def test_asymmetric_hits_min_and_max_exactly():
    w = torch.tensor([[0.3, 0.7, 1.9, 2.5]])
    qt = Quantizer(bits=2, scheme="asymmetric").quantize(w)
    back = qt.dequantize()
    assert back[0, 0] == pytest.approx(0.3, abs=1e-6) and back[0, -1] == pytest.approx(2.5, abs=1e-6)


@pytest.mark.parametrize("bad, err", [
    (dict(bits=1), ValueError), (dict(bits=9), ValueError), (dict(bits=8.0), TypeError),
    (dict(scheme="log"), ValueError), (dict(granularity="row"), ValueError),
    (dict(granularity="group"), ValueError), (dict(granularity="group", group_size=0), ValueError),
    (dict(group_size=32), ValueError),
])
def test_bad_config(bad, err):
    with pytest.raises(err):
        Quantizer(**bad)


@pytest.mark.parametrize("w, err, match", [
    (torch.arange(12).reshape(3, 4), TypeError, "float"),
    (torch.randn(3, 4, dtype=torch.complex64), TypeError, "float"),
    (np.arange(4), TypeError, "float"),
    (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN"),
    (torch.tensor([[1.0, float("inf")]]), ValueError, "NaN/Inf"),
    (torch.empty(0, 8), ValueError, "empty"),
    ([1.0, 2.0], TypeError, "torch.Tensor"),
])
def test_bad_input(w, err, match):
    with pytest.raises(err, match=match):
        Quantizer().quantize(w)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        Quantizer(bits=4, granularity="group", group_size=48).quantize(torch.randn(4, 100))


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="axis"):
        Quantizer(axis=2).quantize(torch.randn(4, 4))


def test_dequantize_to_other_dtype_and_rejects_int():
    qt = Quantizer().quantize(torch.randn(4, 8))
    assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError):
        qt.dequantize(torch.int8)

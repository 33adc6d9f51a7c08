"""Lossless float mode: bit-exact for every dtype and bit pattern, and smaller than the original on real weights."""
import numpy as np
import pytest
import torch

from slc import CompressedTensor, FormatError
from slc.lossless import LosslessTensor, decompress_buffers, join_planes, plane_names, split_planes

LOSSLESS_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.element_size()])


def _nasty(dtype: torch.dtype) -> torch.Tensor:
    """Weights plus every awkward bit pattern: NaNs with payloads, +-Inf, denormals, -0.0, extremes."""
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    fi, ii = torch.finfo(dtype), torch.iinfo(_INT[dtype.itemsize])
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, fi.tiny / 4, -fi.tiny / 2,
                            fi.max, fi.min, fi.tiny, fi.eps], dtype=torch.float64).to(dtype)
    w.view(-1)[:special.numel()] = special
    b = _bits(w).clone()
    b.view(-1)[20:24] = torch.tensor([ii.max, ii.min, -1, 1], dtype=b.dtype)     # NaN payloads, -NaN, smallest denormal
    return b.view(dtype)


@pytest.mark.parametrize("dtype", LOSSLESS_DTYPES, ids=str)
def test_bit_exact_every_path(dtype):
    w = _nasty(dtype)
    lt = CompressedTensor.compress(w, lossless=True)
    assert isinstance(lt, LosslessTensor) and lt.original_dtype == dtype
    outs = [lt.decompress(), lt.decompress(backend="torch"),
            CompressedTensor.from_bytes(lt.to_bytes()).decompress(),
            CompressedTensor.from_buffers(lt.buffers(), lt.meta).decompress(),
            decompress_buffers(lt.buffers(), lt.meta)]
    for out in outs:
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(_bits(out), _bits(w))


@pytest.mark.parametrize("dtype", LOSSLESS_DTYPES, ids=str)
def test_planes_round_trip_and_names(dtype):
    w = _nasty(dtype)
    planes = split_planes(w)
    assert list(planes) == plane_names(dtype)
    assert torch.equal(_bits(join_planes(planes, dtype, w.shape)), _bits(w))
    as_torch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in planes.items()}
    assert torch.equal(_bits(join_planes(as_torch, dtype, w.shape)), _bits(w))


def test_real_minilm_bf16_is_under_075(minilm_query):
    w = minilm_query.to(torch.bfloat16)
    lt = CompressedTensor.compress(w, lossless=True)
    assert lt.nbytes < 0.75 * w.numel() * 2, lt.ratio
    assert lt.ratio == lt.nbytes / (w.numel() * 2)
    report = {r["plane"]: r for r in lt.plane_report()}
    assert report["exp"]["coded"] and report["exp"]["bits_per_weight"] < 3.2     # ~2.6 bits of exponent entropy
    assert torch.equal(_bits(lt.decompress()), _bits(w))


def test_incompressible_planes_stay_raw():
    """Uniform random bits gain nothing: planes are kept raw, so the size never balloons."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-2 ** 15, 2 ** 15, (128, 64), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    lt = LosslessTensor.compress(w)
    assert not any(r["coded"] for r in lt.plane_report())
    assert lt.nbytes <= w.numel() * 2 + 200
    assert torch.equal(_bits(lt.decompress()), _bits(w))


def test_corrupt_or_mismatched_input_raises():
    lt = LosslessTensor.compress(torch.randn(32, 32).to(torch.bfloat16))
    data = bytearray(lt.to_bytes())
    for bad in (bytes(data[:-1]), bytes(data[:12]), b"XXXX" + bytes(data[4:])):
        with pytest.raises(FormatError):
            CompressedTensor.from_bytes(bad)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x08
    with pytest.raises(FormatError):
        CompressedTensor.from_bytes(bytes(flipped))
    b = lt.buffers()
    with pytest.raises(FormatError):
        LosslessTensor.from_buffers({k: v for k, v in b.items() if not k.startswith("exp")}, lt.meta)
    with pytest.raises(FormatError):
        LosslessTensor.from_buffers(b, {**lt.meta, "dtype": "float16"})


@pytest.mark.parametrize("bad, err", [
    (dict(tensor=torch.arange(6)), TypeError),
    (dict(tensor=torch.empty(0)), ValueError),
    (dict(tensor=torch.randn(2, 2), quantizer=__import__("slc").Quantizer()), ValueError),
])
def test_bad_input(bad, err):
    with pytest.raises(err):
        CompressedTensor.compress(**bad, lossless=True)


def test_buffers_are_valid_module_buffers():
    lt = LosslessTensor.compress(torch.randn(16, 32, dtype=torch.float16))
    m = torch.nn.Module()
    for k, v in lt.buffers().items():
        m.register_buffer(k, v)                        # no dots in the names
    assert torch.equal(decompress_buffers(dict(m.named_buffers()), lt.meta).view(torch.int16),
                       lt.decompress().view(torch.int16))

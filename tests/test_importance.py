"""slc.importance: activation-weighted scales on slc's own grids, same stored format, less weighted error."""
import pytest
import torch

from slc import CompressedLinear, CompressedTensor, LinearSpec, Quantizer
from slc.gptq import gptq
from slc.importance import compress_model_weighted, weighted_error, weighted_quantize
from slc.models import ByteTokenizer, tiny_model

QUANTIZERS = [
    Quantizer(bits=4, granularity="group", group_size=32),
    Quantizer(bits=3, granularity="channel"),
    Quantizer(bits=8, granularity="channel"),
    Quantizer(mode="ecsq", step=0.3),
    Quantizer(mode="ecsq", step=0.2, granularity="group", group_size=64),
    Quantizer(mode="ecsq", step=0.16, trellis=True),
]


def _case(seed=0, rows=48, cols=128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    imp = torch.rand(cols, generator=g) ** 6 + 1e-3              # a few columns matter much more
    return w, imp


@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: q.describe())
def test_same_grid_less_weighted_error(q):
    w, imp = _case()
    plain, qt = q.quantize(w), weighted_quantize(w, q, imp)
    assert qt.quantizer == q and qt.codes.dtype == plain.codes.dtype and qt.scale.shape == plain.scale.shape
    assert weighted_error(w, qt, imp) < weighted_error(w, plain, imp)
    if q.mode == "affine":
        assert int(qt.codes.min()) >= q.qmin and int(qt.codes.max()) <= q.qmax
    ct = CompressedTensor.from_quantized(qt)                       # stored and decoded like any other
    assert torch.equal(ct.decompress(), qt.dequantize())
    if q.mode == "ecsq":                                           # rate-neutral: within a few % of one step
        r0 = CompressedTensor.from_quantized(plain).bits_per_weight
        assert abs(ct.bits_per_weight / r0 - 1) < 0.05


def test_uniform_importance_is_plain_weight_error_and_per_weight_importance_works():
    w, _ = _case(1)
    q = QUANTIZERS[0]
    ones = torch.ones(w.shape[1])
    assert weighted_error(w, weighted_quantize(w, q, ones), ones) <= weighted_error(w, q.quantize(w), ones)
    full = torch.rand(w.shape, generator=torch.Generator().manual_seed(2))
    assert weighted_error(w, weighted_quantize(w, q, full), full) < weighted_error(w, q.quantize(w), full)


def test_gptq_on_weighted_scales_and_from_quantized():
    w, imp = _case(3)
    x = torch.randn(512, w.shape[1]) * imp.sqrt()
    cov = x.T.double() @ x.double()
    q = QUANTIZERS[3]
    grid = weighted_quantize(w, q, imp)
    g = gptq(w, cov, q, grid=grid)
    assert torch.equal(g.scale, grid.scale)
    layer = CompressedLinear.from_quantized(g, LinearSpec("entropy", q))
    assert torch.allclose(layer.weight_dense(torch.float32), g.dequantize())
    with pytest.raises(ValueError, match="grid"):
        gptq(w, cov, QUANTIZERS[4], grid=grid)


def test_bad_input_is_named():
    w, imp = _case()
    with pytest.raises(ValueError, match="importance must be"):
        weighted_quantize(w, QUANTIZERS[0], imp[:10])
    with pytest.raises(ValueError, match=">= 0"):
        weighted_quantize(w, QUANTIZERS[0], -imp)
    with pytest.raises(ValueError, match="symmetric"):
        weighted_quantize(w, Quantizer(bits=4, scheme="asymmetric"), imp)


_tok = ByteTokenizer()


@pytest.mark.parametrize("use_gptq", [False, True])
def test_compress_model_weighted_tiny(use_gptq):
    model = tiny_model("llama")
    spec = LinearSpec("entropy", Quantizer(mode="ecsq", step=0.3))
    report = compress_model_weighted(model, _tok, spec, "some calibration text " * 20, max_tokens=128,
                                     use_gptq=use_gptq)
    assert report.rows and all(isinstance(m, CompressedLinear) for n, m in model.named_modules()
                                if n.endswith(("q_proj", "down_proj")))
    out = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="importance"):
        compress_model_weighted(tiny_model("llama"), _tok, spec, "text " * 20, importance="hessian")

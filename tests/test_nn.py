"""CompressedLinear and LinearSpec: every storage kind against the dense layer it replaces."""
import copy
import doctest
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slc.nn
from slc.errors import FormatError
from slc.models import tiny_model
from slc.nn import CompressedEmbedding, CompressedLinear, DecodeCache, LinearSpec, TiedLinear, check_meta
from slc.quant import QuantizedTensor, Quantizer
from slc.rotation import Rotation
from slc.tensor import check_header

IN, OUT = 64, 48

# One list of configurations; every test below runs over it. The bound is on the relative error of the
# *effective weight* against the original, ||W_hat - W||_F / ||W||_F, for a N(0, 1) weight.
SPECS = [
    pytest.param(LinearSpec(), 0.01, id="int8-channel"),
    pytest.param(LinearSpec(quantizer=Quantizer(scheme="asymmetric")), 0.01, id="int8-asym"),
    pytest.param(LinearSpec(quantizer=Quantizer(bits=4, granularity="group", group_size=16)), 0.15, id="int4-group16"),
    pytest.param(LinearSpec("entropy"), 0.01, id="int8+rans"),
    pytest.param(LinearSpec("entropy", quantizer=Quantizer(bits=4, granularity="group", group_size=16)), 0.15,
                 id="int4+rans"),
    pytest.param(LinearSpec("entropy", quantizer=Quantizer(mode="ecsq", step=0.1)), 0.05, id="ecsq+rans"),
    pytest.param(LinearSpec("lowrank", rank=min(IN, OUT)), 1e-5, id="lowrank-full"),
    pytest.param(LinearSpec("lowrank", rank=min(IN, OUT), factor_quantizer=Quantizer()), 0.02, id="lowrank-full-int8"),
    pytest.param(LinearSpec("lowrank", energy=0.5), 0.75, id="lowrank-energy0.5"),
]


pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


def make_linear(dtype=torch.float32, bias=True, seed=0, in_f=IN, out_f=OUT):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("spec,bound", SPECS)
def test_forward_uses_the_effective_weight_and_weight_error_is_bounded(spec, bound):
    lin = make_linear()
    cl = CompressedLinear.from_linear(lin, spec)
    x = torch.randn(5, IN)
    w_hat = cl.weight_dense()
    assert w_hat.dtype == torch.float32 and w_hat.shape == (OUT, IN)
    assert rel(cl(x), F.linear(x, w_hat, lin.bias)) < 1e-5            # forward == the weight it reports
    assert rel(w_hat, lin.weight.detach()) <= bound
    if spec.kind != "lowrank":                                         # lossless coder: exactly the quantiser's values
        assert torch.equal(w_hat, spec.quantizer.quantize(lin.weight.detach()).dequantize())


@pytest.mark.parametrize("spec,bound", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_dtype_follows_the_input(spec, bound, dtype):
    cl = CompressedLinear.from_linear(make_linear(), spec)
    x = torch.randn(3, 7, IN)
    y32 = cl(x)
    y = cl(x.to(dtype))
    assert y.dtype == dtype and y.shape == (3, 7, OUT)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]   # a few ulps of the dtype
    assert rel(y, y32) < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer_keeps_its_dtype(dtype):
    lin = make_linear(dtype)
    for spec in (LinearSpec(), LinearSpec("entropy"), LinearSpec("lowrank", rank=8)):
        cl = CompressedLinear.from_linear(lin, spec)
        assert cl.weight_dense().dtype == dtype and cl.dtype == dtype
        assert cl(torch.randn(2, IN, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("rows,in_f", [(1, 64), (16, 64), (17, 64), (1, 40), (4, 24)])
def test_int8_paths_agree_with_dequantise_then_matmul(rows, in_f):
    """bf16 with <= 16 rows and in % 32 == 0 takes torch's int8 kernel; the other shapes must not (it misreads them)."""
    lin = make_linear(in_f=in_f)
    cl = CompressedLinear.from_linear(lin, LinearSpec())
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5), (torch.float16, 2e-3)):
        x = torch.randn(rows, in_f).to(dtype)
        ref = F.linear(x.double(), cl.weight_dense(torch.float64), lin.bias.detach().double())
        assert rel(cl(x), ref) < tol


def test_conv1d_from_tiny_gpt2_matches_the_dense_layer():
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].attn.c_attn                          # Conv1D: weight is (in, out)
    x = torch.randn(2, 5, conv.nx)
    cl = CompressedLinear.from_linear(conv, LinearSpec())
    assert cl.shape == (conv.nf, conv.nx)
    assert torch.equal(cl.weight_dense(), Quantizer().quantize(conv.weight.detach().T).dequantize())
    with torch.no_grad():
        assert rel(cl(x), conv(x)) < 0.01                              # int8 per channel on a 0.02-std init
    full = CompressedLinear.from_linear(conv, LinearSpec("lowrank", rank=min(conv.nf, conv.nx)))
    with torch.no_grad():
        assert rel(full(x), conv(x)) < 1e-5


@pytest.mark.parametrize("spec,bound", SPECS)
def test_state_dict_round_trip_and_skeleton(spec, bound):
    cl = CompressedLinear.from_linear(make_linear(), spec)
    x = torch.randn(4, IN)
    state = cl.state_dict()
    assert set(state) == set(cl.export_meta()["buffers"])
    skeleton = CompressedLinear.from_meta(cl.export_meta())            # meta device: no data
    skeleton.load_state_dict(state, assign=True)
    assert torch.equal(skeleton(x), cl(x))
    assert {k: v.dtype for k, v in skeleton.state_dict().items()} == {k: v.dtype for k, v in state.items()}
    other = CompressedLinear.from_meta(cl.export_meta(), device="cpu")
    other.load_state_dict(state)
    assert torch.equal(other(x), cl(x))


def test_to_keeps_the_stored_format_and_eval_works():
    cl = CompressedLinear.from_linear(make_linear(), LinearSpec())
    x = torch.randn(2, IN)
    y = cl(x)
    cl = cl.to(torch.float16)                                          # like model.half()
    assert cl.codes.dtype == torch.int8 and cl.scale.dtype == torch.float32 and cl.bias.dtype == torch.float16
    assert rel(cl(x.half()), y) < 2e-3
    assert cl.eval() is cl and not cl.training
    seq = nn.Sequential(cl, nn.ReLU()).to(torch.float32).eval()
    assert seq(x).dtype == torch.float32


def test_sizes_and_extra_repr():
    cl = CompressedLinear.from_linear(make_linear(), LinearSpec())
    assert cl.nbytes == OUT * IN + 4 * OUT                             # int8 codes + one float32 scale per row
    assert cl.bits_per_weight == pytest.approx(8 + 32 / IN)
    int4 = CompressedLinear.from_linear(make_linear(),
                                        LinearSpec(quantizer=Quantizer(bits=4, granularity="group", group_size=16)))
    assert int4.codes.dtype == torch.uint8 and int4.codes.numel() == OUT * IN // 2    # two codes per byte
    assert int4.bits_per_weight == pytest.approx(4 + 32 / 16)
    text = repr(CompressedLinear.from_linear(make_linear(), LinearSpec("entropy")))
    assert ("entropy" in text and f"in_features={IN}" in text and f"out_features={OUT}" in text
            and "bits/weight=" in text)
    assert "rank=5" in repr(CompressedLinear.from_linear(make_linear(), LinearSpec("lowrank", rank=5)))


def test_entropy_decodes_on_demand_and_counts():
    cl = CompressedLinear.from_linear(make_linear(), LinearSpec("entropy"))
    x = torch.randn(2, IN)
    assert cl.n_decodes == 0
    cl(x), cl(x)
    assert cl.n_decodes == 2 and cl.decode_seconds > 0
    assert not any(b.dtype in (torch.float16, torch.bfloat16) or b.numel() == OUT * IN
                   for k, b in cl.state_dict().items() if k not in ("bias",))        # nothing decoded is kept


@pytest.mark.parametrize("quantizer", [Quantizer(),
                                       Quantizer(bits=4, scheme="asymmetric", granularity="group", group_size=16),
                                       Quantizer(mode="ecsq", step=0.05)], ids=["int8", "uint4-group", "ecsq"])
def test_torch_decoder_gives_the_same_weight(quantizer):
    """The GPU path (rans.decode_torch), run on the CPU: bit-identical to the numba decoder."""
    cl = CompressedLinear.from_linear(make_linear(), LinearSpec("entropy", quantizer=quantizer))
    w = cl.weight_dense()
    cl.decode_backend = "torch"
    assert torch.equal(cl.weight_dense(), w)


def test_activation_aware_lowrank_layer():
    lin = make_linear(bias=False)
    x = torch.randn(512, IN) * torch.logspace(-2, 1, IN)
    cov = x.T @ x / len(x)
    plain = CompressedLinear.from_linear(lin, LinearSpec("lowrank", rank=8))
    aware = CompressedLinear.from_linear(lin, LinearSpec("lowrank", rank=8), x_cov=cov)
    assert aware.meta["whitened"] and rel(aware(x), lin(x)) < 0.8 * rel(plain(x), lin(x))
    with pytest.raises(ValueError, match="x_cov only applies"):
        CompressedLinear.from_linear(lin, LinearSpec(), x_cov=cov)


def test_decode_cache_shared_under_a_byte_budget():
    big = DecodeCache(max_bytes=10 * OUT * IN)
    layers = [CompressedLinear.from_linear(make_linear(seed=i), LinearSpec("entropy", cache=big)) for i in range(3)]
    x = torch.randn(2, IN)
    first = [layer(x) for layer in layers]
    again = [layer(x) for layer in layers]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert [layer.n_decodes for layer in layers] == [1, 1, 1] and big.hits == 3 and len(big) == 3

    small = DecodeCache(max_bytes=2 * OUT * IN)                         # room for two layers' int8 codes
    layers = [CompressedLinear.from_linear(make_linear(seed=i), LinearSpec("entropy", cache=small))
              for i in range(3)]
    for layer in layers:
        layer(x)
        assert small.nbytes <= small.max_bytes
    assert len(small) == 2
    layers[0](x)                                                       # evicted (least recently used): decoded again
    assert layers[0].n_decodes == 2
    layers[2](x)                                                       # still cached
    assert layers[2].n_decodes == 1
    layers[2].to(torch.float32)                                        # moving a layer drops its entry
    assert layers[2]._uid not in small._items
    # same cache key, other words tensor: decodes its own
    twin = copy.deepcopy(layers[1])
    twin(x)
    assert twin.n_decodes == layers[1].n_decodes + 1


def test_spec_validation_says_what_to_do():
    with pytest.raises(ValueError, match="kind"):
        LinearSpec("sparse")
    with pytest.raises(ValueError, match="exactly one of rank"):
        LinearSpec("lowrank")
    with pytest.raises(ValueError, match="exactly one of rank"):
        LinearSpec("lowrank", rank=4, energy=0.9)
    with pytest.raises(ValueError, match="only apply to kind='lowrank'"):
        LinearSpec("quantized", rank=4)
    with pytest.raises(ValueError, match=r"energy=1.5"):
        LinearSpec("lowrank", energy=1.5)
    with pytest.raises(TypeError, match="Quantizer"):
        LinearSpec(quantizer="int8")
    with pytest.raises(ValueError, match=r"use 1\.\.48"):
        CompressedLinear.from_linear(make_linear(), LinearSpec("lowrank", rank=100))
    with pytest.raises(TypeError, match="Linear"):
        CompressedLinear.from_linear(nn.Conv2d(3, 3, 1), LinearSpec())
    spec = LinearSpec("lowrank", error=0.2, factor_quantizer=Quantizer(bits=8))
    assert LinearSpec.from_dict(spec.to_dict()) == spec


def test_check_meta_rejects_inconsistent_layouts():
    meta = CompressedLinear.from_linear(make_linear(), LinearSpec()).export_meta()
    check_meta(meta)
    for bad in ({**meta, "kind": "zip"}, {**meta, "in_features": 0},
                {**meta, "buffers": {**meta["buffers"], "codes": ["int16", [OUT, IN]]}},
                {**meta, "buffers": {**meta["buffers"], "codes": ["int8", [OUT, IN + 1]]}},
                {k: v for k, v in meta.items() if k != "buffers"}):
        with pytest.raises(FormatError):
            check_meta(bad)


@pytest.mark.parametrize("quantizer", [Quantizer(),
                                       Quantizer(bits=4, scheme="asymmetric", granularity="group", group_size=16)],
                         ids=["int8-row", "uint4-group"])
def test_compressed_embedding_and_tied_head(quantizer):
    torch.manual_seed(0)
    emb = nn.Embedding(100, IN)
    ce = CompressedEmbedding.from_embedding(emb, LinearSpec(quantizer=quantizer))
    table = quantizer.quantize(emb.weight.detach()).dequantize()
    assert torch.equal(ce.weight_dense(), table)
    ids = torch.tensor([[0, 5, 99], [5, 5, 1]])
    assert torch.equal(ce(ids), table[ids])                            # only the looked-up rows are dequantised
    head = TiedLinear(ce)
    x = torch.randn(3, IN)
    assert rel(head(x), x @ table.T) < 1e-5
    assert list(head.state_dict()) == [] and not list(head.children())  # the table is held once, by the embedding
    skeleton = CompressedEmbedding.from_meta(ce.export_meta())
    skeleton.load_state_dict(ce.state_dict(), assign=True)
    assert torch.equal(skeleton(ids), ce(ids))
    ce.half()
    assert ce(ids).dtype == torch.float16 and ce.scale.dtype == torch.float32
    with pytest.raises(ValueError, match="kind 'quantized'"):
        CompressedEmbedding.from_embedding(emb, LinearSpec("entropy"))
    with pytest.raises(ValueError, match="every row has its own scales"):
        CompressedEmbedding.from_embedding(emb, LinearSpec(quantizer=Quantizer(granularity="tensor")))


def test_big_int8_weight_is_multiplied_in_row_blocks():
    """Past 4 MiB of floats (an lm_head) the codes are converted 1024 rows at a time; same result."""
    lin = make_linear(out_f=2100, in_f=512, bias=False)
    cl = CompressedLinear.from_linear(lin, LinearSpec())
    x = torch.randn(2, 3, 512)
    assert rel(cl(x), F.linear(x.double(), cl.weight_dense(torch.float64))) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_entropy_decodes_on_the_gpu():
    cl = CompressedLinear.from_linear(make_linear(), LinearSpec("entropy"))
    x = torch.randn(4, IN)
    y_cpu, w_cpu = cl(x), cl.weight_dense()
    gpu = cl.to("cuda")
    assert gpu.words.is_cuda and gpu.words.dtype == torch.int16
    assert torch.equal(gpu.weight_dense().cpu(), w_cpu)                # the torch decoder gives the same codes
    assert rel(gpu(x.cuda()).cpu(), y_cpu) < 1e-4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    gpu(x.cuda())
    assert torch.cuda.memory_allocated() - held < OUT * IN * 4 // 2    # decoded weight is transient, not kept


def test_docstring_examples():
    assert doctest.testmod(slc.nn).failed == 0


# --- trellis codes (Quantizer(trellis=True), slc.trellis): every decode path gives QuantizedTensor's weights ------

TCQ = Quantizer(mode="ecsq", step=0.2, trellis=True)


def spiky(out_f, in_f, seed=0):
    """A N(0, 1) weight with two outliers far out (at fine steps their codes escape the 16-bit alphabet)."""
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    w[3, 5], w[out_f - 7, 11] = 40.0, -55.0
    return w


def without_trellis(qt):
    """The same codes read as plain ECSQ codes: what a decoder that ignored the trellis would compute."""
    return QuantizedTensor(qt.codes, qt.scale, None, replace(qt.quantizer, trellis=False), qt.original_shape,
                           qt.original_dtype).dequantize()


@pytest.mark.parametrize("q,shape,layout", [
    (Quantizer(mode="ecsq", step=1e-4, trellis=True), (600, 256), None),        # escapes, several tiles
    (Quantizer(mode="ecsq", step=0.3, trellis=True, granularity="group", group_size=32), (96, 128), None),
    (Quantizer(mode="ecsq", step=1e-4, trellis=True), (300, 96), "stream"),     # one rANS stream, escapes
], ids=["tiled-escapes", "tiled-group32", "stream-escapes"])
def test_trellis_entropy_layer_forward_equals_the_quantised_weight(q, shape, layout):
    qt = q.quantize(spiky(*shape))
    ref = qt.dequantize()
    assert not torch.allclose(without_trellis(qt), ref, atol=1e-3)  # the checks below can tell the two apart
    bias = torch.randn(shape[0])
    cl = CompressedLinear.from_quantized(qt, LinearSpec("entropy", quantizer=q, predictor="none", layout=layout), bias)
    t = cl.meta["tensor"]
    assert cl.tiled == (layout is None) and (t.get("trellis") is True if cl.tiled else t["quantizer"]["trellis"])
    if q.step < 1e-3:
        assert t["n_escapes"] >= 2
    if cl.tiled and shape[0] > 500:
        assert cl.tile_rows.numel() >= 4                             # three tiles or more
    assert torch.equal(cl.weight_dense(), ref)
    xs = [torch.randn(1, shape[1]), torch.randn(40, shape[1]), torch.randn(2, 3, shape[1])]
    for backend in ("auto", "torch"):                                # CPU kernels; the GPU decoder run on the CPU
        cl.decode_backend = backend
        assert torch.equal(cl.weight_dense(), ref)
        for x in xs:
            torch.testing.assert_close(cl(x), F.linear(x, ref, bias), rtol=1e-5, atol=1e-4)
    cl.decode_backend, cl.cache = "auto", DecodeCache(1 << 24)      # decoded codes from the cache, then int_linear
    for _ in range(2):
        torch.testing.assert_close(cl(xs[0]), F.linear(xs[0], ref, bias), rtol=1e-5, atol=1e-4)
    assert cl.cache.hits == 1
    cl.cache = None
    state = cl.state_dict()
    again = CompressedLinear.from_meta(cl.export_meta())
    again.load_state_dict(state, assign=True)
    slc.nn.validate_loaded(again)
    assert torch.equal(again(xs[0]), cl(xs[0])) and torch.equal(again.weight_dense(), ref)


def test_trellis_quantized_rotated_and_embedding_layers():
    lin = make_linear(in_f=64, out_f=48)
    w = lin.weight.detach()
    x = torch.randn(5, 64)
    qt = TCQ.quantize(w)
    quantized = CompressedLinear.from_linear(lin, LinearSpec("quantized", quantizer=TCQ))
    assert torch.equal(quantized.weight_dense(), qt.dequantize())
    torch.testing.assert_close(quantized(x), F.linear(x, qt.dequantize(), lin.bias), rtol=1e-5, atol=1e-5)
    for kind in ("quantized", "entropy"):                            # W R stored; forward rotates x
        cl = CompressedLinear.from_linear(lin, LinearSpec(kind, quantizer=TCQ, predictor="none", rotate="hadamard"))
        rot = Rotation(64, 0)
        wr = TCQ.quantize(rot.apply(w.double()).float()).dequantize(torch.float64)
        w_eff = rot.apply(wr, inverse=True)
        torch.testing.assert_close(cl.weight_dense(torch.float64), w_eff, rtol=0, atol=1e-12)
        for rows in (1, 40):
            xr = torch.randn(rows, 64)
            torch.testing.assert_close(cl(xr).double(), F.linear(xr.double(), w_eff, lin.bias.double()),
                                       rtol=1e-5, atol=1e-4)
    emb = nn.Embedding(100, 32)
    ce = CompressedEmbedding.from_embedding(emb, LinearSpec(quantizer=TCQ))
    table = TCQ.quantize(emb.weight.detach()).dequantize()
    ids = torch.tensor([[3, 7, 99, 3]])
    assert torch.equal(ce(ids), table[ids])                          # gathered rows are whole rows: scanned alone
    torch.testing.assert_close(TiedLinear(ce)(x[:, :32]), x[:, :32] @ table.T, rtol=1e-5, atol=1e-5)


def test_trellis_headers_are_checked_and_huge_codes_refused():
    cl = CompressedLinear.from_quantized(TCQ.quantize(spiky(48, 64)), LinearSpec("entropy", quantizer=TCQ))
    plain = CompressedLinear.from_linear(make_linear(), LinearSpec("entropy", Quantizer(mode="ecsq", step=0.2)))
    assert "trellis" not in plain.meta["tensor"] and "trellis" not in plain.meta["quantizer"]   # files as before
    for t in ({k: v for k, v in cl.meta["tensor"].items() if k != "trellis"}, {**cl.meta["tensor"], "trellis": 1}):
        bad = CompressedLinear(cl.export_meta() | {"tensor": t}, dict(cl.named_buffers()))
        with pytest.raises(FormatError, match="trellis"):
            slc.nn.validate_loaded(bad)
    stream = CompressedLinear.from_quantized(TCQ.quantize(spiky(48, 64)), LinearSpec("entropy", quantizer=TCQ,
                                                                                      layout="stream"))
    t = stream.meta["tensor"]
    for qd in ({**t["quantizer"], "trellis": False}, {**t["quantizer"], "trellis": "yes"}):
        with pytest.raises(FormatError, match="trellis"):
            check_header({**t, "quantizer": qd})
    codes = TCQ.quantize(spiky(8, 64)).codes.to(torch.int32)
    codes[2, 3] = 2 ** 24 + 1                                        # float32 cannot hold it (nor its parity)
    qt = QuantizedTensor(codes, torch.ones(8, 1), None, TCQ, (8, 64), torch.float32)
    with pytest.raises(ValueError, match="layout='stream'"):
        CompressedLinear.from_quantized(qt, LinearSpec("entropy", quantizer=TCQ))
    cl = CompressedLinear.from_quantized(qt, LinearSpec("entropy", quantizer=TCQ, layout="stream"))
    assert torch.equal(cl.weight_dense(), qt.dequantize())
    x = torch.randn(1, 64, dtype=torch.float64)
    torch.testing.assert_close(cl(x), F.linear(x, qt.dequantize(torch.float64)))


def test_trellis_model_saves_and_loads(tmp_path):
    from slc.checkpoint import load_compressed, save_compressed
    from slc.compress import compress_model
    model = tiny_model("llama")
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    policy = {"*q_proj": LinearSpec("entropy", TCQ, predictor="none", layout="stream"),
              "*k_proj": LinearSpec("quantized", TCQ),
              "*o_proj": LinearSpec("entropy", TCQ, predictor="none", rotate="hadamard"),
              "*": LinearSpec("entropy", TCQ, predictor="none")}
    compress_model(model, policy, progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.tiled and torch.equal(layer.weight_dense(),
                                       TCQ.quantize(dense["model.layers.0.mlp.down_proj"]).dequantize())
    ids = torch.arange(1, 30).reshape(1, -1)
    with torch.inference_mode():
        before = model(ids).logits
        one = model(ids[:, :1]).logits
    loaded = load_compressed(save_compressed(model, tmp_path / "t.slc"))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, before) and torch.equal(loaded(ids[:, :1]).logits, one)
    for name, m in loaded.named_modules():
        if isinstance(m, CompressedLinear):
            assert m.quantizer.trellis and torch.equal(m.weight_dense(), model.get_submodule(name).weight_dense()), name
            x = torch.randn(1, m.in_features)                       # the loaded layer's own path (fused where tiled)
            torch.testing.assert_close(m(x), F.linear(x, m.weight_dense(), m.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trellis_layer_on_the_gpu():
    qt = TCQ.quantize(spiky(96, 64))
    ref = qt.dequantize()
    x = torch.randn(3, 64)
    for layout in (None, "stream"):                                  # slc.fused's torch decoder; decode_codes + levels
        cl = CompressedLinear.from_quantized(qt, LinearSpec("entropy", quantizer=TCQ, layout=layout)).to("cuda")
        assert torch.equal(cl.weight_dense().cpu(), ref)
        torch.testing.assert_close(cl(x.cuda()).cpu(), F.linear(x, ref), rtol=1e-4, atol=1e-4)

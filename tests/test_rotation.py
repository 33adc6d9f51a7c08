"""slc.rotation: randomised block-Hadamard rotations are orthogonal, seeded, and undo exactly; rotated layers
(LinearSpec(rotate="hadamard")) multiply exactly with the rotated weight, save and load, allocate and GPTQ."""
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from slc.allocate import allocate, rate_distortion
from slc.checkpoint import file_version, load_compressed, read_meta, save_compressed
from slc.compress import compress_model, compress_model_gptq, compressed_layers, selected_specs
from slc.errors import FormatError
from slc.gptq import gptq
from slc.importance import compress_model_weighted
from slc.models import tiny_model
from slc.nn import CompressedEmbedding, CompressedLinear, LinearSpec
from slc.quant import Quantizer
from slc.rotation import MAX_BLOCK, Rotation, block_size, hadamard, rotate_stats, rotation


@pytest.mark.parametrize("width,block", [(576, 64), (1536, 512), (384, 128), (64, 64), (96, 32)])
def test_orthogonal_and_exactly_undone(width, block):
    assert block_size(width) == block
    r = rotation(width, seed=1)
    assert torch.allclose(r.T @ r, torch.eye(width, dtype=torch.float64), atol=1e-12)
    assert torch.equal(r, rotation(width, seed=1)) and not torch.equal(r, rotation(width, seed=2))
    w, x = torch.randn(8, width, dtype=torch.float64), torch.randn(5, width, dtype=torch.float64)
    assert torch.allclose((x @ r) @ (w @ r).T, x @ w.T, atol=1e-10)          # (W R)(R^T x) = W x
    c = x.T @ x
    assert torch.allclose(rotate_stats(c, r), ((x @ r) ** 2).sum(0))


def test_widths_without_a_power_of_two_factor_are_refused():
    with pytest.raises(ValueError, match="leave this layer unrotated"):
        rotation(45)
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)


# --- the fast transform -----------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(odd=st.sampled_from([1, 3, 5, 7]), log_two=st.integers(1, 10), seed=st.integers(0, 2**63 - 1),
       rows=st.integers(1, 5))
def test_fast_transform_is_the_explicit_matrix(odd, log_two, seed, rows):
    width = odd << log_two
    assume(width <= 2048)                                           # the explicit matrix stays small
    rot, r = Rotation(width, seed), rotation(width, seed)
    assert rot.block == min(1 << log_two, MAX_BLOCK)
    x = torch.randn(rows, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed % 1000))
    assert torch.allclose(rot.apply(x), x @ r, atol=1e-12)
    assert torch.allclose(rot.apply(x, inverse=True), x @ r.T, atol=1e-12)
    c = x.T @ x
    assert torch.allclose(rot.conjugate(c), r.T @ c @ r, atol=1e-10)
    assert torch.allclose(rotate_stats(c, rot), rotate_stats(c, r), atol=1e-10)
    assert torch.equal(rot.matrix(), rot.apply(torch.eye(width, dtype=torch.float64)))
    xf = x.float().reshape(rows, 1, width)                          # any leading dims, float32 and bf16 stay so
    assert rot.apply(xf).shape == xf.shape and rot.apply(xf).dtype == torch.float32
    assert rot.apply(xf.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [{"kind": "hadamard", "seed": 0, "block": 48}, {"kind": "hadamard", "seed": 0,
                                 "block": 1024}, {"kind": "hadamard", "seed": "0", "block": 64},
                                 {"kind": "hadamard", "seed": -1, "block": 64}, {"kind": "hadamard", "seed": 1.0,
                                 "block": 64}, {"kind": "hadamard", "seed": True, "block": 64},
                                 {"kind": "givens", "seed": 0, "block": 64}, {"kind": "hadamard", "seed": 0},
                                 {"kind": "hadamard", "seed": 0, "block": 64, "matrix": [1]}, [0, 64], None])
def test_rotation_metadata_is_validated(bad):
    with pytest.raises((ValueError, TypeError)):
        Rotation.from_dict(bad, 576)


# --- rotated CompressedLinear -------------------------------------------------------------------------

G32 = Quantizer(bits=4, granularity="group", group_size=32)
ROTATED = [LinearSpec(rotate="hadamard"), LinearSpec("quantized", G32, rotate="hadamard"),
           LinearSpec("entropy", rotate="hadamard"),                                      # tiled (fused path)
           LinearSpec("entropy", Quantizer(mode="ecsq", step=0.2), rotate="hadamard", rotate_seed=7),
           LinearSpec("entropy", G32, rotate="hadamard", layout="stream", predictor="none")]


@pytest.mark.parametrize("spec", ROTATED, ids=lambda s: s.describe())
@pytest.mark.parametrize("rows", [1, 9])
def test_rotated_layer_multiplies_with_the_rotated_weight(spec, rows):
    torch.manual_seed(0)
    lin = nn.Linear(576, 48)
    x = torch.randn(rows, 576)
    cl = CompressedLinear.from_linear(lin, spec)
    rot = Rotation(576, spec.rotate_seed)
    assert cl.rotation == rot and cl.meta["rotation"] == {"kind": "hadamard", "seed": spec.rotate_seed, "block": 64}
    qt = cl.quantized()                                             # the stored weight is W R ...
    assert torch.equal(qt.codes, spec.quantizer.quantize(rot.apply(lin.weight.detach().double()).float()).codes)
    plain = CompressedLinear.from_quantized(qt, replace(spec, rotate=None), lin.bias)
    with torch.no_grad():
        y = cl(x)
        assert torch.equal(y, plain(rot.apply(x)))                  # ... and forward is exactly W_hat (R^T x)
        r = rot.matrix()
        ref = x.double() @ r @ qt.dequantize(torch.float64).T + lin.bias.double()
        assert torch.allclose(y.double(), ref, atol=1e-4)
        assert torch.allclose(cl.weight_dense(torch.float64), qt.dequantize(torch.float64) @ r.T, atol=1e-12)
        err = (y - lin(x)).norm() / lin(x).norm()
    assert err < (0.01 if spec.quantizer.bits == 8 and spec.quantizer.mode == "affine" else 0.15)
    assert cl.tiled == spec.tiled and "rotate=hadamard(block=64" in repr(cl)


def test_rotated_forward_keeps_dtype_and_moves():
    cl = CompressedLinear.from_linear(nn.Linear(96, 16), LinearSpec("entropy", rotate="hadamard"))
    x = torch.randn(2, 96)
    y = cl(x)
    assert torch.allclose(cl.double()(x.double()), y.double(), atol=1e-5) and cl(x.double()).dtype == torch.float64
    half = cl.half()(x.half())
    assert half.dtype == torch.float16 and torch.allclose(half.float(), y, atol=2e-2)
    assert cl.bfloat16()(x.bfloat16()).dtype == torch.bfloat16


def test_spec_round_trip_and_old_specs_unchanged():
    spec = LinearSpec("entropy", Quantizer(mode="ecsq", step=0.3), rotate="hadamard", rotate_seed=5)
    assert LinearSpec.from_dict(spec.to_dict()) == spec and "rotated" in spec.describe()
    assert "rotate" not in LinearSpec().to_dict() and LinearSpec.from_dict(LinearSpec().to_dict()).rotate is None
    with pytest.raises(ValueError, match="rotate="):
        LinearSpec(rotate="givens")
    with pytest.raises(ValueError, match="low-rank"):
        LinearSpec("lowrank", rank=2, rotate="hadamard")
    with pytest.raises(ValueError, match="rotate_seed"):
        LinearSpec(rotate="hadamard", rotate_seed=-1)
    with pytest.raises(ValueError, match="unrotated"):
        CompressedEmbedding.from_embedding(nn.Embedding(10, 32), LinearSpec(rotate="hadamard"))


def test_a_width_the_rotation_cannot_cover_names_the_layer():
    net = nn.Sequential(nn.Linear(64, 45), nn.ReLU(), nn.Linear(45, 8))
    with pytest.raises(ValueError, match=r"^2: width 45 has no power-of-two factor"):
        compress_model(net, LinearSpec(rotate="hadamard"), progress=False)
    with pytest.raises(ValueError, match="width 45"):
        rate_distortion(net, None, rotate="hadamard")


# --- in a model: save, load, allocate, GPTQ -------------------------------------------------------------

def tok(text, return_tensors="pt"):
    return SimpleNamespace(input_ids=torch.tensor([list(text.encode())]) % 128)


def test_rotated_model_saves_loads_and_saves_back_byte_identical(tmp_path):
    model = tiny_model("llama")
    ids = tok("a rotated model says the same after loading").input_ids
    compress_model(model, {"*q_proj": LinearSpec(), "*self_attn*": LinearSpec(rotate="hadamard"),
                           "*": LinearSpec("entropy", Quantizer(mode="ecsq", step=0.2), rotate="hadamard")},
                   progress=False)
    with torch.no_grad():
        y = model(ids).logits
    path = save_compressed(model, tmp_path / "rot.safetensors")
    meta = read_meta(path)
    assert meta["version"] == 3 and meta["layers"]["model.layers.0.mlp.up_proj"]["rotation"]["block"] == 32
    assert "rotation" not in meta["layers"]["model.layers.0.self_attn.q_proj"]
    back = load_compressed(path)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, y)
    again = save_compressed(back, tmp_path / "again.safetensors")
    assert again.read_bytes() == path.read_bytes()

    with safe_open(str(path), "pt") as f:                         # an older version number: refused
        raw = json.loads(f.metadata()["slc"])
    tensors = load_file(str(path))
    for version, layer_rot, match in ((2, None, "need version 3"),
                                      (3, {"kind": "hadamard", "seed": 0, "block": 3}, "block"),
                                      (3, {"kind": "hadamard", "seed": "1", "block": 32}, "seed")):
        m = json.loads(json.dumps(raw))
        m["version"] = version
        if layer_rot is not None:
            m["layers"]["model.layers.0.mlp.up_proj"]["rotation"] = layer_rot
        bad = tmp_path / f"bad{version}.safetensors"
        save_file(tensors, str(bad), metadata={"slc": json.dumps(m)})
        with pytest.raises(FormatError, match=match):
            load_compressed(bad)


def test_files_without_rotation_keep_their_version():
    assert file_version({"a": {"tensor": {"layout": "tiled"}}}) == 2 and file_version({"a": {}}) == 1
    assert file_version({"a": {}, "b": {"rotation": {"kind": "hadamard", "seed": 0, "block": 2}}}) == 3


def test_allocate_measures_and_stores_rotated_layers():
    model = tiny_model("llama")
    pol = allocate(model, tok, 4.0, "some calibration text " * 10, rotate="hadamard")
    assert all(s.rotate == "hadamard" for s in pol.values())
    report = compress_model(model, pol, progress=False)
    assert abs(report.totals()["bits_per_weight"] / 4.0 - 1) < 0.02
    assert all(m.rotation is not None for m in compressed_layers(model).values())


def test_gptq_with_rotation_beats_rtn_with_rotation():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)    # correlated inputs
    c = (x.T @ x).double()
    rot, q = Rotation(128, 3), Quantizer(mode="ecsq", step=0.5)
    wr = rot.apply(w.double())
    cr = rot.conjugate(c)

    def objective(qt):                                               # tr(dW' R^T C R dW'^T), dW' in the rotated basis
        dw = qt.dequantize(torch.float64) - wr
        return float(((dw @ cr) * dw).sum())

    g_qt, rtn = gptq(w, c, q, rotation=rot), q.quantize(wr.float())
    assert g_qt.scale.equal(rtn.scale) and objective(g_qt) < 0.8 * objective(rtn)
    dw_eff = rot.apply(g_qt.dequantize(torch.float64), inverse=True) - w.double()   # the same error, unrotated
    assert abs(float(((dw_eff @ c) * dw_eff).sum()) / objective(g_qt) - 1) < 1e-9
    model = tiny_model("llama")
    report = compress_model_gptq(model, tok, {"*": LinearSpec("entropy", q, rotate="hadamard")},
                                 "calibration text " * 20)
    assert report.rows and all(m.rotation is not None for m in compressed_layers(model).values())


def test_weighted_scales_rotate_and_who_cannot_rotate_refuses():
    model = tiny_model("llama")
    ids = tok("weighted scales for rotated inputs").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    spec = LinearSpec("entropy", Quantizer(mode="ecsq", step=0.3), rotate="hadamard")
    plain = compress_model_weighted(tiny_model("llama"), tok, {"*": replace(spec, rotate=None)}, "calibration " * 30)
    report = compress_model_weighted(model, tok, {"*": spec}, "calibration " * 30)
    assert all(m.rotation is not None for m in compressed_layers(model).values())
    with torch.no_grad():
        assert (model(ids).logits - ref).norm() / ref.norm() < 0.2
    assert abs(report.totals()["bits_per_weight"] / plain.totals()["bits_per_weight"] - 1) < 0.05
    with pytest.raises(ValueError, match="does not rotate"):            # a caller that stores W's own codes
        selected_specs(["a"], {"a": spec}, ("entropy",), "a plain writer")

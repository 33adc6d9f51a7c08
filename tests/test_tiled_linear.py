"""Entropy layers in the tiled layout (slc.tiles + slc.fused inside CompressedLinear): the same weights as
the quantiser's, fused decode x matmul for a few rows, decode + GEMM for more, files and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from slc import CompressedLinear, LinearSpec, Quantizer, compress_model, load_compressed, save_compressed
from slc.errors import FormatError
from slc.models import tiny_model
from slc.nn import validate_loaded

SPECS = [
    LinearSpec("entropy"),                                                        # int8 per row
    LinearSpec("entropy", Quantizer(mode="ecsq", step=0.1), predictor="none"),
    LinearSpec("entropy", Quantizer(mode="ecsq", step=1e-4, granularity="group", group_size=32)),   # escapes
    LinearSpec("entropy", Quantizer(bits=4, scheme="asymmetric", granularity="group", group_size=32)),
    LinearSpec("entropy", Quantizer(bits=3, granularity="group", group_size=64)),
]
IDS = ["int8", "ecsq", "ecsq-escapes", "int4-asym-g32", "int3-g64"]


def spiky_linear(seed: int = 0, out_f: int = 200, in_f: int = 128) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight[3, 5], lin.weight[150, 100] = 40.0, -55.0     # outliers: escapes at fine ECSQ steps
    return lin


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("rows", [1, 8, 9, 40])
def test_tiled_forward_equals_the_quantised_weight(spec, rows):
    lin = spiky_linear()
    cl = CompressedLinear.from_linear(lin, spec)
    assert cl.tiled and cl.meta["tensor"]["layout"] == "tiled"
    w = spec.quantizer.quantize(lin.weight.detach()).dequantize()
    assert torch.equal(cl.weight_dense(), w)
    x = torch.randn(rows, 128)
    torch.testing.assert_close(cl(x), nn.functional.linear(x, w, lin.bias), rtol=1e-4, atol=1e-4)


def test_escapes_are_exercised():
    cl = CompressedLinear.from_linear(spiky_linear(), SPECS[2])
    assert cl.meta["tensor"]["n_escapes"] > 0 and cl.escapes.numel() == cl.meta["tensor"]["n_escapes"]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_torch_decoder_gives_the_same_codes(spec):
    cl = CompressedLinear.from_linear(spiky_linear(1), spec)
    ref = cl.quantized().codes.clone()
    cl.decode_backend = "torch"                                   # the CUDA path, tested on the CPU
    assert torch.equal(cl.quantized().codes, ref)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_torch_decoder_forward(spec):
    """The GPU forward (slc.fused.TorchFusedWeight, group of tiles by group) run with the CPU torch backend
    gives the CPU kernels' outputs at generation and prefill sizes."""
    cl = CompressedLinear.from_linear(spiky_linear(2), spec)
    xs = [torch.randn(1, 128), torch.randn(2, 5, 128)]
    ref = [cl(x) for x in xs]
    cl.decode_backend = "torch"
    for x, r in zip(xs, ref, strict=True):
        torch.testing.assert_close(cl(x), r, rtol=1e-4, atol=1e-4)
    assert cl.n_decodes == 4


def test_layout_choice_and_validation():
    assert not CompressedLinear.from_linear(spiky_linear(), LinearSpec("entropy", predictor="left")).tiled
    assert not CompressedLinear.from_linear(spiky_linear(), LinearSpec("entropy", layout="stream")).tiled
    per_tensor = LinearSpec("entropy", Quantizer(granularity="tensor"))
    assert not CompressedLinear.from_linear(spiky_linear(), per_tensor).tiled
    with pytest.raises(ValueError, match="layout='tiled' needs"):
        LinearSpec("entropy", predictor="left", layout="tiled")
    with pytest.raises(ValueError, match="layout"):
        LinearSpec("quantized", layout="tiled")
    spec = LinearSpec("entropy", layout="stream")
    assert LinearSpec.from_dict(spec.to_dict()) == spec and "layout" not in LinearSpec("entropy").to_dict()


def test_files_with_tiles_are_version_2_and_round_trip(tmp_path):
    model = tiny_model("llama")
    ids = torch.arange(1, 30).reshape(1, -1)
    compress_model(model, {"*q_proj": SPECS[0], "*mlp*": SPECS[1], "*": LinearSpec("entropy", layout="stream")},
                   progress=False)
    with torch.inference_mode():
        before = model(ids).logits
    path = save_compressed(model, tmp_path / "m.slc")
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["slc"])["version"] == 2
    loaded = load_compressed(path)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, before, rtol=1e-5, atol=1e-5)
    plain = tiny_model("llama")
    compress_model(plain, LinearSpec("entropy", layout="stream"), progress=False)
    with safe_open(str(save_compressed(plain, tmp_path / "p.slc")), framework="pt") as f:
        assert json.loads(f.metadata()["slc"])["version"] == 1


def test_bad_tile_index_is_refused_by_name():
    cl = CompressedLinear.from_linear(spiky_linear(out_f=1200, in_f=256), SPECS[0])
    assert cl.tile_rows.numel() >= 3
    cl.tile_rows[1] = cl.tile_rows[2] + 1                        # tiles overlap (no decoder built yet)
    with pytest.raises(FormatError, match="tile"):
        validate_loaded(cl)


def test_truncated_words_fail_instead_of_a_wrong_matmul():
    cl = CompressedLinear.from_linear(spiky_linear(), SPECS[0])
    cl.words = cl.words[:-7].clone()
    with pytest.raises(FormatError):
        cl(torch.randn(1, 128))

"""compress_model / save_compressed / load_compressed on tiny GPT-2 (Conv1D), GPT-Neo and Llama, and on SmolLM2."""
import doctest
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from slc.errors import FormatError
from slc.lowrank import allocate_ranks
from slc import compress_model, compressed_layers, load_compressed, lowrank_policy, save_compressed
from slc.models import evaluation_text, load, tiny_model
from slc.nn import CompressedEmbedding, CompressedLinear, DecodeCache, LinearSpec, TiedLinear
from slc.quant import Quantizer

ARCHS = ["gpt2", "gptneo", "llama"]
# (spec, bound on the relative error of the logits vs the dense tiny model). Tiny random models,
# plumbing only: int8 per channel measured 0.003-0.006, so 0.02 leaves room without hiding a bug
# (a transposed Conv1D or a wrong scale gives O(1)).
SPECS = [
    pytest.param(LinearSpec(), 0.02, id="int8"),
    pytest.param(LinearSpec("entropy"), 0.02, id="int8+rans"),
    pytest.param(LinearSpec(quantizer=Quantizer(bits=4, granularity="group", group_size=16)), 0.3, id="int4-g16"),
    pytest.param(LinearSpec("lowrank", rank=8, factor_quantizer=Quantizer()), 1.0, id="lowrank8-int8"),
]


pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


def ids(n=16, seed=0):
    return torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def n_linear(model):
    from transformers.pytorch_utils import Conv1D
    return sum(isinstance(m, (nn.Linear, Conv1D)) for m in model.modules())


@pytest.mark.parametrize("spec,bound", SPECS)
@pytest.mark.parametrize("arch", ARCHS)
def test_compress_model_logits_and_report(arch, spec, bound):
    model = tiny_model(arch)
    x = ids()
    ref = logits(model, x)
    n_before = n_linear(model)
    report = compress_model(model, spec, progress=False)
    assert rel(logits(model, x), ref) < bound
    t = report.totals()
    assert t["layers"] == len(compressed_layers(model)) == n_before - 1        # every linear but lm_head
    assert [n for n, why in report.skipped if why != "embedding"] == ["lm_head"]
    assert (("lm_head", "default skip '*lm_head*'") in report.skipped
            and any(w == "embedding" for _, w in report.skipped))
    assert t["bytes_before"] == sum(r.bytes_before for r in report.rows) == 4 * t["params"]
    assert t["bytes_after"] == sum(m.nbytes for m in compressed_layers(model).values())
    assert t["bits_per_weight"] == pytest.approx(8 * t["bytes_after"] / t["params"])
    assert all(r.kind == spec.kind and 0 <= r.rel_error for r in report.rows)
    if spec.kind != "lowrank":
        assert all(r.rel_error < 0.1 for r in report.rows)
    text = str(report)
    assert "lm_head" in text and "total" in text and "bits/w" in text
    assert "<table>" in report._repr_html_() and len(report.to_rows()) == t["layers"]


@pytest.mark.parametrize("spec,bound", SPECS)
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bit_identical(arch, spec, bound, tmp_path):
    model = tiny_model(arch)
    compress_model(model, spec, progress=False)
    path = save_compressed(model, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == ["m.safetensors"]                              # no temp file left behind
    loaded = load_compressed(path)
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert type(loaded) is type(model)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    for _, layer in compressed_layers(loaded).items():
        assert layer.kind == spec.kind and not any(b.is_meta for b in layer.buffers())
        if spec.kind == "quantized" and spec.quantizer.bits == 8:
            assert layer.codes.dtype == torch.int8                                 # INT8 stays INT8 in memory
    if model.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ARCHS)
def test_compressed_embeddings_and_tied_head_round_trip(arch, tmp_path):
    model = tiny_model(arch)
    x = ids()
    ref = logits(model, x)
    tied = model.config.tie_word_embeddings
    report = compress_model(model, LinearSpec(), progress=False, embeddings=LinearSpec())
    assert rel(logits(model, x), ref) < 0.03                                       # int8 everywhere, tiny random model
    assert not any(why == "embedding" for _, why in report.skipped)
    assert isinstance(model.get_input_embeddings(), CompressedEmbedding)
    assert isinstance(model.lm_head, TiedLinear) == tied
    loaded = load_compressed(save_compressed(model, tmp_path / "m.safetensors"))
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert loaded.get_input_embeddings().codes.dtype == torch.int8
    if tied:
        assert loaded.lm_head.embedding is loaded.get_input_embeddings()


def test_policy_patterns_first_match_wins_and_unmatched_warns():
    model = tiny_model("llama")
    policy = {"*.layers.0.mlp.*": None, "*.mlp.*": LinearSpec("entropy"), "*.self_attn.q_proj": LinearSpec(),
              "*.nothing_here": LinearSpec()}
    with pytest.warns(UserWarning, match="nothing_here"):
        report = compress_model(model, policy, progress=False)
    kinds = {r.name: r.kind for r in report.rows}
    assert kinds == {**{f"model.layers.1.mlp.{p}": "entropy" for p in ("gate_proj", "up_proj", "down_proj")},
                     "model.layers.0.self_attn.q_proj": "quantized", "model.layers.1.self_attn.q_proj": "quantized"}
    reasons = dict(report.skipped)
    assert reasons["model.layers.0.mlp.up_proj"] == "policy '*.layers.0.mlp.*' -> None"
    assert reasons["model.layers.0.self_attn.k_proj"] == "no policy pattern matched"
    assert report.unmatched_patterns == ["*.nothing_here"] and "nothing_here" in str(report)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)


def test_skip_can_be_emptied_to_compress_lm_head():
    model = tiny_model("llama")                                                    # untied lm_head
    report = compress_model(model, LinearSpec(), progress=False, skip=())
    assert isinstance(model.lm_head, CompressedLinear)
    assert [why for _, why in report.skipped] == ["embedding"]


def test_allocated_ranks_become_a_policy():
    model = tiny_model("llama")
    weights = {n + ".weight": m.weight.detach() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and "lm_head" not in n}
    ranks = allocate_ranks(weights, 0.5)
    report = compress_model(model, lowrank_policy(ranks, Quantizer()), progress=False)
    got = {name: layer.s.numel() for name, layer in compressed_layers(model).items()}
    assert got == {n.removesuffix(".weight"): r for n, r in ranks.items()}
    assert sum(r * sum(weights[n + ".weight"].shape) for n, r in got.items()) <= 0.5 * report.totals()["params"]


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="no torch.nn.Linear"):
        compress_model(nn.Sequential(nn.ReLU(), nn.Embedding(4, 4)), LinearSpec(), progress=False)
    with pytest.raises(TypeError, match="policy"):
        compress_model(tiny_model("llama"), "int8", progress=False)
    with pytest.raises(TypeError, match="LinearSpec or None"):
        compress_model(tiny_model("llama"), {"*": "int8"}, progress=False)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: rank=100 is out of range.*1\.\.32"):
        compress_model(tiny_model("llama"), LinearSpec("lowrank", rank=100), progress=False)
    with pytest.raises(TypeError, match="transformers model"):
        save_compressed(nn.Linear(2, 2), "/tmp/never-written.safetensors")


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    compress_model(model, LinearSpec(), progress=False)
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"previous version")

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, target)
    assert os.listdir(tmp_path) == ["m.safetensors"] and target.read_bytes() == b"previous version"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny GPT-2 with int8 and entropy layers: (path, tensors, metadata dict)."""
    model = tiny_model("gpt2")
    compress_model(model, {"*.attn.*": LinearSpec("entropy"), "*": LinearSpec()}, progress=False)
    path = save_compressed(model, tmp_path_factory.mktemp("saved") / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["slc"])
    return path, load_file(str(path)), meta


def rewrite(tmp_path, tensors, meta, raw_meta=None):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"slc": raw_meta if raw_meta is not None else json.dumps(meta)})
    return path


CORRUPTIONS = {
    "newer version": (lambda t, m: (t, {**m, "version": 99}), "newer slc"),
    "not slc": (lambda t, m: (t, {**m, "format": "other"}), "format"),
    "unknown architecture": (lambda t, m: (t, {**m, "architecture": "os.system"}), "architecture"),
    "missing tensor": (lambda t, m: ({k: v for k, v in t.items() if not k.endswith("c_fc.codes")}, m), "missing"),
    "wrong dtype": (lambda t, m: ({**t, "transformer.h.0.mlp.c_fc.codes":
                                   t["transformer.h.0.mlp.c_fc.codes"].to(torch.int16)}, m), "int16"),
    "wrong shape": (lambda t, m: ({**t, "transformer.h.0.mlp.c_fc.scale": torch.ones(3, 1)}, m), "shape"),
    "layer meta lies": (lambda t, m: (t, {**m, "layers": {**m["layers"], "transformer.h.0.mlp.c_fc": {
        **m["layers"]["transformer.h.0.mlp.c_fc"], "in_features": 31}}}), "in_features|31|shape"),
    "corrupt stream": (lambda t, m: ({**t, "transformer.h.0.attn.c_attn.states":
                                      torch.zeros_like(t["transformer.h.0.attn.c_attn.states"])}, m), "state|stream|L"),
    "no such layer": (lambda t, m: (t, {**m, "layers": {"transformer.h.9.mlp.c_fc":
                                                        m["layers"]["transformer.h.0.mlp.c_fc"]}}), "does not exist"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_inconsistent_files_raise_format_error(case, saved, tmp_path):
    path, tensors, meta = saved
    corrupt, match = CORRUPTIONS[case]
    t, m = corrupt(dict(tensors), json.loads(json.dumps(meta)))
    with pytest.raises(FormatError, match=match):
        load_compressed(rewrite(tmp_path, t, m))


def test_unreadable_files_raise_format_error(saved, tmp_path):
    path, tensors, meta = saved
    with pytest.raises(FormatError, match="not valid JSON"):
        load_compressed(rewrite(tmp_path, tensors, meta, raw_meta="{not json"))
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(FormatError, match="no 'slc' metadata"):
        load_compressed(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(FormatError):
        load_compressed(junk)
    with pytest.raises(FileNotFoundError):
        load_compressed(tmp_path / "absent.safetensors")


def test_loaded_entropy_layers_share_a_cache(saved):
    path, _, _ = saved
    cache = DecodeCache(max_bytes=1 << 20)
    model = load_compressed(path, cache=cache)
    x = ids()
    first = logits(model, x)
    assert torch.equal(logits(model, x), first) and cache.hits > 0
    assert all(m.n_decodes == 1 for m in compressed_layers(model).values() if m.kind == "entropy")


def test_smollm2_int8_and_entropy_logits_cosine():
    """Real model: int8/channel and int8 + rANS on a few blocks keep the logits (cosine > 0.999 vs fp32)."""
    model, tok = load("smollm2-135m")
    x = tok(evaluation_text(600), return_tensors="pt").input_ids[:, :48]
    ref = logits(model, x)
    report = compress_model(model, {"model.layers.0.*": LinearSpec("entropy"), "model.layers.1.*": LinearSpec(),
                                    "model.layers.2[0-9].mlp.*": LinearSpec()}, progress=False)
    assert report.totals()["layers"] == 7 + 7 + 10 * 3
    out = logits(model, x)
    cos = torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0)
    assert cos > 0.999


def test_docstring_examples():
    import slc.checkpoint
    import slc.compress
    assert doctest.testmod(slc.compress).failed == 0
    assert doctest.testmod(slc.checkpoint).failed == 0

"""Block-wise calibration and streamed evaluation equal the whole-model paths where the method is the same."""
import copy
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import slc
from slc.allocate import allocate as allocate_model
from slc.blockwise import (allocate_checkpoint, gptq_checkpoint, perplexity_streamed, perplexity_windows,
                           rate_distortion_checkpoint, skeleton)
from slc.checkpoint import load_compressed, save_compressed
from slc.compress import compress_model, compress_model_gptq
from slc.metrics import perplexity, perplexity_details
from slc.models import ByteTokenizer, tiny_model
from slc.nn import CompressedLinear, LinearSpec
from slc.synthetic import write_synthetic_checkpoint

TEXT = "The quick brown fox jumps over the lazy dog; calibration needs a few hundred tokens. " * 8
EVAL = "Another text for evaluation, with other words in it and some punctuation. " * 20




def steps(policy):
    return [(r.name, r.kind, r.setting) for r in policy.rows]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, folder): tiny_model('llama') and its save_pretrained folder."""
    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    """A tied-head tiny Llama (like SmolLM2): lm_head is the input embedding, absent from the file."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    folder = tmp_path_factory.mktemp("tied") / "llama"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("sensitivity", ["output", "fisher", "fisher-out"])
def test_allocation_equals_the_whole_model(tiny, sensitivity):
    model, folder = tiny
    a = allocate_model(model, ByteTokenizer(), 4.5, TEXT, sensitivity=sensitivity)
    b = allocate_checkpoint(folder, ByteTokenizer(), 4.5, TEXT, sensitivity=sensitivity, device="cpu")
    assert steps(a) == steps(b) and list(a) == list(b)
    assert [r.distortion for r in a.rows] == [r.distortion for r in b.rows]        # same floats, same order
    assert b.settings["blockwise"] and b.settings["tokens"] == a.settings["tokens"]


def test_tempered_allocation_equals_the_whole_model(tiny):
    """The block-wise table holds the weights' energy too, so temper= gives the whole model's steps."""
    model, folder = tiny
    a = allocate_model(model, ByteTokenizer(), 4.0, TEXT, sensitivity="fisher", temper=0.5)
    b = allocate_checkpoint(folder, ByteTokenizer(), 4.0, TEXT, sensitivity="fisher", temper=0.5, device="cpu")
    assert steps(a) == steps(b) and b.settings["temper"] == 0.5
    as_measured = allocate_checkpoint(folder, ByteTokenizer(), 4.0, TEXT, sensitivity="fisher", device="cpu")
    assert steps(as_measured) != steps(b)
    with pytest.raises(ValueError, match="temper="):
        allocate_checkpoint(folder / "missing", ByteTokenizer(), 4.0, TEXT, temper=1.5)   # before reading anything


@pytest.mark.parametrize("sensitivity", ["output", "fisher"])
def test_rotated_allocation_equals_the_whole_model(tiny, tmp_path, sensitivity):
    model, folder = tiny
    a = allocate_model(model, ByteTokenizer(), 4.0, TEXT, sensitivity=sensitivity, rotate="hadamard", rotate_seed=3)
    b = allocate_checkpoint(folder, ByteTokenizer(), 4.0, TEXT, sensitivity=sensitivity, rotate="hadamard",
                            rotate_seed=3, device="cpu")
    assert steps(a) == steps(b) and [r.distortion for r in a.rows] == [r.distortion for r in b.rows]
    assert all(s.rotate == "hadamard" and s.rotate_seed == 3 for s in b.values())
    assert b.settings["rotate"] == "hadamard" and b.settings["blockwise"]
    plain = allocate_checkpoint(folder, ByteTokenizer(), 4.0, TEXT, sensitivity=sensitivity, device="cpu")
    assert [r.distortion for r in plain.rows] != [r.distortion for r in b.rows]      # the rotation is measured
    gptq_checkpoint(folder, tmp_path / "rot.slc.safetensors", ByteTokenizer(), b, TEXT, device="cpu")
    loaded = load_compressed(tmp_path / "rot.slc.safetensors")                        # the policy stores rotated
    layers = [m for m in loaded.modules() if isinstance(m, CompressedLinear)]
    assert layers and all(m.rotation is not None for m in layers)
    with pytest.raises(ValueError, match="rotate"):
        rate_distortion_checkpoint(folder, ByteTokenizer(), TEXT, sensitivity="output", rotate="fourier")


def test_full_distortion_and_tied_head(tiny_tied):
    model, folder = tiny_tied
    a = allocate_model(model, ByteTokenizer(), 5.0, TEXT, sensitivity="output", distortion="full")
    b = allocate_checkpoint(folder, ByteTokenizer(), 5.0, TEXT, sensitivity="output", distortion="full", device="cpu")
    assert steps(a) == steps(b)
    a = allocate_model(model, ByteTokenizer(), 3.5, TEXT, sensitivity="fisher")
    b = allocate_checkpoint(folder, ByteTokenizer(), 3.5, TEXT, sensitivity="fisher", device="cpu")
    assert steps(a) == steps(b)


def test_top_level_dispatch(tiny):
    model, folder = tiny
    a = slc.allocate(model, ByteTokenizer(), 4.5, TEXT, sensitivity="output")
    b = slc.allocate(str(folder), ByteTokenizer(), 4.5, TEXT, sensitivity="output", device="cpu")
    assert steps(a) == steps(b)
    with pytest.raises(ValueError, match="out="):
        slc.compress_model_gptq(folder, ByteTokenizer(), a, TEXT)
    with pytest.raises(TypeError, match="checkpoint path"):
        slc.compress_model_gptq(copy.deepcopy(model), ByteTokenizer(), a, TEXT, sequential=False)


@pytest.mark.parametrize("fixture,rotate", [("tiny", None), ("tiny_tied", None), ("tiny", "hadamard")])
def test_gptq_not_sequential_writes_the_same_bytes(request, tmp_path, fixture, rotate):
    model, folder = request.getfixturevalue(fixture)
    policy = allocate_model(model, ByteTokenizer(), 4.5, TEXT, sensitivity="output")
    if rotate:                                                   # W R quantised with R^T C R, stored rotated
        policy = {n: replace(spec, rotate=rotate) for n, spec in policy.items()}
    dense = copy.deepcopy(model)
    rep_a = compress_model_gptq(dense, ByteTokenizer(), policy, TEXT)
    save_compressed(dense, tmp_path / "a.slc.safetensors")
    rep_b = slc.compress_model_gptq(str(folder), ByteTokenizer(), policy, TEXT, out=tmp_path / "b.slc.safetensors",
                                    sequential=False, device="cpu")
    assert (tmp_path / "a.slc.safetensors").read_bytes() == (tmp_path / "b.slc.safetensors").read_bytes()
    assert [(r.name, r.bytes_after, r.rel_error) for r in rep_a.rows] == \
           [(r.name, r.bytes_after, r.rel_error) for r in rep_b.rows]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.slc.safetensors", "b.slc.safetensors"]   # no journal left


def test_gptq_sequential_the_papers_way(tiny, tmp_path):
    """Sequential GPTQ calibrates later layers on quantised inputs: different codes, same grid and sizes."""
    model, folder = tiny
    policy = allocate_model(model, ByteTokenizer(), 3.0, TEXT, sensitivity="output")
    rep_s = gptq_checkpoint(folder, tmp_path / "s.slc.safetensors", ByteTokenizer(), policy, TEXT, device="cpu")
    rep_p = gptq_checkpoint(folder, tmp_path / "p.slc.safetensors", ByteTokenizer(), policy, TEXT, sequential=False,
                            device="cpu")
    assert [r.name for r in rep_s.rows] == [r.name for r in rep_p.rows] == list(policy)
    first = [r.name for r in rep_s.rows if r.name.startswith("model.layers.0.self_attn.") and "o_proj" not in r.name]
    same = {r.name: r.rel_error for r in rep_p.rows}
    assert all(r.rel_error == same[r.name] for r in rep_s.rows if r.name in first)   # q/k/v of block 0: same C
    assert any(r.rel_error != same[r.name] for r in rep_s.rows if r.name not in first)
    loaded = load_compressed(tmp_path / "s.slc.safetensors")
    assert perplexity(loaded, ByteTokenizer(), EVAL, 64, 32) < 2 * perplexity(model, ByteTokenizer(), EVAL, 64, 32)


def test_gptq_sequential_rotated_calibrates_on_what_the_rotated_layers_compute(tiny, tmp_path):
    """Sequential GPTQ with rotating specs: later layers see the quantised layers' effective weight Q(W R) R^T,
    so the file loads into rotated layers whose model is as good as the unrotated run's."""
    model, folder = tiny
    policy = allocate_model(model, ByteTokenizer(), 3.0, TEXT, sensitivity="output")
    rotated = {n: replace(spec, rotate="hadamard") for n, spec in policy.items()}
    base = gptq_checkpoint(folder, tmp_path / "p.slc.safetensors", ByteTokenizer(), policy, TEXT, device="cpu")
    rep = gptq_checkpoint(folder, tmp_path / "r.slc.safetensors", ByteTokenizer(), rotated, TEXT, device="cpu")
    assert [r.name for r in rep.rows] == list(policy)
    assert [r.rel_error for r in rep.rows] != [r.rel_error for r in base.rows]       # other codes: W R's
    loaded = load_compressed(tmp_path / "r.slc.safetensors")
    layers = slc.compressed_layers(loaded)
    assert len(layers) == len(policy) and all(m.rotation is not None for m in layers.values())
    plain = load_compressed(tmp_path / "p.slc.safetensors")
    ppl = {k: perplexity(m, ByteTokenizer(), EVAL, 64, 32) for k, m in (("fp32", model), ("plain", plain),
                                                                        ("rotated", loaded))}
    assert ppl["rotated"] < 1.5 * ppl["plain"] and ppl["rotated"] < 2 * ppl["fp32"], ppl


@pytest.mark.parametrize("sequential,rotate", [(True, None), (False, None), (True, "hadamard")])
def test_gptq_checkpoint_killed_then_resumed_is_byte_identical(tiny_tied, tmp_path, monkeypatch, sequential, rotate):
    """A run that dies after a few layers leaves the journal and no file; the rerun reuses the finished
    blocks (their forward pass through the stored codes) and writes the uninterrupted run's bytes. Rotated:
    the resumed blocks run on the stored layers' effective weights Q(W R) R^T, so an uninterrupted run must
    calibrate later layers on exactly those."""
    import slc.blockwise as blockwise
    from slc.streaming import journal_path

    model, folder = tiny_tied
    policy = allocate_model(model, ByteTokenizer(), 3.0, TEXT, sensitivity="output")
    policy = {n: replace(spec, rotate=rotate) for n, spec in policy.items()}
    run = lambda name: gptq_checkpoint(folder, tmp_path / name, ByteTokenizer(), policy, TEXT, device="cpu",
                                       sequential=sequential)
    whole = run("whole.slc")
    written, real = [], blockwise.write_part

    def dies_after_nine(*args, **kwargs):
        if len(written) == 9:                        # block 0's 7 layers and 2 of block 1's
            raise KeyboardInterrupt
        written.append(args[1]["name"])
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise, "write_part", dies_after_nine)
    with pytest.raises(KeyboardInterrupt):
        run("g.slc")
    assert not (tmp_path / "g.slc").exists() and len(list(journal_path(tmp_path / "g.slc").glob("*.safetensors"))) == 9
    written.clear()
    monkeypatch.setattr(blockwise, "write_part", real)
    counted, gptq_layer = [], blockwise.gptq_layer
    monkeypatch.setattr(blockwise, "gptq_layer", lambda *a: counted.append(a[0]) or gptq_layer(*a))
    resumed = run("g.slc")
    assert (tmp_path / "g.slc").read_bytes() == (tmp_path / "whole.slc").read_bytes()
    assert len(counted) == 2 * 7 and not journal_path(tmp_path / "g.slc").exists()    # blocks 1 and 2 redone
    key = lambda r: (r.name, r.kind, r.storage, r.shape, r.bytes_after, r.rel_error)
    assert [key(r) for r in resumed.rows] == [key(r) for r in whole.rows]


@pytest.mark.parametrize("window, stride", [(64, 32), (50, 50), (512, 256)])
def test_streamed_perplexity_equals_loaded(tiny_tied, tmp_path, window, stride):
    model, _ = tiny_tied
    m = copy.deepcopy(model)
    compress_model(m, LinearSpec(), progress=False, embeddings=LinearSpec())        # TiedLinear head
    path = save_compressed(m, tmp_path / "m.slc.safetensors")
    a = perplexity_details(load_compressed(path), ByteTokenizer(), EVAL, window, stride)
    b = perplexity_streamed(path, ByteTokenizer(), EVAL, window, stride, device="cpu")
    assert a["tokens"] == b["tokens"] and a["windows"] == b["windows"]
    assert abs(a["ppl"] - b["ppl"]) <= 1e-4 * a["ppl"]
    assert perplexity(str(path), ByteTokenizer(), EVAL, window, stride) == b["ppl"]


def test_streamed_perplexity_dense_tie_and_rans(tiny, tiny_tied, tmp_path):
    for k, (model, _) in enumerate((tiny, tiny_tied)):
        m = copy.deepcopy(model)
        compress_model(m, LinearSpec("entropy"), progress=False)
        path = save_compressed(m, tmp_path / f"m{k}.slc.safetensors")
        a = perplexity(load_compressed(path), ByteTokenizer(), EVAL, 64, 32)
        assert abs(perplexity(path, ByteTokenizer(), EVAL, 64, 32) - a) <= 1e-4 * a


def test_windows_recipe():
    assert perplexity_windows(10, 4, 2) == [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert perplexity_windows(3, 512, 256) == [(0, 3, 0)]
    with pytest.raises(ValueError):
        perplexity_windows(10, 4, 5)


def test_synthetic_checkpoint_plumbing(tmp_path):
    folder = write_synthetic_checkpoint(tmp_path / "tiny", "tiny", progress=False)
    tok = ByteTokenizer(1024)
    policy = allocate_checkpoint(folder, tok, 4.0, TEXT, sensitivity="fisher", device="cpu")
    assert abs(policy.bits_per_weight - 4.0) <= 0.02 * 4.0
    rep = gptq_checkpoint(folder, tmp_path / "g.slc.safetensors", tok, policy, TEXT, device="cpu")
    assert abs(rep.totals()["bits_per_weight"] - 4.0) <= 0.05 * 4.0
    path = tmp_path / "g.slc.safetensors"
    assert set(load_file(path)) >= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    a = perplexity(load_compressed(path), tok, EVAL, 64, 32)
    assert abs(perplexity_streamed(path, tok, EVAL, 64, 32, device="cpu")["ppl"] - a) <= 1e-4 * a


def test_bad_input(tmp_path, tiny):
    model, folder = tiny
    with pytest.raises(ValueError, match="model_type"):
        skeleton({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="sensitivity"):
        rate_distortion_checkpoint(folder, ByteTokenizer(), TEXT, sensitivity="gn")
    with pytest.raises(ValueError, match="outside the decoder blocks"):
        allocate_checkpoint(folder, ByteTokenizer(), 4.5, TEXT, sensitivity="output", skip=(), device="cpu")
    with pytest.raises(ValueError, match="kind="):
        gptq_checkpoint(folder, tmp_path / "x", ByteTokenizer(), LinearSpec("quantized"), TEXT, device="cpu")
    with pytest.raises(FileNotFoundError):
        perplexity_streamed(tmp_path / "missing.slc.safetensors", ByteTokenizer(), EVAL)
    gpt2 = tiny_model("gpt2")
    compress_model(gpt2, LinearSpec(), progress=False)
    p = save_compressed(gpt2, tmp_path / "gpt2.slc.safetensors")
    with pytest.raises(ValueError, match="not supported block by block"):
        perplexity_streamed(p, ByteTokenizer(), EVAL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_same_allocation(tiny):
    model, folder = tiny
    a = allocate_checkpoint(folder, ByteTokenizer(), 4.5, TEXT, sensitivity="output", device="cpu")
    b = allocate_checkpoint(folder, ByteTokenizer(), 4.5, TEXT, sensitivity="output", device="cuda")
    assert sum(x != y for x, y in zip(steps(a), steps(b), strict=True)) <= 1        # float order differs on GPU


# ---------------------------------------------------------------------------- real model (SmolLM2)

@pytest.fixture(scope="module")
def smollm2():
    from slc.models import fetch, load
    model, tok = load("smollm2-135m")
    return model, tok, fetch("smollm2-135m", quiet=True)


@pytest.mark.slow
@pytest.mark.heavy                     # minutes: `make test-heavy`, not `make test`
def test_smollm2_output_allocation_equals_the_whole_model(smollm2):
    model, tok, folder = smollm2
    a = allocate_model(model, tok, 4.5, sensitivity="output")
    b = allocate_checkpoint(folder, tok, 4.5, sensitivity="output")
    assert steps(a) == steps(b)


@pytest.mark.slow
@pytest.mark.heavy                     # minutes: `make test-heavy`, not `make test`
def test_smollm2_gptq_writes_the_same_bytes(smollm2, tmp_path):
    """GPTQ on the first and last two blocks (the rest stays dense: read from the checkpoint), 512 tokens."""
    from slc.quant import Quantizer
    model, tok, folder = smollm2
    spec = LinearSpec("entropy", quantizer=Quantizer(mode="ecsq", step=0.2), predictor="none")
    policy = {f"model.layers.{i}.*": spec for i in (0, 1, 28, 29)}
    dense = copy.deepcopy(model)
    compress_model_gptq(dense, tok, policy, max_tokens=512)
    save_compressed(dense, tmp_path / "a.slc.safetensors")
    gptq_checkpoint(folder, tmp_path / "b.slc.safetensors", tok, policy, max_tokens=512, sequential=False,
                    device="cpu")
    ta, tb = load_file(tmp_path / "a.slc.safetensors"), load_file(tmp_path / "b.slc.safetensors")
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
@pytest.mark.heavy                     # minutes: `make test-heavy`, not `make test`
def test_smollm2_fisher_backward_stream_equals_the_whole_model(smollm2):
    model, tok, folder = smollm2
    a = allocate_model(model, tok, 4.5, sensitivity="fisher")
    b = allocate_checkpoint(folder, tok, 4.5, sensitivity="fisher", device="cpu")
    assert steps(a) == steps(b)


@pytest.mark.slow
def test_smollm2_int8_streamed_perplexity(smollm2, tmp_path):
    from slc.models import evaluation_text
    model, tok, _ = smollm2
    m = copy.deepcopy(model)
    compress_model(m, LinearSpec(), progress=False)
    path = save_compressed(m, tmp_path / "int8.slc.safetensors")
    text = evaluation_text(6000)
    a = perplexity(load_compressed(path), tok, text)
    assert abs(perplexity(path, tok, text) - a) <= 1e-4 * a

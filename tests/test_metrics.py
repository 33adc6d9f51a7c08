"""Metrics: identities and known values, perplexity, captured activations, per-layer compare, GGUF peers."""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from slc import gguf_peers, metrics, models
from slc.hf import is_linear
from slc.models import evaluation_text, load, tiny_model


class ByteTokenizer(models.ByteTokenizer):
    """slc.models' stand-in with pad and end-of-text ids, as generation needs."""
    pad_token_id, eos_token_id = 0, 0


class UniformLM(nn.Module):
    """Logits all zero: every next token has probability 1/vocab, so perplexity is exactly vocab."""

    def __init__(self, vocab: int = 128):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return SimpleNamespace(logits=torch.zeros(*ids.shape, self.vocab))


TEXT = "The quick brown fox jumps over the lazy dog. " * 6          # 270 bytes -> 270 tokens


# --- tensor metrics ---------------------------------------------------------------------------

def test_identities():
    x = torch.randn(100, 7)
    assert metrics.cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    assert metrics.rel_error(x, x) == 0.0
    assert metrics.snr_db(x, x) == math.inf


def test_known_values():
    assert metrics.cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(0.0)
    assert metrics.cosine(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1 / math.sqrt(2))
    assert metrics.cosine(np.array([1.0, 2.0]), np.array([-2.0, -4.0])) == pytest.approx(-1.0)
    assert metrics.rel_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])) == pytest.approx(0.8)
    ref = torch.ones(4)
    assert metrics.snr_db(ref, ref * 1.1) == pytest.approx(20.0)            # 4 / (4 * 0.01) = 100 -> 20 dB
    assert metrics.snr_db(ref, ref + 1) == pytest.approx(0.0)


def test_entropy_bits():
    assert metrics.entropy_bits(np.array([0, 1, 0, 1])) == pytest.approx(1.0)
    assert metrics.entropy_bits(torch.tensor([5, 5, 5], dtype=torch.int8)) == 0.0
    assert metrics.entropy_bits(np.arange(256, dtype=np.uint8)) == pytest.approx(8.0)
    assert metrics.entropy_bits([0, 0, 0, 1]) == pytest.approx(0.8112781244591328)


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        metrics.cosine(torch.ones(3), torch.ones(4))
    with pytest.raises(TypeError, match="integers"):
        metrics.entropy_bits(np.ones(4))
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        metrics.rel_error([1.0], [1.0])


# --- perplexity -------------------------------------------------------------------------------

@pytest.mark.parametrize("window,stride", [(64, 64), (64, 16), (100, 37), (512, 256)])
def test_perplexity_scores_every_token_once(window, stride):
    # Uniform logits give exactly `vocab` whatever the windows, but only if no token is dropped or
    # scored twice with a different context length; the sum below checks the count itself.
    d = metrics.perplexity_details(UniformLM(), ByteTokenizer(), TEXT, window, stride)
    assert d["ppl"] == pytest.approx(128.0) and d["tokens"] == len(TEXT) - 1
    assert d["windows"] == (1 if window >= len(TEXT) else 1 + math.ceil((len(TEXT) - window) / min(stride, window - 1)))


def test_perplexity_tiny_llama_is_finite_deterministic_and_vocab_scale():
    model, tok = tiny_model("llama"), ByteTokenizer()
    a = metrics.perplexity(model, tok, TEXT, window=64, stride=48)
    b = metrics.perplexity(model, tok, TEXT, window=64, stride=48)
    assert math.isfinite(a) and a == b
    assert 128 / 4 < a < 128 * 4                                               # random init: about uniform


def test_perplexity_rejects_bad_windows():
    with pytest.raises(ValueError, match="stride"):
        metrics.perplexity(UniformLM(), ByteTokenizer(), TEXT, window=16, stride=32)
    with pytest.raises(ValueError, match="too short"):
        metrics.perplexity(UniformLM(), ByteTokenizer(), "a")


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2-135m")


@pytest.mark.slow
def test_perplexity_real_smollm2_in_band(smollm2):
    model, tok = smollm2
    ppl = metrics.perplexity(model, tok, evaluation_text(2000), window=512, stride=256)
    assert 12 < ppl < 28, ppl                                                  # measured 18.34 (torch 2.13, CPU)


# --- layers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_capture_inputs_shapes(arch):
    model = tiny_model(arch)
    acts = metrics.capture_inputs(model, TEXT, ByteTokenizer(), max_tokens=40)
    linears = {n: m for n, m in model.named_modules() if is_linear(m)}
    assert set(acts) == set(linears)
    for name, x in acts.items():
        m = linears[name]
        in_features = m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]   # Conv1D: (in, out)
        assert x.shape == (40, in_features), name


def test_capture_inputs_chosen_and_unknown_names():
    model = tiny_model("llama")
    acts = metrics.capture_inputs(model, TEXT, ByteTokenizer(), module_names=["model.layers.1.mlp.down_proj"],
                                  max_tokens=8)
    assert list(acts) == ["model.layers.1.mlp.down_proj"] and acts["model.layers.1.mlp.down_proj"].shape == (8, 64)
    with pytest.raises(ValueError, match="no module named"):
        metrics.capture_inputs(model, TEXT, ByteTokenizer(), module_names=["nope"])


def test_compare_layers_finds_only_changed_layers():
    dense = tiny_model("llama")
    other = copy.deepcopy(dense)
    with torch.no_grad():
        w = other.model.layers[0].mlp.up_proj.weight
        w.add_(0.1 * w.std() * torch.randn_like(w))
    rows = metrics.compare_layers(dense, other, ByteTokenizer(), TEXT, max_tokens=32)
    assert [r["layer"] for r in rows] == ["model.layers.0.mlp.up_proj"]
    r = rows[0]
    assert 0.9 < r["cosine"] < 1.0 and 0 < r["rel_error"] < 0.5 and 5 < r["snr_db"] < 40 and r["tokens"] == 32
    with pytest.raises(ValueError, match="no layer differs"):
        metrics.compare_layers(dense, copy.deepcopy(dense), ByteTokenizer(), TEXT)


def test_compare_layers_with_compressed_linear():
    from slc.nn import CompressedLinear, LinearSpec

    dense = tiny_model("llama")
    comp = copy.deepcopy(dense)
    comp.model.layers[1].self_attn.q_proj = CompressedLinear.from_linear(comp.model.layers[1].self_attn.q_proj,
                                                                         LinearSpec())
    rows = metrics.compare_layers(dense, comp, ByteTokenizer(), TEXT, max_tokens=32)
    assert len(rows) == 1 and rows[0]["kind"] == "CompressedLinear"
    assert rows[0]["cosine"] > 0.999 and rows[0]["snr_db"] > 30                 # int8 per channel


def test_logits_cosine_and_generation_on_tiny_llama():
    model = tiny_model("llama")
    assert metrics.logits_cosine(model, model, ByteTokenizer(), TEXT) == pytest.approx(1.0, abs=1e-9)
    text, tps = metrics.generate_greedy(model, ByteTokenizer(), "Hello", n_tokens=8)
    assert len(text) == 8 and tps > 0
    assert metrics.generate_greedy(model, ByteTokenizer(), "Hello", n_tokens=8)[0] == text   # greedy: deterministic


@pytest.mark.slow
def test_sentence_embedding_minilm():
    model, tok = load("minilm-l6")
    e = metrics.sentence_embedding(model, tok)
    assert e.shape == (len(metrics.SENTENCES), 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(len(e)), atol=1e-5)
    sims = e @ e.T
    assert sims[0, 1] > sims[0, 2]                          # cat/dog closer than cat/interest rates
    assert metrics.embedding_cosine(model, model, tok) == pytest.approx(1.0, abs=1e-6)
    assert len(metrics.embedding_cosine(model, model, tok, ["one", "two"], reduce="none")) == 2


# --- GGUF peers -------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype,bpw", [("Q8_0", 8.5), ("Q5_0", 5.5), ("Q4_0", 4.5), ("Q4_1", 5.0)])
def test_gguf_bits_per_weight(qtype, bpw):
    assert gguf_peers.gguf_bits_per_weight(qtype) == bpw


def test_gguf_q8_0_roundtrip_error_bound(minilm_query):
    w = minilm_query                                                           # real fp32, (384, 384)
    back, bpw = gguf_peers.gguf_roundtrip(w, "Q8_0")
    assert back.shape == w.shape and back.dtype == w.dtype and bpw == 8.5
    step = w.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127               # one Q8_0 step per block of 32
    err = (back - w).reshape(-1, 32).abs()
    # Half a step, plus the scale's fp16 rounding (relative 2**-11) times at most 127 codes: 0.562 steps.
    assert bool((err <= (0.5 + 127 * 2 ** -11) * step + 1e-7).all())           # measured max: 0.553 steps
    assert metrics.rel_error(w, back) < 0.01


def test_gguf_coarser_types_cost_more_error(minilm_query):
    errors = {q: metrics.rel_error(minilm_query, gguf_peers.gguf_roundtrip(minilm_query, q)[0])
              for q in ("Q8_0", "Q5_0", "Q4_1", "Q4_0")}
    assert errors["Q8_0"] < errors["Q5_0"] < errors["Q4_1"] < errors["Q4_0"] < 0.15


def test_gguf_bad_input():
    with pytest.raises(ValueError, match="Q8_0"):
        gguf_peers.gguf_roundtrip(torch.randn(4, 32), "Q3_K")
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_peers.gguf_roundtrip(torch.randn(4, 40), "Q8_0")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_apply_gguf_in_place(arch):
    model = tiny_model(arch)
    before = {n: p.clone() for n, p in model.named_parameters()}
    rows = gguf_peers.apply_gguf(model, "Q4_0")
    assert rows and all(r["bits_per_weight"] == 4.5 and 0 < r["rel_error"] < 0.2 for r in rows)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {r["layer"] + ".weight" for r in rows}                   # embeddings, norms, biases untouched

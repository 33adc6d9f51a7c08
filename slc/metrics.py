"""How much a compressed tensor, layer or model differs from the original.

Three levels, each a plain function:

    tensors   rel_error, cosine, snr_db, entropy_bits (order-0 bits per symbol)
    layers    capture_inputs (real activations via forward hooks) and compare_layers:
              each compressed layer against its dense original on the *same* captured
              input, so a row measures that layer alone, not errors piled up before it
    models    perplexity (strided windows, the Hugging Face recipe), logits_cosine,
              sentence_embedding / embedding_cosine (MiniLM, mean pooling),
              generate_greedy (text + tokens per second)

All model work runs under `torch.inference_mode()` and is deterministic on one machine.
Functions that describe many layers return lists of dict rows, so a notebook can
print them, plot them, or hand them to pandas.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from . import symbols
from .blockwise import is_path, perplexity_streamed, perplexity_windows
from .hf import is_linear

# Plain English sentences for MiniLM embedding checks: varied topics and lengths, fixed order.
SENTENCES = [
    "The cat sat quietly on the warm windowsill all afternoon.",
    "A dog was sleeping in the sun next to the front door.",
    "Interest rates rose again this quarter, and markets fell sharply.",
    "The central bank kept its policy unchanged despite higher inflation.",
    "She learned to play the violin when she was seven years old.",
    "Fresh bread from the bakery on the corner sells out before nine.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Astronomers found a planet that may hold liquid water.",
    "Please restart the server before you deploy the new version.",
    "The function returns None when the key is missing from the dictionary.",
    "Heavy rain flooded several roads in the north of the city.",
    "The museum opens a new exhibition of medieval maps next week.",
    "Our team won the match in the final minute of extra time.",
    "He forgot his umbrella and walked home through the storm.",
    "Vegetables grow faster when the soil is rich and well watered.",
    "The committee will publish its report on public transport in May.",
]


def _flat64(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x.detach().reshape(-1).to(device="cpu", dtype=torch.float64)


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _flat64(a, "a"), _flat64(b, "b")
    if a.numel() != b.numel():
        raise ValueError(f"a and b hold different numbers of values ({a.numel()} vs {b.numel()}); "
                         "compare tensors of the same shape")
    return a, b


def rel_error(ref, approx) -> float:
    """||ref - approx|| / ||ref|| (Frobenius); `ref` is the original. 0.0 when identical."""
    ref, approx = _pair(ref, approx)
    num, den = torch.linalg.vector_norm(ref - approx), torch.linalg.vector_norm(ref)
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return float(num / den)


def cosine(a, b) -> float:
    """Cosine similarity of two tensors seen as flat vectors (float64). 1.0 = same direction."""
    a, b = _pair(a, b)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float((a @ b) / (na * nb))


def snr_db(ref, approx) -> float:
    """Signal-to-noise ratio 10·log10(Σref² / Σ(ref-approx)²) in dB; inf when identical."""
    ref, approx = _pair(ref, approx)
    noise = float(((ref - approx) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def entropy_bits(values) -> float:
    """Order-0 (empirical) entropy in bits PER SYMBOL: the floor for a coder that ignores context.
    (slc.symbols.entropy_bits gives the total.)"""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values)
    if values.size == 0:
        raise ValueError("symbols is empty: entropy of nothing is undefined")
    return symbols.entropy_bits(values) / values.size + 0.0      # + 0.0 turns -0.0 into 0.0


# --- layers ------------------------------------------------------------------------------------

def _encode(tokenizer, text: str, max_tokens: int | None, device) -> torch.Tensor:
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string, e.g. slc.models.calibration_text()")
    ids = tokenizer(text, return_tensors="pt").input_ids
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    return ids.to(device)


def _device(model: nn.Module):
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def capture_inputs(model: nn.Module, text: str, tokenizer, module_names=None,
                   max_tokens: int = 256) -> dict[str, torch.Tensor]:
    """Real input activations of each Linear / Conv1D layer: {module name: (tokens, in_features)}.

    One forward pass over the first `max_tokens` tokens of `text`. `module_names` limits which
    layers are hooked (default: every nn.Linear and transformers Conv1D). Memory grows with
    tokens × layers; keep max_tokens modest for the whole of a 30-layer model.
    """
    modules = dict(model.named_modules())
    if module_names is None:
        module_names = [n for n, m in modules.items() if is_linear(m)]
    else:
        missing = [n for n in module_names if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing[:3]} in the model; "
                             "list names with [n for n, _ in model.named_modules()]")
    if not module_names:
        raise ValueError("the model has no nn.Linear or Conv1D layers to capture")
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            x = args[0]
            captured[name] = x.detach().reshape(-1, x.shape[-1]).clone()   # (tokens, in_features)
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in module_names]
    try:
        with torch.inference_mode():
            model(_encode(tokenizer, text, max_tokens, _device(model)))
    finally:
        for h in handles:
            h.remove()
    return {n: captured[n] for n in module_names if n in captured}


def _layer_changed(dense: nn.Module, other: nn.Module) -> bool:
    if other is dense:
        return False
    if type(other) is type(dense) and is_linear(other):
        return not torch.equal(other.weight, dense.weight)
    return True


def compare_layers(dense_model: nn.Module, compressed_model: nn.Module, tokenizer, text: str,
                   max_tokens: int = 256) -> list[dict]:
    """Per layer: output cosine, relative error and SNR (dB) of the compressed layer vs its dense one.

    Both layers see the same input: the activation the *dense* model feeds that layer on `text`
    (captured with a forward hook during one dense forward pass, nothing stored for later).
    Layers left unchanged in the compressed model are skipped. Rows are in model order.
    """
    dense_modules = dict(dense_model.named_modules())
    comp_modules = dict(compressed_model.named_modules())
    names = [n for n, m in dense_modules.items()
             if is_linear(m) and n in comp_modules and _layer_changed(m, comp_modules[n])]
    if not names:
        raise ValueError("no layer differs between the two models: pass the dense original and a "
                         "compressed copy (e.g. copy.deepcopy(model) then slc.compress_model(...))")
    rows: dict[str, dict] = {}

    def hook(name):
        def fn(module, args, out):
            x = args[0]
            y_dense = out.reshape(-1, out.shape[-1])
            y_comp = comp_modules[name](x).reshape(-1, out.shape[-1])
            rows[name] = {
                "layer": name, "kind": type(comp_modules[name]).__name__,
                "tokens": y_dense.shape[0], "out_features": y_dense.shape[1],
                "cosine": cosine(y_dense, y_comp), "rel_error": rel_error(y_dense, y_comp),
                "snr_db": snr_db(y_dense, y_comp),
            }
        return fn

    handles = [dense_modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            dense_model(_encode(tokenizer, text, max_tokens, _device(dense_model)))
    finally:
        for h in handles:
            h.remove()
    return [rows[n] for n in names if n in rows]


# --- models ------------------------------------------------------------------------------------

def perplexity_details(model: nn.Module, tokenizer, text: str, window: int = 512, stride: int = 256) -> dict:
    """Perplexity with its parts: {'ppl', 'nll' (mean, nats), 'tokens' scored, 'windows'}.

    Windows of up to `window` tokens end `stride` tokens apart (the Hugging Face recipe); in each,
    only the tokens no earlier window scored count, the rest is context (label -100). With
    stride == window the windows overlap by one token, so that the first token of a window also
    has a context: every token after the first is scored exactly once, whatever the settings.
    `model` may be the path of a save_compressed file: it is then evaluated one decoder block at a
    time (slc.blockwise.perplexity_streamed), for models that do not fit in memory decoded.
    """
    if is_path(model):
        return perplexity_streamed(model, tokenizer, text, window, stride)
    perplexity_windows(2, window, stride)                               # check window and stride first
    ids = _encode(tokenizer, text, None, _device(model))
    n = ids.shape[1]
    if n < 2:
        raise ValueError("text is too short: it must tokenise to at least 2 tokens")
    wins = perplexity_windows(n, window, stride)
    nll, scored = 0.0, 0
    with torch.inference_mode():
        for begin, end, prev_end in wins:
            chunk = ids[:, begin:end]                                   # (1, T)
            labels = chunk.clone()
            labels[:, :prev_end - begin] = -100                         # already scored: context only
            logits = model(chunk).logits.float()                        # (1, T, vocab)
            logits, labels = logits[:, :-1], labels[:, 1:]              # predict token t+1 from <= t
            mask = labels != -100
            nll += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            scored += int(mask.sum())
    assert scored == n - 1, (scored, n)
    return {"ppl": math.exp(nll / scored), "nll": nll / scored, "tokens": scored, "windows": len(wins)}


def perplexity(model: nn.Module, tokenizer, text: str, window: int = 512, stride: int = 256) -> float:
    """Perplexity of a causal LM (or of a save_compressed file's path, block by block) on `text` over strided
    windows; deterministic (see perplexity_details)."""
    return perplexity_details(model, tokenizer, text, window, stride)["ppl"]


def final_logits(model: nn.Module, tokenizer, text: str, max_tokens: int = 256) -> torch.Tensor:
    """Final logits (tokens, vocab) of a causal LM on the first `max_tokens` tokens of `text`, float32 CPU."""
    with torch.inference_mode():
        return model(_encode(tokenizer, text, max_tokens, _device(model))).logits[0].float().cpu()


def logits_cosine(model_a, model_b, tokenizer, text: str, max_tokens: int = 256) -> float:
    """Mean over positions of the cosine between two models' final logits on `text`.

    Either model may be given as a logits tensor from `final_logits` (same text and max_tokens),
    so a reference model's logits are computed once for many comparisons.
    """
    def logits(m):
        return m if isinstance(m, torch.Tensor) else final_logits(m, tokenizer, text, max_tokens)

    la, lb = logits(model_a).double(), logits(model_b).double()
    if la.shape != lb.shape:
        raise ValueError(f"logits shapes differ ({tuple(la.shape)} vs {tuple(lb.shape)}): "
                         "use the same text and max_tokens")
    return float(torch.nn.functional.cosine_similarity(la, lb, dim=-1).mean())


def sentence_embedding(model: nn.Module, tokenizer, sentences=None) -> torch.Tensor:
    """Sentence embeddings (n, hidden): mean of token states over the attention mask, L2-normalised.

    This is how sentence-transformers' all-MiniLM-L6-v2 pools. Default sentences: `SENTENCES`.
    """
    sentences = SENTENCES if sentences is None else sentences
    if isinstance(sentences, str):
        sentences = [sentences]
    if not sentences:
        raise ValueError("sentences is empty: pass a list of strings")
    enc = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt").to(_device(model))
    with torch.inference_mode():
        states = model(**enc).last_hidden_state                         # (n, T, hidden)
        mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)     # (n, T, 1)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)


def embedding_cosine(model_a: nn.Module, model_b: nn.Module, tokenizer, sentences=None,
                     reduce: str = "mean"):
    """Cosine between the two models' sentence embeddings: 'mean', 'min', or 'none' (one per sentence)."""
    if reduce not in ("mean", "min", "none"):
        raise ValueError(f"reduce={reduce!r}: use 'mean', 'min' or 'none'")
    ea = sentence_embedding(model_a, tokenizer, sentences).double().cpu()
    eb = sentence_embedding(model_b, tokenizer, sentences).double().cpu()
    cos = (ea * eb).sum(-1)                                             # both are unit vectors
    if reduce == "none":
        return cos.tolist()
    return float(cos.mean() if reduce == "mean" else cos.min())


def generate_greedy(model: nn.Module, tokenizer, prompt: str, n_tokens: int = 64) -> tuple[str, float]:
    """Greedy continuation of `prompt` with exactly `n_tokens` new tokens: (new text, tokens per second).

    The timing covers the whole `generate` call, prompt processing included.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens} must be >= 1")
    ids = _encode(tokenizer, prompt, None, _device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                             min_new_tokens=n_tokens, do_sample=False, pad_token_id=pad)
        seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), new.numel() / seconds

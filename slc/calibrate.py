"""Calibration: run text through a model and collect what compression decisions need from each layer.

    chunks  = token_chunks(model, tokenizer, text, max_tokens)     # the text in sequences the model takes
    stats   = layer_stats(model, tokenizer, text, names)           # {layer: LayerStats}
    handle  = activation_grads(model)                              # backward passes for activations only

`layer_stats` gathers, with forward hooks, each layer's input second moments (diag(C), or C = sum x x^T)
and, with one backward pass per sequence, the squared loss gradient at its output (Fisher
sensitivities). slc.allocate, slc.lowrank and GPTQ (slc.compress) all calibrate through here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .hf import has_lm_head
from .models import calibration_text

CHUNK_TOKENS = 512        # a causal LM calibrates in sequences of at most this many tokens (and its position limit)
# an encoder calibrates on passages of at most this many tokens, each one input: sentence-transformers'
# all-MiniLM-L6-v2 embeds at most 256 word pieces. MiniLM at 3.6 bits, prose cosine (bench/results/frontier_ood.md):
# 64 / 128 / 256 tokens 0.9780 / 0.9793 / 0.9806, against 0.9732 for 512-token stretches of running text
PASSAGE_TOKENS = 256


@dataclass
class LayerStats:
    """What allocation needs to know about one layer's inputs (and outputs)."""
    x_sq: torch.Tensor                        # (in,) float64: sum over tokens of x_j^2 = diag(C)
    x_cov: torch.Tensor | None = None         # (in, in) float64: C = sum_t x_t x_t^T (distortion="full")
    out_weight: torch.Tensor | None = None    # (out,) float64: f_i = sum_t (dLoss/dy_ti)^2 (sensitivity="fisher-out")
    # (out, in) float32: F_ij = sum_t (dLoss/dy_ti)^2 x_tj^2 (sensitivity="fisher")
    weight_fisher: torch.Tensor | None = None
    tokens: int = 0
    shared_with: str | None = None            # x_sq / x_cov are the same tensors as this layer's (same input)


class Restore:
    """A handle whose remove() runs `undo` once (used beside torch hook handles)."""

    def __init__(self, undo):
        self._undo = undo

    def remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


def eval_mode(model: nn.Module) -> Restore:
    """model.eval() now; the returned handle's remove() restores training mode."""
    was_training = model.training
    model.eval()
    return Restore(lambda: model.train(was_training))


def activation_grads(model: nn.Module) -> Restore:
    """Ready `model` for backward passes that need gradients at activations only: eval mode, every
    parameter frozen, and the input embeddings' output made a leaf that requires grad. Returns a handle
    whose remove() undoes all three (call it in a finally)."""
    mode = eval_mode(model)
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))

    def undo():
        hook.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        mode.remove()
    return Restore(undo)


def token_chunks(model: nn.Module, tokenizer, text: str | None, max_tokens: int,
                 default_chars: int = 4_000) -> list[torch.Tensor]:
    """The first `max_tokens` tokens of `text` (default `slc.models.calibration_text(default_chars)`) as (1, T)
    id tensors, in the sequences the model is used on.

    A causal LM (`slc.hf.has_lm_head`) reads the text as one stream cut into sequences of CHUNK_TOKENS (and no
    longer than its position limit), as perplexity is measured. An encoder is fed one passage per input: the
    text is cut at its blank lines, and each passage is one sequence of at most PASSAGE_TOKENS (and the position
    limit) with the tokenizer's special tokens ([CLS] ... [SEP]) around it, longer ones split. Calibrating
    MiniLM on 512-token stretches of running text instead, with no [CLS] / [SEP] but the first, fitted the wrong
    sequences: bench/results/frontier_ood.md."""
    text = calibration_text(default_chars) if text is None else text
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or CHUNK_TOKENS
    if not has_lm_head(model):
        return _passages(tokenizer, text, max_tokens, min(limit, PASSAGE_TOKENS))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    size = min(limit, CHUNK_TOKENS)
    chunks = [c for c in (ids[:, i:i + size] for i in range(0, ids.shape[1], size)) if c.shape[1] >= 2]
    if not chunks:
        raise ValueError("calibration text is too short: it must tokenise to at least 2 tokens")
    return chunks


def _passages(tokenizer, text: str, max_tokens: int, size: int) -> list[torch.Tensor]:
    chunks, total = [], 0
    for passage in (p.strip() for p in text.split("\n\n")):
        if not passage or total >= max_tokens:
            continue
        enc = tokenizer(passage, max_length=size, truncation=True, return_overflowing_tokens=True)
        for ids in enc["input_ids"]:
            ids = ids[:max_tokens - total]
            if len(ids) >= 2:
                chunks.append(torch.tensor([ids]))
                total += len(ids)
    if not chunks:
        raise ValueError("calibration text is too short: it must tokenise to at least 2 tokens")
    return chunks


class StatsHooks:
    """Hooks on named modules that add each sequence's calibration statistics into `.stats` ({name: LayerStats}).

    layer_stats runs the whole model through them; slc.blockwise runs one decoder block at a time.
    Forward pre-hooks add the inputs' sum x_j^2 (and with full=True C = sum x x^T); with `fisher`, forward
    hooks put a gradient hook on every output, so a backward pass adds the squared output gradients
    (fisher="out": per output f_i; True / "weight": per weight F_ij = sum_t g_ti^2 x_tj^2). Call
    `new_sequence()` before each sequence's forward pass (count=False: a repeated pass over the same
    sequence, inputs not counted again), `end_sequence()` after its backward, `remove()` at the end.
    Layers fed the very same input tensor (q/k/v, gate/up) share one x_sq / C (`shared_with`)."""

    def __init__(self, modules: dict[str, nn.Module], full: bool = False, fisher: bool | str = False):
        self.full, self.fisher = full, fisher
        self.per_weight = fisher is True or fisher == "weight"
        self.stats: dict[str, LayerStats] = {}
        self.inputs: dict[str, torch.Tensor] = {}                # x^2 of the current sequence, for the backward
        self.state = {"x": None, "name": None, "count": True}    # count: first pass over this sequence
        self.handles = []
        for n, m in modules.items():
            self.handles.append(m.register_forward_pre_hook(self.pre_hook(n)))
            if fisher:
                self.handles.append(m.register_forward_hook(self.fwd_hook(n)))

    def new_sequence(self, count: bool = True) -> None:
        self.state.update(x=None, name=None, count=count)

    def end_sequence(self) -> None:
        self.inputs.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.new_sequence()
        self.inputs.clear()

    def pre_hook(self, name):
        stats, inputs, state = self.stats, self.inputs, self.state

        def fn(module, args):
            if not state["count"]:                           # later probe passes: same inputs, already counted
                return
            if args[0] is state["x"]:                        # same tensor as the previous layer's input
                src = stats[state["name"]]
                if name not in stats:
                    stats[name] = LayerStats(src.x_sq, src.x_cov, shared_with=state["name"])
                stats[name].tokens = src.tokens
                if self.per_weight:
                    inputs[name] = inputs[state["name"]]
                return
            state["x"], state["name"] = args[0], name
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()          # (tokens, in)
            s = stats.setdefault(name, LayerStats(torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)))
            s.x_sq += x.pow(2).sum(0)
            s.tokens += x.shape[0]
            if self.full:
                if s.x_cov is None:
                    s.x_cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                s.x_cov += x.T @ x                                                # in place: shared layers see it
            if self.per_weight:
                inputs[name] = x.pow(2).float()
        return fn

    def fwd_hook(self, name):
        stats, inputs = self.stats, self.inputs

        def fn(module, args, out):
            if out.requires_grad:
                def grad_fn(g):
                    g2 = g.detach().reshape(-1, g.shape[-1]).float().pow(2)             # (tokens, out)
                    s = stats[name]
                    if self.per_weight:
                        f = g2.T @ inputs[name]                                      # (out, in) float32
                        s.weight_fisher = f if s.weight_fisher is None else s.weight_fisher + f
                    else:
                        g2 = g2.double().sum(0)
                        s.out_weight = g2 if s.out_weight is None else s.out_weight + g2
                out.register_hook(grad_fn)
        return fn


def layer_stats(model: nn.Module, tokenizer, text: str | None, names, max_tokens: int = 512,
                full: bool = False, fisher: bool | str = False, probes: int = 0) -> dict[str, LayerStats]:
    """Calibration statistics of every layer in `names` from the first `max_tokens` tokens of `text`
    (None: `slc.models.calibration_text()`).

    The text runs in sequences of CHUNK_TOKENS (or the model's position limit). Always: the inputs'
    sum x_j^2 (and with full=True C = sum x x^T). With fisher, one backward pass per sequence for the
    squared loss gradient at every layer's output: fisher="out" keeps its per-output sum f_i,
    fisher=True / "weight" the per-weight diagonal Fisher F_ij = sum_t g_ti^2 x_tj^2.
    probes > 0 replaces the LM loss by `probes` random projections r . h of the final hidden states h
    (r ~ N(0, I), seeded): E[g g^T] is then the Gauss-Newton matrix of ||h(W + dW) - h(W)||^2, which
    needs no head and no labels (encoders such as MiniLM). Layers fed the very same input tensor
    (q/k/v, gate/up) share one x_sq / C (`shared_with`). The hooks are `StatsHooks`."""
    modules = dict(model.named_modules())
    chunks = token_chunks(model, tokenizer, text, max_tokens)
    dev = next(model.parameters()).device
    hooks = StatsHooks({n: modules[n] for n in names}, full, fisher)
    handles = [hooks]
    try:
        if fisher:
            handles.append(activation_grads(model))
        else:
            handles.append(eval_mode(model))
        gen = torch.Generator().manual_seed(0)
        for ids in chunks:
            ids = ids.to(dev)
            hooks.new_sequence()
            if not fisher:
                with torch.inference_mode():
                    model(ids)
                continue
            with torch.enable_grad():
                if probes:
                    for _ in range(probes):
                        out = model(ids)
                        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                        hooks.new_sequence(count=False)
                        (h * torch.randn(h.shape, generator=gen).to(h)).sum().backward()
                else:
                    model(ids, labels=ids).loss.backward()
            hooks.end_sequence()
    finally:
        for h in handles:
            h.remove()
    return hooks.stats

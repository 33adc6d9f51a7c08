"""Low rank for a whole model: how many singular vectors each layer keeps under one budget.

The factors of one weight (`LowRank`, `svd`, `low_rank`, `choose_rank`, `quantize_factors`) are in
slc.factors and re-exported here. This module spreads one global parameter budget over many layers
(`allocate_ranks`): alone it is greedy on energy per parameter (each layer's own relative energy);
given `rank_sensitivity` (what each singular vector is worth to the LM loss, from one backward pass
on calibration text) it spends the budget where the estimated loss increase falls most, which is
what beats one uniform rule on SmolLM2 (figures: bench/results/model.md).
"""
from __future__ import annotations

import heapq

import torch

from .calibrate import activation_grads, token_chunks
from .factors import LowRank, choose_rank, low_rank, quantize_factors, svd, whitening
from .hf import dense_weight_of, has_lm_head
from .lagrange import Point, solve
from .quant import as_float_tensor

__all__ = ["LowRank", "choose_rank", "low_rank", "quantize_factors", "svd", "whitening",   # from slc.factors
           "allocate_ranks", "rank_sensitivity", "uniform_ranks"]


def allocate_ranks(weights: dict, param_budget: int | float, x_covs: dict | None = None,
                   relative: bool = True, min_rank: int = 1, *, sensitivity: dict | None = None,
                   power: float = 2.0) -> dict[str, int]:
    """Ranks for every weight so that sum(r * (m + n)) <= param_budget.

    param_budget: an int number of parameters, or a float fraction of the dense total sum(m * n).

    Without `sensitivity`: greedy on energy per parameter. relative=True weighs each layer's S**2 by
    1 / ||W||**2 (every layer's relative error counts the same); relative=False uses raw S**2 (big-norm
    layers win). The gain of a layer's next singular value never grows, so popping the best gain per
    parameter from a heap is the classic greedy. On SmolLM2 this loses to one uniform rule: a layer's
    energy says nothing about how much the loss feels its error.

    With `sensitivity` ({name: (min(m, n),) estimated loss increase of dropping each singular vector,
    from `rank_sensitivity`; then weights may also be (m, n) shapes and x_covs / relative are unused):
    a layer kept at rank r is estimated to cost D(r) = sum of its sensitivities from r on, and the ranks
    minimise sum over layers of D(r) ** power (one Lagrange multiplier, `slc.lagrange.solve`, then
    single-rank moves to spend what is left). power=1 trusts the second-order estimate as additive;
    it is not at heavy truncation: damage compounds, and power=2 spreads it (measured on SmolLM2:
    bench/results/lowrank_allocation.md).

    >>> w = {"a": torch.randn(8, 8), "b": torch.randn(8, 8)}
    >>> sens = {"a": torch.full((8,), 1.0), "b": torch.full((8,), 100.0)}     # "b" hurts 100x more
    >>> ranks = allocate_ranks(w, 8 * 16, sensitivity=sens)                   # 8 rank steps of 8 + 8 in all
    >>> ranks["b"] > ranks["a"] and sum(r * 16 for r in ranks.values()) <= 8 * 16
    True
    """
    if not weights:
        raise ValueError("weights is empty: pass {name: 2-D weight}")
    if sensitivity is not None:
        if x_covs is not None:
            raise ValueError("sensitivity already accounts for the activations: pass x_covs to svd() when "
                             "making the factors for rank_sensitivity, not here")
        return _allocate_by_sensitivity(weights, param_budget, sensitivity, power, min_rank)
    shapes, spectra = {}, {}
    for name, w in weights.items():
        w = as_float_tensor(w, f"weight {name!r}")
        if w.dim() != 2:
            raise ValueError(f"weight {name!r} has shape {tuple(w.shape)}; low rank needs 2-D weights")
        shapes[name] = tuple(w.shape)
        cov = None if x_covs is None else x_covs.get(name)
        S = svd(w, cov)[1] if cov is not None else torch.linalg.svdvals(w.detach().float())
        e2 = S.double() ** 2
        spectra[name] = (e2 / e2.sum().clamp_min(1e-300) if relative else e2).tolist()
    param_budget = _budget(param_budget, shapes)
    ranks = {name: min(min_rank, len(spectra[name])) for name in shapes}
    left = param_budget - sum(ranks[k] * sum(shapes[k]) for k in shapes)
    if left < 0:
        raise ValueError(f"param_budget={param_budget} cannot even hold rank {min_rank} for every layer "
                         f"({param_budget - left} parameters); raise the budget or lower min_rank")
    heap = [(-spectra[k][ranks[k]] / sum(shapes[k]), k) for k in shapes if ranks[k] < len(spectra[k])]
    heapq.heapify(heap)
    while heap:
        _, k = heapq.heappop(heap)
        cost = sum(shapes[k])                                                  # one more column of U + row of Vh
        if cost > left:
            continue                                                           # its cost never changes: drop it
        ranks[k] += 1
        left -= cost
        if ranks[k] < len(spectra[k]):
            heapq.heappush(heap, (-spectra[k][ranks[k]] / cost, k))
    assert sum(r * sum(shapes[k]) for k, r in ranks.items()) <= param_budget
    return ranks


def _budget(param_budget, shapes: dict) -> int:
    """param_budget as an int number of parameters (a float is a fraction of sum(m * n))."""
    if isinstance(param_budget, bool) or not isinstance(param_budget, (int, float)):
        raise TypeError(f"param_budget must be an int (parameters) or a float fraction, got {param_budget!r}")
    if isinstance(param_budget, float):
        if not 0 < param_budget <= 1:
            raise ValueError(f"param_budget={param_budget} as a fraction must be in (0, 1]; "
                             "pass an int for an absolute number of parameters")
        return int(param_budget * sum(m * n for m, n in shapes.values()))
    return param_budget


def _allocate_by_sensitivity(weights: dict, param_budget, sensitivity: dict, power: float,
                             min_rank: int) -> dict[str, int]:
    """allocate_ranks(sensitivity=...): minimise sum_l D_l(r_l) ** power under the parameter budget."""
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 1 <= power <= 16:
        raise ValueError(f"power={power!r} must be a number in [1, 16]; 2 is the measured default")
    shapes, tails = {}, {}
    for name, w in weights.items():
        if isinstance(w, (tuple, list, torch.Size)):
            shape = tuple(int(d) for d in w)
        else:
            shape = tuple(as_float_tensor(w, f"weight {name!r}").shape)
        if len(shape) != 2:
            raise ValueError(f"weight {name!r} has shape {shape}; low rank needs 2-D weights")
        if name not in sensitivity:
            raise ValueError(f"sensitivity has no entry for {name!r}: pass rank_sensitivity() of the same layers")
        sens = torch.as_tensor(sensitivity[name]).detach().double().reshape(-1).clamp_min(0)
        if sens.numel() != min(shape):
            raise ValueError(f"sensitivity[{name!r}] has {sens.numel()} values; weight {shape} has "
                             f"{min(shape)} singular vectors: compute it from this weight's full thin SVD")
        shapes[name] = shape
        tails[name] = sens.flip(0).cumsum(0).flip(0)                           # tails[r] = D(r) = sum_{k >= r} sens_k
    param_budget = _budget(param_budget, shapes)
    floor = {n: min(min_rank, min(sh)) for n, sh in shapes.items()}
    need = sum(floor[n] * sum(sh) for n, sh in shapes.items())
    if need > param_budget:
        raise ValueError(f"param_budget={param_budget} cannot even hold rank {min_rank} for every layer "
                         f"({need} parameters); raise the budget or lower min_rank")
    top = max(float(t[floor[n]]) if floor[n] < len(t) else 0.0 for n, t in tails.items()) or 1.0
    points = {}                                                                # Point.bits holds parameters here
    for n, t in tails.items():
        full, cost = len(t), sum(shapes[n])
        d = [float(t[r]) / top if r < full else 0.0 for r in range(floor[n], full + 1)]   # scaled to [0, 1]
        points[n] = [Point("lowrank", r, r * cost, d[r - floor[n]] ** power) for r in range(floor[n], full + 1)]
    choice, _ = solve(points, param_budget, 0.0)
    # the Lagrangian lands on each layer's convex hull and can leave much unspent where D(r) is not convex:
    # spend the rest one rank at a time, best drop of D**power per parameter first (a step's cost is fixed)
    left = param_budget - sum(points[n][i].bits for n, i in choice.items())
    heap = [(-(points[n][choice[n]].distortion - points[n][choice[n] + 1].distortion) / sum(shapes[n]), n)
            for n in points if choice[n] + 1 < len(points[n])]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        if sum(shapes[n]) > left:
            continue                                                           # its cost never changes: drop it
        choice[n] += 1
        left -= sum(shapes[n])
        i, pts = choice[n], points[n]
        if i + 1 < len(pts):
            heapq.heappush(heap, (-(pts[i].distortion - pts[i + 1].distortion) / sum(shapes[n]), n))
    ranks = {n: int(points[n][i].setting) for n, i in choice.items()}
    assert sum(r * sum(shapes[k]) for k, r in ranks.items()) <= param_budget
    return ranks


def rank_sensitivity(model, tokenizer, factors: dict, calibration_text: str | None = None,
                     max_tokens: int = 2048) -> dict[str, torch.Tensor]:
    """What each singular vector of every layer is worth to a causal LM's loss, for `allocate_ranks`.

    factors: {module name: (U, S, Vh)} of that module's (out, in) weight, e.g. `svd(w, x_cov)` (full thin
    SVD, whitened or not). Returns {module name: (min(m, n),) float64}, an estimate in nats per token
    of the loss increase of dropping singular vector k alone:

        sens_k = S_k^2 / 2 * mean_t (g_t . U_k)^2 (Vh_k . x_t)^2

    with x_t the layer's input at token t and g_t the gradient of the summed LM loss at its output:
    the empirical Fisher along the rank-1 direction U_k Vh_k, from one forward and backward pass per
    sequence of `calibration_text` (default `slc.models.calibration_text(12_000)`), first `max_tokens`
    tokens. It sees what the layer's output error does downstream; S**2 alone does not.
    Weights are left as they are; parameters need no gradient.

    >>> from types import SimpleNamespace
    >>> from slc.models import tiny_model
    >>> tok = lambda text, return_tensors="pt": SimpleNamespace(input_ids=torch.tensor([list(text.encode())]) % 128)
    >>> model = tiny_model("llama")
    >>> layers = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    >>> sens = rank_sensitivity(model, tok, {n: svd(m.weight) for n, m in layers.items()}, "some text " * 20)
    >>> ranks = allocate_ranks({n: m.weight.shape for n, m in layers.items()}, 0.5, sensitivity=sens)
    >>> used = sum(r * sum(layers[n].weight.shape) for n, r in ranks.items())
    >>> used <= 0.5 * sum(m.weight.numel() for m in layers.values())
    True
    """
    if not factors:
        raise ValueError("factors is empty: pass {module name: svd(weight)} for the layers to allocate")
    if not has_lm_head(model):
        raise ValueError(f"{type(model).__name__} has no LM head: rank_sensitivity needs a causal LM loss")
    modules = dict(model.named_modules())
    dev = next(model.parameters()).device
    fac = {}
    for name, (U, S, Vh) in factors.items():
        if name not in modules:
            raise ValueError(f"{name!r} is not a module of this model: use names from model.named_modules()")
        out_f, in_f = dense_weight_of(modules[name]).shape
        if U.shape[0] != out_f or Vh.shape[1] != in_f or not U.shape[1] == S.numel() == Vh.shape[0]:
            raise ValueError(f"factors[{name!r}] do not fit its ({out_f}, {in_f}) weight: pass svd(weight) "
                             f"with U ({out_f}, r), S (r,), Vh (r, {in_f})")
        fac[name] = (U.detach().float().to(dev), S.detach().double().cpu(), Vh.detach().float().to(dev))
    chunks = token_chunks(model, tokenizer, calibration_text, max_tokens, default_chars=12_000)
    acc = {n: torch.zeros(S.numel(), dtype=torch.float64) for n, (_, S, _) in fac.items()}
    state = {"scale": 1.0}                       # predicted tokens in this sequence: mean loss -> summed loss

    def hook(name):
        U, _, Vh = fac[name]

        def fn(module, args, out):
            if not out.requires_grad:
                return
            q2 = (args[0].detach().reshape(-1, Vh.shape[1]).float() @ Vh.T).pow(2)       # (T, r): (Vh_k . x_t)^2

            def grad_fn(g):
                p2 = (g.detach().reshape(-1, U.shape[0]).float() @ U).pow(2)           # (T, r): (g_t . U_k)^2
                acc[name] += (p2 * q2).sum(0).double().cpu() * state["scale"] ** 2
            out.register_hook(grad_fn)
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in fac]
    tokens = 0
    try:
        handles.append(activation_grads(model))                               # gradients flow, weights need none
        for chunk in chunks:
            state["scale"] = chunk.shape[1] - 1
            tokens += chunk.shape[1] - 1
            with torch.enable_grad():
                model(chunk.to(dev), labels=chunk.to(dev)).loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {n: fac[n][1] ** 2 * acc[n] / (2 * tokens) for n in fac}


def uniform_ranks(weights: dict[str, torch.Tensor], fraction: float) -> dict[str, int]:
    """The same parameter fraction for every layer: r = floor(fraction * m n / (m + n)), at least 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    return {k: max(1, int(fraction * w.shape[0] * w.shape[1] / (w.shape[0] + w.shape[1]))) for k, w in weights.items()}

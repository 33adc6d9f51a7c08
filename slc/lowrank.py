"""Low rank: a weight W (m, n) kept as a truncated SVD, W ~= U diag(S) Vh.

    U (m, r), S (r,), Vh (r, n): r * (m + n) parameters instead of m * n
    (plus the r values of S, which we do not count: they are noise next to r * (m + n)).

Rank is chosen by one of
    rank     a fixed number
    energy   smallest r keeping this fraction of sum(S**2)
    error    smallest r with relative Frobenius error ||W - W_r|| / ||W|| <= error
and `allocate_ranks` spreads one global parameter budget over many layers. Alone it is greedy on
energy per parameter (each layer's own relative energy); given `rank_sensitivity` (what each singular
vector is worth to the LM loss, from one backward pass on calibration text) it spends the budget where
the estimated loss increase falls most, which is what beats one uniform rule on SmolLM2.

S is kept apart, not folded into U or Vh: the factors stay orthonormal, so quantising
them with one scale per singular vector (U by column, Vh by row; see `quantize_factors`)
does not depend on how big that singular value is, the spectrum stays available for plots,
and the price is r multiplies per token.

Activation-aware SVD (`x_cov`): with C = E[x x^T] over calibration inputs, the output error
||(W - W_r) x|| is what matters, not ||W - W_r||. Whitening does the truncation in that norm:
    W' = W C^(1/2)  ->  SVD  W' = U S Vh'  ->  Vh = Vh' C^(-1/2)
so U diag(S) Vh = W exactly at full rank, and S, energy and error are measured in the
output norm. Vh is then no longer orthonormal.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from .quant import QuantizedTensor, Quantizer, as_float_tensor


@dataclass
class LowRank:
    """Truncated SVD factors of one weight: W ~= U @ diag(S) @ Vh.

    tensor fields: U (m, r), S (r,), Vh (r, n), all float32
    attributes:    shape (m, n), dtype (the weight's), whitened (x_cov was used)

    >>> w = torch.randn(6, 5)
    >>> lr = low_rank(w, rank=5)                  # full rank: exact up to float rounding
    >>> bool(torch.allclose(lr.dense(), w, atol=1e-5)) and lr.params == 5 * (6 + 5)
    True
    """
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    shape: tuple
    dtype: torch.dtype = torch.float32
    whitened: bool = False

    @property
    def rank(self) -> int:
        return self.S.numel()

    @property
    def params(self) -> int:
        """r * (m + n): what the two factors hold."""
        return self.rank * (self.shape[0] + self.shape[1])

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """U diag(S) Vh in the weight's dtype (or `dtype`)."""
        return ((self.U * self.S) @ self.Vh).to(dtype or self.dtype)


def _sqrt_and_inv_sqrt(x_cov: torch.Tensor, n: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """C^(1/2) and C^(-1/2) of a second-moment matrix (n, n) or its diagonal (n,)."""
    c = x_cov.detach().to(torch.float64)
    if c.shape not in ((n,), (n, n)):
        raise ValueError(f"x_cov must have shape ({n},) or ({n}, {n}) for a weight with {n} inputs, "
                         f"got {tuple(c.shape)}; pass E[x x^T] of the layer's inputs")
    if c.dim() == 1:
        d = c.clamp_min(0) + damp * c.clamp_min(0).mean().clamp_min(1e-30)
        return torch.diag(d.sqrt()), torch.diag(d.rsqrt())
    c = (c + c.T) / 2
    lam, Q = torch.linalg.eigh(c)
    lam = lam.clamp_min(0) + damp * lam.clamp_min(0).mean().clamp_min(1e-30)   # damping keeps C^(-1/2) finite
    return (Q * lam.sqrt()) @ Q.T, (Q * lam.rsqrt()) @ Q.T


def svd(w, x_cov: torch.Tensor | None = None, damp: float = 1e-6):
    """Full thin SVD (U, S, Vh) in float32, whitened by `x_cov` when given (see module docstring)."""
    w = as_float_tensor(w, "weight")
    if w.dim() != 2:
        raise ValueError(f"low rank needs a 2-D weight, got shape {tuple(w.shape)}")
    if x_cov is None:                                                          # float32 is plenty to rank directions
        return torch.linalg.svd(w.detach().float(), full_matrices=False)
    root, inv_root = _sqrt_and_inv_sqrt(x_cov, w.shape[1], damp)               # float64: C can be ill-conditioned
    U, S, Vh = torch.linalg.svd(w.detach().double() @ root, full_matrices=False)   # W' = W C^(1/2)
    Vh = Vh @ inv_root                                                         # Vh = Vh' C^(-1/2)
    return U.float(), S.float(), Vh.float()


def choose_rank(S: torch.Tensor, rank: int | None = None, energy: float | None = None,
                error: float | None = None) -> int:
    """The rank that one of `rank` / `energy` / `error` asks for, given singular values S (descending)."""
    given = [k for k, v in (("rank", rank), ("energy", energy), ("error", error)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of rank=, energy=, error= (got {given or 'none'}), "
                         "e.g. rank=64 or energy=0.9 or error=0.1")
    full = S.numel()
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be an int, got {rank!r}")
        if not 1 <= rank <= full:
            raise ValueError(f"rank={rank} is out of range for this weight: use 1..{full} (= min(m, n))")
        return rank
    e2 = S.double() ** 2
    total = float(e2.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(e2, 0) / total                                         # kept[r-1] = energy of rank r
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy={energy} must be a fraction in (0, 1], e.g. 0.9")
        return min(int((kept < energy - 1e-12).sum()) + 1, full)
    if not 0 <= error < 1:
        raise ValueError(f"error={error} must be a relative error in [0, 1), e.g. 0.1")
    rel_err = (1 - kept).clamp_min(0).sqrt()                                   # rel_err[r-1] = ||W - W_r|| / ||W||
    return min(int((rel_err > error + 1e-12).sum()) + 1, full)


def low_rank(w, rank: int | None = None, energy: float | None = None, error: float | None = None,
             x_cov: torch.Tensor | None = None) -> LowRank:
    """Truncated SVD of `w` at the rank asked for by exactly one of rank / energy / error."""
    w = as_float_tensor(w, "weight")
    U, S, Vh = svd(w, x_cov)
    r = choose_rank(S, rank, energy, error)
    return LowRank(U[:, :r].contiguous(), S[:r].contiguous(), Vh[:r].contiguous(),
                   tuple(w.shape), w.dtype, x_cov is not None)


def quantize_factors(lr: LowRank, quantizer: Quantizer) -> tuple[QuantizedTensor, QuantizedTensor]:
    """Quantise U^T (r, m) and Vh (r, n): with granularity="channel" (axis 0), one scale per singular vector."""
    return quantizer.quantize(lr.U.T.contiguous()), quantizer.quantize(lr.Vh)


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
    minimise sum over layers of D(r) ** power (one Lagrange multiplier, `slc.allocate.solve`, then
    single-rank moves to spend what is left). power=1 trusts the second-order estimate as additive;
    it is not at heavy truncation: damage compounds, and power=2 spreads it. SmolLM2, activation-aware
    SVD, perplexity on 2756 evaluation tokens (fp32: 16.2), at 50 / 75 / 90 % of the parameters:
    power 2: 119 / 35.7 / 24.2; power 1: 157 / 36.6 / 24.0; one uniform fraction: 312 / 77.2 / 38.3;
    the energy greedy above: 3662 / 83.4 / 41.4.

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
    from .allocate import Point, solve

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
    from .allocate import CHUNK_TOKENS, _weight, activation_grads
    from .models import calibration_text as default_text

    if not factors:
        raise ValueError("factors is empty: pass {module name: svd(weight)} for the layers to allocate")
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise ValueError(f"{type(model).__name__} has no LM head: rank_sensitivity needs a causal LM loss")
    modules = dict(model.named_modules())
    dev = next(model.parameters()).device
    fac = {}
    for name, (U, S, Vh) in factors.items():
        if name not in modules:
            raise ValueError(f"{name!r} is not a module of this model: use names from model.named_modules()")
        out_f, in_f = _weight(modules[name]).shape
        if U.shape[0] != out_f or Vh.shape[1] != in_f or not U.shape[1] == S.numel() == Vh.shape[0]:
            raise ValueError(f"factors[{name!r}] do not fit its ({out_f}, {in_f}) weight: pass svd(weight) "
                             f"with U ({out_f}, r), S (r,), Vh (r, {in_f})")
        fac[name] = (U.detach().float().to(dev), S.detach().double().cpu(), Vh.detach().float().to(dev))
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or CHUNK_TOKENS
    text = calibration_text if calibration_text is not None else default_text(12_000)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    size = min(limit, CHUNK_TOKENS)
    chunks = [c for c in (ids[:, i:i + size] for i in range(0, ids.shape[1], size)) if c.shape[1] >= 2]
    if not chunks:
        raise ValueError("calibration text is too short: it must tokenise to at least 2 tokens")
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

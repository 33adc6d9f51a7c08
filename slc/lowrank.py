"""Low rank: a weight W (m, n) kept as a truncated SVD, W ~= U diag(S) Vh.

    U (m, r), S (r,), Vh (r, n): r * (m + n) parameters instead of m * n
    (plus the r values of S, which we do not count: they are noise next to r * (m + n)).

Rank is chosen by one of
    rank     a fixed number
    energy   smallest r keeping this fraction of sum(S**2)
    error    smallest r with relative Frobenius error ||W - W_r|| / ||W|| <= error
and `allocate_ranks` spreads one global parameter budget over many layers, greedily
giving the next singular vector to the layer where it buys the most energy per parameter.

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
                   relative: bool = True, min_rank: int = 1) -> dict[str, int]:
    """Ranks for every weight so that sum(r * (m + n)) <= param_budget, greedy on energy per parameter.

    param_budget: an int number of parameters, or a float fraction of the dense total sum(m * n).
    relative=True weighs each layer's S**2 by 1 / ||W||**2 (every layer's relative error counts the
    same); relative=False uses raw S**2 (big-norm layers win). The gain of a layer's next singular
    value never grows, so popping the best gain per parameter from a heap is the classic greedy.
    """
    if not weights:
        raise ValueError("weights is empty: pass {name: 2-D weight}")
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
    dense = sum(m * n for m, n in shapes.values())
    if isinstance(param_budget, bool) or not isinstance(param_budget, (int, float)):
        raise TypeError(f"param_budget must be an int (parameters) or a float fraction, got {param_budget!r}")
    if isinstance(param_budget, float):
        if not 0 < param_budget <= 1:
            raise ValueError(f"param_budget={param_budget} as a fraction must be in (0, 1]; "
                             "pass an int for an absolute number of parameters")
        param_budget = int(param_budget * dense)
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


def uniform_ranks(weights: dict[str, torch.Tensor], fraction: float) -> dict[str, int]:
    """The same parameter fraction for every layer: r = floor(fraction * m n / (m + n)), at least 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    return {k: max(1, int(fraction * w.shape[0] * w.shape[1] / (w.shape[0] + w.shape[1]))) for k, w in weights.items()}

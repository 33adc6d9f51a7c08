"""Truncated SVD factors of one weight: W (m, n) ~= U diag(S) Vh.

    U (m, r), S (r,), Vh (r, n): r * (m + n) parameters instead of m * n
    (plus the r values of S, which we do not count: they are noise next to r * (m + n)).

Rank is chosen by one of
    rank     a fixed number
    energy   smallest r keeping this fraction of sum(S**2)
    error    smallest r with relative Frobenius error ||W - W_r|| / ||W|| <= error
(how to spread one budget over many layers is slc.lowrank's job).

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


def whitening(x_cov: torch.Tensor, n: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """C^(1/2) and C^(-1/2) of a second-moment matrix (n, n) or its diagonal (n,), damped to stay finite."""
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
    root, inv_root = whitening(x_cov, w.shape[1], damp)               # float64: C can be ill-conditioned
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

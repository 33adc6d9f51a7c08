"""Incoherence processing: a randomised block-Hadamard rotation of a weight's input side.

    R = D H_b,   D = diag(random signs, seeded),   H_b = blockdiag(H, ..., H) / sqrt(b)

H is the Sylvester Hadamard matrix of size b, the largest power of two dividing the width (576 = 9 x 64
gives b = 64, 1536 -> 512, 384 -> 128), so any width with a power-of-two factor works. R is orthogonal,
so y = W x = (W R)(R^T x): quantise W R instead of W and rotate the activations back in the forward
pass. Spreading each row over many columns makes it more Gaussian (fewer outliers), which is what a
fixed-level grid (int4 absmax) wants; an entropy-coded ECSQ grid pays outliers only a few bits each.
Measured in bench/frontier_ood.py (phase "rotate"); not part of the stored format (yet).
"""
from __future__ import annotations

import torch


def hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of size n (a power of two), entries +-1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def block_size(width: int, max_block: int = 512) -> int:
    """The largest power of two dividing `width`, at most max_block."""
    if width < 2 or width & -width < 2:
        raise ValueError(f"width {width} has no power-of-two factor: a block-Hadamard rotation cannot cover it; "
                         "leave this layer unrotated")
    return min(width & -width, max_block)


def rotation(width: int, seed: int = 0, max_block: int = 512) -> torch.Tensor:
    """The orthogonal (width, width) float64 matrix R = diag(signs) blockdiag(H_b) / sqrt(b)."""
    b = block_size(width, max_block)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (width,), generator=g, dtype=torch.float64) * 2 - 1
    h = hadamard(b) / b ** 0.5
    return signs[:, None] * torch.block_diag(*([h] * (width // b)))


def rotate_stats(x_cov: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """diag(R^T C R): the per-column mean squared activation of the rotated inputs R^T x."""
    return ((x_cov.double() @ r) * r).sum(0)

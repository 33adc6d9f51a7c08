"""Incoherence processing: a randomised block-Hadamard rotation of a weight's input side.

    R = D H_b,   D = diag(random signs, seeded),   H_b = blockdiag(H, ..., H) / sqrt(b)

H is the Sylvester Hadamard matrix of size b, the largest power of two dividing the width (576 = 9 x 64
gives b = 64, 1536 -> 512, 384 -> 128), so any width with a power-of-two factor works. R is orthogonal,
so y = W x = (W R)(R^T x): quantise W R instead of W and rotate the activations in the forward pass.
Spreading each row over many columns makes it more Gaussian (fewer outliers), which is what a
fixed-level grid (int4 absmax) wants; an entropy-coded ECSQ grid pays outliers only a few bits each.

Each column mixes only with the others of its block (64 of SmolLM2's 576). Mixing the blocks too was tried
(session 11, not kept): R = D (Q kron H_b), Q a seeded random orthogonal matrix over the blocks, so that every
column of W R draws on the whole width. On SmolLM2 off its Q4_1 grid (blocks 3 and 15, trellis codes at 3.57
bits, weighted steps, GPTQ damp 1, rotation seeds 0-2) the layers' relative output error moved by under 1 %
(0.00192 -> 0.00190 with C from the calibration mix, 0.00334 -> 0.00333 from prose). compress_to_budget at 3.57
bits gave prose Δ perplexity 27.1 / 48.4 / 47.3 % with it against 41.0 / 35.8 / 37.6 % without, which is within
the spread between seeds.

`Rotation(width, seed)` is the transform without its matrix: the seed and b rebuild it, so a file stores
two numbers (`to_dict`), never a matrix. It works on rows (the last dimension), as activations are laid out:

    rot.apply(x)                 x R     = the activations R^T x a rotated layer multiplies with; also W R
    rot.apply(x, inverse=True)   x R^T   (undoes apply: the effective weight of a rotated layer is Q(W R) R^T)
    rot.conjugate(C)             R^T C R (a Hessian or input covariance in the rotated basis)

The transform is the signs, then one batched (b x b) matmul per block (a (..., n_blocks, b) view times H_b):
faster than a fast Walsh-Hadamard butterfly of log2(b) torch steps at one row (generation) for every block
size and at 512 rows for b <= 128; the butterfly is ahead only for b = 512 with many rows
(bench/rotation_transform.py). `slc.nn.LinearSpec(rotate="hadamard")` stores a layer this way (file format
version 3); bench/frontier_ood.py (phase "rotate") measures what it does to quality per bit.
"""
from __future__ import annotations

import torch

KINDS = ("hadamard",)
MAX_BLOCK = 512               # the largest block a spec picks: a (512 x 512) matmul per block stays cheap
BLOCK_LIMIT = 4096            # the largest block a file may name (its matrix is built in memory: 64 MiB fp32)
SEED_LIMIT = 2 ** 63          # seeds are ints in [0, 2^63) (torch.Generator.manual_seed)
_HALF = (torch.float16, torch.bfloat16)


def hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of size n (a power of two), entries +-1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def block_size(width: int, max_block: int = MAX_BLOCK) -> int:
    """The largest power of two dividing `width`, at most max_block."""
    if width < 2 or width & -width < 2:
        raise ValueError(f"width {width} has no power-of-two factor: a block-Hadamard rotation cannot cover it; "
                         "leave this layer unrotated")
    return min(width & -width, max_block)


def random_signs(width: int, seed: int) -> torch.Tensor:
    """The diagonal of D: `width` seeded +-1 values, float64 (the same on every machine)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (width,), generator=g, dtype=torch.float64) * 2 - 1


class Rotation:
    """The seeded orthogonal R = diag(signs) blockdiag(H_b) / sqrt(b) of a width, applied without its matrix.

    >>> rot = Rotation(576, seed=3)
    >>> x, w = torch.randn(2, 576), torch.randn(8, 576)
    >>> bool(torch.allclose(rot.apply(x) @ rot.apply(w).T, x @ w.T, atol=1e-4))      # (W R)(R^T x) = W x
    True
    >>> bool(torch.allclose(rot.apply(rot.apply(x), inverse=True), x, atol=1e-5))
    True
    >>> Rotation.from_dict(rot.to_dict(), 576).block
    64
    """

    def __init__(self, width: int, seed: int = 0, block: int | None = None):
        if isinstance(width, bool) or not isinstance(width, int):
            raise TypeError(f"width must be an int, got {width!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed={seed!r} must be an int in [0, 2**63)")
        self.block = block_size(width) if block is None else block
        b = self.block
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= BLOCK_LIMIT or b & (b - 1) or width % b:
            raise ValueError(f"block={b!r} must be a power of two in 2..{BLOCK_LIMIT} dividing the width {width}")
        self.width, self.seed = width, seed
        self.signs = random_signs(width, seed)
        self._tables: dict = {}                     # (device, dtype) -> (signs, H_b / sqrt(b)): built once each

    def to_dict(self) -> dict:
        """What a file stores: the kind, the seed and the block size (the matrix is rebuilt from them)."""
        return {"kind": "hadamard", "seed": self.seed, "block": self.block}

    @classmethod
    def from_dict(cls, d, width: int) -> "Rotation":
        """The rotation a file's JSON describes, validated (ValueError / TypeError: the loader's FormatError)."""
        if not isinstance(d, dict) or set(d) != {"kind", "seed", "block"}:
            raise ValueError(f"rotation must be a JSON object with kind, seed and block, got {d!r:.80}")
        if d["kind"] not in KINDS:
            raise ValueError(f"rotation kind {d['kind']!r} is not one of {KINDS}")
        return cls(width, d["seed"], d["block"])

    def __eq__(self, other) -> bool:
        return isinstance(other, Rotation) and (self.width, self.seed, self.block) == (
            other.width, other.seed, other.block)

    def __hash__(self) -> int:
        return hash((self.width, self.seed, self.block))

    def __repr__(self) -> str:
        return f"Rotation(width={self.width}, seed={self.seed}, block={self.block})"

    def _table(self, device, dtype):
        key = (device, dtype)
        if key not in self._tables:
            h = hadamard(self.block) / self.block ** 0.5
            self._tables[key] = (self.signs.to(device, dtype), h.to(device, dtype))
        return self._tables[key]

    def apply(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x R over the last dimension (x R^T with inverse=True), in x's dtype (half types computed in fp32)."""
        if x.shape[-1] != self.width:
            raise ValueError(f"the rotation is {self.width} wide, the input's last dimension is {x.shape[-1]}")
        xf = x.float() if x.dtype in _HALF else x
        signs, h = self._table(xf.device, xf.dtype)
        if not inverse:
            xf = xf * signs                                               # x D
        y = (xf.reshape(*xf.shape[:-1], -1, self.block) @ h).reshape(xf.shape)   # (..., n_blocks, b) @ H_b
        if inverse:
            y = y * signs                                                 # (x H_b) D = x R^T (H_b symmetric)
        return y.to(x.dtype)

    def conjugate(self, c: torch.Tensor) -> torch.Tensor:
        """R^T C R of a symmetric (width, width) matrix C, e.g. GPTQ's Hessian in the rotated basis."""
        return self.apply(self.apply(c).T.contiguous())                  # (C R)^T R = R^T C R for symmetric C

    def matrix(self) -> torch.Tensor:
        """The explicit (width, width) float64 R (for tests and measurements; the layers never build it)."""
        return self.apply(torch.eye(self.width, dtype=torch.float64))


def rotation(width: int, seed: int = 0, max_block: int = MAX_BLOCK) -> torch.Tensor:
    """The orthogonal (width, width) float64 matrix R = diag(signs) blockdiag(H_b) / sqrt(b)."""
    b = block_size(width, max_block)
    h = hadamard(b) / b ** 0.5
    return random_signs(width, seed)[:, None] * torch.block_diag(*([h] * (width // b)))


def rotate_stats(x_cov: torch.Tensor, r: torch.Tensor | Rotation) -> torch.Tensor:
    """diag(R^T C R): the per-column mean squared activation of the rotated inputs R^T x (r: matrix or Rotation)."""
    if isinstance(r, Rotation):
        return torch.diagonal(r.conjugate(x_cov.double())).clone()
    return ((x_cov.double() @ r) * r).sum(0)

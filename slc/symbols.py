"""Integer codes <-> the non-negative symbols an entropy coder takes, and what they cost.

Everything between a quantiser's codes and the rANS coder lives here:

    zig-zag     z = 2c for c >= 0, -2c - 1 for c < 0       0, -1, 1, -2, 2 ... -> 0, 1, 2, 3, 4 ...
                (signed ECSQ codes become small non-negative symbols, small first)
    escapes     symbols z < E are coded as themselves; every z >= E is coded as the escape
                symbol E and its code is kept apart (int32, in order). E is picked per tensor
                to minimise table + payload + escapes (`choose_escape`), E < 2**16 always, so
                a 16-bit alphabet is exact for any code a 32-bit integer holds.
    predictors  none: the symbols themselves; left: each symbol minus its left neighbour along
                the row, modulo 2**bits (row starts kept). Exactly invertible.
    entropy     `entropy_bits`: the order-0 empirical entropy in total bits, the floor any
                coder that ignores context pays. The one entropy function of slc.

>>> import numpy as np
>>> codes = np.array([0, -1, 3, 70000, -2])
>>> sym, E, esc = split_escapes(codes)
>>> bool((join_escapes(sym, E, esc) == codes).all()) and list(esc) == [70000]
True
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import FormatError

ESCAPE_LIMIT = (1 << 16) - 1     # the escape symbol itself must be a 16-bit symbol
ESCAPE_BITS = 32                 # an escaped code is stored as a raw int32
PREDICTORS = ("none", "left")
BINCOUNT_LIMIT = 1 << 22         # value_counts: bincount below this (a 32 MB histogram), np.unique above


# ----------------------------------------------------------------------------
# entropy

def value_counts(values) -> tuple[np.ndarray, np.ndarray]:
    """(values present, ascending; their counts) of an integer array; bincount when the values are small."""
    v = np.asarray(values).reshape(-1)
    if v.size and v.dtype.kind in "iub" and int(v.min()) >= 0 and int(v.max()) < BINCOUNT_LIMIT:
        counts = np.bincount(v.astype(np.int64))
        present = np.flatnonzero(counts)
        return present, counts[present]
    return np.unique(v, return_counts=True)


def entropy_from_counts(counts, n: int | None = None) -> float:
    """Order-0 entropy in total bits of a source with these symbol counts: -sum c log2(c / n)."""
    c = np.asarray(counts)
    c = c[c > 0].astype(np.float64)
    if c.size == 0:
        return 0.0
    n = float(c.sum()) if n is None else float(n)
    return float(-(c * np.log2(c / n)).sum())


def entropy_bits(values) -> float:
    """Order-0 empirical entropy of an integer array (numpy, torch or list; any range), in total bits."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    v = np.asarray(values)
    if v.dtype.kind not in "iub":
        raise TypeError(f"symbols must be integers (e.g. quantised codes), got dtype {v.dtype}; "
                        "quantise float weights first")
    if v.size == 0:
        return 0.0
    return entropy_from_counts(value_counts(v)[1], v.size)


# ----------------------------------------------------------------------------
# zig-zag and escapes

def zigzag(codes) -> np.ndarray:
    """Signed codes -> non-negative uint32: 0, -1, 1, -2, 2 ... -> 0, 1, 2, 3, 4 ..."""
    c = np.asarray(codes).astype(np.int64)
    return np.where(c >= 0, 2 * c, -2 * c - 1).astype(np.uint32)


def unzigzag(z):
    """Inverse of zigzag, for numpy arrays (-> int64) or torch integer tensors (-> int64)."""
    if isinstance(z, torch.Tensor):
        z = z.to(torch.int64)
        return (z >> 1) ^ -(z & 1)
    z = np.asarray(z).astype(np.int64)
    return (z >> 1) ^ -(z & 1)


def code_dtype(codes):
    """int16 when every code fits, else int32 (how signed ECSQ codes are stored); a numpy dtype for a numpy
    array, a torch dtype for a tensor."""
    torch_in = isinstance(codes, torch.Tensor)
    fits = codes.numel() == 0 if torch_in else codes.size == 0
    fits = fits or (-2 ** 15 <= int(codes.min()) and int(codes.max()) < 2 ** 15)
    if torch_in:
        return torch.int16 if fits else torch.int32
    return np.int16 if fits else np.int32


def escape_from_counts(vals: np.ndarray, counts: np.ndarray, n: int) -> int:
    """`choose_escape` from a histogram: zig-zag values present (ascending) and their counts.

    Cost of a cap E, in bits: sum over kept values c_v log2(n / c_v) + n_esc (log2(n / n_esc) + 32)
    + about 16 bits of table per kept value. Candidates are E = v + 1 for every value v present.
    """
    ok = vals < ESCAPE_LIMIT                                   # E = v + 1 must still be a 16-bit symbol
    if not ok.any():
        return 0                                               # everything escapes (absurd steps only)
    vals, counts = vals[ok], counts[ok].astype(np.float64)
    kept_bits = np.cumsum(counts * np.log2(n / counts))        # E = vals[j] + 1 keeps vals[:j+1]
    n_esc = n - np.cumsum(counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        esc_bits = np.where(n_esc > 0, n_esc * (np.log2(n / np.maximum(n_esc, 1)) + ESCAPE_BITS), 0.0)
    table_bits = 16.0 * np.arange(1, vals.size + 1) + np.where(n_esc > 0, 16.0, 0.0)
    j = int(np.argmin(kept_bits + esc_bits + table_bits))
    return int(vals[j]) + 1


def choose_escape(z: np.ndarray) -> int:
    """Escape symbol E (< 2**16) minimising coded size: symbols z < E as is, z >= E escaped (32 bits each)."""
    if z.size == 0:
        return 1
    vals, counts = value_counts(z)
    return escape_from_counts(vals, counts, z.size)


def split_escapes(codes: np.ndarray, escape: int | None = None):
    """Signed codes -> (uint16 symbols, escape symbol E, int32 codes of the escaped positions in order)."""
    codes = np.asarray(codes).reshape(-1)
    z = zigzag(codes)
    E = choose_escape(z) if escape is None else int(escape)
    if not 0 <= E <= ESCAPE_LIMIT:
        raise ValueError(f"escape symbol {E} must be in 0..{ESCAPE_LIMIT}")
    esc = z >= E
    sym = np.where(esc, E, z).astype(np.uint16)
    return sym, E, codes[esc].astype(np.int32)


def join_escapes(symbols, escape: int, escapes):
    """Inverse of split_escapes: symbols (numpy or torch) -> int64 codes (same library, same device)."""
    if isinstance(symbols, torch.Tensor):
        s = symbols.to(torch.int64)
        codes = unzigzag(s)
        hit = s == escape
        esc = torch.as_tensor(escapes, device=s.device).to(torch.int64)
        if int(hit.sum()) != esc.numel():
            raise FormatError(f"stream has {int(hit.sum())} escape symbols but {esc.numel()} escaped codes")
        return codes.masked_scatter(hit, esc)
    s = np.asarray(symbols).astype(np.int64)
    codes = unzigzag(s)
    hit = s == escape
    esc = np.asarray(escapes).astype(np.int64).reshape(-1)
    if int(hit.sum()) != esc.size:
        raise FormatError(f"stream has {int(hit.sum())} escape symbols but {esc.size} escaped codes")
    codes[hit] = esc
    return codes


# ----------------------------------------------------------------------------
# predictors

def _rows(n: int, shape) -> tuple[int, int]:
    """Codes are predicted along the last dimension: (rows, row length)."""
    row = shape[-1] if len(shape) else 1
    return (n // row if row else 0), row


def apply_predictor(symbols: np.ndarray, name: str, bits: int, shape) -> np.ndarray:
    """Symbols -> residual symbols for predictor `name` (exactly invertible by `undo_predictor`)."""
    if name == "none":
        return symbols
    rows, row = _rows(symbols.size, shape)
    s = symbols.reshape(rows, row).astype(np.int32)
    r = s.copy()
    r[:, 1:] = (s[:, 1:] - s[:, :-1]) & ((1 << bits) - 1)     # r = (s - left) mod 2**bits
    return r.reshape(-1).astype(np.uint16)


def undo_predictor(residuals, name: str, bits: int, shape):
    """Residual symbols -> symbols (numpy array or torch tensor, on any device)."""
    if name == "none":
        return residuals
    rows, row = _rows(residuals.shape[0], shape)
    mask = (1 << bits) - 1
    if isinstance(residuals, torch.Tensor):
        return (residuals.reshape(rows, row).to(torch.int64).cumsum(dim=1) & mask).reshape(-1)
    return (residuals.reshape(rows, row).astype(np.int64).cumsum(axis=1) & mask).reshape(-1).astype(np.uint16)

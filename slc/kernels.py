"""CPU matmul kernels torch does not have: int8 weights times float32 activations, for a few rows.

Token-by-token generation multiplies one activation row by every weight matrix. For a float32
row, torch has no int8-weight kernel (`_weight_int8pack_mm` is fast only for bfloat16
activations), so the fallback converts all the codes to float32 on every call, which costs more
than the dense float32 matmul it replaces. `int8_linear` reads the int8 codes directly, a quarter of
the bytes of a float32 weight, and accumulates in float32:

    y[i, j] = scale[j] * sum_t x[i, t] * codes[j, t]

Measured on this repo's 2-core CPU (torch 2.13, 2 threads, one row; script in the issue-3 notes):
    weight 1536 x 576: dense fp32 F.linear 70 us | codes.to(fp32) + F.linear 111 us | this kernel 21 us
    weight  576 x 576: dense fp32 F.linear 28 us | codes.to(fp32) + F.linear  83 us | this kernel  9 us
Its cost grows linearly with the rows (no blocking over rows), so it pays up to about 8 rows
(126 us vs 174 us dense at 1536 x 576) and `MAX_ROWS` keeps it to those. Many rows (a prompt, a
perplexity window) are compute-bound and go to torch's GEMM instead.

The kernels are numba functions, parallel over output rows. numba would pick its "omp" layer
(GNU OpenMP) where it can, and a process that forks after using it is killed ("fork() called from
a process already using GNU OpenMP"): DataLoader workers, multiprocessing. So, unless the user
chose a layer (NUMBA_THREADING_LAYER) or numba already started one, importing this module selects
"workqueue", which survives fork; it must not be entered from two Python threads at once, so
calls are serialised by a lock.
"""
from __future__ import annotations

import os
import threading

import numba
import numpy as np
import torch
from numba import njit, prange

if (numba.config.THREADING_LAYER == "default" and "NUMBA_THREADING_LAYER" not in os.environ
        and not numba.np.ufunc.parallel._is_initialized):
    numba.config.THREADING_LAYER = "workqueue"

MAX_ROWS = 8                    # rows of x up to which int8_linear beats dequantise-then-matmul (measured)
_lock = threading.Lock()


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _int8_rows(x, codes, scale, out):
    """out[i, j] = scale[j] * dot(x[i], codes[j]) for x (r, k) f32, codes (n, k) int8, scale (n,) f32."""
    r, k = x.shape
    for j in prange(codes.shape[0]):
        for i in range(r):
            acc = np.float32(0.0)
            for t in range(k):
                acc += x[i, t] * np.float32(codes[j, t])
            out[i, j] = acc * scale[j]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _packed_rows(x, packed, scale, zero_point, has_zp, qmin, gs, out):
    """out[i, j] = sum_g scale[j, g] * sum_{t in g} x[i, t] * (code[j, t] - zp[j, g]) for 4-bit codes
    packed two per byte, row-major, low nibble first (code = nibble + qmin); k and gs even."""
    r, k = x.shape
    n_groups = k // gs
    for j in prange(out.shape[1]):
        base = (j * k) >> 1
        for i in range(r):
            acc = np.float32(0.0)
            for g in range(n_groups):
                a = np.float32(0.0)
                xs = np.float32(0.0)
                for t in range(g * gs, (g + 1) * gs, 2):
                    b = packed[base + (t >> 1)]
                    x0, x1 = x[i, t], x[i, t + 1]
                    a += x0 * np.float32(b & 15) + x1 * np.float32(b >> 4)
                    xs += x0 + x1
                off = np.float32(qmin) - (zero_point[j, g] if has_zp else np.float32(0.0))
                acc += scale[j, g] * (a + off * xs)
            out[i, j] = acc


def usable(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """True when int8_linear applies: CPU float32 input of at most MAX_ROWS rows, no autograd needed."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and codes.device.type == "cpu"
            and codes.dtype == torch.int8 and codes.dim() == 2 and x.shape[-1] == codes.shape[1]
            and x.numel() // max(x.shape[-1], 1) <= MAX_ROWS
            and not (torch.is_grad_enabled() and x.requires_grad))


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (codes * scale[:, None])^T for float32 x (..., k), int8 codes (n, k), one scale per row.

    >>> codes = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
    >>> int8_linear(torch.tensor([[1.0, 1.0]]), codes, torch.tensor([0.5, 2.0]))
    tensor([[-0.5000, 14.0000]])
    """
    if not usable(x, codes):
        raise ValueError("int8_linear needs a CPU float32 input of at most MAX_ROWS rows without autograd, "
                         f"and 2-D int8 codes with matching width; got x {x.dtype} {tuple(x.shape)} on {x.device}, "
                         f"codes {codes.dtype} {tuple(codes.shape)}")
    k, n = codes.shape[1], codes.shape[0]
    x2 = x.detach().reshape(-1, k).contiguous()
    out = torch.empty(x2.shape[0], n, dtype=torch.float32)
    s = scale.detach().reshape(-1).to(torch.float32).contiguous()
    if s.numel() != n:
        raise ValueError(f"int8_linear needs one scale per output row ({n}), got {s.numel()}")
    with _lock:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _int8_rows(x2.numpy(), codes.contiguous().numpy(), s.numpy(), out.numpy())
    return out.reshape(*x.shape[:-1], n)


def packed_usable(x: torch.Tensor, k: int, group_size: int) -> bool:
    """True when packed4_linear applies: CPU float32 input of at most MAX_ROWS rows, no autograd,
    an even input width k and an even group size dividing it."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[-1] == k and k % 2 == 0
            and group_size % 2 == 0 and k % group_size == 0
            and x.numel() // max(k, 1) <= MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad))


def packed4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_point, qmin: int,
                   shape, group_size: int) -> torch.Tensor:
    """x @ W^T for 2..4-bit codes packed two per byte (slc.nn's layout), scales (and zero points) per
    group of `group_size` inputs (group_size = k: one per row): W[j, t] = (nibble + qmin - zp[j, g]) * scale[j, g].

    >>> packed = torch.tensor([0x21, 0x43], dtype=torch.uint8)      # codes 1, 2 / 3, 4 with qmin 0
    >>> packed4_linear(torch.tensor([[1.0, 1.0]]), packed, torch.tensor([[1.0], [0.5]]), None, 0, (2, 2), 2)
    tensor([[3.0000, 3.5000]])
    """
    n, k = shape
    if not packed_usable(x, k, group_size) or packed.dtype != torch.uint8 or packed.numel() != n * k // 2:
        raise ValueError("packed4_linear needs a CPU float32 input of at most MAX_ROWS rows without autograd, an even "
                         f"width and group size, and n*k/2 packed bytes; got x {x.dtype} {tuple(x.shape)}, shape {shape}, "
                         f"group_size {group_size}, packed {packed.dtype} {packed.numel()}")
    groups = k // group_size
    s = scale.detach().to(torch.float32).reshape(n, groups).contiguous()
    zp = (torch.zeros(1, 1) if zero_point is None else zero_point.detach().to(torch.float32)).reshape(-1, groups if zero_point is not None else 1).contiguous()
    x2 = x.detach().reshape(-1, k).contiguous()
    out = torch.empty(x2.shape[0], n, dtype=torch.float32)
    with _lock:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _packed_rows(x2.numpy(), packed.contiguous().numpy(), s.numpy(), zp.numpy(), zero_point is not None,
                     int(qmin), int(group_size), out.numpy())
    return out.reshape(*x.shape[:-1], n)


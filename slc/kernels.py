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

The kernel is a numba function (parallel over output rows). numba's "workqueue" threading layer
must not be entered from two Python threads at once, so calls are serialised by a lock.
"""
from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from numba import njit, prange

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

"""CPU matmul kernels torch does not have: int8 weights times float32 activations, for a few rows.

Token-by-token generation multiplies one activation row by every weight matrix. For a float32
row, torch has no int8-weight kernel (`_weight_int8pack_mm` is fast only for bfloat16
activations), so the fallback converts all the codes to float32 on every call, which costs more
than the dense float32 matmul it replaces. `int8_linear` reads the int8 codes directly, a quarter of
the bytes of a float32 weight, and accumulates in float32:

    y[i, j] = scale[j] * sum_t x[i, t] * codes[j, t]

Measured with bench/kernels.py on this repo's 2-core CPU (torch 2.13, torch on 2 threads, the
kernel on 1; one row; medians; full table in bench/results/kernels.md):
    weight   576 x 576: dense fp32 F.linear 27 us | codes.to(fp32) + F.linear 78 us | this kernel 25-40 us
    weight  1536 x 576: dense fp32 F.linear 69 us | this kernel 50 us
    weight 49152 x 576 (SmolLM2's tied head): dense fp32 9.6 ms | this kernel 1.5 ms
With 8 rows it is 0.65-0.8 x dense, still well ahead of converting the codes; `MAX_ROWS` keeps it
to those. Many rows (a prompt, a perplexity window) are compute-bound and go to torch's GEMM.
`packed4_linear` (2..4-bit codes) is correct but not vectorised yet: 350 us at 576 x 576, about
half the unpack-and-dequantise path it replaces, far from dense.

The kernels are serial numba functions (one thread, no GIL held). A parallel version measured
9 us instead of 21 us at 1536 x 576 with numba's OpenMP layer, but that layer kills a process
that forks after using it (DataLoader workers, multiprocessing), and the fork-safe "workqueue"
layer costs 80-150 us per launch, more than the whole matmul. Serial keeps them thread-safe and
fork-safe with no global numba setting.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

MAX_ROWS = 8                    # rows of x up to which int8_linear beats dequantise-then-matmul (measured)


@njit(fastmath=True, cache=True, nogil=True)
def _int8_rows(x, codes, scale, out):
    """out[i, j] = scale[j] * dot(x[i], codes[j]) for x (r, k) f32, codes (n, k) int8, scale (n,) f32."""
    r, k = x.shape
    for j in range(codes.shape[0]):
        for i in range(r):
            acc = np.float32(0.0)
            for t in range(k):
                acc += x[i, t] * np.float32(codes[j, t])
            out[i, j] = acc * scale[j]


@njit(fastmath=True, cache=True, nogil=True)
def _packed_rows(x, packed, scale, zero_point, has_zp, qmin, gs, out):
    """out[i, j] = sum_g scale[j, g] * sum_{t in g} x[i, t] * (code[j, t] - zp[j, g]) for 4-bit codes
    packed two per byte, row-major, low nibble first (code = nibble + qmin); k and gs even.
    Each weight row is unpacked once into a float buffer, then dotted with every x row (numba does not
    vectorise this yet: see the module docstring)."""
    r, k = x.shape
    n_groups = k // gs
    row = np.empty(k, dtype=np.float32)
    xs = np.zeros((r, n_groups), dtype=np.float32)                 # per-group sums of x: the zero-point term
    for i in range(r):
        for g in range(n_groups):
            acc = np.float32(0.0)
            for t in range(g * gs, (g + 1) * gs):
                acc += x[i, t]
            xs[i, g] = acc
    for j in range(out.shape[1]):
        base = (j * k) >> 1
        for t in range(k >> 1):
            b = packed[base + t]
            row[2 * t] = np.float32(b & 15)
            row[2 * t + 1] = np.float32(b >> 4)
        for i in range(r):
            acc = np.float32(0.0)
            for g in range(n_groups):
                a = np.float32(0.0)
                for t in range(g * gs, (g + 1) * gs):
                    a += x[i, t] * row[t]
                off = np.float32(qmin) - (zero_point[j, g] if has_zp else np.float32(0.0))
                acc += scale[j, g] * (a + off * xs[i, g])
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
                         f"width and group size, and n*k/2 packed bytes; got x {x.dtype} {tuple(x.shape)}, "
                         f"shape {shape}, group_size {group_size}, packed {packed.dtype} {packed.numel()}")
    groups = k // group_size
    s = scale.detach().to(torch.float32).reshape(n, groups).contiguous()
    zp = torch.zeros(1, 1) if zero_point is None else zero_point.detach().to(torch.float32)
    zp = zp.reshape(-1, groups if zero_point is not None else 1).contiguous()
    x2 = x.detach().reshape(-1, k).contiguous()
    out = torch.empty(x2.shape[0], n, dtype=torch.float32)
    _packed_rows(x2.numpy(), packed.contiguous().numpy(), s.numpy(), zp.numpy(), zero_point is not None,
                 int(qmin), int(group_size), out.numpy())
    return out.reshape(*x.shape[:-1], n)


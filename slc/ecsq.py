"""ECSQ: entropy-constrained scalar quantisation, a step grid with no level limit.

An affine int-b quantiser fixes the number of levels and spends log2(levels) bits on
every weight. ECSQ fixes the *step* instead and lets an entropy coder decide the rate:

    step_abs = step x RMS(block)                 # step is relative: 0.1 = a tenth of the RMS
    code     = sign(w) * floor(|w| / step_abs + 1/2 - dead_zone)
    w_hat    = code * step_abs                   # |w - w_hat| <= (1/2 + dead_zone) * step_abs

Weights are bell-shaped, so most codes are small and the order-0 entropy of the codes is
far below log2(range): at high rate it is about h(w/RMS) - log2(step) bits, and one halving
of the step costs one more bit. Outliers cost a few bits each instead of stretching the
grid for everybody, which is what an absmax-scaled int grid does.

The grid itself is `slc.quant.quantize_blocks` (what `Quantizer(mode="ecsq")` runs); the codes
go to the rANS coder as zig-zag symbols with an escape symbol (`slc.symbols`). This module
answers the rate questions: what will a step cost, and which step meets a target.

Rate for a target: `step_for_bits(w, 4.0)` bisects log(step) on the estimated all-in bits
per weight (`estimate_bits`: entropy + table + states + escapes + scales + header), which
tracks the real `CompressedTensor.bits_per_weight` to within a fraction of a percent.
`sweep(w, steps, ...)` gives rate and (weighted) squared error for many steps in one compiled
pass each, code for code what the quantiser does, without building any codes: slc.allocate
uses it for every layer's rate-distortion points. `shannon_gap(w, step)` says how far the codes are from the
Shannon lower bound of the weights (about a quarter of a bit: what a vector quantiser could still win).

>>> import torch
>>> from slc import Quantizer
>>> w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
>>> qt = Quantizer(mode="ecsq", step=0.25).quantize(w)
>>> bool(((qt.dequantize() - w).abs() <= qt.max_error() * (1 + 1e-6)).all())
True
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from . import rans
from .quant import Quantizer
from .symbols import ESCAPE_BITS, entropy_from_counts, escape_from_counts, value_counts, zigzag
from .tensor import CompressedTensor
from .tiles import choose_tiles, default_lanes

HEADER_BITS_ESTIMATE = 8 * 260   # CompressedTensor v2 header JSON + framing, roughly (measured 230..290 bytes)


# ----------------------------------------------------------------------------
# rates

def _table_bits_estimate(counts: np.ndarray, n: int) -> float:
    """Bits of the rANS frequency table for these symbol counts (frequencies at M = 2**16, approx.)."""
    f = np.where(counts > 0, np.maximum(1, np.round(counts * (1 << 16) / max(n, 1))), 0).astype(np.int64)
    if not f.any():
        return 0.0
    return 8.0 * rans.table_nbytes(f)


def stream_estimate(codes: np.ndarray, signed: bool = True) -> dict:
    """What the escape-coded rANS stream of these codes will hold, without encoding it.

    payload_bits (order-0 entropy of the symbols, escape symbol included), alphabet (freqs length),
    n_escapes, lanes, table_bits (the compact table of the byte format). signed=False: the codes are
    already non-negative symbols (affine codes - qmin) and are not zig-zag mapped.
    """
    codes = np.asarray(codes).reshape(-1)
    vals, counts = value_counts(zigzag(codes) if signed else codes)
    return estimate_from_counts(vals, counts, codes.size, escape=signed)


def estimate_from_counts(vals: np.ndarray, counts: np.ndarray, n: int, escape: bool = True) -> dict:
    """stream_estimate from a histogram: zig-zag values present (sorted) and their counts."""
    E = escape_from_counts(vals, counts, n) if escape else int(vals[-1]) + 1
    kept = vals < E
    n_esc = int(n - counts[kept].sum())
    sym_counts = np.zeros(E + 1, dtype=np.int64)
    sym_counts[vals[kept]] = counts[kept]
    sym_counts[E] = n_esc
    if n_esc == 0:
        sym_counts = sym_counts[:E]
        sym_counts = sym_counts[:np.flatnonzero(sym_counts)[-1] + 1] if sym_counts.any() else sym_counts[:1]
    payload = entropy_from_counts(sym_counts, n) if n else 0.0
    return {"payload_bits": payload * 1.0005, "alphabet": int(sym_counts.size), "n_escapes": n_esc,
            "lanes": rans.choose_lanes(n), "table_bits": _table_bits_estimate(sym_counts, n), "n": n,
            "escape": escape}


def buffer_bits(e: dict, n_scales: int, shape: tuple | None = None) -> float:
    """Bits of a coded weight's buffers for a stream_estimate: 16-bit words, int32 states, a dense
    int32 frequency table, float32 scales, int32 escapes. shape None: one stream (CompressedTensor);
    shape (rows, cols): the tiled layout of a CompressedLinear (slc.tiles: lanes per tile, an int64
    tile index of 2 offsets a tile, 3 with escapes)."""
    lanes, index_bits = e["lanes"], 0
    if shape is not None:
        rows, cols = shape
        n_tiles = len(choose_tiles(rows, cols, e["payload_bits"] / max(e["n"], 1))) - 1
        lanes = n_tiles * default_lanes(rows, cols)
        index_bits = 64 * (n_tiles + 1) * (3 if e["escape"] else 2)
    words = math.ceil(e["payload_bits"] / 16) + lanes // 2
    return 16 * words + 32 * (lanes + e["alphabet"] + n_scales + e["n_escapes"]) + index_bits


def stream_bits_estimate(codes: np.ndarray) -> float:
    """Estimated size in bits of the escape-coded rANS stream of these codes (no scales, no header)."""
    e = stream_estimate(codes)
    return e["payload_bits"] + e["table_bits"] + 32 * e["lanes"] + 8 * 28 + ESCAPE_BITS * e["n_escapes"]


def buffer_bits_estimate(codes: np.ndarray, n_scales: int, signed: bool = True, shape: tuple | None = None) -> float:
    """Estimated bits of the buffers a coded weight holds in memory (see `buffer_bits`; shape (rows, cols):
    a tiled CompressedLinear, None: a CompressedTensor's one stream)."""
    return buffer_bits(stream_estimate(codes, signed), n_scales, shape)


def estimate_bits(w, quantizer, layout: str = "bytes") -> float:
    """Estimated all-in bits per weight of CompressedTensor.compress(w, quantizer) (ecsq), without encoding.

    layout="bytes": len(to_bytes()) (compact table, header); "buffers": the bytes of buffers();
    "tiled": the buffers of a tiled CompressedLinear (2-D w).
    """
    qt = quantizer.quantize(w)
    codes = qt.codes.detach().cpu().reshape(-1).numpy()
    if layout in ("buffers", "tiled"):
        shape = tuple(qt.original_shape) if layout == "tiled" else None
        return buffer_bits_estimate(codes, qt.scale.numel(), shape=shape) / codes.size
    total = stream_bits_estimate(codes) + 32 * qt.scale.numel() + HEADER_BITS_ESTIMATE
    return total / codes.size


def _quantizer(step, granularity, group_size, dead_zone, reference):
    return Quantizer(mode="ecsq", step=float(step), granularity=granularity, group_size=group_size,
                     dead_zone=dead_zone, reference=reference)


def step_for_bits(w, target_bpw: float, granularity: str = "channel", group_size: int | None = None,
                  dead_zone: float = 0.0, reference: str = "rms", exact: bool = False,
                  tol: float = 0.002, max_iter: int = 40, layout: str = "bytes") -> float:
    """The ecsq step whose all-in bits/weight on `w` is closest to `target_bpw` (bisection on log step).

    Rate falls as the step grows (about one bit per halving), so we bisect log(step) on
    [1e-5, 1e2] until the rate is within `tol` (relative) of the target. exact=True measures
    every candidate with a real CompressedTensor (slower); the default uses `estimate_bits`.
    layout: "bytes" (to_bytes, the file), "buffers" (a CompressedTensor in memory) or "tiled" (a CompressedLinear).

    >>> import torch
    >>> w = torch.randn(128, 512, generator=torch.Generator().manual_seed(0))
    >>> s = step_for_bits(w, 4.0)
    >>> abs(estimate_bits(w, _quantizer(s, "channel", None, 0.0, "rms")) - 4.0) < 0.01
    True
    """
    if isinstance(target_bpw, bool) or not isinstance(target_bpw, (int, float)) or not 0.05 < target_bpw < 32:
        raise ValueError(f"target_bpw={target_bpw!r} must be a number of bits per weight in (0.05, 32), e.g. 4.0")

    def rate(step: float) -> float:
        q = _quantizer(step, granularity, group_size, dead_zone, reference)
        if exact:
            ct = CompressedTensor.compress(w, q)
            if layout == "buffers":
                return 8 * sum(v.numel() * v.element_size() for v in ct.buffers().values()) / ct.numel
            return ct.bits_per_weight
        return estimate_bits(w, q, layout)

    lo, hi = math.log(1e-5), math.log(1e2)             # rate(lo) high, rate(hi) low
    best_step, best_err = None, math.inf
    for _ in range(max_iter):
        mid = (lo + hi) / 2
        try:
            r = rate(math.exp(mid))
        except ValueError:                              # step too fine for an int32 code: go coarser
            lo = mid
            continue
        err = abs(r - target_bpw) / target_bpw
        if err < best_err:
            best_step, best_err = math.exp(mid), err
        if err <= tol:
            break
        if r > target_bpw:
            lo = mid
        else:
            hi = mid
    if best_step is None:
        raise ValueError(f"no step reaches {target_bpw} bits/weight on this tensor")
    return best_step


# ----------------------------------------------------------------------------
# a fast sweep over steps, for allocation

_HIST = 1 << 16          # zig-zag values counted one by one; larger ones are lumped (they escape anyway)


@njit(cache=True, nogil=True)
def _sweep_kernel(w, scale, group, xsq, ow, dead_zone, hist):
    """One pass: histogram of zig-zag codes (hist[-1] = lumped big ones) and the weighted squared error
    sum_ij ow_i * xsq_j * (w_ij - code_ij * scale_i,g)^2, as Quantizer(mode="ecsq") would code w."""
    rows, cols = w.shape
    cap = hist.size - 1
    dist = 0.0
    off = np.float32(0.5 - dead_zone)
    for i in range(rows):
        row_d = 0.0
        for g in range(cols // group):
            s = scale[i, g]
            for j in range(g * group, (g + 1) * group):
                x = w[i, j]
                m = np.floor(np.float32(abs(x) / s) + off)       # float32, like torch in quantize_blocks
                c = np.int64(m) if m > 0 else np.int64(0)
                e = np.float32(abs(x)) - np.float32(np.float32(c) * s)
                z = 2 * c - 1 if (x < 0 and c > 0) else 2 * c
                hist[z if z < cap else cap] += 1
                row_d += np.float64(e) * np.float64(e) * xsq[j]
        dist += ow[i] * row_d
    return dist


@njit(cache=True, nogil=True)
def _sweep_kernel_w(w, scale, group, fw, dead_zone, hist):
    """As _sweep_kernel, with one weight per element: sum_ij fw_ij * (w_ij - code_ij * scale_i,g)^2."""
    rows, cols = w.shape
    cap = hist.size - 1
    dist = 0.0
    off = np.float32(0.5 - dead_zone)
    for i in range(rows):
        for g in range(cols // group):
            s = scale[i, g]
            for j in range(g * group, (g + 1) * group):
                x = w[i, j]
                m = np.floor(np.float32(abs(x) / s) + off)
                c = np.int64(m) if m > 0 else np.int64(0)
                e = np.float32(abs(x)) - np.float32(np.float32(c) * s)
                z = 2 * c - 1 if (x < 0 and c > 0) else 2 * c
                hist[z if z < cap else cap] += 1
                dist += np.float64(e) * np.float64(e) * fw[i, j]
    return dist


def sweep(w: torch.Tensor, steps, x_sq=None, out_weight=None, granularity: str = "channel",
          group_size: int | None = None, dead_zone: float = 0.0, reference: str = "rms",
          weight_importance=None) -> list[dict]:
    """Rate and weighted distortion of ecsq on `w` (out, in) at each step, without building codes.

    Per step: bits (estimated bits of the CompressedLinear buffers, all overhead), bytes_bits (the
    to_bytes() estimate), distortion = sum_ij out_weight_i x_sq_j dW_ij^2 (weights default to 1), or
    sum_ij weight_importance_ij dW_ij^2 when that (out, in) matrix is given.
    Matches Quantizer(mode="ecsq", ...) code for code (same float32 scales), in one compiled pass per step.
    """
    w = torch.as_tensor(w).detach().float()
    if w.dim() != 2:
        raise ValueError(f"sweep needs a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if granularity == "channel":
        blocks, group = w.reshape(rows, 1, cols), cols
    elif granularity == "group":
        if not group_size or cols % group_size:
            raise ValueError(f"group_size={group_size} must divide the input dimension {cols}")
        blocks, group = w.reshape(rows, cols // group_size, group_size), group_size
    else:
        raise ValueError("sweep supports granularity 'channel' or 'group'")
    if reference == "rms":
        ref = blocks.pow(2).mean(dim=-1, keepdim=True).sqrt()
    else:
        ref = blocks.abs().amax(dim=-1, keepdim=True)
    peak = blocks.abs().amax(dim=-1, keepdim=True)
    wn = np.ascontiguousarray(w.numpy())
    xs = np.ones(cols) if x_sq is None else np.asarray(torch.as_tensor(x_sq).double().cpu().numpy(), dtype=np.float64)
    ow = np.ones(rows) if out_weight is None else np.asarray(torch.as_tensor(out_weight).double().cpu().numpy(),
                                                             dtype=np.float64)
    fw = None
    if weight_importance is not None:
        fw = np.ascontiguousarray(torch.as_tensor(weight_importance).detach().cpu().numpy())
        if fw.shape != (rows, cols):
            raise ValueError(f"weight_importance has shape {fw.shape}, expected {(rows, cols)}")
    n, out = w.numel(), []
    for st in steps:
        scale = ref * float(st)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
        sc = np.ascontiguousarray(scale.reshape(rows, -1).numpy())
        if float((peak / scale).max()) >= 2 ** 30:
            continue                                            # Quantizer refuses such a fine step
        hist = np.zeros(_HIST + 1, dtype=np.int64)
        if fw is not None:
            dist = _sweep_kernel_w(wn, sc, group, fw, float(dead_zone), hist)
        else:
            dist = _sweep_kernel(wn, sc, group, xs, ow, float(dead_zone), hist)
        vals = np.flatnonzero(hist)
        e = estimate_from_counts(vals, hist[vals], n)
        n_scales = sc.size
        out.append({"step": float(st), "bits": buffer_bits(e, n_scales, (rows, cols)) / n,
                    "bytes_bits": (e["payload_bits"] + e["table_bits"] + 32 * e["lanes"] + 8 * 28
                                   + ESCAPE_BITS * e["n_escapes"] + 32 * n_scales + HEADER_BITS_ESTIMATE) / n,
                    "distortion": float(dist)})
    return out


# ----------------------------------------------------------------------------
# how far from the bound

HIGH_RATE_GAP = 0.5 * math.log2(math.pi * math.e / 6)    # 0.2546 bits: a uniform grid + ideal coder at high rate


def shannon_gap(w: torch.Tensor, step: float, trellis: bool = False) -> dict:
    """How many bits per weight ECSQ at `step` (row RMS, as compress_to_budget uses it) spends above the Shannon
    lower bound of the weights it codes: what any quantiser of the same weights could still win.
    trellis=True measures trellis codes at `step` instead (slc.trellis; step_for_ecsq(s) costs about what s does).

    Each row is divided by its RMS (the quantiser's reference) and the weights are taken as i.i.d. draws from
    their histogram: differential entropy h (bits, Freedman-Diaconis bins). For a mean squared error D,
    R(D) >= h - 1/2 log2(2 pi e D), and the bound is tight at high rate. rate is the order-0 entropy of the
    codes (the rANS payload, no overhead), distortion D the mean squared error of the normalised weights.
    At high rate a uniform grid with an ideal entropy coder sits HIGH_RATE_GAP = 0.255 bits above the bound for
    any smooth density, Gaussian or not: the most a lattice or trellis quantiser can win on i.i.d. weights
(slc.trellis' 8-state trellis wins about 60 % of it).

    >>> g = torch.Generator().manual_seed(0)
    >>> r = shannon_gap(torch.randn(256, 1024, generator=g), 0.25)
    >>> abs(r["gap"] - HIGH_RATE_GAP) < 0.03
    True
    """
    w = torch.as_tensor(w).detach()
    if w.dim() != 2 or w.numel() < 2:
        raise ValueError(f"shannon_gap needs a 2-D weight, got shape {tuple(w.shape)}")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0 or not math.isfinite(step):
        raise ValueError(f"step={step!r} must be a positive number (relative to each row's RMS)")
    w = w.double()
    rms = w.pow(2).mean(dim=1, keepdim=True).sqrt()
    x = (w / torch.where(rms > 0, rms, torch.ones_like(rms))).float()
    qt = Quantizer(mode="ecsq", step=float(step), trellis=trellis).quantize(x)
    codes = qt.codes.reshape(-1).numpy()
    _, counts = value_counts(zigzag(codes))
    rate = entropy_from_counts(counts, codes.size) / codes.size
    distortion = float((qt.dequantize().double() - x.double()).pow(2).mean())
    v = x.reshape(-1).double().numpy()
    q1, q3 = np.percentile(v, [25, 75])
    width = 2 * (q3 - q1) / v.size ** (1 / 3)
    if not width > 0:
        raise ValueError("the weights are (nearly) constant: they have no differential entropy to measure")
    hist, _ = np.histogram(v, bins=max(1, math.ceil((v.max() - v.min()) / width)))
    entropy = entropy_from_counts(hist, v.size) / v.size + math.log2((v.max() - v.min()) / hist.size)
    bound = entropy - 0.5 * math.log2(2 * math.pi * math.e * distortion) if distortion > 0 else math.inf
    return {"step": float(step), "rate": rate, "distortion": distortion, "entropy": entropy,
            "bound": max(bound, 0.0), "gap": rate - max(bound, 0.0)}

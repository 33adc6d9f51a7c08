"""Activation-weighted scales: choose each row's or group's scale for the error the layer's output feels.

A quantiser sets each block's scale from the block alone (absmax / qmax, or step x RMS) and rounds to
nearest, blind to which input columns matter. The layer's output error is sum_t ||dW x_t||^2; its
diagonal part weights each weight's error by its column's mean squared activation,

    D(block) = sum_j imp_j (w_j - s c_j)^2,       imp_j = diag(E[x x^T])_j   (layer_stats' x_sq)

which is what llama.cpp's importance matrix feeds its quantisers. `weighted_quantize` keeps slc's grids
and the stored format (a QuantizedTensor on the same Quantizer: only the scales are other numbers):

    affine (symmetric)  for each block try scale = m x absmax / qmax for m in `multipliers` (0.7..1.2:
                        m < 1 clips the largest weights to resolve the rest), round, then refit the
                        scale by weighted least squares for those codes, s = sum imp w c / sum imp c^2
                        (llama.cpp's make_qx_quants); keep the m with the least D.
    ecsq                the step sets the rate, so a smaller D at a finer step is no win. Each block's
                        step is step x RMS x m, m from 2^(k/8), chosen to minimise D + lam R with R its
                        code lengths under the layer's code histogram and lam bisected so the layer's
                        estimated rate stays what one step gave (rate-neutral); then the step is refit
                        for the codes chosen (same codes, same rate, less D).
    trellis (ecsq)      the blocks' steps of the ECSQ grid of about the same rate (slc.trellis.ecsq_step_for,
                        chosen as above), each turned back into a trellis step (step_for_ecsq's ratio at the
                        layer's step); the codes by trellis search on them.

imp may be an (in,) vector (one weight per input column, as llama.cpp) or an (out, in) matrix (e.g. the
per-weight Fisher of slc.calibrate). `compress_model_weighted` does it for every layer of a policy
(optionally with GPTQ codes on those scales) and swaps in CompressedLinear layers like compress_model.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocate import rotated_layer
from .calibrate import layer_stats
from .compress import CompressionReport, LayerRow, selected_specs
from .gptq import gptq
from .hf import dense_weight_of, set_module, target_layers
from .nn import CompressedLinear
from .quant import QuantizedTensor, Quantizer, as_float_tensor, quantize_blocks
from .symbols import code_dtype
from .trellis import ecsq_step_for, viterbi

MULTIPLIERS = tuple(round(0.7 + 0.05 * k, 2) for k in range(11))       # affine: 0.7 .. 1.2 x absmax / qmax
ECSQ_MULTIPLIERS = tuple(2 ** (k / 8) for k in range(-4, 5))            # ecsq: step x 2^(-1/2 .. 1/2)
IMPORTANCE_FLOOR = 1e-3       # imp is floored at this fraction of its mean: a dead column still counts a little
_HIST_CAP = 1 << 12           # ecsq rate estimate: zig-zag codes above this are lumped (escapes, rare)


def _importance_blocks(importance, w: torch.Tensor, q: Quantizer) -> torch.Tensor:
    imp = torch.as_tensor(importance).detach().to(device=w.device, dtype=torch.float64)    # mean in float64
    if imp.shape == (w.shape[1],):
        imp = imp.expand(w.shape)
    elif imp.shape != w.shape:
        raise ValueError(f"importance must be ({w.shape[1]},) per input column or {tuple(w.shape)} per weight, "
                         f"got {tuple(imp.shape)}")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError("importance must be finite and >= 0 (a mean squared activation or a Fisher diagonal)")
    mean = float(imp.mean())
    imp = imp / mean if mean > 0 else torch.ones_like(imp)
    return q.blocks(imp.clamp_min(IMPORTANCE_FLOOR).float()).reshape(-1, q.blocks(w).shape[-1])


def weighted_error(w, qt: QuantizedTensor, importance) -> float:
    """sum_ij imp_ij (w_ij - w_hat_ij)^2 (imp (in,) or (out, in)): what weighted_quantize minimises."""
    w = torch.as_tensor(w).double()
    imp = torch.as_tensor(importance).double()
    return float(((w - qt.dequantize(torch.float64)).pow(2) * imp.expand(w.shape)).sum())


def _refit(b: torch.Tensor, c: torch.Tensor, imp: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares scale for fixed codes: sum imp w c / sum imp c^2 (keeps s where all codes are 0)."""
    num, den = (imp * b * c).sum(-1, keepdim=True), (imp * c * c).sum(-1, keepdim=True)
    fit = num / den.clamp_min(1e-30)
    return torch.where((den > 0) & (fit > 0), fit, s)


def _affine(b, imp, q: Quantizer, multipliers, refit: bool):
    absmax = b.abs().amax(-1, keepdim=True)
    s0 = torch.where(absmax > 0, absmax / q.qmax, torch.ones_like(absmax))
    best_d = torch.full_like(s0, math.inf)
    best_s, best_c = s0.clone(), torch.zeros_like(b)
    for m in multipliers:
        s = s0 * m
        c = torch.round(b / s).clamp_(q.qmin, q.qmax)
        if refit:
            s = _refit(b, c, imp, s)
        d = (imp * (b - c * s).pow(2)).sum(-1, keepdim=True)
        better = d < best_d
        best_d = torch.where(better, d, best_d)
        best_s = torch.where(better, s, best_s)
        best_c = torch.where(better, c, best_c)
    return best_c, best_s


def _code_bits(c: torch.Tensor) -> torch.Tensor:
    """Each code's length in bits under the histogram of all of them (zig-zag, big ones lumped)."""
    z = (2 * c.abs() - (c < 0).to(c.dtype)).long().clamp_(max=_HIST_CAP)
    counts = torch.bincount(z.reshape(-1), minlength=_HIST_CAP + 1).double()
    bits = -torch.log2(counts / z.numel()).nan_to_num(posinf=0.0)
    return bits[z]


def _ecsq(b, imp, q: Quantizer, multipliers, refit: bool):
    _, s0 = quantize_blocks(b, q.step, q.dead_zone, q.reference)
    off = 0.5 - q.dead_zone

    def codes(s):
        return torch.copysign(torch.floor(b.abs() / s + off).clamp_min(0), b)

    D, R = [], []
    for m in multipliers:
        c = codes(s0 * m)
        D.append((imp * (b - c * (s0 * m)).pow(2)).sum(-1))
        R.append(_code_bits(c).sum(-1))
    D, R = torch.stack(D, -1).double(), torch.stack(R, -1)          # (blocks, candidates)
    one = min(range(len(multipliers)), key=lambda k: abs(multipliers[k] - 1.0))
    target = float(R[:, one].sum())
    scale = float(D[:, one].sum()) / max(target, 1.0)              # lam in units of D per bit
    lo, hi = math.log(1e-6), math.log(1e6)
    for _ in range(60):                                             # the least lam whose rate fits the target
        mid = (lo + hi) / 2
        k = torch.argmin(D + math.exp(mid) * scale * R, -1)
        if float(R.gather(1, k[:, None]).sum()) > target:
            lo = mid
        else:
            hi = mid
    k = torch.argmin(D + math.exp(hi) * scale * R, -1)
    s = s0 * torch.tensor(multipliers, dtype=s0.dtype)[k][:, None]
    c = codes(s)
    if refit:
        s = _refit(b, c, imp, s)
    return c, s


def weighted_quantize(w, quantizer: Quantizer, importance, multipliers=None, refit: bool = True) -> QuantizedTensor:
    """quantizer.quantize(w) with each block's scale chosen to minimise sum_j imp_j (w_j - w_hat_j)^2.

    Same Quantizer, same code dtype and layout (CompressedLinear.from_quantized, CompressedTensor.from_quantized
    and GPTQ's `grid=` take it as they take quantizer.quantize(w)); only the scales differ. `importance`:
    (in,) per input column (layer_stats' x_sq, llama.cpp's importance matrix) or (out, in) per weight.
    multipliers: candidate scale factors (default MULTIPLIERS for affine, ECSQ_MULTIPLIERS for ecsq; ecsq keeps
    the layer's estimated rate). refit: weighted least-squares scale for the chosen codes.

    >>> import torch
    >>> w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    >>> imp = torch.rand(64, generator=torch.Generator().manual_seed(1)) ** 4
    >>> q = Quantizer(bits=4, granularity="group", group_size=32)
    >>> weighted_error(w, weighted_quantize(w, q, imp), imp) < weighted_error(w, q.quantize(w), imp)
    True
    """
    w = as_float_tensor(w, "weight")
    if w.dim() != 2:
        raise ValueError(f"weighted_quantize needs a 2-D weight (out, in), got shape {tuple(w.shape)}")
    q = quantizer
    if not isinstance(q, Quantizer):
        raise TypeError(f"quantizer must be an slc.Quantizer, got {type(q).__name__}")
    if q.granularity == "channel" and q.axis not in (0, -2):
        raise ValueError("weighted_quantize needs scales per output row (axis=0), per group or per tensor")
    if q.mode == "affine" and q.scheme != "symmetric":
        raise ValueError("weighted_quantize supports symmetric affine grids and ecsq; "
                         "use scheme='symmetric' (or mode='ecsq')")
    b = q.blocks(w.float())                                            # float32: as the grids themselves
    lead = b.shape[:-1]
    b = b.reshape(-1, b.shape[-1])
    imp = _importance_blocks(importance, w, q)
    if q.trellis:                       # the steps an ECSQ grid of the same rate would weight, scaled; trellis codes
        grid = replace(q, step=ecsq_step_for(q.step), trellis=False)
        _, s = _ecsq(b, imp, grid, tuple(multipliers or ECSQ_MULTIPLIERS), refit)
        s = s * (q.step / grid.step)
        codes = viterbi(q.unblock((b.double() / s.double()).reshape(*lead, -1), w.shape).numpy())
        return QuantizedTensor(codes=torch.from_numpy(codes.astype(code_dtype(codes))),
                               scale=s.reshape(*lead, 1).float(), zero_point=None, quantizer=q,
                               original_shape=tuple(w.shape), original_dtype=w.dtype)
    if q.mode == "ecsq":
        c, s = _ecsq(b, imp, q, tuple(multipliers or ECSQ_MULTIPLIERS), refit)
        dtype = torch.int16 if float(c.abs().max()) < 2 ** 15 - 1 else torch.int32
    else:
        c, s = _affine(b, imp, q, tuple(multipliers or MULTIPLIERS), refit)
        dtype = torch.int8
    codes = q.unblock(c.reshape(*lead, -1).to(dtype), w.shape)
    scale = s.reshape(*lead, 1).float()
    return QuantizedTensor(codes=codes, scale=scale, zero_point=None, quantizer=q,
                           original_shape=tuple(w.shape), original_dtype=w.dtype)


def compress_model_weighted(model: nn.Module, tokenizer, policy, calibration_text: str | None = None,
                            max_tokens: int = 2048, importance: str = "x_sq", use_gptq: bool = False,
                            damp: float = 0.01, skip=None, stats: dict | None = None,
                            progress: bool = False) -> CompressionReport:
    """compress_model with activation-weighted scales (and optionally GPTQ codes on them), in place.

    policy: what compress_model takes (e.g. an `allocate()` result); each layer with a "quantized" or
    "entropy" spec gets `weighted_quantize` scales on its own quantiser, weighted by its inputs' mean
    squared activation from `max_tokens` tokens of `calibration_text` (None: slc.models.calibration_text;
    slc.texts.calibration_mix is more varied). importance="x_sq" (per input column) or "fisher" (per
    weight, needs a LM head). use_gptq: codes by GPTQ error feedback on those scales (damp: its damping).
    stats: layer_stats output to reuse. Same file format, bits/weight counted like compress_model.
    A spec with rotate= gets the scales of W R for its rotated inputs (slc.allocate.rotated_stats: needs the
    full input moments, gathered when any spec rotates).
    """
    if importance not in ("x_sq", "fisher"):
        raise ValueError(f"importance={importance!r}: use 'x_sq' (per input column) or 'fisher' (per weight)")
    layers = target_layers(model, skip)
    chosen = {n: (layers[n], spec) for n, spec in
              selected_specs(layers, policy, ("quantized", "entropy"), "weighted scales", rotates=True).items()}
    rotating = any(spec.rotate is not None for _, spec in chosen.values())
    if stats is None:
        stats = layer_stats(model, tokenizer, calibration_text, list(chosen), max_tokens, full=use_gptq or rotating,
                            fisher="weight" if importance == "fisher" else False)
    report = CompressionReport()
    for name, (module, spec) in tqdm(chosen.items(), desc="weighted", unit="layer", disable=not progress):
        t0 = time.perf_counter()
        w = dense_weight_of(module).float()
        st = stats[name]
        w, st = rotated_layer(w, st, spec.rotation(w.shape[1], name), keep_cov=use_gptq)   # W R for R^T x
        imp = st.weight_fisher if importance == "fisher" else st.x_sq
        if imp is None:
            raise ValueError(f"stats for {name!r} lack {'weight_fisher' if importance == 'fisher' else 'x_sq'}")
        qt = weighted_quantize(w, spec.quantizer, imp)
        if use_gptq:
            if st.x_cov is None:
                raise ValueError(f"use_gptq needs x_cov in the stats of {name!r} (layer_stats(..., full=True))")
            qt = gptq(w, st.x_cov, spec.quantizer, damp=damp, grid=qt)
        qt.original_dtype = module.weight.dtype
        layer = CompressedLinear.from_quantized(qt, spec, getattr(module, "bias", None), device=module.weight.device)
        w_hat = qt.dequantize(torch.float32)
        rel = float((w_hat - w).norm() / w.norm().clamp_min(1e-30))
        set_module(model, name, layer)
        report.rows.append(LayerRow(name, spec.kind, spec.describe() + (" (weighted, GPTQ)" if use_gptq else
                                                                        " (weighted)"), tuple(w.shape),
                                    w.numel() * module.weight.element_size(), layer.nbytes, layer.bits_per_weight,
                                    rel, time.perf_counter() - t0))
    return report

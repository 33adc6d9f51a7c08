"""Budgeted allocation: spend a model-wide bits-per-weight budget where it hurts least.

Every layer gets rate-distortion points, one per candidate setting (an ECSQ step, or an
int-b grid + rANS):

    rate        R = bits the layer's CompressedLinear will hold (words, states, table, scales,
                escapes: all overhead), estimated without encoding (within ~0.3 %)
    distortion  D = E ||(W - W_hat) x||^2 over calibration inputs x, i.e. tr(dW C dW^T) with
                C = sum_t x_t x_t^T (captured with forward hooks). distortion="diag" keeps only
                diag(C): sum_ij dW_ij^2 C_jj, exact in expectation when the quantisation errors of
                different weights are uncorrelated, and d_in times cheaper; "full" uses all of C.
    sensitivity what an output error costs. "fisher" (causal LMs, the default there): the per-weight
                diagonal empirical Fisher F_ij = sum_t (dLoss/dy_ti)^2 x_tj^2 from one backward pass
                of the LM loss on the calibration text, so D = sum_ij F_ij dW_ij^2 estimates the loss
                increase (second order). "gn" (encoders, the default there): the same with random
                projections of the final hidden states in place of a loss, i.e. the Gauss-Newton
                matrix of ||h(W + dW) - h(W)||^2. "fisher-out": F_ij ~ f_i C_jj (per output channel
                only). "output": every output unit-weighted, D = tr(dW C dW^T) (on SmolLM2 at 4.5 bits
                it lost to one uniform step: output error alone does not say what the loss feels).

Then one Lagrange multiplier lam trades them off: every layer takes the point minimising
D + lam * R, and lam is bisected (on log lam) until the summed rate meets the budget. The
remaining gap (the points are discrete) is closed greedily with the cheapest single-layer
moves, so the achieved bits/weight lands within `tolerance` of the budget.

    policy = allocate(model, tok, budget_bits=4.5)
    print(policy)                         # per layer: kind, setting, bits/weight, distortion share
    report = compress_model(model, policy)

`allocate` returns an `Allocation`: a dict {module name: LinearSpec} that `compress_model`
takes as a policy (exact names are valid fnmatch patterns), plus the per-layer table.

rotate="hadamard": every layer is stored rotated (LinearSpec(rotate=...), slc.rotation), so its points are
measured on W R with the moments of its rotated inputs R^T x: C' = R^T C R (the calibration keeps the full
C), x_sq' = diag(C'). The per-weight Fisher of rotated inputs is not in the stats; its row sums are
(||R^T x|| = ||x||), so each row's sum is spread over the columns as x_sq' (`rotated_stats`).
"""
from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from .calibrate import LayerStats, layer_stats
from .ecsq import buffer_bits_estimate, sweep
from .hf import dense_weight_of, has_lm_head, target_layers
from .lagrange import Point, solve
from .models import weight_kind
from .nn import LinearSpec
from .quant import Quantizer
from .rotation import Rotation

KINDS = ("ecsq", "int")
SENSITIVITIES = ("fisher", "fisher-out", "gn", "output")
GN_PROBES = 4             # random projections for sensitivity="gn": the estimate's noise falls as 1/sqrt(probes)
# ECSQ steps (x row RMS): 2**(k/4) from 0.005 to ~3, i.e. about 0.25 bit apart from ~1.2 to ~9 bits/weight
DEFAULT_STEPS = tuple(float(0.005 * 2 ** (k / 4)) for k in range(37))
DEFAULT_INT_BITS = (2, 3, 4, 5, 6, 8)


# ----------------------------------------------------------------------------
# rate-distortion points

def point_quantizer(p: Point, granularity: str, group_size) -> Quantizer:
    """The Quantizer an allocation point stands for (an ECSQ step or int-b, at this granularity)."""
    if p.kind == "ecsq":
        return Quantizer(mode="ecsq", step=p.setting, granularity=granularity, group_size=group_size)
    return Quantizer(bits=int(p.setting), granularity=granularity, group_size=group_size)


def _distortion(dw: torch.Tensor, st: LayerStats, use_full: bool) -> float:
    dw = dw.double()
    if use_full and st.x_cov is not None:
        per_row = ((dw @ st.x_cov) * dw).sum(1)                     # diag(dW C dW^T)
    else:
        per_row = dw.pow(2) @ st.x_sq                               # sum_j dW_ij^2 C_jj
    if st.weight_fisher is not None:
        return float((dw.pow(2) * st.weight_fisher).sum())
    if st.out_weight is not None:
        return float((per_row * st.out_weight).sum())
    return float(per_row.sum())


def rd_points(w: torch.Tensor, st: LayerStats, kinds=("ecsq",), steps=DEFAULT_STEPS, int_bits=DEFAULT_INT_BITS,
              granularity: str = "channel", group_size=None, full: bool = False) -> list[Point]:
    """The layer's candidate settings, each with its rate (bits) and distortion; dominated points dropped."""
    pts = []
    for kind in kinds:
        if kind == "ecsq" and not (full and st.x_cov is not None):     # the compiled sweep: no codes built
            for r in sweep(w, steps, st.x_sq, st.out_weight, granularity, group_size,
                           weight_importance=st.weight_fisher):
                pts.append(Point("ecsq", r["step"], r["bits"] * w.numel(), r["distortion"]))
            continue
        for s in (steps if kind == "ecsq" else int_bits):
            p = Point(kind, float(s), 0.0, 0.0)
            try:
                qt = point_quantizer(p, granularity, group_size).quantize(w)
            except ValueError:                                      # step too fine for this tensor
                continue
            codes = qt.codes.reshape(-1).numpy()
            if kind == "ecsq":
                p.bits = buffer_bits_estimate(codes, qt.scale.numel(), shape=tuple(w.shape))
            else:                                                   # affine codes + rANS: entropy of the symbols
                p.bits = buffer_bits_estimate(codes.astype(np.int64) - qt.quantizer.qmin, qt.scale.numel(),
                                              signed=False, shape=tuple(w.shape))
            p.distortion = _distortion(qt.dequantize(torch.float32) - w, st, full)
            pts.append(p)
    pts.sort(key=lambda p: p.bits)
    hull = []                                                       # keep the lower-left frontier only
    for p in pts:
        if not hull or p.distortion < hull[-1].distortion:
            hull.append(p)
    return hull


def rotated_stats(st: LayerStats, rot: Rotation, keep_cov: bool = False) -> LayerStats:
    """The layer's calibration moments as its rotated inputs R^T x see them (st needs the full C).

    x_sq = diag(R^T C R) exactly (and C itself with keep_cov); a per-weight Fisher F_ij = sum_t g_ti^2 x_tj^2
    becomes (sum_j F_ij) x_sq'_j / sum_j x_sq'_j (row sums are exact: a rotation keeps ||x_t||; the spread over
    columns is the rank-one approximation). Per-output weights do not change."""
    if st.x_cov is None:
        raise ValueError("rotated statistics need the full input moments C (layer_stats(..., full=True))")
    cov = rot.conjugate(st.x_cov)
    x_sq = torch.diagonal(cov).clone()
    wf = st.weight_fisher
    if wf is not None:
        spread = x_sq / x_sq.sum().clamp_min(1e-300)
        wf = (wf.double().sum(1, keepdim=True) * spread[None, :]).to(wf.dtype)
    return replace(st, x_sq=x_sq, x_cov=cov if keep_cov else None, weight_fisher=wf, shared_with=None)


def rotated_layer(w: torch.Tensor, st: LayerStats, rot: Rotation | None,
                  keep_cov: bool = False) -> tuple[torch.Tensor, LayerStats]:
    """(W R, the moments of the rotated inputs R^T x) for a layer stored rotated by `rot`; (w, st) as they are
    when rot is None."""
    if rot is None:
        return w, st
    return rot.apply(w.double()).float(), rotated_stats(st, rot, keep_cov=keep_cov)


def layer_rotations(layers: dict, rotate: str | None, rotate_seed: int = 0) -> dict:
    """{name: Rotation or None} of every layer stored with LinearSpec(rotate=, rotate_seed=): checks rotate, its
    seed and every layer's width up front, so a bad one fails before any calibration."""
    spec = LinearSpec("entropy", rotate=rotate, rotate_seed=rotate_seed)
    return {name: spec.rotation(dense_weight_of(m).shape[1], name) for name, m in layers.items()}


def window_steps(w: torch.Tensor, steps, budget_bits: float, window: float, granularity, group_size) -> list:
    """The steps whose rate on w is predicted within +-window bits of the budget (rate ~ r(s0) - log2(s / s0))."""
    if window is None or not math.isfinite(window):
        return list(steps)
    s0 = 0.1
    r0 = sweep(w, [s0], granularity=granularity, group_size=group_size)[0]["bits"]
    keep = [s for s in steps if abs(r0 - math.log2(s / s0) - budget_bits) <= window]
    return keep or list(steps)


# ----------------------------------------------------------------------------
# the allocation

@dataclass
class AllocationRow:
    name: str
    shape: tuple
    kind: str
    setting: float
    bits_per_weight: float          # estimated, all overhead (what the CompressedLinear holds)
    distortion: float
    distortion_share: float         # of the model's total


class Allocation(dict):
    """{module name: LinearSpec}, usable as compress_model(model, allocation); plus the per-layer table.

    attributes: budget_bits, bits_per_weight (estimated, all overhead), lam, rows (AllocationRow),
                settings (how it was made)
    """

    def __init__(self, specs: dict, rows: list, budget_bits: float, lam: float, settings: dict):
        super().__init__(specs)
        self.rows, self.budget_bits, self.lam, self.settings = rows, budget_bits, lam, settings

    @property
    def params(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.rows)

    @property
    def bits_per_weight(self) -> float:
        return sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in self.rows) / max(self.params, 1)

    def by_kind(self) -> dict:
        """Mean bits/weight per weight kind (q, k, v, o, gate, up, down ...), weighted by size."""
        acc: dict = {}
        for r in self.rows:
            k = weight_kind(r.name)
            b, n = acc.get(k, (0.0, 0))
            acc[k] = (b + r.bits_per_weight * r.shape[0] * r.shape[1], n + r.shape[0] * r.shape[1])
        return {k: b / n for k, (b, n) in acc.items()}

    def table(self) -> list[dict]:
        return [r.__dict__.copy() for r in self.rows]

    def _lines(self) -> list[list[str]]:
        head = ["layer", "shape", "kind", "setting", "bits/w", "share of D"]
        body = [[r.name, f"{r.shape[0]}x{r.shape[1]}", r.kind,
                 f"step {r.setting:.4g}" if r.kind == "ecsq" else f"int{int(r.setting)}",
                 f"{r.bits_per_weight:.2f}", f"{100 * r.distortion_share:.1f} %"] for r in self.rows]
        return [head] + body

    def __str__(self) -> str:
        lines = self._lines()
        widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
        out = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
               for row in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        out.append(f"budget {self.budget_bits:.3f} bits/weight -> {self.bits_per_weight:.3f} estimated "
                   f"over {len(self.rows)} layers ({self.params} weights); lambda {self.lam:.3g}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return (f"Allocation({len(self)} layers, budget {self.budget_bits} -> {self.bits_per_weight:.3f} bits/weight, "
                f"kinds {self.settings.get('kinds')})")

    def _repr_html_(self) -> str:
        lines = self._lines()
        rows = ["<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in lines[0]) + "</tr>"]
        rows += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in lines[1:]]
        return (f"<table>{''.join(rows)}</table><p>budget {self.budget_bits:.3f} bits/weight &rarr; "
                f"{self.bits_per_weight:.3f} estimated; &lambda; = {self.lam:.3g}</p>")


@dataclass
class RDTable:
    """Every layer's rate-distortion points, reusable for several budgets (see `allocate(..., rd=...)`)."""
    points: dict                      # {module name: [Point, ...]} sorted by bits, dominated points dropped
    shapes: dict                      # {module name: (out, in)}
    settings: dict = field(default_factory=dict)
    energy: dict = field(default_factory=dict)      # {module name: ||W||^2} (for allocate(..., temper=))


def layer_sensitivity(pts: list[Point], energy: float) -> float:
    """How much one unit of plain weight error costs in this layer: its distortion per unit of sum dW^2.

    From the finest ECSQ point (step s x row RMS, high rate): plain error sum dW^2 ~ s^2 / 12 x ||W||^2, so
    the sensitivity is D(s) / (s^2 / 12 x ||W||^2); for an unweighted distortion it is 1."""
    ecsq = [p for p in pts if p.kind == "ecsq"]
    if not ecsq or not energy > 0:
        raise ValueError("a layer's sensitivity needs ECSQ points and its weights' energy (rate_distortion "
                         "measures both)")
    p = min(ecsq, key=lambda p: p.setting)
    return max(p.distortion, 1e-300) / (p.setting ** 2 / 12 * energy)


def check_temper(temper) -> float:
    """temper as a float, or ValueError unless it is a number in [0, 1]."""
    if isinstance(temper, bool) or not isinstance(temper, (int, float)) or not 0.0 <= temper <= 1.0:
        raise ValueError(f"temper={temper!r}: use a number in [0, 1] (1: the measured sensitivities)")
    return float(temper)


def tempered_points(rd: RDTable, temper: float) -> dict:
    """rd's points with every layer's sensitivity k raised to the power `temper` (0 <= temper <= 1): each
    distortion times k^(temper - 1). 1 leaves them as measured; 0 weighs every layer's plain weight error alike
    (relative to its energy); in between it shrinks the calibration's verdict on which layers matter toward
    "all alike" on a log scale, a hedge for text the calibration never saw. Within a layer nothing changes."""
    if check_temper(temper) == 1.0:
        return rd.points
    missing = [n for n in rd.points if n not in rd.energy]
    if missing:
        raise ValueError(f"temper={temper} needs the weights' energy of every layer; this rd table lacks "
                         f"{missing[:3]} (measure it again with rate_distortion)")
    out = {}
    for n, pts in rd.points.items():
        scale = layer_sensitivity(pts, rd.energy[n]) ** (temper - 1.0)          # once per layer
        out[n] = [replace(p, distortion=p.distortion * scale) for p in pts]
    return out


def rate_distortion(model: nn.Module, tokenizer, calibration_text: str | None = None, kinds=("ecsq",), *,
                    granularity: str = "channel", group_size: int | None = None, steps=DEFAULT_STEPS,
                    int_bits=DEFAULT_INT_BITS, sensitivity: str = "auto", distortion: str = "diag",
                    max_tokens: int = 512, skip=None, budget_bits: float | None = None, window: float | None = 4.0,
                    progress: bool = False, rotate: str | None = None, rotate_seed: int = 0) -> RDTable:
    """Calibrate once (forward hooks, and a backward pass for sensitivity="fisher") and measure every
    layer's rate-distortion points. budget_bits + window limit the ECSQ steps tried to those predicted
    within +-window bits of the budget; budget_bits=None tries them all (for many budgets).
    rotate / rotate_seed: the points of every layer stored rotated (see the module docstring); ValueError
    naming a layer whose width the rotation cannot cover."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds={kinds!r}: use a tuple of {KINDS}, e.g. ('ecsq',)")
    if distortion not in ("diag", "full"):
        raise ValueError(f"distortion={distortion!r}: use 'diag' or 'full'")
    has_head = has_lm_head(model)
    if sensitivity == "auto":
        sensitivity = "fisher" if has_head else "gn"
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity={sensitivity!r}: use one of {SENSITIVITIES} or 'auto'")
    if sensitivity.startswith("fisher") and not has_head:
        raise ValueError(f"sensitivity={sensitivity!r} needs a language-model loss; this model has no LM head: "
                         "use sensitivity='gn' (random projections of the final hidden states)")
    layers = target_layers(model, skip)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear / Conv1D layers outside the skipped ones")
    rots = layer_rotations(layers, rotate, rotate_seed)              # before calibrating: bad widths fail fast
    t0 = time.perf_counter()
    full = distortion == "full" or rotate is not None
    stats = layer_stats(model, tokenizer, calibration_text, list(layers), max_tokens, full=full,
                        fisher={"fisher": "weight", "fisher-out": "out", "gn": "weight"}.get(sensitivity, False),
                        probes=GN_PROBES if sensitivity == "gn" else 0)
    missing = [n for n in layers if n not in stats]
    if missing:
        raise ValueError(f"calibration forward pass never reached {missing[:3]}: these layers are unused")
    points, shapes, energy = {}, {}, {}
    it = layers.items()
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="rate-distortion", unit="layer")
    for name, m in it:
        w = dense_weight_of(m).float()
        shapes[name], energy[name] = tuple(w.shape), float(w.double().pow(2).sum())   # R keeps the energy
        w, st = rotated_layer(w, stats[name], rots[name], keep_cov=distortion == "full")
        tried = steps if budget_bits is None else window_steps(w, steps, budget_bits, window, granularity, group_size)
        points[name] = rd_points(w, st, kinds, tried, int_bits, granularity, group_size,
                                 full=distortion == "full")
    settings = {"kinds": kinds, "granularity": granularity, "group_size": group_size, "sensitivity": sensitivity,
                "distortion": distortion, "max_tokens": max_tokens, "tokens": max(s.tokens for s in stats.values()),
                "rotate": rotate, "rotate_seed": rotate_seed, "seconds": time.perf_counter() - t0}
    return RDTable(points, shapes, settings, energy)


def allocate(model: nn.Module, tokenizer, budget_bits: float = 4.5, calibration_text: str | None = None,
             kinds=("ecsq",), *, granularity: str = "channel", group_size: int | None = None,
             steps=DEFAULT_STEPS, int_bits=DEFAULT_INT_BITS, sensitivity: str = "auto",
             distortion: str = "diag", max_tokens: int = 512, skip=None, tolerance: float = 0.005,
             window: float | None = 4.0, rd: RDTable | None = None, progress: bool = False,
             rotate: str | None = None, rotate_seed: int = 0, temper: float = 1.0) -> Allocation:
    """Choose every layer's quantiser so the model lands on `budget_bits` bits/weight with the least damage.

    kinds: candidate storage: "ecsq" (step grid + rANS, `steps` x row RMS) and/or "int" (affine
    int-b + rANS, b in `int_bits`), per `granularity`. sensitivity: "fisher", "gn", "fisher-out",
    "output" (see the module docstring) or "auto" (fisher when the model has a LM head, else gn).
    distortion: "diag" or "full" (see the module docstring). Budget counts every byte the
    CompressedLinear layers hold (all overhead), over the layers compressed (embeddings and lm_head
    are skipped, like compress_model); `tolerance` is relative. `window`: only ECSQ steps whose rate on
    a layer is predicted within +-window bits of the budget are tried (rate ~ c - log2(step)).
    rd: a `rate_distortion(...)` table to reuse (then the calibration arguments are not used again).
    rotate / rotate_seed: store every layer rotated (LinearSpec(rotate=...)), its points measured on W R
    (see the module docstring); with rd, the table's own setting is used.
    temper: how far to trust the calibration's ranking of the layers (`tempered_points`): 1 as measured, 0 every
    layer's plain weight error alike; the table's distortions are the measured ones.

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from slc.models import tiny_model
    >>> from slc.compress import compress_model
    >>> tok = lambda text, return_tensors="pt": SimpleNamespace(input_ids=torch.tensor([list(text.encode())]) % 128)
    >>> model = tiny_model("llama")
    >>> policy = allocate(model, tok, budget_bits=4.5, calibration_text="some calibration text " * 10)
    >>> report = compress_model(model, policy, progress=False)
    >>> abs(report.totals()["bits_per_weight"] - 4.5) < 0.02 * 4.5
    True
    """
    if isinstance(budget_bits, bool) or not isinstance(budget_bits, (int, float)) or not 0.5 <= budget_bits <= 16:
        raise ValueError(f"budget_bits={budget_bits!r} must be a number of bits per weight in [0.5, 16], e.g. 4.5")
    temper = check_temper(temper)
    t0 = time.perf_counter()
    if rd is None:
        rd = rate_distortion(model, tokenizer, calibration_text, kinds, granularity=granularity, group_size=group_size,
                             steps=steps, int_bits=int_bits, sensitivity=sensitivity, distortion=distortion,
                             max_tokens=max_tokens, skip=skip, budget_bits=budget_bits, window=window,
                             progress=progress, rotate=rotate, rotate_seed=rotate_seed)
    elif rotate is not None and (rotate, rotate_seed) != (rd.settings.get("rotate"), rd.settings.get("rotate_seed")):
        raise ValueError(f"rotate={rotate!r} but the rd table was measured with rotate="
                         f"{rd.settings.get('rotate')!r}: pass rate_distortion(..., rotate=...) or drop rotate=")
    rotate, rotate_seed = rd.settings.get("rotate"), rd.settings.get("rotate_seed", 0)
    granularity, group_size = rd.settings["granularity"], rd.settings["group_size"]
    n_weights = {n: shape[0] * shape[1] for n, shape in rd.shapes.items()}
    total_w = sum(n_weights.values())
    ch, lam = solve(tempered_points(rd, temper), budget_bits * total_w, tolerance * budget_bits * total_w)
    total_d = sum(rd.points[n][ch[n]].distortion for n in rd.points) or 1.0
    specs, rows = {}, []
    for n, pts in rd.points.items():
        p = pts[ch[n]]
        specs[n] = LinearSpec(kind="entropy", quantizer=point_quantizer(p, granularity, group_size),
                              predictor="none", rotate=rotate, rotate_seed=rotate_seed)
        rows.append(AllocationRow(n, rd.shapes[n], p.kind, p.setting, p.bits / n_weights[n],
                                  p.distortion, p.distortion / total_d))
    settings = {**rd.settings, "temper": temper, "seconds": rd.settings["seconds"] + time.perf_counter() - t0}
    return Allocation(specs, rows, float(budget_bits), lam, settings)


def uniform_allocation(rd: RDTable, budget_bits: float) -> Allocation:
    """One ECSQ step (x row RMS) for every layer, the step chosen so the estimated bits meet `budget_bits`:
    the calibration-free counterpart of `allocate` on the same rd table (its rates, interpolated linearly in
    log2(step) between the measured steps). Out of domain it can beat a sensitivity-weighted allocation whose
    sensitivities were fitted on other text (bench/results/frontier_ood.md)."""
    if any(p.kind != "ecsq" for pts in rd.points.values() for p in pts):
        raise ValueError("uniform_allocation needs an ECSQ-only rd table (rate_distortion(..., kinds=('ecsq',)))")
    if rd.settings.get("granularity", "channel") != "channel":
        raise ValueError("uniform_allocation needs per-channel ECSQ steps (granularity='channel')")
    n_weights = {n: a * b for n, (a, b) in rd.shapes.items()}
    curves = {}
    for n, pts in rd.points.items():
        pts = sorted(pts, key=lambda p: p.setting)
        curves[n] = (np.log2([p.setting for p in pts]), np.array([p.bits for p in pts]),
                     np.array([p.distortion for p in pts]))

    def at(log_step: float):
        bits = dist = 0.0
        for x, r, d in curves.values():
            bits += float(np.interp(log_step, x, r))
            dist += float(np.interp(log_step, x, d))
        return bits, dist

    spans = [(float(x[0]), float(x[-1])) for x, _, _ in curves.values() if len(x) > 1]
    if not spans:
        raise ValueError("uniform_allocation needs at least one layer with two or more rate-distortion points")
    lo, hi = max(a for a, _ in spans), min(b for _, b in spans)    # steps every layer was measured between
    # (a layer with one point left after dropping dominated ones, e.g. one no output reads, keeps that rate)
    total = budget_bits * sum(n_weights.values())
    if not lo < hi or not at(hi)[0] <= total <= at(lo)[0]:
        raise ValueError(f"budget {budget_bits} bits/weight is outside what one step reaches on every layer: "
                         f"{at(hi)[0] / sum(n_weights.values()):.2f} .. {at(lo)[0] / sum(n_weights.values()):.2f}")
    for _ in range(60):                                            # rate falls as the step grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid)[0] > total else (lo, mid)
    step = float(2 ** ((lo + hi) / 2))
    rotate, rotate_seed = rd.settings.get("rotate"), rd.settings.get("rotate_seed", 0)
    specs, rows, total_d = {}, [], at(math.log2(step))[1] or 1.0
    for n, (x, r, d) in curves.items():
        specs[n] = LinearSpec(kind="entropy", quantizer=Quantizer(mode="ecsq", step=step), predictor="none",
                              rotate=rotate, rotate_seed=rotate_seed)
        bits, dist = float(np.interp(math.log2(step), x, r)), float(np.interp(math.log2(step), x, d))
        rows.append(AllocationRow(n, rd.shapes[n], "ecsq", step, bits / n_weights[n], dist, dist / total_d))
    return Allocation(specs, rows, float(budget_bits), 0.0, {**rd.settings, "uniform": True})


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
"""
from __future__ import annotations

import fnmatch
import html
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .ecsq import buffer_bits_estimate, sweep
from .quant import Quantizer

KINDS = ("ecsq", "int")
SENSITIVITIES = ("fisher", "fisher-out", "gn", "output")
GN_PROBES = 4             # random projections for sensitivity="gn": the estimate's noise falls as 1/sqrt(probes)
# ECSQ steps (x row RMS): 2**(k/4) from 0.005 to ~3, i.e. about 0.25 bit apart from ~1.2 to ~9 bits/weight
DEFAULT_STEPS = tuple(float(0.005 * 2 ** (k / 4)) for k in range(37))
DEFAULT_INT_BITS = (2, 3, 4, 5, 6, 8)


# ----------------------------------------------------------------------------
# calibration statistics

@dataclass
class LayerStats:
    """What allocation needs to know about one layer's inputs (and outputs)."""
    x_sq: torch.Tensor                        # (in,) float64: sum over tokens of x_j^2 = diag(C)
    x_cov: torch.Tensor | None = None         # (in, in) float64: C = sum_t x_t x_t^T (distortion="full")
    out_weight: torch.Tensor | None = None    # (out,) float64: f_i = sum_t (dLoss/dy_ti)^2 (sensitivity="fisher-out")
    weight_fisher: torch.Tensor | None = None # (out, in) float32: F_ij = sum_t (dLoss/dy_ti)^2 x_tj^2 (sensitivity="fisher")
    tokens: int = 0
    shared_with: str | None = None            # x_sq / x_cov are the same tensors as this layer's (same input)


def _is_linear(m: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D
    return isinstance(m, (nn.Linear, Conv1D))


def _weight(m: nn.Module) -> torch.Tensor:
    """(out, in) float32 view of a Linear or Conv1D weight."""
    from transformers.pytorch_utils import Conv1D
    w = m.weight.detach()
    return (w.T if isinstance(m, Conv1D) else w).float()


def target_layers(model: nn.Module, skip=None) -> dict[str, nn.Module]:
    """The layers compress_model compresses by default: every Linear / Conv1D but embeddings and lm_head."""
    if skip is None:
        from .model import DEFAULT_SKIP
        skip = DEFAULT_SKIP
    return {n: m for n, m in model.named_modules()
            if _is_linear(m) and not any(fnmatch.fnmatchcase(n, p) for p in skip)}


class _Restore:
    """A handle whose remove() runs `undo` once (used beside torch hook handles)."""

    def __init__(self, undo):
        self._undo = undo

    def remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


def _eval_mode(model: nn.Module) -> _Restore:
    """model.eval() now; the returned handle's remove() restores training mode."""
    was_training = model.training
    model.eval()
    return _Restore(lambda: model.train(was_training))


def activation_grads(model: nn.Module) -> _Restore:
    """Ready `model` for backward passes that need gradients at activations only: eval mode, every
    parameter frozen, and the input embeddings' output made a leaf that requires grad. Returns a handle
    whose remove() undoes all three (call it in a finally)."""
    mode = _eval_mode(model)
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))

    def undo():
        hook.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        mode.remove()
    return _Restore(undo)


CHUNK_TOKENS = 512        # calibration runs in sequences of at most this many tokens (and the model's limit)


def layer_stats(model: nn.Module, tokenizer, text: str, names, max_tokens: int = 512,
                full: bool = False, fisher: bool | str = False, probes: int = 0) -> dict[str, LayerStats]:
    """Calibration statistics of every layer in `names` from the first `max_tokens` tokens of `text`.

    The text runs in sequences of CHUNK_TOKENS (or the model's position limit). Always: the inputs'
    sum x_j^2 (and with full=True C = sum x x^T). With fisher, one backward pass per sequence for the
    squared loss gradient at every layer's output: fisher="out" keeps its per-output sum f_i,
    fisher=True / "weight" the per-weight diagonal Fisher F_ij = sum_t g_ti^2 x_tj^2.
    probes > 0 replaces the LM loss by `probes` random projections r . h of the final hidden states h
    (r ~ N(0, I), seeded): E[g g^T] is then the Gauss-Newton matrix of ||h(W + dW) - h(W)||^2, which
    needs no head and no labels (encoders such as MiniLM). Layers fed the very same input tensor
    (q/k/v, gate/up) share one x_sq / C (`shared_with`)."""
    per_weight = fisher is True or fisher == "weight"
    modules = dict(model.named_modules())
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or CHUNK_TOKENS
    all_ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    size = min(limit, CHUNK_TOKENS)
    chunks = [all_ids[:, i:i + size] for i in range(0, all_ids.shape[1], size)]
    chunks = [c for c in chunks if c.shape[1] >= 2]
    if not chunks:
        raise ValueError("calibration text is too short: it must tokenise to at least 2 tokens")
    dev = next(model.parameters()).device
    stats: dict[str, LayerStats] = {}
    inputs: dict[str, torch.Tensor] = {}                     # x^2 of the current sequence, for the backward
    state = {"x": None, "name": None, "count": True}         # count: first pass over this sequence

    def pre_hook(name):
        def fn(module, args):
            if not state["count"]:                           # later probe passes: same inputs, already counted
                return
            if args[0] is state["x"]:                        # same tensor as the previous layer's input
                src = stats[state["name"]]
                if name not in stats:
                    stats[name] = LayerStats(src.x_sq, src.x_cov, shared_with=state["name"])
                stats[name].tokens = src.tokens
                if per_weight:
                    inputs[name] = inputs[state["name"]]
                return
            state["x"], state["name"] = args[0], name
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()          # (tokens, in)
            s = stats.setdefault(name, LayerStats(torch.zeros(x.shape[1], dtype=torch.float64)))
            s.x_sq += x.pow(2).sum(0)
            s.tokens += x.shape[0]
            if full:
                if s.x_cov is None:
                    s.x_cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                s.x_cov += x.T @ x                                                # in place: shared layers see it
            if per_weight:
                inputs[name] = x.pow(2).float()
        return fn

    def fwd_hook(name):
        def fn(module, args, out):
            if out.requires_grad:
                def grad_fn(g):
                    g2 = g.detach().reshape(-1, g.shape[-1]).float().pow(2)             # (tokens, out)
                    s = stats[name]
                    if per_weight:
                        f = g2.T @ inputs[name]                                      # (out, in) float32
                        s.weight_fisher = f if s.weight_fisher is None else s.weight_fisher + f
                    else:
                        g2 = g2.double().sum(0)
                        s.out_weight = g2 if s.out_weight is None else s.out_weight + g2
                out.register_hook(grad_fn)
        return fn

    handles = []
    for n in names:
        handles.append(modules[n].register_forward_pre_hook(pre_hook(n)))
        if fisher:
            handles.append(modules[n].register_forward_hook(fwd_hook(n)))
    try:
        if fisher:
            handles.append(activation_grads(model))
        else:
            handles.append(_eval_mode(model))
        gen = torch.Generator().manual_seed(0)
        for ids in chunks:
            ids = ids.to(dev)
            state.update(x=None, name=None, count=True)
            if not fisher:
                with torch.inference_mode():
                    model(ids)
                continue
            with torch.enable_grad():
                if probes:
                    for _ in range(probes):
                        out = model(ids)
                        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                        state["count"] = False
                        (h * torch.randn(h.shape, generator=gen).to(h)).sum().backward()
                else:
                    model(ids, labels=ids).loss.backward()
            inputs.clear()
    finally:
        for h in handles:
            h.remove()
        state.update(x=None, name=None, count=True)
        inputs.clear()
    return stats


# ----------------------------------------------------------------------------
# rate-distortion points

@dataclass
class Point:
    kind: str                  # "ecsq" or "int"
    setting: float             # ecsq step (x RMS) or int bits
    bits: float                # total bits the layer will hold
    distortion: float          # weighted output error (see module docstring)

    def quantizer(self, granularity: str, group_size) -> Quantizer:
        if self.kind == "ecsq":
            return Quantizer(mode="ecsq", step=self.setting, granularity=granularity, group_size=group_size)
        return Quantizer(bits=int(self.setting), granularity=granularity, group_size=group_size)


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
                qt = p.quantizer(granularity, group_size).quantize(w)
            except ValueError:                                      # step too fine for this tensor
                continue
            codes = qt.codes.reshape(-1).numpy()
            if kind == "ecsq":
                p.bits = buffer_bits_estimate(codes, qt.scale.numel())
            else:                                                   # affine codes + rANS: entropy of the symbols
                p.bits = buffer_bits_estimate(codes.astype(np.int64) - qt.quantizer.qmin, qt.scale.numel(), signed=False)
            p.distortion = _distortion(qt.dequantize(torch.float32) - w, st, full)
            pts.append(p)
    pts.sort(key=lambda p: p.bits)
    hull = []                                                       # keep the lower-left frontier only
    for p in pts:
        if not hull or p.distortion < hull[-1].distortion:
            hull.append(p)
    return hull


def _window(w: torch.Tensor, steps, budget_bits: float, window: float, granularity, group_size) -> list:
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
        from .models import weight_kind
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
        out = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in lines]
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


def solve(points: dict[str, list[Point]], budget_total_bits: float, tolerance_bits: float):
    """Lagrangian choice of one point per layer with sum(bits) close to budget_total_bits.

    Returns ({name: index into points[name]}, lam). Bisection on log(lam), then greedy single-layer
    moves (best distortion per bit) to land within tolerance_bits of the budget from below if possible.
    """
    names = list(points)
    R = {n: np.array([p.bits for p in points[n]]) for n in names}
    D = {n: np.array([p.distortion for p in points[n]]) for n in names}

    def pick(lam):
        return {n: int(np.argmin(D[n] + lam * R[n])) for n in names}

    def total(ch):
        return sum(R[n][ch[n]] for n in names)

    min_total = sum(R[n].min() for n in names)
    max_total = sum(R[n].max() for n in names)
    if budget_total_bits < min_total:
        raise ValueError(f"budget is below the coarsest setting of every layer "
                         f"({min_total / sum(1 for _ in names):.0f} bits per layer); raise it or add coarser steps")
    if budget_total_bits >= max_total:
        return {n: int(np.argmax(R[n])) for n in names}, 0.0
    lo, hi = -60.0, 60.0                                            # log lam: lo = spend everything, hi = nothing
    for _ in range(100):
        mid = (lo + hi) / 2
        if total(pick(math.exp(mid))) > budget_total_bits:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    lam = math.exp(hi)
    ch = pick(lam)                                                  # at or under budget
    # greedy: the discrete hull leaves a gap; fill it with the moves that buy the most D per bit
    for _ in range(10 * len(names)):
        gap = budget_total_bits - total(ch)
        if abs(gap) <= tolerance_bits:
            break
        best, best_score = None, -math.inf
        for n in names:
            i = ch[n]
            for j in (i - 1, i + 1):
                if not 0 <= j < len(R[n]):
                    continue
                dr, dd = R[n][j] - R[n][i], D[n][j] - D[n][i]
                if gap > 0 and 0 < dr <= gap + tolerance_bits:      # spend: most D saved per bit
                    score = -dd / dr
                elif gap < 0 and dr < 0:                            # save: least D added per bit
                    score = dd / dr                                 # dd >= 0 > dr: closest to 0 adds least D per bit
                else:
                    continue
                if score > best_score:
                    best, best_score = (n, j), score
        if best is None:
            break
        ch[best[0]] = best[1]
    return ch, lam


@dataclass
class RDTable:
    """Every layer's rate-distortion points, reusable for several budgets (see `allocate(..., rd=...)`)."""
    points: dict                      # {module name: [Point, ...]} sorted by bits, dominated points dropped
    shapes: dict                      # {module name: (out, in)}
    settings: dict = field(default_factory=dict)


def rate_distortion(model: nn.Module, tokenizer, calibration_text: str | None = None, kinds=("ecsq",), *,
                    granularity: str = "channel", group_size: int | None = None, steps=DEFAULT_STEPS,
                    int_bits=DEFAULT_INT_BITS, sensitivity: str = "auto", distortion: str = "diag",
                    max_tokens: int = 512, skip=None, budget_bits: float | None = None, window: float | None = 4.0,
                    progress: bool = False) -> RDTable:
    """Calibrate once (forward hooks, and a backward pass for sensitivity="fisher") and measure every
    layer's rate-distortion points. budget_bits + window limit the ECSQ steps tried to those predicted
    within +-window bits of the budget; budget_bits=None tries them all (for many budgets)."""
    from .models import calibration_text as default_text

    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds={kinds!r}: use a tuple of {KINDS}, e.g. ('ecsq',)")
    if distortion not in ("diag", "full"):
        raise ValueError(f"distortion={distortion!r}: use 'diag' or 'full'")
    has_head = hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
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
    t0 = time.perf_counter()
    text = calibration_text if calibration_text is not None else default_text()
    stats = layer_stats(model, tokenizer, text, list(layers), max_tokens, full=distortion == "full",
                        fisher={"fisher": "weight", "fisher-out": "out", "gn": "weight"}.get(sensitivity, False),
                        probes=GN_PROBES if sensitivity == "gn" else 0)
    missing = [n for n in layers if n not in stats]
    if missing:
        raise ValueError(f"calibration forward pass never reached {missing[:3]}: these layers are unused")
    points, shapes = {}, {}
    it = layers.items()
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="rate-distortion", unit="layer")
    for name, m in it:
        w = _weight(m)
        shapes[name] = tuple(w.shape)
        tried = steps if budget_bits is None else _window(w, steps, budget_bits, window, granularity, group_size)
        points[name] = rd_points(w, stats[name], kinds, tried, int_bits, granularity, group_size,
                                 full=distortion == "full")
    settings = {"kinds": kinds, "granularity": granularity, "group_size": group_size, "sensitivity": sensitivity,
                "distortion": distortion, "max_tokens": max_tokens, "tokens": max(s.tokens for s in stats.values()),
                "seconds": time.perf_counter() - t0}
    return RDTable(points, shapes, settings)


def allocate(model: nn.Module, tokenizer, budget_bits: float = 4.5, calibration_text: str | None = None,
             kinds=("ecsq",), *, granularity: str = "channel", group_size: int | None = None,
             steps=DEFAULT_STEPS, int_bits=DEFAULT_INT_BITS, sensitivity: str = "auto",
             distortion: str = "diag", max_tokens: int = 512, skip=None, tolerance: float = 0.005,
             window: float | None = 4.0, rd: RDTable | None = None, progress: bool = False) -> Allocation:
    """Choose every layer's quantiser so the model lands on `budget_bits` bits/weight with the least damage.

    kinds: candidate storage: "ecsq" (step grid + rANS, `steps` x row RMS) and/or "int" (affine
    int-b + rANS, b in `int_bits`), per `granularity`. sensitivity: "fisher", "gn", "fisher-out",
    "output" (see the module docstring) or "auto" (fisher when the model has a LM head, else gn).
    distortion: "diag" or "full" (see the module docstring). Budget counts every byte the
    CompressedLinear layers hold (all overhead), over the layers compressed (embeddings and lm_head
    are skipped, like compress_model); `tolerance` is relative. `window`: only ECSQ steps whose rate on
    a layer is predicted within +-window bits of the budget are tried (rate ~ c - log2(step)).
    rd: a `rate_distortion(...)` table to reuse (then the calibration arguments are not used again).

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from slc.models import tiny_model
    >>> from slc.model import compress_model
    >>> tok = lambda text, return_tensors="pt": SimpleNamespace(input_ids=torch.tensor([list(text.encode())]) % 128)
    >>> model = tiny_model("llama")
    >>> policy = allocate(model, tok, budget_bits=4.5, calibration_text="some calibration text " * 10)
    >>> report = compress_model(model, policy, progress=False)
    >>> abs(report.totals()["bits_per_weight"] - 4.5) < 0.02 * 4.5
    True
    """
    from .nn import LinearSpec

    if isinstance(budget_bits, bool) or not isinstance(budget_bits, (int, float)) or not 0.5 <= budget_bits <= 16:
        raise ValueError(f"budget_bits={budget_bits!r} must be a number of bits per weight in [0.5, 16], e.g. 4.5")
    t0 = time.perf_counter()
    if rd is None:
        rd = rate_distortion(model, tokenizer, calibration_text, kinds, granularity=granularity, group_size=group_size,
                             steps=steps, int_bits=int_bits, sensitivity=sensitivity, distortion=distortion,
                             max_tokens=max_tokens, skip=skip, budget_bits=budget_bits, window=window,
                             progress=progress)
    granularity, group_size = rd.settings["granularity"], rd.settings["group_size"]
    n_weights = {n: shape[0] * shape[1] for n, shape in rd.shapes.items()}
    total_w = sum(n_weights.values())
    ch, lam = solve(rd.points, budget_bits * total_w, tolerance * budget_bits * total_w)
    total_d = sum(rd.points[n][ch[n]].distortion for n in rd.points) or 1.0
    specs, rows = {}, []
    for n, pts in rd.points.items():
        p = pts[ch[n]]
        specs[n] = LinearSpec(kind="entropy", quantizer=p.quantizer(granularity, group_size), predictor="none")
        rows.append(AllocationRow(n, rd.shapes[n], p.kind, p.setting, p.bits / n_weights[n],
                                  p.distortion, p.distortion / total_d))
    settings = {**rd.settings, "seconds": rd.settings["seconds"] + time.perf_counter() - t0}
    return Allocation(specs, rows, float(budget_bits), lam, settings)


# ----------------------------------------------------------------------------
# GPTQ codes for a whole model, stored as compress_model would store them

def _spec_for(name: str, policy):
    from .nn import LinearSpec
    if isinstance(policy, LinearSpec):
        return policy
    if name in policy:
        return policy[name]
    for pat, spec in policy.items():
        if fnmatch.fnmatchcase(name, pat):
            return spec
    return None


def compress_model_gptq(model: nn.Module, tokenizer, policy, calibration_text: str | None = None,
                        max_tokens: int = 2048, block: int = 128, damp: float = 0.01, skip=None,
                        progress: bool = False):
    """compress_model with GPTQ codes: same policy, same grids, same CompressedLinear layers, less damage.

    Each layer the policy gives an "entropy" spec is quantised by `slc.ecsq.gptq` on that spec's grid
    with C = sum x x^T of its calibration inputs (all captured from the original model in one pass),
    then rANS-coded exactly as compress_model would, so the file format, bits/weight and loading are
    unchanged. Works with an `allocate()` policy. Returns the CompressionReport compress_model returns.

    slc.nn has no constructor from precomputed codes yet, so the layer is assembled here from the
    public CompressedLinear(meta, buffers) constructor, with the meta that from_linear writes.
    """
    from dataclasses import asdict

    from .ecsq import gptq
    from .model import CompressionReport, LayerRow
    from .models import calibration_text as default_text
    from .nn import CompressedLinear, check_meta
    from .tensor import CompressedTensor, dtype_name

    layers = target_layers(model, skip)
    chosen = {}
    for n, m in layers.items():
        spec = _spec_for(n, policy)
        if spec is None:
            continue
        if spec.kind != "entropy":
            raise ValueError(f"compress_model_gptq stores rANS-coded codes: layer {n!r} has kind={spec.kind!r}; "
                             "use kind='entropy' (what allocate() returns) or compress_model for other kinds")
        chosen[n] = (m, spec)
    if not chosen:
        raise ValueError("the policy selects no layer: pass allocate()'s result or {pattern: LinearSpec('entropy', ...)}")
    text = calibration_text if calibration_text is not None else default_text()
    stats = layer_stats(model, tokenizer, text, list(chosen), max_tokens, full=True)
    report = CompressionReport()
    it = chosen.items()
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="gptq", unit="layer")
    for name, (module, spec) in it:
        t0 = time.perf_counter()
        w = _weight(module)
        qt = gptq(w, stats[name].x_cov, spec.quantizer, block=block, damp=damp)
        qt.original_dtype = module.weight.dtype
        ct = CompressedTensor.from_quantized(qt, predictor=spec.predictor)
        buffers = {k: v.to(module.weight.device) for k, v in ct.buffers().items()}
        if getattr(module, "bias", None) is not None:
            buffers["bias"] = module.bias.detach().clone()
        out_f, in_f = w.shape
        meta = {"kind": "entropy", "in_features": in_f, "out_features": out_f,
                "dtype": dtype_name(module.weight.dtype), "spec": spec.to_dict(), "quantizer": asdict(spec.quantizer),
                "factor_quantizer": None, "tensor": ct.meta,
                "buffers": {k: [dtype_name(v.dtype), list(v.shape)] for k, v in buffers.items()}}
        check_meta(meta)
        layer = CompressedLinear(meta, buffers, cache=spec.cache)
        seconds = time.perf_counter() - t0
        w_hat = qt.dequantize(torch.float32)
        rel = float((w_hat - w).norm() / w.norm().clamp_min(1e-30))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        report.rows.append(LayerRow(name, "entropy", spec.describe() + " (GPTQ)", (out_f, in_f),
                                    w.numel() * module.weight.element_size(), layer.nbytes, layer.bits_per_weight,
                                    rel, seconds))
    return report

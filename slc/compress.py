"""Whole models: swap linear layers for CompressedLinear and report what it did.

    report = compress_model(model, LinearSpec("entropy"))     # every Linear / Conv1D but embeddings and lm_head
    print(report)                                             # per layer: kind, shape, bytes, bits/weight, error, s
    report = compress_model_gptq(model, tok, allocate(model, tok, 4.5))   # the same, with GPTQ codes

A policy is one LinearSpec for every layer, or a dict {fnmatch pattern on the module name: LinearSpec
or None}, first match wins, None = leave dense; names no pattern matches stay dense (`slc.hf.resolve_spec`).
Embeddings stay dense unless `embeddings=LinearSpec()` is given; a tied lm_head then shares their int8 codes.
Saving and loading the result: slc.checkpoint.
"""
from __future__ import annotations

import html
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import layer_stats
from .gptq import gptq
from .hf import DEFAULT_SKIP, dense_weight_of, is_linear, resolve_spec, set_module, target_layers, tied_head
from .nn import CompressedEmbedding, CompressedLinear, LinearSpec, TiedLinear, check_policy


@dataclass
class LayerRow:
    """One compressed layer in a CompressionReport."""
    name: str
    kind: str                 # "quantized", "entropy", "lowrank" or "embedding"
    storage: str              # LinearSpec.describe(): quantiser, rank target
    shape: tuple              # (out, in)
    bytes_before: int         # dense weight bytes (bias excluded on both sides)
    bytes_after: int          # CompressedLinear.nbytes: every buffer but the bias
    bits_per_weight: float
    rel_error: float          # ||W_hat - W||_F / ||W||_F
    seconds: float            # compression time


@dataclass
class CompressionReport:
    """What compress_model did: a row per compressed layer, and what it skipped and why.

    >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    >>> report = compress_model(net, LinearSpec(), progress=False)
    >>> t = report.totals()
    >>> t["layers"], t["bytes_before"] == 4 * t["params"], round(t["bits_per_weight"], 2)
    (2, True, 8.56)
    >>> [type(m).__name__ for m in net]
    ['CompressedLinear', 'ReLU', 'CompressedLinear']
    """
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)             # (name, reason)
    unmatched_patterns: list = field(default_factory=list)  # policy patterns that matched no layer

    def to_rows(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def totals(self) -> dict:
        params = sum(r.shape[0] * r.shape[1] for r in self.rows)
        before = sum(r.bytes_before for r in self.rows)
        after = sum(r.bytes_after for r in self.rows)
        errs = [r.rel_error for r in self.rows]
        return {"layers": len(self.rows), "params": params, "bytes_before": before, "bytes_after": after,
                "ratio": before / after if after else float("nan"),
                "bits_per_weight": 8 * after / params if params else float("nan"),
                "mean_rel_error": sum(errs) / len(errs) if errs else float("nan"),
                "max_rel_error": max(errs, default=float("nan")),
                "seconds": sum(r.seconds for r in self.rows), "skipped": len(self.skipped)}

    def _table(self) -> tuple[list[str], list[list[str]]]:
        head = ["layer", "kind", "storage", "shape", "KiB before", "KiB after", "bits/w", "rel err", "s"]
        body = [[r.name, r.kind, r.storage, f"{r.shape[0]}x{r.shape[1]}", f"{r.bytes_before / 1024:.1f}",
                 f"{r.bytes_after / 1024:.1f}", f"{r.bits_per_weight:.2f}", f"{r.rel_error:.4f}", f"{r.seconds:.2f}"]
                for r in self.rows]
        t = self.totals()
        body.append(["total", f"{t['layers']} layers", "", f"{t['params']} w", f"{t['bytes_before'] / 1024:.1f}",
                     f"{t['bytes_after'] / 1024:.1f}", f"{t['bits_per_weight']:.2f}", f"{t['mean_rel_error']:.4f}",
                     f"{t['seconds']:.2f}"])
        return head, body

    def _notes(self) -> list[str]:
        notes = []
        if self.skipped:
            by_reason: dict = {}
            for name, reason in self.skipped:
                by_reason.setdefault(reason, []).append(name)
            for reason, names in by_reason.items():
                shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
                notes.append(f"left dense ({reason}): {shown}")
        if self.unmatched_patterns:
            notes.append(f"policy patterns that matched no layer: {self.unmatched_patterns}")
        return notes

    def __str__(self) -> str:
        head, body = self._table()
        widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                                    for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body[:-1]]
        lines += ["  ".join("-" * w for w in widths), fmt(body[-1])]
        return "\n".join(lines + self._notes())

    def _repr_html_(self) -> str:
        head, body = self._table()
        cell = lambda tag, c, i: f"<{tag} style='text-align:{'left' if i < 4 else 'right'}'>{html.escape(c)}</{tag}>"
        rows = ["<tr>" + "".join(cell("th", c, i) for i, c in enumerate(head)) + "</tr>"]
        rows += ["<tr>" + "".join(cell("td", c, i) for i, c in enumerate(r)) + "</tr>" for r in body[:-1]]
        rows += ["<tr style='font-weight:bold'>" + "".join(cell("td", c, i) for i, c in enumerate(body[-1])) + "</tr>"]
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in self._notes())
        return f"<table>{''.join(rows)}</table>{notes}"


def compress_model(model: nn.Module, policy: LinearSpec | dict | None = None, progress: bool = True,
                   skip: tuple = DEFAULT_SKIP, x_covs: dict | None = None,
                   embeddings: LinearSpec | None = None) -> CompressionReport:
    """Replace the model's Linear / Conv1D layers in place according to `policy`; return a report.

    policy: a LinearSpec for every layer (default int8 per channel), or {fnmatch pattern: LinearSpec | None}
    with the first matching pattern winning. `skip` patterns are checked first (default: embeddings and
    lm_head, which is usually tied to the embeddings); pass skip=() to compress those too.
    x_covs: {module name: E[x x^T] of its inputs} for activation-aware low rank (lowrank specs only).
    embeddings: a quantized LinearSpec for every nn.Embedding (default None: they stay dense). An output
    head tied to the token embedding then multiplies with the same codes (TiedLinear), whatever `skip` says.
    """
    policy = check_policy(policy)
    if isinstance(skip, str):
        raise TypeError("skip must be a tuple of patterns, e.g. ('*lm_head*',), not a single string")

    report = CompressionReport()
    targets, used, linear_names = [], set(), []
    head = tied_head(model) if embeddings is not None else None
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            if embeddings is None:
                report.skipped.append((name, "embedding"))
            else:
                targets.append((name, module, embeddings))
            continue
        if name == head:
            linear_names.append(name)                               # becomes a TiedLinear below
            continue
        if isinstance(module, CompressedLinear) or not is_linear(module):
            continue
        linear_names.append(name)
        spec, pat, reason = resolve_spec(name, policy, skip)
        used.add(pat)
        if spec is None:
            report.skipped.append((name, reason))
        else:
            targets.append((name, module, spec))
    if not linear_names:
        raise ValueError(f"{type(model).__name__} has no torch.nn.Linear or transformers Conv1D layers to compress "
                         "(already compressed, or an architecture built from other layer types)")
    if isinstance(policy, dict):
        report.unmatched_patterns = [p for p in policy if p not in used]
        if report.unmatched_patterns:
            warnings.warn(f"policy patterns matched no layer: {report.unmatched_patterns}; "
                          f"layer names look like {linear_names[0]!r}", stacklevel=2)

    for name, module, spec in tqdm(targets, desc="compress", unit="layer", disable=not progress):
        t0 = time.perf_counter()
        try:
            if isinstance(module, nn.Embedding):
                layer = CompressedEmbedding.from_embedding(module, spec)
            else:
                cov = None if x_covs is None or spec.kind != "lowrank" else x_covs.get(name)
                layer = CompressedLinear.from_linear(module, spec, x_cov=cov)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None                  # say which layer the spec did not fit
        seconds = time.perf_counter() - t0
        w = (module.weight.detach() if isinstance(module, nn.Embedding) else dense_weight_of(module)).float()
        if layer.kind == "entropy":
            # the coder is lossless, so the decoded weight equals the quantiser's (tested); skip the decode.
            # A rotation is orthogonal: ||Q(W R) - W R|| = ||Q(W R) R^T - W||, so compare in the rotated basis
            if layer.rotation is not None:
                w = layer.rotation.apply(w.double()).float()
            w_hat = spec.quantizer.quantize(w).dequantize()
        else:
            w_hat = layer.weight_dense(torch.float32)
        rel = float((w_hat - w).norm() / w.norm().clamp_min(1e-30))
        set_module(model, name, layer)
        report.rows.append(LayerRow(name, layer.kind, spec.describe(), tuple(layer.shape),
                                    w.numel() * module.weight.element_size(), layer.nbytes, layer.bits_per_weight,
                                    rel, seconds))
    if head is not None:                                            # the head multiplies with the embedding's codes
        set_module(model, head, TiedLinear(model.get_input_embeddings()))
        report.skipped.append((head, "tied to the compressed input embedding"))
    return report


def lowrank_policy(ranks: dict, factor_quantizer=None) -> dict:
    """allocate_ranks output {"...q_proj.weight": r} -> a compress_model policy
    {"...q_proj": LinearSpec("lowrank", rank=r)}."""
    return {name.removesuffix(".weight"): LinearSpec("lowrank", rank=int(r), factor_quantizer=factor_quantizer)
            for name, r in ranks.items()}


def compressed_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    """{module name: CompressedLinear} of a model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def selected_specs(names, policy, kinds: tuple, who: str, rotates: bool = False) -> dict:
    """{name: LinearSpec} of the layers among `names` that `policy` compresses (slc.hf.resolve_spec).
    ValueError when a selected spec's kind is not in `kinds` (what `who` can store), when it rotates and `who`
    does not (rotates=False: its codes would be taken for those of W R), or nothing is selected."""
    chosen = {}
    for n in names:
        spec = resolve_spec(n, policy)[0]
        if spec is None:
            continue
        if spec.kind not in kinds:
            raise ValueError(f"{who} stores kinds {kinds}: layer {n!r} has kind={spec.kind!r}; use one of those "
                             "(allocate() returns 'entropy' specs) or compress_model for other kinds")
        if spec.rotate is not None and not rotates:
            raise ValueError(f"{who} does not rotate weights: layer {n!r} has rotate={spec.rotate!r}; drop rotate= "
                             "or use compress_model / compress_model_gptq")
        chosen[n] = spec
    if not chosen:
        raise ValueError(f"the policy selects no layer for {who}: pass allocate()'s result or "
                         "{pattern: LinearSpec('entropy', ...)}")
    return chosen


def compress_model_gptq(model: nn.Module, tokenizer, policy, calibration_text: str | None = None,
                        max_tokens: int = 2048, block: int = 128, damp: float = 0.01, skip=None,
                        progress: bool = False):
    """compress_model with GPTQ codes: same policy, same grids, same CompressedLinear layers, less damage.

    Each layer the policy gives an "entropy" spec is quantised by `slc.gptq.gptq` on that spec's grid
    with C = sum x x^T of its calibration inputs (all captured from the original model in one pass),
    then rANS-coded exactly as compress_model would, so the file format, bits/weight and loading are
    unchanged. Works with an `allocate()` policy. A spec with rotate= is quantised as W R with the Hessian
    R^T C R (slc.gptq). Returns the CompressionReport compress_model returns.

    """
    layers = target_layers(model, skip)
    chosen = {n: (layers[n], spec) for n, spec in
              selected_specs(layers, policy, ("entropy",), "GPTQ", rotates=True).items()}
    stats = layer_stats(model, tokenizer, calibration_text, list(chosen), max_tokens, full=True)
    report = CompressionReport()
    for name, (module, spec) in tqdm(chosen.items(), desc="gptq", unit="layer", disable=not progress):
        t0 = time.perf_counter()
        w = dense_weight_of(module).float()
        rot = spec.rotation(w.shape[1], name)
        qt = gptq(w, stats[name].x_cov, spec.quantizer, block=block, damp=damp, rotation=rot)
        qt.original_dtype = module.weight.dtype
        layer = CompressedLinear.from_quantized(qt, spec, getattr(module, "bias", None), device=module.weight.device)
        seconds = time.perf_counter() - t0
        w_hat = qt.dequantize(torch.float32)
        if rot is not None:
            w = rot.apply(w.double()).float()                       # orthogonal: same error in the rotated basis
        rel = float((w_hat - w).norm() / w.norm().clamp_min(1e-30))
        set_module(model, name, layer)
        out_f, in_f = w.shape
        report.rows.append(LayerRow(name, "entropy", spec.describe() + " (GPTQ)", (out_f, in_f),
                                    w.numel() * module.weight.element_size(), layer.nbytes, layer.bits_per_weight,
                                    rel, seconds))
    return report

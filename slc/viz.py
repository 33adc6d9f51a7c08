"""Plotly figures, ipywidgets explorers and small text tables for the notebooks.

The notebooks call these and explain the results; nothing here changes a weight.
Importing this module sets plotly up for notebooks that are committed with their
outputs: figures render as their small JSON mimetype (JupyterLab draws it; the
HTML from `python -m slc.render` inlines plotly.js once per page) with a compact
template, so a stored figure costs kilobytes, not the megabytes of an embedded
plotly.js. Large arrays go out as float32 and heat maps are pooled to a few
thousand cells for the same reason. It also turns off the progress bars that
transformers draws while loading a model (in a notebook they are widgets).
"""
from __future__ import annotations

import lzma
import math
import os
import sys
from typing import Iterable

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import torch

from . import gguf_peers, metrics
from .compress import compress_model
from .factors import choose_rank, low_rank, quantize_factors
from .hf import dense_weight_of
from .lowrank import uniform_ranks  # re-exported: the notebooks call viz.uniform_ranks
from .models import task, weight_kind
from .nn import CompressedLinear, LinearSpec
from .quant import Quantizer
from .symbols import entropy_bits
from .tensor import CompressedTensor

__all__ = ["uniform_ranks"]  # and every public function below

# ----------------------------------------------------------------------------
# plotly set-up: small stored outputs

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
pio.templates["slc"] = go.layout.Template(layout=dict(
    font=dict(family="Helvetica, Arial, sans-serif", size=13), colorway=COLORS,
    paper_bgcolor="white", plot_bgcolor="white", margin=dict(l=60, r=20, t=50, b=50),
    xaxis=dict(gridcolor="#e5e5e5", linecolor="#999", zerolinecolor="#ccc", automargin=True),
    yaxis=dict(gridcolor="#e5e5e5", linecolor="#999", zerolinecolor="#ccc", automargin=True),
    hoverlabel=dict(font_size=12), legend=dict(bgcolor="rgba(255,255,255,0.6)")))
pio.templates.default = "slc"
# The JSON mimetype only: never the plotly.js bundle inside the notebook (override with SLC_PLOTLY_RENDERER).
pio.renderers.default = os.environ.get("SLC_PLOTLY_RENDERER", "plotly_mimetype")

# Model loading draws tqdm bars, which in a notebook are widgets: unstable stored outputs. Quiet them.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if "transformers" in sys.modules:
    sys.modules["transformers"].utils.logging.disable_progress_bar()

MAX_HEATMAP_CELLS = 96          # per side: a pooled 96 x 96 map is ~37 KB as float32 base64


def _f32(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().float().numpy()
    return np.asarray(a, dtype=np.float32)


def sig(x: float, digits: int = 3) -> str:
    """x to `digits` significant digits: the form in which notebooks print floats nbval compares."""
    if x is None:
        return "-"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def table(rows: list[dict], columns: Iterable[str] | None = None, digits: int = 3) -> str:
    """Rows of dicts -> an aligned text table, floats to `digits` significant digits."""
    rows = list(rows)
    columns = list(columns or (rows[0].keys() if rows else []))
    cells = [[c for c in columns]] + [[v if isinstance(v, str) else sig(v, digits) for v in (r.get(c) for c in columns)]
                                      for r in rows]
    width = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(s.rjust(w) if j else s.ljust(w) for j, (s, w) in enumerate(zip(row, width, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in width))
    return "\n".join(lines)


def print_table(rows, columns=None, digits: int = 3) -> None:
    print(table(rows, columns, digits))


# ----------------------------------------------------------------------------
# 01: codes, predictors, sizes

def code_histogram(codes, title: str = "Histogram of the integer codes", log_y: bool = True) -> go.Figure:
    """Counts of each integer code value (codes: torch/numpy integer array)."""
    c = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    c = c.reshape(-1).astype(np.int64)
    lo = int(c.min())
    counts = np.bincount(c - lo)
    x = np.arange(lo, lo + counts.size)
    fig = go.Figure(go.Bar(x=x, y=counts, marker_line_width=0, name="codes",
                           hovertemplate="code %{x}: %{y} weights<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="code", yaxis_title="weights", bargap=0, height=340)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def predictor_rows(weights: dict[str, torch.Tensor], quantizer=None) -> list[dict]:
    """Order-0 entropy (bits/weight) of each tensor's codes with no predictor and with LEFT.

    Uses CompressedTensor.compress(predictor="auto"), which measures both and keeps the cheaper.
    """

    rows = []
    for name, w in weights.items():
        ct = CompressedTensor.compress(w, quantizer, predictor="auto")
        e = ct.predictor_entropies
        rows.append({"layer": short_name(name), "kind": weight_kind(name), "none": e["none"], "left": e["left"],
                     "chosen": ct.predictor, "left - none": e["left"] - e["none"]})
    return rows


def short_name(name: str) -> str:
    """'encoder.layer.0.attention.self.query.weight' -> 'L0.attention.self.query'."""
    s = name.removesuffix(".weight")
    for prefix in ("model.layers.", "encoder.layer.", "transformer.h.", "model.decoder.layers."):
        if s.startswith(prefix):
            return "L" + s[len(prefix):]
    return s


def predictor_figure(rows: list[dict], title: str = "Order-0 entropy of the codes: no predictor vs LEFT") -> go.Figure:
    """Grouped bars per layer, bits per weight."""
    names = [r["layer"] for r in rows]
    fig = go.Figure([
        go.Bar(name="none (codes as they are)", x=names, y=[r["none"] for r in rows]),
        go.Bar(name="LEFT (code minus left neighbour)", x=names, y=[r["left"] for r in rows]),
    ])
    lo = min(min(r["none"], r["left"]) for r in rows)
    fig.update_layout(title=title, barmode="group", yaxis_title="bits per weight", height=420,
                      yaxis_range=[max(0.0, lo - 0.5), None], xaxis_tickangle=-45,
                      legend=dict(orientation="h", x=1, xanchor="right", y=1.0, yanchor="bottom"))
    return fig


def smooth_signal(n_rows: int = 256, n_cols: int = 256, seed: int = 0) -> torch.Tensor:
    """A matrix whose rows are random walks: neighbours correlate, the case where LEFT does help."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, n_cols, generator=g).cumsum(dim=1) * 0.01


def codec_sizes(qt, zstd_level: int = 19) -> dict[str, int]:
    """Bytes of one QuantizedTensor's codes under several coders (scales not included unless said).

    fp32 / fp16   the original float weights
    int8 codes    one byte per code
    zstd-19, lzma general-purpose compressors on the same int8 bytes
    entropy bound order-0 entropy of the codes (ideal order-0 coder, no table)
    rANS stream   slc's coder: words + final states + frequency table + header
    slc file      rANS stream + scales + CompressedTensor header + checksum
    """
    import zstandard


    dtype = np.int8 if qt.quantizer.scheme == "symmetric" else np.uint8
    raw = qt.codes.detach().cpu().contiguous().numpy().astype(dtype).tobytes()
    ct = CompressedTensor.from_quantized(qt, predictor="auto")
    return {
        "fp32": qt.numel * 4,
        "fp16": qt.numel * 2,
        "int8 codes": len(raw),
        f"zstd-{zstd_level}": len(zstandard.ZstdCompressor(level=zstd_level).compress(raw)),
        "lzma": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
        "entropy bound": math.ceil(entropy_bits(qt.symbols()) / 8),
        "rANS stream": ct.coded_bits // 8,
        "slc file": ct.nbytes,
    }


def size_figure(sizes: dict[str, int], numel: int,
                title: str = "Bits per weight, same codes, different coders") -> go.Figure:
    names = list(sizes)
    bpw = [8 * sizes[k] / numel for k in names]
    color = [COLORS[1] if k in ("rANS stream", "slc file") else COLORS[2] if k == "entropy bound" else COLORS[0]
             for k in names]
    fig = go.Figure(go.Bar(x=names, y=bpw, marker_color=color, text=[f"{b:.2f}" for b in bpw], textposition="outside",
                           hovertemplate="%{x}: %{y:.3f} bits/weight<extra></extra>"))
    fig.update_layout(title=title, yaxis_title="bits per weight", height=360, showlegend=False,
                      yaxis_range=[0, max(bpw) * 1.15])
    return fig


# ----------------------------------------------------------------------------
# 02: dtypes

def dtype_error_figure(rows: list[dict], title: str = "Relative error of each path, per dtype") -> go.Figure:
    """rows: {'dtype', 'cast only', 'int8 round trip', ...}: grouped bars of relative L2 error (log axis)."""
    keys = [k for k in rows[0] if k != "dtype"]
    fig = go.Figure([go.Bar(name=k, x=[r["dtype"] for r in rows], y=[r[k] for r in rows]) for k in keys])
    fig.update_layout(title=title, barmode="group", yaxis_type="log", yaxis_title="relative L2 error", height=360)
    return fig


# ----------------------------------------------------------------------------
# heat maps and spectra (04, 05)

def pooled(a, cells: int = MAX_HEATMAP_CELLS, reduce: str = "mean") -> np.ndarray:
    """Pool a 2-D array to at most cells x cells by averaging (or max) over blocks."""
    a = _f32(a)
    r, c = a.shape
    fr, fc = max(1, math.ceil(r / cells)), max(1, math.ceil(c / cells))
    pr, pc = -(-r // fr) * fr, -(-c // fc) * fc
    pad = np.full((pr, pc), np.nan, dtype=np.float32)
    pad[:r, :c] = a
    blocks = pad.reshape(pr // fr, fr, pc // fc, fc)
    out = np.nanmax(blocks, axis=(1, 3)) if reduce == "max" else np.nanmean(blocks, axis=(1, 3))
    return out.astype(np.float32)


def spectrum_figure(spectra: dict[str, np.ndarray], title: str = "Singular values", normalise: bool = True,
                    marks: dict[str, int] | None = None) -> go.Figure:
    """Singular-value spectra (one line each), optionally normalised by the largest; vertical marks at ranks."""
    fig = go.Figure()
    for name, s in spectra.items():
        s = _f32(s)
        y = s / s[0] if normalise and s.size and s[0] > 0 else s
        fig.add_trace(go.Scatter(x=np.arange(1, s.size + 1), y=y, mode="lines", name=name))
    for name, k in (marks or {}).items():
        fig.add_vline(x=k, line_dash="dot", line_color="#666", annotation_text=name, annotation_position="top")
    fig.update_layout(title=title, xaxis_title="index", yaxis_title="σ / σ₁" if normalise else "σ",
                      yaxis_type="log", height=360)
    return fig


# ----------------------------------------------------------------------------
# 04: one layer under one storage choice, and the explorer around it

STORAGE_KINDS = ("quantized", "entropy", "lowrank")
GROUPS = (("per channel", None), ("group 32", 32), ("group 64", 64), ("group 128", 128))


def layer_spec(storage: str = "entropy", bits: int = 8, group_size: int | None = None, rank: int = 64):
    """The LinearSpec the explorer's controls describe (lowrank factors quantised to `bits`, one scale per vector)."""

    q = Quantizer(bits, granularity="group" if group_size else "channel", group_size=group_size)
    if storage == "lowrank":
        return LinearSpec("lowrank", rank=rank, factor_quantizer=Quantizer(bits))
    return LinearSpec(storage, quantizer=q)


def evaluate_layer(layer, x: torch.Tensor, spec, detail: bool = True) -> dict:
    """Compress one Linear with `spec` and measure it on real inputs x (tokens, in).

    Returns the compressed layer, its effective weight and error, summary numbers and, with
    `detail`, the integer codes it stores (the factors' codes for lowrank) and per-token cosines.
    """

    w = layer.weight.detach()
    cl = CompressedLinear.from_linear(layer, spec)
    w_hat = cl.weight_dense(torch.float32)
    with torch.no_grad():
        y_ref = layer(x)
        y_hat = torch.nn.functional.linear(x, w_hat.to(x.dtype), layer.bias)   # = cl(x); one decode, not two
    out = {
        "layer": cl, "w_hat": w_hat, "err": w_hat - w.float(),
        "storage": spec.describe(), "bits_per_weight": cl.bits_per_weight,
        "weight_rel_error": metrics.rel_error(w, w_hat), "output_cosine": metrics.cosine(y_ref, y_hat),
        "output_snr_db": metrics.snr_db(y_ref, y_hat),
    }
    if detail:
        if spec.kind == "lowrank":
            ut_q, vh_q = quantize_factors(low_rank(w, rank=spec.rank), spec.factor_quantizer)
            out["codes"] = torch.cat([ut_q.codes.reshape(-1), vh_q.codes.reshape(-1)])
        else:
            out["codes"] = cl.quantized().codes
        out["token_cosine"] = torch.nn.functional.cosine_similarity(y_ref, y_hat, dim=-1)
    return out


def singular_values(w: torch.Tensor) -> np.ndarray:
    return torch.linalg.svdvals(w.detach().double()).float().numpy()


def overview_rows(layers: dict, inputs: dict, specs: dict) -> list[dict]:
    """Every layer under every named spec: bits/weight, weight error, output cosine and SNR on real inputs."""

    rows = []
    for name, layer in layers.items():
        for label, spec in specs.items():
            r = evaluate_layer(layer, inputs[name], spec, detail=False)
            rows.append({"layer": short_name(name), "kind": weight_kind(name + ".weight"), "config": label,
                         "bits/weight": r["bits_per_weight"], "weight rel. error": r["weight_rel_error"],
                         "output cosine": r["output_cosine"], "output SNR dB": r["output_snr_db"]})
    return rows


def overview_figure(rows: list[dict], value: str = "output SNR dB",
                    title: str = "Every layer, every configuration: output SNR on real activations (dB)") -> go.Figure:
    """Heat map layers x configurations of `value`, each cell annotated with its bits/weight."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    cell = {(r["layer"], r["config"]): r for r in rows}
    z = np.array([[cell[(layer, c)][value] for c in configs] for layer in layers], dtype=np.float32)
    text = [[f"{cell[(layer, c)][value]:.1f} dB<br>{cell[(layer, c)]['bits/weight']:.2f} b/w" for c in configs]
            for layer in layers]
    fig = go.Figure(go.Heatmap(z=z, x=configs, y=layers, text=text, texttemplate="%{text}", textfont_size=9,
                               colorscale="RdYlGn", colorbar=dict(title="dB"),
                               hovertemplate="%{y} · %{x}<br>%{text}<extra></extra>"))
    fig.update_layout(title=title, height=max(420, 22 * len(layers) + 120), xaxis_side="top")
    fig.update_yaxes(autorange="reversed")
    return fig


class LayerExplorer:
    """Pick a layer, bits, group size, storage kind and rank; four plotly views follow.

    Views: |error| heat map, histogram of the stored codes, singular values of W and of the error
    (rank marked for lowrank), and per-token output cosine on the layer's real inputs.
    `layers` {name: nn.Linear}, `inputs` {name: (tokens, in_features) activations}.
    Display it as the last expression of a cell (or `explorer.widget`); `snapshot()` gives a
    static figure of the current state for pages rendered without a kernel.
    """

    def __init__(self, layers: dict, inputs: dict, layer: str | None = None, bits: int = 8,
                 group_size: int | None = None, storage: str = "entropy", rank: int = 64):
        import ipywidgets as W

        self.layers, self.inputs = layers, inputs
        self._spectra: dict[str, np.ndarray] = {}
        names = list(layers)
        layer = layer or names[0]
        self.w_layer = W.Dropdown(options=[(short_name(n), n) for n in names], value=layer, description="layer")
        self.w_bits = W.IntSlider(value=bits, min=2, max=8, description="bits", continuous_update=False)
        self.w_group = W.Dropdown(options=list(GROUPS), value=group_size, description="scales")
        self.w_storage = W.ToggleButtons(options=list(STORAGE_KINDS), value=storage, description="storage")
        self.w_rank = W.IntSlider(value=rank, min=1, max=self._max_rank(layer), step=1, description="rank",
                                  continuous_update=False)
        self.w_summary = W.HTML()
        self.figs = [go.FigureWidget(f) for f in self._empty_figures()]
        for f in self.figs:            # fixed size: two side by side fit a JupyterLab notebook without scrolling
            f.layout.update(width=440, height=300, margin=dict(l=55, r=10, t=40, b=40), title_font_size=13,
                            modebar_orientation="v")
        controls = W.VBox([W.HBox([self.w_layer, self.w_group]), W.HBox([self.w_bits, self.w_rank]), self.w_storage])
        grid = W.GridBox(self.figs, layout=W.Layout(grid_template_columns="repeat(2, 450px)"))
        self.widget = W.VBox([controls, self.w_summary, grid])
        self.widget.add_class("slc-explorer")
        for w in (self.w_layer, self.w_bits, self.w_group, self.w_storage, self.w_rank):
            w.observe(self._on_change, names="value")
        self.result: dict = {}
        self._hold = False
        self.update()

    def set(self, layer: str | None = None, bits: int | None = None, group_size="keep",
            storage: str | None = None, rank: int | None = None) -> dict:
        """Move several controls at once (one recomputation); returns `result`."""
        self._hold = True
        try:
            for w, v in ((self.w_layer, layer), (self.w_bits, bits), (self.w_storage, storage), (self.w_rank, rank)):
                if v is not None:
                    w.value = v
            if group_size != "keep":
                self.w_group.value = group_size
        finally:
            self._hold = False
        self.update()
        return self.result

    # --- state -------------------------------------------------------------------------------
    def _max_rank(self, name: str) -> int:
        return min(self.layers[name].weight.shape)

    def _spectrum(self, name: str) -> np.ndarray:
        if name not in self._spectra:
            self._spectra[name] = singular_values(self.layers[name].weight)
        return self._spectra[name]

    @property
    def spec(self):
        return layer_spec(self.w_storage.value, self.w_bits.value, self.w_group.value, self.w_rank.value)

    def _on_change(self, change) -> None:
        if change["owner"] is self.w_layer:
            self.w_rank.max = self._max_rank(self.w_layer.value)
        self.w_group.disabled = self.w_storage.value == "lowrank"
        self.w_rank.disabled = self.w_storage.value != "lowrank"
        if not self._hold:
            self.update()

    # --- views -------------------------------------------------------------------------------
    @staticmethod
    def _empty_figures() -> list[go.Figure]:
        heat = go.Figure(go.Heatmap(z=[[0.0]], colorscale="Viridis", colorbar=dict(title="|err|")))
        heat.update_yaxes(autorange="reversed", title="output (pooled)")
        heat.update_xaxes(title="input (pooled)")
        hist = go.Figure(go.Bar(x=[0], y=[0], marker_line_width=0))
        hist.update_layout(bargap=0, yaxis_type="log", xaxis_title="code", yaxis_title="count")
        spec = go.Figure([go.Scatter(x=[1], y=[1], mode="lines", name="W"),
                          go.Scatter(x=[1], y=[1], mode="lines", name="error W − Ŵ")])
        spec.update_layout(yaxis_type="log", xaxis_title="index", yaxis_title="σ / σ₁(W)",
                           legend=dict(x=1, xanchor="right", y=1))
        cos = go.Figure(go.Scatter(x=[0], y=[1], mode="lines"))
        cos.update_layout(xaxis_title="token", yaxis_title="cosine(y, ŷ)")
        for f, t in zip((heat, hist, spec, cos),
                        ("|error|", "stored codes", "singular values", "output cosine per token"), strict=True):
            f.update_layout(title=t)
        return [heat, hist, spec, cos]

    def update(self) -> None:
        """Recompute for the current controls and push the new data into the four figures."""
        name, spec = self.w_layer.value, self.spec
        r = evaluate_layer(self.layers[name], self.inputs[name], spec)
        self.result = r
        s = self._spectrum(name)
        s_err = singular_values(r["err"])
        codes = r["codes"].reshape(-1).to(torch.int64).numpy()
        lo = int(codes.min())
        counts = np.bincount(codes - lo)
        heat, hist, spec_f, cos_f = self.figs
        with heat.batch_update():
            heat.data[0].z = pooled(np.abs(r["err"].numpy()))
            heat.layout.title.text = f"|W − Ŵ| (max {r['err'].abs().max().item():.3g})"
        with hist.batch_update():
            hist.data[0].x, hist.data[0].y = np.arange(lo, lo + counts.size), counts
            hist.layout.title.text = ("factor codes (Uᵀ, Vh)" if spec.kind == "lowrank" else "stored codes") + \
                f": {int((counts > 0).sum())} distinct"
        with spec_f.batch_update():
            x = np.arange(1, s.size + 1)
            spec_f.data[0].x, spec_f.data[0].y = x, s / s[0]
            spec_f.data[1].x, spec_f.data[1].y = np.arange(1, s_err.size + 1), s_err / s[0]
            spec_f.layout.shapes = [] if spec.kind != "lowrank" else [dict(
                type="line", x0=spec.rank, x1=spec.rank, xref="x", y0=0, y1=1, yref="paper",
                line=dict(dash="dot", color="#666"))]
            spec_f.layout.title.text = ("singular values"
                                        + (f" (rank {spec.rank} kept)" if spec.kind == "lowrank" else ""))
        with cos_f.batch_update():
            tc = r["token_cosine"].numpy()
            cos_f.data[0].x, cos_f.data[0].y = np.arange(tc.size), tc
            cos_f.layout.title.text = f"output cosine per token (min {tc.min():.4f})"
        self.w_summary.value = (
            f"<b>{short_name(name)}</b> {tuple(self.layers[name].weight.shape)} · {r['storage']} · "
            f"<b>{r['bits_per_weight']:.2f}</b> bits/weight · weight rel. error {r['weight_rel_error']:.3g} · "
            f"output cosine <b>{r['output_cosine']:.5f}</b> · output SNR {r['output_snr_db']:.1f} dB")

    def snapshot(self) -> go.Figure:
        """The four current views as one static figure (for HTML rendered without a kernel)."""
        from plotly.subplots import make_subplots

        titles = [f.layout.title.text for f in self.figs]
        fig = make_subplots(rows=2, cols=2, subplot_titles=titles, horizontal_spacing=0.12, vertical_spacing=0.14)
        for i, f in enumerate(self.figs):
            row, col = divmod(i, 2)
            for tr in f.data:
                t = go.Figure(tr).data[0]
                if isinstance(t, go.Heatmap):
                    t.update(colorbar=dict(len=0.42, y=0.79, x=0.45))
                fig.add_trace(t, row=row + 1, col=col + 1)
        fig.update_yaxes(autorange="reversed", row=1, col=1)
        fig.update_yaxes(type="log", row=1, col=2)
        fig.update_yaxes(type="log", row=2, col=1)
        fig.update_layout(height=640, showlegend=False, bargap=0,
                          title=self.w_summary.value.replace("<b>", "").replace("</b>", ""), title_font_size=12)
        return fig

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


# ----------------------------------------------------------------------------
# generic charts (03, 05, 06)

MB = 1 << 20


def bytes_figure(variants: dict[str, dict[str, int]], title: str = "Bytes held, by storage kind") -> go.Figure:
    """Stacked bars: one bar per variant, one segment per storage kind (slc.memory.tensor_bytes dicts)."""
    kinds = list(dict.fromkeys(k for d in variants.values() for k in d if k != "total"))
    fig = go.Figure([go.Bar(name=k, x=list(variants), y=[variants[v].get(k, 0) / MB for v in variants],
                            hovertemplate=f"{k}: %{{y:.1f}} MB<extra></extra>") for k in kinds])
    fig.update_layout(title=title, barmode="stack", yaxis_title="MB", height=380)
    return fig


def grouped_bars(rows: list[dict], x: str, ys: list[str], title: str, yaxis_title: str = "",
                 log_y: bool = False) -> go.Figure:
    """One group per row (labelled by rows[i][x]), one bar per column name in `ys`."""
    fig = go.Figure([go.Bar(name=y, x=[r[x] for r in rows], y=[r[y] for r in rows]) for y in ys])
    fig.update_layout(title=title, barmode="group", yaxis_title=yaxis_title, height=380)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def curve_figure(rows: list[dict], x: str, y: str, by: str, title: str, log_y: bool = False,
                 x_title: str | None = None, y_title: str | None = None) -> go.Figure:
    """Lines + markers of y against x, one line per value of rows[i][by]."""
    fig = go.Figure()
    for name in dict.fromkeys(r[by] for r in rows):
        rs = sorted((r for r in rows if r[by] == name), key=lambda r: r[x])
        fig.add_trace(go.Scatter(x=[r[x] for r in rs], y=[r[y] for r in rs], mode="lines+markers", name=str(name)))
    fig.update_layout(title=title, xaxis_title=x_title or x, yaxis_title=y_title or y, height=400)
    if log_y:
        fig.update_yaxes(type="log")
    return fig




def rank_figure(ranks: dict[str, dict[str, int]], title: str = "Rank given to each layer") -> go.Figure:
    """Grouped bars: for each method, the rank of every layer."""
    layers = list(next(iter(ranks.values())))
    fig = go.Figure([go.Bar(name=m, x=[short_name(n) for n in layers], y=[r[n] for n in layers])
                     for m, r in ranks.items()])
    fig.update_layout(title=title, barmode="group", yaxis_title="rank", xaxis_tickangle=-45, height=420)
    return fig


def tradeoff_figure(rows: list[dict], x: str = "bits/weight", y: str = "perplexity", by: str = "family",
                    label: str = "config", title: str = "Bits per weight vs perplexity",
                    reference: float | None = None) -> go.Figure:
    """Scatter of y against x, one colour per family, each point labelled; dashed line at `reference`."""
    fig = go.Figure()
    for fam in dict.fromkeys(r[by] for r in rows):
        rs = sorted((r for r in rows if r[by] == fam), key=lambda r: r[x])
        fig.add_trace(go.Scatter(x=[r[x] for r in rs], y=[r[y] for r in rs], mode="markers+text",
                                 name=fam, text=[r[label] for r in rs], textposition="top center",
                                 hovertemplate="%{text}: %{x:.2f} bits/weight, %{y:.3f}<extra></extra>"))
    if reference is not None:
        fig.add_hline(y=reference, line_dash="dash", line_color="#666", annotation_text="fp32",
                      annotation_position="bottom right")
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=440)
    return fig


def spectrum_rows(spectra: dict[str, np.ndarray], kinds: dict[str, list[str]]) -> list[dict]:
    """Per layer kind (medians over its layers): share of energy in the top quarter of σ, and the
    rank that keeps 90 % of the energy as a fraction of the full rank."""

    rows = []
    for kind, names in kinds.items():
        full = len(spectra[names[0]])
        top = [float((spectra[k][: full // 4].astype(np.float64) ** 2).sum()
                     / (spectra[k].astype(np.float64) ** 2).sum())
               for k in names]
        r90 = [choose_rank(torch.from_numpy(np.asarray(spectra[k])), energy=0.9) for k in names]
        rows.append({"kind": kind, "layers": len(names), "energy in top 25 % of σ": float(np.median(top)),
                     "rank for 90 % energy / full": float(np.median(r90)) / full})
    return rows


def kind_spectrum_figure(spectra: dict[str, np.ndarray], kinds: dict[str, list[str]],
                         title: str = "Median normalised singular spectrum per layer kind") -> go.Figure:
    """One line per layer kind: the median over its layers of σᵢ/σ₁ against i / min(m, n)."""
    fig = go.Figure()
    for kind, names in kinds.items():
        med = np.median(np.stack([spectra[k] / spectra[k][0] for k in names]), axis=0)
        fig.add_trace(go.Scatter(x=_f32(np.arange(1, med.size + 1) / med.size), y=_f32(med), mode="lines", name=kind))
    fig.update_layout(title=title, xaxis_title="i / min(m, n)", yaxis_title="σᵢ / σ₁", yaxis_type="log", height=380)
    return fig


# ----------------------------------------------------------------------------
# 07: the quality-per-bit frontier (bench/frontier.py's rows)

# family -> (colour, marker); bench/frontier.py names its rows' families with these keys
FRONTIER_STYLES = {
    "GGUF": ("black", "square"), "RTN": ("gray", "circle-open"), "RTN + rANS": ("gray", "circle"),
    "ECSQ (one step)": ("#1f77b4", "diamond"), "ECSQ allocated": ("#d62728", "star"),
    "ECSQ allocated + GPTQ": ("#ff7f0e", "star-diamond"), "SVD plain": ("#9467bd", "x"),
    "SVD act-aware": ("#8c564b", "cross"), "SVD act-aware + alloc": ("#e377c2", "triangle-up"),
    "lossless": ("#2ca02c", "hexagon")}
# model -> (panel title, quality key, y axis title); one panel per model present, in this order
FRONTIER_PANELS = {
    "smollm2-135m": ("SmolLM2-135M: perplexity vs bits/weight", "ppl", "perplexity (log)"),
    "minilm-l6": ("all-MiniLM-L6-v2: 1 - embedding cosine vs bits/weight", "cos", "1 - cosine (log)")}
MIN_ONE_MINUS_COS = 1e-7        # exact rows have 1 - cos ~ 0 (1e-9 from float noise): drawn at this floor


def _frontier_y(row: dict, key: str) -> float:
    v = row.get(key)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"frontier row {row.get('name')!r} ({row['model']}) has {key}={v!r}; "
                         f"its panel needs a finite {key!r} in every row (bench/frontier.py writes it)")
    return float(v) if key == "ppl" else max(1.0 - float(v), MIN_ONE_MINUS_COS)


def frontier_figure(rows: list[dict], title: str = "Quality per bit: slc vs GGUF (every nn.Linear in the blocks)",
                    x_range: tuple = (2.5, 17.0), ppl_span: tuple = (0.98, 1.6),
                    one_minus_cos_range: tuple = (3e-6, 1.0)) -> go.Figure:
    """bench/frontier.py's rows (dicts: model, family, name, bits, ppl or cos) -> one panel per model,
    quality against bits/weight on a log y axis, one trace per family; dotted line at the fp32 row's
    perplexity. The axes are zoomed on 2.5-17 bits and ppl within ppl_span x fp32: plain SVD (ppl > 1e6)
    and the fp32/lossless-fp32 rows lie outside the view, the table has them."""
    rows = list(rows)
    for r in rows:
        for k in ("model", "family", "bits"):
            if k not in r:
                raise ValueError(f"frontier row {r.get('name')!r} has no {k!r}; every row needs model, family "
                                 f"and bits (bits per weight, all overhead), e.g. bench/results/frontier.json")
        if not isinstance(r["bits"], (int, float)) or not math.isfinite(r["bits"]):
            raise ValueError(f"frontier row {r.get('name')!r} has bits={r['bits']!r}; give a finite bits per weight")
        if r["model"] not in FRONTIER_PANELS:
            raise ValueError(f"frontier row {r.get('name')!r} is for model {r['model']!r}; "
                             f"the chart draws {sorted(FRONTIER_PANELS)}: filter the rows first")
    models = [m for m in FRONTIER_PANELS if any(r["model"] == m for r in rows)]
    if not models:
        raise ValueError("frontier_figure got no rows")
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(models), subplot_titles=[FRONTIER_PANELS[m][0] for m in models])
    families = list(FRONTIER_STYLES) + [f for f in dict.fromkeys(r["family"] for r in rows)
                                        if f not in FRONTIER_STYLES and f != "fp32"]
    shown = set()
    for col, model in enumerate(models, start=1):
        _, key, y_title = FRONTIER_PANELS[model]
        mine = [r for r in rows if r["model"] == model]
        for i, fam in enumerate(families):
            rs = sorted((r for r in mine if r["family"] == fam), key=lambda r: r["bits"])
            if not rs:
                continue
            color, symbol = FRONTIER_STYLES.get(fam, (COLORS[i % len(COLORS)], "circle"))
            fig.add_trace(go.Scatter(
                x=[float(r["bits"]) for r in rs], y=[_frontier_y(r, key) for r in rs], mode="lines+markers",
                name=fam, legendgroup=fam, showlegend=fam not in shown, text=[r.get("name", fam) for r in rs],
                marker=dict(color=color, symbol=symbol, size=9), line=dict(color=color, width=1),
                hovertemplate="%{text}: %{x:.3f} bits/weight, %{y:.4g}<extra></extra>"), row=1, col=col)
            shown.add(fam)
        fig.update_xaxes(title_text="bits per weight (all overhead)", range=list(x_range), row=1, col=col)
        ref = next((r for r in mine if r["family"] == "fp32"), None)
        if key == "ppl":
            lo, hi = (ref["ppl"] * ppl_span[0], ref["ppl"] * ppl_span[1]) if ref else (None, None)
            fig.update_yaxes(title_text=y_title, type="log", row=1, col=col,
                             range=[math.log10(lo), math.log10(hi)] if ref else None)
            if ref:
                fig.add_hline(y=ref["ppl"], line_dash="dot", line_color="#666", annotation_text="fp32",
                              annotation_position="bottom right", row=1, col=col)
        else:
            fig.update_yaxes(title_text=y_title, type="log", exponentformat="power", row=1, col=col,
                             range=[math.log10(one_minus_cos_range[0]), math.log10(one_minus_cos_range[1])])
    fig.update_layout(title=title, height=540, width=620 * len(models) + 160, margin=dict(t=90))
    return fig


OOD_SETS = ("in-domain", "prose", "code")
OOD_NAMES = {"smollm2-135m": "SmolLM2-135M", "minilm-l6": "all-MiniLM-L6-v2",
             "smollm2-135m-dithered": "SmolLM2-135M off its Q4_1 grid"}
OOD_PEERS = {"llama.cpp": ("#999999", "square-open"), "llama.cpp + imatrix": ("#111111", "square"),
             "GGUF": ("#666666", "square-open")}
OOD_RECIPE = ("compress_to_budget", "#b8002e")        # slc's one call: one colour of its own, a thicker line
OOD_COLORS = COLORS[:1] + COLORS[2:] + ["#17becf", "#bcbd22", "#393b79", "#637939"]   # the other groups


def load_ood_rows(folder) -> list[dict]:
    """Every row of bench/frontier_ood.py's and bench/peers.py's JSON files in `folder` (frontier_ood*.json),
    one dict each: model, group, name, bits, scores {set: ppl or cos}, note."""
    import json
    from pathlib import Path

    rows = []
    for path in sorted(Path(folder).glob("frontier_ood*.json")):
        rows += json.loads(path.read_text())["rows"]
    if not rows:
        raise ValueError(f"no rows in {folder}/frontier_ood*.json: run bench/frontier_ood.py or bench/peers.py")
    return rows


def ood_quality(row: dict, ref: dict, s: str) -> float:
    """Δ perplexity in % against fp32 (a causal LM: SmolLM2) or 1 - cosine (an encoder: MiniLM) of one row on
    evaluation set s."""
    v = row["scores"][s]
    return 100 * (v / ref["scores"][s] - 1) if task(row["model"]) == "causal-lm" else 1 - v


def ood_figure(rows: list[dict], model: str, sets=("in-domain", "prose"), max_bits: float = 9.0) -> go.Figure:
    """Quality against bits/weight, one panel per evaluation set (in domain beside out of domain): llama.cpp's
    presets as points (open: without, filled: with the importance matrix), slc's rows by group."""
    from plotly.subplots import make_subplots

    mine = [r for r in rows if r["model"] == model and r.get("bits") and r["bits"] <= max_bits
            and all(r["scores"].get(s) is not None for s in sets)]
    ref = next((r for r in rows if r["model"] == model and r["group"] == "reference"), None)
    if ref is None or not mine:
        raise ValueError(f"no fp32 reference or no rows for {model!r} in the out-of-domain results")
    lm = task(model) == "causal-lm"
    fig = make_subplots(rows=1, cols=len(sets), subplot_titles=[f"{s}{'' if s == 'in-domain' else ' (out of domain)'}"
                                                                for s in sets])
    groups = list(dict.fromkeys(r["group"] for r in mine if r["group"] != "reference"))
    for col, s in enumerate(sets, start=1):
        for i, g in enumerate(groups):
            rs = sorted((r for r in mine if r["group"] == g), key=lambda r: r["bits"])
            peer, recipe = g in OOD_PEERS, g == OOD_RECIPE[0]
            color, symbol = OOD_PEERS.get(g, (OOD_RECIPE[1], "diamond") if recipe else
                                          (OOD_COLORS[i % len(OOD_COLORS)], "circle"))
            fig.add_trace(go.Scatter(
                x=[r["bits"] for r in rs], y=[ood_quality(r, ref, s) for r in rs], text=[r["name"] for r in rs],
                mode="markers" if peer else "lines+markers", name=g, legendgroup=g, showlegend=col == 1,
                marker=dict(color=color, symbol=symbol, size=10 if peer or recipe else 7),
                line=dict(color=color, width=3 if recipe else 1),
                hovertemplate="%{text}: %{x:.3f} bits/weight, %{y:.4g}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="bits per weight (all overhead)", row=1, col=col)
        fig.update_yaxes(title_text="Δ perplexity vs fp32, %" if lm else "1 − cosine vs fp32", type="log",
                         row=1, col=col)
    name = OOD_NAMES.get(model, model)
    fig.update_layout(title=f"{name}: in domain and out of domain, slc against llama.cpp's presets", height=520,
                      width=560 * len(sets) + 220, margin=dict(t=90))
    return fig


def ood_table(rows: list[dict], model: str, max_bits: float = 5.0) -> list[dict]:
    """The rows of `model` at <= max_bits, best first on prose: bits, quality per set (Δ % or 1 - cos)."""
    ref = next(r for r in rows if r["model"] == model and r["group"] == "reference")
    out = []
    for r in rows:
        if r["model"] != model or r["group"] == "reference" or not r.get("bits") or r["bits"] > max_bits:
            continue
        if any(r["scores"].get(s) is None for s in OOD_SETS):
            continue
        key = "Δ ppl %" if task(model) == "causal-lm" else "1 − cos"
        out.append({"row": r["name"], "group": r["group"], "bits/w": r["bits"],
                    **{f"{key} {s}": ood_quality(r, ref, s) for s in OOD_SETS}})
    prose = next(k for k in out[0] if k.endswith("prose")) if out else None
    return sorted(out, key=lambda d: d[prose]) if prose else out


def frontier_point(reference, tokenizer, config, name: str) -> dict:
    """One frontier row measured live on a copy of `reference` (a sentence encoder such as MiniLM).

    config: a GGUF type name ("Q4_0": slc.gguf_peers' round trip) or a policy for compress_model (a
    LinearSpec or {pattern: LinearSpec}, e.g. an slc.allocate result). Both touch the same layers
    (every linear but embeddings and lm_head). Returns the row: bits/weight with all overhead, weight
    SNR over those layers, 10 log10(sum w^2 / sum (w - w_hat)^2), and the sentence-embedding cosine vs
    `reference` (slc.metrics.embedding_cosine)."""
    import copy


    model = copy.deepcopy(reference)
    if isinstance(config, str):
        layers = [r["layer"] for r in gguf_peers.apply_gguf(model, config)]
        bits = gguf_peers.gguf_bits_per_weight(config)
    else:
        report = compress_model(model, config, progress=False)
        layers, bits = [r.name for r in report.rows], report.totals()["bits_per_weight"]
    energy = err = 0.0
    for n in layers:
        w = dense_weight_of(reference.get_submodule(n)).double()
        layer = model.get_submodule(n)
        w_hat = (layer.weight_dense() if isinstance(layer, CompressedLinear) else dense_weight_of(layer)).double()
        energy += float(w.pow(2).sum())
        err += float((w_hat - w).pow(2).sum())
    cos = metrics.embedding_cosine(reference, model, tokenizer)
    return {"config": name, "bits/weight": bits, "weight SNR dB": 10 * math.log10(energy / err) if err else math.inf,
            "embedding cosine": cos, "1 - cos": 1 - cos}


def lossless_rows(model, dtypes=(torch.bfloat16, torch.float32)) -> list[dict]:
    """The whole state dict cast to each dtype and stored with CompressedTensor.compress(lossless=True):
    bytes before / after, ratio, and whether every tensor decodes bit for bit."""

    rows = []
    for dtype in dtypes:
        before = after = 0
        exact = True
        for t in model.state_dict().values():
            if not (t.is_floating_point() and t.numel()):
                continue
            t = t.to(dtype).contiguous()
            ct = CompressedTensor.compress(t, lossless=True)
            before += t.numel() * t.element_size()
            after += ct.nbytes
            exact &= bool(torch.equal(ct.decompress().view(torch.uint8), t.view(torch.uint8)))
        rows.append({"dtype": str(dtype).replace("torch.", ""), "MB before": before / MB, "MB after": after / MB,
                     "ratio": after / before, "bit-exact": "yes" if exact else "NO"})
    return rows


def frontier_table(rows: list[dict], model: str, families=None) -> list[dict]:
    """bench/frontier.py's rows for one model, in the columns of bench/results/frontier.md, for print_table:
    SmolLM2 gets perplexity and its change vs the fp32 row, MiniLM the embedding cosine and 1 - cos."""
    mine = [r for r in rows if r["model"] == model and (families is None or r["family"] in families)]
    ref = next((r for r in rows if r["model"] == model and r["family"] == "fp32"), None)
    out = []
    for r in mine:
        row = {"row": r["name"], "bits/w": r["bits"]}
        if r.get("ppl") is not None:
            row["ppl"] = r["ppl"]
            row["Δ %"] = 100 * (r["ppl"] / ref["ppl"] - 1) if ref else None
        else:
            row["cos"], row["1 - cos"] = r["cos"], 1 - r["cos"]
        row["SNR dB"] = "∞" if r.get("snr") is None else r["snr"]       # None in the JSON: exact
        out.append(row)
    return out

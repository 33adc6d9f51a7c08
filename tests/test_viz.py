"""slc.viz (figures, tables, the layer explorer) and slc.render (strip, HTML), plus the committed notebooks' form."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from slc import Quantizer, render, viz

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_NOTEBOOK_BYTES = 300_000


def _linear(out_f=48, in_f=64, seed=0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.mul_(0.1)
    return lin.eval()


# --- tables and numbers ------------------------------------------------------------------------

@pytest.mark.parametrize("x, digits, text", [(0.000123456, 3, "0.000123"), (7.3419, 4, "7.342"),
                                             (12345.6, 3, "1.23e+04"), (5, 3, "5"), (np.int64(7), 3, "7"),
                                             (0.0, 3, "0.0"), (None, 3, "-")])
def test_sig(x, digits, text):
    assert viz.sig(x, digits) == text


def test_table_aligns_and_rounds():
    t = viz.table([{"name": "a", "v": 1.23456}, {"name": "bbb", "v": 22.0}], digits=2)
    lines = t.splitlines()
    assert lines[0].split() == ["name", "v"] and set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["a", "1.2"] and lines[3].split() == ["bbb", "22"]
    assert len({len(line) for line in lines}) == 1               # every line padded to the same width


# --- plotly set-up -----------------------------------------------------------------------------

def test_figures_render_as_small_json_not_plotly_js():
    assert pio.renderers.default == "plotly_mimetype" and pio.templates.default == "slc"
    bundle = viz.code_histogram(np.arange(-127, 128))._repr_mimebundle_()
    assert set(bundle) == {"application/vnd.plotly.v1+json"}
    assert len(json.dumps(bundle)) < 20_000                       # the template is small; no plotly.js


def test_pooled_shapes_and_values():
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert np.allclose(viz.pooled(a, cells=2), [[2.5, 4.5], [10.5, 12.5]])
    big = viz.pooled(np.ones((1536, 384)), cells=96)
    assert big.shape == (96, 96) and big.dtype == np.float32 and np.allclose(big, 1)
    odd = viz.pooled(np.ones((100, 7)), cells=96)                 # non-divisible: padding is ignored
    assert odd.shape[0] <= 96 and np.allclose(odd, 1)


# --- 01 / 02 helpers ---------------------------------------------------------------------------

def test_code_histogram_counts_every_code():
    codes = torch.tensor([-2, -2, 0, 3, 3, 3], dtype=torch.int8)
    bar = viz.code_histogram(codes).data[0]
    assert list(bar.x) == [-2, -1, 0, 1, 2, 3] and list(bar.y) == [2, 0, 1, 0, 0, 3]


def test_predictor_rows_prefer_none_on_noise_and_left_on_random_walks():
    torch.manual_seed(0)
    rows = viz.predictor_rows({"model.layers.0.mlp.down_proj.weight": torch.randn(64, 256),
                               "walk.weight": viz.smooth_signal(64, 256)}, Quantizer(8))
    noise, walk = rows
    assert noise["layer"] == "L0.mlp.down_proj" and noise["kind"] == "down"
    assert noise["chosen"] == "none" and noise["left"] > noise["none"]
    assert walk["chosen"] == "left" and walk["left"] < walk["none"] - 1
    assert isinstance(viz.predictor_figure(rows), go.Figure)


def test_codec_sizes_are_consistent():
    torch.manual_seed(0)
    qt = Quantizer(8).quantize(torch.randn(128, 256))
    s = viz.codec_sizes(qt)
    assert s["fp32"] == 4 * qt.numel and s["int8 codes"] == qt.numel
    assert s["entropy bound"] <= s["rANS stream"] < s["slc file"] < s["int8 codes"]
    fig = viz.size_figure(s, qt.numel)
    assert list(fig.data[0].x) == list(s) and fig.data[0].y[0] == pytest.approx(32)


# --- 04: layer evaluation and the explorer ------------------------------------------------------

@pytest.mark.parametrize("storage, bits, group, rank", [("quantized", 8, None, 8), ("entropy", 4, 16, 8),
                                                        ("lowrank", 8, None, 16)])
def test_evaluate_layer(storage, bits, group, rank):
    lin, x = _linear(), torch.randn(20, 64)
    spec = viz.layer_spec(storage, bits, group, rank)
    r = viz.evaluate_layer(lin, x, spec)
    assert r["err"].shape == lin.weight.shape and torch.equal(r["err"], r["w_hat"] - lin.weight.detach())
    assert -1 <= r["output_cosine"] <= 1 and r["token_cosine"].shape == (20,)
    assert r["bits_per_weight"] > 0 and r["codes"].dtype in (torch.int8, torch.uint8)
    with torch.no_grad():
        assert torch.allclose(r["layer"](x), torch.nn.functional.linear(x, r["w_hat"], lin.bias), atol=1e-5)
    if storage != "lowrank":
        assert r["weight_rel_error"] < (0.01 if bits == 8 else 0.2)


def test_explorer_controls_change_the_figures():
    layers = {"a.weight_holder": _linear(48, 64, 0), "b.weight_holder": _linear(32, 64, 1)}
    inputs = {n: torch.randn(12, 64) for n in layers}
    ex = viz.LayerExplorer(layers, inputs, bits=8, storage="entropy")
    heat_before = np.array(ex.figs[0].data[0].z).copy()
    hist_before = list(ex.figs[1].data[0].x)
    bpw8 = ex.result["bits_per_weight"]
    r = ex.set(bits=3)                                          # one recomputation for the whole move
    assert r["bits_per_weight"] < bpw8 and len(ex.figs[1].data[0].x) < len(hist_before)
    assert not np.array_equal(np.array(ex.figs[0].data[0].z), heat_before)
    ex.w_layer.value = "b.weight_holder"                        # moving a widget recomputes too
    assert ex.result["layer"].out_features == 32 and "b.weight_holder" in ex.w_summary.value
    ex.set(storage="lowrank", rank=4)
    assert ex.w_group.disabled and not ex.w_rank.disabled and len(ex.figs[2].layout.shapes) == 1
    snap = ex.snapshot()
    assert isinstance(snap, go.Figure) and len(snap.data) == 5
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()


def test_overview_rows_and_figure():
    layers = {"model.layers.0.self_attn.q_proj": _linear(32, 64, 0), "model.layers.0.mlp.up_proj": _linear(96, 64, 1)}
    inputs = {n: torch.randn(10, 64) for n in layers}
    specs = {"int8": viz.layer_spec("entropy", 8), "int4": viz.layer_spec("entropy", 4)}
    rows = viz.overview_rows(layers, inputs, specs)
    assert len(rows) == 4 and {r["kind"] for r in rows} == {"q", "up"}
    by = {(r["layer"], r["config"]): r for r in rows}
    assert by[("L0.self_attn.q_proj", "int8")]["output SNR dB"] > by[("L0.self_attn.q_proj", "int4")]["output SNR dB"]
    fig = viz.overview_figure(rows)
    assert np.array(fig.data[0].z).shape == (2, 2)


def test_spectrum_figure():
    fig = viz.spectrum_figure({"a": np.array([4.0, 2.0, 1.0])}, marks={"r": 2})
    assert list(fig.data[0].y) == [1.0, 0.5, 0.25] and len(fig.layout.shapes) == 1


# --- render ------------------------------------------------------------------------------------

def _small_notebook() -> nbformat.NotebookNode:
    fig = viz.code_histogram(np.arange(5))
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"},
                                            "language_info": {"name": "python", "version": "3.11.0"},
                                            "widgets": {"x": 1}})
    md = nbformat.v4.new_markdown_cell("# A title\n\n**Main takeaway:** it works.")
    code = nbformat.v4.new_code_cell("1 + 1", execution_count=1, metadata={"collapsed": True, "tags": ["x"]})
    code.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1,
                                           metadata={"a": 1}),
                    nbformat.v4.new_output("display_data", fig._repr_mimebundle_()),
                    nbformat.v4.new_output("display_data",
                                           {"application/vnd.jupyter.widget-view+json": {"model_id": "abc"},
                                            "text/plain": "VBox()"})]
    nb.cells = [md, code]
    return nb


def test_strip_keeps_outputs_and_counts_drops_metadata():
    nb = render.strip(_small_notebook())
    assert dict(nb.metadata) == {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                                 "language_info": {"name": "python"}}
    code = nb.cells[1]
    assert code.metadata == {} and code.execution_count == 1 and len(code.outputs) == 3
    assert code.outputs[0].metadata == {} and code.outputs[0].data["text/plain"] == "2"
    nbformat.validate(nb)


def test_strip_file_is_idempotent(tmp_path):
    p = tmp_path / "n.ipynb"
    nbformat.write(_small_notebook(), p)
    assert render.strip_file(p) is True
    assert render.strip_file(p) is False


def test_html_is_self_contained_with_live_figures():
    nb = _small_notebook()
    ready = render.html_ready(nb)
    outs = ready.cells[1].outputs
    assert "Plotly.newPlot" in outs[1].data["text/html"] and "text/plain" not in outs[1].data
    assert "JupyterLab" in outs[2].data["text/html"]                              # widget: a note instead
    assert "application/vnd.jupyter.widget-view+json" in nb.cells[1].outputs[2].data   # the input is untouched
    page = render.to_html(render.strip(nb), "A title")
    assert page.count("Plotly.newPlot") == 1 and "<title>A title</title>" in page
    assert 'src="http' not in page and "cdnjs" not in page                       # no CDN scripts
    assert render.notebook_title(nb, "x") == "A title" and render.takeaway(nb) == "it works."


def test_render_writes_pages_and_index(tmp_path):
    src = tmp_path / "nbs"
    src.mkdir()
    nbformat.write(_small_notebook(), src / "01_small.ipynb")
    rows = render.render(src, tmp_path / "html", execute_cells=False)
    assert [r["href"] for r in rows] == ["01_small.html"] and rows[0]["ok"]
    index = (tmp_path / "html" / "index.html").read_text()
    assert 'href="01_small.html"' in index and "it works." in index


def test_execute_runs_a_fresh_kernel(tmp_path):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("import os\nprint(os.getcwd())")]
    render.execute(nb, tmp_path, timeout=120)
    assert nb.cells[0].outputs[0].text.strip() == str(tmp_path)


# --- the committed notebooks -------------------------------------------------------------------

@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_form(path):
    """Executed (outputs + counts), stripped, small, with a takeaway, and no embedded plotly.js."""
    text = path.read_text(encoding="utf-8")
    assert len(text.encode()) < MAX_NOTEBOOK_BYTES, f"{path.name} is {len(text) / 1e3:.0f} KB; keep outputs small"
    nb = nbformat.reads(text, as_version=4)
    assert set(nb.metadata) <= {"kernelspec", "language_info"}, f"{path.name}: run `python -m slc.render --strip`"
    assert render.takeaway(nb), f"{path.name} has no '**Main takeaway:**' line"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.metadata == {} for c in code)
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        f"{path.name} is not freshly executed top to bottom: run `python -m slc.render --update {path}`"
    assert "plotly.min.js" not in text and "window.PlotlyConfig" not in text
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


# --- generic charts ----------------------------------------------------------------------------

def test_generic_charts():
    rows = [{"m": "a", "x": 2.0, "y": 0.5}, {"m": "a", "x": 1.0, "y": 0.2}, {"m": "b", "x": 1.5, "y": 0.9}]
    curve = viz.curve_figure(rows, "x", "y", "m", title="t")
    assert [t.name for t in curve.data] == ["a", "b"] and list(curve.data[0].x) == [1.0, 2.0]
    bars = viz.grouped_bars(rows, "m", ["x", "y"], title="t")
    assert len(bars.data) == 2
    stacked = viz.bytes_figure({"fp32": {"dense fp32": viz.MB, "total": viz.MB}, "int8": {"int8 codes": viz.MB // 4}})
    assert stacked.layout.barmode == "stack" and {t.name for t in stacked.data} == {"dense fp32", "int8 codes"}
    trade = viz.tradeoff_figure([{"family": "f", "config": "c", "bits/weight": 4.0, "perplexity": 10.0}], reference=9.0)
    assert list(trade.data[0].text) == ["c"] and len(trade.layout.shapes) == 1


def test_ranks_and_spectra_per_kind():
    torch.manual_seed(0)
    W = {"model.layers.0.self_attn.q_proj.weight": torch.randn(32, 48),
         "model.layers.1.self_attn.q_proj.weight": torch.randn(32, 48),
         "model.layers.0.mlp.up_proj.weight": torch.randn(64, 48)}
    r = viz.uniform_ranks(W, 0.5)
    assert r["model.layers.0.self_attn.q_proj.weight"] == int(0.5 * 32 * 48 / 80)
    assert len(viz.rank_figure({"uniform": r}).data) == 1
    S = {k: viz.singular_values(w) for k, w in W.items()}
    kinds = {"q": [k for k in W if "q_proj" in k], "up": [k for k in W if "up_proj" in k]}
    rows = viz.spectrum_rows(S, kinds)
    assert [x["kind"] for x in rows] == ["q", "up"] and all(0 < x["energy in top 25 % of σ"] < 1 for x in rows)
    assert len(viz.kind_spectrum_figure(S, kinds).data) == 2


def test_strip_script_check_and_fix(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "n.ipynb"
    nbformat.write(_small_notebook(), p)
    script = [sys.executable, str(ROOT / "scripts" / "strip_notebook.py")]
    assert subprocess.run(script + ["--check", str(p)], capture_output=True).returncode == 1
    assert subprocess.run(script + [str(p)], capture_output=True).returncode == 0
    assert subprocess.run(script + ["--check", str(p)], capture_output=True).returncode == 0

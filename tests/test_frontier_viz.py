"""slc.viz's quality-per-bit helpers (notebook 07) and bench/frontier.py's JSON rows."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from slc import LinearSpec, Quantizer, viz

ROOT = Path(__file__).resolve().parents[1]
FRONTIER_JSON = ROOT / "bench" / "results" / "frontier.json"


def _rows() -> list[dict]:
    """A frontier in miniature: the fp32 reference, two GGUF points and one ECSQ point per model."""
    rows = []
    for model, key, ref, vals in (("smollm2-135m", "ppl", 16.0, (16.1, 20.0, 16.5)),
                                  ("minilm-l6", "cos", 1.0, (0.9998, 0.97, 0.99))):
        rows.append({"model": model, "family": "fp32", "name": "fp32 (reference)", "bits": 32.0, key: ref})
        rows += [{"model": model, "family": "GGUF", "name": "GGUF Q4_0", "bits": 4.5, key: vals[1]},
                 {"model": model, "family": "GGUF", "name": "GGUF Q8_0", "bits": 8.5, key: vals[0]},
                 {"model": model, "family": "ECSQ (one step)", "name": "ECSQ step 0.2", "bits": 4.4, key: vals[2]}]
    return rows


def test_frontier_figure_one_trace_per_family_and_panel():
    fig = viz.frontier_figure(_rows())
    assert [(t.name, t.xaxis) for t in fig.data] == [("GGUF", "x"), ("ECSQ (one step)", "x"),
                                                      ("GGUF", "x2"), ("ECSQ (one step)", "x2")]
    gguf = fig.data[0]
    # sorted by bits; the fp32 row is no trace
    assert list(gguf.x) == [4.5, 8.5] and list(gguf.y) == [20.0, 16.1]
    assert list(fig.data[2].y) == pytest.approx([0.03, 2e-4])                   # MiniLM panel: 1 - cos
    assert [t.showlegend for t in fig.data] == [True, True, False, False]       # one legend entry per family
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert fig.layout.yaxis.range == pytest.approx((math.log10(16 * 0.98), math.log10(16 * 1.6)))
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].y0 == 16.0     # fp32 line on the perplexity panel


def test_frontier_figure_draws_one_model_and_floors_exact_rows():
    rows = [r for r in _rows() if r["model"] == "minilm-l6"]
    rows.append({"model": "minilm-l6", "family": "lossless", "name": "lossless bf16", "bits": 10.6, "cos": 1.0})
    fig = viz.frontier_figure(rows)
    assert {t.xaxis for t in fig.data} == {"x"} and fig.layout.yaxis.title.text == "1 - cosine (log)"
    assert list(fig.data[-1].y) == [viz.MIN_ONE_MINUS_COS]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("bits"), "has no 'bits'"),
    (lambda r: r.update(bits=float("nan")), "bits=nan"),
    (lambda r: r.update(model="gpt2"), "filter the rows first"),
    (lambda r: r.pop("ppl"), "needs a finite 'ppl'"),
])
def test_frontier_figure_rejects_bad_rows_with_the_fix(change, message):
    rows = _rows()
    change(rows[1])
    with pytest.raises(ValueError, match=message):
        viz.frontier_figure(rows)
    with pytest.raises(ValueError, match="no rows"):
        viz.frontier_figure([])


def test_bench_rows_go_to_plain_json_and_back(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import frontier

    rows = [frontier.Row("minilm-l6", "fp32", "fp32 (reference)", 32.0, None, math.inf, None, 1.0),
            frontier.Row("minilm-l6", "lossless", "lossless fp32", 26.4, 0.5, math.inf, None, 1.0,
                         extra={"ratio": 0.826})]
    bench = type("B", (), {"rows": rows})()
    path = tmp_path / "f.json"
    frontier.write_json(path, frontier.row_dicts(bench), {"command": "x"}, ["- target"])
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text                         # plain JSON, readable anywhere
    data = json.loads(text)
    assert data["rows"][1]["snr"] is None and data["rows"][1]["extra"] == {"ratio": 0.826}
    assert len(viz.frontier_figure(data["rows"]).data) == 1


@pytest.mark.skipif(not FRONTIER_JSON.exists(), reason="bench/results/frontier.json not written yet")
def test_committed_frontier_json_draws():
    data = json.loads(FRONTIER_JSON.read_text())
    assert {"meta", "targets", "rows"} <= set(data) and not data["meta"]["quick"]
    fig = viz.frontier_figure(data["rows"])
    names = {t.name for t in fig.data}
    assert {"GGUF", "ECSQ (one step)", "ECSQ allocated", "SVD plain", "lossless"} <= names
    assert {t.xaxis for t in fig.data} == {"x", "x2"}


def test_lossless_rows_are_exact_and_smaller_for_bf16():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 8))
    bf16, fp32 = viz.lossless_rows(net)
    assert bf16["dtype"] == "bfloat16" and bf16["bit-exact"] == "yes" and bf16["ratio"] < 0.9
    assert fp32["dtype"] == "float32" and fp32["bit-exact"] == "yes" and fp32["MB before"] == 2 * bf16["MB before"]


def test_frontier_point_on_minilm():
    from slc import models

    model, tok = models.load("minilm-l6")
    q8 = viz.frontier_point(model, tok, "Q8_0", "GGUF Q8_0")
    assert q8["bits/weight"] == 8.5 and 40 < q8["weight SNR dB"] < 50 and q8["embedding cosine"] > 0.999
    ecsq = viz.frontier_point(model, tok, LinearSpec("entropy", quantizer=Quantizer(mode="ecsq", step=0.35),
                                                     predictor="none"), "ECSQ step 0.35")
    assert 3.4 < ecsq["bits/weight"] < 3.9 and 18 < ecsq["weight SNR dB"] < 22
    assert ecsq["1 - cos"] == pytest.approx(1 - ecsq["embedding cosine"])


def _ood_rows():
    ref = {"model": "smollm2-135m", "group": "reference", "name": "fp32", "bits": 32.0,
           "scores": {"in-domain": 10.0, "prose": 5.0, "code": 4.0}}
    a = {"model": "smollm2-135m", "group": "llama.cpp + imatrix", "name": "IQ4_XS + imatrix", "bits": 4.44,
         "scores": {"in-domain": 11.0, "prose": 5.5, "code": 4.2}}
    b = {"model": "smollm2-135m", "group": "ECSQ step", "name": "ECSQ 0.25", "bits": 4.1,
         "scores": {"in-domain": 10.5, "prose": 6.0, "code": 4.1}}
    c = {"model": "smollm2-135m", "group": "ECSQ step", "name": "ECSQ 0.05", "bits": 6.4,
         "scores": {"in-domain": 10.1, "prose": 5.1, "code": 4.0}}
    return [ref, a, b, c]


def test_ood_table_and_figure():
    rows = _ood_rows()
    t = viz.ood_table(rows, "smollm2-135m", max_bits=5.0)
    assert [r["row"] for r in t] == ["IQ4_XS + imatrix", "ECSQ 0.25"]            # best prose first; 6.4 bits left out
    assert t[0]["Δ ppl % prose"] == pytest.approx(10.0) and t[1]["Δ ppl % in-domain"] == pytest.approx(5.0)
    fig = viz.ood_figure(rows, "smollm2-135m")
    assert len(fig.data) == 4                                                   # 2 groups x 2 panels
    peer = next(d for d in fig.data if d.name == "llama.cpp + imatrix")
    assert peer.mode == "markers" and list(peer.y) == pytest.approx([10.0])
    with pytest.raises(ValueError, match="reference"):
        viz.ood_figure(rows[1:], "smollm2-135m")


def test_the_off_grid_control_reads_as_a_causal_lm():
    rows = [dict(r, model="smollm2-135m-dithered") for r in _ood_rows()]
    t = viz.ood_table(rows, "smollm2-135m-dithered", max_bits=5.0)
    assert t[0]["Δ ppl % prose"] == pytest.approx(10.0)                        # Δ % against its own fp32, not 1 - cos
    assert "off its Q4_1 grid" in viz.ood_figure(rows, "smollm2-135m-dithered").layout.title.text


def test_load_ood_rows(tmp_path):
    with pytest.raises(ValueError, match="frontier_ood"):
        viz.load_ood_rows(tmp_path)
    (tmp_path / "frontier_ood_x.json").write_text(json.dumps({"meta": {}, "rows": _ood_rows()}))
    assert len(viz.load_ood_rows(tmp_path)) == 4

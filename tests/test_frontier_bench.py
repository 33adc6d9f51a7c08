"""bench/frontier.py's rows as tasks (in process and on a 2-worker Dask LocalCluster); frontier_ood.py's targets."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import frontier  # noqa: E402

OPTS = {"quick": True, "chars": 600, "calib_tokens": 64, "cov_tokens": 64}
CHEAP = [("smollm2-135m", "reference"), ("smollm2-135m", "gguf", "Q4_0"), ("smollm2-135m", "rtn", 64),
         ("smollm2-135m", "ecsq", 0.2), ("smollm2-135m", "lossless")]


def test_every_model_task_has_its_function():
    for key in ("smollm2-135m", "minilm-l6"):
        tasks = frontier.model_tasks(key, quick=False)
        assert tasks[0] == (key, "reference") and len(set(tasks)) == len(tasks)
        assert {t[1] for t in tasks} == set(frontier.TASKS)
    assert len(frontier.SWEEP) == 8 and all(t[1] in ("gguf", "rtn", "ecsq") for t in frontier.SWEEP)


def test_gather_orders_rows_and_gives_exact_rows_the_reference_scores():
    ref = frontier.Row("m", "fp32", "fp32 (reference)", 32.0, ppl=10.0, snr=math.inf)
    exact = frontier.Row("m", "lossless", "lossless fp32", 20.0, snr=math.inf)
    q = frontier.Row("m", "GGUF", "GGUF Q4_0", 4.5, ppl=11.0, snr=20.0)
    res = frontier.gather([{"task": ["m", "reference"], "rows": [ref], "seconds": 1.0, "eval_tokens": 99},
                           {"task": ["m", "gguf", "Q4_0"], "rows": [q], "seconds": 2.0},
                           {"task": ["m", "lossless"], "rows": [exact], "seconds": 3.0}])["m"]
    assert [r.name for r in res.rows] == ["fp32 (reference)", "GGUF Q4_0", "lossless fp32"]
    assert exact.ppl == 10.0 and res.eval_tokens == 99 and res.task_seconds["gguf Q4_0"] == 2.0


@pytest.mark.slow
def test_two_worker_local_cluster_gives_the_serial_rows():
    """Five cheap tasks in this process (one thread, as a worker runs them) and on two Dask workers."""
    from dask.distributed import Client, LocalCluster

    serial = frontier.gather(frontier.run_tasks(CHEAP, OPTS, None, threads=1))["smollm2-135m"]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        dask = frontier.gather(frontier.run_tasks(CHEAP, OPTS, client))["smollm2-135m"]
    assert [frontier.row_key(r) for r in dask.rows] == [frontier.row_key(r) for r in serial.rows]
    assert len(serial.rows) == 7 and all(r.ppl is not None and math.isfinite(r.ppl) for r in serial.rows)


@pytest.mark.skipif(not (ROOT / "bench" / "results" / "frontier.json").exists(), reason="no frontier.json yet")
def test_main_reports_the_gathered_tasks(tmp_path, monkeypatch):
    """main() from task outputs to frontier.md / .json / .html (the committed run's rows stand in for the tasks)."""
    import json

    data = json.loads((ROOT / "bench" / "results" / "frontier.json").read_text())
    outputs = []
    for key in ("smollm2-135m", "minilm-l6"):
        rows = [frontier.Row(**{**d, "snr": math.inf if d["snr"] is None else d["snr"]})
                for d in data["rows"] if d["model"] == key]
        outputs.append({"task": [key, "all"], "rows": rows, "seconds": 1.0, "eval_tokens": 42, "rd_seconds": 2.0,
                        "allocations": {4.5: {"bits_per_weight": 4.49, "by_kind": {"attention": 4.1, "mlp": 4.7}}}})
    monkeypatch.setattr(frontier, "run_tasks", lambda tasks, opts, client, threads: outputs)
    frontier.main(["--out", str(tmp_path / "f.md"), "--html", str(tmp_path / "f.html")])
    md = (tmp_path / "f.md").read_text()
    assert "## Targets (issue 6)" in md and "## all-MiniLM-L6-v2" in md and "on 42 tokens" in md
    assert json.loads((tmp_path / "f.json").read_text())["meta"]["workers"] == 0


def test_targets_table_says_where_slc_wins_and_where_it_does_not():
    import frontier_ood as fo

    def row(model, name, bits, scores, **kw):
        return {"model": model, "name": name, "group": kw.pop("group", ""), "bits": bits, "note": "",
                "scores": dict(zip(fo.SETS, scores, strict=True)), "seconds": 1.0, **kw}

    rows = [row("smollm2-135m", "fp32", 32.0, (10.0, 10.0, 10.0), group="reference"),
            row("smollm2-135m", "llama.cpp IQ4_NL + imatrix", 4.5, (11.0, 11.0, 11.0), group="llama.cpp + imatrix"),
            row("smollm2-135m", "llama.cpp Q8_0 + imatrix", 8.5, (10.0, 10.0, 10.0), group="llama.cpp + imatrix"),
            row("smollm2-135m", "compress_to_budget 4.500", 4.5, (10.5, 10.9, 11.5), phase="targets",
                target=["IQ4_NL's bits"]),
            row("smollm2-135m", "compress_to_budget 3.600", 3.6, (12.0, 13.0, 10.9), phase="targets",
                target=["20% below IQ4_NL"])]
    lines = fo.targets_table(rows)
    assert len(lines) == 3                                     # header, rule, IQ4_NL (Q8_0 is above 4.5 bits)
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["smollm2-135m", "IQ4_NL", "4.500"] and cells[3] == "+10.0 % / +10.0 % / +10.0 %"
    assert cells[6] == "in-domain, prose" and cells[9] == "code"     # 11.5 > 11 on code; at 3.6 only code holds
    rows[3]["scores"]["code"] = 10.0
    assert fo.targets_table(rows)[2].split("|")[7].strip() == "all three"


def test_the_control_table_gives_every_row_against_its_own_fp32():
    import frontier_ood as fo

    def row(name, bits, scores, group):
        return {"model": fo.CONTROL, "name": name, "group": group, "bits": bits, "note": "", "phase": "",
                "scores": dict(zip(fo.SETS, scores, strict=True)), "seconds": 1.0}

    assert fo.control_table([row("fp32", 32.0, (20.0, 10.0, 8.0), "reference")]) == []     # nothing to compare yet
    rows = [row("llama.cpp IQ4_NL + imatrix", 4.5, (22.0, 12.0, 8.8), "llama.cpp + imatrix"),
            row("fp32", 32.0, (20.0, 10.0, 8.0), "reference"),
            row("compress_to_budget 3.600", 3.566, (21.0, 15.0, 8.4), "compress_to_budget"),
            {**row("fp32", 32.0, (15.0, 8.0, 7.0), "reference"), "model": "smollm2-135m"}]   # another model's
    lines = fo.control_table(rows)
    assert len(lines) == 5                                          # header, rule, fp32, IQ4_NL, slc
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert [c[0] for c in cells] == ["fp32", "llama.cpp IQ4_NL + imatrix", "compress_to_budget 3.600"]
    assert cells[1][2:8] == ["22.000", "+10.0", "12.000", "+20.0", "8.800", "+10.0"]
    assert cells[2][1] == "3.566" and cells[2][5] == "+50.0"


def test_the_wide_table_gives_both_lengths_and_the_verdict_on_each():
    import frontier_ood as fo
    import wide_eval

    def row(name, group, bits, short, wide, **kw):
        sc = {str(n): dict(zip(fo.SETS, s, strict=True)) for n, s in zip(wide_eval.LENGTHS, (short, wide), strict=True)}
        return {"model": "smollm2-135m", "name": name, "group": group, "bits": bits, "scores": sc, **kw}

    rows = [row("compress_to_budget 3.600", "compress_to_budget", 3.566, (11.0, 12.0, 10.0), (11.0, 14.0, 10.0),
                target=["20% below IQ4_NL"]),
            row("fp32", "fp32", 32.0, (10.0, 10.0, 10.0), (10.0, 10.0, 10.0)),
            row("llama.cpp IQ4_NL + imatrix", "llama.cpp + imatrix", 4.5, (12.0, 13.0, 11.0), (12.0, 13.0, 11.0),
                preset="IQ4_NL")]
    lines = wide_eval.report(rows, "load note").splitlines()
    table = [ln for ln in lines if ln.startswith("| ")][1:]
    peer, mine = ([c.strip() for c in ln.strip("|").split("|")] for ln in table)
    assert peer[:4] == ["llama.cpp IQ4_NL + imatrix", "4.500", "+20.0 / +30.0 / +10.0", "+20.0 / +30.0 / +10.0"]
    assert mine[1:4] == ["3.566", "+10.0 / +20.0 / +0.0", "+10.0 / +40.0 / +0.0"]
    assert mine[4] == "IQ4_NL: in-domain, prose, code" and mine[5] == "IQ4_NL: in-domain, code"   # prose lost at 48k

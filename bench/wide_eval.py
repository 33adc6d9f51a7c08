"""The targets on four times the text: do the 12 000-character verdicts of frontier_ood.md hold on 48 000?

    python bench/wide_eval.py --model smollm2-135m --model smollm2-135m-dithered
    python bench/wide_eval.py --report                 # rewrite the table from the JSON only

frontier_ood.py scores every row on 12 000 characters per evaluation set: the prose set is then the READMEs and
licences of four packages (8 documents, ~3 400 SmolLM2 tokens). This reruns the rows that decide the issue-13
targets on a causal LM on the first WIDE_CHARS characters of the same sets (prose: 31 documents of 16 packages;
the sets are prefixes of each other, so the small set is part of the large one): fp32, every llama.cpp preset +
imatrix at <= 4.5 bits (the GGUFs bench/peers.py made, under build/peers/) and compress_to_budget's default at
20 % fewer bits than each (frontier_ood.preset_budgets; the same calibration mix, tokens and code as phase
"targets", so the same layers). Each row is scored on both lengths in the same process, so the table shows the
12 000-character figure beside the 48 000 one.

Writes bench/results/wide_eval_<model>.json (a rerun replaces that model's rows) and wide_eval.md from all of them.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import frontier_ood as fo  # noqa: E402

from slc import llamacpp, metrics, models, texts  # noqa: E402

WIDE_CHARS = 48_000
LENGTHS = (fo.EVAL_CHARS, WIDE_CHARS)


def score(b: fo.Bench, sets: dict, model) -> dict:
    """{length: {set: perplexity}} on each length's evaluation sets (window 512, stride 512, as frontier_ood)."""
    return {str(n): {k: metrics.perplexity(model, b.tok, v, window=512, stride=512) for k, v in s.items()}
            for n, s in sets.items()}


def run_model(key: str, rows: list, slc_only: bool = False) -> None:
    if models.task(key) != "causal-lm":
        raise SystemExit(f"{key}: wide_eval.py checks the causal LMs (perplexity); MiniLM's targets are met")
    b = fo.Bench(key)
    sets = {n: texts.evaluation_sets(n) for n in LENGTHS}

    def add(name: str, group: str, bits: float, w_hat, model=None, **extra) -> None:
        """Score the fp32 model with w_hat's block weights (or `model` as it is) on both lengths; append the row."""
        t0 = time.perf_counter()
        scores = score(b, sets, model) if model is not None else b.score(w_hat, lambda: score(b, sets, b.model))
        row = {"model": key, "name": name, "group": group, "bits": bits, "scores": scores, **extra}
        rows.append(row)
        print(f"  {key} {name:40s} {bits:6.3f}  " + "  ".join(
            f"{n}: " + " / ".join(f"{v:.3f}" for v in row["scores"][str(n)].values()) for n in LENGTHS)
            + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        save(rows, key)

    if slc_only:                                    # fp32 and the presets as the JSON has them: they do not change
        if not any(r["model"] == key and r["name"] == "fp32" for r in rows):
            raise SystemExit(f"--slc-only keeps {key}'s fp32 and preset rows, but the JSON has none: run without it")
    else:
        add("fp32", "fp32", 32.0, None)
    for r in [] if slc_only else json.loads((fo.RESULTS / "frontier_ood_peers.json").read_text())["rows"]:
        if r["model"] != key or r["group"] != "llama.cpp + imatrix" or r["bits"] > 4.52:
            continue
        preset = r["name"].removeprefix("llama.cpp ").removesuffix(" + imatrix")
        path = llamacpp.PEERS_DIR / key / f"{preset}-imatrix.gguf"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run bench/peers.py --model {key} first (after `make peers`)")
        add(r["name"], r["group"], r["bits"], llamacpp.read_block_weights(path), preset=preset)
    from slc.recipe import compress_to_budget
    cals = {}
    for budget, why in fo.preset_budgets(key).items():
        if not any(w.startswith("20% below") for w in why):
            continue
        cal = fo.calibration_of(b, fo.default_variant(b, budget), cals)
        model = copy.deepcopy(b.model)
        rep = compress_to_budget(model, b.tok, budget, progress=False, calibration=cal)
        add(f"compress_to_budget {budget:.3f}", "compress_to_budget", rep.bits_per_weight, None, model, budget=budget,
            target=why, recipe=rep.recipe)


def json_path(key: str) -> Path:
    """One rows file per model, so that two models can run side by side: bench/results/wide_eval_<model>.json."""
    return fo.RESULTS / f"wide_eval_{key}.json"


def load_rows() -> list:
    return [r for p in sorted(fo.RESULTS.glob("wide_eval_*.json")) for r in json.loads(p.read_text())["rows"]]


def save(rows: list, key: str) -> None:
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "lengths": list(LENGTHS),
            "cal_chars": fo.CAL_CHARS}
    mine = [r for r in rows if r["model"] == key]
    json_path(key).write_text(json.dumps({"meta": meta, "rows": mine}, indent=1) + "\n")


def documents_used(n_chars: int) -> str:
    """'N documents of M packages' in the first n_chars characters of the prose set."""
    used = texts.used_sources(texts.evaluation_documents("prose"), n_chars)
    return f"{len(used)} documents of {len({s.split(':')[0] for _, s in used})} packages"


def report(rows: list, load_note: str) -> str:
    lines = ["# The targets on 48 000 characters per evaluation set (bench/wide_eval.py)", "", load_note, "",
             f"Each row scored on the first {LENGTHS[0]} characters of each evaluation set (as in frontier_ood.md) and "
             f"on the first {LENGTHS[1]}. Prose: {documents_used(LENGTHS[0])} and {documents_used(LENGTHS[1])}. "
             "Δ perplexity against fp32, in domain / prose / code; slc's rows: compress_to_budget's default at 20 % "
             "fewer bits than the presets it is named after ('as good in': the sets where slc's row is at least "
             "as good as that preset's on the same length).", ""]
    for key in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == key]
        ref = next((r["scores"] for r in mine if r["name"] == "fp32"), None)
        if ref is None:
            continue

        def delta(r, n, ref=ref):
            return " / ".join(f"{100 * (r['scores'][n][k] / ref[n][k] - 1):+.1f}" for k in fo.SETS)

        lines += [f"## {key}", "", "| row | bits/w | Δ % on 12 000 chars | Δ % on 48 000 chars | "
                  "as good as (12 000) | as good as (48 000) |", "|---|---:|---|---|---|---|"]
        peers = {r["preset"]: r for r in mine if r["group"] == "llama.cpp + imatrix"}
        for r in sorted(mine, key=lambda r: (r["name"] != "fp32", r["group"] != "llama.cpp + imatrix", -r["bits"])):
            if r["name"] == "fp32":
                continue
            cells = [r["name"], f"{r['bits']:.3f}"] + [delta(r, str(n)) for n in LENGTHS]
            for n in LENGTHS:
                if r["group"] != "compress_to_budget":
                    cells.append("")
                    continue
                verdicts = []
                for why in r["target"]:
                    preset = why.removeprefix("20% below ")
                    if preset in peers:
                        sets = [k for k in fo.SETS if r["scores"][str(n)][k] <= peers[preset]["scores"][str(n)][k]]
                        verdicts.append(f"{preset}: {', '.join(sets) or 'none'}")
                cells.append("; ".join(verdicts))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", choices=("smollm2-135m", fo.CONTROL), help="causal LMs to rerun")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    p.add_argument("--load-note", default=None, help="what else the machine was running (for the table)")
    p.add_argument("--slc-only", action="store_true",
                   help="rerun only compress_to_budget's rows (after a change to slc), keeping fp32 and the presets")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = load_rows()
    if not args.report:
        for key in args.model or ["smollm2-135m"]:
            print(f"\n== {key}", flush=True)
            rows[:] = [r for r in rows if r["model"] != key or (args.slc_only and r["group"] != "compress_to_budget")]
            run_model(key, rows, args.slc_only)
    note = args.load_note or (f"Run on the 2-core machine ({platform.processor() or platform.machine()}, torch "
                              f"{torch.__version__}, 1 thread per process); load average at the end "
                              f"{os.getloadavg()[0]:.1f}.")
    text = report(rows, note)
    (fo.RESULTS / "wide_eval.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

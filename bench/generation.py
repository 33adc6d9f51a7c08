"""Generation and prefill speed of entropy-coded SmolLM2 against fp32, in one run (issue 12).

    python bench/generation.py [--tokens 64] [--reps 3] [--out bench/results/generation.md]

Rows: fp32; int8 per channel (fixed width, slc.kernels); int8 + rANS tiled (fused decode x matmul,
slc.fused); int8 + rANS one stream (the layout before tiles: decodes the whole weight every token);
int4 group-64 + rANS tiled; ECSQ step 0.2 + rANS tiled (about 4.4 bits/weight). Columns: bits/weight of
the linear layers, resident weight MB of those layers, perplexity (so a speed-up cannot hide a wrong
matmul), greedy tokens/s (median of round-robin runs) and its ratio to fp32, prefill seconds for 512
tokens and its ratio. The load average is printed: on a busy machine every ratio is suspect.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slc import LinearSpec, Quantizer, compress_model, compressed_layers, metrics, models  # noqa: E402

PROMPT = "The three most useful things to know about Python lists are"
ROWS = {
    "int8 / channel": LinearSpec("quantized"),
    "int8 + rANS, tiled (fused)": LinearSpec("entropy"),
    "int8 + rANS, one stream": LinearSpec("entropy", layout="stream"),
    "int4 g64 + rANS, tiled": LinearSpec("entropy", Quantizer(bits=4, granularity="group", group_size=64)),
    "ECSQ 0.2 + rANS, tiled": LinearSpec("entropy", Quantizer(mode="ecsq", step=0.2), predictor="none"),
}


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def prefill_seconds(model, ids) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids)
        return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "generation.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    base, tok = models.load("smollm2-135m")
    text = models.evaluation_text(4000)
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    variants = {"fp32": None}                                       # first row; filled in below
    for label, spec in ROWS.items():
        model = copy.deepcopy(base)
        report = compress_model(model, spec, progress=False)
        t = report.totals()
        variants[label] = (model, t["bits_per_weight"], t["bytes_after"])
    variants["fp32"] = (base, 32.0, report.totals()["bytes_before"])   # the same layers, dense
    print(f"load average before: {load()}", flush=True)
    ppl = {k: metrics.perplexity(m, tok, text[:2000]) for k, (m, _, _) in variants.items()}
    tps = {k: [] for k in variants}
    pre = {k: [] for k in variants}
    for _ in range(args.reps):                                     # round robin: drift hits every row alike
        for k, (m, _, _) in variants.items():
            tps[k].append(metrics.generate_greedy(m, tok, PROMPT, args.tokens)[1])
            pre[k].append(prefill_seconds(m, ids))
    f_tps, f_pre = statistics.median(tps["fp32"]), statistics.median(pre["fp32"])
    lines = ["# Generation and prefill, SmolLM2-135M (`python bench/generation.py`)", "",
             f"torch {torch.__version__}, {os.cpu_count()} CPUs, 2 torch threads; {args.tokens} greedy tokens, "
             f"prefill {ids.shape[1]} tokens; medians of {args.reps} round-robin runs; "
             f"load average before {load()} (an idle machine reads about 0.1).", "",
             "| row | bits/weight | resident linear MB | perplexity | tok/s | × fp32 | prefill s | × fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, (_, bits, nbytes) in variants.items():
        t, s = statistics.median(tps[k]), statistics.median(pre[k])
        lines.append(f"| {k} | {bits:.2f} | {nbytes / 1e6:.1f} | {ppl[k]:.3f} | {t:.2f} | {t / f_tps:.2f} | "
                     f"{s:.2f} | {s / f_pre:.2f} |")
    lines += ["", f"load average after: {load()}"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    layers = compressed_layers(variants["int8 + rANS, tiled (fused)"][0])
    print(f"\n{len(layers)} tiled layers; decodes counted: {sum(m.n_decodes for m in layers.values())}")


if __name__ == "__main__":
    main()

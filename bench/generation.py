"""Generation and prefill speed of entropy-coded SmolLM2 against fp32, in one run (issue 12).

    python bench/generation.py [--tokens 64] [--reps 3] [--out bench/results/generation.md]

Rows: fp32; int8 per channel (fixed width, slc.kernels); int8 + rANS tiled (fused decode x matmul,
slc.fused); int8 + rANS one stream (the layout before tiles: decodes the whole weight every token);
int4 group-64 + rANS tiled; ECSQ step 0.2 + rANS tiled (about 4.4 bits/weight); trellis codes of about the same
rate + rANS tiled (slc.trellis: the fused kernel scans each decoded row into levels); ECSQ allocated to 4.5
bits/weight (slc.allocate, saved with save_compressed and loaded back: the way a user runs it). Columns:
bits/weight of the linear layers, resident weight MB of those layers, perplexity (so a speed-up cannot
hide a wrong matmul), greedy tokens/s (median of round-robin runs) and its ratio to fp32, prefill
seconds for 512 tokens and its ratio.

OpenMP. torch's OpenMP workers spin after each parallel region (libgomp's default wait policy): on a
2-core machine the spinning worker takes the core slc's second decode thread needs. So every row is
measured twice, in two child processes: with the default policy and with OMP_WAIT_POLICY=PASSIVE (it
must be set before torch is loaded). Every ratio divides by the BEST fp32 figure of the two, so a
setting that slows fp32 down cannot flatter the compressed rows.

The load average is printed: on a busy machine every ratio is suspect.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
PROMPT = "The three most useful things to know about Python lists are"
ALLOC_BITS = 4.5
ALLOC_FILE = ROOT / "build" / "generation" / f"smollm2-ecsq-allocated-{ALLOC_BITS}.safetensors"


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def allocated_file() -> Path:
    """SmolLM2 with ECSQ steps allocated to ALLOC_BITS bits/weight, saved once (cached in build/)."""
    from slc import allocate, compress_model, models, save_compressed, texts

    if not ALLOC_FILE.exists():
        model, tok = models.load("smollm2-135m")
        policy = allocate(model, tok, ALLOC_BITS, texts.calibration_mix())
        compress_model(model, policy, progress=False)
        ALLOC_FILE.parent.mkdir(parents=True, exist_ok=True)
        save_compressed(model, ALLOC_FILE)
    return ALLOC_FILE


def child(tokens: int, reps: int) -> dict:
    """Every row under this process's OpenMP setting: {row: {bits, bytes, ppl, tps, prefill}}."""
    import copy

    import torch

    from slc import LinearSpec, Quantizer, compress_model, compressed_layers, load_compressed, metrics, models
    from slc.trellis import step_for_ecsq

    torch.set_num_threads(2)
    rows = {
        "int8 / channel": LinearSpec("quantized"),
        "int8 + rANS, tiled (fused)": LinearSpec("entropy"),
        "int8 + rANS, one stream": LinearSpec("entropy", layout="stream"),
        "int4 g64 + rANS, tiled": LinearSpec("entropy", Quantizer(bits=4, granularity="group", group_size=64)),
        "ECSQ 0.2 + rANS, tiled": LinearSpec("entropy", Quantizer(mode="ecsq", step=0.2), predictor="none"),
        "trellis (ECSQ 0.2's rate) + rANS, tiled": LinearSpec(
            "entropy", Quantizer(mode="ecsq", step=step_for_ecsq(0.2), trellis=True), predictor="none"),
    }
    base, tok = models.load("smollm2-135m")
    text = models.evaluation_text(4000)
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    variants = {}
    for label, spec in rows.items():
        model = copy.deepcopy(base)
        t = compress_model(model, spec, progress=False).totals()
        variants[label] = (model, t["bits_per_weight"], t["bytes_after"])
    variants = {"fp32": (base, 32.0, t["bytes_before"]), **variants}        # the same layers, dense
    alloc = load_compressed(allocated_file())
    layers = compressed_layers(alloc).values()
    n_bytes, n_weights = sum(m.nbytes for m in layers), sum(m.in_features * m.out_features for m in layers)
    variants[f"ECSQ allocated {ALLOC_BITS} + rANS, tiled"] = (alloc, 8 * n_bytes / n_weights, n_bytes)
    ppl = {k: metrics.perplexity(m, tok, text[:2000]) for k, (m, _, _) in variants.items()}
    tps = {k: [] for k in variants}
    pre = {k: [] for k in variants}
    for m, _, _ in variants.values():
        metrics.generate_greedy(m, tok, PROMPT, 2)                   # warm-up: tables, numba, caches
    for _ in range(reps):                                            # round robin: drift hits every row alike
        for k, (m, _, _) in variants.items():
            tps[k].append(metrics.generate_greedy(m, tok, PROMPT, tokens)[1])
            with torch.inference_mode():
                t0 = time.perf_counter()
                m(ids)
                pre[k].append(time.perf_counter() - t0)
    return {k: {"bits": bits, "bytes": nbytes, "ppl": ppl[k], "tps": statistics.median(tps[k]),
                "prefill": statistics.median(pre[k]), "prefill_tokens": int(ids.shape[1])}
            for k, (_, bits, nbytes) in variants.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "generation.md"))
    p.add_argument("--child", help=argparse.SUPPRESS)                # internal: JSON file this child writes
    args = p.parse_args(argv)
    if args.child:
        Path(args.child).write_text(json.dumps(child(args.tokens, args.reps)))
        return
    allocated_file()                                                 # once, before the timed children
    before = load()
    results = {}
    for name, env in SETTINGS.items():
        out = ROOT / "build" / "generation" / f"{name}.json"
        cmd = [sys.executable, __file__, "--child", str(out), "--tokens", str(args.tokens), "--reps", str(args.reps)]
        clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        print(f"{name}: {' '.join(f'{k}={v}' for k, v in env.items()) or 'OpenMP defaults'} ...", flush=True)
        subprocess.run(cmd, env={**clean, **env}, check=True)
        results[name] = json.loads(out.read_text())
    best_tps = max(r["fp32"]["tps"] for r in results.values())
    best_pre = min(r["fp32"]["prefill"] for r in results.values())
    import torch

    first = next(iter(results.values()))
    lines = ["# Generation and prefill, SmolLM2-135M (`python bench/generation.py`)", "",
             f"torch {torch.__version__}, {os.cpu_count()} CPUs, 2 torch threads; {args.tokens} greedy tokens, "
             f"prefill {first['fp32']['prefill_tokens']} tokens; medians of {args.reps} round-robin runs; "
             f"load average before {before}, after {load()} (an idle machine reads about 0.1).", "",
             "Each row runs under both OpenMP wait policies (child processes); × fp32 divides by the best fp32 "
             f"figure of the two ({best_tps:.2f} tok/s, prefill {best_pre:.2f} s).", "",
             "| row | OpenMP | bits/weight | resident linear MB | perplexity | tok/s | × best fp32 | prefill s | "
             "× best fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in first:
        for name, r in results.items():
            v = r[k]
            lines.append(f"| {k} | {name} | {v['bits']:.2f} | {v['bytes'] / 1e6:.1f} | {v['ppl']:.3f} | "
                         f"{v['tps']:.2f} | {v['tps'] / best_tps:.2f} | {v['prefill']:.2f} | "
                         f"{v['prefill'] / best_pre:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

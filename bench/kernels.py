"""Generation-time matmuls: one activation row times every SmolLM2-135M weight shape, per storage.

    python bench/kernels.py              # table to stdout and bench/results/kernels.md

For each weight shape of SmolLM2-135M (the real weights of one block, and the tied 49152 x 576
head) and for 1 and 8 activation rows, times in this same run:
    dense fp32        F.linear(x, W) on the fp32 weight (the peer)
    int8 old path     codes.to(fp32) then F.linear, scaled after (what slc did before slc.kernels)
    int8 kernel       slc.kernels.int8_linear (numba; reads int8 directly)
    int4 old path     unpack nibbles, dequantise, F.linear
    int4 kernel       slc.kernels.packed4_linear (packed codes, group 64)
Each cell is the median of `--reps` calls after warm-up; "× dense" is dense time / that time
(> 1: faster than dense). Run it on a quiet machine: other processes on a 2-core box make
OpenMP and numba thread pools wait for each other and distort every figure.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slc import kernels, models  # noqa: E402
from slc.nn import CompressedLinear, LinearSpec, int_linear  # noqa: E402
from slc.quant import Quantizer  # noqa: E402

INT8 = Quantizer(bits=8)
INT4 = Quantizer(bits=4, granularity="group", group_size=64)


def median_us(fn, reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


def shapes() -> dict[str, torch.Tensor]:
    """One real weight per distinct shape of SmolLM2-135M (block 0) plus the tied head."""
    model, _ = models.load("smollm2-135m")
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers.0." in name:
            out.setdefault(tuple(m.weight.shape), (name.split(".")[-1], m.weight.detach().clone()))
    emb = model.get_input_embeddings().weight.detach().clone()
    out[tuple(emb.shape)] = ("lm_head (tied)", emb)
    return {f"{label} {s[0]}x{s[1]}": w for s, (label, w) in out.items()}


def time_paths(x, w, l8, l4, reps: int) -> dict:
    """Median µs of each way to multiply x by the weight w (dense, int8 layer l8, int4 layer l4)."""
    return {
        "dense fp32": median_us(lambda: F.linear(x, w), reps),
        "int8 old path": median_us(lambda: F.linear(x, l8.codes.to(torch.float32)) * l8.scale.reshape(-1), reps),
        "int8 kernel": median_us(lambda: kernels.int8_linear(x, l8.codes, l8.scale), reps),
        "int4 old path": median_us(lambda: int_linear(x, l4._codes(), l4.scale, None, INT4, l4.shape), reps),
        "int4 kernel": median_us(lambda: l4(x), reps),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernels.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with torch.no_grad():
        for label, w in shapes().items():
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.copy_(w)
            l8 = CompressedLinear.from_linear(lin, LinearSpec("quantized", INT8))
            l4 = CompressedLinear.from_linear(lin, LinearSpec("quantized", INT4))
            reps = args.reps if w.numel() < 10_000_000 else max(10, args.reps // 20)
            for n_rows in (1, kernels.MAX_ROWS):
                x = torch.randn(n_rows, w.shape[1])
                t = time_paths(x, w, l8, l4, reps)
                rows.append((label, n_rows, t))
                print(label, n_rows, {k: round(v, 1) for k, v in t.items()}, flush=True)
    cols = list(rows[0][2])
    head = ["weight", "rows"] + [f"{c} µs" for c in cols] + [f"{c} × dense" for c in cols[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for label, n_rows, t in rows:
        d = t["dense fp32"]
        lines.append("| " + " | ".join([label, str(n_rows)] + [f"{t[c]:.1f}" for c in cols]
                                       + [f"{d / t[c]:.2f}" for c in cols[1:]]) + " |")
    md = (f"# Generation matmuls (bench/kernels.py)\n\n{platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, medians of {args.reps} calls (20x fewer for the head).\n\n"
          + "\n".join(lines) + "\n")
    print(md)
    Path(args.out).write_text(md)


if __name__ == "__main__":
    main()

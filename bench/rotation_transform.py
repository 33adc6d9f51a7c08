"""How slc.rotation applies R^T to activations: one batched (b x b) matmul per block vs a fast Walsh-Hadamard butterfly.

    python bench/rotation_transform.py          # writes bench/results/rotation_transform.md

Both compute x D blockdiag(H_b) / sqrt(b) over the last dimension (checked equal); the butterfly is log2(b)
torch steps of (a + c, a - c) on a (..., n_blocks, b / 2h, 2, h) view. Widths are the real models' (MiniLM 384,
1536; SmolLM2 576, 1536) and a 7B model's 4096 / 11008; rows: 1 (generation) and 512 (prefill). fp32, one thread,
median of several timings.
"""
from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slc.rotation import Rotation  # noqa: E402

CASES = ((576, 1), (576, 512), (384, 1), (384, 512), (1536, 1), (1536, 512), (4096, 1), (4096, 512))


def butterfly(x: torch.Tensor, signs: torch.Tensor, b: int) -> torch.Tensor:
    y, h = (x * signs).reshape(-1, b), 1
    while h < b:
        y = y.reshape(-1, b // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(x.shape) * b ** -0.5


def timed(fn, n: int) -> float:
    for _ in range(3):
        fn()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n)
    return statistics.median(runs)


def row(width: int, rows: int) -> str:
    rot = Rotation(width, seed=0)
    x = torch.randn(rows, width)
    signs = rot.signs.float()
    assert torch.allclose(rot.apply(x), butterfly(x, signs, rot.block), atol=1e-4)
    n = 200 if rows == 1 else 10
    mm = timed(lambda: rot.apply(x), n)
    bf = timed(lambda: butterfly(x, signs, rot.block), n)
    return f"| {width} | {rot.block} | {rows} | {1e6 * mm:.0f} | {1e6 * bf:.0f} | {bf / mm:.2f} |"


def main() -> None:
    torch.set_num_threads(1)
    lines = ["# Rotating activations: batched matmul per block vs Walsh-Hadamard butterfly "
             "(bench/rotation_transform.py)", "",
             f"{platform.machine()}, torch {torch.__version__}, 1 thread, fp32, median of 5; shared machine.", "",
             "| width | block | rows | matmul µs | butterfly µs | butterfly / matmul |",
             "|---:|---:|---:|---:|---:|---:|"]
    for width, rows in CASES:
        lines.append(row(width, rows))
        print(lines[-1], flush=True)
    out = ROOT / "bench" / "results" / "rotation_transform.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Codec benchmark: rANS on real int8 weight codes vs the order-0 entropy bound, zstd and lzma.

    python bench/codec.py            # MiniLM-L6 and SmolLM2-135M, every linear layer
    python bench/codec.py --quick    # MiniLM-L6, and SmolLM2's first 4 blocks; fewer timing runs

Each linear weight is quantised to int8 (symmetric, one scale per output row) and
its codes coded on their own, as slc stores them. Sizes count everything a
stream carries (header, table, states, CRC); the bound is sum over tensors of
n * H0(tensor). zstd and lzma get the same int8 bytes, one frame per tensor.
Speeds are symbols (= int8 bytes) per second, medians of several runs, all
measured in this run on this machine. SmolLM2 ships as GGUF Q4_1, so its float
weights sit on a 4-bit grid per block of 32: its int8 codes are far from a smooth
histogram, and numbers for it depend on that.
"""
from __future__ import annotations

import argparse
import lzma
import re
import statistics
import time

import numpy as np
import zstandard

from slc import rans
from slc.models import linear_weights, weight_kind
from slc.quant import Quantizer
from slc.symbols import entropy_bits

MODELS = ["minilm-l6", "smollm2-135m"]


def int8_tensors(name: str, max_blocks: int | None = None) -> dict[str, np.ndarray]:
    """{parameter name: int8 codes (numpy, flattened)} for the model's linear weights."""
    q = Quantizer(bits=8, scheme="symmetric", granularity="channel")
    out = {}
    for k, w in linear_weights(name).items():
        block = re.search(r"\.(\d+)\.", k)
        if max_blocks is not None and block and int(block.group(1)) >= max_blocks:
            continue
        out[k] = q.quantize(w).codes.numpy().reshape(-1)
    return out


def median_seconds(fn, runs: int) -> tuple[float, float]:
    """(wall, cpu) seconds, medians over runs. cpu = time this thread actually ran: on a
    shared machine wall-clock also counts the time other processes held the core."""
    wall, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def sizes(codes: dict[str, np.ndarray]) -> list[dict]:
    """Per tensor: n, entropy bits, and coded bytes for rANS, zstd-19, lzma-9; rANS round trip checked."""
    z19 = zstandard.ZstdCompressor(level=19)
    rows = []
    for k, c in codes.items():
        sym = rans.int8_to_symbols(c)
        data = rans.encode(sym)
        assert np.array_equal(rans.decode(data), sym), f"round trip failed on {k}"
        raw = c.tobytes()
        stream = rans.RansStream.from_bytes(data)
        rows.append(dict(name=k, kind=weight_kind(k), n=c.size, H=entropy_bits(sym), rans=len(data),
                         zstd=len(z19.compress(raw)), lzma=len(lzma.compress(raw, preset=9)),
                         lanes=stream.lanes, scale_bits=stream.scale_bits,
                         table=rans.table_nbytes(stream.freqs)))
    return rows


def bpw(nbytes: float, n: int) -> str:
    return f"{8 * nbytes / n:.4f}"


def print_sizes(model: str, rows: list[dict], per_tensor: bool):
    n = sum(r["n"] for r in rows)
    H = sum(r["H"] for r in rows) / 8
    tot = {c: sum(r[c] for r in rows) for c in ("rans", "zstd", "lzma", "table")}
    print(f"\n### {model}: {len(rows)} tensors, {n:,} weights (int8, per-channel symmetric)\n")
    print("| coder | bits/weight | vs entropy bound |")
    print("| --- | ---: | ---: |")
    print(f"| order-0 entropy bound | {bpw(H, n)} | 1.0000 |")
    for label, col in (("rANS (slc)", "rans"), ("zstd -19", "zstd"), ("lzma -9", "lzma")):
        print(f"| {label} | {bpw(tot[col], n)} | {tot[col] / H:.4f} |")
    print(f"\nrANS overhead over the bound: {tot['rans'] - H:,.0f} bytes in all, of which tables "
          f"{tot['table']:,} B, states {sum(4 * r['lanes'] for r in rows):,} B, headers+CRC {24 * len(rows):,} B")

    kinds = sorted({r["kind"] for r in rows})
    print("\n| kind | tensors | weights | H bits/w | rANS bits/w | rANS/H | zstd-19 bits/w | lzma-9 bits/w |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kd in kinds:
        rs = [r for r in rows if r["kind"] == kd]
        m, h = sum(r["n"] for r in rs), sum(r["H"] for r in rs) / 8
        print(f"| {kd} | {len(rs)} | {m:,} | {bpw(h, m)} | {bpw(sum(r['rans'] for r in rs), m)} | "
              f"{sum(r['rans'] for r in rs) / h:.4f} | {bpw(sum(r['zstd'] for r in rs), m)} | "
              f"{bpw(sum(r['lzma'] for r in rs), m)} |")

    ratio = lambda r: r["rans"] / (r["H"] / 8)  # noqa: E731
    shown = rows if per_tensor else sorted(rows, key=ratio)[-5:]
    print(f"\n{'every tensor' if per_tensor else 'the 5 tensors furthest from the bound'}:\n")
    print("| tensor | weights | H bits/w | rANS bits/w | rANS/H | scale_bits | lanes "
          "| zstd-19 bits/w | lzma-9 bits/w |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in shown:
        print(f"| {r['name']} | {r['n']:,} | {bpw(r['H'] / 8, r['n'])} | {bpw(r['rans'], r['n'])} | {ratio(r):.4f} | "
              f"{r['scale_bits']} | {r['lanes']} | {bpw(r['zstd'], r['n'])} | {bpw(r['lzma'], r['n'])} |")
    for coder in ("zstd", "lzma"):
        beaten = [r for r in rows if r[coder] < r["rans"]]
        print(f"\ntensors where {coder} beats rANS: {len(beaten)} of {len(rows)}"
              + (" (it exploits order among the codes, which an order-0 coder cannot)" if beaten else ""))
        for r in beaten[:12]:
            print(f"  {r['name']}: rANS {r['rans']:,} B, {coder} {r[coder]:,} B ({r[coder] / r['rans'] - 1:+.2%})")
        if len(beaten) > 12:
            print(f"  ... and {len(beaten) - 12} more")


def speeds(codes: dict[str, np.ndarray], runs: int) -> list[tuple]:
    """(coder, encode wall, decode wall, encode cpu, decode cpu) in MB/s; MB = 1e6 int8 codes."""
    syms = [rans.int8_to_symbols(c) for c in codes.values()]
    raws = [c.tobytes() for c in codes.values()]
    big = max(range(len(syms)), key=lambda i: syms[i].size)
    rans.decode(rans.encode(syms[0]))  # compile / load the numba cache before timing
    blobs = [rans.encode(s) for s in syms]

    def row(label, n, enc, dec, enc_runs=runs):
        (we, ce), (wd, cd) = median_seconds(enc, enc_runs), median_seconds(dec, runs)
        return label, n / we / 1e6, n / wd / 1e6, n / ce / 1e6, n / cd / 1e6

    n, m = sum(s.size for s in syms), syms[big].size
    out = [row("rANS fast (numba), whole model, one stream per tensor", n,
               lambda: [rans.encode(s) for s in syms], lambda: [rans.decode(b) for b in blobs]),
           row(f"rANS fast, largest tensor ({m:,})", m,
               lambda: rans.encode(syms[big]), lambda: rans.decode(blobs[big])),
           row(f"rANS numpy, largest tensor ({m:,})", m,
               lambda: rans.encode(syms[big], backend="numpy"), lambda: rans.decode(blobs[big], backend="numpy"))]
    dz = zstandard.ZstdDecompressor()

    def zstd_row(level):
        cz = zstandard.ZstdCompressor(level=level)
        frames = [cz.compress(r) for r in raws]
        return row(f"zstd -{level}, whole model", n, lambda: [cz.compress(r) for r in raws],
                   lambda: [dz.decompress(f) for f in frames], enc_runs=runs if level == 3 else 1)

    out += [zstd_row(level) for level in (3, 19)]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2's first 4 blocks only; 3 timing runs")
    ap.add_argument("--per-tensor", action="store_true", help="print every tensor, not just the worst 5")
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    args = ap.parse_args()
    runs = 3 if args.quick else 5
    print("# slc rANS codec benchmark\n")
    print("bits/weight = coded bits per int8 weight code; all stream overhead included.")
    for model in args.models:
        codes = int8_tensors(model, max_blocks=4 if args.quick and model == "smollm2-135m" else None)
        if model == "smollm2-135m":
            print("\n(SmolLM2-135M comes from a GGUF Q4_1 file: its weights sit on a 4-bit grid per "
                  "block of 32, which shapes the int8 code statistics below.)")
        print_sizes(model, sizes(codes), args.per_tensor)
        print(f"\nspeed on {model} (MB/s = million int8 codes per second, median of {runs} runs; "
              "cpu = per second the thread actually ran, wall = per second of clock):\n")
        print("| coder | encode MB/s wall | decode MB/s wall | encode MB/s cpu | decode MB/s cpu |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, *mbs in speeds(codes, runs):
            print(f"| {label} | " + " | ".join(f"{v:,.1f}" for v in mbs) + " |")
    print("\ndecode ok!")


if __name__ == "__main__":
    main()

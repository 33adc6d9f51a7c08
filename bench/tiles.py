"""Tiled rANS streams and fused decode x matmul (slc.tiles, slc.fused), measured on the real models.

    python bench/tiles.py            # all sections, writes bench/results/tiles.md
    python bench/tiles.py --quick    # fewer repeats

Sections (medians of several runs; peers measured in the same run; the load average before each
section is printed, because this 2-core machine is shared):
  1. size: tiled vs one stream per tensor (int8 per channel, all linear weights of SmolLM2 and
     MiniLM, ECSQ step 0.2 SmolLM2), and zstd-3 of the same int8 bytes;
  2. whole-model decode throughput: one stream (numba, today's path), tiled on 1 and 2 threads,
     the NumPy reference over all tiles at once, zstd-3 decompression of the int8 bytes;
  3. threads: the persistent ThreadPoolExecutor vs numba prange on the fork-safe workqueue layer
     (launch cost, one 576 x 576 layer, whole model);
  4. per-layer y = x @ W^T at 1 and 8 rows: dense fp32 (torch), slc.kernels.int8_linear (codes in
     memory), fused int8 + rANS on 1 and 2 threads, fused int4 g64 and ECSQ 0.2 on 2 threads, for every
     SmolLM2 weight shape and the tied head (49152 x 576);
  5. the row threshold: fused decode x matmul against one-pass de-quantise + dense GEMM at 1-64 rows of x,
     which is where slc.fused.MAX_ROWS should sit.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")   # the fork-safe layer, for the prange rows

from slc import kernels, rans, tiles  # noqa: E402
from slc.fused import MAX_ROWS, FusedWeight  # noqa: E402
from slc.models import fetch, linear_weights  # noqa: E402
from slc.quant import Quantizer  # noqa: E402

try:                                    # slc.symbols after the module restructuring, slc.ecsq before it
    from slc.symbols import split_escapes
except ImportError:
    from slc.ecsq import split_escapes

OUT = ROOT / "bench" / "results" / "tiles.md"
LINES: list[str] = []
VERDICTS: list[str] = []      # goal checks, printed at the end


def say(s: str = "") -> None:
    print(s, flush=True)
    LINES.append(s)


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} {b:.2f} {c:.2f} ({os.cpu_count()} CPUs)"


CPU_TIMES: list[float] = []   # process CPU seconds of the last median_time call (median): a load-free view


def median_time(reps: int, f, *args, **kwargs) -> float:
    """Median wall seconds of f(*args, **kwargs) over reps calls, after one warm-up call. The median
    process CPU time goes to CPU_TIMES[-1]: for one thread it is what an idle machine would show."""
    f(*args, **kwargs)
    ts, cs = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        f(*args, **kwargs)
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    CPU_TIMES.append(float(np.median(cs)))
    return float(np.median(ts))


def decode_all_single(streams):
    for s in streams:
        rans.decode_stream(s)


def decode_all_tiled(decoders, threads):
    for d in decoders:
        d.decode(threads)


def decompress_all_zstd(frames, dz):
    for z in frames:
        dz.decompress(z)


def table(header: list[str], rows: list[list]) -> None:
    say("| " + " | ".join(header) + " |")
    say("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        say("| " + " | ".join(str(v) for v in r) + " |")
    say()


# ----------------------------------------------------------------------------
# the codes

def int8_symbols(w: torch.Tensor) -> np.ndarray:
    q = Quantizer(bits=8, granularity="channel")
    return (q.quantize(w).codes.numpy().astype(np.int16) - q.qmin).astype(np.uint16)


def ecsq_symbols(w: torch.Tensor, step: float = 0.2):
    qt = Quantizer(mode="ecsq", step=step).quantize(w)
    sym, E, esc = split_escapes(qt.codes.numpy())
    return sym.reshape(w.shape), E, esc, qt


def model_sets(quick: bool):
    smol = linear_weights("smollm2-135m")
    mini = linear_weights("minilm-l6")
    sets = {"SmolLM2 int8": {k: int8_symbols(w) for k, w in smol.items()},
            "MiniLM int8": {k: int8_symbols(w) for k, w in mini.items()}}
    sets["SmolLM2 ECSQ 0.2"] = {k: ecsq_symbols(w)[:2] for k, w in smol.items()}     # (symbols, escape)
    return sets


# ----------------------------------------------------------------------------
# 1 + 2: sizes and whole-model decode

def whole_model(quick: bool) -> None:
    import zstandard
    reps = 3 if quick else 5
    say("## 1-2. Size and whole-model decode")
    say()
    say(f"Before: {load()}")
    say()
    size_rows, speed_rows = [], []
    for name, tensors in model_sets(quick).items():
        ecsq = "ECSQ" in name
        syms = {k: (v[0] if ecsq else v) for k, v in tensors.items()}
        n = sum(s.size for s in syms.values())
        tiled = {k: tiles.encode_tiled(s, escape=tensors[k][1] if ecsq else None) for k, s in syms.items()}
        single = {k: rans.encode_stream(s) for k, s in syms.items()}
        decoders = [tiles.TiledDecoder(t) for t in tiled.values()]        # at load: index checked, tables built
        # zstd-3 of the same codes: int8 bytes (ECSQ: the int16 codes, as they would be stored plain)
        raw = {k: ((s.astype(np.int16) - 127).astype(np.int8) if not ecsq else s.astype(np.int16)).tobytes()
               for k, s in syms.items()}
        cz, dz = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
        zst = {k: cz.compress(b) for k, b in raw.items()}
        nb_t, nb_s = sum(t.nbytes for t in tiled.values()), sum(s.nbytes for s in single.values())
        worst = max(tiled[k].nbytes / single[k].nbytes - 1 for k in syms)
        n_tiles = sum(t.n_tiles for t in tiled.values())
        size_rows.append([name, len(syms), f"{n / 1e6:.1f} M", n_tiles, f"{nb_s / 1e6:.3f}", f"{nb_t / 1e6:.3f}",
                          f"{100 * (nb_t / nb_s - 1):.3f} %", f"{100 * worst:.3f} %",
                          f"{8 * nb_t / n:.3f}", f"{sum(len(z) for z in zst.values()) / 1e6:.3f}"])
        for k in list(syms)[:3]:                                       # every decoder gives the same symbols
            assert np.array_equal(tiles.decode_tiled(tiled[k]), syms[k])
            assert np.array_equal(rans.decode_stream(single[k]), syms[k].reshape(-1))
        before = load()
        t_single = median_time(reps, decode_all_single, list(single.values()))
        c_single = CPU_TIMES[-1]
        t_t1 = median_time(reps, decode_all_tiled, decoders, 1)
        c_t1 = CPU_TIMES[-1]
        t_t2 = median_time(reps, decode_all_tiled, decoders, 2)
        t_z = median_time(reps, decompress_all_zstd, list(zst.values()), dz)
        c_z = CPU_TIMES[-1]
        c0, t0 = time.process_time(), time.perf_counter()
        outs = tiles.decode_many_numpy(list(tiled.values()))
        t_np, c_np = time.perf_counter() - t0, time.process_time() - c0
        assert all(np.array_equal(o, s) for o, s in zip(outs, syms.values(), strict=True))
        del outs
        ms = [f"{n / t / 1e6:.0f}" for t in (t_single, t_t1, t_t2, t_np, t_z)]
        cpu = [f"{n / t / 1e6:.0f}" for t in (c_single, c_t1, c_np, c_z)]
        over = 100 * (nb_t / nb_s - 1)
        VERDICTS.append(f"{name}: size overhead {over:.3f} % ({'meets' if over <= 0.2 else 'misses'} <= 0.2 %); "
                        f"tiled 1 thread {t_single / t_t1:.2f} x one stream wall, {c_single / c_t1:.2f} x CPU time "
                        f"(goal 2 x); 2 threads {n / t_t2 / 1e6:.0f} M/s (floor 1000) = {t_z / t_t2:.2f} x zstd-3 "
                        f"(goal 1 x); NumPy {n / t_np / 1e6:.0f} M/s wall, {n / c_np / 1e6:.0f} CPU (floor 50)")
        speed_rows.append([name, *ms, f"{t_single / t_t1:.2f} x", f"{t_z / t_t2:.2f} x", " / ".join(cpu),
                           f"{c_single / c_t1:.2f} x", before.split(" (")[0].replace("load average ", "")])
        say(f"{name}: single {ms[0]} | tiled 1T {ms[1]} | 2T {ms[2]} | numpy {ms[3]} | zstd-3 {ms[4]} "
            f"M symbols/s ({before})")
    say()
    say("Sizes (bytes of the whole set of linear weights; bits/sym = tiled bits per symbol):")
    say()
    table(["model / codes", "tensors", "symbols", "tiles", "one stream MB", "tiled MB", "overhead",
           "worst tensor", "bits/sym", "zstd-3 MB"], size_rows)
    say("Whole-model decode, M symbols/s (int8: = MB/s of int8 codes), tensor by tensor, tables built at load:")
    say()
    table(["model / codes", "one stream (numba)", "tiled 1 thread", "tiled 2 threads", "NumPy tiled (all at once)",
           "zstd-3 decompress", "tiled 1T / one stream", "tiled 2T / zstd-3",
           "CPU time: one stream / tiled 1T / NumPy / zstd-3", "CPU: tiled 1T / one stream", "load before"], speed_rows)
    say("(wall-clock M symbols/s, medians; the CPU-time column divides by the process CPU time instead, which a "
        "busy machine does not inflate for one thread)")
    say()


# ----------------------------------------------------------------------------
# 3: thread pool vs prange (workqueue)

def threads_section(quick: bool) -> None:
    import numba
    from numba import njit, prange
    say("## 3. Threads: persistent ThreadPoolExecutor vs numba prange (workqueue layer)")
    say()
    say(f"Before: {load()}")
    say()

    @njit(parallel=True)
    def empty_prange(out):
        for i in prange(out.size):
            out[i] = i

    @njit(parallel=True)
    def decode_prange(states, words, tile_words, tile_syms, fb, values, sb, out, errs):
        for t in prange(states.shape[0]):
            lo = np.int64(t)                               # the prange index is unsigned: keep int64 arithmetic
            errs[t] = tiles.decode_tiles_kernel(states, words, tile_words, tile_syms, fb, values, sb, -1, tile_words,
                                                out, lo, lo + 1)

    @njit(nogil=True)
    def empty_kernel(out, lo, hi):
        for i in range(lo, hi):
            out[i] = i
        return -1

    reps = 200 if quick else 1000
    buf = np.zeros(2, dtype=np.int64)
    empty_prange(buf)
    layer = numba.threading_layer()
    t_prange = median_time(reps, empty_prange, buf)
    t_pool = median_time(reps, tiles.run_tiles, empty_kernel, (buf,), np.array([0, 1, 2]))
    t_serial = median_time(reps, empty_kernel, buf, 0, 2)

    w = linear_weights("smollm2-135m")
    sym = int8_symbols(w["model.layers.0.self_attn.q_proj.weight"])
    rows = [["empty launch (2 work items)", f"{t_prange * 1e6:.1f}", f"{t_pool * 1e6:.1f}", f"{t_serial * 1e6:.2f}"]]

    def prange_decode(d):
        out = np.empty(d.stream.n_symbols, dtype=np.uint16)
        errs = np.empty(d.stream.n_tiles, dtype=np.int64)
        decode_prange(d.states, d.words, d.tile_words, d.tile_syms, d.tables.fb, d.tables.values,
                      d.stream.scale_bits, out, errs)
        return out

    dec = tiles.TiledDecoder(tiles.encode_tiled(sym))
    assert np.array_equal(prange_decode(dec).reshape(sym.shape), sym)
    r = 50 if quick else 200
    rows.append(["decode 576 x 576 int8 (us)", f"{median_time(r, prange_decode, dec) * 1e6:.0f}",
                 f"{median_time(r, dec.decode, 2) * 1e6:.0f}", f"{median_time(r, dec.decode, 1) * 1e6:.0f}"])
    say(f"numba threading layer: {layer}; {load()}")
    say()
    table(["", "prange (workqueue), us", "ThreadPoolExecutor 2 threads, us", "serial (1 thread), us"], rows)
    say(f"Chosen: numba nogil kernels on slc.tiles' persistent ThreadPoolExecutor: {t_pool * 1e6:.0f} us a launch "
        f"against {t_prange * 1e6:.0f} us for prange on the fork-safe workqueue layer (the OpenMP layer, faster to "
        "launch, kills processes that fork after using it), no process-wide numba setting, and the pool is "
        "rebuilt in forked children (os.register_at_fork).")
    say()


# ----------------------------------------------------------------------------
# 4: per-layer matmul

def head_weight() -> torch.Tensor:
    from safetensors.torch import load_file
    t = load_file(fetch("smollm2-135m", quiet=True) / "model.safetensors")
    return t["model.embed_tokens.weight"]


class Cycle:
    """Calls f(copy, *args) on the next of several copies each time: the weights stream from DRAM as in
    a real forward pass (a model's weights do not fit the caches), not from a cache-warm single copy."""

    def __init__(self, f, copies):
        self.f, self.copies, self.i = f, copies, 0

    def __call__(self, *args, **kwargs):
        self.i = (self.i + 1) % len(self.copies)
        return self.f(self.copies[self.i], *args, **kwargs)


def cold_copies(make, nbytes: int, budget: int = 256 << 20, cap: int = 400) -> list:
    return [make() for _ in range(max(2, min(cap, -(-budget // max(nbytes, 1)))))]


def fused_copy(fw: FusedWeight) -> FusedWeight:
    """The same weight in fresh memory (its stream through bytes and back)."""
    return FusedWeight(tiles.TiledStream.from_bytes(fw.stream.to_bytes()), fw.kind, fw.scale, fw.zero_point, fw.qmin,
                       fw.escapes)


def smollm2_shapes(head: bool = True, kv: bool = True) -> dict:
    """One SmolLM2 weight of each shape (block 0), and the tied head: {label: weight}."""
    w = linear_weights("smollm2-135m")
    shapes = {"576 x 576 (q/o)": w["model.layers.0.self_attn.q_proj.weight"],
              "192 x 576 (k/v)": w["model.layers.0.self_attn.k_proj.weight"],
              "1536 x 576 (gate/up)": w["model.layers.0.mlp.up_proj.weight"],
              "576 x 1536 (down)": w["model.layers.0.mlp.down_proj.weight"]}
    if not kv:
        del shapes["192 x 576 (k/v)"]
    return {**shapes, "49152 x 576 (tied head)": head_weight()} if head else shapes


def layer_section(quick: bool) -> None:
    say("## 4. Per-layer y = x @ W^T (us, medians), SmolLM2 weights")
    say()
    say(f"Before: {load()}; torch threads {torch.get_num_threads()}")
    say()
    shapes = smollm2_shapes()
    q8 = Quantizer(bits=8, granularity="channel")
    q4 = Quantizer(bits=4, granularity="group", group_size=64)
    rows = []
    for name, wt in shapes.items():
        qt = q8.quantize(wt)
        codes, scale = qt.codes, qt.scale.reshape(-1).float()
        f8 = FusedWeight(tiles.encode_tiled(codes.numpy().astype(np.int16) - q8.qmin), "affine",
                         scale.numpy()[:, None], qmin=q8.qmin)
        q4t = q4.quantize(wt)
        f4 = FusedWeight(tiles.encode_tiled(q4t.codes.numpy().astype(np.int16).reshape(wt.shape) - q4.qmin), "affine",
                         q4t.scale.float().numpy().reshape(wt.shape[0], -1), qmin=q4.qmin)
        sym, E, esc, eq = ecsq_symbols(wt)
        fe = FusedWeight(tiles.encode_tiled(sym, escape=E), "ecsq", eq.scale.float().numpy().reshape(wt.shape[0], 1),
                         escapes=esc)
        dense = (codes.float() * scale[:, None]).contiguous()
        dense_copies = cold_copies(dense.clone, dense.numel() * 4)
        fused_copies = cold_copies(partial(fused_copy, f8), f8.stream.nbytes, 128 << 20)
        big = wt.shape[0] > 10_000
        reps = (10 if big else 50) if quick else (20 if big else 200)
        for nx in (1, 8):
            x = torch.randn(nx, wt.shape[1])
            assert torch.allclose(f8.linear(x), x @ dense.T, atol=1e-3, rtol=1e-3)
            before = load()
            t_dense = median_time(reps, torch.nn.functional.linear, x, dense)
            t_int8 = median_time(reps, kernels.int8_linear, x, codes, scale)
            t_f1 = median_time(reps, f8.linear, x, threads=1)
            t_f2 = median_time(reps, f8.linear, x, threads=2)
            t_f4 = median_time(reps, f4.linear, x, threads=2)
            t_fe = median_time(reps, fe.linear, x, threads=2)
            dense_cold = Cycle(lambda d, xx: torch.nn.functional.linear(xx, d), dense_copies)
            fused_cold = Cycle(lambda f, xx: f.linear(xx, threads=2), fused_copies)
            t_dense_cold = median_time(reps, dense_cold, x)
            t_f2_cold = median_time(reps, fused_cold, x)

            def us(t):
                return f"{t * 1e6:.0f}"
            gs = wt.numel() / t_f2 / 1e9
            rows.append([name, nx, us(t_dense), us(t_dense_cold), us(t_int8), us(t_f1), us(t_f2), us(t_f2_cold),
                         f"{gs:.2f}", us(t_f4), us(t_fe), f"{t_dense_cold / t_f2_cold:.2f}",
                         before.split(" (")[0].replace("load average ", "")])
            say(f"{name} x{nx}: dense {us(t_dense)} int8 {us(t_int8)} fused {us(t_f1)}/{us(t_f2)} "
                f"int4 {us(t_f4)} ecsq {us(t_fe)} ({before})")
    say()
    table(["weight", "rows of x", "dense fp32 (cache-warm)", "dense fp32 (from DRAM)", "int8_linear",
           "fused int8+rANS 1T", "fused int8+rANS 2T", "fused int8+rANS 2T (from DRAM)", "G weights/s (2T)",
           "fused int4 g64 2T", "fused ECSQ 0.2 2T", "dense / fused, both from DRAM", "load before"], rows)
    say("(from DRAM: each call uses the next of many copies of the weight, 256 MB of fp32 copies / 128 MB of "
        "streams, so neither sits in the caches, as in a real forward pass; cache-warm: the same copy every call)")
    say()


def threshold_section(quick: bool) -> None:
    say("## 5. Row threshold: fused decode x matmul vs de-quantise once + GEMM (us, medians, 2 threads)")
    say()
    say(f"Before: {load()}; slc.fused.MAX_ROWS = {MAX_ROWS}")
    say()
    shapes = smollm2_shapes(head=False, kv=False)
    q8 = Quantizer(bits=8, granularity="channel")
    counts = (1, 4, 8, 12, 16, 24, 32, 64)
    rows, wins = [], {}
    for name, wt in shapes.items():
        qt = q8.quantize(wt)
        fw = FusedWeight(tiles.encode_tiled(qt.codes.numpy().astype(np.int16) - q8.qmin), "affine",
                         qt.scale.reshape(-1, 1).float().numpy(), qmin=q8.qmin)
        copies = cold_copies(partial(fused_copy, fw), fw.stream.nbytes, 128 << 20)
        reps = 20 if quick else 60

        def fused(f, x):
            y = np.empty((x.shape[0], f.shape[0]), dtype=np.float32)
            f.linear_into(x.numpy(), y, threads=2)
            return y

        def dense(f, x):
            return x @ torch.from_numpy(f.dequantize(threads=2)).T
        for nx in counts:
            x = torch.randn(nx, wt.shape[1])
            np.testing.assert_allclose(fused(fw, x), dense(fw, x).numpy(), rtol=1e-3, atol=1e-3)
            t_f = median_time(reps, Cycle(fused, copies), x)
            t_d = median_time(reps, Cycle(dense, copies), x)
            wins.setdefault(nx, []).append(t_d >= 0.95 * t_f)          # fused at least as fast, within 5 %
            rows.append([name, nx, f"{t_f * 1e6:.0f}", f"{t_d * 1e6:.0f}", f"{t_d / t_f:.2f}"])
    table(["weight", "rows of x", "fused", "de-quantise + GEMM", "GEMM path / fused"], rows)
    upto = max([0] + [n for n in counts if all(all(wins[m]) for m in counts if m <= n)])
    say(f"The fused kernel is at least as fast (within 5 %) on every weight up to {upto} rows of x; "
        f"slc.fused.MAX_ROWS = {MAX_ROWS} (streams from DRAM, as in section 4; one run, noisy near the crossing).")
    say()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT), help="where the markdown goes (default bench/results/tiles.md)")
    ap.add_argument("--sections", default="1,3,4,5",
                    help="comma list of 1 (sizes+decode), 3 (threads), 4 (layers), 5 (row threshold)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    say("# Tiled rANS streams and fused decode x matmul (bench/tiles.py)")
    say()
    say(f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, numpy {np.__version__}, "
        f"CPUs {os.cpu_count()}; {load()}")
    say()
    sections = set(args.sections.split(","))
    if "1" in sections:
        whole_model(args.quick)
    if "3" in sections:
        threads_section(args.quick)
    if "4" in sections:
        layer_section(args.quick)
    if "5" in sections:
        threshold_section(args.quick)
    if VERDICTS:
        say("## Goals (this run)")
        say()
        for v in VERDICTS:
            say(f"- {v}")
        say()
    say(f"After: {load()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(LINES) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

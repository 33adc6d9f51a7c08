"""Scale benchmark: synthetic Llama checkpoints of 1.1 B, 3 B and 7 B parameters, streamed from disk.

    python bench/scale.py                                   # tinyllama-1.1b, 3b, llama-2-7b (~23 GB of disk)
    python bench/scale.py --shapes tinyllama-1.1b           # one shape
    python bench/scale.py --shapes tiny --runs 1            # seconds: a smoke test
    python bench/scale.py --compress                        # compress_checkpoint rows, in process and 2 workers
    python bench/scale.py --blockwise                       # block-wise allocate + GPTQ, 1.1 B (~15 min idle)
    python bench/scale.py --blockwise --shapes tiny --no-save   # seconds: a smoke test

The checkpoints are written once by `slc.synthetic.write_synthetic_checkpoint` into data/cache/synthetic/
(git-ignored; bf16 safetensors shards of 2 GB, TinyLlama / OpenLLaMA-3B / Llama-2-7B shapes, statistics like
SmolLM2's, no real weights) and reused by later runs. Each read row runs in a fresh child process that opens
the checkpoint with `slc.open_checkpoint` and reads every tensor once, converting it to fp32 and computing
its per-row absmax with one torch thread (so every byte is touched, as a compressor would), while a
background thread samples the RSS of the child's whole process tree every 10 ms.
Rows:
    read, cold   the checkpoint's files evicted from the page cache first (posix_fadvise DONTNEED), so the
                 disk is read; the first run of each shape
    read, warm   straight after, with whatever of the files the page cache kept (all, if they fit in RAM)
Columns:
    GB disk      bytes of tensor data (bf16) on disk          tensors   how many
    s            wall seconds of the read pass (median of --runs)
    GB/s         GB disk / s
    peak RSS     GiB, whole process tree, interpreter and torch included
    Δ RSS        peak RSS minus the RSS just before the first tensor was read
    /largest     peak RSS / fp32 bytes of the largest tensor (the streaming budget's unit: issue 11 asks
                 compress_checkpoint for <= 1 GiB + 4x this)
Later rows (issue 11): compress_checkpoint int8 + rANS and ECSQ, block-wise allocate + GPTQ, 2-worker Dask.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slc.sources import open_checkpoint  # noqa: E402
from slc.synthetic import SHAPES, write_synthetic_checkpoint  # noqa: E402

GiB = 1 << 30
CACHE = ROOT / "data" / "cache" / "synthetic"
RESULTS = ROOT / "bench" / "results" / "scale.md"
DEFAULT_SHAPES = ["tinyllama-1.1b", "3b", "llama-2-7b"]


class PeakRSS:
    """Peak RSS of a process and all its children, sampled in a background thread while in the `with`."""

    def __init__(self, pid: int | None = None, interval: float = 0.01):
        self.proc, self.interval = psutil.Process(pid), interval
        self.peak, self._stop = 0, threading.Event()

    def sample(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:                     # a child that just exited
                pass
        self.peak = max(self.peak, total)
        return total

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def evict(folder: Path) -> None:
    """Drop a checkpoint's files from the page cache (clean pages only; no root needed)."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_pass(folder: Path) -> dict:
    """Read and touch every tensor once (run in a child process); figures as a dict."""
    with PeakRSS() as rss:
        base = rss.sample()
        t0 = time.perf_counter()
        ckpt = open_checkpoint(folder)
        absmax_sum = 0.0
        for _, w in ckpt.stream():
            w = w.float()                            # what a compressor works on
            absmax_sum += w.abs_().amax(dim=-1).sum().item()
            del w
        seconds = time.perf_counter() - t0
    largest = ckpt.largest
    return {"seconds": seconds, "gb": ckpt.nbytes / 1e9, "tensors": len(ckpt), "peak": rss.peak, "base": base,
            "largest_fp32": largest.fp32_bytes, "largest": largest.name, "checksum": absmax_sum}


def measure(folder: Path, cold: bool) -> dict:
    if cold:
        evict(folder)
    out = subprocess.run([sys.executable, __file__, "--read-pass", str(folder)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(shape: str) -> tuple[Path, float | None]:
    folder = CACHE / shape
    cached = (folder / ".slc-synthetic.json").exists()
    t0 = time.perf_counter()
    folder = write_synthetic_checkpoint(folder, shape, progress=True)
    return folder, None if cached else time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=sorted(SHAPES))
    ap.add_argument("--runs", type=int, default=3, help="warm read passes per shape (median)")
    ap.add_argument("--read-pass", help=argparse.SUPPRESS)
    ap.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS.relative_to(ROOT)}")
    args = ap.parse_args()
    if args.read_pass:
        torch.set_num_threads(1)
        print(json.dumps(read_pass(Path(args.read_pass))))
        return

    rows = []
    for shape in args.shapes:
        need = SHAPES[shape].n_params * 2
        free = shutil.disk_usage(ROOT / "data").free
        if not (CACHE / shape / ".slc-synthetic.json").exists() and free < need + 20e9:
            print(f"skipping {shape}: {need / 1e9:.1f} GB to write, {free / 1e9:.1f} GB free (keeping 20 GB spare)")
            continue
        folder, build_s = build(shape)
        if build_s is not None:
            print(f"{shape}: wrote {need / 1e9:.2f} GB in {build_s:.0f} s ({need / 1e9 / build_s:.2f} GB/s)")
        cold = measure(folder, cold=True)
        warm = [measure(folder, cold=False) for _ in range(args.runs)]
        for mode, runs in [("cold", [cold]), ("warm", warm)]:
            r = runs[0]
            s = statistics.median(x["seconds"] for x in runs)
            peak = max(x["peak"] for x in runs)
            rows.append([shape, f"read, {mode}", f"{SHAPES[shape].n_params / 1e9:.2f}", f"{r['gb']:.2f}",
                         str(r["tensors"]), f"{s:.1f}", f"{r['gb'] / s:.2f}", f"{peak / GiB:.2f}",
                         f"{(peak - r['base']) / GiB:.2f}", f"{peak / r['largest_fp32']:.1f}",
                         "" if build_s is None or mode == "warm" else f"{build_s:.0f}"])
    header = ["shape", "row", "params B", "GB disk", "tensors", "s", "GB/s", "peak RSS GiB", "Δ RSS GiB",
              "/largest", "build s"]
    table = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])
    mem = psutil.virtual_memory().total / GiB
    note = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
            f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print(table)
    print(note)
    if not args.no_save and rows:
        old = RESULTS.read_text() if RESULTS.exists() else ""
        later = old[old.find("\n## ") + 1:] if "\n## " in old else ""        # keep the --compress section
        RESULTS.write_text(f"# bench/scale.py\n\n{table}\n\n{note}\n" + ("\n" + later if later else ""))


# ---------------------------------------------------------------------------- block-wise allocate + GPTQ rows

BLOCKWISE_RESULTS = ROOT / "bench" / "results" / "scale_blockwise.md"


class RandomTokens:
    """A stand-in tokenizer for synthetic checkpoints (they have none): `n` seeded random ids, whatever the text."""

    def __init__(self, vocab: int, n: int, seed: int = 0):
        self.vocab, self.n, self.seed = vocab, n, seed

    def __call__(self, text, return_tensors="pt"):
        from types import SimpleNamespace
        g = torch.Generator().manual_seed(self.seed)
        return SimpleNamespace(input_ids=torch.randint(0, self.vocab, (1, self.n), generator=g))


def blockwise_rows(shape: str = "tinyllama-1.1b", tokens: int = 256, budget: float = 4.5,
                   sensitivity: str = "fisher", device=None, progress: bool = True) -> list[list[str]]:
    """Block-wise allocate, then sequential GPTQ into an slc file, then streamed perplexity, in this process
    (a fresh interpreter): wall seconds and peak RSS of each step. Synthetic weights: time and memory only.

    The cost is set by the weights, not the calibration tokens: allocation sweeps ~32 ECSQ steps over every
    weight, GPTQ inverts one Hessian per layer (5632 x 5632 for down_proj at 1.1 B) and rounds every column;
    the forward / backward passes over `tokens` tokens are a small part."""
    from slc.blockwise import allocate_checkpoint, gptq_checkpoint, perplexity_streamed

    folder, _ = build(shape)
    tok = RandomTokens(SHAPES[shape].vocab, tokens)
    fp32 = SHAPES[shape].n_params * 4
    out = CACHE / f"{shape}.blockwise.slc.safetensors"
    rows = []
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        policy = allocate_checkpoint(folder, tok, budget, sensitivity=sensitivity, max_tokens=tokens, device=device,
                                     progress=progress)
        rows.append(["allocate", time.perf_counter() - t0, rss.peak, f"{policy.bits_per_weight:.3f}"])
        print(f"{shape}: allocate {rows[-1][1]:.0f} s, peak RSS {rss.peak / GiB:.2f} GiB", flush=True)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        report = gptq_checkpoint(folder, out, tok, policy, max_tokens=tokens, device=device, progress=progress)
        rows.append(["GPTQ (sequential) -> file", time.perf_counter() - t0, rss.peak,
                     f"{report.totals()['bits_per_weight']:.3f}"])
        print(f"{shape}: GPTQ {rows[-1][1]:.0f} s, peak RSS {rss.peak / GiB:.2f} GiB", flush=True)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        perplexity_streamed(out, RandomTokens(SHAPES[shape].vocab, 2 * tokens, seed=1), "x", device=device)
        rows.append(["perplexity, streamed", time.perf_counter() - t0, rss.peak, ""])
    gb_out = out.stat().st_size / 1e9
    out.unlink()
    threads = torch.get_num_threads()
    return [[shape, f"{tokens} tokens, {sensitivity}", name, f"{s:.0f}", f"{peak / GiB:.2f}", f"{peak / fp32:.2f}",
             bits, f"{gb_out:.2f}", str(threads)] for name, s, peak, bits in rows]


def blockwise_main() -> None:
    ap = argparse.ArgumentParser(description="block-wise allocate + GPTQ on a synthetic checkpoint")
    ap.add_argument("--blockwise", action="store_true")
    ap.add_argument("--shapes", nargs="+", default=["tinyllama-1.1b"], choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=256, help="calibration tokens (random ids)")
    ap.add_argument("--sensitivity", default="fisher", choices=["fisher", "output"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: GPTQ's column-by-column updates are small ops that two threads "
                         "slow down, and on a shared machine two spinning threads stall; the table says which)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r for shape in args.shapes for r in blockwise_rows(shape, args.tokens, sensitivity=args.sensitivity,
                                                               device=args.device)]
    header = ["shape", "calibration", "step", "s", "peak RSS GiB", "RSS / fp32 model", "bits/weight", "GB out",
              "threads"]
    table = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])
    note = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f} at the end, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"device {args.device or ('cuda' if torch.cuda.is_available() else 'cpu')}; {time.strftime('%Y-%m-%d')}")
    print(table)
    print(note)
    if not args.no_save:
        BLOCKWISE_RESULTS.write_text(f"# bench/scale.py --blockwise\n\n{table}\n\n{note}\n")


# ---------------------------------------------------------------------------- compress_checkpoint rows

COMPRESS_METHODS = {"int8+rANS": "entropy", "ECSQ 0.2": "ecsq"}
COMPRESS_SECTION = "## compress_checkpoint (`--compress`)"
COMPRESS_JSON = ROOT / "bench" / "results" / "scale_compress.json"     # every row measured so far


def compress_spec(method: str):
    from slc import LinearSpec, Quantizer
    return LinearSpec("entropy") if method == "int8+rANS" else LinearSpec("entropy", Quantizer(mode="ecsq", step=0.2))


class TreeRSS(PeakRSS):
    """PeakRSS that also keeps the peak of each process of the tree (a Dask worker's own peak)."""

    def sample(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self.per_process[p.pid] = max(self.per_process.get(p.pid, 0), rss)
            try:
                cpu = p.cpu_times()
                self.cpu[p.pid] = cpu.user + cpu.system            # last seen: a worker's total when it exits
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)
        return total

    def __enter__(self) -> TreeRSS:
        self.per_process, self.cpu = {}, {}
        return super().__enter__()


def compress_pass(shape: str, method: str, workers: int) -> dict:
    """compress_checkpoint of one synthetic checkpoint (run in a fresh child process); figures as a dict."""
    from slc.streaming import compress_checkpoint

    folder = CACHE / shape
    out = CACHE / f"{shape}.{method.replace(' ', '_').replace('+', '_')}.{workers}w.slc.safetensors"
    load0 = os.getloadavg()[0]
    with TreeRSS(interval=0.05) as rss:
        client = cluster = None
        if workers:
            from dask.distributed import Client, LocalCluster
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
            client = Client(cluster)
        t0 = time.perf_counter()
        report = compress_checkpoint(folder, out, compress_spec(method), client=client, resume=False, progress=False,
                                     errors=False)
        seconds = time.perf_counter() - t0
        if cluster is not None:
            client.close()
            cluster.close()
    s = report.summary()
    me = os.getpid()
    out.unlink()
    return {"seconds": seconds, "gb_in": s["gb_in"], "gb_out": s["gb_out"], "file_bpw": s["file_bits_per_weight"],
            "layer_bpw": report.totals()["bits_per_weight"], "peak": rss.peak,
            "max_process": max(rss.per_process.values()), "driver": rss.per_process.get(me, 0),
            "load": (load0 + os.getloadavg()[0]) / 2, "cpu_s": sum(rss.cpu.values())}


def compress_main() -> None:
    ap = argparse.ArgumentParser(description="compress_checkpoint rows on synthetic checkpoints")
    ap.add_argument("--compress", action="store_true")
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=sorted(SHAPES))
    ap.add_argument("--methods", nargs="+", default=list(COMPRESS_METHODS), choices=list(COMPRESS_METHODS))
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="0: in process; n: n-worker LocalCluster")
    ap.add_argument("--compress-pass", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--table-only", action="store_true", help="rewrite the section from scale_compress.json")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.compress_pass:
        torch.set_num_threads(1)
        shape, method, workers = args.compress_pass
        print(json.dumps(compress_pass(shape, method, int(workers))))
        return
    store = json.loads(COMPRESS_JSON.read_text()) if COMPRESS_JSON.exists() and not args.no_save else {}
    if args.table_only:
        write_compress_section(store)
        return
    for shape in args.shapes:
        build(shape)
        for method in args.methods:
            for workers in args.workers:
                out = subprocess.run([sys.executable, __file__, "--compress", "--compress-pass", shape, method,
                                      str(workers)], capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-3000:])
                    raise SystemExit(f"{shape} {method} {workers}: failed")
                store[f"{shape}|{method}|{workers}"] = json.loads(out.stdout.strip().splitlines()[-1])
                print(shape, method, workers, store[f"{shape}|{method}|{workers}"], flush=True)
                if not args.no_save:                     # after every row: a long run stopped early keeps its rows
                    COMPRESS_JSON.write_text(json.dumps(store, indent=1))
                    write_compress_section(store)
    print(compress_table(store))


def compress_table(store: dict) -> str:
    order = {s: i for i, s in enumerate(SHAPES)}
    rows = []
    for key in sorted(store, key=lambda k: (order[k.split("|")[0]], k.split("|")[1], int(k.split("|")[2]))):
        shape, method, workers = key.split("|")
        r, workers = store[key], int(workers)
        largest = max(math.prod(s) for _, s in SHAPES[shape].tensors()) * 4
        fp32 = SHAPES[shape].n_params * 4
        rows.append([shape, method, f"{workers} workers" if workers else "in process", f"{r['gb_in']:.2f}",
                     f"{r['gb_out']:.2f}", f"{r['layer_bpw']:.3f}", f"{r['file_bpw']:.3f}", f"{r['seconds']:.0f}",
                     f"{r['gb_in'] * 1e3 / r['seconds']:.1f}", f"{r['seconds'] / r['gb_in']:.1f}",
                     f"{r['peak'] / GiB:.2f}", f"{r['max_process'] / GiB:.2f}", f"{r['peak'] / fp32:.3f}",
                     f"{(GiB + 4 * largest) / GiB:.2f}", f"{r['load']:.1f}",
                     *([f"{r['cpu_s']:.0f}", f"{r['gb_in'] * 1e3 / r['cpu_s']:.1f}"] if "cpu_s" in r else ["", ""])])
    header = ["shape", "method", "mode", "GB in", "GB out", "bits/w layers", "bits/w file", "wall s", "MB/s in",
              "s/GB", "peak RSS GiB (tree)", "max process GiB", "peak / fp32 model", "budget GiB", "load avg",
              "CPU s", "MB / CPU s"]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


def write_compress_section(store: dict) -> None:
    """Replace the --compress section of bench/results/scale.md (the read rows above it stay)."""
    note = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / GiB:.0f} GiB RAM, torch {torch.__version__}, one torch thread per "
            f"process; {time.strftime('%Y-%m-%d')}")
    section = f"{COMPRESS_SECTION}\n\n{compress_table(store)}\n\n{note}\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# bench/scale.py\n"
    head, found, rest = text.partition(COMPRESS_SECTION)
    nxt = rest.find("\n## ") if found else -1
    rest = rest[nxt + 1:] if nxt >= 0 else ""
    RESULTS.write_text(head.rstrip("\n") + "\n\n" + section + ("\n" + rest if rest else ""))


if __name__ == "__main__":
    if "--blockwise" in sys.argv:
        blockwise_main()
    elif "--compress" in sys.argv:
        compress_main()
    else:
        main()

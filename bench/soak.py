"""Soak: compress, save, load and decode a real layer thousands of times in one process, watching RSS;
then decode many streams at once from threads and check every result.

    python bench/soak.py                      # 2000 iterations, 4 threads (what `make soak` runs)
    python bench/soak.py --iterations 300     # quicker

Phase 1, leaks. One iteration takes the first attention query weight of all-MiniLM-L6-v2 (384 x 384,
fp32) through the whole life of a stored layer:
    compress   CompressedLinear.from_linear(LinearSpec("entropy"))  and  CompressedTensor.compress
    save       the layer's state_dict + JSON metadata to safetensors through integrity.atomic_write,
               and the tensor's to_bytes()
    load       load_file + CompressedLinear.from_meta + load_state_dict(assign=True) + validate_loaded,
               and CompressedTensor.from_bytes
    decode     weight_dense() and decompress(), each checked bit for bit against the quantiser
RSS is sampled every --every iterations. After a warm-up (the first 10 %: allocator pools, numba and
torch caches fill), RSS must plateau: the last sample may exceed the warm-up one by at most --slack-mb.

Phase 2, threads. Every linear weight of MiniLM is quantised and rANS-coded (37 streams, 10.8 M
symbols); --threads threads then decode them all --rounds times, fast (numba, GIL released) and NumPy
backends mixed, and every result must equal the original symbols. Then the same threads run forward
passes of entropy layers sharing one small DecodeCache (constant evictions) and every output must be
the single-threaded one; and they hammer one DecodeCache with get/put directly, where nothing may
raise and its byte count must stay true.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from slc import rans  # noqa: E402
from slc.integrity import atomic_write  # noqa: E402
from slc.models import linear_weights  # noqa: E402
from slc.nn import CompressedLinear, DecodeCache, LinearSpec, validate_loaded  # noqa: E402
from slc.quant import Quantizer  # noqa: E402
from slc.tensor import CompressedTensor  # noqa: E402

LAYER = "encoder.layer.0.attention.self.query.weight"


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def one_life(lin: nn.Linear, w: torch.Tensor, ref: torch.Tensor, folder: Path) -> None:
    """compress -> save -> load -> decode, twice (layer and tensor); raise if anything is not exact."""
    layer = CompressedLinear.from_linear(lin, LinearSpec("entropy"))
    path = folder / "layer.safetensors"
    state = {k: v.contiguous() for k, v in layer.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"slc": json.dumps(layer.export_meta())}))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["slc"])
    back = CompressedLinear.from_meta(meta)
    back.load_state_dict(load_file(str(path)), assign=True)
    validate_loaded(back)
    if not torch.equal(back.weight_dense(), ref):
        raise AssertionError("the reloaded layer decodes to a different weight")

    data = CompressedTensor.compress(w).to_bytes()
    (folder / "tensor.slc").write_bytes(data)
    if not torch.equal(CompressedTensor.from_bytes((folder / "tensor.slc").read_bytes()).decompress(), ref):
        raise AssertionError("the reloaded tensor decodes to a different weight")


def leak_phase(iterations: int, every: int, slack_mb: float, folder: Path) -> dict:
    w = linear_weights("minilm-l6")[LAYER].float()
    lin = nn.Linear(w.shape[1], w.shape[0], bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
    ref = Quantizer().quantize(w).dequantize()
    warmup = max(1, iterations // 10)
    samples = [(0, rss_mb())]
    print(f"phase 1: {iterations} x compress/save/load/decode of {LAYER} {tuple(w.shape)}")
    print(f"{'iteration':>10} {'RSS MiB':>9} {'s/iter':>8}")
    t0 = time.perf_counter()
    t_last = t0
    for i in range(1, iterations + 1):
        one_life(lin, w, ref, folder)
        if i % every == 0 or i == warmup or i == iterations:
            now = time.perf_counter()
            samples.append((i, rss_mb()))
            print(f"{i:>10} {samples[-1][1]:>9.1f} {(now - t_last) / every:>8.4f}", flush=True)
            t_last = now
    base = next(r for i, r in samples if i >= warmup)
    after = [r for i, r in samples if i >= warmup]
    growth = samples[-1][1] - base
    print(f"RSS after warm-up ({warmup} it.): {base:.1f} MiB; at the end: {samples[-1][1]:.1f} MiB "
          f"(+{growth:.1f}); max after warm-up {max(after):.1f} MiB; {time.perf_counter() - t0:.0f} s")
    return {"samples": samples, "base": base, "growth": growth, "ok": growth <= slack_mb}


def thread_phase(threads: int, rounds: int) -> dict:
    weights = linear_weights("minilm-l6")
    syms = [Quantizer().quantize(w).symbols() for w in weights.values()]
    streams = [rans.encode_stream(s) for s in syms]
    blobs = [s.to_bytes() for s in streams]
    jobs = [(i, backend) for _ in range(rounds) for i in range(len(streams))
            for backend in ("fast",) * 3 + ("numpy",)]
    print(f"phase 2: {len(jobs)} decodes of {len(streams)} streams ({sum(s.size for s in syms) / 1e6:.1f} M symbols) "
          f"on {threads} threads")
    bad = []

    def decode(job):
        i, backend = job
        out = rans.decode(blobs[i], backend=backend) if backend == "numpy" else rans.decode_stream(streams[i])
        if not np.array_equal(out, syms[i]):
            bad.append(job)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, jobs))
    took = time.perf_counter() - t0
    print(f"  {len(jobs) - len(bad)}/{len(jobs)} exact in {took:.1f} s")

    # forward passes of entropy layers sharing one DecodeCache that holds ~2 of them
    names = [n for n in weights if "attention" in n][:8]
    layers = []
    cache = DecodeCache(max_bytes=2 * 384 * 384)
    for n in names:
        w = weights[n]
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w)
        layers.append(CompressedLinear.from_linear(lin, LinearSpec("entropy", cache=cache)))
    x = torch.randn(4, 384, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = [layer(x) for layer in layers]
    errors, wrong = [], []
    lock = threading.Lock()

    def forward(k):
        try:
            with torch.no_grad():
                y = layers[k % len(layers)](x)
            if not torch.equal(y, expect[k % len(layers)]):
                with lock:
                    wrong.append(k)
        except Exception as e:                                   # noqa: BLE001 - reported, not hidden
            with lock:
                errors.append(f"{type(e).__name__}: {e}")

    n_fwd = rounds * 400
    t0 = time.perf_counter()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)                                  # switch threads often: races show up sooner
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(forward, range(n_fwd)))
    finally:
        sys.setswitchinterval(interval)
    print(f"  shared DecodeCache: {n_fwd - len(wrong) - len(errors)}/{n_fwd} forwards exact in "
          f"{time.perf_counter() - t0:.1f} s; {len(errors)} raised"
          + (f" (first: {errors[0]})" if errors else "") + f"; {cache!r}")
    cache_errors, drift = cache_contention(threads)
    return {"decodes": len(jobs), "bad": bad, "forwards": n_fwd, "wrong": wrong, "errors": errors,
            "cache_errors": cache_errors, "ok": not bad and not wrong and not errors and not cache_errors and not drift}


def cache_contention(threads: int, ops: int = 20_000) -> tuple[list, int]:
    """DecodeCache.get/put from many threads at once, as concurrent forwards do, with nothing else to
    dilute the races: nothing may raise, and its byte count must match what it holds."""
    cache = DecodeCache(max_bytes=3000)
    items = [torch.zeros(1000, dtype=torch.int8) for _ in range(2 * threads)]
    errors = []

    def work(k):
        try:
            for i in range(ops):
                key = (i + k) % len(items)
                if cache.get(key) is None:
                    cache.put(key, items[key])
        except Exception as e:                                   # noqa: BLE001 - reported
            errors.append(f"{type(e).__name__}: {e}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    held = sum(v.numel() for v in (cache.get(k) for k in range(len(items))) if v is not None)
    drift = cache.nbytes - held
    print(f"  DecodeCache contention: {threads} threads x {ops} get/put: {len(errors)} raised"
          + (f" (first: {errors[0]})" if errors else "") + f"; byte count off by {drift}")
    return errors, drift


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=2000, help="phase 1 iterations (default 2000)")
    p.add_argument("--every", type=int, default=0, help="sample RSS every N iterations (default iterations/20)")
    p.add_argument("--slack-mb", type=float, default=24.0, help="allowed RSS growth after warm-up (default 24)")
    p.add_argument("--threads", type=int, default=4, help="phase 2 threads (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="phase 2: decode every stream this many times (default 3)")
    p.add_argument("--folder", type=Path, default=ROOT / "build" / "soak", help="where the files go")
    args = p.parse_args(argv)
    torch.set_num_threads(1)                                     # the threads are ours
    args.folder.mkdir(parents=True, exist_ok=True)
    every = args.every or max(1, args.iterations // 20)
    leak = leak_phase(args.iterations, every, args.slack_mb, args.folder)
    threads = thread_phase(args.threads, args.rounds)
    print(f"soak: RSS growth after warm-up {leak['growth']:+.1f} MiB (limit {args.slack_mb}) -> "
          f"{'plateau' if leak['ok'] else 'LEAK?'}; threads -> {'all exact' if threads['ok'] else 'FAILED'}")
    return 0 if leak["ok"] and threads["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

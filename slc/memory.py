"""Memory: resident set size (RSS), bytes held per storage kind, and mmap vs in-RAM.

Read me first: what RSS does and does not tell you
    RSS counts the pages of a process that sit in RAM right now. Two kinds matter here:
      anonymous    memory the process allocated (torch tensors it created or copied);
      file-backed  pages of a memory-mapped file (safetensors is read through mmap).
    A mapped file costs *nothing* in RSS until its pages are read; reading every weight once
    (any forward pass does) brings the whole file in. So "model A loaded by mmap, nothing
    touched yet" against "model B copied into RAM" compares an empty promise with a paid bill:
    an earlier low-rank prototype (rank-128 fp32 SVD factors of GPT-Neo-1.3B) did exactly that:
    139.7 MB RSS for the mmap'd, unread original against 191.8 MB for its compressed model held in
    RAM, reported as a "+37 %" increase. Measure
    both sides the same way: both after every tensor has been read (`touch=True`), and show
    the anonymous / file-backed split (Linux `/proc/self/status`) so the difference is visible.
    File-backed pages can be dropped by the kernel and read again later; anonymous ones cannot
    (there is no swap on most of these machines).

Clean measurements run in a fresh process
    Inside a long-lived process (a notebook kernel) freed memory often stays with the
    allocator, and imports already done hide their own cost, so an in-process RSS delta is
    noisy. `measure_load` and `measure_safetensors` therefore start a fresh Python process
    (`sys.executable`) for every measurement: it imports torch and transformers, records its
    baseline RSS, runs the loader, reads every tensor, records RSS again, and exits. The loader
    goes to the child by pickle over a pipe, so it must be importable: a module-level function
    or `functools.partial(slc.load_compressed, path)`, not a lambda or a notebook-defined function.
    `rss_delta` is the quick in-process helper for exploration.
"""
from __future__ import annotations

import gc
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

MB = 1 << 20
PREIMPORT = ("torch", "transformers", "safetensors.torch", "slc")


# --- RSS -----------------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident set size of this process in bytes, after a `gc.collect()`."""
    gc.collect()
    return psutil.Process().memory_info().rss


def rss_breakdown() -> dict:
    """{'rss', 'anon', 'file'} in bytes after gc; 'anon'/'file' are None where /proc is missing."""
    gc.collect()
    out = {"rss": psutil.Process().memory_info().rss, "anon": None, "file": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    out[key[3:].lower()] = int(value.split()[0]) * 1024        # kB -> bytes
    except OSError:
        pass
    return out


def rss_delta(fn, *args, **kwargs) -> tuple[object, int]:
    """Run fn(*args, **kwargs) here and return (its result, RSS growth in bytes).

    In-process, so it is only indicative (see the module docstring); keep the result alive
    while you look at the number, or the memory is freed again.
    """
    before = rss_bytes()
    result = fn(*args, **kwargs)
    return result, rss_bytes() - before


# --- bytes held, by storage kind -----------------------------------------------------------------

KINDS = ("dense fp32", "dense fp16", "dense bf16", "int8 codes", "entropy-coded",
         "low-rank factors", "scales", "other")
_ENTROPY_NAMES = ("words", "states", "freqs")


def _kind_of(owner: torch.nn.Module, leaf: str, t: torch.Tensor) -> str:
    storage = getattr(owner, "kind", None) if type(owner).__name__ == "CompressedLinear" else None
    if leaf != "bias":
        if "scale" in leaf or "zero_point" in leaf:
            return "scales"
        if storage == "entropy" or leaf in _ENTROPY_NAMES:
            return "entropy-coded"
        if storage == "lowrank":
            return "low-rank factors"
        if t.dtype in (torch.int8, torch.uint8):
            return "int8 codes"
    return {torch.float32: "dense fp32", torch.float16: "dense fp16",
            torch.bfloat16: "dense bf16"}.get(t.dtype, "other")


def tensor_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters + buffers by storage kind, plus 'total'.

    Kinds: dense fp32/fp16/bf16 (ordinary weights, embeddings, norms, biases), int8 codes (one
    byte per element; 2..4-bit codes packed two per byte land here too), entropy-coded (rANS
    words, states, tables), low-rank factors (S and the factors, float or codes), scales (+ zero
    points, also those of low-rank factors), other.
    Tensors that share memory (tied embeddings, the same tensor registered twice) count once.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"tensor_bytes needs a torch.nn.Module, got {type(module).__name__}")
    out = {k: 0 for k in KINDS}
    seen = set()
    for _, owner in module.named_modules():
        items = list(owner.named_parameters(recurse=False)) + list(owner.named_buffers(recurse=False))
        for leaf, t in items:
            if t is None:
                continue
            nbytes = t.numel() * t.element_size()
            key = (t.data_ptr(), nbytes) if t.device.type != "meta" and t.data_ptr() else ("id", id(t))
            if key in seen:
                continue
            seen.add(key)
            out[_kind_of(owner, leaf, t)] += nbytes
    out = {k: v for k, v in out.items() if v}
    out["total"] = sum(out.values())
    return out


# --- clean measurements in a fresh process -------------------------------------------------------

def touch_all(obj) -> int:
    """Read every tensor of a module / dict / list once (brings mmap'd pages in); return bytes read."""
    if isinstance(obj, torch.Tensor):
        tensors = [obj]
    elif isinstance(obj, torch.nn.Module):
        tensors = list(obj.parameters()) + list(obj.buffers())
    elif isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
    elif isinstance(obj, (list, tuple)):
        tensors = [v for v in obj if isinstance(v, torch.Tensor)]
    else:
        tensors = []
        for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
    n = 0
    with torch.inference_mode():
        for t in tensors:
            if t.numel() and t.device.type != "meta":
                t = t.detach()
                t.any() if t.dtype == torch.bool else t.amax()     # reads every element, allocates nothing big
                n += t.numel() * t.element_size()
    return n


def _child() -> None:
    """Entry point of the measuring process: read the job from stdin, print one JSON line."""
    import importlib

    payload = sys.stdin.buffer.read()
    preimport, fn, touch, then, warmup = pickle.loads(payload)     # unpickling imports fn's module
    for name in preimport:
        importlib.import_module(name)
    if warmup is not None:                                          # e.g. import a model class's code
        warmup()
    base = rss_breakdown()
    t0 = time.perf_counter()
    result = fn()
    load_s = time.perf_counter() - t0
    loaded = rss_breakdown()
    touched_bytes = touch_all(result) if touch else 0
    after = rss_breakdown()
    out = {"load_s": load_s, "touched_bytes": touched_bytes,
           "rss_base": base["rss"], "rss_loaded": loaded["rss"], "rss_after": after["rss"],
           "growth": after["rss"] - base["rss"], "growth_before_touch": loaded["rss"] - base["rss"],
           "anon_growth": None if base["anon"] is None else after["anon"] - base["anon"],
           "file_growth": None if base["file"] is None else after["file"] - base["file"]}
    if then is not None:
        t0 = time.perf_counter()
        extra = then(result)
        out["then_s"] = time.perf_counter() - t0
        out["growth_after_then"] = rss_breakdown()["rss"] - base["rss"]
        if isinstance(extra, dict):
            out.update(extra)
    print("SLC_MEASURE " + json.dumps(out), flush=True)


def _check_importable(obj) -> None:
    inner = getattr(obj, "func", obj)                     # functools.partial -> its function
    if obj is not None and getattr(inner, "__module__", None) == "__main__":
        raise TypeError(f"{getattr(inner, '__name__', inner)!r} is defined in __main__ (a script or notebook), "
                        "which the measuring process cannot import: move it into a module, or use "
                        "functools.partial(slc.load_compressed, path) / slc.memory.load_pretrained")


def load_pretrained(folder, causal: bool = True, dtype: torch.dtype = torch.float32):
    """A transformers model from a folder, fp32, eval mode (a picklable loader for measure_load)."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal else AutoModel
    return cls.from_pretrained(str(folder), dtype=dtype).eval()


def forward_once(model, n_tokens: int = 64) -> dict:
    """One forward pass over `n_tokens` fixed token ids (a picklable `then` for measure_load)."""
    ids = torch.arange(n_tokens).remainder(100).add(10).unsqueeze(0)        # (1, T) plain ids
    with torch.inference_mode():
        model(ids)
    return {}


def measure_load(fn, touch: bool = True, then=None, preimport=PREIMPORT, warmup=None,
                 timeout: float = 600) -> dict:
    """RSS growth of running the loader `fn()` in a fresh Python process; a dict of figures.

    `fn` must be picklable by reference (module-level function or functools.partial of one).
    The child imports `preimport` and runs `warmup()` *before* its baseline, so import costs do
    not count; then it times fn(), reads every tensor of the result when `touch` (so mmap'd
    weights are paid for), and reports bytes: growth (total), anon_growth, file_growth,
    growth_before_touch, plus load_s. `then(result)` (optional, picklable) runs afterwards, e.g.
    one forward pass; its seconds and the RSS growth after it come back too, and a dict it
    returns is merged into the figures.
    """
    for obj in (fn, then, warmup):
        _check_importable(obj)
    try:
        payload = pickle.dumps((tuple(preimport), fn, touch, then, warmup))
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise TypeError("measure_load runs fn in a fresh process, so fn (and then, warmup) must be "
                        "importable: use a module-level function or functools.partial(slc.load_compressed, "
                        f"path), not a lambda or a function defined in a notebook ({e})") from None
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", "import slc.memory as m; m._child()"],
                         input=payload, capture_output=True, env=env, timeout=timeout)
    lines = [ln for ln in res.stdout.decode(errors="replace").splitlines() if ln.startswith("SLC_MEASURE ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"the measuring process failed (exit {res.returncode}):\n"
                           f"{res.stderr.decode(errors='replace')[-3000:]}")
    return json.loads(lines[-1].removeprefix("SLC_MEASURE "))


# --- mmap vs in RAM, on one safetensors file -----------------------------------------------------

def open_mmap(path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, memory-mapped (safetensors' default): nothing read yet."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load_in_ram(path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file copied into anonymous memory (the mapping is dropped)."""
    return {k: v.clone() for k, v in open_mmap(path).items()}


def measure_safetensors(path) -> list[dict]:
    """One safetensors file loaded three ways, each in a fresh process: rows of RSS growth (MB).

        mmap, untouched        tensors mapped, no page read: looks free, is not
        mmap, all pages read   what any forward pass leads to: RSS grows by ~the file size (file-backed)
        copied into RAM        the same bytes as anonymous memory

    The last two are the fair comparison; the first is the mistake that made an earlier low-rank
    prototype report its compressed model as 37 % larger in memory than the original.
    """
    import functools

    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; pass e.g. "
                         "slc.models.model_dir('minilm-l6') / 'model.safetensors'")
    size = path.stat().st_size
    rows = []
    for label, fn, touch in (("mmap, untouched", open_mmap, False),
                             ("mmap, all pages read", open_mmap, True),
                             ("copied into RAM", load_in_ram, True)):
        r = measure_load(functools.partial(fn, path), touch=touch, preimport=("torch", "safetensors.torch"))
        rows.append({"mode": label, "file_mb": size / MB, "rss_growth_mb": r["growth"] / MB,
                     "anon_mb": (r["anon_growth"] or 0) / MB, "file_backed_mb": (r["file_growth"] or 0) / MB,
                     "growth_vs_file": r["growth"] / size, "load_s": r["load_s"]})
    return rows

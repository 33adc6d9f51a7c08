"""Coverage-guided fuzzing of every parser a shared file reaches: rANS streams, CompressedTensor bytes
(affine, ecsq and lossless) and whole model files.

    python bench/fuzz.py --seconds 600            # atheris (libFuzzer); what `make fuzz` runs
    python bench/fuzz.py --loop --seconds 20      # no atheris: random mutations of the seeds, in-process

The property, for every input: it decodes, or it raises slc.FormatError. Anything else is a crash:
another exception, backends that disagree on the same stream (fast vs NumPy vs torch), an input
running longer than --timeout seconds, or the process growing past --rss-mb. Each crash is written
to .fuzz/crashes/ and counted once per signature (exception type + innermost slc frame); the run
goes on. It prints the inputs tried and the crashes found, and exits 1 if there was any.

An input is a selector byte + payload. (selector & 3) picks the parser (modulo the --targets); selector bit 2 asks the
harness to recompute the CRC32s before parsing (the stream's, and for a tensor every embedded
stream's and the outer one), so the fuzzer gets past the checksums to the fields behind them:
without that almost every mutation stops at "CRC32 mismatch".

What is bounded and what is not, on purpose: decoding costs time and memory linear in the number
of symbols a stream declares (<= 2**31; a tensor's shape declares the same number). A constant
tensor codes to almost nothing, so a few bytes can legitimately declare 4 GiB of codes. The harness
therefore decodes streams and tensors declaring <= 2**22 symbols and only parses larger ones.

atheris instruments Python bytecode, and numba cannot compile instrumented bytecode, so instead of
`atheris.instrument_imports()` the slc modules are imported plain (their numba kernels compile or
load from cache as usual) and then every pure-Python function and method of slc is instrumented
in place with `atheris.instrument_func`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import types
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FUZZ_DIR = ROOT / ".fuzz"
TARGETS = ("stream", "tensor", "model")
ENABLED = list(TARGETS)      # --targets narrows it; an input's selector picks among these
FIX_CRC = 4
DECODE_CAP = 1 << 22        # decode streams / tensors declaring at most this many symbols; parse the rest
STEP_CAP = 2048             # compare with the NumPy and torch decoders when n / lanes <= this


# --- seeds ---------------------------------------------------------------------------------------

def make_seeds() -> list[bytes]:
    """Valid inputs for every enabled target: streams of several shapes, tensors of every kind, a model file."""
    return [bytes([ENABLED.index(kind)]) + payload for kind, payload in _seed_payloads() if kind in ENABLED]


def _seed_payloads() -> list[tuple[str, bytes]]:
    import numpy as np
    import torch
    from slc import rans
    from slc.lossless import LosslessTensor
    from slc.checkpoint import save_compressed
    from slc.compress import compress_model
    from slc.models import tiny_model
    from slc.nn import LinearSpec
    from slc.quant import Quantizer
    from slc.tensor import CompressedTensor

    rng = np.random.default_rng(0)
    seeds = []
    for n, k, lanes in [(0, 1, None), (1, 1, None), (7, 3, 2), (300, 40, 4), (3000, 256, None), (40000, 5, None)]:
        sym = rng.integers(0, k, n).astype(np.uint16)
        seeds.append(("stream", rans.encode(sym, lanes=lanes)))
    sparse = (rng.integers(0, 4, 500) * 977).astype(np.uint16)                  # a sparse table
    seeds.append(("stream", rans.encode(sparse)))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 24, generator=g)
    for q in [Quantizer(), Quantizer(bits=4, scheme="asymmetric", granularity="group", group_size=8),
              Quantizer(granularity="tensor"), Quantizer(mode="ecsq", step=0.2)]:
        seeds.append(("tensor", CompressedTensor.compress(w, q).to_bytes()))
    seeds.append(("tensor", CompressedTensor.compress(w.half(), predictor="left").to_bytes()))
    seeds.append(("tensor", LosslessTensor.compress(w.to(torch.bfloat16)).to_bytes()))
    if "model" not in ENABLED:
        return seeds
    model = tiny_model("gpt2")
    compress_model(model, {"*.attn.*": LinearSpec("entropy"), "*": LinearSpec()}, progress=False)
    with tempfile.TemporaryDirectory() as d:
        seeds.append(("model", save_compressed(model, Path(d) / "m.safetensors").read_bytes()))
    return seeds


def fix_crcs(kind: str, payload: bytes) -> bytes:
    """Recompute the checksums the parser checks first, so mutations reach the fields behind them."""
    if kind == "stream":
        return _fix_stream(payload)
    if kind != "tensor" or len(payload) < 13:
        return payload
    out = bytearray(payload)
    (hlen,) = struct.unpack_from("<I", out, 5)
    pos, end = 9 + hlen, len(out) - 4
    while pos + 4 <= end:                                   # length-prefixed sections; streams start with SLCR
        (n,) = struct.unpack_from("<I", out, pos)
        pos += 4
        if pos + n > end:
            break
        if out[pos:pos + 4] == b"SLCR":
            out[pos:pos + n] = _fix_stream(bytes(out[pos:pos + n]))
        pos += n
    return bytes(out[:-4]) + struct.pack("<I", zlib.crc32(bytes(out[:-4])))


def _fix_stream(b: bytes) -> bytes:
    return b[:-4] + struct.pack("<I", zlib.crc32(b[:-4])) if len(b) >= 4 else b


# --- the property --------------------------------------------------------------------------------

class Mismatch(AssertionError):
    """Two decoders disagree on the same input (a crash, unlike FormatError)."""


def _outcome(fn):
    from slc.errors import FormatError
    try:
        return fn()
    except FormatError:
        return FormatError


def check_stream(payload: bytes) -> None:
    import numpy as np
    from slc import rans
    from slc.errors import FormatError
    s = rans.RansStream.from_bytes(payload)
    if s.n_symbols > DECODE_CAP:
        return
    fast = _outcome(lambda: rans.decode_stream(s, backend="fast"))
    if fast is not FormatError and len(fast) != s.n_symbols:
        raise Mismatch(f"decoded {len(fast)} symbols, header says {s.n_symbols}")
    if -(-s.n_symbols // s.lanes) > STEP_CAP:
        return
    ref = _outcome(lambda: rans.decode_stream(s, backend="numpy"))
    tor = _outcome(lambda: rans.decode(payload, backend="torch"))
    for name, other in (("numpy", ref), ("torch", tor if tor is FormatError else tor.numpy())):
        if (fast is FormatError) != (other is FormatError) or \
                (fast is not FormatError and not np.array_equal(fast, other.astype(np.uint16))):
            raise Mismatch(f"fast and {name} decoders disagree on a stream of {s.n_symbols} symbols "
                           f"({'FormatError' if fast is FormatError else 'decoded'} vs "
                           f"{'FormatError' if other is FormatError else 'decoded'})")


def check_tensor(payload: bytes) -> None:
    import torch
    from slc.tensor import CompressedTensor
    ct = CompressedTensor.from_bytes(payload)
    shape = tuple(ct.original_shape)
    n = 1
    for d in shape:
        n *= d
    if n > DECODE_CAP:
        return
    w = ct.decompress()
    if tuple(w.shape) != shape:
        raise Mismatch(f"decompressed shape {tuple(w.shape)} != header shape {shape}")
    if isinstance(ct, CompressedTensor):
        w2 = ct.decompress(backend="torch")
        if not torch.equal(torch.nan_to_num(w.float()), torch.nan_to_num(w2.float())):
            raise Mismatch("numba and torch decoders disagree on a tensor")


_MODEL_PATH = None


def check_model(payload: bytes) -> None:
    import torch
    from slc.checkpoint import load_compressed
    global _MODEL_PATH
    if _MODEL_PATH is None:
        _MODEL_PATH = Path(tempfile.mkdtemp(prefix="slc-fuzz-")) / "m.safetensors"
    _MODEL_PATH.write_bytes(payload)
    model = load_compressed(_MODEL_PATH)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))          # decodes every entropy layer


CHECKS = {"stream": check_stream, "tensor": check_tensor, "model": check_model}


def run_one(data: bytes) -> None:
    """The fuzz target: returns if the input decodes or raises FormatError; raises anything else."""
    from slc.errors import FormatError
    if not data:
        return
    kind = ENABLED[(data[0] & 3) % len(ENABLED)]
    payload = data[1:]
    if data[0] & FIX_CRC:
        payload = fix_crcs(kind, payload)
    try:
        CHECKS[kind](payload)
    except FormatError:
        pass


def signature(exc: BaseException) -> str:
    """Exception type + the innermost frame inside slc (or the innermost frame at all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/slc/" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {where}"


class Recorder:
    """Counts inputs, saves each crashing input, and keeps one line per crash signature."""

    def __init__(self, crash_dir: Path, stats: Path | None = None):
        self.crash_dir, self.stats = crash_dir, stats
        self.inputs, self.crashes, self.signatures = 0, 0, {}
        self.exceptions = []                                 # every crash (loop mode: for tests to inspect)
        self._last_flush = 0.0
        crash_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, data: bytes) -> None:
        self.inputs += 1
        try:
            run_one(data)
        except Exception as e:                               # noqa: BLE001 - anything but FormatError is a crash
            self.crashes += 1
            if self.stats is None:
                self.exceptions.append(e)
            sig = signature(e)
            name = f"crash-{hashlib.sha1(data).hexdigest()[:16]}"
            (self.crash_dir / name).write_bytes(data)
            if sig not in self.signatures:
                self.signatures[sig] = f"{name}: {type(e).__name__}: {str(e)[:200]}"
                print(f"\nCRASH {sig}: {str(e)[:200]} -> {self.crash_dir / name}", file=sys.stderr, flush=True)
        if self.stats is not None and time.monotonic() - self._last_flush > 0.5:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        tmp = self.stats.with_suffix(".tmp")
        tmp.write_text(json.dumps({"inputs": self.inputs, "crashes": self.crashes, "signatures": self.signatures}))
        os.replace(tmp, self.stats)


# --- loop mode: no atheris -------------------------------------------------------------------------

INTERESTING_U32 = (0, 1, 2, 255, 256, 4096, 65535, 65536, 1 << 31, (1 << 31) + 1, (1 << 32) - 1)


JSON_SKIP: set = set()        # top-level metadata keys mutate_model_json leaves alone (tests: {"config"})


def _mutate_json(rng: random.Random, obj, depth: int = 0):
    """Replace one value somewhere in a JSON tree by an edge case (or drop a key)."""
    keys = [k for k in obj if depth or k not in JSON_SKIP] if isinstance(obj, dict) else []
    if keys and (depth < 2 or rng.random() < 0.7):
        k = rng.choice(keys)
        if rng.random() < 0.1:
            del obj[k]
        else:
            obj[k] = _mutate_json(rng, obj[k], depth + 1)
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.7:
        i = rng.randrange(len(obj))
        obj[i] = _mutate_json(rng, obj[i], depth + 1)
        return obj
    return rng.choice([0, -1, 1, 3, 2**31, 2**63, 1e308, -0.5, float("nan"), True, None, "", "x" * 3,
                       "float16", "int8", "entropy", [], {}, [1, 2], [[[[]]]], obj, obj])


def mutate_model_json(rng: random.Random, payload: bytes) -> bytes:
    """A model file with one value of its slc metadata changed, re-wrapped as valid safetensors."""
    try:
        (n,) = struct.unpack_from("<Q", payload, 0)
        head = json.loads(payload[8:8 + n])
        meta = json.loads(head["__metadata__"]["slc"])
    except Exception:                                       # noqa: BLE001 - not a mutable model file
        return payload
    head["__metadata__"]["slc"] = json.dumps(_mutate_json(rng, meta))
    new = json.dumps(head).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + payload[8 + n:]


def mutate(rng: random.Random, seed: bytes) -> bytes:
    """A few random edits, biased towards the first 64 bytes (headers), usually with CRC fix-up."""
    sel, payload = seed[0], bytearray(seed[1:])
    if ENABLED[(sel & 3) % len(ENABLED)] == "model" and rng.random() < 0.6:
        return bytes([sel]) + mutate_model_json(rng, bytes(payload))
    for _ in range(rng.randint(1, 4)):
        if not payload:
            break
        i = rng.randrange(min(len(payload), 64)) if rng.random() < 0.5 else rng.randrange(len(payload))
        op = rng.randrange(7)
        if op == 0:
            payload[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            payload[i] = rng.randrange(256)
        elif op == 2:
            payload[i] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 3:
            del payload[rng.randrange(len(payload)):]
        elif op == 4:
            payload[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 5 and i + 4 <= len(payload):
            payload[i:i + 4] = struct.pack("<I", rng.choice(INTERESTING_U32))
        elif op == 6:
            j = rng.randrange(len(payload))
            payload[i:i + rng.randint(1, 16)] = payload[j:j + rng.randint(1, 16)]
    sel = (sel & 3) | (FIX_CRC if rng.random() < 0.75 else 0)
    return bytes([sel]) + bytes(payload)


def loop(seconds: float, seed: int = 0, crash_dir: Path | None = None, quiet: bool = False) -> Recorder:
    """Mutate the seeds at random for `seconds`, in this process. Returns the Recorder (inputs, crashes)."""
    rng = random.Random(seed)
    seeds = make_seeds()
    rec = Recorder(crash_dir or FUZZ_DIR / "crashes")
    for s in seeds:                                          # the seeds themselves must pass
        rec(s)
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        rec(mutate(rng, rng.choice(seeds)))
    if not quiet:
        print(f"loop: {rec.inputs} inputs in {seconds:.0f} s, {rec.crashes} crashes "
              f"({len(rec.signatures)} distinct)")
    return rec


# --- atheris mode ------------------------------------------------------------------------------------

def instrument_slc() -> int:
    """Instrument every pure-Python function and method of the imported slc modules (not numba kernels)."""
    import atheris
    done = 0

    def visit(obj, module):
        nonlocal done
        if isinstance(obj, (classmethod, staticmethod)):
            obj = obj.__func__
        if isinstance(obj, property):
            for f in (obj.fget, obj.fset):
                visit(f, module)
            return
        if isinstance(obj, types.FunctionType) and obj.__module__ == module:
            atheris.instrument_func(obj)
            done += 1

    for name, mod in list(sys.modules.items()):
        if not (name == "slc" or name.startswith("slc.")) or mod is None:
            continue
        for obj in list(vars(mod).values()):
            if isinstance(obj, type) and obj.__module__ == name:
                for attr in list(vars(obj).values()):
                    visit(attr, name)
            else:
                visit(obj, name)
    return done


def child(args, libfuzzer_args: list[str]) -> None:
    """Inside the libFuzzer process: import plain, warm the kernels, instrument, fuzz."""
    import atheris
    import slc.lossless  # noqa: F401  (every parser a file can reach, imported before instrumenting)
    import slc.checkpoint  # noqa: F401
    for s in make_seeds():                                   # compiles / loads the numba kernels uninstrumented
        run_one(s)
    n = instrument_slc()
    print(f"INFO: instrumented {n} slc functions", file=sys.stderr, flush=True)
    rec = Recorder(Path(args.crash_dir), Path(args.stats))
    atheris.Setup([sys.argv[0]] + libfuzzer_args, rec)
    atheris.Fuzz()


def fuzz(seconds: float, timeout: int, rss_mb: int, workdir: Path) -> dict:
    """Run atheris in child processes until `seconds` are used; a timeout / OOM ends a child, the next resumes."""
    corpus, crash_dir = workdir / f"corpus-{'-'.join(ENABLED)}", workdir / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crash_dir.mkdir(parents=True, exist_ok=True)
    for s in make_seeds():
        (corpus / f"seed-{hashlib.sha1(s).hexdigest()[:12]}").write_bytes(s)
    total = {"inputs": 0, "crashes": 0, "signatures": {}, "children": 0}
    t_end = time.monotonic() + seconds
    while (left := t_end - time.monotonic()) >= 1:
        stats = workdir / f"stats-{os.getpid()}-{total['children']}.json"
        cmd = [sys.executable, __file__, "--child", "--stats", str(stats), "--crash-dir", str(crash_dir),
               "--targets", ",".join(ENABLED), "--",
               str(corpus), f"-max_total_time={int(left)}", f"-timeout={timeout}", f"-rss_limit_mb={rss_mb}",
               f"-artifact_prefix={crash_dir}/", "-print_final_stats=1", "-max_len=131072"]
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        total["children"] += 1
        log = proc.stderr
        (workdir / "last-child.log").write_text(log[-200_000:])
        done = [int(m) for m in re.findall(r"Done (\d+) runs", log)]
        st = json.loads(stats.read_text()) if stats.exists() else {"inputs": 0, "crashes": 0, "signatures": {}}
        stats.unlink(missing_ok=True)
        total["inputs"] += max(done + [st["inputs"]])
        total["crashes"] += st["crashes"]
        total["signatures"].update(st["signatures"])
        for kind in ("timeout", "oom", "crash", "leak"):     # libFuzzer's own verdicts end the child
            if re.search(rf"ERROR: libFuzzer: {'out-of-memory' if kind == 'oom' else kind}", log) or \
                    (kind == "timeout" and "ALARM: working on the last Unit" in log):
                total["crashes"] += 1
                written = re.findall(r"artifact_prefix.*?; Test unit written to (\S+)", log)
                total["signatures"][f"libFuzzer {kind}"] = (written or [log[-300:]])[-1]
                break
        else:
            if proc.returncode not in (0,) and not done:
                total["crashes"] += 1
                total["signatures"][f"child exit {proc.returncode}"] = log[-500:]
        if done:                                             # ran to max_total_time
            break
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60, help="how long to fuzz (default 60)")
    p.add_argument("--loop", action="store_true", help="random mutations in-process instead of atheris")
    p.add_argument("--seed", type=int, default=0, help="--loop: random seed")
    p.add_argument("--timeout", type=int, default=20, help="seconds one input may take (default 20)")
    p.add_argument("--rss-mb", type=int, default=4096, help="memory limit of the fuzzing process (default 4096)")
    p.add_argument("--workdir", type=Path, default=FUZZ_DIR, help="corpus and crashes (default .fuzz/)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of stream,tensor,model")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    p.add_argument("--crash-dir", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    ENABLED[:] = [t for t in TARGETS if t in args.targets.split(",")]
    if not ENABLED:
        p.error(f"--targets must name some of {TARGETS}")
    if args.child:
        child(args, rest)
        return 0
    t0 = time.time()
    if args.loop:
        rec = loop(args.seconds, args.seed, args.workdir / "crashes", quiet=True)
        result = {"inputs": rec.inputs, "crashes": rec.crashes, "signatures": rec.signatures, "mode": "loop"}
    else:
        result = {**fuzz(args.seconds, args.timeout, args.rss_mb, args.workdir), "mode": "atheris"}
    took = time.time() - t0
    print(f"fuzz ({result['mode']}): {result['inputs']} inputs in {took:.0f} s, {result['crashes']} crashes "
          f"({len(result['signatures'])} distinct)")
    for sig, where in result["signatures"].items():
        print(f"  {sig}: {where}")
    return 1 if result["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())

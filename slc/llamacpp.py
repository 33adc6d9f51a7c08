"""llama.cpp's own quantiser as a peer: convert, importance matrix, presets, and what a preset really stored.

A bench-only dependency. `make peers` builds `llama-quantize` and `llama-imatrix` (CPU, cached) from the
llama.cpp source that the `llama-cpp-python` sdist vendors, into `build/peers/` (git-ignored). Nothing
else in slc needs it; every function here that runs a llama.cpp tool raises `FileNotFoundError` saying
"run `make peers`" when the build is missing.

    f32 = convert("data/cache/smollm2-135m", "build/peers/smollm2-135m/f32.gguf")   # vendored converter
    imat = imatrix(f32, "cal.txt", "build/peers/smollm2-135m/imatrix.gguf")          # llama-imatrix
    q = quantize(f32, "build/peers/smollm2-135m/Q4_K_M.gguf", "Q4_K_M", imat)         # llama-quantize
    s = block_summary(q)            # per weight kind: the GGML types used; true bits/weight of the blocks
    w = read_block_weights(q)       # {module name: de-quantised fp32 weight}, transformers' names

A preset's name is not what it stores: llama.cpp mixes types per tensor (Q4_K_M keeps some v / down
tensors at 6 bits) and falls back from 256-wide k-/i-quant blocks to 32-wide types where a row is not a
multiple of 256 (SmolLM2's 576). `block_summary` reads the types and bytes off the file itself.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .models import ROOT, weight_kind
from .sources import open_checkpoint

PEERS_DIR = Path(os.environ.get("SLC_PEERS_DIR", ROOT / "build" / "peers"))
TOOLS = ("llama-quantize", "llama-imatrix")
KINDS = ("q", "k", "v", "o", "gate", "up", "down")

# The presets of issue 13, largest first; the last two are refused without an importance matrix.
PRESETS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q3_K_S",
           "IQ3_XXS", "Q2_K", "IQ2_XS")

# GGUF tensor stem inside a block -> transformers module of that block, for BERT (llama names are mapped by
# slc.sources, which also un-permutes Q and K; BERT's converter permutes nothing)
BERT_NAMES = {
    "attn_q": "attention.self.query", "attn_k": "attention.self.key", "attn_v": "attention.self.value",
    "attn_output": "attention.output.dense", "ffn_up": "intermediate.dense", "ffn_down": "output.dense",
}

MISSING = "llama.cpp's tools are not built ({what}): run `make peers` (a bench-only step, ~15 min on 2 cores)"


def tool(name: str, peers_dir: str | os.PathLike | None = None) -> Path:
    """Path of a built llama.cpp tool ('llama-quantize', 'llama-imatrix'); FileNotFoundError if missing."""
    if name not in TOOLS:
        raise ValueError(f"tool {name!r}: `make peers` builds {TOOLS}")
    path = Path(peers_dir or PEERS_DIR) / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise FileNotFoundError(MISSING.format(what=f"no {path}"))
    return path


def source_dir(peers_dir: str | os.PathLike | None = None) -> Path:
    """The vendored llama.cpp source tree that `make peers` unpacked (holds convert_hf_to_gguf.py, gguf-py)."""
    found = sorted(Path(peers_dir or PEERS_DIR).glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        raise FileNotFoundError(MISSING.format(what=f"no llama.cpp source under {peers_dir or PEERS_DIR}"))
    return found[-1].parent


def _run(cmd: list, what: str, env: dict | None = None) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {res.returncode}): {' '.join(map(str, cmd))}\n"
                           f"{(res.stdout + res.stderr)[-3000:]}")
    return res.stdout + res.stderr


def convert(hf_folder: str | os.PathLike, out: str | os.PathLike, outtype: str = "f32",
            peers_dir: str | os.PathLike | None = None) -> Path:
    """An HF folder -> GGUF with the vendored `convert_hf_to_gguf.py` (this Python, the vendored gguf-py)."""
    src, out = source_dir(peers_dir), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(src)]))
    tmp = out.with_suffix(".part")
    _run([sys.executable, src / "convert_hf_to_gguf.py", hf_folder, "--outtype", outtype, "--outfile", tmp],
         "convert_hf_to_gguf.py", env)
    tmp.rename(out)
    return out


def imatrix(model_gguf: str | os.PathLike, text_file: str | os.PathLike, out: str | os.PathLike,
            ctx: int = 512, threads: int = 2, encoder: bool = False,
            peers_dir: str | os.PathLike | None = None) -> Path:
    """llama.cpp's importance matrix (mean squared activation per input column) of `text_file`; returns `out`.

    `encoder=True` (BERT) works around two asserts of llama-imatrix: an encoder needs each chunk in one
    micro-batch (-b = -ub = ctx), and imatrix refuses a vocabulary that appends EOS ([SEP]), so that flag is
    overridden to false (chunks then run as [CLS] + 511 tokens of text).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".part" + out.suffix)
    extra = ["-b", ctx, "-ub", ctx, "--override-kv", "tokenizer.ggml.add_eos_token=bool:false"] if encoder else []
    log = _run([tool("llama-imatrix", peers_dir), "-m", model_gguf, "-f", text_file, "-o", tmp, "-c", ctx,
                "-t", threads, "--no-ppl", *extra], "llama-imatrix")
    if not tmp.exists():
        raise RuntimeError(f"llama-imatrix wrote no {tmp}:\n{log[-3000:]}")
    tmp.rename(out)
    return out


def quantize(model_gguf: str | os.PathLike, out: str | os.PathLike, preset: str,
             imatrix_file: str | os.PathLike | None = None, threads: int = 2,
             peers_dir: str | os.PathLike | None = None) -> Path:
    """`llama-quantize [--imatrix F] model out preset threads`; RuntimeError (with llama.cpp's words) if refused."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".part" + out.suffix)
    extra = ["--imatrix", imatrix_file] if imatrix_file else []
    _run([tool("llama-quantize", peers_dir), *extra, model_gguf, tmp, preset, threads], f"llama-quantize {preset}")
    tmp.rename(out)
    return out


def block_name(gguf_or_hf_name: str, arch: str) -> str | None:
    """The transformers module name of a block linear weight, or None for anything else.

    llama: names as slc.sources maps them ('model.layers.3.self_attn.q_proj.weight' -> '...q_proj');
    bert: GGUF names ('blk.3.attn_q.weight' -> 'encoder.layer.3.attention.self.query').
    """
    if not gguf_or_hf_name.endswith(".weight"):
        return None
    stem = gguf_or_hf_name.removesuffix(".weight")
    if arch == "llama":
        ok = stem.startswith("model.layers.") and stem.rsplit(".", 1)[-1] in (
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        return stem if ok else None
    if arch == "bert":
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BERT_NAMES:
            return f"encoder.layer.{parts[1]}.{BERT_NAMES[parts[2]]}"
        return None
    raise ValueError(f"architecture {arch!r}: block names are known for 'llama' and 'bert'")


@dataclass
class BlockSummary:
    """What a GGUF file stores for the block linear weights: types per kind, bytes, weights."""
    types: dict[str, Counter] = field(default_factory=dict)   # kind -> Counter({ggml type: tensors})
    nbytes: int = 0                                            # bytes of those tensors in the file
    numel: int = 0                                             # weights they hold
    tensors: int = 0

    @property
    def bits_per_weight(self) -> float:
        """True bits/weight over the block linears: every byte of their tensors (scales, mins included)."""
        return 8.0 * self.nbytes / self.numel if self.numel else float("nan")

    def types_used(self) -> str:
        """'q Q5_0; k Q5_0; v Q5_0 20, Q8_0 10; ...' in kind order (count shown when a kind mixes types)."""
        parts = []
        for kind in sorted(self.types, key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k)):
            c = self.types[kind]
            shown = ", ".join(t if len(c) == 1 else f"{t} {n}" for t, n in sorted(c.items(), key=lambda x: -x[1]))
            parts.append(f"{kind} {shown}")
        return "; ".join(parts)


def _blocks(path: str | os.PathLike):
    ckpt = open_checkpoint(path)
    if ckpt.format != "gguf":
        raise ValueError(f"{path}: not a GGUF file")
    arch = ckpt.config.get("model_type", "")
    return ckpt, {info.name: block_name(info.name, arch) for info in ckpt}


def block_summary(path: str | os.PathLike) -> BlockSummary:
    """Types used per weight kind and true bits/weight of a GGUF file's block linears (header only)."""
    ckpt, names = _blocks(path)
    s = BlockSummary()
    for info in ckpt:
        module = names[info.name]
        if module is None:
            continue
        s.types.setdefault(weight_kind(module), Counter())[info.stored] += 1
        s.nbytes += info.nbytes
        s.numel += info.numel
        s.tensors += 1
    if not s.tensors:
        raise ValueError(f"{path}: no block linear weights found (llama or bert names)")
    return s


def read_block_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{transformers module name: de-quantised fp32 weight (out, in)} for every block linear of a GGUF file."""
    ckpt, names = _blocks(path)
    return {module: ckpt.read(name, torch.float32) for name, module in names.items() if module is not None}

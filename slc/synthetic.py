"""Synthetic Llama-shaped checkpoints on disk, for time and memory at scale (never for quality claims).

    folder = write_synthetic_checkpoint("data/cache/synthetic/tinyllama-1.1b", "tinyllama-1.1b")
    ckpt = slc.sources.open_checkpoint(folder)          # 22 blocks, 2.2 GB of bf16, no real weight in it

No hub is reachable here and no true-float causal LM of 1-7 B parameters ships on PyPI, so scale tests use
these: a transformers Llama folder (config.json, bf16 safetensors shards, index JSON) whose tensors have
the names and shapes of the real model and statistics like SmolLM2-135M's, generated one tensor at a time
and streamed straight into the shard files, so writing a 7 B checkpoint never holds more than a few MB
of it. Every tensor comes from its own generator seeded by (seed, name): the bytes do not depend on the
shard size or on which other tensors are written.

The statistics (`SyntheticStats`), measured on SmolLM2-135M's 210 linear weights (they sit on a Q4_1 grid,
which leaves row scales and tails intact) and checked against MiniLM's true fp32 weights:
  - rows are Student-t with 12 degrees of freedom: SmolLM2's row-normalised weights have kurtosis 3.4
    (p90 3.9), 2.6e-5 of them beyond 6 sigma and a largest |w|/rms of 9.6 per matrix; t_12 gives 3.75,
    2.7e-5 and 8.4 (t with 4-6 degrees of freedom would give kurtosis 6-16: far heavier than measured);
  - per-row RMS is log-normal with the per-kind spread of SmolLM2 (sd of log row-RMS, median over the 30
    blocks): q 0.38, k 0.30, o 0.15, gate 0.135, up / v / down 0.105, embedding 0.175; median row RMS
    x sqrt(fan-in) as measured: 4.2-4.7 (down 7.7), embedding rows 0.13;
  - a few outlier input columns: 0.25 % of columns scaled x5-20. SmolLM2 has none (its largest column
    RMS is 1.5x the median); this is the stress case of larger LLMs, in which the same hidden channels stand
    out in every layer that reads the residual stream, so those layers share one set of outlier channels;
  - RMSNorm weights 1 + 0.1 N(0, 1).
Student-t draws use the Wilson-Hilferty cube approximation of chi-square (3x faster than an exact gamma).

    python -m slc.synthetic tiny data/cache/synthetic/tiny      # or tinyllama-1.1b, 3b, llama-2-7b
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slc.sources import INDEX_FILE, SAFETENSORS_DTYPES

MARKER = ".slc-synthetic.json"          # written last: a folder without it is not a finished checkpoint
CHUNK_ELEMENTS = 1 << 22                # rows generated per step: ~16 MB of fp32 at a time
FORMAT_VERSION = 1                      # bump when the generator changes, so stale caches are rebuilt


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of a Llama decoder (transformers' LlamaForCausalLM)."""
    layers: int                # decoder blocks
    hidden: int                # model width
    intermediate: int          # MLP width
    heads: int                 # attention heads
    kv_heads: int              # key/value heads (grouped-query attention when < heads)
    vocab: int                 # vocabulary size
    max_positions: int = 2048  # context length written to config.json
    tied: bool = False         # lm_head shares the embedding (then it is not stored)

    def __post_init__(self):
        sizes = (self.layers, self.hidden, self.intermediate, self.heads, self.kv_heads, self.vocab)
        if not all(isinstance(v, int) and v > 0 for v in sizes):
            raise ValueError(f"every size must be a positive int, got {self}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden {self.hidden} must split into {self.heads} heads of an even size")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every stored tensor, in the order of the model's state_dict."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for b in range(self.layers):
            p = f"model.layers.{b}."
            out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)),
                    (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out.append(("model.norm.weight", (h,)))
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, h)))
        return out

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self, dtype: str = "bfloat16") -> dict:
        """config.json of the matching LlamaForCausalLM."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab,
            "max_position_embeddings": self.max_positions, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
            "tie_word_embeddings": self.tied, "bos_token_id": 1, "eos_token_id": 2, "dtype": dtype,
        }


SHAPES = {
    "tiny": LlamaShape(layers=2, hidden=256, intermediate=688, heads=4, kv_heads=2, vocab=1024, max_positions=256),
    "tinyllama-1.1b": LlamaShape(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
    "3b": LlamaShape(layers=26, hidden=3200, intermediate=8640, heads=32, kv_heads=32, vocab=32000),  # OpenLLaMA-3B
    "llama-2-7b": LlamaShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000,
                             max_positions=4096),
}


@dataclass(frozen=True)
class SyntheticStats:
    """What the generated weights look like (defaults measured on SmolLM2-135M; see the module docstring)."""
    df: float = 12.0                     # Student-t degrees of freedom of the row-normalised weights
    row_log_sd: dict = field(default_factory=lambda: {    # sd of log(row RMS), per weight kind
        "q": 0.38, "k": 0.30, "v": 0.105, "o": 0.15, "gate": 0.135, "up": 0.105, "down": 0.105,
        "embed": 0.175, "head": 0.175})
    gain: dict = field(default_factory=lambda: {          # median row RMS x sqrt(fan-in), per weight kind
        "q": 4.24, "k": 4.49, "v": 4.18, "o": 4.26, "gate": 4.18, "up": 4.68, "down": 7.66, "head": 4.2})
    embed_rms: float = 0.131             # median row RMS of the embedding
    outlier_frac: float = 0.0025         # share of input columns that are outliers (at least one per matrix)
    outlier_gain: tuple = (5.0, 20.0)    # their scale, uniform in this range
    norm_sd: float = 0.1                 # RMSNorm weights: 1 + norm_sd * N(0, 1)


KINDS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down", "embed_tokens": "embed", "lm_head": "head"}
RESIDUAL_INPUT = {"q", "k", "v", "gate", "up", "embed", "head"}     # kinds whose columns are hidden channels


def as_shape(shape) -> LlamaShape:
    """'tinyllama-1.1b' | '3b' | 'llama-2-7b' | 'tiny' | a dict of LlamaShape fields | a LlamaShape."""
    if isinstance(shape, LlamaShape):
        return shape
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}: use one of {sorted(SHAPES)} or a dict of LlamaShape fields")
        return SHAPES[shape]
    if isinstance(shape, dict):
        return LlamaShape(**shape)
    raise TypeError(f"shape must be a name, a dict or a LlamaShape, not {type(shape).__name__}")


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one tensor: depends only on (seed, name)."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def student_t(n: int, df: float, g: torch.Generator) -> torch.Tensor:
    """n Student-t draws: z / sqrt(chi2_df / df), chi2 by the Wilson-Hilferty cube of a normal."""
    z = torch.empty(n).normal_(generator=g)
    c = 2.0 / (9.0 * df)
    chi = torch.empty(n).normal_(generator=g).mul_(math.sqrt(c)).add_(1.0 - c).clamp_min_(0.05).pow_(3)
    return z.div_(chi.sqrt_())                            # chi ~ chi2_df / df; clamp: p < 1e-13 at df = 12


def outlier_gains(n_cols: int, stats: SyntheticStats, g: torch.Generator) -> torch.Tensor:
    """Per-column scale: 1, except a few outlier columns scaled by outlier_gain."""
    gains = torch.ones(n_cols)
    k = max(1, round(stats.outlier_frac * n_cols))
    cols = torch.randperm(n_cols, generator=g)[:k]
    lo, hi = stats.outlier_gain
    gains[cols] = lo + (hi - lo) * torch.rand(k, generator=g)
    return gains


def generate_tensor(name: str, shape: tuple[int, ...], seed: int = 0, stats: SyntheticStats | None = None,
                    dtype: torch.dtype = torch.bfloat16):
    """Yield one synthetic tensor's rows in chunks of about CHUNK_ELEMENTS, as `dtype` (deterministic)."""
    stats = stats or SyntheticStats()
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    if len(shape) == 1:                                   # RMSNorm weight
        yield (1.0 + stats.norm_sd * torch.randn(shape, generator=g)).to(dtype)
        return
    rows, cols = shape
    kind = next((k for key, k in KINDS.items() if key in name), "o")
    shared = torch.Generator().manual_seed(tensor_seed(seed, f"outliers/{cols}"))
    col_gain = outlier_gains(cols, stats, shared if kind in RESIDUAL_INPUT else g)
    median = stats.embed_rms if kind == "embed" else stats.gain[kind] / math.sqrt(cols)
    row_rms = median * torch.exp(stats.row_log_sd[kind] * torch.randn(rows, generator=g))
    # Outlier columns would inflate each row's RMS; divide it out so the row RMS is what was drawn. And a
    # t_df draw has variance df / (df - 2), divided out too.
    unit = math.sqrt(col_gain.pow(2).mean().item() * stats.df / (stats.df - 2))
    row_scale = (row_rms / unit)[:, None]
    step = max(1, CHUNK_ELEMENTS // cols)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        w = student_t(n * cols, stats.df, g).view(n, cols)
        yield w.mul_(col_gain).mul_(row_scale[r:r + n]).to(dtype)


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: float):
    """Greedy in state_dict order, as transformers' save_pretrained: a new shard when the next one overflows."""
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        n = math.prod(shape) * itemsize
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    return shards + [cur] if cur else shards


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]], dtype_name: str, itemsize: int) -> bytes:
    """8-byte little-endian length + JSON header (padded with spaces to 8 bytes) for tensors laid out in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_synthetic_checkpoint(path, shape="tinyllama-1.1b", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                               shard_bytes: float = 2e9, progress: bool = True,
                               stats: SyntheticStats | None = None) -> Path:
    """Write (or find cached) a synthetic Llama checkpoint folder at `path`; return the folder.

    >>> import tempfile, torch
    >>> from slc.sources import open_checkpoint
    >>> folder = write_synthetic_checkpoint(tempfile.mkdtemp() + "/tiny", "tiny", progress=False)
    >>> ckpt = open_checkpoint(folder)
    >>> assert ckpt.tensors["model.layers.0.mlp.up_proj.weight"].shape == (688, 256)
    >>> assert ckpt.read("model.norm.weight").dtype == torch.bfloat16
    """
    path, llama, stats = Path(path), as_shape(shape), stats or SyntheticStats()
    names = {v[0]: k for k, v in SAFETENSORS_DTYPES.items()}
    if dtype not in names or not dtype.is_floating_point:
        raise ValueError(f"dtype must be torch.bfloat16, float16 or float32, not {dtype}")
    dtype_name, itemsize = names[dtype], dtype.itemsize
    spec = {"version": FORMAT_VERSION, "shape": asdict(llama), "dtype": dtype_name, "seed": seed,
            "shard_bytes": int(shard_bytes), "stats": asdict(stats)}
    spec = json.loads(json.dumps(spec))                  # tuples -> lists, as read back from disk
    marker = path / MARKER
    if marker.exists():
        if json.loads(marker.read_text()) == spec:
            return path                                   # cached
        shutil.rmtree(path)                               # ours, but made with other settings
    elif path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not a synthetic checkpoint; pass an empty or new folder")

    tensors = llama.tensors()
    total = sum(math.prod(s) for _, s in tensors) * itemsize
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < total + 2**30:
        raise OSError(f"{path}: {total / 1e9:.1f} GB to write but only {free / 1e9:.1f} GB free on that disk")
    tmp = path.parent / f".{path.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shards = plan_shards(tensors, itemsize, shard_bytes)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {path.name}")
    weight_map = {}
    for k, shard in enumerate(shards):
        file = (f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors")
        with open(tmp / file, "wb") as f:
            f.write(safetensors_header(shard, dtype_name, itemsize))   # every shape is known: header first
            for name, shp in shard:
                written = 0
                for chunk in generate_tensor(name, shp, seed, stats, dtype):
                    data = chunk.contiguous().view(torch.uint8).numpy()
                    f.write(data)
                    written += data.nbytes
                    if bar is not None:
                        bar.update(data.nbytes)
                assert written == math.prod(shp) * itemsize, f"{name}: wrote {written} bytes"
                weight_map[name] = file
    if bar is not None:
        bar.close()
    if len(shards) > 1:
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    (tmp / "config.json").write_text(json.dumps(llama.config(str(dtype).removeprefix("torch.")), indent=2))
    (tmp / MARKER).write_text(json.dumps(spec, indent=2))
    if path.exists():
        path.rmdir()                                      # empty, checked above
    os.rename(tmp, path)
    return path


def _main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(f"usage: python -m slc.synthetic SHAPE FOLDER   (SHAPE: {', '.join(SHAPES)})")
    print(write_synthetic_checkpoint(argv[1], argv[0]))


if __name__ == "__main__":
    _main(sys.argv[1:])

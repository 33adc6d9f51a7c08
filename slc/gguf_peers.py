"""GGUF quant types as peers: llama.cpp's block formats, applied through the `gguf` package.

Each GGUF type cuts every row of a weight into blocks of 32 consecutive weights (along the
input dimension) and stores one fp16 scale (and for Q4_1 an fp16 minimum) per block:

    type   codes            per block of 32           bits per weight
    Q8_0   int8, symmetric  32 B codes + 2 B scale     (32*8 + 16) / 32      = 8.5
    Q5_0   5-bit, symmetric 20 B codes + 2 B scale     (32*5 + 16) / 32      = 5.5
    Q4_0   4-bit, symmetric 16 B codes + 2 B scale     (32*4 + 16) / 32      = 4.5
    Q4_1   4-bit, min/max   16 B codes + 2 B scale + 2 B min                 = 5.0

`gguf_roundtrip` quantises and de-quantises one weight with `gguf.quants` (the reference
NumPy implementation shipped with llama.cpp's Python package), so a GGUF row in a table is
a real GGUF result, not a re-implementation. `apply_gguf` does that to every block linear
of a model in place (the weights stay fp32 tensors on the GGUF grid: a quality peer, not a
memory one). Note: SmolLM2 here comes from a Q4_1 GGUF file, so its weights already sit on a
Q4_1 grid and a Q4_1 round trip of them is (almost) exact.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from .hf import DEFAULT_SKIP, dense_weight_of, is_linear, skipped
from .metrics import rel_error

GGUF_TYPES = ("Q8_0", "Q5_0", "Q4_0", "Q4_1")


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    if name not in GGUF_TYPES:
        raise ValueError(f"qtype={name!r}: use one of {GGUF_TYPES}")
    return GGMLQuantizationType[name]


def gguf_bits_per_weight(qtype: str) -> float:
    """Bits per weight of a GGUF type, scales included: 8 * bytes per block / weights per block."""
    from gguf.constants import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[_qtype(qtype)]
    return 8 * nbytes / block


def gguf_roundtrip(weight: torch.Tensor, qtype: str) -> tuple[torch.Tensor, float]:
    """(weight quantised to `qtype` and back, bits per weight). Same shape, dtype and device.

    Blocks run along the last dimension, so pass a Linear weight as (out, in), as llama.cpp does.
    """
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES

    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a float torch.Tensor, got {getattr(weight, 'dtype', type(weight).__name__)}")
    qt = _qtype(qtype)
    block = GGML_QUANT_SIZES[qt][0]
    if weight.dim() == 0 or weight.shape[-1] % block:
        raise ValueError(f"{qtype} needs the last dimension to be a multiple of {block}; "
                         f"got shape {tuple(weight.shape)}")
    data = weight.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    packed = quants.quantize(data, qt)                                   # (..., in / 32 * bytes per block) uint8
    back = quants.dequantize(packed, qt).reshape(data.shape)             # float32
    out = torch.from_numpy(np.ascontiguousarray(back)).to(device=weight.device, dtype=weight.dtype)
    return out, gguf_bits_per_weight(qtype)


def default_filter(name: str, module: nn.Module) -> bool:
    """Every nn.Linear / Conv1D that compress_model compresses by default (not embeddings, lm_head)."""
    return is_linear(module) and skipped(name, DEFAULT_SKIP) is None


def apply_gguf(model: nn.Module, qtype: str, filter_fn=None, progress: bool = False) -> list[dict]:
    """Replace each selected linear weight of `model` in place by its GGUF round trip; rows per layer.

    filter_fn(name, module) -> bool picks the layers (default: the layers compress_model takes by
    default: every Linear / Conv1D but embeddings and lm_head, so a tied lm_head is never touched).
    Rows: layer, shape, bits_per_weight, rel_error (of the weight), seconds.
    """
    _qtype(qtype)
    filter_fn = filter_fn or default_filter
    chosen = [(n, m) for n, m in model.named_modules() if filter_fn(n, m)]
    if not chosen:
        raise ValueError("no layer matched: the model has no nn.Linear / Conv1D outside embeddings and "
                         "lm_head, or filter_fn rejects them all")
    if progress:
        from tqdm.auto import tqdm
        chosen = tqdm(chosen, desc=f"GGUF {qtype}", leave=False)
    rows = []
    with torch.no_grad():
        for name, module in chosen:
            t0 = time.perf_counter()
            w = dense_weight_of(module)                                               # (out, in)
            back, bpw = gguf_roundtrip(w, qtype)
            rows.append({"layer": name, "shape": tuple(w.shape), "bits_per_weight": bpw,
                         "rel_error": rel_error(w, back), "seconds": time.perf_counter() - t0})
            w.copy_(back)                                     # a view of module.weight (transposed for Conv1D)
    return rows

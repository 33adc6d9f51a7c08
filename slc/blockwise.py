"""Block-wise calibration and evaluation: a causal LM on disk, one decoder block in memory at a time.

    policy = allocate_checkpoint("ckpt/", tok, budget_bits=4.5)               # rate-distortion, block by block
    report = gptq_checkpoint("ckpt/", "out.slc.safetensors", tok, policy)     # GPTQ codes, block by block
    perplexity_streamed("out.slc.safetensors", tok, text)                     # = metrics.perplexity_details

The GPTQ paper's recipe (Frantar et al., 2022, section 4, "quantising one block at a time"): build the
architecture on the meta device from the config (no memory), materialise the embeddings and run the
calibration tokens through them; then for every decoder block i: read that block's parameters from the
checkpoint, run every calibration sequence's hidden states through it with slc.calibrate's hooks
(StatsHooks: inputs' x_sq / C, q/k/v and gate/up sharing one input), use what its layers need, keep
its outputs as the next block's inputs, and put the block back on the meta device. Peak memory is
about one dense fp32 block + the embeddings + the calibration activations; GPTQ writes each compressed
layer to slc.streaming's journal as soon as it is made and assembles the file from it at the end.
Each sequence keeps its own rotary position embeddings and causal mask, built as the model's own
forward builds them (`model.model.rotary_emb`, `create_causal_mask`), so a block sees exactly what it
sees inside the whole model and the statistics equal the whole-model ones (tested on SmolLM2).

Sensitivities. sensitivity="output" is block-local (D = sum_ij dW_ij^2 C_jj, or tr(dW C dW^T) with
distortion="full"). "fisher" / "fisher-out" need the loss gradient at every layer's output, i.e. the
blocks after it: the forward stream keeps each block's input (blocks x tokens x hidden floats), the
head gives dLoss/dh at the top, and a backward stream re-reads block i, recomputes its forward from
the kept input and back-propagates, collecting the squared output gradients (each block read twice).

GPTQ. sequential=True is the paper's way: a block's inputs come from the already-quantised blocks
before it, and inside the block the layers are quantised group by group in execution order (q/k/v,
then o, then gate/up, then down), each group's C measured with the earlier groups already quantised.
sequential=False measures every C on the original model, exactly what slc.compress_model_gptq does
(same bytes, tested).

Architectures: Llama-family checkpoints (`model_type` "llama": SmolLM2, TinyLlama, Llama-2, the
synthetic ones). Others raise ValueError.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import zlib
from dataclasses import astuple
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .allocate import (DEFAULT_INT_BITS, DEFAULT_STEPS, KINDS, Allocation, RDTable, check_temper, layer_rotations,
                       rd_points, rotated_layer, window_steps)
from .allocate import allocate as allocate_model
from .calibrate import StatsHooks, token_chunks
from .checkpoint import build_skeleton, read_meta
from .compress import CompressionReport, LayerRow, selected_specs
from .compress import compress_model_gptq as compress_model_gptq_dense
from .gptq import gptq
from .hf import dense_weight_of, target_layers
from .integrity import verify_checksums
from .nn import CompressedLinear, TiedLinear, validate_loaded
from .sources import open_checkpoint
from .streaming import (LOCK, Plan, assemble, claim_journal, compress_unit, finished_part, finished_parts, part_layer,
                        state_units, write_part)

ARCHITECTURES = ("llama",)                     # model_type values whose forward this module reproduces
BLOCK_SENSITIVITIES = ("fisher", "fisher-out", "output")


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_path(x) -> bool:
    """A checkpoint given by its path (str / os.PathLike) rather than an nn.Module."""
    return isinstance(x, (str, os.PathLike))


def check_architecture(config: dict, where) -> None:
    """ValueError unless `config` describes an architecture this module runs block by block."""
    mt = (config or {}).get("model_type")
    if mt not in ARCHITECTURES:
        raise ValueError(f"{where}: model_type {mt!r} is not supported block by block (supported: {ARCHITECTURES}); "
                         "load the model whole and use the model form instead")


def skeleton(config: dict) -> nn.Module:
    """The causal LM `config` describes: parameters on the meta device (no memory, no init), buffers real
    (rotary inv_freq is computed, not stored)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    check_architecture(config, "config")
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def perplexity_windows(n: int, window: int = 512, stride: int = 256) -> list[tuple[int, int, int]]:
    """(begin, end, prev_end) of every window of the strided perplexity recipe over n tokens: windows of up
    to `window` tokens end `stride` apart (at most window - 1, so windows overlap by >= 1 token); tokens
    before prev_end are context only. slc.metrics.perplexity_details and perplexity_streamed share it."""
    if not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got stride={stride}, window={window}")
    if window < 2:
        raise ValueError(f"window={window} must be >= 2 (a token and its context)")
    step = min(stride, window - 1)
    out, prev_end, end = [], 0, min(window, n)
    while True:
        out.append((max(0, end - window), end, prev_end))
        if end == n:
            return out
        prev_end, end = end, min(end + step, n)


# ----------------------------------------------------------------------------
# one block at a time

class BlockStream:
    """A Llama-family causal LM whose parameters live on disk; `load` materialises one submodule at a time.

    model: the skeleton (parameters on meta). read(name) -> tensor: where a parameter comes from.
    Every sequence of hidden states is a (1, T, hidden) tensor; `contexts` gives each its position ids,
    causal mask and rotary (cos, sin), built as LlamaModel.forward builds them.
    """

    def __init__(self, model: nn.Module, read, device=None, where: str = "", checkpoint=None):
        self.model, self.read, self.where = model, read, where
        self.checkpoint = checkpoint                   # the slc.sources.Checkpoint read from, if any
        self.device = default_device() if device is None else torch.device(device)
        self.model.model.rotary_emb.to(self.device)
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    def block_name(self, i: int) -> str:
        return f"model.layers.{i}"

    def load(self, name: str, frozen: bool = True) -> nn.Module:
        """Read submodule `name`'s parameters and buffers (state_dict) into it, on the device."""
        module = self.model.get_submodule(name)
        state = {k: self.read(f"{name}.{k}" if name else k).to(self.device) for k in module.state_dict()}
        module.load_state_dict(state, strict=True, assign=True)
        if frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        return module

    def free(self, module: nn.Module) -> None:
        """Back to the meta device: the memory goes, the structure stays."""
        module.to_empty(device="meta")

    def load_head(self) -> tuple[nn.Module, nn.Module]:
        """(final norm, lm_head), materialised; a tied head reads the input embedding."""
        norm = self.load("model.norm")
        head = self.model.lm_head
        if isinstance(head, nn.Linear) and self.tied:
            emb = self.load("model.embed_tokens")
            head.weight = emb.weight
        else:
            self.load("lm_head")
        return norm, head

    def free_head(self) -> None:
        for name in ("model.norm", "lm_head", "model.embed_tokens"):
            self.free(self.model.get_submodule(name))

    def embed(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        """Token ids (1, T) -> input hidden states (1, T, hidden), one per sequence; the embeddings are freed."""
        emb = self.load("model.embed_tokens")
        with torch.no_grad():
            hidden = [emb(ids.to(self.device)).clone() for ids in sequences]
        self.free(emb)
        return hidden

    def contexts(self, hidden: list[torch.Tensor]) -> list[dict]:
        """Per sequence: the keyword arguments a decoder layer takes (mask, position ids and embeddings)."""
        from transformers.masking_utils import create_causal_mask

        out = []
        with torch.no_grad():
            for h in hidden:
                pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
                mask = create_causal_mask(config=self.model.config, inputs_embeds=h, attention_mask=None,
                                          cache=None, position_ids=pos)
                cos_sin = self.model.model.rotary_emb(h, position_ids=pos)
                out.append({"attention_mask": mask, "position_ids": pos, "position_embeddings": cos_sin})
        return out

    def run(self, block: nn.Module, h: torch.Tensor, ctx: dict) -> torch.Tensor:
        out = block(h, **ctx)
        return out[0] if isinstance(out, tuple) else out

    def forward_all(self, block: nn.Module, hidden: list, ctxs: list, hooks: StatsHooks | None = None) -> list:
        """Every sequence through `block` (no gradients); hooks see each as a new sequence."""
        out = []
        with torch.no_grad():
            for h, ctx in zip(hidden, ctxs, strict=True):
                if hooks is not None:
                    hooks.new_sequence()
                out.append(self.run(block, h, ctx).clone())
        return out


def checkpoint_stream(path, device=None, dtype: torch.dtype = torch.float32) -> BlockStream:
    """A BlockStream over a HF safetensors folder / file or a GGUF file (slc.sources.open_checkpoint)."""
    ckpt = open_checkpoint(path)
    if ckpt.config is None:
        raise ValueError(f"{path}: no config.json beside the weights: the architecture is unknown")
    check_architecture(ckpt.config, path)
    return BlockStream(skeleton(ckpt.config), lambda name: ckpt.read(name, dtype), device, where=str(path),
                       checkpoint=ckpt)


def block_layers(model: nn.Module, names, n_blocks: int, where) -> list[list[str]]:
    """`names` (module names) grouped by decoder block; ValueError for a layer outside every block."""
    per = [[] for _ in range(n_blocks)]
    for n in names:
        parts = n.split(".")
        if parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            raise ValueError(f"{where}: layer {n!r} is outside the decoder blocks; block-wise calibration covers "
                             "the blocks' layers only (keep the default skip, which leaves lm_head dense)")
        per[int(parts[2])].append(n)
    return per


def calibration_sequences(stream: BlockStream, tokenizer, text, max_tokens: int) -> list[torch.Tensor]:
    """The calibration token chunks exactly as slc.calibrate.layer_stats cuts them."""
    return token_chunks(stream.model, tokenizer, text, max_tokens)


def to_cpu(st):
    for k in ("x_sq", "x_cov", "out_weight", "weight_fisher"):
        v = getattr(st, k)
        if v is not None and v.device.type != "cpu":
            setattr(st, k, v.cpu())
    return st


def collect_stats(stream: BlockStream, tokenizer, text, names: list[str], max_tokens: int, full: bool,
                  fisher, on_block, progress: bool = False) -> int:
    """Calibrate `names` block by block; `on_block(i, {name: module}, {name: LayerStats})` runs while block i is
    in memory (stats on CPU). fisher=False: one forward stream; "weight" / "out": a forward stream keeping every
    block's inputs, then a backward stream. Returns the number of calibration tokens."""
    seqs = calibration_sequences(stream, tokenizer, text, max_tokens)
    n_blocks = len(stream.blocks)
    per_block = block_layers(stream.model, names, n_blocks, stream.where)
    hidden = stream.embed(seqs)
    ctxs = stream.contexts(hidden)
    modules = dict(stream.model.named_modules())

    def finish(i, block, hooks):
        missing = [n for n in per_block[i] if n not in hooks.stats]
        if missing:
            raise ValueError(f"calibration forward pass never reached {missing[:3]}: these layers are unused")
        on_block(i, {n: modules[n] for n in per_block[i]}, {n: to_cpu(hooks.stats[n]) for n in per_block[i]})

    bar = tqdm(total=n_blocks * (2 if fisher else 1), desc="blocks", unit="block", disable=not progress)
    if not fisher:
        for i in range(n_blocks):
            block = stream.load(stream.block_name(i))
            hooks = StatsHooks({n: modules[n] for n in per_block[i]}, full=full)
            try:
                hidden = stream.forward_all(block, hidden, ctxs, hooks)
            finally:
                hooks.remove()
            finish(i, block, hooks)
            stream.free(block)
            bar.update()
        bar.close()
        return sum(s.shape[1] for s in seqs)

    kept = []                                            # kept[i]: block i's inputs, one per sequence
    for i in range(n_blocks):
        block = stream.load(stream.block_name(i))
        kept.append(hidden)
        out = []
        for h, ctx in zip(hidden, ctxs, strict=True):   # with autograd on, as inside the whole model's backward
            with torch.enable_grad():
                out.append(stream.run(block, h.detach().requires_grad_(True), ctx).detach())
        hidden = out
        stream.free(block)
        bar.update()
    norm, head = stream.load_head()
    grads = []                                           # dLoss/dh at the current block's output, per sequence
    for h, ids in zip(hidden, seqs, strict=True):
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            logits = head(norm(h))
            loss = stream.model.loss_function(logits=logits, labels=ids.to(stream.device),
                                              vocab_size=stream.model.config.vocab_size)
            grads.append(torch.autograd.grad(loss, h)[0])
    stream.free_head()
    del hidden
    for i in reversed(range(n_blocks)):
        block = stream.load(stream.block_name(i))
        hooks = StatsHooks({n: modules[n] for n in per_block[i]}, full=full, fisher=fisher)
        try:
            for c, (h, ctx) in enumerate(zip(kept[i], ctxs, strict=True)):
                hooks.new_sequence()
                with torch.enable_grad():
                    h = h.detach().requires_grad_(True)
                    stream.run(block, h, ctx).backward(grads[c])
                grads[c] = h.grad
                hooks.end_sequence()
        finally:
            hooks.remove()
        kept[i] = None
        finish(i, block, hooks)
        stream.free(block)
        bar.update()
    bar.close()
    return sum(s.shape[1] for s in seqs)


# ----------------------------------------------------------------------------
# allocation

def rate_distortion_checkpoint(path, tokenizer, calibration_text: str | None = None, kinds=("ecsq",), *,
                               granularity: str = "channel", group_size: int | None = None, steps=DEFAULT_STEPS,
                               int_bits=DEFAULT_INT_BITS, sensitivity: str = "auto", distortion: str = "diag",
                               max_tokens: int = 512, skip=None, budget_bits: float | None = None,
                               window: float | None = 4.0, device=None, dtype: torch.dtype = torch.float32,
                               progress: bool = False, rotate: str | None = None, rotate_seed: int = 0) -> RDTable:
    """slc.allocate.rate_distortion for a checkpoint on disk, one decoder block in memory at a time.

    Same arguments and the same table; sensitivity: "fisher" (the default, as for a model with a LM head:
    forward then backward stream), "fisher-out", or "output" (block-local, forward stream only).
    rotate / rotate_seed: every layer stored rotated (LinearSpec(rotate=...)), its points measured on W R and the
    rotated inputs' moments, as slc.allocate.rate_distortion does; a width the rotation cannot cover fails
    before any block is read."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds={kinds!r}: use a tuple of {KINDS}, e.g. ('ecsq',)")
    if distortion not in ("diag", "full"):
        raise ValueError(f"distortion={distortion!r}: use 'diag' or 'full'")
    sensitivity = "fisher" if sensitivity == "auto" else sensitivity
    if sensitivity not in BLOCK_SENSITIVITIES:
        raise ValueError(f"sensitivity={sensitivity!r}: block by block, use one of {BLOCK_SENSITIVITIES} or 'auto'")
    t0 = time.perf_counter()
    stream = checkpoint_stream(path, device, dtype)
    layers = target_layers(stream.model, skip)
    if not layers:
        raise ValueError(f"{path}: no Linear layers outside the skipped ones")
    rots = layer_rotations(layers, rotate, rotate_seed)              # before any block is read
    points, shapes, energy = {}, {}, {}

    def on_block(i, modules, stats):
        for name, m in modules.items():
            w = dense_weight_of(m).float().cpu()
            shapes[name], energy[name] = tuple(w.shape), float(w.double().pow(2).sum())
            w, st = rotated_layer(w, stats[name], rots[name], keep_cov=distortion == "full")
            tried = steps if budget_bits is None else window_steps(w, steps, budget_bits, window, granularity,
                                                                   group_size)
            points[name] = rd_points(w, st, kinds, tried, int_bits, granularity, group_size,
                                     full=distortion == "full")

    fisher = {"fisher": "weight", "fisher-out": "out"}.get(sensitivity, False)
    tokens = collect_stats(stream, tokenizer, calibration_text, list(layers), max_tokens,
                           distortion == "full" or rotate is not None, fisher, on_block, progress)
    points = {n: points[n] for n in layers}                          # the model's order, as rate_distortion
    shapes = {n: shapes[n] for n in layers}
    energy = {n: energy[n] for n in layers}
    settings = {"kinds": kinds, "granularity": granularity, "group_size": group_size, "sensitivity": sensitivity,
                "distortion": distortion, "max_tokens": max_tokens, "tokens": tokens,
                "rotate": rotate, "rotate_seed": rotate_seed, "seconds": time.perf_counter() - t0,
                "blockwise": True, "source": str(path)}
    return RDTable(points, shapes, settings, energy)


def allocate_checkpoint(path, tokenizer, budget_bits: float = 4.5, calibration_text: str | None = None,
                        kinds=("ecsq",), *, tolerance: float = 0.005, rd: RDTable | None = None,
                        temper: float = 1.0, **kwargs) -> Allocation:
    """slc.allocate.allocate for a checkpoint on disk (HF folder / safetensors / GGUF), block by block.

    kwargs: those of `rate_distortion_checkpoint` (granularity, group_size, steps, int_bits, sensitivity,
    distortion, max_tokens, skip, window, device, dtype, progress, rotate, rotate_seed). temper: as in
    slc.allocate.allocate (compress_to_budget's causal-LM default up to 4 bits is 0.5). The result is the same
    Allocation, a policy for compress_model / compress_checkpoint / gptq_checkpoint (rotating specs with rotate=)."""
    if isinstance(budget_bits, bool) or not isinstance(budget_bits, (int, float)) or not 0.5 <= budget_bits <= 16:
        raise ValueError(f"budget_bits={budget_bits!r} must be a number of bits per weight in [0.5, 16], e.g. 4.5")
    temper = check_temper(temper)                                   # before any block is read
    if rd is None:
        rd = rate_distortion_checkpoint(path, tokenizer, calibration_text, kinds, budget_bits=budget_bits, **kwargs)
    return allocate_model(None, None, budget_bits, rd=rd, tolerance=tolerance, temper=temper)


def allocate(model, tokenizer, budget_bits: float = 4.5, calibration_text: str | None = None, kinds=("ecsq",),
             **kwargs) -> Allocation:
    """slc.allocate: `model` is an nn.Module (slc.allocate.allocate, the whole model in memory) or a checkpoint
    path (allocate_checkpoint: one decoder block at a time; extra keywords device=, dtype=)."""
    if is_path(model):
        return allocate_checkpoint(model, tokenizer, budget_bits, calibration_text, kinds, **kwargs)
    return allocate_model(model, tokenizer, budget_bits, calibration_text, kinds, **kwargs)


# ----------------------------------------------------------------------------
# GPTQ

def chosen_layers(names, policy) -> dict:
    """{name: LinearSpec} of the layers `policy` compresses; ValueError for kinds GPTQ cannot store."""
    return selected_specs(names, policy, ("entropy",), "GPTQ", rotates=True)


def gptq_layer(name: str, module: nn.Module, spec, x_cov: torch.Tensor, block: int, damp: float):
    """(CompressedLinear on CPU, its report row, the effective de-quantised weight) for one dense layer. A spec
    with rotate= quantises W R with the Hessian R^T C R (as compress_model_gptq); the weight returned is then
    Q(W R) R^T, the one the layer's forward applies, for the layers calibrated after it."""
    t0 = time.perf_counter()
    w = dense_weight_of(module).float().cpu()
    rot = spec.rotation(w.shape[1], name)
    qt = gptq(w, x_cov.cpu(), spec.quantizer, block=block, damp=damp, rotation=rot)
    qt.original_dtype = module.weight.dtype
    bias = getattr(module, "bias", None)
    layer = CompressedLinear.from_quantized(qt, spec, None if bias is None else bias.detach().cpu(), device="cpu")
    w_hat = qt.dequantize(torch.float32)
    if rot is not None:                                    # orthogonal: the same error in the rotated basis
        w = rot.apply(w.double()).float()
    rel = float((w_hat - w).norm() / w.norm().clamp_min(1e-30))
    if rot is not None:
        w_hat = rot.apply(w_hat.double(), inverse=True).float()
    row = LayerRow(name, "entropy", spec.describe() + " (GPTQ)", tuple(w.shape),
                   w.numel() * module.weight.element_size(), layer.nbytes, layer.bits_per_weight, rel,
                   time.perf_counter() - t0)
    return layer, row, w_hat


def gptq_checkpoint(src, dst, tokenizer, policy, calibration_text: str | None = None, max_tokens: int = 2048,
                    block: int = 128, damp: float = 0.01, skip=None, sequential: bool = True, device=None,
                    dtype: torch.dtype = torch.float32, progress: bool = False,
                    resume: bool = True) -> CompressionReport:
    """GPTQ-compress a checkpoint on disk block by block and save it to `dst` (a load_compressed file).

    policy: as compress_model_gptq ("entropy" specs, e.g. allocate_checkpoint's result). sequential=True: the
    GPTQ paper's order (each block calibrated on the outputs of the already-quantised blocks before it, and its
    layers quantised group by group, q/k/v -> o -> gate/up -> down); False: every C from the original model,
    byte for byte what compress_model_gptq writes. Parameters the policy leaves dense (embeddings, norms,
    lm_head) are stored in `dtype`, as a model loaded in that dtype would store them. damp: the fraction of
    the Hessian's mean diagonal added to it (slc.gptq). 0.01 is the GPTQ paper's; out of domain on SmolLM2,
    compress_to_budget uses 1.0 with rotating specs up to 4 bits (slc.recipe.DEFAULTS): at 0.01 GPTQ fits the
    calibration text and loses on other kinds of text (bench/results/frontier_ood.md).

    The file is written as compress_checkpoint writes it (slc.streaming): each compressed layer goes to its
    own part in the journal `.DST.journal/` as soon as it is made and is dropped, the dense tensors follow,
    and the file is assembled from the parts and renamed into place; so memory holds one block, never the
    compressed model, and a run that dies leaves the journal, never a half-written file. resume=True: a
    rerun (same checkpoint, calibration tokens, policy and settings) reuses the blocks whose layers are all
    in the journal (it still runs their forward pass, through the stored codes if sequential) and writes
    the same bytes as an uninterrupted run."""
    stream = checkpoint_stream(src, device, dtype)
    model, modules = stream.model, dict(stream.model.named_modules())
    chosen = chosen_layers(target_layers(model, skip), policy)
    per_block = block_layers(model, list(chosen), len(stream.blocks), src)
    seqs = calibration_sequences(stream, tokenizer, calibration_text, max_tokens)
    plan = gptq_plan(stream, chosen, seqs, block, damp, sequential, dtype)
    units = {u["name"]: u for u in plan.units}
    dst = Path(dst).absolute()
    journal = claim_journal(dst, resume)
    try:
        parts = finished_parts(journal, plan.units) if resume else {}
        hidden = stream.embed(seqs)
        ctxs = stream.contexts(hidden)
        for i in tqdm(range(len(stream.blocks)), desc="gptq blocks", unit="block", disable=not progress):
            blk = stream.load(stream.block_name(i))
            names = per_block[i]
            if all(n in parts for n in names):                           # done by an earlier run: its outputs only
                if sequential:
                    with torch.no_grad():
                        for n in names:
                            w_hat = part_layer(journal, units[n], parts[n][0]).weight_dense(torch.float32)
                            modules[n].weight.copy_(w_hat.to(modules[n].weight))
                hidden = stream.forward_all(blk, hidden, ctxs)
                stream.free(blk)
                continue
            for group in gptq_groups(stream, blk, names, hidden, ctxs, modules, sequential):
                hooks = StatsHooks({n: modules[n] for n in group}, full=True)
                try:
                    out = stream.forward_all(blk, hidden, ctxs, hooks)
                finally:
                    hooks.remove()
                for n in group:
                    layer, row, w_hat = gptq_layer(n, modules[n], chosen[n], hooks.stats[n].x_cov, block, damp)
                    tensors = {f"{n}.{k}": v for k, v in layer.state_dict().items()}
                    write_part(journal, units[n], tensors, layer.export_meta(), list(astuple(row)),
                               sum(s[5] for s in units[n]["sources"]))
                    parts[n] = finished_part(journal, units[n])
                    if sequential:                                        # later groups see the quantised layer
                        with torch.no_grad():
                            modules[n].weight.copy_(w_hat.to(modules[n].weight))
                    del layer, tensors, w_hat
                del hooks
            hidden = stream.forward_all(blk, hidden, ctxs) if sequential else out
            stream.free(blk)
        del hidden
        for unit in plan.units:                                           # what the policy leaves dense
            if unit["name"] not in parts:
                compress_unit(str(stream.checkpoint.path), unit, str(journal), errors=False)
                parts[unit["name"]] = finished_part(journal, unit)
        assemble(dst, plan, parts)
    finally:
        (journal / LOCK).unlink(missing_ok=True)                          # the parts stay until the file is in place
    shutil.rmtree(journal, ignore_errors=True)
    report = CompressionReport()
    for n in chosen:                                                      # the policy's order
        report.rows.append(LayerRow(*parts[n][0]["row"]))
        report.rows[-1].shape = tuple(report.rows[-1].shape)
    return report


def gptq_plan(stream: BlockStream, chosen: dict, seqs: list, block: int, damp: float, sequential: bool,
              dtype: torch.dtype) -> Plan:
    """The parts of gptq_checkpoint's file (slc.streaming.Plan): a GPTQ layer per chosen layer, identified by
    its source tensors, spec and everything its codes depend on (calibration tokens, block, damp, order), and
    the dense tensors; the metadata save_compressed writes for the skeleton."""
    model = stream.model
    ckpt = stream.checkpoint
    if stream.tied and isinstance(model.lm_head, nn.Linear):             # stored once, as a loaded model's tie
        model.lm_head.weight = model.model.embed_tokens.weight
    layers = {n: (spec, "gptq", getattr(model.get_submodule(n), "bias", None) is not None)
              for n, spec in chosen.items()}
    units, state_keys, tied = state_units(model, ckpt, layers, dtype)
    crc = 0
    for ids in seqs:
        crc = zlib.crc32(ids.to(torch.int64).numpy().tobytes(), crc)
    calibration = {"tokens": [int(s.shape[1]) for s in seqs], "crc32": f"{crc:08x}", "block": block, "damp": damp,
                   "sequential": sequential}
    for u in units:
        if u["kind"] == "gptq":
            u["gptq"] = calibration
    gen = getattr(model, "generation_config", None)
    return Plan(units, state_keys, tied, json.loads(model.config.to_json_string(use_diff=False)), type(model).__name__,
                None if gen is None else json.loads(gen.to_json_string(use_diff=False)), dtype, [], [], {})


def gptq_groups(stream: BlockStream, blk: nn.Module, names: list, hidden: list, ctxs: list, modules: dict,
                sequential: bool) -> list[list[str]]:
    """The groups block `blk`'s layers are quantised in: sequential, those sharing an input in execution order
    (q/k/v, o, gate/up, down; found by one forward pass); otherwise all at once."""
    if not sequential:
        return [names]
    hooks = StatsHooks({n: modules[n] for n in names})                   # x_sq only: the order and the groups
    try:
        stream.forward_all(blk, hidden, ctxs, hooks)
    finally:
        hooks.remove()
    groups = []
    for n in (n for n in hooks.stats if n in names):
        if hooks.stats[n].shared_with in (groups[-1] if groups else ()):
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def compress_model_gptq(model, tokenizer, policy, calibration_text: str | None = None, max_tokens: int = 2048,
                        block: int = 128, damp: float = 0.01, skip=None, progress: bool = False, *, out=None,
                        **kwargs) -> CompressionReport:
    """slc.compress_model_gptq: an nn.Module (slc.compress.compress_model_gptq, in place) or a checkpoint path
    (gptq_checkpoint, block by block, written to `out`; keywords sequential=, device=, dtype=)."""
    if is_path(model):
        if out is None:
            raise ValueError("compress_model_gptq(path, ...) writes a file: pass out='model.slc.safetensors'")
        return gptq_checkpoint(model, out, tokenizer, policy, calibration_text, max_tokens, block, damp, skip,
                               progress=progress, **kwargs)
    if out is not None or kwargs:
        raise TypeError(f"out= / {sorted(kwargs)} apply to a checkpoint path; with a model, save with save_compressed")
    return compress_model_gptq_dense(model, tokenizer, policy, calibration_text, max_tokens, block, damp, skip,
                                     progress)


# ----------------------------------------------------------------------------
# streamed evaluation

def compressed_stream(path, device=None) -> BlockStream:
    """A BlockStream over a save_compressed file: compressed layers materialised from their buffers, every
    tensor checked against its CRC32 as it is read."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    meta = read_meta(path)
    check_architecture(meta["config"], path)
    model = build_skeleton(meta, where=str(path))
    handle = safe_open(str(path), framework="pt", device="cpu")
    tied, sums = meta["tied"], meta["checksums"]

    def read(name):
        src = tied.get(name, name)
        if src not in sums:
            raise ValueError(f"{path}: no tensor {src!r} in the file")
        t = handle.get_tensor(src)
        verify_checksums({src: t}, {src: sums[src]}, where=str(path))
        return t

    return BlockStream(model, read, device, where=str(path))


def perplexity_streamed(path, tokenizer, text: str, window: int = 512, stride: int = 256, device=None) -> dict:
    """slc.metrics.perplexity_details of a save_compressed file, holding one decoded block at a time.

    The same windows (perplexity_windows); each window runs as its own sequence through every block, so the
    memory is the activations of all windows (2 x tokens x hidden floats at stride = window / 2) + one block."""
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string, e.g. slc.models.evaluation_text()")
    stream = compressed_stream(path, device)
    ids = tokenizer(text, return_tensors="pt").input_ids
    n = ids.shape[1]
    if n < 2:
        raise ValueError("text is too short: it must tokenise to at least 2 tokens")
    wins = perplexity_windows(n, window, stride)
    seqs = [ids[:, b:e] for b, e, _ in wins]
    hidden = stream.embed(seqs)
    ctxs = stream.contexts(hidden)
    modules = dict(stream.model.named_modules())
    for i in range(len(stream.blocks)):
        blk = stream.load(stream.block_name(i))
        for m in blk.modules():
            if isinstance(m, CompressedLinear):
                validate_loaded(m)
        hidden = stream.forward_all(blk, hidden, ctxs)
        stream.free(blk)
    norm = stream.load("model.norm")
    head = modules["lm_head"]
    if isinstance(head, TiedLinear):                                   # multiplies with the embedding's codes
        stream.load("model.embed_tokens")
    else:                                                             # a dense tie reads the embedding's tensor
        stream.load("lm_head")
    nll, scored = 0.0, 0
    with torch.no_grad():
        for (b, _, prev_end), h, seq in zip(wins, hidden, seqs, strict=True):
            labels = seq.clone().to(stream.device)
            labels[:, :prev_end - b] = -100                           # already scored: context only
            logits = head(norm(h)).float()[:, :-1]                    # predict token t+1 from <= t
            labels = labels[:, 1:]
            mask = labels != -100
            nll += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            scored += int(mask.sum())
    stream.free_head()
    assert scored == n - 1, (scored, n)
    return {"ppl": math.exp(nll / scored), "nll": nll / scored, "tokens": scored, "windows": len(wins)}

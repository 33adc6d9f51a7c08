"""Distillation of the floats a compressed model keeps: each row's step and the norms' gains, codes fixed
(and, where asked, a learned offset per row).

Once every layer's codes are chosen, a compressed model still holds floats that cost no extra bits: the step
(scale) of every row of a row-wise layer, already stored as one float32 per row, and the gains (and biases) of its
normalisation layers, stored as they were. The codes were chosen layer by layer, each for its own output error;
`distill` tunes those floats together, for the whole model's output, against the original model on calibration
text (the teacher):

    causal LM   KL(teacher || student) of the next-token distributions, over the whole vocabulary, per token
    encoder     the mean squared difference of the last hidden states, per token, over the teacher's mean square

Each tuned row keeps its codes c and its rotation R: its weight is exp(a_i) s_i c_i R^T with a_i = 0 at the start
(one log-factor per row: a row's scale cannot change sign, and Adam's steps are relative), so the stored format is
unchanged: only the numbers in each layer's `scale` buffer and in the norms' parameters move. Adam, learning rate
`lr` decayed linearly to 0, one calibration sequence (slc.calibrate.token_chunks: 512-token windows of the text
for a causal LM) per step, `epochs` passes in a seeded order.

With shift=True each tuned row also learns an offset added to its output (a bias the original layer did not
have; CompressedLinear.set_shift): it costs 16 bits per row (bfloat16), which the layer's size counts, and
compress_to_budget reserves them before it chooses the codes. A row's quantisation error has a mean over real
inputs (dW E[x], large where a few input channels carry large means), which no row scale or norm gain can
undo; the offset can. Session 17, SmolLM2 at 3.6 bits (the same codes distilled both ways, 0.023 bits/weight
of offsets on top): written seeds 1 / 2, in domain / prose / code, +3.7 / +11.1 / +5.3 and +4.6 / +12.7 / +4.8 %
against +3.1 / +17.1 / +5.8 and +5.6 / +22.5 / +6.1 % without; a per-column scale instead (the same bits)
gave +3.0 / +15.7 / +5.6 and +5.5 / +21.2 / +5.9 %. The offsets move by Adam's `lr` relative to each row's
norm, as the row steps do: a tenth, half or three times that measured worse on prose and code (session 18, the
figures in slc.recipe's DEFAULTS comment).

A causal LM also trains on text its teacher writes itself (teacher_sequences, GENERATED tokens beside the
calibration text: LLM-QAT's data-free distillation), which covers the kinds of text the calibration mix does not
(session 13, SmolLM2 at 3.32-3.53 bits: prose 5-7 points of perplexity better, every set and the KL on held-out
calibration documents better too; the figures are in slc.recipe's DEFAULTS comment).

It is the fine-tuning step of QuIP# and AQLM, restricted to the floats slc's format holds. Why it is worth doing
(bench/results/frontier_ood.md; calibrated on slc.texts' calibration mix, evaluated on held-out pydoc / package
READMEs and licences / stdlib source, perplexity in domain / prose / code): compress_to_budget's default on
SmolLM2 taken off its Q4_1 grid (the control) at 3.565 bits went from +9.1 / +41.0 / +13.0 % to +1.3 / +13.4 / +6.1 %,
at 3.357 bits from +10.0 / +64.9 / +17.8 % to +2.3 / +31.8 / +10.2 %, and SmolLM2 at 3.566 bits from
+6.4 / +40.9 / +7.2 % to +3.5 / +27.5 / +4.8 %: the prose the codes never saw gains most. The teacher's
distribution carries far more than the next token (the whole vocabulary at every position), and ~190 000 floats
against ~10 000 positions of it do not fit the text. slc.recipe has the one-off runs behind the
defaults (passes, learning rate, steps alone against steps and gains).

While it runs every compressed layer is swapped for a dense stand-in (its weight decoded once, in float32: the
memory of an fp32 copy of those layers, on top of the teacher's), and put back at the end; if anything fails half
way the model is left exactly as it was given (steps and gains restored).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibrate import CHUNK_TOKENS, eval_mode, token_chunks
from .hf import has_lm_head, set_module
from .nn import CompressedEmbedding, CompressedLinear

TOKENS = 20_480        # calibration tokens (40 windows of 512 for a causal LM): all of the mix and the model's text
EPOCHS = 2
LR = 1e-3              # Adam's step on the log-factors and the gains, decayed linearly to 0
GENERATED = 10_240     # tokens a causal LM's teacher writes itself (teacher_sequences), trained on beside the text
GENERATE_BATCH = 20    # teacher-written sequences sampled together


@dataclass
class DistillReport:
    """What distill did: how many floats it tuned, on how many tokens, and the loss along the way."""
    tokens: int                     # calibration-text tokens
    sequences: int                  # training sequences in all (calibration text + teacher-written)
    epochs: int
    rows: int                       # row steps tuned (one float each)
    gains: int                      # norm parameters tuned
    frozen: int                     # compressed layers kept as they were (not row-wise: grouped scales, low rank)
    loss: list = field(default_factory=list)     # mean loss over each epoch's sequences, as they trained
    seconds: float = 0.0
    generated: int = 0              # tokens the teacher wrote itself (teacher_sequences)
    shifts: int = 0                 # row offsets learned (shift=True: one bfloat16 each, stored in the layers)

    def __str__(self) -> str:
        path = " -> ".join(f"{x:.4f}" for x in self.loss)
        wrote = f" + {self.generated} the teacher wrote" if self.generated else ""
        shifts = f", {self.shifts} row shifts" if self.shifts else ""
        return (f"distilled {self.rows} row steps{shifts} and {self.gains} norm parameters on {self.tokens} tokens"
                f"{wrote} "
                f"({self.sequences} sequences x {self.epochs} epochs), loss per epoch {path}, "
                f"{self.frozen} layers kept, {self.seconds:.0f} s")


class RowScaled(nn.Module):
    """A dense stand-in for a CompressedLinear with one scale per row: weight = exp(a) s c R^T, a trainable; with
    shift=True also a trainable offset per row, b r (r = the row's norm ||s c||: Adam's steps on b are relative to
    the row's size), added to the layer's own bias and shift."""

    def __init__(self, layer: CompressedLinear, shift: bool = False):
        super().__init__()
        s = layer.scale.detach().double().reshape(-1)
        w = layer.weight_dense(torch.float64)                      # s_i c_i R^T: dividing the rows leaves c R^T
        self.register_buffer("unit", (w / torch.where(s == 0, 1.0, s)[:, None]).float())
        self.register_buffer("s0", s.float())
        self.log_a = nn.Parameter(torch.zeros_like(self.s0))
        self.register_buffer("offset0", layer.offset(torch.float32))
        self.register_buffer("row_norm", w.norm(dim=1).float())   # = s_i ||c_i||: R keeps norms
        self.b = nn.Parameter(torch.zeros_like(self.s0)) if shift else None

    def scale(self) -> torch.Tensor:
        return self.s0 * self.log_a.exp()

    def shift(self) -> torch.Tensor | None:
        """The learned offset per row (None without shift=True); the layer's own shift is in offset0."""
        return None if self.b is None else self.b * self.row_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, learned = self.offset0, self.shift()
        if learned is not None:
            offset = learned if offset is None else offset + learned
        return F.linear(x, (self.scale()[:, None] * self.unit).to(x.dtype),
                        None if offset is None else offset.to(x.dtype))


class Frozen(nn.Module):
    """A dense stand-in for a compressed layer distill leaves as it is (its weight decoded once)."""

    def __init__(self, layer: CompressedLinear):
        super().__init__()
        self.register_buffer("weight", layer.weight_dense(torch.float32))
        self.register_buffer("offset", layer.offset(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.offset is None else self.offset.to(x.dtype))


def row_wise(layer: CompressedLinear) -> bool:
    """A layer distill can tune: quantised or entropy-coded with one scale per output row, no zero points."""
    return (layer.kind in ("quantized", "entropy") and getattr(layer, "zero_point", None) is None
            and layer.scale.numel() == layer.out_features)


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The normalisation layers' parameters (LayerNorm, and RMSNorm-like modules by their class name)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith("Norm"):
            out.update({f"{name}.{k}": p for k, p in m.named_parameters(recurse=False) if p.is_floating_point()})
    return out


def distillation_loss(student_out, teacher_out, causal: bool) -> torch.Tensor:
    """Per token: KL(teacher || student) of the next-token distributions (causal LM), or the squared difference
    of the last hidden states over the teacher's mean square (encoder)."""
    if causal:
        lt = F.log_softmax(teacher_out.logits.float(), -1)
        ls = F.log_softmax(student_out.logits.float(), -1)
        return (lt.exp() * (lt - ls)).sum(-1).mean()
    t, s = teacher_out.last_hidden_state.float(), student_out.last_hidden_state.float()
    return ((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-30)


@torch.no_grad()
def teacher_sequences(teacher: nn.Module, tokenizer, tokens: int, length: int = CHUNK_TOKENS, seed: int = 0,
                      batch: int = GENERATE_BATCH, progress: bool = True) -> list[torch.Tensor]:
    """About `tokens` tokens of text the causal LM `teacher` writes itself, as (1, length) id tensors.

    Each sequence starts from a token drawn uniformly from the vocabulary (special tokens excluded) and goes on by
    sampling the teacher's own next-token distribution (temperature 1, no top-k / top-p, special tokens never
    drawn), as LLM-QAT's data-free distillation does (Liu et al. 2023): text of every kind the model knows, in
    the proportions it believes, not only the kind the calibration text is. Seeded: the same seed gives the same
    sequences."""
    if not has_lm_head(teacher):
        raise ValueError("teacher_sequences needs a causal LM (a model with a language-model head)")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens={tokens!r} must be a whole number >= 1")
    cfg = getattr(teacher, "config", None)
    length = min(length, getattr(cfg, "max_position_embeddings", None) or length)
    if length < 2:
        raise ValueError(f"length={length!r} must be at least 2 tokens")
    device = next(teacher.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    special = sorted(set(getattr(tokenizer, "all_special_ids", None) or []))
    vocab = teacher.get_output_embeddings().weight.shape[0]
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[i for i in special if i < vocab]] = False
    n = -(-tokens // length)
    out, mode = [], eval_mode(teacher)
    bar = tqdm(total=n * (length - 1), desc="teacher writes", unit="tok", disable=not progress)
    try:
        for start in range(0, n, batch):
            b = min(batch, n - start)
            ids = torch.multinomial(allowed.float().expand(b, -1), 1, generator=gen)     # uniform first tokens
            cache = None
            for _ in range(length - 1):
                o = teacher(input_ids=ids[:, -1:].to(device), cache=cache, use_cache=True)
                cache, logits = o.cache, o.logits[:, -1].float().cpu()
                logits[:, ~allowed] = -math.inf
                ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)], 1)
                bar.update(b)
            out += [ids[i:i + 1] for i in range(b)]
    finally:
        bar.close()
        mode.remove()
    return out


def distill(model: nn.Module, teacher: nn.Module, tokenizer, text: str, tokens: int = TOKENS, epochs: int = EPOCHS,
            lr: float = LR, seed: int = 0, progress: bool = True, generated: int | None = None,
            shift: bool = False) -> DistillReport:
    """Tune `model`'s row steps and norm gains (codes fixed) to match `teacher` (the uncompressed model) on `text`.

    model: holds CompressedLinear layers (compress_to_budget, compress_model, ...); teacher: the original model,
    same architecture, left unchanged. tokens: the first `tokens` tokens of `text`, in the sequences the model
    takes (slc.calibrate.token_chunks). generated: that many more tokens the teacher writes itself
    (teacher_sequences, causal LMs only), trained on beside the text; None: GENERATED for a causal LM, 0 for an
    encoder. shift: also learn an offset per row of every tuned layer (CompressedLinear.set_shift: 16 bits per
    row, added to the layers' size). Returns a DistillReport; the model is changed in place only when it
    completes (a failure or interrupt leaves it as given)."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be a whole number >= 1")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a positive number")
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, CompressedLinear) and not isinstance(m, CompressedEmbedding)}
    if not layers:
        raise ValueError("distill tunes a compressed model: this one holds no CompressedLinear layer")
    if teacher is model:
        raise ValueError("teacher must be the original model, not the compressed one")
    causal = has_lm_head(model)
    generated = (GENERATED if causal else 0) if generated is None else generated
    if isinstance(generated, bool) or not isinstance(generated, int) or generated < 0:
        raise ValueError(f"generated={generated!r} must be a whole number of tokens >= 0")
    if generated and not causal:
        raise ValueError("generated= needs a causal LM: an encoder writes no text")
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be True or False, got {shift!r}")
    t0 = time.perf_counter()
    chunks = token_chunks(model, tokenizer, text, tokens)
    n_text = sum(c.shape[1] for c in chunks)
    if generated:
        chunks += teacher_sequences(teacher, tokenizer, generated, seed=seed, progress=progress)
    gains = norm_parameters(model)
    saved_gains = {k: p.detach().clone() for k, p in gains.items()}
    stand_ins = {n: RowScaled(m, shift) if row_wise(m) else Frozen(m) for n, m in layers.items()}
    req = {p: p.requires_grad for p in (*model.parameters(), *teacher.parameters())}
    modes = [eval_mode(model), eval_mode(teacher)]
    report = DistillReport(n_text, len(chunks), epochs,
                           sum(m.s0.numel() for m in stand_ins.values() if isinstance(m, RowScaled)),
                           sum(p.numel() for p in gains.values()),
                           sum(isinstance(m, Frozen) for m in stand_ins.values()),
                           generated=sum(c.shape[1] for c in chunks) - n_text,
                           shifts=sum(m.s0.numel() for m in stand_ins.values() if isinstance(m, RowScaled)) if shift
                           else 0)
    device = next(model.parameters()).device
    bar = tqdm(total=epochs * len(chunks), desc="distill", unit="seq", disable=not progress)
    try:
        for p in req:
            p.requires_grad_(False)
        for n, m in stand_ins.items():
            set_module(model, n, m)
        tuned = [m for m in stand_ins.values() if isinstance(m, RowScaled)]
        params = [m.log_a for m in tuned] + [m.b for m in tuned if m.b is not None] + list(gains.values())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        total, step = epochs * len(chunks), 0
        for _ in range(epochs):
            run, done = 0.0, 0
            for i in torch.randperm(len(chunks), generator=gen).tolist():
                x = chunks[i].to(device)
                with torch.no_grad():
                    want = teacher(x)
                loss = distillation_loss(model(x), want, causal)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"distillation loss is {loss.item()} at step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for g in opt.param_groups:
                    g["lr"] = lr * (1 - step / total)
                opt.step()
                run, done, step = run + loss.item(), done + 1, step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{run / done:.4f}")
            report.loss.append(run / len(chunks))
    except BaseException:
        with torch.no_grad():
            for k, p in gains.items():
                p.copy_(saved_gains[k])
        raise
    finally:
        bar.close()
        for n, m in layers.items():
            set_module(model, n, m)
        for p, r in req.items():
            p.requires_grad_(r)
            p.grad = None
        for mode in modes:
            mode.remove()
    for n, m in stand_ins.items():                                  # completed: the tuned steps into the layers
        if isinstance(m, RowScaled):
            layers[n].set_scale(m.scale().detach())
            if shift:
                old = getattr(layers[n], "shift", None)
                layers[n].set_shift(m.shift().detach() + (0 if old is None else old.float()))
    report.seconds = time.perf_counter() - t0
    return report

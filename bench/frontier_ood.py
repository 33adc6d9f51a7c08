"""Quality per bit out of domain: calibrate on slc.texts' calibration mix, evaluate on text of other kinds.

    python bench/frontier_ood.py                       # every phase, both models
    python bench/frontier_ood.py --phase weighted      # one phase (rows are merged into the JSON)
    python bench/frontier_ood.py --report              # rewrite the table from the JSON only

Calibration: `slc.texts.calibration_mix` (pydoc topics, even ones, and stdlib docstrings). Evaluation, each
sharing no source with it: "in-domain" (held-out pydoc topics), "prose" (package READMEs and licences) and
"code" (stdlib source never calibrated on). SmolLM2: perplexity on each set (window 512, stride 512);
MiniLM: mean sentence-embedding cosine vs fp32 over paragraphs of each set. Every row compresses the
nn.Linear layers inside the blocks; bits/weight count every byte those layers hold (rANS words, states,
tables, scales, escapes), GGUF the format's own size.

Phases:
    reference fp32 (every chart and table measures against it)
    base      GGUF Q4_0 / Q5_0, RTN int4 g32 and ECSQ one step, without and with activation-weighted scales
    uniform   ECSQ one step at ~3.5 bits/weight, without and with weighted scales (against allocation)
    alloc     ECSQ allocated at several budgets: plain, weighted scales, + GPTQ
    gptq      GPTQ at 3.825 bits: calibration text, tokens and damping (what generalises out of domain)
    rotate    LinearSpec(rotate="hadamard") (slc.rotation) through the real CompressedLinear layers, against
              the same specs unrotated: RTN int4/g32, ECSQ one step (plain and weighted), ECSQ allocated
    budget    slc.compress_to_budget at several budgets
    frontier  the issue-13 frontier in one run: compress_to_budget's variants (ECSQ allocation or one step for
              every layer, + activation-weighted steps, without and with GPTQ, without and with the Hadamard
              rotation; one calibration each, reused across budgets) at 2.5 / 3.0 / 3.5 / 4.0 / 4.5 / 5.5 bits
    targets   compress_to_budget's default at every llama.cpp preset's bits (<= 4.5, with imatrix) and 20 % below
Writes bench/results/frontier_ood.json (or --json FILE, so that runs of different models or phases can go
side by side) and bench/results/frontier_ood.md from every bench/results/frontier_ood*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slc import CompressedTensor, Quantizer, metrics, models, texts  # noqa: E402
from slc.allocate import allocate, rate_distortion  # noqa: E402
from slc.calibrate import layer_stats  # noqa: E402
from slc.gguf_peers import gguf_roundtrip  # noqa: E402
from slc.gptq import gptq  # noqa: E402
from slc.hf import target_layers  # noqa: E402
from slc.importance import weighted_quantize  # noqa: E402
from slc.hf import set_module  # noqa: E402
from slc.nn import CompressedLinear, DecodeCache, LinearSpec  # noqa: E402
from slc.recipe import GPTQ_DAMP as DAMP  # noqa: E402  (GPTQ's damping unless a variant says otherwise)
from slc.rotation import rotate_stats  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SETS = ("in-domain", "prose", "code")
MODELS = ("smollm2-135m", "minilm-l6")
CONTROL = "smollm2-135m-dithered"   # SmolLM2 off its Q4_1 grid (slc.models): run only when asked (--model)
EVAL_CHARS = 12_000           # per evaluation set (2 850-3 480 SmolLM2 tokens each)
CAL_CHARS = 40_000            # calibration mix (~10 000 tokens); each use takes its first N tokens
ALLOC_TOKENS = 1_024          # Fisher / Gauss-Newton pass of the allocation
STATS_TOKENS = 4_096          # input moments for weighted scales and GPTQ
BUDGETS = (3.5, 3.825, 4.5)
ECSQ_STEP = 0.25              # one step everywhere, ~4 bits/weight
UNIFORM_STEP = 0.38           # ... and ~3.5 bits/weight
GPTQ_BUDGET = 3.825
GPTQ_BUDGETS = (3.825,)
TARGET_BUDGETS = (3.5, 4.5)
FRONTIER_BUDGETS = (2.5, 3.0, 3.5, 4.0, 4.5, 5.5)


def buffer_bits(qt) -> float:
    ct = CompressedTensor.from_quantized(qt)
    return 8.0 * sum(v.numel() * v.element_size() for v in ct.buffers().values())


def paragraphs(text: str, n: int = 30, size: int = 400) -> list[str]:
    """Pieces of about `size` characters, cut at line ends, for sentence embeddings."""
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        cur += line
        if len(cur) >= size:
            out.append(cur.strip())
            cur = ""
    return [p for p in out if p][:n]


class Bench:
    def __init__(self, key: str):
        self.key = key
        self.model, self.tok = models.load(key)
        self.lm = models.task(key) == "causal-lm"
        self.layers = target_layers(self.model)
        self.orig = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        self.numel = sum(w.numel() for w in self.orig.values())
        self.sets = texts.evaluation_sets(EVAL_CHARS)
        self.cal = texts.calibration_mix(CAL_CHARS)
        if not self.lm:
            self.pieces = {k: paragraphs(v) for k, v in self.sets.items()}
            self.ref = {k: metrics.sentence_embedding(self.model, self.tok, p).double() for k, p in self.pieces.items()}
        self._stats = {}
        self.phase = ""

    def measure(self, model=None) -> dict:
        """The scores of `model` (default: self.model as it is) on every evaluation set."""
        model = self.model if model is None else model
        if self.lm:
            return {k: metrics.perplexity(model, self.tok, v, window=512, stride=512)
                    for k, v in self.sets.items()}
        out = {}
        for k, p in self.pieces.items():
            e = metrics.sentence_embedding(model, self.tok, p).double()
            out[k] = float((e * self.ref[k]).sum(-1).mean())
        return out

    def score(self, w_hat: dict | None, measure=None) -> dict:
        """measure() (default self.measure) with the block layers' weights set to w_hat, then put back."""
        measure = measure or self.measure
        if w_hat is None:
            return measure()
        with torch.no_grad():
            for n, m in self.layers.items():
                m.weight.copy_(w_hat[n].to(m.weight.dtype))
            try:
                return measure()
            finally:
                for n, m in self.layers.items():
                    m.weight.copy_(self.orig[n])

    def stats(self, text_key: str = "mix", tokens: int = STATS_TOKENS, full: bool = True):
        key = (text_key, tokens, full)
        if key not in self._stats:
            text = self.cal if text_key == "mix" else models.calibration_text(12_000)
            t0 = time.perf_counter()
            self._stats[key] = layer_stats(self.model, self.tok, text, list(self.orig), tokens, full=full)
            print(f"  stats {key}: {time.perf_counter() - t0:.0f} s", flush=True)
        return self._stats[key]

    def rd(self):
        if not hasattr(self, "_rd"):
            t0 = time.perf_counter()
            self._rd = rate_distortion(self.model, self.tok, self.cal, max_tokens=ALLOC_TOKENS)
            print(f"  rate-distortion ({self._rd.settings['sensitivity']}, {self._rd.settings['tokens']} tokens): "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        return self._rd


def quantize_all(b: Bench, quantizers: dict, weighted: bool = False, use_gptq: bool = False, stats=None,
                 damp: float = 0.01):
    """Every layer on its quantiser (plain, activation-weighted scales, and/or GPTQ codes): (w_hat, bits/w)."""
    out, bits = {}, 0.0
    for n, w in b.orig.items():
        q = quantizers[n]
        qt = weighted_quantize(w, q, stats[n].x_sq) if weighted else q.quantize(w)
        if use_gptq:
            qt = gptq(w, stats[n].x_cov, q, damp=damp, grid=qt if weighted else None)
        out[n] = qt.dequantize()
        bits += buffer_bits(qt)
    return out, bits / b.numel


def record(rows: list, b: Bench, name: str, bits: float, w_hat, t0: float, note: str = "", group: str = "",
           seconds: float | None = None, model=None):
    """Score w_hat (or `model`, a compressed model as it is: every parameter it holds, its tuned norms included)
    and append the row; seconds: the compression's own time (default: since t0, scoring included)."""
    res = b.measure(model) if model is not None else b.score(w_hat)
    took = time.perf_counter() - t0 if seconds is None else seconds
    row = {"model": b.key, "phase": b.phase, "name": name, "group": group, "bits": bits, "scores": res,
           "seconds": round(took, 1), "note": note}
    rows.append(row)
    shown = "  ".join(f"{k} {v:.4f}" for k, v in res.items())
    print(f"  {b.key:12s} {name:44s} {bits:6.3f} bits/w  {shown}  ({row['seconds']} s)", flush=True)
    save(rows)
    return row


def phase_reference(b: Bench, rows: list):
    record(rows, b, "fp32", 32.0, None, time.perf_counter(), group="reference")


def phase_base(b: Bench, rows: list):
    for qtype, bits in (("Q4_0", 4.5), ("Q5_0", 5.5)):
        t0 = time.perf_counter()
        record(rows, b, f"GGUF {qtype}", bits, {n: gguf_roundtrip(w, qtype)[0] for n, w in b.orig.items()}, t0,
               group="GGUF")
    st = b.stats()
    q4 = Quantizer(bits=4, granularity="group", group_size=32)
    for weighted in (False, True):
        t0 = time.perf_counter()
        w, bits = quantize_all(b, {n: q4 for n in b.orig}, weighted, stats=st)
        tag = " weighted" if weighted else ""
        record(rows, b, f"RTN int4/g32{tag} + rANS", bits, w, t0, note="packed: 5.000 bits/w", group="int4 g32")
    qe = Quantizer(mode="ecsq", step=ECSQ_STEP)
    for weighted in (False, True):
        t0 = time.perf_counter()
        w, bits = quantize_all(b, {n: qe for n in b.orig}, weighted, stats=st)
        record(rows, b, f"ECSQ step {ECSQ_STEP}{' weighted' if weighted else ''}", bits, w, t0, group="ECSQ step")


def phase_uniform(b: Bench, rows: list):
    """One step everywhere at ~3.5 bits/weight: does the per-layer allocation generalise out of domain?"""
    st = b.stats(full=False)
    q = Quantizer(mode="ecsq", step=UNIFORM_STEP)
    for weighted in (False, True):
        t0 = time.perf_counter()
        w, bits = quantize_all(b, {n: q for n in b.orig}, weighted, stats=st)
        record(rows, b, f"ECSQ step {UNIFORM_STEP}{' weighted' if weighted else ''}", bits, w, t0,
               group="ECSQ step")


def phase_alloc(b: Bench, rows: list):
    rd, st = b.rd(), b.stats()
    for budget in BUDGETS:
        pol = allocate(b.model, b.tok, budget, rd=rd)
        qs = {n: pol[n].quantizer for n in b.orig}
        variants = [("", {}), (" weighted", {"weighted": True})]
        if budget in GPTQ_BUDGETS:
            variants.append((" weighted + GPTQ", {"weighted": True, "use_gptq": True}))
        for label, kw in variants:
            t0 = time.perf_counter()
            w, bits = quantize_all(b, qs, stats=st, **kw)
            record(rows, b, f"ECSQ allocated {budget:g}{label}", bits, w, t0, group=f"allocated{label}")


def phase_gptq(b: Bench, rows: list):
    pol = allocate(b.model, b.tok, GPTQ_BUDGET, rd=b.rd())
    qs = {n: pol[n].quantizer for n in b.orig}
    for text_key, tokens, damp in (("pydoc", 2048, 0.01), ("mix", STATS_TOKENS, 0.01), ("mix", STATS_TOKENS, 0.1)):
        st = b.stats(text_key, tokens)
        t0 = time.perf_counter()
        w, bits = quantize_all(b, qs, use_gptq=True, stats=st, damp=damp)
        src = "pydoc slice" if text_key == "pydoc" else "calibration mix"
        record(rows, b, f"ECSQ allocated {GPTQ_BUDGET:g} + GPTQ ({src}, {tokens} tok, damp {damp:g})", bits, w,
               t0, group="GPTQ tuning")


def swap_in(b: Bench, specs: dict, weighted: bool, cache: DecodeCache) -> float:
    """Swap a CompressedLinear of its spec in for every layer (a rotating spec stores W R and rotates the
    activations in forward; weighted: scales for diag(R^T C R)); returns bits/weight of every byte they hold."""
    nbytes, stats = 0, b.stats() if weighted else None
    for n, m in b.layers.items():
        spec = replace(specs[n], cache=cache)
        if weighted:
            rot = spec.rotation(m.weight.shape[1])
            w = b.orig[n] if rot is None else rot.apply(b.orig[n].double()).float()
            x_sq = stats[n].x_sq if rot is None else rotate_stats(stats[n].x_cov, rot)
            layer = CompressedLinear.from_quantized(weighted_quantize(w, spec.quantizer, x_sq), spec, m.bias)
        else:
            layer = CompressedLinear.from_linear(m, spec)
        set_module(b.model, n, layer)
        nbytes += layer.nbytes
    return 8 * nbytes / b.numel


def phase_rotate(b: Bench, rows: list):
    q4 = Quantizer(bits=4, granularity="group", group_size=32)
    qe = Quantizer(mode="ecsq", step=ECSQ_STEP)
    cases = [("RTN int4/g32 + rANS", q4, False), (f"ECSQ step {ECSQ_STEP}", qe, False),
             (f"ECSQ step {ECSQ_STEP} weighted", qe, True), ("ECSQ allocated 3.5", None, False)]
    for name, q, weighted in cases:
        for rotate in (None, "hadamard"):
            t0 = time.perf_counter()
            if q is None:
                rd = rate_distortion(b.model, b.tok, b.cal, max_tokens=ALLOC_TOKENS, rotate=rotate)
                specs = allocate(b.model, b.tok, 3.5, rd=rd)
            else:
                specs = {n: LinearSpec("entropy", q, rotate=rotate) for n in b.orig}
            try:
                bits = swap_in(b, specs, weighted, DecodeCache(2 << 30))
                record(rows, b, f"{name}{' rotated' if rotate else ''} (CompressedLinear)", bits, None, t0,
                       group="rotated" if rotate else "CompressedLinear",
                       note="stored rotated: LinearSpec(rotate='hadamard')" if rotate else "")
            finally:
                for n, m in b.layers.items():
                    set_module(b.model, n, m)


def phase_budget(b: Bench, rows: list):
    from slc.recipe import compress_to_budget
    for budget in b.budgets or TARGET_BUDGETS:
        model, tok = models.load(b.key)
        t0 = time.perf_counter()
        rep = compress_to_budget(model, tok, budget, calibration_text=b.cal, progress=False)
        record(rows, b, f"compress_to_budget {budget:g}", rep.bits_per_weight, None, t0, note=rep.recipe,
               group="compress_to_budget", model=model)


def default_variant(b: Bench, budget: float) -> tuple:
    """(allocation, use_gptq, rotate, gptq_damp, written) that compress_to_budget picks for this model at this
    budget: calibrate_for_budget's arguments (see calibration_of)."""
    from slc.recipe import default_recipe
    r = default_recipe("causal-lm" if b.lm else "encoder", budget)
    return r["allocation"], r["use_gptq"], r["rotate"], r["gptq_damp"], r["written"]


def calibration_of(b: Bench, variant: tuple, cache: dict):
    """calibrate_for_budget on the bench's calibration mix for a default_variant, once per variant."""
    from slc.recipe import calibrate_for_budget
    if variant not in cache:
        allocation, use_gptq, rotate, damp, written = variant
        cache[variant] = calibrate_for_budget(b.model, b.tok, b.cal, progress=False, use_gptq=use_gptq,
                                              rotate=rotate, allocation=allocation, gptq_damp=damp, written=written)
    return cache[variant]


# (allocation, GPTQ, rotation, GPTQ's damping, the allocation's temper, trellis codes): sensitivity allocation or
# one step x without / with GPTQ x without / with rotation at the usual damping, then GPTQ damped 100 x harder
# (trusting the calibration text less), then that with the allocation tempered (session 8: the causal-LM default up
# to 4 bits), all with ECSQ codes; then the two defaults (causal LMs up to 4 bits, encoders) with trellis codes
# (session 10). The trellis flag is always passed, so a variant's codes never follow compress_to_budget's default.
VARIANTS = ([(alloc, gptq, rot, DAMP, 1.0, False) for alloc in ("sensitivity", "uniform")
             for rot in (None, "hadamard") for gptq in (False, True)]
            + [("sensitivity", True, rot, 1.0, 1.0, False) for rot in (None, "hadamard")]
            + [("sensitivity", True, "hadamard", 1.0, 0.5, False)]
            + [("sensitivity", True, "hadamard", 1.0, 0.5, True), ("sensitivity", True, "hadamard", DAMP, 1.0, True)])


def variant_label(allocation: str, use_gptq: bool, rotate, damp: float = DAMP, temper: float = 1.0,
                  trellis: bool = False) -> str:
    gptq = (" + GPTQ" + (f" damp {damp:g}" if damp != DAMP else "")) if use_gptq else ""
    return (("one step" if allocation == "uniform" else "allocated" + (f" (tempered {temper:g})" if temper != 1
                                                                         else ""))
            + " + weighted" + gptq + (" + rotation" if rotate else "") + (" + trellis" if trellis else ""))


def phase_frontier(b: Bench, rows: list):
    """compress_to_budget's variants (VARIANTS: sensitivity allocation or one step, without / with GPTQ, without /
    with the rotation; --variant picks some) at every budget, each on a fresh copy of the fp32 model. Which one
    compress_to_budget picks by default (DEFAULTS in slc.recipe) is set from these rows; phase 'targets' then runs
    that default."""
    import copy

    from slc.recipe import calibrate_for_budget, compress_to_budget
    for allocation, use_gptq, rotate, damp, temper, trellis in b.variants or VARIANTS:
        cal = calibrate_for_budget(b.model, b.tok, b.cal, progress=False, use_gptq=use_gptq, rotate=rotate,
                                   allocation=allocation, gptq_damp=damp)
        label = variant_label(allocation, use_gptq, rotate, damp, temper, trellis)
        print(f"  calibration ({label}): {cal.seconds:.0f} s", flush=True)
        for budget in b.budgets or FRONTIER_BUDGETS:
            model = copy.deepcopy(b.model)
            rep = compress_to_budget(model, b.tok, budget, progress=False, calibration=cal, temper=temper,
                                     trellis=trellis, distill=False)      # the variants predate slc.distill
            sd = {n: model.get_submodule(n).weight_dense(torch.float32) for n in b.orig}
            row = record(rows, b, f"slc {budget:g}: {label}", rep.bits_per_weight, sd, 0.0, note=rep.recipe,
                         group=f"slc {label}", seconds=cal.seconds + rep.seconds)   # as one call would take
            row.update(budget=budget, allocation=allocation, gptq=use_gptq, rotate=rotate, gptq_damp=damp,
                       temper=temper, trellis=trellis)
            save(rows)
            del model


def among(budget: float, budgets) -> bool:
    """Whether a row's budget is one of `budgets` (--budgets), to the 3 decimals rows are named with."""
    return any(abs(budget - x) < 5e-4 for x in budgets)


def preset_budgets(key: str, max_bits: float = 4.5, fewer: float = 0.2) -> dict:
    """{budget: [why]} from bench/peers.py's rows of `key`: every llama.cpp preset + imatrix at <= max_bits nominal
    (Q4_0 + imatrix lands on 4.513 on SmolLM2), at its own bits/weight and with `fewer` (20 %) fewer (the issue's
    targets). Budgets within 0.02 bits share one row, at the lowest of them (never more bits than a preset)."""
    path = RESULTS / "frontier_ood_peers.json"
    if not path.exists():
        raise SystemExit("phase 'targets' needs bench/results/frontier_ood_peers.json: run bench/peers.py first")
    wanted = []
    for r in json.loads(path.read_text())["rows"]:
        if r["model"] == key and r["group"] == "llama.cpp + imatrix" and r["bits"] <= max_bits + 0.02:
            preset = r["name"].removeprefix("llama.cpp ").removesuffix(" + imatrix")
            wanted += [(r["bits"], f"{preset}'s bits"), (r["bits"] * (1 - fewer), f"{fewer:.0%} below {preset}")]
    out = {}
    for bits, why in sorted(wanted):
        near = next((k for k in out if abs(k - bits) < 0.02), None)
        out.setdefault(near if near is not None else round(bits, 3), []).append(why)
    return out


def phase_targets(b: Bench, rows: list):
    """compress_to_budget (its default recipe) at every preset's bits and 20 % below: the issue's targets, measured."""
    import copy

    from slc.recipe import compress_to_budget
    cals = {}
    for budget, why in preset_budgets(b.key).items():
        if b.budgets and not among(budget, b.budgets):                            # --budgets: only these rows
            continue
        model = copy.deepcopy(b.model)
        allocation, use_gptq, rotate, damp, written = variant = default_variant(b, budget)
        cal = calibration_of(b, variant, cals)
        rep = compress_to_budget(model, b.tok, budget, progress=False, calibration=cal)
        row = record(rows, b, f"compress_to_budget {budget:.3f}", rep.bits_per_weight, None, 0.0,   # the model
                     note=f"{rep.recipe}; budget = {', '.join(why)}", group="compress_to_budget",   # as it is:
                     seconds=cal.seconds + rep.seconds, model=model)                               # its norms too
        row.update(budget=budget, allocation=allocation, gptq=use_gptq, rotate=rotate, gptq_damp=damp, target=why,
                   temper=rep.allocation.settings.get("temper", 1.0), written=written)
        save(rows)


PHASES = {"reference": phase_reference, "base": phase_base, "uniform": phase_uniform, "alloc": phase_alloc,
          "gptq": phase_gptq, "rotate": phase_rotate, "budget": phase_budget, "frontier": phase_frontier,
          "targets": phase_targets}


JSON = {"path": RESULTS / "frontier_ood.json"}


def json_path() -> Path:
    return JSON["path"]


def all_rows() -> list:
    """Rows of every frontier_ood*.json (runs of different models may write separate files)."""
    rows = []
    for p in sorted(RESULTS.glob("frontier_ood*.json")):
        rows += json.loads(p.read_text())["rows"]
    return rows


def load_rows() -> list:
    p = json_path()
    return json.loads(p.read_text())["rows"] if p.exists() else []


def save(rows: list) -> None:
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "eval_chars": EVAL_CHARS,
            "cal_chars": CAL_CHARS, "alloc_tokens": ALLOC_TOKENS, "stats_tokens": STATS_TOKENS}
    json_path().parent.mkdir(parents=True, exist_ok=True)
    json_path().write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def seconds(row: dict) -> str:
    """Compress seconds of a row: slc's own rows (frontier, targets: calibration + compression); '—' for rows whose
    time also holds their scoring or whose tool ran elsewhere (llama.cpp: bench/results/peers.json)."""
    return f"{row['seconds']:.0f}" if row.get("phase") in ("frontier", "targets") else "—"


def variants_table(rows: list, key: str) -> list[str]:
    """Phase 'frontier' of one model as budgets x variants; each cell: bits/weight, then quality in domain / prose
    / code (SmolLM2: Δ perplexity %, MiniLM: cosine). Variants not run (or not at that budget) are left out / '—'."""
    ref = next((r["scores"] for r in rows if r["model"] == key and r["name"] == "fp32"), None)
    mine = [r for r in rows if r["model"] == key and r.get("phase") == "frontier"]
    if ref is None or not mine:
        return []
    labels = [variant_label(*v) for v in VARIANTS if any(r["group"] == f"slc {variant_label(*v)}" for r in mine)]
    out = ["| budget | " + " | ".join(labels) + " |", "|---:|" + "---|" * len(labels)]
    for budget in sorted({r["budget"] for r in mine}):
        cells = [f"{budget:g}"]
        for label in labels:
            r = next((r for r in mine if r["budget"] == budget and r["group"] == f"slc {label}"), None)
            if r is None:
                cells.append("—")
            elif models.task(key) == "causal-lm":
                cells.append(f"{r['bits']:.2f}: " + " / ".join(f"{100 * (r['scores'][k] / ref[k] - 1):+.0f}"
                                                                 for k in SETS))
            else:
                cells.append(f"{r['bits']:.2f}: " + " / ".join(f"{r['scores'][k]:.3f}" for k in SETS))
        out.append("| " + " | ".join(cells) + " |")
    return out


def targets_table(rows: list) -> list[str]:
    """The issue's targets, from phase 'targets' and the peers' rows: per llama.cpp preset + imatrix at <= 4.5 bits,
    compress_to_budget at the preset's bits (better in every set?) and with 20 % fewer (as good in every set?)."""
    out = ["| model | preset + imatrix | bits | in / prose / code | slc at its bits | in / prose / code | better in |"
           " slc 20 % fewer | in / prose / code | as good in |", "|" + "|".join(["---"] * 10) + "|"]
    for key in (*MODELS, CONTROL):
        lm = models.task(key) == "causal-lm"
        ref = next((r["scores"] for r in rows if r["model"] == key and r["name"] == "fp32"), None)
        ctb = [r for r in rows if r["model"] == key and r.get("phase") == "targets"]
        if ref is None or not ctb:
            continue
        def fmt(sc, lm=lm, ref=ref):
            if lm:
                return " / ".join(f"{100 * (sc[k] / ref[k] - 1):+.1f} %" for k in SETS)
            return " / ".join(f"{sc[k]:.4f}" for k in SETS)

        def wins(mine, peer, lm=lm):
            sets = [k for k in SETS if (mine["scores"][k] <= peer["scores"][k]) == lm
                    or mine["scores"][k] == peer["scores"][k]]
            return "all three" if len(sets) == len(SETS) else (", ".join(sets) or "none")

        for peer in sorted((r for r in rows if r["model"] == key and r["group"] == "llama.cpp + imatrix"
                            and r["bits"] <= 4.52), key=lambda r: -r["bits"]):
            preset = peer["name"].removeprefix("llama.cpp ").removesuffix(" + imatrix")
            own = next((r for r in ctb if f"{preset}'s bits" in r.get("target", [])), None)
            less = next((r for r in ctb if f"20% below {preset}" in r.get("target", [])), None)
            cells = [key, preset, f"{peer['bits']:.3f}", fmt(peer["scores"])]
            for r in (own, less):       # bits: and how many fewer than the preset's (compress_to_budget's budget
                if r is None:           # is a ceiling, so a row never holds more than it was asked for)
                    cells += ["—", "—", "—"]
                    continue
                fewer = f" ({100 * (1 - r['bits'] / peer['bits']):.1f} % fewer)" if r is less else ""
                cells += [f"{r['bits']:.3f}{fewer}", fmt(r["scores"]), wins(r, peer)]
            out.append("| " + " | ".join(cells) + " |")
    return out


def control_table(rows: list) -> list[str]:
    """Every row of the control model (CONTROL): bits/weight, perplexity and Δ % against its fp32 in each set."""
    mine = [r for r in rows if r["model"] == CONTROL]
    ref = next((r["scores"] for r in mine if r["name"] == "fp32"), None)
    if ref is None or len(mine) < 2:
        return []
    out = ["| row | bits/w | " + " | ".join(f"ppl {k} | Δ %" for k in SETS) + " | s |",
           "|---|" + "---:|" * (2 * len(SETS) + 2)]
    for r in sorted(mine, key=lambda r: (r["name"] != "fp32", r["group"] != "llama.cpp", -r["bits"])):
        cells = [r["name"], f"{r['bits']:.3f}"]
        for k in SETS:
            v = r["scores"][k]
            cells += [f"{v:.3f}", "—" if r["name"] == "fp32" else f"{100 * (v / ref[k] - 1):+.1f}"]
        out.append("| " + " | ".join(cells + [seconds(r)]) + " |")
    return out


def report(rows: list, load_note: str) -> str:
    lines = ["# Quality per bit out of domain (bench/frontier_ood.py)", "", load_note, "",
             "Calibration: `slc.texts.calibration_mix` (pydoc topics, even ones, + stdlib docstrings). Evaluation "
             f"sets ({EVAL_CHARS} characters each, none sharing a source with the calibration): in-domain = held-out "
             "pydoc topics; prose = package READMEs + licences; code = stdlib source. Headline: out of domain "
             "(prose). Bits/weight: every byte the compressed block layers hold; GGUF: the format's own size.",
             "SmolLM2 ships as GGUF Q4_1: rows at ≥ 4 bits/weight are confounded by that origin (marked †); "
             "MiniLM (true fp32) is the clean model.", ""]
    by = {}
    for r in rows:
        by.setdefault(r["name"], {})[r["model"]] = r
    ref = {m: by["fp32"][m]["scores"] for m in MODELS if "fp32" in by and m in by["fp32"]}
    head = ["row", "SmolLM2 bits/w", "ppl in-domain", "Δ %", "ppl prose (OOD)", "Δ %", "ppl code (OOD)", "Δ %", "s",
            "MiniLM bits/w", "cos in-domain", "cos prose (OOD)", "cos code (OOD)", "s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, per in by.items():
        cells = [name]
        s = per.get("smollm2-135m")
        if s and "smollm2-135m" in ref:
            mark = " †" if s["bits"] >= 4 and name != "fp32" else ""
            cells.append(f"{s['bits']:.3f}{mark}")
            for k in SETS:
                v, r0 = s["scores"][k], ref["smollm2-135m"][k]
                cells += [f"{v:.3f}", "—" if name == "fp32" else f"{100 * (v / r0 - 1):+.1f}"]
            cells.append(seconds(s))
        else:
            cells += ["—"] * 8
        m = per.get("minilm-l6")
        if m:
            cells.append(f"{m['bits']:.3f}")
            cells += [f"{m['scores'][k]:.5f}" for k in SETS] + [seconds(m)]
        else:
            cells += ["—"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    control = control_table(rows)
    if control:
        lines += ["", f"## {CONTROL}: SmolLM2 off its Q4_1 grid (the control for its origin)", "",
                  "Every block linear weight of SmolLM2 moved by uniform noise over one grid step of its Q4_1 group "
                  "(slc.models.dither_off_grid, seed 0), so that no 4-bit grid can find the origin's levels again. "
                  "It is a worse model than SmolLM2 (its fp32 row), and every Δ below is against its own fp32 "
                  "weights. llama.cpp's rows: the importance matrix computed on the same calibration mix.", ""]
        lines += control
    for key, what in (("smollm2-135m", "Δ perplexity % against fp32"), ("minilm-l6", "cosine against fp32")):
        table = variants_table(rows, key)
        if table:
            lines += ["", f"## {key}: compress_to_budget's variants (bits/weight: {what}, in domain / prose / code)",
                      ""] + table
    targets = targets_table(rows)
    if len(targets) > 2:
        lines += ["", "## Targets: compress_to_budget against every llama.cpp preset + imatrix at ≤ 4.5 bits/weight",
                  "", "SmolLM2: Δ perplexity against fp32 (lower is better); MiniLM: cosine against fp32 (higher is "
                  "better). "
                  "'better in' / 'as good in': the evaluation sets where slc's row is at least as good as the preset.",
                  ""] + targets
    notes = sorted({(r["name"], r["note"]) for r in rows if r["note"]})
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}: {t}" for n, t in notes]
    return "\n".join(lines) + "\n"


def chart_png(path: Path, max_bits: float = 6.0) -> None:
    """The out-of-domain chart (slc.viz.ood_figure: SmolLM2 above, MiniLM below; in domain beside prose) as a PNG
    for the README: plotly.js inline in an HTML page, screenshotted by headless Chromium (kaleido is not here)."""
    import subprocess
    import tempfile

    from slc.viz import load_ood_rows, ood_figure
    rows = load_ood_rows(RESULTS)
    chromium = os.environ.get("SLC_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        raise SystemExit(f"--png needs Chromium at {chromium} (or set SLC_CHROMIUM)")
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "ood.html"
        parts = []
        for i, key in enumerate(MODELS):
            fig = ood_figure(rows, key, max_bits=max_bits)
            fig.update_layout(width=1400, height=520, title=f"{key}: calibrated on slc.texts' mix, "
                              "evaluated in domain (held-out pydoc) and out of domain (package READMEs + licences)")
            parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False,
                                     config={"displayModeBar": False}))
        html.write_text("<html><body style='margin:0'>" + "".join(parts) + "</body></html>")
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={Path(path).resolve()}", "--window-size=1400,1050",
                        "--virtual-time-budget=10000", html.as_uri()], check=True, capture_output=True, timeout=120)
    print(f"wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", action="append", choices=sorted(PHASES), help="phases to run (default: all)")
    p.add_argument("--model", action="append", choices=(*MODELS, CONTROL),
                   help=f"models (default: both real ones; {CONTROL} only when named)")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    p.add_argument("--budgets", type=float, nargs="*", default=None,
                   help="budgets of the 'budget' and 'frontier' phases; for 'targets': rerun only these of its rows")
    p.add_argument("--json", default=None, help="rows file (default bench/results/frontier_ood.json)")
    p.add_argument("--load-note", default=None, help="what else the machine was running (for the table)")
    p.add_argument("--variant", action="append", choices=[variant_label(*v) for v in VARIANTS],
                   help="phase frontier: only these variants (their rows are replaced, the others kept; with "
                        "--budgets, only those budgets' rows)")
    p.add_argument("--png", default=None, help="also write the chart to this PNG (e.g. docs/07_out_of_domain.png)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    if args.json:
        JSON["path"] = Path(args.json).resolve()
    rows = load_rows()
    if not args.report:
        for key in args.model or MODELS:
            print(f"\n== {key}", flush=True)
            b = Bench(key)
            b.budgets = args.budgets
            by_label = {variant_label(*v): v for v in VARIANTS}
            b.variants = [by_label[a] for a in args.variant] if args.variant else None       # in the order given
            for ph in args.phase or list(PHASES):
                gone = {variant_label(*v) for v in b.variants} if ph == "frontier" and b.variants else None
                redo = args.budgets if ph in ("frontier", "targets") and args.budgets else None
                rows[:] = [r for r in rows if not (r["model"] == key and r["phase"] == ph and
                                                   (gone is None or r["group"].removeprefix("slc ") in gone) and
                                                   (redo is None or among(r["budget"], redo)))]
                b.phase = ph
                PHASES[ph](b, rows)
    note = args.load_note or (f"Run on the shared 2-core machine ({platform.processor() or platform.machine()}, "
                              f"torch {torch.__version__}, 2 threads) while other jobs ran; load average at the "
                              f"end {os.getloadavg()[0]:.1f}.")
    text = report(all_rows(), note)
    (RESULTS / "frontier_ood.md").write_text(text)
    print(text)
    if args.png:
        chart_png(Path(args.png))


if __name__ == "__main__":
    main()

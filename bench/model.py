"""Model benchmark: every storage choice on the real SmolLM2-135M and all-MiniLM-L6-v2, one run.

    python bench/model.py            # full run (about 15-25 minutes on a 2-core CPU)
    python bench/model.py --quick    # shorter text, one timing run each (a few minutes)

Rows, each measured in this same run against the fp32 model loaded in this run:
    fp32 · int8/channel · int8/channel + rANS · int4/group-64 · int4/group-64 + rANS ·
    GGUF Q8_0 and Q4_0 round trips (gguf.quants, as peers) · low rank at 50 % of the parameters,
    one uniform rank vs ranks from allocate_ranks (greedy on energy per parameter).
Columns:
    bits/w       effective bits per weight of the compressed linears, every buffer counted (codes,
                 scales, rANS words/states/tables, factors); embeddings and lm_head stay fp32 and
                 are not in this figure (they are in "file MB")
    ppl, Δ %     SmolLM2 perplexity on a fixed slice of evaluation_text (window 512, stride 256)
    logits cos   mean cosine of final logits vs fp32 (256 tokens)
    worst SNR    lowest per-layer output SNR (dB) on real calibration activations (compare_layers)
    emb cos      MiniLM sentence-embedding cosine vs fp32 (mean / min over 16 sentences)
    file MB      size of the save_compressed file
    RSS MB       RSS growth of loading that file with load_compressed in a fresh process and
                 reading every tensor once (mmap'd pages paid for; fp32 loaded the very same way);
                 "+fwd" after one forward pass of 16 tokens as well
    load s       seconds of load_compressed in that fresh process (median of runs)
    tok/s        greedy generation, 64 new tokens (median of runs, round-robin over the rows)
    compress s   compress_model (or the GGUF round trips / SVDs) on this machine, one run
GGUF rows are quality peers: their weights are de-quantised back to fp32 in memory, so their
memory and speed columns are empty (a GGUF runtime would keep bits/w × params).
SmolLM2 was shipped as a Q4_1 GGUF: its weights sit on a Q4_1 grid (16 levels per group of 32).
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import importlib
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import slc  # noqa: E402
from slc import memory, metrics, models  # noqa: E402
from slc.gguf_peers import apply_gguf, gguf_bits_per_weight  # noqa: E402
from slc.lowrank import allocate_ranks  # noqa: E402
from slc import compress_model, load_compressed, save_compressed  # noqa: E402
from slc.nn import LinearSpec  # noqa: E402
from slc.quant import Quantizer  # noqa: E402

MB = 1 << 20
INT8 = Quantizer(bits=8, granularity="channel")
INT4 = Quantizer(bits=4, granularity="group", group_size=64)                        # symmetric: 15 levels
INT4_ASYM = Quantizer(bits=4, scheme="asymmetric", granularity="group", group_size=64)  # 16 levels + zero point
ENTROPY_TOKENS = 16
EMB = "int8/channel, embeddings int8"
SLOW_TOK_S = 0.5         # tokens/s below which a row's generation is timed once, not `runs` times
PROMPT = "The three most useful things to know about Python lists are"
VARIANTS = [   # (row name, how)
    ("fp32", ("dense",)),
    ("int8/channel", ("spec", LinearSpec("quantized", INT8))),
    ("int8/channel + rANS", ("spec", LinearSpec("entropy", INT8))),
    (EMB, ("spec", LinearSpec("quantized", INT8), LinearSpec("quantized", INT8))),
    ("int4/group-64", ("spec", LinearSpec("quantized", INT4))),
    ("int4/group-64 + rANS", ("spec", LinearSpec("entropy", INT4))),
    ("int4/group-64 asym", ("spec", LinearSpec("quantized", INT4_ASYM))),
    ("GGUF Q8_0 (peer)", ("gguf", "Q8_0")),
    ("GGUF Q4_0 (peer)", ("gguf", "Q4_0")),
    ("low rank 50 %, uniform", ("lowrank", "uniform")),
    ("low rank 50 %, adaptive", ("lowrank", "adaptive")),
]
MODELING = {"smollm2-135m": "transformers.models.llama.modeling_llama",
            "minilm-l6": "transformers.models.bert.modeling_bert"}


def linear_targets(model) -> dict[str, torch.Tensor]:
    """{module name: (out, in) weight} of the layers compress_model takes by default."""
    from slc.gguf_peers import default_filter
    return {n: m.weight.detach() for n, m in model.named_modules() if default_filter(n, m)}


CALIB_TOKENS = 2048       # calibration tokens for the input second moments and the rank sensitivities
SVD_DAMP = 0.1            # C + 0.1 mean(eig C) I before whitening, as bench/frontier.py (1e-6 lost to plain SVD)


def lowrank_policy(model, tok, how: str) -> tuple[dict, dict, str]:
    """Activation-aware low rank at 50 % of the parameters: (policy, x_covs for compress_model, note).

    uniform:  every layer keeps the same fraction, r = 0.5 mn / (m + n) (the stronger of the uniform
              baselines: one rank for all layers is far worse, see bench/results/frontier.md)
    adaptive: ranks from allocate_ranks; for a causal LM weighted by rank_sensitivity (each whitened
              singular vector's Fisher estimate of the loss increase), for MiniLM (no LM loss) by
              whitened energy per parameter."""
    from slc.calibrate import layer_stats
    from slc.lowrank import rank_sensitivity, svd
    weights = linear_targets(model)
    budget = sum(w.numel() for w in weights.values()) // 2
    st = layer_stats(model, tok, models.calibration_text(12_000), list(weights), CALIB_TOKENS, full=True)
    covs = {}
    for n in weights:
        c = st[n].x_cov / st[n].tokens
        covs[n] = c + SVD_DAMP * (torch.trace(c) / c.shape[0]) * torch.eye(c.shape[0], dtype=c.dtype)
    if how == "uniform":
        ranks = {n: max(1, w.numel() // (2 * sum(w.shape))) for n, w in weights.items()}
        note = "activation-aware; the same fraction of each layer's parameters"
    elif model.can_generate():                                       # a causal LM: its loss gives sensitivities
        factors = {n: svd(w, covs[n]) for n, w in weights.items()}
        sens = rank_sensitivity(model, tok, factors, models.calibration_text(12_000), max_tokens=CALIB_TOKENS)
        ranks = allocate_ranks({n: tuple(w.shape) for n, w in weights.items()}, budget, sensitivity=sens)
        note = "activation-aware; ranks by loss sensitivity (rank_sensitivity, power 2)"
    else:
        ranks = allocate_ranks(weights, budget, x_covs=covs)
        note = "activation-aware; ranks by whitened energy per parameter"
    rs = sorted(ranks.values())
    used = sum(r * sum(weights[n].shape) for n, r in ranks.items())
    note += (f"; ranks {rs[0]}..{rs[-1]}, median {rs[len(rs) // 2]}; "
             f"{100 * used / (2 * budget):.1f} % of the dense parameters")
    return {n: LinearSpec("lowrank", rank=r) for n, r in ranks.items()}, covs, note


def kept_dense_mb(base) -> float:
    """MB of what every row keeps as in fp32 (embeddings, norms, biases): total minus compressed weights."""
    linear = sum(w.numel() * w.element_size() for w in linear_targets(base).values())
    return (memory.tensor_bytes(base)["total"] - linear) / MB


def build(base, how, tok=None) -> tuple[object, dict]:
    """A compressed copy of `base` and facts about it (bits/w, compress seconds, note)."""
    model = copy.deepcopy(base)
    info = {"note": ""}
    t0 = time.perf_counter()
    if how[0] == "dense":
        info["bits"] = 32.0
    elif how[0] == "gguf":
        apply_gguf(model, how[1])
        info["bits"] = gguf_bits_per_weight(how[1])
    else:
        x_covs = None
        if how[0] == "lowrank":
            policy, x_covs, info["note"] = lowrank_policy(model, tok, how[1])
        else:
            policy = how[1]
        embeddings = how[2] if len(how) > 2 else None               # also the token embedding (and a tied head)
        report = compress_model(model, policy, progress=False, embeddings=embeddings, x_covs=x_covs)
        info["bits"] = report.totals()["bits_per_weight"]
    info["compress_s"] = time.perf_counter() - t0 if how[0] != "dense" else None
    return model.eval(), info


def measure_file(model, name: str, tmp: Path, runs: int) -> dict:
    """Save with save_compressed, then load_compressed in fresh processes: file MB, RSS, load seconds."""
    path = save_compressed(model, tmp / f"{name.replace('/', '_').replace(' ', '_')}.slc.safetensors")
    file_mb = path.stat().st_size / MB
    rs = []
    for _ in range(runs):
        rs.append(memory.measure_load(
            functools.partial(load_compressed, path), touch=True,
            then=functools.partial(memory.forward_once, n_tokens=16),
            preimport=memory.PREIMPORT + ("slc.checkpoint", "accelerate"),
            warmup=functools.partial(importlib.import_module, MODELING[name.split(":")[0]])))
    path.unlink()
    return {"file_mb": file_mb, "rss_mb": statistics.median(r["growth"] for r in rs) / MB,
            "rss_fwd_mb": statistics.median(r["growth_after_then"] for r in rs) / MB,
            "anon_mb": statistics.median(r["anon_growth"] or 0 for r in rs) / MB,
            "load_s": statistics.median(r["load_s"] for r in rs)}


def fmt(x, spec=".2f", none="—") -> str:
    if x is None:
        return none
    if isinstance(x, float) and x != x:
        return "nan"
    return format(x, spec)


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --- SmolLM2 --------------------------------------------------------------------------------------

def bench_smollm2(args, tmp: Path) -> tuple[str, dict, list[str]]:
    base, tok = models.load("smollm2-135m")
    text = models.evaluation_text(args.chars)
    calib = models.calibration_text(2000)
    built, res, notes = {}, {}, []
    ref_logits = metrics.final_logits(base, tok, calib, max_tokens=256)
    for name, how in tqdm(VARIANTS, desc="SmolLM2 rows", unit="row"):
        model, info = build(base, how, tok)
        r = dict(info)
        r["ppl"] = metrics.perplexity(model, tok, text, window=512, stride=256)
        if how[0] != "dense":
            r["logits_cos"] = metrics.logits_cosine(ref_logits, model, tok, calib, max_tokens=256)
            layer_rows = metrics.compare_layers(base, model, tok, calib, max_tokens=64)
            r["worst_snr"] = min(x["snr_db"] for x in layer_rows)
        if how[0] in ("dense", "spec", "lowrank"):
            r.update(measure_file(model, "smollm2-135m:" + name, tmp, args.runs))
        if info["note"]:
            notes.append(f"SmolLM2, {name}: {info['note']}")
        if how[0] == "dense":
            r["kept_mb"] = kept_dense_mb(base)
        res[name] = r
        if how[0] in ("dense", "spec", "lowrank"):
            built[name] = model                                      # kept for the round-robin timing below
        else:
            del model
        gc.collect()
    # Generation speed: round-robin over the rows so that machine load drifts hit every row alike.
    # Entropy rows decode every weight for every token (seconds per token on 2 cores): one run of
    # ENTROPY_TOKENS tokens (their cost per token is flat, so tokens/s hardly depends on the count).
    # Rows slower than SLOW_TOK_S in the first round are not repeated either (noted in the table).
    speeds = {name: [] for name in built}
    for i in tqdm(range(args.runs), desc="SmolLM2 generation rounds", unit="round"):
        for name, model in built.items():
            entropy = "rANS" in name
            if i and (entropy or speeds[name][0] < SLOW_TOK_S):
                continue
            n = min(args.tokens, ENTROPY_TOKENS) if entropy else args.tokens
            sample, tok_s = metrics.generate_greedy(model, tok, PROMPT, n_tokens=n)
            speeds[name].append(tok_s)
            res[name].setdefault("sample", sample)
    for name, s in speeds.items():
        res[name]["tok_s"] = statistics.median(s)
        res[name]["tok_runs"] = len(s)
    built.clear()

    f = res["fp32"]
    head = ["SmolLM2-135M", "bits/w", "ppl", "Δppl %", "logits cos", "worst layer SNR dB", "file MB",
            "RSS MB", "× fp32", "RSS +fwd MB", "load s", "tok/s", "× fp32", "compress s"]
    rows = []
    for name, _ in VARIANTS:
        r = res[name]
        big = r["ppl"] > 1e4
        rows.append([name, fmt(r["bits"]), fmt(r["ppl"], ".3g" if big else ".3f"),
                     fmt(100 * (r["ppl"] / f["ppl"] - 1), "+.3g" if big else "+.2f"),
                     fmt(r.get("logits_cos"), ".5f"), fmt(r.get("worst_snr"), ".1f"),
                     fmt(r.get("file_mb"), ".1f"), fmt(r.get("rss_mb"), ".1f"),
                     fmt(r["rss_mb"] / f["rss_mb"] if "rss_mb" in r else None),
                     fmt(r.get("rss_fwd_mb"), ".1f"), fmt(r.get("load_s")),
                     fmt(r.get("tok_s"), ".2f") + ("¹" if r.get("tok_runs") == 1 and args.runs > 1 else ""),
                     fmt(r["tok_s"] / f["tok_s"] if "tok_s" in r else None),
                     fmt(r.get("compress_s"), ".1f")])
    for name in ("fp32", "int8/channel", "int4/group-64", "low rank 50 %, adaptive"):
        notes.append(f"greedy sample, {name}: {PROMPT!r} -> {res[name]['sample']!r}")
    return table(head, rows), res, notes


# --- MiniLM ---------------------------------------------------------------------------------------

def bench_minilm(args, tmp: Path) -> tuple[str, dict, list[str]]:
    base, tok = models.load("minilm-l6")
    res, notes = {}, []
    for name, how in tqdm(VARIANTS, desc="MiniLM rows", unit="row"):
        model, info = build(base, how, tok)
        r = dict(info)
        if how[0] != "dense":
            r["cos_mean"] = metrics.embedding_cosine(base, model, tok)
            r["cos_min"] = metrics.embedding_cosine(base, model, tok, reduce="min")
        if how[0] in ("dense", "spec", "lowrank"):
            r.update(measure_file(model, "minilm-l6:" + name, tmp, args.runs))
        if info["note"]:
            notes.append(f"MiniLM, {name}: {info['note']}")
        if how[0] == "dense":
            r["kept_mb"] = kept_dense_mb(base)
        res[name] = r
        del model
        gc.collect()
    f = res["fp32"]
    head = ["all-MiniLM-L6-v2", "bits/w", "emb cos mean", "emb cos min", "file MB", "RSS MB", "× fp32",
            "load s", "compress s"]
    rows = []
    for name, _ in VARIANTS:
        r = res[name]
        rows.append([name, fmt(r["bits"]), fmt(r.get("cos_mean"), ".5f"), fmt(r.get("cos_min"), ".5f"),
                     fmt(r.get("file_mb"), ".1f"), fmt(r.get("rss_mb"), ".1f"),
                     fmt(r["rss_mb"] / f["rss_mb"] if "rss_mb" in r else None), fmt(r.get("load_s")),
                     fmt(r.get("compress_s"), ".1f")])
    return table(head, rows), res, notes


def targets(s: dict, m: dict) -> str:
    """The issue's targets, each with its measured figure."""
    f, q, e = s["fp32"], s["int8/channel"], s["int8/channel + rANS"]
    checks = [
        ("int8/channel Δppl ≤ 0.5 % (SmolLM2)", 100 * (q["ppl"] / f["ppl"] - 1), lambda v: abs(v) <= 0.5, "{:+.3f} %"),
        ("int8/channel embedding cosine ≥ 0.999 (MiniLM, mean)", m["int8/channel"]["cos_mean"],
         lambda v: v >= 0.999, "{:.5f}"),
        ("int8 load RSS ≤ 0.35 × fp32 (SmolLM2)", q["rss_mb"] / f["rss_mb"], lambda v: v <= 0.35, "{:.3f} ×"),
        ("int8 load RSS ≤ 0.35 × fp32 (MiniLM)", m["int8/channel"]["rss_mb"] / m["fp32"]["rss_mb"],
         lambda v: v <= 0.35, "{:.3f} ×"),
        ("int8 load RSS ≤ 0.35 × fp32, embeddings int8 too (SmolLM2)",
         s[EMB]["rss_mb"] / f["rss_mb"], lambda v: v <= 0.35, "{:.3f} ×"),
        ("int8 load RSS ≤ 0.35 × fp32, embeddings int8 too (MiniLM)",
         m[EMB]["rss_mb"] / m["fp32"]["rss_mb"], lambda v: v <= 0.35, "{:.3f} ×"),
        ("int8 generation ≥ 0.8 × fp32 tokens/s", q["tok_s"] / f["tok_s"], lambda v: v >= 0.8, "{:.2f} ×"),
        ("int8 generation ≥ 0.8 × fp32 tokens/s, embeddings int8 too", s[EMB]["tok_s"] / f["tok_s"],
         lambda v: v >= 0.8, "{:.2f} ×"),
        ("compress all SmolLM2 linears, int8 + rANS ≤ 60 s", e["compress_s"], lambda v: v <= 60, "{:.1f} s"),
        ("adaptive rank beats uniform at 50 % params (SmolLM2 ppl)",
         s["low rank 50 %, adaptive"]["ppl"] / s["low rank 50 %, uniform"]["ppl"],
         lambda v: v < 1, "{:.3f} × uniform ppl"),
    ]
    rows = [[what, fmt_v.format(v), "met" if ok(v) else "**missed**"] for what, v, ok, fmt_v in checks]
    for label, res in (("SmolLM2", s), ("MiniLM", m)):           # context for the RSS target, not a target
        kept = res["fp32"]["kept_mb"]
        ratio = (res["int8/channel"]["rss_mb"] - kept) / (res["fp32"]["rss_mb"] - kept)
        rows.append([f"(context) int8 load RSS of the linear layers alone, {label}: RSS minus the "
                     f"{kept:.1f} MB that every row keeps fp32 (embeddings, norms, biases)", f"{ratio:.3f} ×", ""])
    return table(["target", "measured", ""], rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2k characters of text, 1 timing run, 16 tokens")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "model.md"), help="markdown file for the tables")
    p.add_argument("--only", choices=["smollm2", "minilm"], help="run one model's table only")
    args = p.parse_args(argv)
    args.chars, args.runs, args.tokens = (2_000, 1, 16) if args.quick else (8_000, 3, 64)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slc-bench-") as tmp:
        s_table, s_res, s_notes = bench_smollm2(args, Path(tmp)) if args.only != "minilm" else ("", None, [])
        m_table, m_res, m_notes = bench_minilm(args, Path(tmp)) if args.only != "smollm2" else ("", None, [])
    import transformers
    header = (f"# Model benchmark{' (--quick)' if args.quick else ''}\n\n"
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"slc {slc.__version__}. Perplexity on evaluation_text({args.chars}) (window 512, stride 256); "
              f"timings are medians of {args.runs} run(s); generation {args.tokens} tokens; "
              f"total {(time.perf_counter() - t_start) / 60:.1f} min.\n")
    goals = "## Targets (issue 3)\n\n" + targets(s_res, m_res) if s_res and m_res else ""
    out = "\n\n".join([header, s_table, m_table, goals,
                       "## Notes\n\n" + "\n".join(f"- {n}" for n in s_notes + m_notes) + "\n"
                       "- bits/w counts the compressed linears only; embeddings (and the tied lm_head) stay fp32 "
                       "and dominate the int8 file of SmolLM2 (28.3 M of its 134.5 M parameters), except in the row "
                       f"{EMB!r}: compress_model(..., embeddings=LinearSpec('quantized')) keeps every nn.Embedding "
                       "as int8 codes + per-row scales (CompressedEmbedding) and the tied lm_head multiplies "
                       "with those same codes (TiedLinear).\n"
                       "- ¹ timed once: rANS rows decode for every token, and rows under "
                       f"{SLOW_TOK_S} tok/s in the first round are not repeated.\n"
                       "- entropy rows decode each weight on every forward (no DecodeCache): the low-memory path; "
                       f"their tok/s is one run of {min(args.tokens, ENTROPY_TOKENS)} tokens.\n"
                       "- SmolLM2's weights come from a Q4_1 GGUF file, so they already sit on a 16-level grid per "
                       "block of 32; int8 / Q8_0 results on it are kinder than on true float weights (see MiniLM).\n"])
    print(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(out)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

"""The `slc` command: compress a model to one file, look inside a file, evaluate it, render the notebooks.

    slc compress smollm2-135m -o smol.slc                  # int8 per output row (fast to run)
    slc compress smollm2-135m -o smol.slc --rans           # the same codes, rANS-coded (smaller)
    slc compress minilm-l6 -o mini.slc --ecsq 0.2          # ECSQ step 0.2 x row RMS + rANS
    slc compress smollm2-135m -o smol.slc --budget 4.5 --gptq   # allocated to 4.5 bits/weight, GPTQ codes
    slc inspect smol.slc                                   # per layer: kind, shape, bits/weight, checksum
    slc eval smol.slc --text notes.txt                     # perplexity (causal LM) or embedding cosine (encoder)
    slc render                                             # notebooks -> build/html/ with an index

MODEL is one of the offline models (`slc.models.OFFLINE_MODELS`) or a transformers folder.
User mistakes (a missing file, a bad option, a corrupt file) print one line and exit with status 2;
set SLC_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from . import metrics, models, render
from .allocate import allocate
from .checkpoint import load_compressed, read_meta, save_compressed
from .compress import compress_model, compress_model_gptq
from .errors import FormatError
from .hf import has_lm_head
from .integrity import crc32_tensor
from .nn import LinearSpec
from .quant import Quantizer

USAGE_ERRORS = (FormatError, FileNotFoundError, NotADirectoryError, ValueError, TypeError, OSError)


class UsageError(ValueError):
    """A mistake in how slc was called: printed as one line, exit status 2."""


# --- compress ------------------------------------------------------------------------------------

def _load_model(name: str):
    if name not in models.OFFLINE_MODELS and not Path(name).is_dir():
        raise UsageError(f"{name!r} is neither an offline model ({', '.join(models.OFFLINE_MODELS)}) nor a folder")
    return models.load(name)


def _read_text(path) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"text file {p} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UsageError(f"text file {p} is empty")
    return text


def cmd_compress(args) -> int:
    if args.output.exists() and not args.force:
        raise UsageError(f"{args.output} exists; pass --force to overwrite it")
    model, tok = _load_model(args.model)
    calibration = _read_text(args.calibration)
    entropy = args.rans or args.gptq                       # GPTQ codes are stored rANS-coded
    if args.ecsq is not None:
        policy = LinearSpec("entropy", Quantizer(mode="ecsq", step=args.ecsq), predictor="none")
    elif args.budget is not None:
        print(f"allocating {args.budget} bits/weight over the linear layers ...", file=sys.stderr)
        policy = allocate(model, tok, args.budget, calibration, progress=not args.quiet)
    else:
        policy = LinearSpec("entropy" if entropy else "quantized")
    t0 = time.perf_counter()
    if args.gptq:
        report = compress_model_gptq(model, tok, policy, calibration, progress=not args.quiet)
    else:
        report = compress_model(model, policy, progress=not args.quiet)
    path = save_compressed(model, args.output)
    t = report.totals()
    print(f"{args.output}: {t['layers']} layers, {t['bits_per_weight']:.3f} bits/weight over them, "
          f"mean rel. error {t['mean_rel_error']:.4f}, file {path.stat().st_size / 1e6:.1f} MB, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


# --- inspect -------------------------------------------------------------------------------------

def layer_rows(path) -> list[dict]:
    """One row per compressed layer of an slc file: kind, storage, shape, bits/weight, checksums ok."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    meta = read_meta(path)
    rows = []
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for name, lm in meta["layers"].items():
            if not isinstance(lm, dict) or not isinstance(lm.get("buffers"), dict):
                raise FormatError(f"{path}: layer {name!r} has no buffer layout")
            nbytes, ok = 0, True
            for b in lm["buffers"]:
                key = f"{name}.{b}"
                key = meta["tied"].get(key, key)
                if key not in names:
                    ok = False
                    continue
                t = f.get_tensor(key)
                if b != "bias":
                    nbytes += t.numel() * t.element_size()
                ok &= f"{crc32_tensor(t):08x}" == meta["checksums"].get(key)
            spec = lm.get("spec") or {}
            q = spec.get("quantizer") or {}
            storage = (f"ecsq step {q.get('step')}" if q.get("mode") == "ecsq" else f"int{q.get('bits')}") \
                if lm["kind"] != "lowrank" else f"rank {lm.get('rank')}"
            shape = (lm["out_features"], lm["in_features"])
            rows.append({"layer": name, "kind": lm["kind"], "storage": storage, "shape": f"{shape[0]}x{shape[1]}",
                         "bits/weight": 8 * nbytes / (shape[0] * shape[1]), "checksum": "ok" if ok else "BAD"})
    return rows


def _print_table(rows: list[dict]) -> None:
    head = list(rows[0])
    cells = [[f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in head] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def cmd_inspect(args) -> int:
    rows = layer_rows(args.file)
    meta = read_meta(args.file)
    print(f"{args.file}: {meta['architecture']}, {len(rows)} compressed layers, format v{meta['version']}")
    if rows:
        _print_table(rows)
        params = sum(int(r["shape"].split("x")[0]) * int(r["shape"].split("x")[1]) for r in rows)
        bits = sum(r["bits/weight"] * int(r["shape"].split("x")[0]) * int(r["shape"].split("x")[1]) for r in rows)
        print(f"total: {params:,} weights at {bits / params:.3f} bits/weight")
    bad = [r["layer"] for r in rows if r["checksum"] != "ok"]
    if bad:
        raise FormatError(f"{len(bad)} layer(s) fail their checksum: {', '.join(bad[:5])}")
    return 0


# --- eval ----------------------------------------------------------------------------------------

def _tokenizer_source(args, meta: dict) -> str:
    if args.tokenizer:
        return args.tokenizer
    guess = meta["config"].get("_name_or_path") or ""
    for name in models.OFFLINE_MODELS:
        if guess and Path(guess).resolve() == models.model_dir(name).resolve():
            return name
    if guess and Path(guess).is_dir():
        return guess
    raise UsageError("the file does not say where its tokenizer is: pass --tokenizer MODEL|FOLDER "
                     f"(e.g. one of {', '.join(models.OFFLINE_MODELS)})")


def cmd_eval(args) -> int:
    from transformers import AutoTokenizer

    if not Path(args.file).is_file():
        raise FileNotFoundError(f"{args.file} does not exist")
    meta = read_meta(Path(args.file))
    source = _tokenizer_source(args, meta)
    folder = models.fetch(source, quiet=True) if source in models.OFFLINE_MODELS else source
    tok = AutoTokenizer.from_pretrained(folder)
    text = _read_text(args.text) or models.evaluation_text()
    model = load_compressed(args.file)
    causal = has_lm_head(model)
    reference = None
    if args.reference:
        reference, _ = _load_model(args.reference)
    if causal:
        ppl = metrics.perplexity(model, tok, text)
        out = {"perplexity": ppl}
        if reference is not None:
            ref = metrics.perplexity(reference, tok, text)
            out.update(reference_perplexity=ref, delta_percent=100 * (ppl / ref - 1))
    else:
        if reference is None:
            reference, _ = _load_model(source)
        sentences = [s.strip() for s in text.splitlines() if s.strip()][:256] or None
        out = {"embedding_cosine": metrics.embedding_cosine(reference, model, tok, sentences),
               "sentences": len(sentences or metrics.SENTENCES)}
    print(json.dumps({"file": str(args.file), **out}, indent=1))
    return 0


# --- render --------------------------------------------------------------------------------------

def cmd_render(args) -> int:
    index = render.render_all(args.src, args.out, execute=args.execute, progress=not args.quiet)
    print(f"open {index}")
    return 0


# --- the parser ----------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="slc", description=__doc__.split("\n\n")[0],
                                  epilog="examples:\n" + __doc__.split("\n\n")[1],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compress", help="compress a model's linear layers into one .slc file",
                       description="Compress every linear layer (not embeddings / lm_head) and save one file.",
                       epilog="examples:\n  slc compress smollm2-135m -o smol.slc --rans\n"
                              "  slc compress smollm2-135m -o smol.slc --budget 4.5 --gptq",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model", help=f"an offline model ({', '.join(models.OFFLINE_MODELS)}) or a transformers folder")
    c.add_argument("-o", "--output", type=Path, required=True, help="the file to write (e.g. model.slc)")
    how = c.add_mutually_exclusive_group()
    how.add_argument("--int8", action="store_true", help="int8 per output row (the default)")
    how.add_argument("--ecsq", type=float, metavar="STEP", help="ECSQ step in units of each row's RMS, rANS-coded")
    how.add_argument("--budget", type=float, metavar="BITS", help="allocate this many bits/weight over the layers")
    c.add_argument("--rans", action="store_true", help="rANS-code the int8 codes (smaller, slower to run)")
    c.add_argument("--gptq", action="store_true", help="choose codes with GPTQ error feedback on calibration text")
    c.add_argument("--calibration", metavar="FILE", help="calibration text for --budget / --gptq "
                   "(default: slc.models.calibration_text())")
    c.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(run=cmd_compress)

    i = sub.add_parser("inspect", help="per-layer table of an .slc file (checksums verified)",
                       description="Per compressed layer: kind, storage, shape, bits/weight, checksum.")
    i.add_argument("file", type=Path)
    i.set_defaults(run=cmd_inspect)

    e = sub.add_parser("eval", help="perplexity (causal LM) or embedding cosine (encoder) of an .slc file",
                       description="Perplexity of a causal LM on a text, or for an encoder the mean cosine of "
                                   "sentence embeddings (one sentence per line of the text) against the dense model.",
                       epilog="example:\n  slc eval smol.slc --text notes.txt --reference smollm2-135m",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("file", type=Path)
    e.add_argument("--text", metavar="FILE", help="UTF-8 text (default: slc.models.evaluation_text())")
    e.add_argument("--tokenizer", metavar="MODEL|FOLDER", help="where the tokenizer is (default: from the file)")
    e.add_argument("--reference", metavar="MODEL|FOLDER", help="dense model to compare with (perplexity change)")
    e.set_defaults(run=cmd_eval)

    r = sub.add_parser("render", help="notebooks -> self-contained HTML pages with an index",
                       description="Render the notebooks (from their committed outputs) into a folder to share.")
    r.add_argument("src", nargs="?", default="notebooks", help="folder of notebooks (default: notebooks)")
    r.add_argument("out", nargs="?", default="build/html", help="output folder (default: build/html)")
    r.add_argument("--execute", action="store_true", help="execute every notebook first (minutes)")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(run=cmd_render)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)                 # argparse itself exits with 2 on a bad option
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        return args.run(args)
    except BrokenPipeError:                          # `slc inspect f | head`: the reader left, nothing to say
        return 0
    except USAGE_ERRORS as e:
        if os.environ.get("SLC_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"slc {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slc: interrupted", file=sys.stderr)
        return 130

"""llama.cpp's own presets as peers, measured in frontier_ood.py's PyTorch evaluation (needs `make peers`).

    make peers                                      # once: builds llama-quantize / llama-imatrix (~15 min)
    python bench/peers.py                           # both models, every preset, without and with imatrix
    python bench/peers.py --model smollm2-135m --preset Q4_K_M --preset IQ4_XS
    python bench/peers.py --report                  # rewrite the tables from the JSON only

For each model: the fp32 HF folder -> F32 GGUF with the vendored convert_hf_to_gguf.py; an importance matrix
with llama-imatrix on `slc.texts.calibration_mix(CAL_CHARS)` (the text slc's own methods calibrate on);
llama-quantize to each preset without and with it (refusals are recorded, not hidden); then each quantised
file's block linear weights are de-quantised with `gguf` and put into the fp32 model, which is scored on
frontier_ood.py's evaluation sets (same layers, texts, windows). Bits/weight: every byte of those tensors
in the GGUF file x 8 / weights. Every GGUF is cached under build/peers/<model>/ (git-ignored).

Writes rows to bench/results/frontier_ood_peers.json (merged into bench/results/frontier_ood.md by
frontier_ood.py's report), the steps' wall times and failures to bench/results/peers.json, and
bench/results/peers.md (types each preset really used, per weight kind).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import frontier_ood as fo  # noqa: E402

from slc import llamacpp, models, texts  # noqa: E402
from slc.sources import gguf_layout  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ROWS_JSON = RESULTS / "frontier_ood_peers.json"      # frontier_ood.py's report merges every frontier_ood*.json
THREADS = 2


def label(preset: str, with_imatrix: bool) -> str:
    return f"llama.cpp {preset}" + (" + imatrix" if with_imatrix else "")


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(steps: dict, key: str, fn, *args, **kw):
    """Run one step; record its wall seconds and the CPU seconds of the tool it ran (steps[key + ' cpu'])."""
    t0, c0 = time.perf_counter(), child_cpu()
    out = fn(*args, **kw)
    steps[key] = round(time.perf_counter() - t0, 1)
    steps[key + " cpu"] = round(child_cpu() - c0, 1)
    print(f"  {key}: {steps[key]} s wall, {steps[key + ' cpu']} s CPU", flush=True)
    return out


def prepare(key: str, info: dict) -> tuple[Path, Path | None]:
    """F32 GGUF and importance matrix of one model (cached); (f32 path, imatrix path or None if it failed)."""
    work = llamacpp.PEERS_DIR / key
    work.mkdir(parents=True, exist_ok=True)
    steps = info.setdefault("seconds", {})
    f32 = work / "f32.gguf"
    if not f32.exists():
        timed(steps, "convert", llamacpp.convert, models.fetch(key, quiet=True), f32)
    cal = texts.calibration_mix(fo.CAL_CHARS)
    cal_file = work / "calibration.txt"
    imat = work / "imatrix.gguf"
    if not cal_file.exists() or cal_file.read_text() != cal:
        cal_file.write_text(cal)
        imat.unlink(missing_ok=True)                      # made from other text
    if not imat.exists():
        try:
            timed(steps, "imatrix", llamacpp.imatrix, f32, cal_file, imat, threads=THREADS,
                  encoder=models.task(key) == "encoder")
        except RuntimeError as exc:
            info.setdefault("failures", {})["imatrix"] = str(exc)[-1500:]
            print(f"  imatrix failed: {str(exc)[-600:]}", flush=True)
            return f32, None
    info.get("failures", {}).pop("imatrix", None)
    return f32, imat


def check_f32(b: fo.Bench, f32: Path) -> list[str]:
    """The F32 GGUF holds exactly the model's block weights (names mapped, Q/K un-permuted); returns kept-fp32 ones."""
    w = llamacpp.read_block_weights(f32)
    extra = sorted(set(w) - set(b.orig))
    assert not extra, f"{f32}: block weights the model lacks: {extra[:4]}"
    bad = [n for n in w if not torch.equal(w[n], b.orig[n])]
    assert not bad, f"{f32}: weights differ from the fp32 model: {bad[:4]}"
    return sorted(set(b.orig) - set(w))


def run_model(key: str, presets: list[str], rows: list, info: dict) -> None:
    info["load_start"] = os.getloadavg()
    f32, imat = prepare(key, info)
    b = fo.Bench(key)
    b.phase = "peers"
    kept = check_f32(b, f32)
    info["kept_fp32"] = kept
    if kept:
        print(f"  not in the GGUF, kept fp32: {kept}", flush=True)
    t0 = time.perf_counter()
    ref = b.score(None)
    info["fp32"] = ref
    print(f"  fp32 {ref} ({time.perf_counter() - t0:.0f} s)", flush=True)
    tag = "SmolLM2" if b.lm else "MiniLM"
    for preset in presets:
        for with_imatrix in (False, True):
            name = label(preset, with_imatrix)
            if with_imatrix and imat is None:
                info.setdefault("failures", {})[name] = "no importance matrix (llama-imatrix failed)"
                continue
            out = llamacpp.PEERS_DIR / key / f"{preset}{'-imatrix' if with_imatrix else ''}.gguf"
            t0 = time.perf_counter()
            if not out.exists():
                try:
                    timed(info["seconds"], f"quantize {preset}{' imatrix' if with_imatrix else ''}",
                          llamacpp.quantize, f32, out, preset, imat if with_imatrix else None, threads=THREADS)
                except RuntimeError as exc:
                    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
                    why = next((ln for ln in lines if "imatrix" in ln.lower() or "error" in ln.lower()), lines[-1])
                    info.setdefault("failures", {})[name] = why.strip()[:300]
                    print(f"  {name}: refused: {why.strip()[:300]}", flush=True)
                    continue
            s = llamacpp.block_summary(out)
            w_hat = llamacpp.read_block_weights(out)
            for n in kept:
                w_hat[n] = b.orig[n]
            note = f"{tag}: {s.types_used()}"
            if kept:
                note += f"; kept fp32 (not in llama.cpp's model): {', '.join(kept)}"
            row = fo.record(rows, b, name, s.bits_per_weight, w_hat, t0, note=note,
                            group="llama.cpp + imatrix" if with_imatrix else "llama.cpp")
            row["peer"] = {"preset": preset, "imatrix": with_imatrix, "tensors": s.tensors, "numel": s.numel,
                           "nbytes": s.nbytes, "types": {k: dict(c) for k, c in s.types.items()},
                           "file_bytes": out.stat().st_size}
            fo.save(rows)
    info["load_end"] = os.getloadavg()


def peers_report(rows: list, steps: dict, note: str = "") -> str:
    lines = ["# llama.cpp presets in slc's evaluation (bench/peers.py)", "",
             "llama.cpp from the `llama-cpp-python` sdist (`make peers`; the version is in build/peers/SOURCE); "
             "F32 GGUF by the vendored convert_hf_to_gguf.py; importance matrix by llama-imatrix on "
             f"`slc.texts.calibration_mix({fo.CAL_CHARS})`; each preset by llama-quantize ({THREADS} threads), "
             "its block linear weights de-quantised with `gguf` into the fp32 model and scored with "
             "bench/frontier_ood.py's evaluation (the same rows are in frontier_ood.md). Bits/weight: bytes of "
             "the block linear tensors in the file x 8 / weights. SmolLM2 ships as Q4_1 (its weights sit on a "
             "Q4_1 grid): rows at ≥ 4 bits are confounded by that origin. Rows 576 wide are not a multiple of "
             "256, so k- and i-quants fall back to 32-wide types on most SmolLM2 tensors: the types column says "
             "what each preset really stored. MiniLM (BERT): llama-imatrix asserts on an encoder as it stands; "
             "it runs with -b = -ub = 512 (one chunk per micro-batch) and tokenizer.ggml.add_eos_token overridden "
             "to false (slc.llamacpp.imatrix(encoder=True)). llama.cpp's BERT has no pooler: MiniLM's "
             "pooler.dense stays fp32 (mean-pooled embeddings never use it) and is not in bits/weight.", ""]
    lines += [note, ""] if note else []
    for key, info in steps.items():
        la, lb = info.get("load_start"), info.get("load_end")
        load = f"; load average (1/5/15 min) at start {fmt_load(la)}, at end {fmt_load(lb)}" if la else ""
        lines.append(f"- {key}: seconds (wall; 'cpu': CPU seconds of the llama.cpp tool or converter) "
                     f"{json.dumps(info.get('seconds', {}))}{load}")
        if imatrix_note(key):
            lines.append(f"  - importance matrix: {imatrix_note(key)} of the calibration mix")
        if info.get("note"):
            lines.append(f"  - {info['note']}")
        for what, why in info.get("failures", {}).items():
            lines.append(f"  - failed: {what}: {why}")
        if info.get("kept_fp32"):
            lines.append(f"  - kept fp32 (llama.cpp's model has no such tensor): {', '.join(info['kept_fp32'])}")
    lines.append("")
    for key in (*fo.MODELS, fo.CONTROL):
        rs = sorted((r for r in rows if r["model"] == key and "peer" in r),
                    key=lambda r: (llamacpp.PRESETS.index(r["peer"]["preset"]), r["peer"]["imatrix"]))
        if not rs:
            continue
        ref = steps.get(key, {}).get("fp32")
        lm = models.task(key) == "causal-lm"
        unit = "ppl" if lm else "cos"
        head = ["preset", "imatrix", "bits/w", "file MB"]
        for k in fo.SETS:
            head += [f"{unit} {k}", "Δ %"] if lm else [f"{unit} {k}"]
        head.append("types used (tensors per weight kind)")
        lines += [f"## {key}", "", "fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in (ref or {}).items()), "",
                  "| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 3)
                                                               + ["---"]) + "|"]
        for r in rs:
            p = r["peer"]
            cells = [p["preset"], "yes" if p["imatrix"] else "no", f"{r['bits']:.3f}", f"{p['file_bytes'] / 1e6:.1f}"]
            for k in fo.SETS:
                v = r["scores"][k]
                if lm:
                    cells += [f"{v:.3f}", f"{100 * (v / ref[k] - 1):+.1f}" if ref else "—"]
                else:
                    cells.append(f"{v:.5f}")
            cells.append(r["note"].split(": ", 1)[1].split("; kept fp32")[0])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def imatrix_note(key: str) -> str:
    """'18 chunks x 512 tokens' from the cached importance matrix's own metadata, or ''."""
    path = llamacpp.PEERS_DIR / key / "imatrix.gguf"
    if not path.exists():
        return ""
    fields, _ = gguf_layout(path, 2**30)
    return f"{fields.get('imatrix.chunk_count')} chunks x {fields.get('imatrix.chunk_size')} tokens"


def fmt_load(la) -> str:
    return "/".join(f"{x:.1f}" for x in la) if la else "—"


def write_reports(rows: list, steps: dict, note: str = "") -> None:
    (RESULTS / "peers.md").write_text(peers_report(rows, steps, note))
    md = RESULTS / "frontier_ood.md"
    old = md.read_text().splitlines() if md.exists() else []
    note = old[2] if len(old) > 2 else "Run on the shared 2-core machine while other jobs ran."
    note = note.split(" llama.cpp rows (bench/peers.py)")[0]
    loads = [fmt_load(i.get("load_end")) for i in steps.values()]
    note += f" llama.cpp rows (bench/peers.py): load average at the end {', '.join(loads)}; see peers.md."
    md.write_text(fo.report(fo.all_rows(), note))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", choices=(*fo.MODELS, fo.CONTROL),
                   help=f"models (default: both real ones; {fo.CONTROL} only when named)")
    p.add_argument("--preset", action="append", choices=llamacpp.PRESETS, help="presets (default: all)")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    p.add_argument("--load-note", default="", help="what else the machine was running (for peers.md)")
    p.add_argument("--json", default=str(ROWS_JSON),
                   help="rows file, bench/results/frontier_ood_peers*.json (so that two runs can go side by side; "
                        "the steps go to peers*.json with the same suffix)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(THREADS, torch.get_num_threads()))
    torch.manual_seed(0)
    rows_json = Path(args.json).resolve()
    if not rows_json.name.startswith("frontier_ood_peers") or rows_json.suffix != ".json":
        raise SystemExit(f"--json {args.json}: name it frontier_ood_peers*.json (frontier_ood.py merges those)")
    steps_json = rows_json.with_name("peers" + rows_json.name.removeprefix("frontier_ood_peers"))
    fo.JSON["path"] = rows_json
    rows = fo.load_rows()
    steps = json.loads(steps_json.read_text()) if steps_json.exists() else {}
    if not args.report:
        try:                                 # fail before any work: "run `make peers`"
            for name in llamacpp.TOOLS:
                llamacpp.tool(name)
            llamacpp.source_dir()
        except FileNotFoundError as exc:
            raise SystemExit(f"bench/peers.py: {exc}") from None
        presets = args.preset or list(llamacpp.PRESETS)
        for key in args.model or fo.MODELS:
            print(f"\n== {key}", flush=True)
            rows[:] = [r for r in rows if not (r["model"] == key and r.get("peer", {}).get("preset") in presets)]
            info = steps.setdefault(key, {})
            info["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
            for what in list(info.get("failures", {})):
                if any(what.startswith(label(pr, False)) for pr in presets):
                    del info["failures"][what]
            try:
                run_model(key, presets, rows, info)
            finally:
                steps_json.write_text(json.dumps(steps, indent=1) + "\n")
                fo.save(rows)
    write_reports(rows, steps, args.load_note)
    print((RESULTS / "peers.md").read_text())


if __name__ == "__main__":
    main()

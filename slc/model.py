"""Whole models: swap linear layers for CompressedLinear, report what it did, save and load one file.

    report = compress_model(model, LinearSpec("entropy"))     # every Linear / Conv1D but embeddings and lm_head
    print(report)                                             # per layer: kind, shape, bytes, bits/weight, error, seconds
    save_compressed(model, "m.slc.safetensors")               # one safetensors file + JSON metadata, written atomically
    model = load_compressed("m.slc.safetensors")              # skeleton with no weights -> load -> int8 stays int8

A policy is one LinearSpec for every layer, or a dict {fnmatch pattern on the module name: LinearSpec
or None}, first match wins, None = leave dense; names no pattern matches stay dense. Embeddings stay
dense unless `embeddings=LinearSpec()` is given; a tied lm_head then shares their int8 codes.

The file is plain safetensors: no pickle, and loading never imports or runs code named by the file
(the architecture must be a class of the installed transformers package; no trust_remote_code).
Its metadata key "slc" holds JSON: format, version, architecture, config, per-layer specs and
buffer layouts, and which tensors are tied to which.
"""
from __future__ import annotations

import fnmatch
import html
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import FormatError
from .integrity import atomic_write, check_config_types, check_skeleton, tensor_checksums, verify_checksums
from .nn import (CompressedEmbedding, CompressedLinear, LinearSpec, TiedLinear, _conv1d_class, check_meta,
                 dense_weight_of, validate_loaded)

FORMAT = "slc.model"
FORMAT_VERSION = 1
DEFAULT_SKIP = ("*embed*", "*wte", "*wpe", "*lm_head*")   # embeddings and the output head stay dense by default


def _is_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


@dataclass
class LayerRow:
    """One compressed layer in a CompressionReport."""
    name: str
    kind: str                 # "quantized", "entropy", "lowrank" or "embedding"
    storage: str              # LinearSpec.describe(): quantiser, rank target
    shape: tuple              # (out, in)
    bytes_before: int         # dense weight bytes (bias excluded on both sides)
    bytes_after: int          # CompressedLinear.nbytes: every buffer but the bias
    bits_per_weight: float
    rel_error: float          # ||W_hat - W||_F / ||W||_F
    seconds: float            # compression time


@dataclass
class CompressionReport:
    """What compress_model did: a row per compressed layer, and what it skipped and why.

    >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    >>> report = compress_model(net, LinearSpec(), progress=False)
    >>> t = report.totals()
    >>> t["layers"], t["bytes_before"] == 4 * t["params"], round(t["bits_per_weight"], 2)
    (2, True, 8.56)
    >>> [type(m).__name__ for m in net]
    ['CompressedLinear', 'ReLU', 'CompressedLinear']
    """
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)             # (name, reason)
    unmatched_patterns: list = field(default_factory=list)  # policy patterns that matched no layer

    def to_rows(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def totals(self) -> dict:
        params = sum(r.shape[0] * r.shape[1] for r in self.rows)
        before = sum(r.bytes_before for r in self.rows)
        after = sum(r.bytes_after for r in self.rows)
        errs = [r.rel_error for r in self.rows]
        return {"layers": len(self.rows), "params": params, "bytes_before": before, "bytes_after": after,
                "ratio": before / after if after else float("nan"),
                "bits_per_weight": 8 * after / params if params else float("nan"),
                "mean_rel_error": sum(errs) / len(errs) if errs else float("nan"),
                "max_rel_error": max(errs, default=float("nan")),
                "seconds": sum(r.seconds for r in self.rows), "skipped": len(self.skipped)}

    def _table(self) -> tuple[list[str], list[list[str]]]:
        head = ["layer", "kind", "storage", "shape", "KiB before", "KiB after", "bits/w", "rel err", "s"]
        body = [[r.name, r.kind, r.storage, f"{r.shape[0]}x{r.shape[1]}", f"{r.bytes_before / 1024:.1f}",
                 f"{r.bytes_after / 1024:.1f}", f"{r.bits_per_weight:.2f}", f"{r.rel_error:.4f}", f"{r.seconds:.2f}"]
                for r in self.rows]
        t = self.totals()
        body.append(["total", f"{t['layers']} layers", "", f"{t['params']} w", f"{t['bytes_before'] / 1024:.1f}",
                     f"{t['bytes_after'] / 1024:.1f}", f"{t['bits_per_weight']:.2f}", f"{t['mean_rel_error']:.4f}",
                     f"{t['seconds']:.2f}"])
        return head, body

    def _notes(self) -> list[str]:
        notes = []
        if self.skipped:
            by_reason: dict = {}
            for name, reason in self.skipped:
                by_reason.setdefault(reason, []).append(name)
            for reason, names in by_reason.items():
                shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
                notes.append(f"left dense ({reason}): {shown}")
        if self.unmatched_patterns:
            notes.append(f"policy patterns that matched no layer: {self.unmatched_patterns}")
        return notes

    def __str__(self) -> str:
        head, body = self._table()
        widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body[:-1]]
        lines += ["  ".join("-" * w for w in widths), fmt(body[-1])]
        return "\n".join(lines + self._notes())

    def _repr_html_(self) -> str:
        head, body = self._table()
        cell = lambda tag, c, i: f"<{tag} style='text-align:{'left' if i < 4 else 'right'}'>{html.escape(c)}</{tag}>"
        rows = ["<tr>" + "".join(cell("th", c, i) for i, c in enumerate(head)) + "</tr>"]
        rows += ["<tr>" + "".join(cell("td", c, i) for i, c in enumerate(r)) + "</tr>" for r in body[:-1]]
        rows += ["<tr style='font-weight:bold'>" + "".join(cell("td", c, i) for i, c in enumerate(body[-1])) + "</tr>"]
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in self._notes())
        return f"<table>{''.join(rows)}</table>{notes}"


def _resolve(name: str, policy, skip) -> tuple[LinearSpec | None, str | None, str]:
    """(spec or None, the pattern that decided, reason when left dense)."""
    for pat in skip:
        if fnmatch.fnmatchcase(name, pat):
            return None, None, f"default skip {pat!r}"
    if isinstance(policy, LinearSpec):
        return policy, None, ""
    for pat, spec in policy.items():
        if fnmatch.fnmatchcase(name, pat):
            return spec, pat, "" if spec is not None else f"policy {pat!r} -> None"
    return None, None, "no policy pattern matched"


def compress_model(model: nn.Module, policy: LinearSpec | dict | None = None, progress: bool = True,
                   skip: tuple = DEFAULT_SKIP, x_covs: dict | None = None,
                   embeddings: LinearSpec | None = None) -> CompressionReport:
    """Replace the model's Linear / Conv1D layers in place according to `policy`; return a report.

    policy: a LinearSpec for every layer (default int8 per channel), or {fnmatch pattern: LinearSpec | None}
    with the first matching pattern winning. `skip` patterns are checked first (default: embeddings and
    lm_head, which is usually tied to the embeddings); pass skip=() to compress those too.
    x_covs: {module name: E[x x^T] of its inputs} for activation-aware low rank (lowrank specs only).
    embeddings: a quantized LinearSpec for every nn.Embedding (default None: they stay dense). An output
    head tied to the token embedding then multiplies with the same codes (TiedLinear), whatever `skip` says.
    """
    from tqdm.auto import tqdm

    policy = LinearSpec() if policy is None else policy
    if isinstance(policy, dict):
        for pat, spec in policy.items():
            if not isinstance(pat, str) or not (spec is None or isinstance(spec, LinearSpec)):
                raise TypeError(f"policy must map str patterns to LinearSpec or None; got {pat!r}: {spec!r}")
    elif not isinstance(policy, LinearSpec):
        raise TypeError(f"policy must be a LinearSpec or a dict of pattern -> LinearSpec, got {type(policy).__name__}")
    if isinstance(skip, str):
        raise TypeError("skip must be a tuple of patterns, e.g. ('*lm_head*',), not a single string")

    report = CompressionReport()
    targets, used, linear_names = [], set(), []
    tied_head = _tied_head(model) if embeddings is not None else None
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            if embeddings is None:
                report.skipped.append((name, "embedding"))
            else:
                targets.append((name, module, embeddings))
            continue
        if name == tied_head:
            linear_names.append(name)                               # becomes a TiedLinear below
            continue
        if isinstance(module, CompressedLinear) or not _is_linear(module):
            continue
        linear_names.append(name)
        spec, pat, reason = _resolve(name, policy, skip)
        used.add(pat)
        if spec is None:
            report.skipped.append((name, reason))
        else:
            targets.append((name, module, spec))
    if not linear_names:
        raise ValueError(f"{type(model).__name__} has no torch.nn.Linear or transformers Conv1D layers to compress "
                         "(already compressed, or an architecture built from other layer types)")
    if isinstance(policy, dict):
        report.unmatched_patterns = [p for p in policy if p not in used]
        if report.unmatched_patterns:
            warnings.warn(f"policy patterns matched no layer: {report.unmatched_patterns}; "
                          f"layer names look like {linear_names[0]!r}", stacklevel=2)

    for name, module, spec in tqdm(targets, desc="compress", unit="layer", disable=not progress):
        parent_name, _, child = name.rpartition(".")
        t0 = time.perf_counter()
        try:
            if isinstance(module, nn.Embedding):
                layer = CompressedEmbedding.from_embedding(module, spec)
            else:
                cov = None if x_covs is None or spec.kind != "lowrank" else x_covs.get(name)
                layer = CompressedLinear.from_linear(module, spec, x_cov=cov)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None                  # say which layer the spec did not fit
        seconds = time.perf_counter() - t0
        w = (module.weight.detach() if isinstance(module, nn.Embedding) else dense_weight_of(module)).float()
        # entropy: the coder is lossless, so the decoded weight equals the quantiser's (tested); skip the decode
        w_hat = spec.quantizer.quantize(w).dequantize() if layer.kind == "entropy" else layer.weight_dense(torch.float32)
        rel = float((w_hat - w).norm() / w.norm().clamp_min(1e-30))
        setattr(model.get_submodule(parent_name), child, layer)
        report.rows.append(LayerRow(name, layer.kind, spec.describe(), tuple(layer.shape), w.numel() * module.weight.element_size(),
                                    layer.nbytes, layer.bits_per_weight, rel, seconds))
    if tied_head is not None:                                       # the head multiplies with the embedding's codes
        parent_name, _, child = tied_head.rpartition(".")
        setattr(model.get_submodule(parent_name), child, TiedLinear(model.get_input_embeddings()))
        report.skipped.append((tied_head, "tied to the compressed input embedding"))
    return report


def _tied_head(model: nn.Module) -> str | None:
    """Name of the output head whose weight IS the input embedding's (tie_word_embeddings), else None."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return None
    inp, out = get_in(), get_out()
    if inp is None or out is None or getattr(out, "weight", None) is None or out.weight is not getattr(inp, "weight", None):
        return None
    return next(n for n, m in model.named_modules() if m is out)


def lowrank_policy(ranks: dict, factor_quantizer=None) -> dict:
    """allocate_ranks output {"...q_proj.weight": r} -> a compress_model policy {"...q_proj": LinearSpec("lowrank", rank=r)}."""
    return {name.removesuffix(".weight"): LinearSpec("lowrank", rank=int(r), factor_quantizer=factor_quantizer)
            for name, r in ranks.items()}


def compressed_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    """{module name: CompressedLinear} of a model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


# --- save / load -----------------------------------------------------------------------------------

def _dedupe(state: dict) -> tuple[dict, dict]:
    """safetensors refuses tensors that share memory: keep one name per tensor, remember the others."""
    tensors, tied, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    ptrs: dict = {}                                         # overlapping but different views: give them their own copy
    for name, t in tensors.items():
        p = t.untyped_storage().data_ptr()
        if t.numel() and p in ptrs:
            tensors[name] = t.clone()
        ptrs[p] = name
    return tensors, tied


def save_compressed(model: nn.Module, path) -> Path:
    """Write the model (compressed layers and everything else) to ONE safetensors file, atomically."""
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise TypeError(f"save_compressed needs a transformers model (with .config), got {type(model).__name__}")
    path = Path(path)
    layers = {name: m.export_meta() for name, m in compressed_layers(model).items()}
    modules = {id(m): n for n, m in model.named_modules()}
    heads = {n: modules[id(m.embedding)] for n, m in model.named_modules() if isinstance(m, TiedLinear)}
    state = model.state_dict()
    tensors, tied = _dedupe(state)                          # on the model's device, where ties are still shared memory
    tensors = {k: v.cpu() for k, v in tensors.items()}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "architecture": type(model).__name__,
            "config": json.loads(config.to_json_string(use_diff=False)), "layers": layers, "tied": tied, "tied_heads": heads,
            "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}}
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        meta["generation_config"] = json.loads(gen.to_json_string(use_diff=False))
    meta["checksums"] = tensor_checksums(tensors)          # CRC32 of every tensor, checked before use on load
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"slc": json.dumps(meta)}))
    return path


def _read_meta(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("slc")
    except FileNotFoundError:
        raise
    except Exception as e:                                  # safetensors raises its own error type for bad headers
        raise FormatError(f"{path} is not a readable safetensors file: {e}") from None
    if raw is None:
        raise FormatError(f"{path} has no 'slc' metadata: not written by slc.save_compressed")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:    # "[[[[..." nests past the stack
        raise FormatError(f"{path}: slc metadata is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError(f"{path}: metadata format is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                          f"expected {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path} has format version {meta.get('version')!r}; this slc reads version "
                          f"{FORMAT_VERSION} (a newer file needs a newer slc)")
    for key, typ in (("architecture", str), ("config", dict), ("layers", dict), ("tied", dict), ("tied_heads", dict),
                     ("dtypes", dict), ("checksums", dict)):
        if not isinstance(meta.get(key), typ):
            raise FormatError(f"{path}: metadata field {key!r} is missing or not a {typ.__name__}")
    return meta


def _model_class(arch: str):
    """The transformers class named by the file, from the installed package only (nothing is imported by name)."""
    import transformers
    from transformers import PreTrainedModel

    cls = getattr(transformers, arch, None) if arch.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise FormatError(f"architecture {arch!r} is not a model class of the installed transformers "
                          f"{transformers.__version__}")
    return cls


def load_compressed(path, device="cpu", cache=None) -> nn.Module:
    """Rebuild the model from a save_compressed file: no fp32 weights are made, INT8 stays INT8.

    cache: an slc.nn.DecodeCache to share among the entropy-coded layers (None: decode every forward).
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    meta = _read_meta(path)
    cls = _model_class(meta["architecture"])
    check_config_types(meta["config"], cls.config_class, where=str(path))
    try:
        config = cls.config_class.from_dict(meta["config"])
    except Exception as e:
        raise FormatError(f"{path}: stored config does not build a {cls.config_class.__name__}: {e}") from None
    check_skeleton(cls, config, n_file_tensors=len(meta["checksums"]), where=str(path))   # before allocating
    # Parameters on the meta device (no memory, no random init); buffers stay real, so the ones a file
    # does not hold (non-persistent: rotary inv_freq, attention masks) are computed as usual.
    # (plain `with torch.device("meta")` would leave those as data-less meta tensors.)
    try:
        with init_empty_weights(include_buffers=False):
            model = cls(config)
    except Exception as e:
        raise FormatError(f"{path}: could not build a {cls.__name__} from the stored config: {e}") from None
    if meta.get("generation_config") is not None:
        from transformers import GenerationConfig
        try:
            model.generation_config = GenerationConfig.from_dict(meta["generation_config"])
        except Exception as e:
            raise FormatError(f"{path}: stored generation_config is invalid: {e}") from None
    for name, lmeta in meta["layers"].items():
        check_meta(lmeta)
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{path}: compressed layer {name!r} does not exist in a {cls.__name__}") from None
        is_emb = lmeta["kind"] == "embedding"
        if not (isinstance(old, nn.Embedding) if is_emb else _is_linear(old)):
            raise FormatError(f"{path}: {name!r} is a {type(old).__name__}, not {'an embedding' if is_emb else 'a linear layer'}")
        w = old.weight if is_emb else dense_weight_of(old)
        if tuple(w.shape) != (lmeta["out_features"], lmeta["in_features"]):
            raise FormatError(f"{path}: layer {name!r} is {lmeta['out_features']}x{lmeta['in_features']} in the "
                              f"metadata but {w.shape[0]}x{w.shape[1]} in the model config")
        parent_name, _, child = name.rpartition(".")
        layer_cls = CompressedEmbedding if is_emb else CompressedLinear
        setattr(model.get_submodule(parent_name), child, layer_cls.from_meta(lmeta, cache=cache))
    for name, src in meta["tied_heads"].items():
        if not isinstance(src, str) or not isinstance(meta["layers"].get(src), dict) or meta["layers"][src]["kind"] != "embedding":
            raise FormatError(f"{path}: head {name!r} is tied to {src!r}, which is not a compressed embedding in the file")
        try:
            model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{path}: tied head {name!r} does not exist in a {cls.__name__}") from None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, TiedLinear(model.get_submodule(src)))

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise FormatError(f"{path}: could not read tensors: {e}") from None
    file_tensors = dict(tensors)
    for alias, src in meta["tied"].items():
        if not isinstance(src, str) or src not in tensors:
            raise FormatError(f"{path}: tied tensor {alias!r} points at missing {src!r}")
        tensors[alias] = tensors[src]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{path}: tensors disagree with the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    exact = {f"{name}.{b}" for name, lm in meta["layers"].items() for b in lm["buffers"] if b not in ("bias", "vh", "ut")}
    for k, want in expected.items():
        got = tensors[k]
        if tuple(got.shape) != tuple(want.shape):
            raise FormatError(f"{path}: tensor {k!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        float_ok = k not in exact and got.is_floating_point() and want.is_floating_point()   # e.g. a model saved in fp16
        if got.dtype != want.dtype and not float_ok:
            raise FormatError(f"{path}: tensor {k!r} is {got.dtype}, expected {want.dtype}")
        if meta["dtypes"].get(k) != str(got.dtype).removeprefix("torch."):
            raise FormatError(f"{path}: tensor {k!r} is {got.dtype} but the metadata says {meta['dtypes'].get(k)}")
    verify_checksums(file_tensors, meta["checksums"], where=str(path))     # the bytes, before any is used
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise FormatError(f"{path}: tensors do not fit the model: {e}") from None
    for alias, src in meta["tied"].items():                 # re-tie: one Parameter object, as before saving
        parent_name, _, attr = alias.rpartition(".")
        src_parent, _, src_attr = src.rpartition(".")
        parent, src_mod = model.get_submodule(parent_name), model.get_submodule(src_parent)
        if attr in parent._parameters and src_attr in src_mod._parameters:
            parent._parameters[attr] = src_mod._parameters[src_attr]
    for name, layer in compressed_layers(model).items():
        try:
            validate_loaded(layer)
        except FormatError as e:
            raise FormatError(f"{path}: layer {name!r}: {e}") from None
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert not leftover, f"parameters left on the meta device: {leftover[:5]}"
    return model.to(device).eval()

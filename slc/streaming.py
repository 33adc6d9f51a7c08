"""Compress a checkpoint bigger than RAM: one tensor at a time, from disk to one slc file, resumable.

    report = compress_checkpoint("data/cache/synthetic/llama-2-7b", "7b.slc.safetensors", LinearSpec("entropy"))
    model = load_compressed("7b.slc.safetensors")          # the same file save_compressed(compress_model(...)) writes

How. The architecture is built on the meta device from the checkpoint's config (no memory): it names the
linear layers the policy selects, the state-dict order and the tied weights, exactly as compress_model and
save_compressed see them. Then every unit of output (a compressed layer: its weight + bias; or a tensor kept as
it is) is read with `slc.sources.open_checkpoint`, compressed, written to its own part file in a journal folder
next to the target (`.NAME.journal/`, each part a small safetensors file whose metadata says what it was made
from) and dropped. At the end the final file is assembled: the safetensors header is written from the parts'
headers (every dtype, shape and size is known), each part's bytes are streamed after it, and the file is
fsynced and renamed into place (`slc.integrity.atomic_write`); then the journal is deleted. Memory: one unit's
tensors at a time, whatever the model's size.

Resume. A run that dies (exception, Ctrl-C, SIGKILL, disk full) leaves the journal and never a target file.
Rerun with resume=True (the default): a part is reused when its header parses, its bytes match their CRC32 and
it was made from the same source tensors (name, dtype, shape, file, offset, size, CRC32 of three 64 KiB samples),
with the same spec and dtype. The tensors, their order and the header depend only on the parts, so the file is
byte-identical to an uninterrupted run's (and to save_compressed's for the same model and policy).

Dask. client=None compresses in this process; client="local" starts a LocalCluster (one single-threaded worker
process per core), or pass a dask.distributed.Client or a scheduler address. Each unit is then one task: the
worker opens the checkpoint itself and writes the part (the journal must be on a file system every worker sees);
the driver only plans and assembles, so the bytes are the same as in process.

Other writers. slc.blockwise.gptq_checkpoint writes through the same journal: its plan comes from
`state_units`, each GPTQ layer goes to `write_part` as it is made, and `assemble` writes the file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import resource
import shutil
import struct
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import FORMAT, file_version, read_meta
from .compress import CompressionReport, LayerRow
from .errors import FormatError
from .hf import DEFAULT_SKIP, conv1d_class, is_linear, resolve_spec, skipped, tied_head
from .integrity import atomic_write, crc32_tensor, verify_checksums
from .models import weight_kind
from .nn import CompressedEmbedding, CompressedLinear, LinearSpec, check_policy, validate_loaded
from .quant import DTYPES, Quantizer, dtype_name
from .sources import SAFETENSORS_DTYPES, Checkpoint, TensorInfo, open_checkpoint, safetensors_layout
from .symbols import entropy_bits
from .synthetic import write_synthetic_checkpoint
from .tensor import CompressedTensor

PART_VERSION = 1                      # bump when a part's content for the same inputs changes
SAMPLE_BYTES = 64 << 10               # a source tensor's fingerprint reads three samples of this size
COPY_CHUNK = 16 << 20                 # assembly copies a part's bytes in pieces of this size
LOCK = "lock"                         # journal file holding the pid of the run writing it
# safetensors writes tensors sorted by dtype, in the reverse order of its Dtype enum, then by name
# (so every tensor stays aligned): write_safetensors does the same, and its files equal save_file's byte for byte
SAFETENSORS_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
                     "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
TORCH_TO_SAFETENSORS = {dt: name for name, (dt, _) in SAFETENSORS_DTYPES.items()}

__all__ = ["compress_checkpoint", "StreamReport", "layer_statistics", "open_checkpoint", "write_synthetic_checkpoint",
           "journal_path", "write_safetensors", "read_layer", "write_part", "read_part", "part_layer", "assemble",
           "dask_client", "claim_journal", "finished_parts", "finished_part", "state_units", "compress_unit", "Plan"]


# --- safetensors, written the way save_file writes it ---------------------------------------------------

def write_all(f, data) -> None:
    """Every write of compress_checkpoint goes through here (tests replace it to simulate a full disk)."""
    f.write(data)


def safetensors_header(entries: list[tuple[str, str, tuple, int]], metadata: dict | None) -> tuple[bytes, list]:
    """(header bytes, entries in data order) for [(name, safetensors dtype, shape, nbytes)], as save_file makes it."""
    rank = {d: i for i, d in enumerate(SAFETENSORS_ORDER)}
    ordered = sorted(entries, key=lambda e: (-rank[e[1]], e[0].encode()))
    head: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dt, shape, nbytes in ordered:
        head[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)                                    # the data section starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw, ordered


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes, row-major, without a copy when it is contiguous."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, byte for byte, writing each tensor from its own memory (no copy of the lot)."""
    entries = [(k, TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape), t.numel() * t.element_size())
               for k, t in tensors.items()]
    header, ordered = safetensors_header(entries, metadata)
    with open(path, "wb") as f:
        write_all(f, header)
        for name, *_ in ordered:
            write_all(f, tensor_bytes(tensors[name]))


# --- the plan: what each unit of output is made from ----------------------------------------------------

def journal_path(dst) -> Path:
    """The journal folder of a compress_checkpoint run writing `dst`: .NAME.journal next to it."""
    dst = Path(dst)
    return dst.parent / f".{dst.name}.journal"


def fingerprint(info: TensorInfo) -> list:
    """What identifies a source tensor without reading it all: layout + CRC32 of three 64 KiB samples."""
    crc = 0
    with open(info.file, "rb") as f:
        n = info.nbytes
        for start in sorted({0, max(0, n // 2 - SAMPLE_BYTES // 2), max(0, n - SAMPLE_BYTES)}):
            f.seek(info.offset + start)
            crc = zlib.crc32(f.read(min(SAMPLE_BYTES, n - start)), crc)
    return [info.name, info.stored, list(info.shape), info.file.name, info.offset, info.nbytes, f"{crc:08x}"]


def part_name(unit_name: str) -> str:
    return hashlib.sha1(unit_name.encode()).hexdigest()[:20] + ".safetensors"


@dataclass
class Plan:
    """Everything the driver knows before compressing: units in output order, the metadata skeleton."""
    units: list                        # JSON-able dicts, one per part (see `plan_units`)
    state_keys: list                   # the compressed model's state_dict keys, in order (module name for a layer)
    tied: dict                         # alias key -> source key (save_compressed's "tied")
    config: dict                       # config.to_json_string(use_diff=False), parsed
    architecture: str
    generation_config: dict | None
    dtype: torch.dtype
    skipped: list                      # (name, reason), as in CompressionReport
    unmatched_patterns: list
    tied_heads: dict                   # head -> compressed embedding it multiplies with (save_compressed's)


def model_config(ckpt: Checkpoint, dtype: torch.dtype | None, name: str | None = None):
    """(transformers config, model class, dtype), as from_pretrained(name or the folder, dtype=dtype) builds them."""
    import transformers
    from transformers import AutoConfig, PreTrainedModel

    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    name = name or str(folder)                                         # config._name_or_path, as from_pretrained
    if ckpt.format == "gguf":
        cfg = AutoConfig.from_pretrained(name, gguf_file=ckpt.path.name).to_dict()
        cfg.pop("quantization_config", None)                           # read back as plain floats
        cfg["architectures"] = cfg.get("architectures") or (ckpt.config or {}).get("architectures")
        config = AutoConfig.for_model(**cfg)
        config._name_or_path = name
    else:
        if not (folder / "config.json").is_file():
            raise ValueError(f"{ckpt.path}: no config.json next to the weights: compress_checkpoint needs the "
                             "architecture to write a file load_compressed opens")
        config = AutoConfig.from_pretrained(name)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ValueError(f"{ckpt.path}: config names architecture {arch!r}, not a model class of the installed "
                         f"transformers {transformers.__version__}")
    if dtype is None:                                                  # from_pretrained's dtype="auto"
        stated = getattr(config, "dtype", None)
        stated = DTYPES.get(stated) if isinstance(stated, str) else stated
        floats = [t.dtype for t in ckpt if t.dtype.is_floating_point]
        dtype = stated if isinstance(stated, torch.dtype) else (floats[0] if floats else torch.float32)
    config.dtype = dtype
    return config, cls, dtype


def generation_config(model: nn.Module, ckpt: Checkpoint, name: str) -> dict | None:
    """The generation config from_pretrained gives the model (GGUF: the model's own; otherwise the folder's
    generation_config.json, else one made from config.json)."""
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None)
    if gen is not None and ckpt.format != "gguf":
        try:
            gen = GenerationConfig.from_pretrained(name)
        except OSError:
            gen = GenerationConfig.from_pretrained(name, config_file_name="config.json", _from_model_config=True)
    return None if gen is None else json.loads(gen.to_json_string(use_diff=False))


def state_units(model: nn.Module, ckpt: Checkpoint, layers: dict, dtype: torch.dtype,
                head: str | None = None) -> tuple[list, list, dict]:
    """(units, state keys, tied) of `model` (on the meta device) once `layers` {module name: (spec, kind,
    has bias)} are compressed: a unit per compressed layer (its weight + bias) and per tensor kept, in
    state_dict order; a tied alias is stored once (as save_compressed's "tied"); `head`, a TiedLinear, has none.
    Each unit names its source tensors in `ckpt` with their fingerprints (what a resumed run checks)."""
    state = model.state_dict(keep_vars=True)
    groups: dict = {}
    for key, t in state.items():                                       # tied = the very same Parameter object
        groups.setdefault(id(t), []).append(key)
    source_of = {}
    for keys in groups.values():
        have = [k for k in keys if k in ckpt]
        for k in keys:
            source_of[k] = k if k in ckpt else (have[0] if have else None)
    cls = type(model)

    def need(key: str) -> TensorInfo:
        src = source_of.get(key)
        if src is None:
            raise FormatError(f"{ckpt.path}: a {cls.__name__} needs tensor {key!r}, which the checkpoint "
                              f"does not hold")
        return ckpt.tensors[src]

    units, state_keys, tied, seen_layer, emitted = [], [], {}, set(), {}
    fp = {}

    def fing(info: TensorInfo) -> list:
        if info.name not in fp:
            fp[info.name] = fingerprint(info)
        return fp[info.name]

    for key, t in state.items():
        module_name, _, attr = key.rpartition(".")
        if module_name in layers and attr in ("weight", "bias"):
            if module_name in seen_layer:
                continue
            seen_layer.add(module_name)
            spec, kind, has_bias = layers[module_name]
            w = need(f"{module_name}.weight")
            b = need(f"{module_name}.bias") if has_bias else None
            units.append({"version": PART_VERSION, "name": module_name, "kind": kind, "spec": spec.to_dict(),
                          "dtype": dtype_name(dtype), "weight": w.name, "bias": None if b is None else b.name,
                          "sources": [fing(w)] + ([fing(b)] if b is not None else [])})
            if kind == "embedding":
                units[-1]["padding_idx"] = model.get_submodule(module_name).padding_idx
            state_keys.append(module_name)
            continue
        if module_name == head:                                        # the TiedLinear multiplies with the codes
            continue
        first = groups[id(t)][0]
        if first != key and first in emitted:                          # a tied alias: stored once
            tied[key] = first
            state_keys.append(key)
            continue
        info = need(key)
        out_dtype = dtype if t.is_floating_point() else info.dtype
        units.append({"version": PART_VERSION, "name": key, "kind": "tensor", "spec": None,
                      "dtype": dtype_name(out_dtype), "weight": info.name, "bias": None, "sources": [fing(info)]})
        state_keys.append(key)
        emitted[key] = True
    return units, state_keys, tied


def plan_units(ckpt: Checkpoint, policy, dtype: torch.dtype | None = None, skip=DEFAULT_SKIP,
               name: str | None = None, embeddings: LinearSpec | None = None) -> Plan:
    """Which tensors become which CompressedLinear (or CompressedEmbedding, with `embeddings`) and which are
    kept, in the order save_compressed writes them after compress_model."""
    config, cls, dtype = model_config(ckpt, dtype, name)
    with torch.device("meta"):
        model = cls(config)                                            # names, order, ties: no memory
    gen = generation_config(model, ckpt, config._name_or_path)
    head = tied_head(model) if embeddings is not None else None       # becomes a TiedLinear: no tensor of its own

    policy = check_policy(policy)
    conv1d = conv1d_class()
    layers, skipped, used, linear_names = {}, [], set(), []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            if embeddings is None:
                skipped.append((name, "embedding"))
            else:
                layers[name] = (embeddings, "embedding", False)
            continue
        if name == head:
            linear_names.append(name)
            continue
        if not is_linear(module):
            continue
        linear_names.append(name)
        spec, pat, reason = resolve_spec(name, policy, skip)
        used.add(pat)
        if spec is None:
            skipped.append((name, reason))
            continue
        kind = "conv1d" if conv1d is not None and isinstance(module, conv1d) else "linear"
        layers[name] = (spec, kind, module.bias is not None)
    unmatched = [p for p in policy if p not in used] if isinstance(policy, dict) else []
    if not layers:
        examples = ", ".join(repr(n) for n in linear_names[:4]) or "none"
        raise ValueError(f"{ckpt.path}: the policy selects no linear layer of this {cls.__name__} (its linear "
                         f"modules look like {examples}; patterns match module names, without '.weight')")
    if unmatched:
        warnings.warn(f"policy patterns matched no layer: {unmatched}; layer names look like "
                      f"{linear_names[0]!r}", stacklevel=3)

    units, state_keys, tied = state_units(model, ckpt, layers, dtype, head)
    needed = {s for u in units for s in (u["weight"], u["bias"]) if s}
    for name in ckpt.tensors:
        if name not in needed:
            skipped.append((name, f"not a tensor of {cls.__name__} (from_pretrained ignores it too)"))
    if head is not None:
        skipped.append((head, "tied to the compressed input embedding"))
    emb = model.get_input_embeddings() if head is not None else None
    tied_heads = {head: next(n for n, m in model.named_modules() if m is emb)} if head is not None else {}
    return Plan(units, state_keys, tied, json.loads(config.to_json_string(use_diff=False)), cls.__name__,
                gen, dtype, skipped, unmatched, tied_heads)


# --- one unit: read, compress, write its part -------------------------------------------------------------

_OPEN: dict = {}                       # per process: the last checkpoint opened by compress_unit


def _checkpoint(src: str, max_bytes: int | None) -> Checkpoint:
    key = (src, max_bytes)
    if key not in _OPEN:
        _OPEN.clear()
        _OPEN[key] = open_checkpoint(src, max_bytes=max_bytes)
    return _OPEN[key]


def _build_linear(kind: str, w: torch.Tensor, b: torch.Tensor | None, padding_idx: int | None = None) -> nn.Module:
    """The nn.Linear (or Conv1D, or nn.Embedding) a loaded model would hold, built around tensors read from disk."""
    if kind == "embedding":
        with torch.device("meta"):
            layer = nn.Embedding(w.shape[0], w.shape[1], padding_idx=padding_idx)
    elif kind == "conv1d":
        with torch.device("meta"):
            layer = conv1d_class()(w.shape[1], w.shape[0])
    else:
        with torch.device("meta"):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    layer.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        layer.bias = nn.Parameter(b, requires_grad=False)
    return layer


def compress_unit(src: str, unit: dict, journal: str, max_bytes: int | None = None, errors: bool = True) -> dict:
    """Make one unit's part file in `journal` (a task: in process or on a Dask worker); returns its metadata."""
    ckpt = _checkpoint(src, max_bytes)
    t0 = time.perf_counter()
    dtype = DTYPES[unit["dtype"]]
    w = ckpt.read(unit["weight"], dtype=dtype)
    bytes_in = ckpt.tensors[unit["weight"]].nbytes
    row, layer_meta = None, None
    if unit["kind"] == "tensor":
        tensors = {unit["name"]: w}
    else:
        b = None
        if unit["bias"] is not None:
            b = ckpt.read(unit["bias"], dtype=dtype)
            bytes_in += ckpt.tensors[unit["bias"]].nbytes
        spec = LinearSpec.from_dict(unit["spec"])
        module = _build_linear(unit["kind"], w, b, unit.get("padding_idx"))
        try:
            if unit["kind"] == "embedding":
                layer = CompressedEmbedding.from_embedding(module, spec)
            else:
                layer = CompressedLinear.from_linear(module, spec)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{unit['name']}: {e}") from None
        seconds = time.perf_counter() - t0
        rel = float("nan")
        if errors:
            dense = module.weight.detach().T if unit["kind"] == "conv1d" else module.weight.detach()
            diff = layer.weight_dense(torch.float32).sub_(dense)
            rel = float(diff.norm() / dense.float().norm().clamp_min(1e-30))
            del diff
        tensors = {f"{unit['name']}.{k}": v for k, v in layer.state_dict().items()}
        layer_meta = layer.export_meta()
        row = [unit["name"], layer.kind, spec.describe(), list(layer.shape), w.numel() * w.element_size(),
               layer.nbytes, layer.bits_per_weight, rel, seconds]
        del module, layer
    return write_part(journal, unit, tensors, layer_meta, row, bytes_in)


def write_part(journal, unit: dict, tensors: dict, layer_meta: dict | None = None, row: list | None = None,
               bytes_in: int = 0) -> dict:
    """Write one unit's part file into `journal` atomically (a small safetensors file whose metadata says what
    it was made from and the CRC32 of each tensor); returns that metadata.

    tensors: {state_dict key: tensor} of the unit; layer_meta: the compressed layer's export_meta() (None for a
    tensor kept as it is); row: its report row (LayerRow's fields, JSON-able)."""
    meta = {"unit": unit, "keys": list(tensors), "layer": layer_meta, "row": row, "bytes_in": bytes_in,
            "checksums": {k: f"{crc32_tensor(t):08x}" for k, t in tensors.items()}}
    path = Path(journal) / part_name(unit["name"])
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, {"slc.part": json.dumps(meta)}))
    return meta


def part_layer(journal, unit: dict, meta: dict) -> CompressedLinear:
    """The compressed layer a finished part holds (read_part's metadata), rebuilt on the CPU."""
    from safetensors.torch import load_file

    layer = CompressedLinear.from_meta(meta["layer"])
    prefix = unit["name"] + "."
    state = {k.removeprefix(prefix): t for k, t in load_file(str(Path(journal) / part_name(unit["name"]))).items()}
    layer.load_state_dict(state, strict=True, assign=True)
    validate_loaded(layer)
    return layer


def _crc_range(file: Path, offset: int, nbytes: int, out=None, what: str = "") -> int:
    """CRC32 of `nbytes` of `file` from `offset`, read in chunks; each chunk also written to `out` if given."""
    crc = 0
    with open(file, "rb") as f:
        f.seek(offset)
        left = nbytes
        while left:
            chunk = f.read(min(COPY_CHUNK, left))
            if not chunk:
                raise FormatError(f"{file}: truncated{what}")
            crc = zlib.crc32(chunk, crc)
            if out is not None:
                write_all(out, chunk)
            left -= len(chunk)
    return crc


def read_part(journal: Path, unit: dict, verify: bool = True) -> tuple[dict, dict] | None:
    """(part metadata, {key: TensorInfo in the part}) if a finished, valid part for `unit` is there, else None."""
    path = journal / part_name(unit["name"])
    if not path.is_file():
        return None
    try:
        infos, raw = safetensors_layout(path, max_bytes=1 << 62)
        meta = json.loads(raw["slc.part"])
        layout = {i.name: i for i in infos}
        if meta.get("unit") != unit or set(meta["keys"]) != set(layout) or set(meta["checksums"]) != set(layout):
            return None
        if verify:
            for k, info in layout.items():
                if f"{_crc_range(path, info.offset, info.nbytes):08x}" != meta["checksums"][k]:
                    return None
        return meta, layout
    except (FormatError, KeyError, ValueError, TypeError, OSError):
        return None


# --- the report -----------------------------------------------------------------------------------------

@dataclass
class StreamReport(CompressionReport):
    """What compress_checkpoint did: CompressionReport's rows, plus the stream's totals.

    >>> r = StreamReport(path="m.slc", tensors=3, bytes_in=2e9, bytes_out=5e8, params=10**9, seconds=4.0)
    >>> r.summary()["mb_per_s"], r.summary()["file_bits_per_weight"]
    (500.0, 4.0)
    """
    path: str = ""
    tensors: int = 0                    # parts (compressed layers + tensors kept)
    reused: int = 0                     # parts taken from the journal of an interrupted run
    bytes_in: float = 0                 # source bytes on disk of every tensor read
    bytes_out: float = 0                # size of the written file
    params: int = 0                     # weights in the file's model (tied ones once)
    seconds: float = 0.0                # wall time, planning and assembly included
    peak_rss: int = 0                   # this process's peak RSS, bytes (workers not included)
    workers: int = 0                    # Dask workers (0: in process)
    dashboard: str | None = None

    def summary(self) -> dict:
        return {"tensors": self.tensors, "reused": self.reused, "gb_in": self.bytes_in / 1e9,
                "gb_out": self.bytes_out / 1e9, "file_bits_per_weight": 8 * self.bytes_out / max(self.params, 1),
                "seconds": self.seconds, "mb_per_s": self.bytes_in / 1e6 / max(self.seconds, 1e-9),
                "peak_rss_gib": self.peak_rss / 2**30, "workers": self.workers}

    def __str__(self) -> str:
        s = self.summary()
        return (super().__str__() + f"\n{self.path}: {s['tensors']} parts ({s['reused']} reused), "
                f"{s['gb_in']:.3f} GB in -> {s['gb_out']:.3f} GB out ({s['file_bits_per_weight']:.3f} bits/weight "
                f"for the whole file), {s['seconds']:.1f} s, {s['mb_per_s']:.1f} MB/s, peak RSS "
                f"{s['peak_rss_gib']:.2f} GiB" + (f", {self.workers} Dask workers" if self.workers else ""))


# --- the driver -------------------------------------------------------------------------------------------

def dask_client(client):
    """(dask Client or None, a cluster we started or None, whether we own the client) for client= None (this
    process), "local" (a LocalCluster, one single-threaded worker process per core, dashboard link printed), a
    scheduler address or a dask.distributed.Client."""
    if client is None:
        return None, None, False
    from dask.distributed import Client, LocalCluster

    if isinstance(client, Client):
        return client, None, False
    if client == "local":
        cluster = LocalCluster(n_workers=os.cpu_count() or 1, threads_per_worker=1, processes=True)
        c = Client(cluster)
        print(f"Dask LocalCluster with {len(cluster.workers)} workers; dashboard: {c.dashboard_link}", flush=True)
        return c, cluster, True
    if isinstance(client, str):
        return Client(client), None, True
    raise TypeError(f"client must be None, 'local', a scheduler address 'tcp://...' or a dask.distributed.Client, "
                    f"got {type(client).__name__}")


def _disk_full(e: OSError, dst: Path, journal: Path, what: str) -> OSError:
    free = shutil.disk_usage(dst.parent).free
    n = len(list(journal.glob("*.safetensors"))) if journal.is_dir() else 0
    return OSError(errno.ENOSPC, f"{dst}: the disk filled up while writing {what} ({free / 1e9:.2f} GB free); "
                   f"no output was written, and the journal {journal} keeps the {n} finished parts: free some space "
                   f"and rerun compress_checkpoint with resume=True")


def compress_checkpoint(src, dst, policy=None, *, client=None, resume: bool = True, progress: bool = True,
                        max_bytes: int | None = None, dtype: torch.dtype | None = None, skip=DEFAULT_SKIP,
                        errors: bool = True, embeddings: LinearSpec | None = None) -> StreamReport:
    """Compress the checkpoint at `src` (HF folder, .safetensors, index JSON, .gguf) into the slc file `dst`.

    policy: as compress_model's (one LinearSpec, {fnmatch pattern on the module name: LinearSpec | None}, or an
    allocate() result); `skip` patterns are checked first (default: embeddings and lm_head stay as they are).
    client: None (this process), "local" (a LocalCluster, one worker per core), a scheduler address or a Client.
    resume: reuse the parts an interrupted run left in the journal (False: start over).
    max_bytes: the per-tensor read budget of open_checkpoint (default: half the available memory).
    dtype: the model's dtype (default: the config's, as from_pretrained's dtype="auto"); floats are stored in it.
    errors: compute each layer's relative error for the report (one more decode per layer).
    embeddings: as compress_model's: a quantized LinearSpec for every nn.Embedding (default None: dense); a head
    tied to the token embedding then multiplies with its codes (the same file as compress_model writes).

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> src = write_synthetic_checkpoint(d + "/tiny", "tiny", progress=False)
    >>> report = compress_checkpoint(src, d + "/tiny.slc", LinearSpec("entropy"), progress=False)
    >>> len(report.rows), report.reused, sorted(os.listdir(d))
    (14, 0, ['tiny', 'tiny.slc'])
    """
    t_start = time.perf_counter()
    dst = Path(dst).absolute()
    src_path = str(Path(src).absolute())
    ckpt = open_checkpoint(src_path, max_bytes=max_bytes)
    given = os.fspath(src)
    plan = plan_units(ckpt, policy, dtype, skip, name=given if Path(given).is_dir() else str(Path(given).parent),
                      embeddings=embeddings)
    journal = claim_journal(dst, resume)
    parts = finished_parts(journal, plan.units) if resume else {}
    todo = [u for u in plan.units if u["name"] not in parts]
    reused = len(parts)
    total_in = sum(s[5] for u in plan.units for s in u["sources"])
    bar = tqdm(total=total_in, unit="B", unit_scale=True, desc=f"compress {dst.name}", disable=not progress)
    bar.update(sum(m["bytes_in"] for m, _ in parts.values()))
    bar.set_postfix_str(f"{len(parts)}/{len(plan.units)} tensors")
    c, cluster, own = dask_client(client)
    workers = 0
    try:
        if c is None:
            for unit in todo:
                meta = compress_unit(src_path, unit, str(journal), max_bytes, errors)
                parts[unit["name"]] = finished_part(journal, unit)
                bar.update(meta["bytes_in"])
                bar.set_postfix_str(f"{len(parts)}/{len(plan.units)} tensors")
        else:
            from dask.distributed import as_completed

            workers = len(c.scheduler_info().get("workers", {}))
            futures = {c.submit(compress_unit, src_path, unit, str(journal), max_bytes, errors, pure=False,
                                key=f"slc-compress-{part_name(unit['name'])[:20]}-{time.time_ns()}"): unit
                       for unit in todo}
            try:
                for fut in as_completed(futures):
                    meta = fut.result()
                    unit = futures[fut]
                    parts[unit["name"]] = finished_part(journal, unit)
                    bar.update(meta["bytes_in"])
                    bar.set_postfix_str(f"{len(parts)}/{len(plan.units)} tensors")
            finally:
                for fut in futures:
                    fut.cancel()
        assemble(dst, plan, parts)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _disk_full(e, dst, journal, "the compressed tensors") from e
        raise
    finally:
        bar.close()
        if own:
            c.close()
        if cluster is not None:
            cluster.close()
        (journal / LOCK).unlink(missing_ok=True)       # the parts stay until the file is in place
    shutil.rmtree(journal, ignore_errors=True)

    report = StreamReport(skipped=plan.skipped, unmatched_patterns=plan.unmatched_patterns, path=str(dst),
                          tensors=len(plan.units), reused=reused, bytes_in=total_in, bytes_out=dst.stat().st_size,
                          workers=workers, dashboard=None)
    for unit in plan.units:
        meta, _ = parts[unit["name"]]
        if meta["row"] is not None:
            name, kind, storage, shape, before, after, bpw, rel, sec = meta["row"]
            report.rows.append(LayerRow(name, kind, storage, tuple(shape), before, after, bpw, rel, sec))
    report.params = sum(math.prod(s[2]) for u in plan.units for s in u["sources"][:1])
    report.seconds = time.perf_counter() - t_start
    report.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


def claim_journal(dst: Path, resume: bool) -> Path:
    """The journal folder of a run writing `dst`, created and locked for this process (resume=False: emptied)."""
    journal = journal_path(dst)
    if not resume and journal.exists():
        lock_journal(journal, dst)                     # refuses while another run is writing it
        shutil.rmtree(journal)
    journal.mkdir(parents=True, exist_ok=True)
    lock_journal(journal, dst)
    return journal


def finished_parts(journal: Path, units: list) -> dict:
    """{unit name: (part metadata, layout)} of the units whose part an earlier run finished (CRCs checked)."""
    parts = {}
    for unit in units:
        found = read_part(journal, unit)
        if found is not None:
            parts[unit["name"]] = found
    return parts


def lock_journal(journal: Path, dst: Path) -> None:
    """Claim the journal for this process: RuntimeError if a live process holds it (a dead one's lock is taken)."""
    lock = journal / LOCK
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and psutil.pid_exists(pid):
                raise RuntimeError(f"{dst}: another compress_checkpoint (pid {pid}) is writing it (journal {journal})"
                                   f"; wait for it, or stop it and rerun") from None
            lock.unlink(missing_ok=True)               # a dead run's lock (or our own)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return


def finished_part(journal: Path, unit: dict) -> tuple[dict, dict]:
    """(metadata, layout) of the part just written for `unit` (its CRCs are checked at assembly)."""
    found = read_part(journal, unit, verify=False)            # just written: its CRCs are checked at assembly
    if found is None:
        raise FormatError(f"{journal / part_name(unit['name'])}: the part for {unit['name']!r} was not written")
    return found


def assemble(dst: Path, plan: Plan, parts: dict) -> None:
    """Write the slc file from the parts: header first, then each tensor's bytes streamed from its part."""
    layers, dtypes, checksums, where, entries = {}, {}, {}, {}, []
    by_name = {u["name"]: u for u in plan.units}
    for key in plan.state_keys:
        if key in plan.tied:
            dtypes[key] = dtypes[plan.tied[key]]
            continue
        meta, layout = parts[by_name[key]["name"]]
        if meta["layer"] is not None:
            layers[key] = meta["layer"]
        for k in meta["keys"]:
            info = layout[k]
            dtypes[k] = dtype_name(info.dtype)
            checksums[k] = meta["checksums"][k]
            where[k] = info
            entries.append((k, info.stored, info.shape, info.nbytes))
    slc_meta = {"format": FORMAT, "version": file_version(layers), "architecture": plan.architecture,
                "config": plan.config, "layers": layers, "tied": plan.tied, "tied_heads": plan.tied_heads,
                "dtypes": dtypes}
    if plan.generation_config is not None:
        slc_meta["generation_config"] = plan.generation_config
    slc_meta["checksums"] = checksums
    header, ordered = safetensors_header(entries, {"slc": json.dumps(slc_meta)})

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            write_all(out, header)
            for name, *_ in ordered:
                info = where[name]
                crc = _crc_range(info.file, info.offset, info.nbytes, out, f" in tensor {name!r}")
                if f"{crc:08x}" != checksums[name]:
                    raise FormatError(f"{info.file}: tensor {name!r} changed on disk since it was written "
                                      f"(CRC32 {crc:08x}, expected {checksums[name]}); rerun to redo it")

    atomic_write(dst, write)


def read_layer(path, name: str) -> CompressedLinear:
    """One compressed layer of an slc file, read alone (its buffers checked against their CRC32): no model built.

    path: a save_compressed / compress_checkpoint file; name: a module name in its metadata "layers"."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_meta(path)
    if name not in meta["layers"]:
        some = ", ".join(repr(n) for n in list(meta["layers"])[:3])
        raise KeyError(f"{path}: no compressed layer {name!r} (layers look like {some})")
    lmeta = meta["layers"][name]
    if lmeta.get("kind") == "embedding":
        raise ValueError(f"{path}: {name!r} is an embedding; read_layer reads linear layers")
    layer = CompressedLinear.from_meta(lmeta)
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(f"{name}.{k}") for k in lmeta["buffers"]}
    verify_checksums({f"{name}.{k}": t for k, t in state.items()},
                     {f"{name}.{k}": meta["checksums"].get(f"{name}.{k}", "") for k in state}, where=str(path))
    layer.load_state_dict(state, strict=True, assign=True)
    validate_loaded(layer)
    return layer


# --- per-layer statistics, streamed ------------------------------------------------------------------------

def layer_statistics(checkpoint, names=None, *, quantizer: Quantizer | None = None, outlier_sigmas: float = 6.0,
                     spectrum_rows: int = 256, spectrum_points: int = 32, seed: int = 0,
                     max_bytes: int | None = None) -> Iterator[dict]:
    """One row of statistics per 2-D weight of a checkpoint, read from disk one at a time (never the model).

    checkpoint: a path open_checkpoint takes, or a Checkpoint. names: which tensors (default: every 2-D
    '.weight' but embeddings and lm_head). Each row: name, kind, shape, params, bits_per_weight (int8 per
    channel + rANS, all overhead, really coded), entropy_bits (order-0 entropy of the int8 codes, bits/weight),
    outlier_share (fraction of weights beyond `outlier_sigmas` x their row's RMS), spectrum (singular values of
    `spectrum_rows` rows drawn at random, divided by the largest, at `spectrum_points` evenly spaced ranks) and
    top_energy (share of the sampled rows' energy in the top 10 % of singular values).
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint, max_bytes=max_bytes)
    q = quantizer or Quantizer()
    if names is None:
        names = [t.name for t in ckpt if len(t.shape) == 2 and t.name.endswith(".weight")
                 and skipped(t.name.removesuffix(".weight")) is None]
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        w = ckpt.read(name, dtype=torch.float32)
        qt = q.quantize(w)
        ct = CompressedTensor.from_quantized(qt, predictor="none")
        codes = qt.codes.numpy().reshape(-1)
        rms = w.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-30)
        outliers = float((w.abs() > outlier_sigmas * rms).double().mean())
        rows = torch.randperm(w.shape[0], generator=gen)[:spectrum_rows]
        s = torch.linalg.svdvals(w[rows].double())
        energy = s.pow(2)
        top = max(1, math.ceil(0.1 * s.numel()))
        at = np.linspace(0, s.numel() - 1, min(spectrum_points, s.numel())).round().astype(int)
        yield {"name": name, "kind": weight_kind(name), "shape": tuple(w.shape), "params": w.numel(),
               "bits_per_weight": 8 * ct.nbytes / w.numel(), "entropy_bits": entropy_bits(codes) / w.numel(),
               "outlier_share": outliers, "top_energy": float(energy[:top].sum() / energy.sum().clamp_min(1e-300)),
               "spectrum": (s[at] / s[0].clamp_min(1e-300)).tolist(), "gb_on_disk": ckpt.tensors[name].nbytes / 1e9}
        del w, qt, ct, codes

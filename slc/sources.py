"""Read a checkpoint from disk one tensor at a time, without ever building the model.

    with open_checkpoint("data/cache/smollm2-135m") as ckpt:     # HF folder, .safetensors, index JSON or .gguf
        for info in ckpt:                                        # TensorInfo(name, shape, dtype, nbytes, ...)
            w = ckpt.read(info.name, dtype=torch.float32)        # one tensor; nothing else is read

Sources:
    Hugging Face folder   `model.safetensors`, or shards `model-0000x-of-0000y.safetensors` named by
                          `model.safetensors.index.json`; any safetensors dtype (fp32/fp16/bf16 ...).
    one .safetensors file (its folder's config.json, if any, is `.config`)
    one GGUF file         each tensor de-quantised to fp32 on read with `gguf.quants.dequantize`; for the
                          llama architecture the names are mapped to transformers' names and the rows of
                          Q and K are un-permuted the way transformers' GGUF loader does, so `read()` returns
                          exactly the parameter that `from_pretrained(..., gguf_file=...)` would build.

Memory. A safetensors tensor comes back as a view of a private memory map of its file: pages are read
from disk when touched and released when the tensor is dropped (a map held open for the whole file would
keep every page read so far in this process's RSS, ~the file size by the end of a stream). A GGUF tensor
maps only its own bytes, de-quantises them into a new fp32 array and unmaps them. So a stream through
the checkpoint holds about one tensor at a time.

Budget. Every tensor's declared shape, dtype and byte range are checked against the file before anything
is allocated, and any tensor that would materialise to more than `max_bytes` is refused with `FormatError`
(default: half of the memory available when the checkpoint is opened). A tiny hostile file that declares
a 2^31-weight tensor is refused at open, never allocated.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import torch

from slc.errors import FormatError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20          # safetensors' own limit on the JSON header

# safetensors dtype name -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2),
    "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}


def default_max_bytes() -> int:
    """Half of the memory available right now: the default per-tensor budget of `open_checkpoint`."""
    return psutil.virtual_memory().available // 2


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, as declared on disk (nothing is read to build it)."""
    name: str                 # transformers' parameter name (GGUF names are mapped for llama)
    shape: tuple[int, ...]    # the shape read() returns
    dtype: torch.dtype        # the dtype read() returns by default (fp32 for every GGUF tensor)
    nbytes: int               # bytes on disk
    stored: str               # the on-disk type: 'BF16', 'F32', 'Q4_1', ...
    file: Path                # the file holding it
    offset: int               # absolute byte offset of its data in `file`

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def fp32_bytes(self) -> int:
        """Bytes of this tensor as fp32 (the unit of the streaming memory budget)."""
        return 4 * self.numel


class Checkpoint:
    """Tensors of a checkpoint on disk, read one at a time; made by `open_checkpoint`.

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> p = tempfile.mkdtemp() + "/w.safetensors"
    >>> save_file({"a": torch.arange(6.0).reshape(2, 3)}, p)
    >>> with open_checkpoint(p) as ckpt:
    ...     assert len(ckpt) == 1 and ckpt.tensors["a"].shape == (2, 3)
    ...     assert torch.equal(ckpt.read("a"), torch.arange(6.0).reshape(2, 3))
    """

    def __init__(self, path: Path, fmt: str, tensors: dict[str, TensorInfo], config: dict | None,
                 max_bytes: int, gguf: dict | None = None, metadata: dict | None = None):
        self.path = path
        self.format = fmt                      # 'safetensors' or 'gguf'
        self.tensors = tensors                 # name -> TensorInfo, in read order (file, then offset)
        self.config = config                   # HF config.json as a dict (mapped from GGUF metadata), or None
        self.max_bytes = max_bytes
        self.metadata = metadata or {}         # safetensors '__metadata__' / GGUF general.* fields
        self._gguf = gguf or {}                # name -> (ggml type, byte shape, un-permute heads or 0)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between reads; kept so a Checkpoint can be used like a file."""

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data on disk."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def largest(self) -> TensorInfo:
        """The tensor with the most elements (it sets the memory a stream needs)."""
        return max(self.tensors.values(), key=lambda t: t.numel)

    def __repr__(self) -> str:
        return (f"Checkpoint({str(self.path)!r}, format={self.format!r}, tensors={len(self)}, "
                f"gb_on_disk={self.nbytes / 1e9:.3f})")

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read from disk now, as `dtype` (default: `tensors[name].dtype`)."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r} (it has {len(self)}; see .tensors)")
        info = self.tensors[name]
        out_dtype = dtype or info.dtype
        size = info.numel * out_dtype.itemsize
        _check_budget(info.file, name, size, self.max_bytes)
        t = self._read_gguf(info) if self.format == "gguf" else _read_safetensors(info)
        return t if t.dtype == out_dtype else t.to(out_dtype)

    def stream(self, dtype: torch.dtype | None = None) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """(info, tensor) for every tensor in read order, one at a time."""
        for info in self:
            yield info, self.read(info.name, dtype)

    def _read_gguf(self, info: TensorInfo) -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype, byte_shape, heads = self._gguf[info.name]
        try:
            qtype = GGMLQuantizationType(qtype)
            raw = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
            w = np.array(dequantize(raw.reshape(byte_shape), qtype), dtype=np.float32)   # a copy: unmaps raw
            del raw
        except NotImplementedError as exc:
            raise FormatError(f"{info.file}: tensor {info.name!r} is stored as {info.stored}, which gguf "
                              f"cannot de-quantise ({exc})") from None
        t = torch.from_numpy(w).reshape(info.shape)
        return unpermute_rotary(t, heads) if heads else t


def open_checkpoint(path: str | os.PathLike, max_bytes: int | None = None) -> Checkpoint:
    """A `Checkpoint` over a HF folder, a .safetensors file, a safetensors index JSON or a GGUF file."""
    path = Path(path)
    max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_folder(path, max_bytes)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        return _open_gguf(path, max_bytes)
    if path.name.endswith(".json"):
        return _open_index(path, max_bytes)
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        return _open_safetensors([path], None, path.parent, max_bytes, path)
    raise FormatError(f"{path}: not a checkpoint: expected a folder, a .safetensors file, a safetensors "
                      f"index JSON or a GGUF file")


def _open_folder(folder: Path, max_bytes: int) -> Checkpoint:
    if (folder / INDEX_FILE).exists():
        return _open_index(folder / INDEX_FILE, max_bytes, folder)
    if (folder / SINGLE_FILE).exists():
        return _open_safetensors([folder / SINGLE_FILE], None, folder, max_bytes, folder)
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return _open_safetensors(found, None, folder, max_bytes, folder)
    ggufs = sorted(folder.glob("*.gguf"))
    if not found and len(ggufs) == 1:
        return _open_gguf(ggufs[0], max_bytes)
    raise FormatError(f"{folder}: not a checkpoint folder: it needs {INDEX_FILE}, {SINGLE_FILE}, one .safetensors "
                      f"or one .gguf file (found {len(found)} .safetensors and {len(ggufs)} .gguf files)")


def _open_index(index: Path, max_bytes: int, path: Path | None = None) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise FormatError(f"{index}: not a safetensors index (a JSON object with a 'weight_map' of "
                          f"tensor name -> shard file)") from None
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if Path(shard).name != shard:
            raise FormatError(f"{index}: tensor {name!r} names shard {shard!r} outside the index's folder")
        shards.setdefault(shard, []).append(name)
    for shard, names in shards.items():
        if not (index.parent / shard).is_file():
            raise FormatError(f"{index}: shard {shard} is missing (it should hold tensor {names[0]!r} "
                              f"and {len(names) - 1} more)")
    files = [index.parent / s for s in sorted(shards)]
    return _open_safetensors(files, weight_map, index.parent, max_bytes, path or index)


def _read_config(folder: Path) -> dict | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except ValueError as exc:
        raise FormatError(f"{cfg}: not valid JSON ({exc})") from None


def _open_safetensors(files: list[Path], weight_map: dict | None, folder: Path, max_bytes: int,
                      path: Path) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    metadata: dict = {}
    for file in files:
        header, meta = safetensors_layout(file, max_bytes)
        metadata.update(meta)
        for info in header:
            if weight_map is not None and weight_map.get(info.name) != file.name:
                continue                                   # the index decides which shard owns a name
            if info.name in tensors:
                raise FormatError(f"{file}: tensor {info.name!r} is also in {tensors[info.name].file}")
            tensors[info.name] = info
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors:
                raise FormatError(f"{folder / shard}: the index names tensor {name!r} but this shard does not "
                                  f"hold it")
    return Checkpoint(path, "safetensors", tensors, _read_config(folder), max_bytes, metadata=metadata)


def _check_budget(file: Path, name: str, nbytes: int, max_bytes: int) -> None:
    if nbytes > max_bytes:
        raise FormatError(f"{file}: tensor {name!r} would take {nbytes / 2**30:.2f} GiB, over the budget of "
                          f"{max_bytes / 2**30:.2f} GiB (pass a larger max_bytes to open_checkpoint if it is "
                          f"genuine)")


def safetensors_layout(file: Path, max_bytes: int) -> tuple[list[TensorInfo], dict]:
    """Every tensor a .safetensors file declares, in data order, checked against the file; and __metadata__."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{file}: truncated safetensors header ({size} bytes; the header length alone "
                              f"takes 8)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise FormatError(f"{file}: truncated safetensors header: it declares {n} header bytes but the file "
                              f"holds {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise FormatError(f"{file}: safetensors header is not a JSON object (truncated or corrupt)") from None
    meta = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    infos = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise FormatError(f"{file}: tensor {name!r} has a malformed entry or an unsupported dtype "
                              f"{str(entry)[:200]} (supported: {', '.join(SAFETENSORS_DTYPES)})")
        dtype, itemsize = SAFETENSORS_DTYPES[entry["dtype"]]
        try:
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{file}: tensor {name!r} has a malformed header entry {str(entry)[:200]}") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end:
            raise FormatError(f"{file}: tensor {name!r} declares shape {shape} at offsets [{begin}, {end})")
        nbytes = math.prod(shape) * itemsize
        if end - begin != nbytes:
            raise FormatError(f"{file}: tensor {name!r} declares shape {shape} of {entry['dtype']} "
                              f"({nbytes} bytes) but offsets [{begin}, {end}) hold {end - begin}")
        if end > data_size:
            raise FormatError(f"{file}: tensor {name!r} runs past the end of the file (data offsets "
                              f"[{begin}, {end}), {data_size} data bytes): truncated or hostile")
        _check_budget(file, name, nbytes, max_bytes)
        infos.append(TensorInfo(name, shape, dtype, nbytes, entry["dtype"], file, data_start + begin))
    infos.sort(key=lambda t: t.offset)
    # The format's rule: the tensors tile the data section exactly, no overlap and no hole.
    end = data_start
    for info in infos:
        if info.offset != end and info.nbytes:
            how = ("overlaps the tensor before it" if info.offset < end
                   else f"leaves a hole of {info.offset - end} bytes")
            raise FormatError(f"{file}: tensor {info.name!r} {how} (data at byte {info.offset}, expected {end})")
        end = max(end, info.offset + info.nbytes)
    if end != size:
        raise FormatError(f"{file}: {size - end} bytes after the last tensor's data (not a safetensors layout)")
    return infos, meta


def _read_safetensors(info: TensorInfo) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    # A fresh handle per read: the tensor then owns the only reference to the file's map, so its pages
    # leave this process's RSS when the tensor is dropped (one handle kept open pins every page read).
    try:
        with safe_open(info.file, framework="pt") as f:
            return f.get_tensor(info.name)
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{info.file}: tensor {info.name!r} could not be read ({exc})") from None


# --- GGUF --------------------------------------------------------------------------------------------

# GGUF metadata value types -> struct format of a scalar (8 is a string, 9 an array)
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9

# llama.cpp's llama names -> transformers' LlamaForCausalLM names ('{}' is the block number)
GGUF_LLAMA_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "blk.{}.attn_norm": "model.layers.{}.input_layernorm",
    "blk.{}.ffn_norm": "model.layers.{}.post_attention_layernorm",
    "blk.{}.attn_q": "model.layers.{}.self_attn.q_proj", "blk.{}.attn_k": "model.layers.{}.self_attn.k_proj",
    "blk.{}.attn_v": "model.layers.{}.self_attn.v_proj",
    "blk.{}.attn_output": "model.layers.{}.self_attn.o_proj",
    "blk.{}.ffn_gate": "model.layers.{}.mlp.gate_proj", "blk.{}.ffn_up": "model.layers.{}.mlp.up_proj",
    "blk.{}.ffn_down": "model.layers.{}.mlp.down_proj",
}

# GGUF '<arch>.<key>' metadata -> transformers config keys (as transformers' integrations/ggml.py maps llama)
GGUF_CONFIG_KEYS = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim", "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size",
}
GGUF_TOKEN_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                   "padding_token_id": "pad_token_id", "unknown_token_id": "unk_token_id"}


def gguf_to_hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (llama); unknown names unchanged."""
    stem, dot, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        stem, dot, suffix = gguf_name, "", ""
    block = None
    if stem.startswith("blk."):
        parts = stem.split(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            block, stem = parts[1], f"blk.{{}}.{parts[2]}"
    hf = GGUF_LLAMA_NAMES.get(stem)
    if hf is None:
        return gguf_name
    return (hf.format(block) if block is not None else hf) + dot + suffix


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a Q or K projection (transformers' `reverse_permute_weights`).

    llama.cpp's convert script reorders each head's rows from [pairs halves] to interleaved pairs for its
    rotary kernel: rows (head, 2, dim) -> (head, dim, 2). This maps them back.
    """
    rows = w.shape[0]
    assert rows % (2 * n_head) == 0, f"{rows} rows do not split into {n_head} heads of pairs"
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


class _Cursor:
    """Bounds-checked little-endian reads from a GGUF header; every overrun is a FormatError."""

    def __init__(self, buf, file: Path):
        self.buf, self.pos, self.file = buf, 0, file

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise FormatError(f"{self.file}: truncated GGUF header: {what} needs {n} bytes at byte {self.pos} "
                              f"of {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.u64(what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.file}: {what} is not UTF-8 (byte {self.pos})") from None

    def value(self, vtype: int, what: str):
        """A scalar or string value; an array is skipped and stands for its length."""
        if vtype == GGUF_STRING:
            return self.string(what)
        if vtype in GGUF_SCALARS:
            fmt = GGUF_SCALARS[vtype]
            return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]
        if vtype != GGUF_ARRAY:
            raise FormatError(f"{self.file}: {what} has unknown GGUF value type {vtype}")
        sub, count = self.u32(what), self.u64(what)
        if sub in GGUF_SCALARS:
            self.take(count * struct.calcsize(GGUF_SCALARS[sub]), what)
            return count
        least = 8 if sub == GGUF_STRING else 12                   # a string's length / a nested array's header
        if sub not in (GGUF_STRING, GGUF_ARRAY) or count * least > len(self.buf) - self.pos:
            raise FormatError(f"{self.file}: {what}: array of type {sub} x {count} does not fit the file")
        for _ in range(count):
            self.value(sub, what)
        return count


def gguf_layout(file: Path, max_bytes: int) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int, int]]]:
    """A GGUF file's metadata {key: value} (arrays as their lengths) and, in data order, every tensor's
    (gguf name, dims as stored, ggml type, absolute data offset, bytes), checked against the file and the
    budget before any tensor is touched.

    Parsed here rather than by `gguf.GGUFReader`: every length is bounds-checked, so a hostile header fails
    with the tensor's name, and it is ~15x faster (the reader decodes the whole tokenizer).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = file.stat().st_size
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, file)
        if cur.take(4, "magic") != b"GGUF":
            raise FormatError(f"{file}: not a GGUF file (bad magic)")
        version = cur.u32("version")
        if version not in (2, 3):
            raise FormatError(f"{file}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
        if n_tensors * 24 + n_kv * 12 > size:
            raise FormatError(f"{file}: GGUF header declares {n_tensors} tensors and {n_kv} metadata entries; "
                              f"they cannot fit in {size} bytes")
        fields = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            fields[key] = cur.value(cur.u32(f"metadata {key!r}"), f"metadata {key!r}")
        alignment = fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise FormatError(f"{file}: general.alignment {alignment!r} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.u32(f"tensor {name!r}")
            if not 1 <= n_dims <= 4:
                raise FormatError(f"{file}: tensor {name!r} declares {n_dims} dimensions (GGML allows 1 to 4)")
            dims = tuple(cur.u64(f"tensor {name!r}") for _ in range(n_dims))
            qtype, offset = cur.u32(f"tensor {name!r}"), cur.u64(f"tensor {name!r}")
            infos.append((name, dims, qtype, offset))
        data_start = -(-cur.pos // alignment) * alignment
    out, seen = [], set()
    for name, dims, qtype, offset in infos:
        if name in seen:
            raise FormatError(f"{file}: tensor {name!r} appears twice")
        seen.add(name)
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise FormatError(f"{file}: tensor {name!r} has unknown GGML type {qtype}") from None
        numel = math.prod(dims)
        if dims[0] % block:
            raise FormatError(f"{file}: tensor {name!r}: rows of {dims[0]} do not split into blocks of {block}")
        nbytes = numel // block * type_size
        begin = data_start + offset
        if begin + nbytes > size:
            raise FormatError(f"{file}: tensor {name!r} declares {dims} ({nbytes} bytes at byte {begin}) but the "
                              f"file has {size} bytes: truncated or hostile")
        _check_budget(file, name, 4 * numel, max_bytes)
        out.append((name, dims, qtype, begin, nbytes))
    return fields, sorted(out, key=lambda t: t[3])


def gguf_config(fields: dict, has_output: bool) -> dict:
    """An HF-like config dict from GGUF metadata (llama keys as transformers maps them)."""
    arch = fields.get("general.architecture", "")
    cfg: dict = {"model_type": arch}
    if arch == "llama":
        cfg.update(architectures=["LlamaForCausalLM"], hidden_act="silu", attention_bias=False, mlp_bias=False)
    for key, hf in GGUF_CONFIG_KEYS.items():
        if f"{arch}.{key}" in fields:
            cfg[hf] = fields[f"{arch}.{key}"]
    for key, hf in GGUF_TOKEN_KEYS.items():
        if f"tokenizer.ggml.{key}" in fields:
            cfg[hf] = fields[f"tokenizer.ggml.{key}"]
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in fields:
        cfg["vocab_size"] = fields["tokenizer.ggml.tokens"]
    cfg["tie_word_embeddings"] = not has_output
    return cfg


def _open_gguf(file: Path, max_bytes: int) -> Checkpoint:
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    fields, layout = gguf_layout(file, max_bytes)      # validates everything before any tensor is read
    config = gguf_config(fields, has_output=any(name == "output.weight" for name, *_ in layout))
    llama = config["model_type"] == "llama"
    tensors, extra = {}, {}
    for name, dims, qtype, begin, nbytes in layout:
        shape = tuple(reversed(dims))                   # GGML lists the fastest dimension first
        hf = gguf_to_hf_name(name) if llama else name
        heads = 0
        if llama and name.endswith((".attn_q.weight", ".attn_k.weight")):
            key = "num_attention_heads" if ".attn_q." in name else "num_key_value_heads"
            heads = int(config.get(key, config.get("num_attention_heads", 0)))
        qt = GGMLQuantizationType(qtype)
        tensors[hf] = TensorInfo(hf, shape, torch.float32, nbytes, qt.name, file, begin)
        extra[hf] = (qtype, quant_shape_to_byte_shape(shape, qt), heads)
    meta = {k: v for k, v in fields.items() if k.startswith("general.")}
    return Checkpoint(file, "gguf", tensors, config, max_bytes, gguf=extra, metadata=meta)

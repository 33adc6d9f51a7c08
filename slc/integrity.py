"""Integrity of saved files: a CRC32 per tensor, atomic writes, and a budget for the model skeleton.

The parsers (`rans.RansStream.from_bytes`, `CompressedTensor.from_bytes`, `model.load_compressed`)
check structure: magic, version, lengths, dtypes, shapes. Three things a plain safetensors file
does not give on top of that:

1. Bit rot in data that parses fine. A flipped bit in int8 codes or in a scale still loads and
   gives a silently wrong weight. `tensor_checksums` stores a CRC32 per tensor (in the JSON
   metadata) and `verify_checksums` checks them before any tensor is used; the error names the tensor.
2. Interrupted saves. `atomic_write` writes into a private temp folder next to the target, fsyncs
   the file, renames it over the target and fsyncs the folder. An exception removes the temp
   folder. A SIGKILL cannot be handled by the dying process, so its temp folder stays; the folder
   name carries the writer's pid, and the next `atomic_write` to the same target removes those of
   writers that are no longer alive. (A folder, not a file, because safetensors' save_file itself
   writes a ".tmpXXXXXX" file next to the name it is given and renames it: after a SIGKILL that
   anonymous file, as big as the model, would be left where nobody can tell whose it is.)
3. A small file that builds a huge, or broken, model. A model is built from the config stored in the file
   before any tensor is read: num_hidden_layers = 10**6 takes minutes, and GPT-Neo allocates a
   max_position_embeddings**2 mask per layer (40 GB from a 50 KB file). `check_skeleton` bounds
   both before anything real is allocated, and `check_config_types` rejects values whose type
   differs from the config class's default (transformers accepts output_hidden_states="float16"
   and the model then fails inside forward).

>>> import torch, tempfile, os
>>> t = {"w": torch.arange(6, dtype=torch.int8)}
>>> sums = tensor_checksums(t)
>>> verify_checksums(t, sums)
>>> t["w"][0] = 1
>>> try:
...     verify_checksums(t, sums)
... except FormatError as e:
...     print(e)
tensor 'w': CRC32 mismatch (stored 30ebcf4a, computed fbb71cef): the file is corrupt
>>> d = tempfile.mkdtemp()
>>> p = atomic_write(os.path.join(d, "x.bin"), lambda tmp: open(tmp, "wb").write(b"hello"))
>>> open(p, "rb").read(), os.listdir(d)
(b'hello', ['x.bin'])
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import time
import zlib
from pathlib import Path

import torch

from .errors import FormatError

MAX_SKELETON_BUFFER_BYTES = 1 << 30   # buffers a model builds from its config alone (masks, rotary tables)
MAX_LAYERS = 1024                     # the deepest real LLMs have ~128 blocks
STALE_UNOWNED_SECONDS = 3600          # a temp without a pid (older naming) is stale after an hour


# --- checksums -----------------------------------------------------------------------------------

def crc32_tensor(t: torch.Tensor) -> int:
    """CRC32 of a tensor's bytes, row-major, as they sit on disk (any dtype, bfloat16 included)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return zlib.crc32(memoryview(t.view(torch.uint8).numpy())) if t.numel() else 0


def tensor_checksums(tensors: dict) -> dict[str, str]:
    """{name: 8 hex digits}: one CRC32 per tensor, for the file's JSON metadata."""
    return {name: f"{crc32_tensor(t):08x}" for name, t in tensors.items()}


def verify_checksums(tensors: dict, checksums, where: str = "") -> None:
    """Raise FormatError naming the first tensor whose bytes do not match its stored CRC32.

    Every tensor must have a checksum and every checksum a tensor: a file with a tensor added or
    dropped is as wrong as one with a flipped bit.
    """
    at = f"{where}: " if where else ""
    if not isinstance(checksums, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{8}", v)
            for k, v in checksums.items()):
        raise FormatError(f"{at}checksums must map tensor names to 8 hex digits")
    missing = sorted(set(tensors) - set(checksums))
    extra = sorted(set(checksums) - set(tensors))
    if missing or extra:
        raise FormatError(f"{at}checksums disagree with the tensors: no checksum for {missing[:5]}, "
                          f"no tensor for {extra[:5]}")
    for name, t in tensors.items():
        got = f"{crc32_tensor(t):08x}"
        if got != checksums[name]:
            raise FormatError(f"{at}tensor {name!r}: CRC32 mismatch (stored {checksums[name]}, computed {got}): "
                              "the file is corrupt")


# --- atomic writes -------------------------------------------------------------------------------

def _temp_pattern(path: Path) -> re.Pattern:
    # ours: .NAME.PID.RAND.tmp (a folder); model.py's mkstemp naming before this module: .NAME.RAND.tmp
    return re.compile(r"\." + re.escape(path.name) + r"\.(?:(\d+)\.)?[A-Za-z0-9_]+\.tmp")


def temp_files(path) -> list[Path]:
    """Temp files and folders an interrupted write to `path` may have left next to it."""
    path = Path(path)
    pat = _temp_pattern(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pat.fullmatch(p.name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, someone else's
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def clean_stale_temps(path, max_age: float = STALE_UNOWNED_SECONDS) -> list[Path]:
    """Remove temps of writes to `path` whose writer died (same machine); returns what was removed.

    A temp names its writer's pid: it is stale when that pid is gone. (A reused pid keeps a stale
    temp until that process ends too: conservative, never removes a live writer's file.) A temp
    without a pid is removed once it is `max_age` seconds old.
    """
    path = Path(path)
    pat = _temp_pattern(path)
    removed = []
    for p in temp_files(path):
        pid = pat.fullmatch(p.name).group(1)
        try:
            stale = (not _alive(int(pid)) and int(pid) != os.getpid()) if pid else \
                time.time() - p.stat().st_mtime > max_age
        except FileNotFoundError:   # another writer cleaned it first
            continue
        if stale:
            _remove(p)
            removed.append(p)
    return removed


def atomic_write(path, write_fn) -> Path:
    """Write `path` all or nothing: write_fn(temp path) writes the bytes; then fsync, rename, fsync dir.

    If write_fn (or anything after it) raises, the temp is removed and `path` is untouched. The temp
    is a file inside a private folder .NAME.PID.RAND.tmp in the target's folder (a rename across file
    systems would not be atomic), so whatever write_fn creates next to its file stays inside, and a
    later call can tell a dead writer's leftovers from a live one's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp_dir = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp_dir.mkdir()
    tmp = tmp_dir / path.name
    try:
        write_fn(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())                  # the bytes are on disk before the name points at them
        os.chmod(tmp, 0o666 & ~_umask())          # writers like mkstemp make 0600; give the usual mode
        os.replace(tmp, path)
    finally:
        _remove(tmp_dir)
    try:                                          # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:                               # some file systems cannot fsync a folder
        pass
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- the model skeleton ----------------------------------------------------------------------------

def check_skeleton(cls, config, n_file_tensors: int, where: str = "",
                   max_buffer_bytes: int = MAX_SKELETON_BUFFER_BYTES) -> None:
    """Bound what building `cls(config)` costs before building it for real; raise FormatError.

    - layers: every layer holds at least one tensor, so config.num_hidden_layers <= the number of
      tensors in the file, and <= MAX_LAYERS (zero-size tensors cost a forger header bytes only).
    - buffers made from the config alone (causal masks, rotary tables): built first on the meta
      device, which allocates nothing, and summed.
    """
    at = f"{where}: " if where else ""
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and not 0 <= layers <= min(n_file_tensors, MAX_LAYERS):
        raise FormatError(f"{at}config has num_hidden_layers={layers} but the file holds {n_file_tensors} "
                          f"tensors (and slc allows at most {MAX_LAYERS} layers): corrupt or forged config")
    try:
        with torch.device("meta"):
            skeleton = cls(config)
    except Exception as e:
        raise FormatError(f"{at}could not build a {cls.__name__} from the stored config: {e}") from None
    sizes = {n: b.numel() * b.element_size() for n, b in skeleton.named_buffers()}
    total = sum(sizes.values())
    if total > max_buffer_bytes:
        big = max(sizes, key=sizes.get)
        raise FormatError(f"{at}the stored config makes {total / 2**30:.1f} GiB of buffers before any weight "
                          f"(largest: {big!r}, {sizes[big] / 2**30:.1f} GiB); limit "
                          f"{max_buffer_bytes / 2**30:.1f} GiB: corrupt or forged config")


def _type_ok(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
            and abs(value) != float("inf")
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def check_config_types(config: dict, config_class, where: str = "") -> None:
    """Every stored config value has the type of the class default (None defaults accept anything)."""
    at = f"{where}: " if where else ""
    if not isinstance(config, dict):
        raise FormatError(f"{at}config must be a JSON object")
    try:
        default = config_class()
    except Exception:                              # noqa: BLE001 - a class without defaults: nothing to compare
        return
    for key, value in config.items():
        ref = getattr(default, key, None)
        if ref is not None and not _type_ok(value, ref):
            raise FormatError(f"{at}config field {key!r} is {value!r:.60} ({type(value).__name__}); "
                              f"a {config_class.__name__} expects a {type(ref).__name__}")

"""Save a (compressed) transformers model to ONE safetensors file, and load it back without dense weights.

    save_compressed(model, "m.slc.safetensors")       # one safetensors file + JSON metadata, written atomically
    model = load_compressed("m.slc.safetensors")      # skeleton with no weights -> load -> int8 stays int8

The file is plain safetensors: no pickle, and loading never imports or runs code named by the file
(the architecture must be a class of the installed transformers package; no trust_remote_code).
Its metadata key "slc" holds JSON: format, version, architecture, config, per-layer specs and
buffer layouts, which tensors are tied to which, dtypes and a CRC32 of every tensor.

Loading is four steps, each a function: `read_meta` (validate the JSON), `build_skeleton` (the
architecture on the meta device with CompressedLinear layers swapped in), `read_tensors` (every
tensor checked against the skeleton and its checksum) and `fill` (assign, re-tie, validate).
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .compress import compressed_layers
from .errors import FormatError
from .hf import dense_weight_of, is_linear, set_module
from .integrity import atomic_write, check_config_types, check_skeleton, tensor_checksums, verify_checksums
from .nn import CompressedEmbedding, CompressedLinear, TiedLinear, check_meta, validate_loaded
from .sources import default_max_bytes, safetensors_layout

FORMAT = "slc.model"
# 2: entropy layers may be tiled (slc.tiles); 3: layers may be rotated (slc.rotation, a "rotation" field).
# A file is written at the lowest version its layers need (file_version), so older slcs read what they can
# and refuse a file whose layers they would misread.
FORMAT_VERSION = 3
VERSIONS = (1, 2, 3)


def rotated(layer_meta) -> bool:
    """The layer's metadata names a rotation (its weight is stored as W R)."""
    return isinstance(layer_meta, dict) and layer_meta.get("rotation") is not None


def file_version(layers: dict) -> int:
    """The format version a file with these layer metas needs: 3 with a rotated layer, 2 with a tiled entropy
    layer, else 1 (so a file without tiles reads in an slc from before tiles, and loads + saves back byte for
    byte; an slc from before rotations refuses a rotated file instead of computing W R x)."""
    if any(rotated(m) for m in layers.values()):
        return 3
    tiled = any(isinstance(m.get("tensor"), dict) and m["tensor"].get("layout") == "tiled" for m in layers.values())
    return 2 if tiled else 1


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
    meta = {"format": FORMAT, "version": file_version(layers), "architecture": type(model).__name__,
            "config": json.loads(config.to_json_string(use_diff=False)), "layers": layers, "tied": tied,
            "tied_heads": heads,
            "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}}
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        meta["generation_config"] = json.loads(gen.to_json_string(use_diff=False))
    meta["checksums"] = tensor_checksums(tensors)          # CRC32 of every tensor, checked before use on load
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"slc": json.dumps(meta)}))
    return path


def read_meta(path: Path) -> dict:
    """The validated "slc" JSON metadata of a save_compressed file (FormatError if it is not one)."""
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
    if meta.get("version") not in VERSIONS:
        raise FormatError(f"{path} has format version {meta.get('version')!r}; this slc reads versions "
                          f"{VERSIONS} (a newer file needs a newer slc)")
    for key, typ in (("architecture", str), ("config", dict), ("layers", dict), ("tied", dict), ("tied_heads", dict),
                     ("dtypes", dict), ("checksums", dict)):
        if not isinstance(meta.get(key), typ):
            raise FormatError(f"{path}: metadata field {key!r} is missing or not a {typ.__name__}")
    if meta["version"] < 3 and any(rotated(m) for m in meta["layers"].values()):
        raise FormatError(f"{path} has rotated layers but format version {meta['version']}: rotations need version 3")
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


def load_compressed(path, device="cpu", cache=None, max_bytes: int | None = None) -> nn.Module:
    """Rebuild the model from a save_compressed file: no fp32 weights are made, INT8 stays INT8.

    cache: an slc.nn.DecodeCache to share among the entropy-coded layers (None: decode every forward).
    max_bytes: refuse the file (FormatError, before anything is allocated) if its declared tensors plus its
    largest layer as fp32 would take more (default: half of the memory available now).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    meta = read_meta(path)
    check_budget(path, meta, default_max_bytes() if max_bytes is None else max_bytes)
    model = build_skeleton(meta, where=str(path), cache=cache)
    tensors = read_tensors(path, meta, model)
    fill(model, tensors, meta, where=str(path))
    return model.to(device).eval()


def check_budget(path: Path, meta: dict, max_bytes: int) -> None:
    """FormatError if loading would materialise more than max_bytes: every tensor the header declares (checked
    against the file) plus the largest layer of the metadata as fp32 (what a forward may decode)."""
    infos, _ = safetensors_layout(path, max_bytes)
    dims = [(lm.get("out_features"), lm.get("in_features")) for lm in meta["layers"].values() if isinstance(lm, dict)]
    sizes = [4 * m * n for m, n in dims if isinstance(m, int) and isinstance(n, int)]
    total = sum(i.nbytes for i in infos) + max(sizes, default=0)
    if total > max_bytes:
        raise FormatError(f"{path}: loading would take {total / 2**30:.2f} GiB (tensors plus the largest layer as "
                          f"fp32), over the budget of {max_bytes / 2**30:.2f} GiB (pass a larger max_bytes to "
                          f"load_compressed if it is genuine)")


def build_skeleton(meta: dict, where: str, cache=None) -> nn.Module:
    """The architecture the metadata names, parameters on the meta device, compressed layers swapped in."""
    from accelerate import init_empty_weights

    cls = _model_class(meta["architecture"])
    check_config_types(meta["config"], cls.config_class, where=where)
    try:
        config = cls.config_class.from_dict(meta["config"])
    except Exception as e:
        raise FormatError(f"{where}: stored config does not build a {cls.config_class.__name__}: {e}") from None
    check_skeleton(cls, config, n_file_tensors=len(meta["checksums"]), where=where)   # before allocating
    # Parameters on the meta device (no memory, no random init); buffers stay real, so the ones a file
    # does not hold (non-persistent: rotary inv_freq, attention masks) are computed as usual.
    # (plain `with torch.device("meta")` would leave those as data-less meta tensors.)
    try:
        with init_empty_weights(include_buffers=False):
            model = cls(config)
    except Exception as e:
        raise FormatError(f"{where}: could not build a {cls.__name__} from the stored config: {e}") from None
    if meta.get("generation_config") is not None:
        from transformers import GenerationConfig
        try:
            model.generation_config = GenerationConfig.from_dict(meta["generation_config"])
        except Exception as e:
            raise FormatError(f"{where}: stored generation_config is invalid: {e}") from None
    for name, lmeta in meta["layers"].items():
        set_module(model, name, _empty_layer(model, name, lmeta, where, cache))
    for name, src in meta["tied_heads"].items():
        layers = meta["layers"]
        if not isinstance(src, str) or not isinstance(layers.get(src), dict) or layers[src]["kind"] != "embedding":
            raise FormatError(f"{where}: head {name!r} is tied to {src!r}, which is not a compressed embedding "
                              "in the file")
        try:
            model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{where}: tied head {name!r} does not exist in a {cls.__name__}") from None
        set_module(model, name, TiedLinear(model.get_submodule(src)))
    return model


def _empty_layer(model: nn.Module, name: str, lmeta, where: str, cache) -> CompressedLinear:
    """The CompressedLinear (or CompressedEmbedding) skeleton for layer `name`, checked against the model."""
    check_meta(lmeta)
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise FormatError(f"{where}: compressed layer {name!r} does not exist in a {type(model).__name__}") from None
    is_emb = lmeta["kind"] == "embedding"
    if not (isinstance(old, nn.Embedding) if is_emb else is_linear(old)):
        raise FormatError(f"{where}: {name!r} is a {type(old).__name__}, "
                          f"not {'an embedding' if is_emb else 'a linear layer'}")
    w = old.weight if is_emb else dense_weight_of(old)
    if tuple(w.shape) != (lmeta["out_features"], lmeta["in_features"]):
        raise FormatError(f"{where}: layer {name!r} is {lmeta['out_features']}x{lmeta['in_features']} in the "
                          f"metadata but {w.shape[0]}x{w.shape[1]} in the model config")
    return (CompressedEmbedding if is_emb else CompressedLinear).from_meta(lmeta, cache=cache)


def read_tensors(path: Path, meta: dict, model: nn.Module) -> dict:
    """Every tensor of the file (ties resolved), checked against the skeleton's state_dict and the checksums."""
    from safetensors.torch import load_file

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
        raise FormatError(f"{path}: tensors disagree with the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    exact = {f"{name}.{b}" for name, lm in meta["layers"].items()
             for b in lm["buffers"] if b not in ("bias", "vh", "ut")}
    for k, want in expected.items():
        got = tensors[k]
        if tuple(got.shape) != tuple(want.shape):
            raise FormatError(f"{path}: tensor {k!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        float_ok = k not in exact and got.is_floating_point() and want.is_floating_point()   # e.g. saved in fp16
        if got.dtype != want.dtype and not float_ok:
            raise FormatError(f"{path}: tensor {k!r} is {got.dtype}, expected {want.dtype}")
        if meta["dtypes"].get(k) != str(got.dtype).removeprefix("torch."):
            raise FormatError(f"{path}: tensor {k!r} is {got.dtype} but the metadata says {meta['dtypes'].get(k)}")
    verify_checksums(file_tensors, meta["checksums"], where=str(path))     # the bytes, before any is used
    return tensors


def fill(model: nn.Module, tensors: dict, meta: dict, where: str) -> None:
    """Assign the tensors to the skeleton, re-tie shared parameters, validate every compressed layer."""
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise FormatError(f"{where}: tensors do not fit the model: {e}") from None
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
            raise FormatError(f"{where}: layer {name!r}: {e}") from None
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert not leftover, f"parameters left on the meta device: {leftover[:5]}"

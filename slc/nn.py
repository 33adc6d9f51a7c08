"""CompressedLinear: a drop-in nn.Module for a Linear (or GPT-2 Conv1D) whose weight is stored compressed.

Three storage kinds, chosen by a `LinearSpec`:
    quantized  integer codes + float32 scales in buffers (int8 stays int8; 2..4-bit codes are
               packed two per byte). forward multiplies with the codes directly where it can.
    entropy    the codes rANS-coded, so between forwards only the coded bytes are held. Two layouts:
               tiled (the default where the scales are per row or group): independent tiles of
                   output rows (slc.tiles); a forward of a few rows (generation, <= fused.MAX_ROWS)
                   decodes tile by tile on every core and multiplies as it decodes (slc.fused), nothing
                   bigger than a row is materialised; more rows (prefill, batches) decode the weight
                   once and use a dense GEMM.
               stream (files written before tiles, the left predictor, per-tensor scales): one rANS
                   stream (a `CompressedTensor`'s buffers), decoded whole on every forward.
               A `DecodeCache` shared by many layers keeps recently decoded codes under a byte budget.
    lowrank    truncated SVD factors Vh (r, n), S (r,), U^T (r, m), each optionally quantised;
               forward is two small matmuls: y = ((x @ Vh^T) * S) @ U^T.

A quantized or entropy layer may be stored rotated (`LinearSpec(rotate="hadamard")`): the codes are
those of W R, R a seeded block-Hadamard rotation (slc.rotation), and forward first rotates the input
(R^T x, a batched matmul per block) and then runs the kind's own path on it, fused kernels included.
The layer's metadata keeps the seed and block size ("rotation"), never a matrix.

`CompressedEmbedding` keeps an nn.Embedding's table the quantized way (a lookup dequantises only
the rows it reads) and `TiedLinear` is an output head that multiplies with that same table.

A quantized or entropy layer may also hold a `shift`: one bfloat16 offset per output row, added to the
output after the bias (`set_shift`; slc.distill learns it). Unlike the bias, which the original layer had
and which is kept as it was, the shift is something compression added, so it counts in `nbytes`.

Everything is a buffer, so `.to()`, `state_dict()` and `load_state_dict()` work as for any module.
Scales, zero points and S keep float32 through `.to(dtype)` / `.half()`: they are part of the
stored format. The output always has the input's dtype.
"""
from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import FormatError
from .factors import low_rank, quantize_factors
from .hf import dense_weight_of
from .quant import DTYPES, FLOAT_NAMES, QuantizedTensor, Quantizer, dtype_name
from .fused import MAX_TRELLIS_CODE, FusedWeight, TorchFusedWeight
from .rotation import KINDS as ROTATIONS
from .rotation import SEED_LIMIT, Rotation
from .symbols import PREDICTORS, code_dtype, split_escapes
from .tensor import CompressedTensor, check_header, decode_codes
from .tiles import TiledStream, encode_tiled

LAYOUTS = ("tiled", "stream")
TILED_BUFFERS = ("words", "states", "freqs", "tile_rows", "tile_words", "tile_escapes", "escapes")

KINDS = ("quantized", "entropy", "lowrank")
LAYER_KINDS = KINDS + ("embedding",)                                # what a saved layer's metadata may say
_CHUNK_BYTES = 4 << 20          # int_linear converts codes to floats in one piece up to this size ...
_CHUNK_ROWS = 1024              # ... and in blocks of this many output rows beyond it (stays in cache)
_uids = itertools.count()


class DecodeCache:
    """LRU of decoded integer codes, shared by the entropy layers of a model, under `max_bytes`.

    >>> cache = DecodeCache(max_bytes=1000)
    >>> cache.put("a", torch.zeros(600, dtype=torch.int8)); cache.put("b", torch.zeros(600, dtype=torch.int8))
    >>> cache.get("a") is None and cache.get("b") is not None and cache.nbytes == 600
    True
    """

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.RLock()                               # forwards may run in several threads

    def get(self, key, owner: torch.Tensor | None = None):
        """The cached tensor, or None; with `owner`, only if it was put with that very tensor object."""
        with self._lock:
            return self._get(key, owner)

    def _get(self, key, owner):
        item = self._items.get(key)
        if item is None or (owner is not None and item[0]() is not owner):
            self.misses += 1                                         # a moved / reloaded / copied layer misses
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[1]

    def put(self, key, t: torch.Tensor, owner: torch.Tensor | None = None) -> None:
        with self._lock:
            self._put(key, t, owner)

    def _put(self, key, t, owner) -> None:
        size = t.numel() * t.element_size()
        self.discard(key)
        if size > self.max_bytes:
            return                                                   # would evict everything and still not fit
        while self.nbytes + size > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)            # least recently used
            self.nbytes -= old.numel() * old.element_size()
        self._items[key] = (weakref.ref(owner) if owner is not None else (lambda: None), t)
        self.nbytes += size

    def discard(self, key) -> None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self.nbytes -= item[1].numel() * item[1].element_size()

    def __getstate__(self):                                          # copy / deepcopy / pickle: a lock is not data
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return (f"DecodeCache({len(self)} layers, {self.nbytes / 2**20:.1f} / {self.max_bytes / 2**20:.1f} MiB, "
                f"hits={self.hits}, misses={self.misses})")


def _quantizer_dict(q: Quantizer | None) -> dict | None:
    return None if q is None else q.to_dict()


@dataclass(frozen=True)
class LinearSpec:
    """How one linear layer is stored. Validated on construction.

    >>> spec = LinearSpec("lowrank", energy=0.9, factor_quantizer=Quantizer(bits=8))
    >>> LinearSpec.from_dict(spec.to_dict()) == spec
    True
    """
    kind: str = "quantized"                            # "quantized", "entropy" or "lowrank"
    quantizer: Quantizer = field(default_factory=Quantizer)  # quantized/entropy codes: int8, symmetric, per output row
    rank: int | None = None                            # lowrank: keep this many singular values, or
    energy: float | None = None                        # lowrank: ... the fewest keeping this fraction of sum(S**2), or
    error: float | None = None                         # lowrank: ... the fewest with ||W - W_r|| / ||W|| <= error
    # lowrank: quantise Vh and U^T (channel = one scale per singular vector); None keeps float
    factor_quantizer: Quantizer | None = None
    predictor: str = "auto"                            # entropy: "none", "left" or "auto" (lower entropy wins)
    # entropy: "tiled" (fused decode x matmul), "stream" (one rANS stream) or None: tiled wherever it
    # applies (scales per row or group, no left predictor), else stream
    layout: str | None = None
    # entropy: shared LRU of decoded codes; None decodes every forward
    cache: DecodeCache | None = field(default=None, compare=False)
    # quantized / entropy: "hadamard" stores W R (R a seeded block-Hadamard rotation, slc.rotation) and
    # multiplies with R^T x in forward; None stores W
    rotate: str | None = None
    rotate_seed: int = 0                               # the rotation's seed (stored in the file with its block size)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: use one of {KINDS}")
        if not isinstance(self.quantizer, Quantizer):
            raise TypeError(f"quantizer must be an slc.Quantizer, got {type(self.quantizer).__name__}; "
                            "e.g. Quantizer(bits=8, granularity='channel')")
        if self.factor_quantizer is not None and not isinstance(self.factor_quantizer, Quantizer):
            raise TypeError("factor_quantizer must be an slc.Quantizer or None, "
                            f"got {type(self.factor_quantizer).__name__}")
        targets = {k: v for k, v in (("rank", self.rank), ("energy", self.energy), ("error", self.error))
                   if v is not None}
        if self.kind == "lowrank":
            if len(targets) != 1:
                raise ValueError("kind='lowrank' needs exactly one of rank=, energy=, error= "
                                 f"(got {sorted(targets) or 'none'})")
            if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                          or self.rank < 1):
                raise ValueError(f"rank={self.rank!r} must be an int >= 1")
            if self.energy is not None and not 0 < self.energy <= 1:
                raise ValueError(f"energy={self.energy} must be a fraction in (0, 1], e.g. 0.9")
            if self.error is not None and not 0 <= self.error < 1:
                raise ValueError(f"error={self.error} must be a relative error in [0, 1), e.g. 0.1")
        else:
            if targets:
                raise ValueError(f"{sorted(targets)} only apply to kind='lowrank' (this spec has kind={self.kind!r})")
            if self.factor_quantizer is not None:
                raise ValueError("factor_quantizer only applies to kind='lowrank'; use quantizer= for the codes")
        if self.predictor not in PREDICTORS + ("auto",):
            raise ValueError(f"predictor={self.predictor!r}: use one of {PREDICTORS + ('auto',)}")
        if self.layout is not None:
            if self.kind != "entropy" or self.layout not in LAYOUTS:
                raise ValueError(f"layout={self.layout!r}: use one of {LAYOUTS} (kind='entropy' only) or None")
            if self.layout == "tiled" and not (_rowwise(self.quantizer) and self.predictor != "left"):
                raise ValueError("layout='tiled' needs scales per output row or group (granularity 'channel', "
                                 "axis 0, or 'group') and no 'left' predictor; use layout='stream'")
        if self.cache is not None and not isinstance(self.cache, DecodeCache):
            raise TypeError(f"cache must be an slc.nn.DecodeCache or None, got {type(self.cache).__name__}")
        if self.rotate is not None:
            if self.rotate not in ROTATIONS:
                raise ValueError(f"rotate={self.rotate!r}: use one of {ROTATIONS} or None")
            if self.kind == "lowrank":
                raise ValueError("rotate applies to kinds 'quantized' and 'entropy' (a rotation does not change "
                                 "a low-rank factorisation's error); drop rotate= for kind='lowrank'")
        if isinstance(self.rotate_seed, bool) or not isinstance(self.rotate_seed, int) or not (
                0 <= self.rotate_seed < SEED_LIMIT):
            raise ValueError(f"rotate_seed={self.rotate_seed!r} must be an int in [0, 2**63)")

    def describe(self) -> str:
        rot = "" if self.rotate is None else f", {self.rotate} rotated"
        if self.kind == "quantized":
            return self.quantizer.describe() + rot
        if self.kind == "entropy":
            return self.quantizer.describe() + "+rANS" + rot
        target = next(f"{k}={v}" for k, v in (("rank", self.rank), ("energy", self.energy), ("error", self.error))
                      if v is not None)
        fq = self.factor_quantizer
        return f"lowrank({target}{', ' + fq.describe() if fq else ''})"

    @property
    def tiled(self) -> bool:
        """An entropy layer of this spec is coded in tiles (see `layout`)."""
        if self.kind != "entropy" or self.layout == "stream":
            return False
        return self.layout == "tiled" or (_rowwise(self.quantizer) and self.predictor != "left")

    def to_dict(self) -> dict:
        """JSON-able; the cache is a run-time object and is not included ("layout", "rotate" only when set,
        so the files of specs without them are what they were before those options existed)."""
        d = {"kind": self.kind, "quantizer": _quantizer_dict(self.quantizer), "rank": self.rank,
             "energy": self.energy, "error": self.error,
             "factor_quantizer": _quantizer_dict(self.factor_quantizer), "predictor": self.predictor}
        if self.layout is not None:
            d["layout"] = self.layout
        if self.rotate is not None:
            d.update(rotate=self.rotate, rotate_seed=self.rotate_seed)
        return d

    def rotation(self, width: int, name: str = "") -> Rotation | None:
        """The rotation a layer of this spec with `width` inputs applies (None: it stores W as it is).
        ValueError, naming the layer `name`, for a width the block-Hadamard rotation cannot cover."""
        if self.rotate is None:
            return None
        try:
            return Rotation(width, self.rotate_seed)
        except ValueError as e:
            raise ValueError(f"{name}: {e}" if name else str(e)) from None

    @classmethod
    def from_dict(cls, d: dict, cache: DecodeCache | None = None) -> "LinearSpec":
        fq = d.get("factor_quantizer")
        return cls(kind=d["kind"], quantizer=Quantizer.from_dict(d["quantizer"]), rank=d.get("rank"),
                   energy=d.get("energy"), error=d.get("error"),
                   factor_quantizer=None if fq is None else Quantizer.from_dict(fq),
                   predictor=d.get("predictor", "auto"), layout=d.get("layout"), cache=cache,
                   rotate=d.get("rotate"), rotate_seed=d.get("rotate_seed", 0))


# --- codes <-> buffers ---------------------------------------------------------------------------

def _pack_nibbles(qt: QuantizedTensor) -> torch.Tensor:
    """2..4-bit codes -> uint8, two per byte (low nibble first)."""
    sym = (qt.codes.reshape(-1).to(torch.int16) - qt.quantizer.qmin).to(torch.uint8)
    if sym.numel() % 2:
        sym = torch.cat([sym, sym.new_zeros(1)])
    return sym[0::2] | (sym[1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, q: Quantizer, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    sym = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)[:n]
    return (sym.to(torch.int16) + q.qmin).to(q.storage_dtype).reshape(shape)


def _packed(q: Quantizer) -> bool:
    """Codes of 2..4 bits are stored two per byte; ecsq codes (unbounded) are kept as they are."""
    return q.mode == "affine" and q.bits <= 4


def check_policy(policy):
    """A compress_model policy, validated: one LinearSpec (None: the default LinearSpec()), or a dict
    {fnmatch pattern on module names: LinearSpec or None}. TypeError names what is wrong."""
    policy = LinearSpec() if policy is None else policy
    if isinstance(policy, dict):
        for pat, spec in policy.items():
            if not isinstance(pat, str) or not (spec is None or isinstance(spec, LinearSpec)):
                raise TypeError(f"policy must map str patterns to LinearSpec or None; got {pat!r}: {spec!r}")
    elif not isinstance(policy, LinearSpec):
        raise TypeError(f"policy must be a LinearSpec or a dict of pattern -> LinearSpec, got {type(policy).__name__}")
    return policy


def _layer_meta(kind: str, spec: LinearSpec, shape: tuple, dtype: torch.dtype) -> dict:
    """The JSON description every layer starts from (kind-specific fields and "buffers" are added after)."""
    out_f, in_f = shape
    return {"kind": kind, "in_features": in_f, "out_features": out_f, "dtype": dtype_name(dtype),
            "spec": spec.to_dict(), "quantizer": None, "factor_quantizer": None}


def _codes_buffers(qt: QuantizedTensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """Buffers holding a QuantizedTensor: codes (packed when bits <= 4), scale, zero_point."""
    out = {prefix + "codes": _pack_nibbles(qt) if _packed(qt.quantizer) else qt.codes.contiguous(),
           prefix + "scale": qt.scale.contiguous()}
    if qt.zero_point is not None:
        out[prefix + "zero_point"] = qt.zero_point.contiguous()
    return out


def _encode_tiles(qt: QuantizedTensor) -> tuple[dict, dict[str, torch.Tensor]]:
    """A row-wise quantised (out, in) weight -> (tiled tensor header, buffers): slc.tiles' stream of the
    symbols (affine: code - qmin; ecsq: zig-zag with an escape symbol, escaped codes kept in `escapes`).
    Trellis codes are stored as ecsq codes; the header says "trellis": true (absent otherwise, as before)."""
    q, (rows, cols) = qt.quantizer, qt.original_shape
    codes = qt.codes.detach().cpu().reshape(rows, cols).numpy()
    escapes = None
    if q.mode == "ecsq":
        sym, escape, escapes = split_escapes(codes)
        if q.trellis and np.abs(escapes.astype(np.int64)).max(initial=0) >= MAX_TRELLIS_CODE:
            raise ValueError(f"trellis codes of {MAX_TRELLIS_CODE} (2**24) or more do not fit the tiled decoders' "
                             "float32 buffers: use LinearSpec(layout='stream') or a larger step")
        stream = encode_tiled(sym.reshape(rows, cols), escape=escape)
    else:
        stream = encode_tiled((codes.astype(np.int32) - q.qmin).astype(np.uint16))
    ecsq = q.mode == "ecsq"
    trellis = {"trellis": True} if q.trellis else {}
    header = {**stream.meta, "kind": "ecsq" if ecsq else "affine", "qmin": 0 if ecsq else q.qmin, **trellis,
              "dtype": dtype_name(qt.original_dtype), "quantizer": q.to_dict(compact=True),
              "n_escapes": 0 if escapes is None else int(escapes.size)}
    buffers = stream.buffers()
    buffers["states"] = buffers["states"].reshape(-1)
    buffers["scale"] = qt.scale.detach().cpu().contiguous()
    if qt.zero_point is not None:
        buffers["zero_point"] = qt.zero_point.detach().cpu().contiguous()
    if escapes is not None:
        buffers["escapes"] = torch.from_numpy(escapes)
    return header, buffers


def int_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point, q: Quantizer,
               shape) -> torch.Tensor:
    """x @ dequantize(codes)^T without materialising a float weight where a cheaper way exists.

    bf16 with <= 16 rows uses torch's int8 kernel; fp32 with <= kernels.MAX_ROWS rows (generation)
    uses slc.kernels; fp32/bf16 otherwise scale after the matmul (one scale per output row commutes
    with it), converting a big weight (an lm_head) 1024 rows at a time; fp16 dequantises (codes * x
    sums can overflow fp16). Why, with timings: bench/results/int_linear.md.
    """
    if (q.mode == "affine" and zero_point is None and q.bits == 8 and q.granularity == "channel" and q.axis in (0, -2)
            and codes.dtype == torch.int8):
        k, rows = x.shape[-1], x.numel() // max(x.shape[-1], 1)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and rows <= 16 and k % 32 == 0:
            # the CPU kernel reads out of bounds unless K is a multiple of 16 (found by test; 32 for margin)
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, k).contiguous(), codes,
                                                   scale.reshape(-1).to(x.dtype))
            return y.reshape(*x.shape[:-1], codes.shape[0])
        if kernels.usable(x, codes):                                 # fp32, a few rows: read the int8 codes directly
            return kernels.int8_linear(x, codes, scale)
        if x.dtype in (torch.float32, torch.bfloat16, torch.float64):
            s = scale.reshape(-1).to(x.dtype)
            if codes.numel() * x.element_size() <= _CHUNK_BYTES:
                return F.linear(x, codes.to(x.dtype)) * s
            out = x.new_empty(*x.shape[:-1], codes.shape[0])       # big (an lm_head): convert 1024 rows at a time
            for i in range(0, codes.shape[0], _CHUNK_ROWS):
                torch.mul(F.linear(x, codes[i:i + _CHUNK_ROWS].to(x.dtype)), s[i:i + _CHUNK_ROWS],
                          out=out[..., i:i + _CHUNK_ROWS])
            return out
    w = QuantizedTensor(codes, scale, zero_point, q, tuple(shape), x.dtype).dequantize()
    return F.linear(x, w)


class CompressedLinear(nn.Module):
    """A Linear layer whose weight is held compressed (see the module docstring for the kinds).

    >>> lin = nn.Linear(64, 32)
    >>> cl = CompressedLinear.from_linear(lin, LinearSpec("entropy"))
    >>> x = torch.randn(3, 64)
    >>> w = Quantizer().quantize(lin.weight.detach()).dequantize()
    >>> bool(torch.equal(cl.weight_dense(), w)) and bool(torch.allclose(cl(x), F.linear(x, w, lin.bias), atol=1e-5))
    True
    """

    def __init__(self, meta: dict, buffers: dict[str, torch.Tensor], cache: DecodeCache | None = None):
        super().__init__()
        # JSON-able: kind, shape, dtype, quantizers, buffer layout
        self.meta = meta
        self.kind = meta["kind"]
        self.in_features, self.out_features = meta["in_features"], meta["out_features"]
        self.quantizer = None if meta.get("quantizer") is None else Quantizer.from_dict(meta["quantizer"])
        fq = meta.get("factor_quantizer")
        self.factor_quantizer = None if fq is None else Quantizer.from_dict(fq)
        self.register_buffer("bias", None)
        for name, t in buffers.items():
            self.register_buffer(name, t)
        self.cache = cache
        self.n_decodes = 0                                          # entropy: how many times the weight was decoded
        self.decode_seconds = 0.0                                   # entropy: total time spent decoding
        # entropy: "auto" (numba on CPU, torch elsewhere) or "torch"
        self.decode_backend = "auto"
        # cache key (a deepcopy shares it; the owner check tells them apart)
        self._uid = next(_uids)
        tensor = meta.get("tensor")
        self.tiled = isinstance(tensor, dict) and tensor.get("layout") == "tiled"
        self._fused = None                                          # tiled: FusedWeight, built at first use
        self._torch_weight = None                                   # tiled, GPU / torch backend: TorchFusedWeight
        # the stored weight is W R: forward multiplies it with x R = (R^T x) (seeded, rebuilt from the metadata)
        rot = meta.get("rotation")
        self.rotation = None if rot is None else Rotation.from_dict(rot, self.in_features)

    # --- building ---------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, layer: nn.Module, spec: LinearSpec | None = None,
                    x_cov: torch.Tensor | None = None) -> "CompressedLinear":
        """Compress an nn.Linear or transformers Conv1D according to `spec` (default int8 per channel).

        x_cov: lowrank only, the (in, in) second moment E[x x^T] of the layer's inputs (or its diagonal):
        the SVD is then truncated in the output norm (activation-aware SVD, see slc.lowrank)."""
        spec = spec or LinearSpec()
        if not isinstance(spec, LinearSpec):
            raise TypeError(f"spec must be an slc.LinearSpec, got {type(spec).__name__}")
        w = dense_weight_of(layer)                                  # (out, in)
        if w.device.type == "meta":
            raise ValueError("the layer's weight is on the meta device (no data); load real weights first")
        if x_cov is not None and spec.kind != "lowrank":
            raise ValueError(f"x_cov only applies to kind='lowrank' (this spec has kind={spec.kind!r})")
        bias = getattr(layer, "bias", None)
        if spec.kind != "lowrank":                                  # the rANS coder works on CPU arrays
            rot = spec.rotation(w.shape[1])
            wq = w if rot is None else rot.apply(w.double()).to(w.dtype if w.dtype == torch.float64 else torch.float32)
            qt = spec.quantizer.quantize(wq.cpu() if spec.kind == "entropy" else wq)
            qt.original_dtype = w.dtype
            return cls.from_quantized(qt, spec, bias, device=w.device)
        lr = low_rank(w, rank=spec.rank, energy=spec.energy, error=spec.error, x_cov=x_cov)
        meta = _layer_meta(spec.kind, spec, tuple(w.shape), w.dtype)
        meta.update(rank=lr.rank, whitened=lr.whitened, factor_quantizer=_quantizer_dict(spec.factor_quantizer))
        buffers = {"s": lr.S}
        if spec.factor_quantizer is None:
            buffers.update(vh=lr.Vh.to(w.dtype), ut=lr.U.T.contiguous().to(w.dtype))
        else:
            ut_q, vh_q = quantize_factors(lr, spec.factor_quantizer)
            buffers.update(_codes_buffers(vh_q, "vh_"))
            buffers.update(_codes_buffers(ut_q, "ut_"))
        return cls._assemble(meta, buffers, bias, spec.cache)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, spec: LinearSpec | None = None, bias: torch.Tensor | None = None,
                       device=None) -> "CompressedLinear":
        """A quantized or entropy layer from codes already chosen, e.g. by `slc.gptq.gptq`.

        qt: the (out, in) weight on `spec.quantizer`'s grid (default spec: kind "entropy" with qt's quantizer);
        with a spec that rotates, qt holds the rotated weight W R (R = spec.rotation(in)), as from_linear makes it.
        bias is copied; buffers go to `device` (default: where qt's codes are)."""
        spec = spec or LinearSpec("entropy", qt.quantizer)
        if not isinstance(spec, LinearSpec) or spec.kind == "lowrank":
            raise ValueError("from_quantized takes a LinearSpec of kind 'quantized' or 'entropy'")
        if qt.quantizer != spec.quantizer:
            raise ValueError(f"codes are on {qt.quantizer.describe()} but the spec says {spec.quantizer.describe()}")
        if len(qt.original_shape) != 2:
            raise ValueError(f"a linear weight is (out, in), got shape {qt.original_shape}")
        device = qt.codes.device if device is None else device
        rot = spec.rotation(qt.original_shape[1])
        meta = _layer_meta(spec.kind, spec, qt.original_shape, qt.original_dtype)
        meta["quantizer"] = _quantizer_dict(spec.quantizer)
        if rot is not None:
            meta["rotation"] = rot.to_dict()
        if spec.kind == "quantized":
            buffers = _codes_buffers(qt)
        elif spec.tiled:
            meta["tensor"], buffers = _encode_tiles(qt)
        else:
            ct = CompressedTensor.from_quantized(qt, predictor=spec.predictor)
            meta["tensor"], buffers = ct.meta, ct.buffers()
        buffers = {k: v.to(device) for k, v in buffers.items()}
        return cls._assemble(meta, buffers, bias, spec.cache)

    @classmethod
    def _assemble(cls, meta: dict, buffers: dict, bias, cache) -> "CompressedLinear":
        if bias is not None:
            buffers["bias"] = bias.detach().clone()
        meta["buffers"] = {k: [dtype_name(v.dtype), list(v.shape)] for k, v in buffers.items()}
        return cls(meta, buffers, cache=cache)

    @classmethod
    def from_meta(cls, meta: dict, device="meta", cache: DecodeCache | None = None) -> "CompressedLinear":
        """An empty skeleton (buffers on `device`, default meta) to be filled by load_state_dict(assign=True)."""
        check_meta(meta)
        buffers = {k: torch.empty(shape, dtype=DTYPES[dt], device=device) for k, (dt, shape) in meta["buffers"].items()}
        return cls(meta, buffers, cache=cache)

    def export_meta(self) -> dict:
        """The JSON description with the buffer layout as it is now (bias / float factors may have changed dtype)."""
        bufs = {k: [dtype_name(v.dtype), list(v.shape)] for k, v in self._buffers.items() if v is not None}
        return {**self.meta, "buffers": bufs}

    # --- decoding ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        """The original weight's dtype (what weight_dense() returns)."""
        return DTYPES[self.meta["dtype"]]

    def _codes(self, prefix: str = "", q: Quantizer | None = None, shape=None) -> torch.Tensor:
        q, shape = q or self.quantizer, shape or self.shape
        codes = getattr(self, prefix + "codes")
        return _unpack_nibbles(codes, q, shape) if _packed(q) else codes

    def fused_weight(self) -> FusedWeight:
        """tiled: the coded weight with its decode tables (built once, after the buffers hold data)."""
        if self._fused is None:
            t, rows = self.meta["tensor"], self.out_features
            b = {k: getattr(self, k).cpu() for k in TILED_BUFFERS if getattr(self, k, None) is not None}
            zp = getattr(self, "zero_point", None)
            self._fused = FusedWeight(TiledStream.from_buffers(b, t), t["kind"], self.scale.cpu().reshape(rows, -1),
                                      None if zp is None else zp.cpu().reshape(rows, -1), t["qmin"], b.get("escapes"),
                                      self.quantizer.trellis)
        return self._fused

    def torch_weight(self) -> TorchFusedWeight:
        """tiled, on a GPU or with decode_backend "torch": the coded weight for slc.fused's torch decoder (its
        index validated once; the buffers stay where they are)."""
        if self._torch_weight is None:
            names = (*TILED_BUFFERS, "scale", "zero_point")
            b = {k: getattr(self, k) for k in names if getattr(self, k, None) is not None}
            self._torch_weight = TorchFusedWeight(b, self.meta["tensor"])
        return self._torch_weight

    def _tiled_codes(self, backend: str) -> torch.Tensor:
        """tiled: integer codes in QuantizedTensor's storage dtype; every tile decoded (on all cores on CPU,
        with the torch decoder, a group of tiles at a time, on other devices or with backend "torch")."""
        q = self.quantizer
        if backend == "auto" and self.words.device.type == "cpu":
            codes = torch.from_numpy(self.fused_weight().codes())
        else:
            codes = self.torch_weight().codes()
        codes = codes.reshape(self.shape)
        return codes.to(code_dtype(codes) if q.mode == "ecsq" else q.storage_dtype)

    def _decode(self) -> torch.Tensor:
        """entropy: the integer codes, decoded on the buffers' device (or taken from the cache)."""
        if self.cache is not None:                                  # keyed by layer, valid only for these very words
            hit = self.cache.get(self._uid, owner=self.words)
            if hit is not None:
                return hit
        t0 = time.perf_counter()
        backend = "torch" if self.decode_backend == "torch" else "auto"
        if self.tiled:
            codes = self._tiled_codes(backend)
        else:
            names = ("words", "states", "freqs", "escapes")
            buffers = {k: getattr(self, k) for k in names if getattr(self, k, None) is not None}
            codes = decode_codes(buffers, self.meta["tensor"], backend=backend, quantizer=self.quantizer)
        self.n_decodes += 1
        self.decode_seconds += time.perf_counter() - t0
        if self.cache is not None:
            self.cache.put(self._uid, codes, owner=self.words)
        return codes

    def quantized(self) -> QuantizedTensor:
        """quantized / entropy kinds: the stored weight as a QuantizedTensor (codes unpacked / decoded);
        for a rotated layer that is W R (weight_dense() rotates it back)."""
        if self.kind == "lowrank":
            raise ValueError("a lowrank layer has no single QuantizedTensor; use weight_dense()")
        codes = self._decode() if self.kind == "entropy" else self._codes()
        return QuantizedTensor(codes, self.scale, getattr(self, "zero_point", None), self.quantizer, self.shape,
                               self.dtype)

    def _factor(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """lowrank: Vh (r, n) or U^T (r, m) as floats in `dtype`."""
        if self.factor_quantizer is None:
            return getattr(self, name).to(dtype)
        q = self.factor_quantizer
        codes = self._codes(name + "_", q, (rows, cols))
        zp = getattr(self, name + "_zero_point", None)
        return QuantizedTensor(codes, getattr(self, name + "_scale"), zp, q, (rows, cols), dtype).dequantize()

    def weight_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The effective (out, in) weight in the original dtype (or `dtype`): for metrics, not for forward."""
        dtype = dtype or self.dtype
        if self.kind == "lowrank":
            r = self.s.numel()
            ut = self._factor("ut", r, self.out_features, torch.float32)
            vh = self._factor("vh", r, self.in_features, torch.float32)
            return ((ut.T * self.s) @ vh).to(dtype)
        if self.rotation is not None:                               # Q(W R) R^T: the weight forward applies
            return self.rotation.apply(self.quantized().dequantize(dtype=torch.float64), inverse=True).to(dtype)
        return self.quantized().dequantize(dtype=dtype)

    def _packed_group(self) -> int:
        """quantized kind with 2..4-bit packed codes: inputs per scale (0 where slc.kernels cannot use it)."""
        q = self.quantizer
        if self.kind != "quantized" or not _packed(q):
            return 0
        if q.granularity == "group":
            return q.group_size
        return self.in_features if q.granularity == "channel" and q.axis in (0, -2) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation.apply(x)                              # R^T x (rows: x R); the weight is W R
        if self.kind == "lowrank":
            r = self.s.numel()
            z = F.linear(x, self._factor("vh", r, self.in_features, x.dtype)) * self.s.to(x.dtype)   # (..., r)
            y = z @ self._factor("ut", r, self.out_features, x.dtype)                                # (..., out)
        elif self.tiled and self.cache is None:                  # decode x matmul tile by tile (many rows: dense)
            t0 = time.perf_counter()
            cpu = self.decode_backend != "torch" and x.device.type == "cpu" and self.words.device.type == "cpu"
            y = (self.fused_weight() if cpu else self.torch_weight()).linear(x)
            self.n_decodes += 1
            self.decode_seconds += time.perf_counter() - t0         # decode and multiply: they are one pass
        elif (gs := self._packed_group()) and kernels.packed_usable(x, self.in_features, gs):
            y = kernels.packed4_linear(x, self.codes, self.scale, getattr(self, "zero_point", None),   # generation
                                       self.quantizer.qmin, self.shape, gs)
        else:
            codes = self._decode() if self.kind == "entropy" else self._codes()
            y = int_linear(x, codes, self.scale, getattr(self, "zero_point", None), self.quantizer, self.shape)
        offset = self.offset(x.dtype)
        return y if offset is None else y + offset

    def offset(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """What forward adds to x W^T: the bias plus the shift (either may be absent; None if both are)."""
        parts = [t for t in (self.bias, getattr(self, "shift", None)) if t is not None]
        if not parts:
            return None
        out = parts[0].to(dtype or self.dtype)
        return out + parts[1].to(out.dtype) if len(parts) == 2 else out

    # --- sizes and printing -----------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held for the weight (every buffer but the bias, which the original layer had: a shift, which
        compression added, counts), as it sits in memory."""
        return sum(b.numel() * b.element_size() for k, b in self._buffers.items() if b is not None and k != "bias")

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        how = self.kind
        if self.kind == "lowrank":
            how += f", rank={self.s.numel()}" + (f", {self.factor_quantizer.describe()}"
                                                  if self.factor_quantizer else "")
        else:
            how += f", {self.quantizer.describe()}"
        if self.rotation is not None:
            how += f", rotate=hadamard(block={self.rotation.block}, seed={self.rotation.seed})"
        return (f"{how}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bits/weight={self.bits_per_weight:.2f}, bias={self.bias is not None}"
                + (", shift=True" if getattr(self, "shift", None) is not None else ""))

    def set_scale(self, scale: torch.Tensor) -> None:
        """New numbers for the stored scales (slc.distill's tuned row steps): same shape, finite and > 0; the
        codes, the format and the size are unchanged. Decode tables built from the old scales are dropped."""
        old = getattr(self, "scale", None)
        if old is None or self.kind not in ("quantized", "entropy"):
            raise ValueError(f"a {self.kind} layer has no scales to set")
        scale = torch.as_tensor(scale)
        if scale.numel() != old.numel():
            raise ValueError(f"scale has {scale.numel()} values, this layer holds {old.numel()}")
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("scales must be finite and > 0")
        with torch.no_grad():
            old.copy_(scale.reshape(old.shape).to(old.dtype))
        self._fused = self._torch_weight = None                     # their tables hold the old scales

    SHIFT_DTYPE = torch.bfloat16

    def set_shift(self, shift: torch.Tensor | None) -> None:
        """Store a learned offset per output row (slc.distill), added to the output after the bias, as bfloat16
        (SHIFT_DTYPE): 16 bits per row, counted in nbytes. None removes it. quantized and entropy kinds only."""
        if self.kind not in ("quantized", "entropy"):
            raise ValueError(f"a {self.kind} layer cannot hold a shift (quantized and entropy layers can)")
        if shift is None:
            self._buffers.pop("shift", None)
        else:
            shift = torch.as_tensor(shift).detach()
            if shift.shape != (self.out_features,):
                raise ValueError(f"shift must have shape ({self.out_features},), got {tuple(shift.shape)}")
            if not torch.isfinite(shift).all():
                raise ValueError("shift must be finite")
            self.register_buffer("shift", shift.to(device=self.scale.device, dtype=self.SHIFT_DTYPE).clone())
        self.meta = self.export_meta()

    # --- module plumbing --------------------------------------------------------------------------
    _FLOAT_DATA = ("bias", "vh", "ut")                          # follow .to(dtype); every other buffer keeps its dtype

    def _apply(self, fn, recurse=True):
        dtypes = {k: b.dtype for k, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for k, d in dtypes.items():
            if k not in self._FLOAT_DATA and self._buffers[k].dtype != d:
                self._buffers[k] = self._buffers[k].to(d)          # scales, codes, S: the stored format
        if self.cache is not None:
            self.cache.discard(self._uid)                           # free the entry; its words are gone anyway
        self._fused = self._torch_weight = None                     # their tables point at the old buffers
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        if self.cache is not None:
            self.cache.discard(self._uid)                           # cached codes would be stale
        self._fused = self._torch_weight = None
        return super()._load_from_state_dict(*args, **kwargs)


class CompressedEmbedding(CompressedLinear):
    """An nn.Embedding whose table (num_embeddings, dim) is held as integer codes + scales.

    A lookup gathers the rows' codes and scales and dequantises only those rows. The table has the
    layout of a quantized CompressedLinear of shape (out=num_embeddings, in=dim), so a tied output
    head can multiply with the same codes (`TiedLinear`).

    >>> emb = nn.Embedding(100, 32)
    >>> ce = CompressedEmbedding.from_embedding(emb)
    >>> ids = torch.tensor([[3, 7, 99]])
    >>> bool(torch.equal(ce(ids), ce.weight_dense()[ids])) and ce(ids).dtype == torch.float32
    True
    """

    def __init__(self, meta: dict, buffers: dict[str, torch.Tensor], cache: DecodeCache | None = None):
        super().__init__(meta, buffers, cache)
        self.num_embeddings, self.embedding_dim = self.out_features, self.in_features
        self.out_dtype = DTYPES[meta["dtype"]]                     # follows .to(dtype) / .half(), like nn.Embedding

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, spec: LinearSpec | None = None) -> "CompressedEmbedding":
        """Quantise an nn.Embedding's table (default int8, one scale per row)."""
        spec = spec or LinearSpec()
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"expected torch.nn.Embedding, got {type(emb).__name__}")
        if not isinstance(spec, LinearSpec) or spec.kind != "quantized":
            raise ValueError("embeddings take a LinearSpec of kind 'quantized' (a lookup reads a few rows; "
                             "decoding a whole entropy-coded table per lookup would be wasted work)")
        if spec.rotate is not None:
            raise ValueError("embeddings are stored unrotated (a lookup has no activations to rotate); "
                             "use a LinearSpec without rotate=")
        q = spec.quantizer
        if not _rowwise(q):
            raise ValueError(f"embedding quantizer {q.describe()}: use granularity 'channel' (axis 0) or 'group' "
                             "so that every row has its own scales")
        w = emb.weight.detach()
        if _packed(q) and w.shape[1] % 2:
            raise ValueError(f"{q.bits}-bit codes are packed two per byte: the embedding dim {w.shape[1]} must be even")
        meta = _layer_meta("embedding", spec, tuple(w.shape), w.dtype)
        meta.update(quantizer=_quantizer_dict(q), padding_idx=emb.padding_idx)
        return cls._assemble(meta, _codes_buffers(q.quantize(w)), None, None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        q, n, dim = self.quantizer, flat.numel(), self.embedding_dim
        if _packed(q):
            codes = _unpack_nibbles(self.codes.reshape(self.num_embeddings, dim // 2)[flat], q, (n, dim))
        else:
            codes = self.codes[flat]
        zp = getattr(self, "zero_point", None)
        rows = QuantizedTensor(codes, self.scale[flat], None if zp is None else zp[flat], q, (n, dim), self.out_dtype)
        return rows.dequantize().reshape(*ids.shape, dim)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.out_dtype = fn(torch.zeros((), dtype=self.out_dtype)).dtype   # .half() etc. change the output dtype
        return self


def _rowwise(q: Quantizer) -> bool:
    """Every row of a (rows, dim) table has its own scales (so rows can be gathered with them)."""
    return q.granularity == "group" or (q.granularity == "channel" and q.axis in (0, -2))


class TiedLinear(nn.Module):
    """An output head tied to a CompressedEmbedding: y = x @ table^T from the same codes, no second copy.

    The embedding is referenced, not registered as a child, so state_dict() and .to() see it once.

    >>> emb = CompressedEmbedding.from_embedding(nn.Embedding(100, 32))
    >>> head = TiedLinear(emb)
    >>> x = torch.randn(2, 32)
    >>> bool(torch.allclose(head(x), x @ emb.weight_dense().T, atol=1e-5))
    True
    """

    def __init__(self, embedding: CompressedEmbedding):
        super().__init__()
        if not isinstance(embedding, CompressedEmbedding):
            raise TypeError(f"TiedLinear needs a CompressedEmbedding, got {type(embedding).__name__}")
        self._embedding = [embedding]                               # a list: nn.Module does not register it
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    @property
    def embedding(self) -> CompressedEmbedding:
        return self._embedding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        return int_linear(x, e._codes(), e.scale, getattr(e, "zero_point", None), e.quantizer, e.shape)

    def weight_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.embedding.weight_dense(dtype)

    def extra_repr(self) -> str:
        return f"tied to a CompressedEmbedding({self.out_features}, {self.in_features})"


def _codes_layout(q: Quantizer, shape, prefix: str = "") -> dict:
    """[dtype, shape] of the buffers _codes_buffers makes for a weight of `shape`."""
    n = int(np.prod(shape))
    if q.mode == "ecsq":
        codes = [("int16", "int32"), list(shape)]                   # ecsq codes are as wide as they need
    else:
        codes = ["uint8" if q.scheme == "asymmetric" or _packed(q) else "int8",
                 [(n + 1) // 2] if _packed(q) else list(shape)]
    scale = ["float32", list(q.scale_shape(shape))]
    out = {prefix + "codes": codes, prefix + "scale": scale}
    if q.scheme == "asymmetric":
        out[prefix + "zero_point"] = scale
    return out


def expected_layout(meta: dict) -> dict:
    """[dtype, shape] of every buffer a layer described by `meta` holds; dtype None = any float dtype,
    shape None = any 1-D length (the rANS words, states and table, checked when the stream is parsed)."""
    kind, shape = meta["kind"], (meta["out_features"], meta["in_features"])
    if kind in ("quantized", "embedding"):
        out = _codes_layout(Quantizer.from_dict(meta["quantizer"]), shape)
    elif kind == "entropy":
        out = {"words": ["int16", None], "states": ["int32", None], "freqs": ["int32", None]}
        q = Quantizer.from_dict(meta["quantizer"])
        out.update({k: v for k, v in _codes_layout(q, shape).items() if k != "codes"})
        tiled = isinstance(meta.get("tensor"), dict) and meta["tensor"].get("layout") == "tiled"
        if tiled:
            out.update(tile_rows=["int64", None], tile_words=["int64", None])   # the tile index
        if q.mode == "ecsq":
            out["escapes"] = ["int32", None]                        # codes too big for the 16-bit alphabet
            if tiled:
                out["tile_escapes"] = ["int64", None]
    else:
        r = meta["rank"]
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(shape):
            raise FormatError(f"rank {r!r} is not in 1..{min(shape)}")
        out = {"s": ["float32", [r]]}
        if meta.get("factor_quantizer") is None:
            out.update(vh=[None, [r, shape[1]]], ut=[None, [r, shape[0]]])
        else:
            fq = Quantizer.from_dict(meta["factor_quantizer"])
            out.update(_codes_layout(fq, (r, shape[1]), "vh_"))
            out.update(_codes_layout(fq, (r, shape[0]), "ut_"))
    if "bias" in meta["buffers"]:
        out["bias"] = [None, [shape[0]]]
    if "shift" in meta["buffers"]:                                  # a learned offset per row (set_shift)
        if kind not in ("quantized", "entropy"):
            raise FormatError(f"a {kind} layer cannot hold a shift (quantized and entropy layers can)")
        out["shift"] = [None, [shape[0]]]
    return out


def check_meta(meta) -> None:
    """Validate a CompressedLinear's JSON description, buffer layout included; raises FormatError."""
    if not isinstance(meta, dict):
        raise FormatError("layer metadata must be a JSON object")
    try:
        kind = meta["kind"]
        if kind not in LAYER_KINDS:
            raise FormatError(f"unknown layer kind {kind!r} (this slc knows {LAYER_KINDS})")
        for key in ("in_features", "out_features"):
            v = meta[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FormatError(f"{key} must be a positive int, got {v!r}")
        if meta["dtype"] not in FLOAT_NAMES:
            raise FormatError(f"dtype {meta['dtype']!r} is not one of {FLOAT_NAMES}")
        if kind != "lowrank" and not isinstance(meta.get("quantizer"), dict):
            raise FormatError(f"kind {kind!r} needs a quantizer")
        for key in ("quantizer", "factor_quantizer"):           # __init__ builds both when present
            if meta.get(key) is not None:
                if not isinstance(meta[key], dict):
                    raise FormatError(f"{key} must be a JSON object or null, got {meta[key]!r:.60}")
                Quantizer.from_dict(meta[key])                  # TypeError / ValueError -> FormatError below
        if kind == "entropy" and not isinstance(meta.get("tensor"), dict):
            raise FormatError("entropy layer is missing its compressed-tensor header 'tensor'")
        if meta.get("rotation") is not None:                    # seed and block only: nothing else is read
            if kind not in ("quantized", "entropy"):
                raise FormatError(f"a {kind} layer cannot be rotated (only quantized and entropy layers are)")
            Rotation.from_dict(meta["rotation"], meta["in_features"])   # ValueError -> FormatError below
        if not isinstance(meta["buffers"], dict):
            raise FormatError("buffers must map names to [dtype, shape]")
        expected = expected_layout(meta)
        if set(meta["buffers"]) != set(expected):
            raise FormatError(f"{kind} layer has buffers {sorted(meta['buffers'])}, expected {sorted(expected)}")
        for name, (dt, shape) in expected.items():
            got = meta["buffers"][name]
            if not (isinstance(got, list) and len(got) == 2 and got[0] in DTYPES and isinstance(got[1], list)
                    and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in got[1])):
                raise FormatError(f"buffer {name!r}: expected [dtype, shape], got {got!r}")
            allowed = FLOAT_NAMES if dt is None else (dt,) if isinstance(dt, str) else dt
            if got[0] not in allowed:
                raise FormatError(f"buffer {name!r} has dtype {got[0]}, expected one of {allowed}")
            if (shape is not None and got[1] != shape) or (shape is None and len(got[1]) != 1):
                raise FormatError(f"buffer {name!r} has shape {got[1]}, expected {shape or 'a 1-D length'}")
    except KeyError as e:
        raise FormatError(f"layer metadata is missing field {e}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"layer metadata is invalid: {e}") from None


def validate_loaded(layer: CompressedLinear) -> None:
    """After loading real data: finite scales and, for entropy layers, a well-formed rANS stream."""
    for k, b in layer._buffers.items():
        if b is not None and b.is_floating_point() and not bool(torch.isfinite(b).all()):
            raise FormatError(f"buffer {k!r} holds NaN/Inf")
    if layer.kind == "entropy" and layer.tiled:
        t, q = layer.meta["tensor"], layer.quantizer
        if t.get("shape") != [layer.out_features, layer.in_features] or t.get("quantizer") != q.to_dict(compact=True):
            raise FormatError("tiled tensor header disagrees with the layer (shape or quantizer)")
        if t.get("kind") != ("ecsq" if q.mode == "ecsq" else "affine") or t.get("qmin") != (
                0 if q.mode == "ecsq" else q.qmin) or (q.mode == "ecsq") != (t.get("escape") is not None) or (
                t.get("trellis", False) is not q.trellis):
            raise FormatError("tiled tensor header disagrees with the layer's quantizer (kind, qmin, escape, trellis)")
        layer.fused_weight()                                     # parses the index, escape counts and tables
    elif layer.kind == "entropy":
        m = check_header(layer.meta["tensor"])                   # FormatError for any malformed field
        if m["shape"] != [layer.out_features, layer.in_features] or m["quantizer_obj"] != layer.quantizer:
            raise FormatError("entropy tensor header disagrees with the layer (shape or quantizer)")
        m = layer.meta["tensor"]
        CompressedTensor.from_buffers({k: v for k, v in layer._buffers.items()
                                       if k not in ("bias", "shift") and v is not None}, m)

"""Uniform affine quantisation: float weights -> small integer codes + scales.

    w ~= (codes - zero_point) * scale

A `Quantizer` is a small validated config; `Quantizer.quantize(w)` returns a
`QuantizedTensor` that remembers the original shape, dtype and device, so that
`dequantize()` hands back exactly what went in (fp32 -> fp32, fp16 -> fp16,
bf16 -> bf16). Integer codes never reach a matmul by accident, as they did in an earlier
prototype (CodecLLM), which crashed with "self and mat2 must have the same dtype, but got Float
and Char": its decompress() compared a torch dtype with numpy dtypes, so the int8 codes reached
the matmul as if they were weights.

Granularity (where one scale applies):
    tensor   one scale for the whole tensor
    channel  one scale per index of `axis` (axis 0 of a Linear weight = one per output row)
    group    one scale per `group_size` consecutive weights along the last (input) dim

Modes:
    affine  (the default) a fixed number of levels, 2**bits, spanning each block's range:
            the schemes below.
    ecsq    entropy-constrained scalar quantisation: a uniform grid with NO level limit,
            step = `step` x (the block's RMS, or absmax with reference="absmax"); codes are
            unbounded signed integers (int16, or int32 when they need it) meant for an entropy
            coder, which is where the rate is decided (see slc/ecsq.py). `bits` is ignored.
            The grid (`quantize_blocks`) is here; rate estimates and step search are in slc.ecsq.
            trellis=True: trellis-coded (slc.trellis): two interleaved grids of step `step` x RMS and an
            8-state machine along each row pick the levels; codes are entropy-coded as ECSQ's, and
            dequantising scans each row (last axis) from state 0. About 0.15 bits less than
            ECSQ at the same error; about half ECSQ's step gives ECSQ's rate.

Schemes (affine):
    symmetric   codes in [-qmax, qmax], qmax = 2**(bits-1) - 1, zero_point = 0.
                (Level -2**(bits-1) is never used: it keeps 0 exactly representable and the
                grid symmetric, at the price of one level; at 4 bits that costs quality.)
    asymmetric  codes in [0, 2**bits - 1], scale = (max - min) / (2**bits - 1) and a *float*
                zero_point = -min / scale, so min and max are hit exactly and the error bound
                of half a step holds everywhere (an integer zero point would break it at the ends).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import trellis as tcq
from .symbols import code_dtype, entropy_bits, unzigzag, zigzag

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# every dtype a stored buffer may have, by the name files use ("float32", "int8", ...)
DTYPES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES + (torch.int8, torch.uint8, torch.int16,
                                                                     torch.int32, torch.int64)}
FLOAT_NAMES = tuple(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
_BASE_FIELDS = ("bits", "scheme", "granularity", "axis", "group_size")
_ECSQ_FIELDS = ("mode", "step", "dead_zone", "reference")
_TRELLIS = "trellis"          # ecsq only, and in dicts only when True (files from before it read as False)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32": how files name dtypes."""
    return str(dtype).removeprefix("torch.")


def as_float_tensor(x, what: str = "tensor") -> torch.Tensor:
    """Accept a torch tensor or numpy array of floats; reject everything else with a clear message."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{what} must hold floating-point values, got numpy dtype {x.dtype}; "
                            "pass float32/float16 weights (integer codes are not weights)")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float16, bfloat16 or float64, got {x.dtype}; "
                        "cast it first, e.g. w.float()")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}): nothing to quantise")
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} contains {n_bad} NaN/Inf value(s); clean the weights before quantising")
    return x


def quantize_blocks(blocks: torch.Tensor, step: float, dead_zone: float = 0.0, reference: str = "rms"):
    """The ECSQ grid. Blocks (..., n_per_scale) -> (integer codes int16/int32, absolute step per block (..., 1)).

        step_abs = step x RMS(block) (or absmax), code = sign(w) * floor(|w| / step_abs + 1/2 - dead_zone)
    """
    if reference == "rms":
        ref = blocks.pow(2).mean(dim=-1, keepdim=True).sqrt()
    else:
        ref = blocks.abs().amax(dim=-1, keepdim=True)
    scale = ref * step
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))      # all-zero block: any step is exact
    scale = scale.float().to(blocks.dtype)                             # the step actually stored (float32)
    peak = float((blocks.abs().amax(dim=-1, keepdim=True) / scale).max())
    if peak >= 2 ** 30:
        raise ValueError(f"step={step} is too fine for this tensor: codes would reach {peak:.3g} (limit 2**30); "
                         "use a larger step or a finer granularity")
    x = blocks if peak < 2 ** 22 else blocks.double()                  # keep |w| / step exact to << 1 code
    mag = torch.floor(x.abs() / scale.to(x.dtype) + (0.5 - dead_zone)).clamp_min_(0)
    codes = torch.copysign(mag, x)
    return codes.to(torch.int16 if peak < 2 ** 15 - 1 else torch.int32), scale


@dataclass(frozen=True)
class Quantizer:
    """How to quantise: bits, scheme and where each scale applies.

    >>> import torch
    >>> w = torch.randn(4, 64)
    >>> q = Quantizer(bits=8, granularity="channel")
    >>> qt = q.quantize(w)
    >>> bool(((qt.dequantize() - w).abs() <= qt.max_error() + 1e-6).all())
    True
    >>> e = Quantizer(mode="ecsq", step=0.1).quantize(w)      # step = 0.1 x row RMS, no level limit
    >>> e.codes.dtype, bool(((e.dequantize() - w).abs() <= e.max_error() + 1e-6).all())
    (torch.int16, True)
    """
    bits: int = 8                    # 2..8 bits per code
    scheme: str = "symmetric"        # "symmetric" (zero_point 0) or "asymmetric" (min/max range)
    granularity: str = "channel"     # "tensor", "channel" or "group"
    axis: int = 0                    # channel axis for granularity="channel" (0 = output rows of a Linear)
    group_size: int | None = None    # weights per scale along the last dim, granularity="group" only
    mode: str = "affine"             # "affine" (2**bits levels) or "ecsq" (step grid, unbounded codes)
    step: float | None = None        # ecsq only: step in units of the block's RMS (or absmax), e.g. 0.1
    dead_zone: float = 0.0           # ecsq only: bins shift by this many steps away from 0, in [0, 0.5)
    reference: str = "rms"           # ecsq only: step is relative to the block's "rms" or "absmax"
    trellis: bool = False            # ecsq only: trellis-coded levels along each row (slc.trellis)

    def __post_init__(self):
        if self.mode not in ("affine", "ecsq"):
            raise ValueError(f"mode={self.mode!r}: use 'affine' (fixed bits) or 'ecsq' (step grid + entropy coder)")
        if self.mode == "ecsq":
            if self.step is None or isinstance(self.step, bool) or not isinstance(self.step, (int, float)):
                raise ValueError("mode='ecsq' needs a float step (in units of the row RMS), e.g. step=0.1; "
                                 "slc.ecsq.step_for_bits(w, 4.0) finds the step for a target bits/weight")
            if not 1e-6 <= self.step <= 1e3 or self.step != self.step:
                raise ValueError(f"step={self.step} is out of range: use 1e-6..1e3 (0.1 is about 5.5 bits/weight)")
            if self.scheme != "symmetric":
                raise ValueError("mode='ecsq' is symmetric by construction (code 0 is 0.0); leave scheme alone")
            if not isinstance(self.dead_zone, (int, float)) or not 0 <= self.dead_zone < 0.5:
                raise ValueError(f"dead_zone={self.dead_zone!r} must be in [0, 0.5) (fraction of a step)")
            if self.reference not in ("rms", "absmax"):
                raise ValueError(f"reference={self.reference!r}: use 'rms' or 'absmax'")
            if not isinstance(self.trellis, bool):
                raise TypeError(f"trellis must be True or False, got {self.trellis!r}")
            if self.trellis and self.dead_zone:
                raise ValueError("trellis=True picks its levels by search: it has no dead zone (leave dead_zone 0)")
        elif self.step is not None or self.dead_zone != 0.0 or self.reference != "rms" or self.trellis is not False:
            raise ValueError("step / dead_zone / reference / trellis are ecsq settings: pass mode='ecsq' with them")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int, got {self.bits!r}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits} is out of range: use 2..8")
        if self.scheme not in ("symmetric", "asymmetric"):
            raise ValueError(f"scheme={self.scheme!r}: use 'symmetric' or 'asymmetric'")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity={self.granularity!r}: use 'tensor', 'channel' or 'group'")
        if self.granularity == "group":
            if self.group_size is None or isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise ValueError("granularity='group' needs an int group_size, e.g. group_size=64")
            if self.group_size < 1:
                raise ValueError(f"group_size={self.group_size} must be >= 1")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only used with granularity='group' (got granularity={self.granularity!r})")

    @property
    def qmin(self) -> int:
        return 0 if self.scheme == "asymmetric" else -(2 ** (self.bits - 1) - 1)

    @property
    def storage_dtype(self) -> torch.dtype:
        """How affine codes are held: uint8 (asymmetric) or int8 (ecsq codes: see slc.symbols.code_dtype)."""
        return torch.uint8 if self.scheme == "asymmetric" else torch.int8

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1 if self.scheme == "asymmetric" else 2 ** (self.bits - 1) - 1

    def describe(self) -> str:
        g = {"tensor": "tensor", "channel": f"channel(axis={self.axis})",
             "group": f"group{self.group_size}"}[self.granularity]
        if self.mode == "ecsq":
            dz = f"/dz{self.dead_zone:g}" if self.dead_zone else ""
            ref = "" if self.reference == "rms" else f"x{self.reference}"
            return f"{'tcq' if self.trellis else 'ecsq'}/step{self.step:g}{ref}{dz}/{g}"
        return f"int{self.bits}/{self.scheme[:3]}/{g}"

    # --- serialisation ---------------------------------------------------------------------------
    def to_dict(self, compact: bool = False) -> dict:
        """JSON-able fields. compact=True (the compressed-tensor header): the ecsq fields only for ecsq."""
        d = {k: getattr(self, k) for k in _BASE_FIELDS + _ECSQ_FIELDS}
        if compact and self.mode != "ecsq":
            d = {k: d[k] for k in _BASE_FIELDS}
        if self.trellis:
            d[_TRELLIS] = True
        return d

    @classmethod
    def from_dict(cls, d) -> "Quantizer":
        """Inverse of to_dict (either form); TypeError / ValueError name what is wrong."""
        if not isinstance(d, dict):
            raise TypeError(f"a quantizer is a JSON object, got {type(d).__name__}")
        unknown = set(d) - set(_BASE_FIELDS + _ECSQ_FIELDS + (_TRELLIS,))
        if unknown:
            raise ValueError(f"unknown quantizer fields {sorted(unknown)}")
        return cls(**d)

    # --- blocks: where each scale applies ----------------------------------------------------------
    def scale_shape(self, shape) -> tuple:
        """Shape of the scale tensor `quantize` makes for a weight of `shape` (no data touched)."""
        return tuple(self.blocks(torch.empty(tuple(shape), device="meta")).shape[:-1]) + (1,)

    def blocks(self, w: torch.Tensor) -> torch.Tensor:
        """View w so that each scale owns one row of the last dim: (..., n_per_scale)."""
        if self.granularity == "tensor":
            return w.reshape(1, -1)
        if self.granularity == "channel":
            if w.dim() == 0:
                raise ValueError("granularity='channel' needs a tensor with at least one dimension")
            if not -w.dim() <= self.axis < w.dim():
                raise ValueError(f"axis={self.axis} is out of range for a tensor of shape {tuple(w.shape)}")
            return w.movedim(self.axis, 0).reshape(w.shape[self.axis], -1)
        n_in = w.shape[-1] if w.dim() else 1
        if n_in % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide the last dimension ({n_in}) "
                             f"of shape {tuple(w.shape)}; pick a divisor of {n_in}")
        return w.reshape(-1, n_in // self.group_size, self.group_size)

    def unblock(self, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of blocks."""
        if self.granularity == "channel":
            moved = list(shape)
            moved.insert(0, moved.pop(self.axis))
            return b.reshape(moved).movedim(0, self.axis)
        return b.reshape(shape)

    def quantize(self, w) -> "QuantizedTensor":
        """Quantise a float tensor (torch or numpy). Codes stay on the input's device."""
        w = as_float_tensor(w, "weight")
        compute = torch.float64 if w.dtype == torch.float64 else torch.float32
        blocks = self.blocks(w.to(compute))                                    # (..., n_per_scale)
        if self.mode == "ecsq":
            codes, scale = quantize_blocks(blocks, self.step, self.dead_zone, self.reference)
            if self.trellis:                                            # the same steps; codes by trellis search
                x = self.unblock(blocks.double() / scale.double(), w.shape)
                k = tcq.viterbi(x.cpu().numpy())
                codes = torch.from_numpy(k.astype(code_dtype(k))).to(w.device)
                return QuantizedTensor(codes=codes, scale=scale.float(), zero_point=None, quantizer=self,
                                       original_shape=tuple(w.shape), original_dtype=w.dtype)
            return QuantizedTensor(codes=self.unblock(codes, w.shape), scale=scale.float(), zero_point=None,
                                   quantizer=self, original_shape=tuple(w.shape), original_dtype=w.dtype)
        if self.scheme == "symmetric":
            absmax = blocks.abs().amax(dim=-1, keepdim=True)
            scale = absmax / self.qmax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))      # all-zero block: any scale is exact
            codes = torch.round(blocks / scale).clamp_(self.qmin, self.qmax)
            zero_point = None
        else:
            lo = blocks.amin(dim=-1, keepdim=True)
            hi = blocks.amax(dim=-1, keepdim=True)
            scale = (hi - lo) / self.qmax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero_point = -lo / scale                                    # float zero point: lo maps to code 0 exactly
            codes = torch.round(blocks / scale + zero_point).clamp_(0, self.qmax)
        codes = self.unblock(codes.to(self.storage_dtype), w.shape)
        return QuantizedTensor(
            codes=codes, scale=scale.float(), zero_point=None if zero_point is None else zero_point.float(),
            quantizer=self, original_shape=tuple(w.shape), original_dtype=w.dtype)


@dataclass
class QuantizedTensor:
    """Integer codes + scales (+ zero points) that remember what they came from.

    tensor fields: codes (int8, or uint8 when asymmetric, original shape; ecsq: int16 or int32),
                   scale (float32, one per block; ecsq: the absolute step), zero_point (float32 like
                   scale, or None when symmetric)
    attributes:    quantizer, original_shape, original_dtype
    """
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    quantizer: Quantizer
    original_shape: tuple
    original_dtype: torch.dtype = field(default=torch.float32)

    @property
    def bits(self) -> int:
        """Bits per code: the quantiser's for affine; for ecsq the fixed width its code range would need."""
        if self.quantizer.mode == "ecsq":
            lo, hi = int(self.codes.min()), int(self.codes.max())
            return max(1, (hi - lo).bit_length())
        return self.quantizer.bits

    @property
    def granularity(self) -> str:
        return self.quantizer.granularity

    @property
    def numel(self) -> int:
        return int(np.prod(self.original_shape))

    def dequantize(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """Float weights in the original dtype (or `dtype`), on the codes' device (or `device`)."""
        dtype = dtype or self.original_dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dequantize to a float dtype, got {dtype}")
        codes, scale, zp = self.codes, self.scale, self.zero_point
        if device is not None:
            codes, scale = codes.to(device), scale.to(device)
            zp = None if zp is None else zp.to(device)
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        if self.quantizer.trellis:
            codes = tcq.levels(codes)                                   # what each code stands for, in steps
        blocks = self.quantizer.blocks(codes.to(compute))
        if zp is not None:
            blocks = blocks - zp.to(compute)
        w = blocks * scale.to(compute)
        return self.quantizer.unblock(w, torch.Size(self.original_shape)).to(dtype)

    def max_error(self) -> torch.Tensor:
        """Per-weight bound on |w - dequantize()|: half a step, (0.5 + dead_zone) steps for ecsq, 2 steps for
        trellis codes (slc.trellis: each code parity offers a level within 2 steps whatever the state)."""
        half = self.scale * (2.0 if self.quantizer.trellis else 0.5 + self.quantizer.dead_zone)
        q = self.quantizer
        return q.unblock(half.expand(q.blocks(self.codes).shape), torch.Size(self.original_shape))

    # --- symbols for the entropy coder: codes shifted to start at 0 ------------------------------
    def symbols(self) -> np.ndarray:
        """Codes as non-negative uint16 symbols in [0, 2**bits), row-major (ecsq: zig-zag, uint32)."""
        if self.quantizer.mode == "ecsq":
            return zigzag(self.codes.detach().cpu().reshape(-1).numpy())
        return (self.codes.detach().cpu().reshape(-1).numpy().astype(np.int16) - self.quantizer.qmin).astype(np.uint16)

    @staticmethod
    def codes_from_symbols(symbols: np.ndarray, quantizer: Quantizer, shape) -> torch.Tensor:
        if quantizer.mode == "ecsq":
            codes = unzigzag(symbols)
            return torch.from_numpy(codes.astype(code_dtype(codes)).reshape(shape))
        dtype = np.uint8 if quantizer.scheme == "asymmetric" else np.int8
        codes = (symbols.astype(np.int16) + quantizer.qmin).astype(dtype)
        return torch.from_numpy(codes.reshape(shape))

    @property
    def scale_nbytes(self) -> int:
        n = self.scale.numel() * 4
        return n + (0 if self.zero_point is None else self.zero_point.numel() * 4)

    @property
    def nbytes(self) -> int:
        """Bytes held: one byte per code (as stored in memory) + float32 scales and zero points."""
        return self.codes.numel() * self.codes.element_size() + self.scale_nbytes

    @property
    def bits_per_weight(self) -> float:
        """Packed size: `bits` per code + scale overhead (what a bit-packed file would need).

        ecsq codes have no fixed width: this is their order-0 entropy + scale overhead, the rate an
        ideal entropy coder reaches (CompressedTensor.bits_per_weight is the real, all-in figure)."""
        if self.quantizer.mode == "ecsq":
            return entropy_bits(self.symbols()) / self.numel + 8 * self.scale_nbytes / self.numel
        return self.bits + 8 * self.scale_nbytes / self.numel

    def to(self, device) -> "QuantizedTensor":
        zp = None if self.zero_point is None else self.zero_point.to(device)
        return QuantizedTensor(self.codes.to(device), self.scale.to(device), zp, self.quantizer,
                               self.original_shape, self.original_dtype)

"""CompressedTensor: quantise -> (optional predictor) -> rANS, and back.

    float weight --Quantizer--> codes --predictor--> symbols --rANS--> words
    float weight <--dequantize-- codes <--undo------ symbols <--decode-- words

Decoding gives back exactly the codes the quantiser produced, so `decompress()` is
bit-identical to `QuantizedTensor.dequantize()`: the entropy coder is lossless, all
of the loss is the quantiser's.

Predictors turn codes into residuals that may be cheaper to code:
    none  the codes themselves
    left  each code minus its left neighbour along the row, modulo 2**bits (row starts kept)
    auto  whichever of the two has the lower order-0 entropy on this tensor; the entropies
          compared are kept in `predictor_entropies` so the choice can be shown, not assumed.
On real int8 weights `left` usually *raises* the entropy (neighbouring weights are
nearly independent), despite what the first prototype claimed; `auto` keeps `none`.

All sizes count everything a file would hold: words, final states, frequency table,
stream header, scales / zero points and this object's own header.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from . import rans
from .errors import FormatError
from .quant import FLOAT_DTYPES, QuantizedTensor, Quantizer, as_float_tensor

PREDICTORS = ("none", "left")
MAGIC = b"SLCT"
VERSION = 1
MAX_NUMEL = 2 ** 31 - 1
_DTYPES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rows(n: int, shape) -> tuple[int, int]:
    """Codes are predicted along the last dimension: (rows, row length)."""
    row = shape[-1] if len(shape) else 1
    return (n // row if row else 0), row


def apply_predictor(symbols: np.ndarray, name: str, bits: int, shape) -> np.ndarray:
    """Codes -> residual symbols for predictor `name` (exactly invertible by `undo_predictor`)."""
    if name == "none":
        return symbols
    rows, row = _rows(symbols.size, shape)
    s = symbols.reshape(rows, row).astype(np.int32)
    r = s.copy()
    r[:, 1:] = (s[:, 1:] - s[:, :-1]) & ((1 << bits) - 1)     # r = (s - left) mod 2**bits
    return r.reshape(-1).astype(np.uint16)


def undo_predictor(residuals, name: str, bits: int, shape):
    """Residual symbols -> codes (numpy array or torch tensor, on any device)."""
    if name == "none":
        return residuals
    rows, row = _rows(residuals.shape[0], shape)
    mask = (1 << bits) - 1
    if isinstance(residuals, torch.Tensor):
        return (residuals.reshape(rows, row).to(torch.int64).cumsum(dim=1) & mask).reshape(-1)
    return (residuals.reshape(rows, row).astype(np.int64).cumsum(axis=1) & mask).reshape(-1).astype(np.uint16)


def order0_bits(symbols: np.ndarray) -> float:
    """Order-0 empirical entropy of `symbols`, in total bits."""
    if symbols.size == 0:
        return 0.0
    counts = np.bincount(symbols.reshape(-1)).astype(np.float64)
    p = counts[counts > 0] / symbols.size
    return float(-(counts[counts > 0] * np.log2(p)).sum())


@dataclass
class CompressedTensor:
    """A quantised tensor whose codes are rANS-coded.

    tensor fields: stream (rans.RansStream), scale, zero_point (float32, or None)
    attributes:    quantizer, original_shape, original_dtype, predictor, predictor_entropies

    >>> import torch
    >>> w = torch.randn(64, 128, dtype=torch.float16)
    >>> ct = CompressedTensor.compress(w)                 # int8 per channel + rANS
    >>> qt = Quantizer().quantize(w)
    >>> bool(torch.equal(ct.decompress(), qt.dequantize())) and ct.decompress().dtype == torch.float16
    True
    >>> bool(torch.equal(CompressedTensor.from_bytes(ct.to_bytes()).decompress(), ct.decompress()))
    True
    """
    stream: rans.RansStream
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    quantizer: Quantizer
    original_shape: tuple
    original_dtype: torch.dtype
    predictor: str = "none"
    predictor_entropies: dict = field(default_factory=dict)   # {predictor: bits per weight}
    _nbytes: int | None = field(default=None, repr=False, compare=False)

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def compress(cls, tensor, quantizer: Quantizer | None = None, predictor: str = "auto",
                 backend: str = "fast", scale_bits: int | None = None) -> "CompressedTensor":
        """Quantise `tensor` (default int8 per channel) and rANS-code its codes."""
        quantizer = quantizer or Quantizer()
        if not isinstance(quantizer, Quantizer):
            raise TypeError(f"quantizer must be an slc.Quantizer, got {type(quantizer).__name__}")
        if predictor not in PREDICTORS + ("auto",):
            raise ValueError(f"predictor={predictor!r}: use one of {PREDICTORS + ('auto',)}")
        tensor = as_float_tensor(tensor, "tensor")
        if tensor.numel() > MAX_NUMEL:
            raise ValueError(f"tensor has {tensor.numel()} elements; split it (limit {MAX_NUMEL})")
        return cls.from_quantized(quantizer.quantize(tensor), predictor, backend, scale_bits)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, predictor: str = "auto", backend: str = "fast",
                       scale_bits: int | None = None) -> "CompressedTensor":
        """rANS-code an existing QuantizedTensor's codes (lossless)."""
        codes = qt.symbols()
        bits, shape = qt.bits, qt.original_shape
        candidates = PREDICTORS if predictor == "auto" else (predictor,)
        residuals = {p: apply_predictor(codes, p, bits, shape) for p in candidates}
        entropies = {p: order0_bits(r) / max(codes.size, 1) for p, r in residuals.items()}
        chosen = min(entropies, key=entropies.get)       # ties keep "none" (listed first)
        stream = rans.encode_stream(residuals[chosen], scale_bits=scale_bits, backend=backend)
        return cls(stream, qt.scale.detach().cpu(), None if qt.zero_point is None else qt.zero_point.detach().cpu(),
                   qt.quantizer, tuple(shape), qt.original_dtype, chosen, entropies)

    # --- decoding ---------------------------------------------------------------------------
    def codes(self, backend: str = "fast") -> np.ndarray:
        """The quantiser's codes as uint16 symbols in [0, 2**bits), row-major."""
        residuals = rans.decode_stream(self.stream, backend=backend)
        return undo_predictor(residuals, self.predictor, self.quantizer.bits, self.original_shape)

    def quantized(self, backend: str = "fast") -> QuantizedTensor:
        codes = QuantizedTensor.codes_from_symbols(self.codes(backend), self.quantizer, self.original_shape)
        return QuantizedTensor(codes, self.scale, self.zero_point, self.quantizer,
                               self.original_shape, self.original_dtype)

    def decompress(self, dtype: torch.dtype | None = None, device=None, backend: str | None = None) -> torch.Tensor:
        """Float tensor in the original dtype (or `dtype`) on `device`; equal to QuantizedTensor.dequantize()."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "cpu" or backend == "torch":
            return decompress_buffers(self.buffers(device), self.meta, dtype, device)
        return self.quantized(backend or "fast").dequantize(dtype=dtype)

    # --- sizes ------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return int(np.prod(self.original_shape))

    @property
    def nbytes(self) -> int:
        """Everything: words, final states, table, stream header, scales, zero points, header."""
        if self._nbytes is None:
            self._nbytes = len(self.to_bytes())
        return self._nbytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    @property
    def entropy_bits(self) -> float:
        """Order-0 entropy bound of the coded symbols, in total bits (no overhead)."""
        return self.predictor_entropies[self.predictor] * self.numel

    @property
    def coded_bits(self) -> int:
        """Bits of the rANS stream alone (words, states, table, stream header)."""
        return 8 * len(self.stream.to_bytes())

    def ratios(self) -> dict:
        """Compression ratio against fp32, fp16 and int8 (one byte per weight, no scales) storage."""
        bpw = self.bits_per_weight
        return {"vs_fp32": 32 / bpw, "vs_fp16": 16 / bpw, "vs_int8": 8 / bpw}

    # --- buffers: what a CompressedLinear keeps (and moves to a device) ---------------------
    def buffers(self, device=None) -> dict[str, torch.Tensor]:
        """All tensor data, ready for register_buffer / safetensors (int views of the unsigned arrays)."""
        s = self.stream
        out = {
            "words": torch.from_numpy(np.ascontiguousarray(s.words).view(np.int16)),
            "states": torch.from_numpy(np.ascontiguousarray(s.states).view(np.int32)),
            "freqs": torch.from_numpy(np.ascontiguousarray(s.freqs).astype(np.int32)),
            "scale": self.scale,
        }
        if self.zero_point is not None:
            out["zero_point"] = self.zero_point
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out

    @property
    def meta(self) -> dict:
        """JSON-able description: together with buffers() it is the whole tensor."""
        q = self.quantizer
        return {
            "shape": list(self.original_shape), "dtype": dtype_name(self.original_dtype),
            "quantizer": {"bits": q.bits, "scheme": q.scheme, "granularity": q.granularity,
                          "axis": q.axis, "group_size": q.group_size},
            "predictor": self.predictor, "predictor_entropies": self.predictor_entropies,
            "n_symbols": int(self.stream.n_symbols), "lanes": int(self.stream.lanes),
            "scale_bits": int(self.stream.scale_bits),
        }

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor], meta: dict) -> "CompressedTensor":
        """Inverse of (buffers(), meta); validates everything (raises FormatError)."""
        m = _check_meta(meta)
        b = {k: v.detach().cpu() for k, v in buffers.items()}
        for key in ("words", "states", "freqs", "scale"):
            if key not in b:
                raise FormatError(f"compressed tensor is missing buffer {key!r}")
        stream = rans.RansStream(
            n_symbols=m["n_symbols"], lanes=m["lanes"], scale_bits=m["scale_bits"],
            freqs=b["freqs"].numpy().astype(np.uint32), states=b["states"].numpy().view(np.uint32),
            words=b["words"].numpy().view(np.uint16))
        stream = rans.RansStream.from_bytes(stream.to_bytes())     # validates every field of the stream
        q = m["quantizer_obj"]
        _check_scales(b["scale"], b.get("zero_point"), q, m["shape"])
        if len(stream.freqs) > 2 ** q.bits:
            raise FormatError(f"frequency table has {len(stream.freqs)} symbols, more than 2**bits={2 ** q.bits}")
        return cls(stream, b["scale"].float(), None if b.get("zero_point") is None else b["zero_point"].float(),
                   q, tuple(m["shape"]), _DTYPES[m["dtype"]], m["predictor"], dict(m.get("predictor_entropies", {})))

    # --- bytes ------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """MAGIC | version u8 | header len u32 | header JSON | scale | zero point | stream | crc32."""
        header = json.dumps(self.meta, separators=(",", ":")).encode()
        scale = self.scale.float().contiguous().numpy().tobytes()
        zp = b"" if self.zero_point is None else self.zero_point.float().contiguous().numpy().tobytes()
        stream = self.stream.to_bytes()
        body = b"".join([MAGIC, struct.pack("<BI", VERSION, len(header)), header,
                         struct.pack("<I", len(scale)), scale, struct.pack("<I", len(zp)), zp,
                         struct.pack("<I", len(stream)), stream])
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> "CompressedTensor":
        """Parse and validate (magic, version, lengths, checksum, header) before decoding anything."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"from_bytes needs bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < 4 + 5 + 4 or data[:4] != MAGIC:
            raise FormatError("not an slc compressed tensor (bad magic or too short)")
        if zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
            raise FormatError("compressed tensor checksum mismatch: the bytes are corrupt or truncated")
        version, hlen = struct.unpack_from("<BI", data, 4)
        if version != VERSION:
            raise FormatError(f"compressed tensor format version {version} is not supported (this slc reads {VERSION})")
        pos, end = 9, len(data) - 4

        def take(n: int, what: str) -> bytes:
            nonlocal pos
            if n < 0 or pos + n > end:
                raise FormatError(f"compressed tensor field {what!r} runs past the end ({n} bytes at offset {pos})")
            chunk = data[pos:pos + n]
            pos += n
            return chunk

        def take_len(what: str) -> int:
            return struct.unpack("<I", take(4, what + " length"))[0]

        try:
            meta = json.loads(take(hlen, "header").decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"compressed tensor header is not valid JSON: {e}") from None
        scale = take(take_len("scale"), "scale")
        zp = take(take_len("zero_point"), "zero_point")
        stream_bytes = take(take_len("stream"), "stream")
        if pos != end:
            raise FormatError(f"compressed tensor has {end - pos} unexpected trailing bytes")
        if len(scale) % 4 or len(zp) % 4:
            raise FormatError("scale / zero_point byte length is not a multiple of 4")
        m = _check_meta(meta)
        stream = rans.RansStream.from_bytes(stream_bytes)
        if stream.n_symbols != m["n_symbols"] or stream.lanes != m["lanes"] or stream.scale_bits != m["scale_bits"]:
            raise FormatError("compressed tensor header disagrees with its rANS stream header")
        buffers = {
            "words": torch.from_numpy(stream.words.view(np.int16).copy()),
            "states": torch.from_numpy(stream.states.view(np.int32).copy()),
            "freqs": torch.from_numpy(stream.freqs.astype(np.int32)),
            "scale": torch.from_numpy(np.frombuffer(scale, dtype=np.float32).copy()),
        }
        if zp:
            buffers["zero_point"] = torch.from_numpy(np.frombuffer(zp, dtype=np.float32).copy())
        q = m["quantizer_obj"]
        shape = _scale_shape(q, m["shape"])
        for key in ("scale", "zero_point"):
            if key in buffers:
                if buffers[key].numel() != int(np.prod(shape)):
                    raise FormatError(f"{key} has {buffers[key].numel()} values, expected {int(np.prod(shape))} "
                                      f"for shape {m['shape']} with {q.describe()}")
                buffers[key] = buffers[key].reshape(shape)
        return cls.from_buffers(buffers, meta)


def _scale_shape(q: Quantizer, shape) -> tuple:
    """Shape of the scale tensor Quantizer.quantize makes for a weight of `shape`."""
    probe = torch.empty(tuple(shape), device="meta")
    return tuple(q._blocks(probe).shape[:-1]) + (1,)


def _check_scales(scale: torch.Tensor, zp, q: Quantizer, shape) -> None:
    expected = _scale_shape(q, shape)
    if tuple(scale.shape) != expected:
        raise FormatError(f"scale has shape {tuple(scale.shape)}, expected {expected} for {q.describe()}")
    if scale.dtype != torch.float32 or not bool(torch.isfinite(scale).all()):
        raise FormatError("scale must be finite float32")
    if (zp is None) != (q.scheme == "symmetric"):
        raise FormatError(f"zero_point {'missing' if zp is None else 'present'} for scheme {q.scheme!r}")
    if zp is not None and (tuple(zp.shape) != expected or not bool(torch.isfinite(zp).all())):
        raise FormatError(f"zero_point must be finite with shape {expected}")


def _check_meta(meta) -> dict:
    """Validate a compressed tensor's JSON header; returns it with a built Quantizer."""
    if not isinstance(meta, dict):
        raise FormatError("compressed tensor header must be a JSON object")
    try:
        shape = meta["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise FormatError(f"shape must be a list of positive ints, got {shape!r}")
        if len(shape) > 8 or int(np.prod(shape, dtype=np.float64)) > MAX_NUMEL:
            raise FormatError(f"shape {shape} is too large")
        if meta["dtype"] not in _DTYPES:
            raise FormatError(f"dtype {meta['dtype']!r} is not one of {sorted(_DTYPES)}")
        if meta["predictor"] not in PREDICTORS:
            raise FormatError(f"unknown predictor {meta['predictor']!r}")
        qd = meta["quantizer"]
        if not isinstance(qd, dict) or set(qd) != {"bits", "scheme", "granularity", "axis", "group_size"}:
            raise FormatError(f"quantizer must have fields bits, scheme, granularity, axis, group_size; got {qd!r}")
        q = Quantizer(**qd)
        q._blocks(torch.empty(tuple(shape), device="meta"))          # axis / group size fit the shape
        for key in ("n_symbols", "lanes", "scale_bits"):
            if not isinstance(meta[key], int) or isinstance(meta[key], bool):
                raise FormatError(f"{key} must be an int")
        if meta["n_symbols"] != int(np.prod(shape)):
            raise FormatError(f"n_symbols {meta['n_symbols']} != number of weights {int(np.prod(shape))}")
    except KeyError as e:
        raise FormatError(f"compressed tensor header is missing field {e}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"compressed tensor header is invalid: {e}") from None
    return {**meta, "quantizer_obj": q}


def decompress_buffers(buffers: dict[str, torch.Tensor], meta: dict, dtype=None, device=None) -> torch.Tensor:
    """Decode on the buffers' device: numba on CPU, the torch backend elsewhere (e.g. CUDA).

    This is the low-memory path: between uses only the coded words live on the device.
    """
    q = Quantizer(**meta["quantizer"])
    shape, bits = tuple(meta["shape"]), q.bits
    dtype = dtype or _DTYPES[meta["dtype"]]
    words = buffers["words"]
    device = torch.device(device) if device is not None else words.device
    if device.type == "cpu" and words.device.type == "cpu":
        stream = rans.RansStream(n_symbols=meta["n_symbols"], lanes=meta["lanes"], scale_bits=meta["scale_bits"],
                                 freqs=buffers["freqs"].numpy().astype(np.uint32),
                                 states=buffers["states"].numpy().view(np.uint32),
                                 words=words.numpy().view(np.uint16))
        codes = undo_predictor(rans.decode_stream(stream, backend="fast"), meta["predictor"], bits, shape)
        codes_t = QuantizedTensor.codes_from_symbols(codes, q, shape)
    else:
        b = {k: v.to(device) for k, v in buffers.items()}
        residuals = rans.decode_torch(b["words"], b["states"], b["freqs"], meta["n_symbols"],
                                      meta["lanes"], meta["scale_bits"])
        codes = undo_predictor(residuals.to(torch.int64), meta["predictor"], bits, shape)
        codes_t = (codes + q.qmin).reshape(shape)          # integer codes; dequantize casts to float
        buffers = b
    zp = buffers.get("zero_point")
    qt = QuantizedTensor(codes_t, buffers["scale"].to(device), None if zp is None else zp.to(device), q, shape, dtype)
    return qt.dequantize(dtype=dtype, device=device)

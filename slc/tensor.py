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
nearly independent), although an earlier prototype (CodecLLM) credited LEFT for its 1.6-3.5x
per-layer compression on TinyLlama without ever comparing it with no predictor; `auto` keeps `none`.
The predictors and the symbol mappings themselves live in slc.symbols.

Three modes share this class's interface (buffers / meta / bytes / decompress):
    affine    Quantizer(bits=...): codes in [0, 2**bits) are the rANS symbols (format v1).
    ecsq      Quantizer(mode="ecsq", step=...): unbounded signed codes, zig-zag mapped, with an
              escape symbol for the rare codes beyond the alphabet; the escaped codes are kept
              apart as int32 (`escapes`), so the stream is exact (format v2, see slc/symbols.py).
              Trellis codes (Quantizer(mode="ecsq", trellis=True), slc.trellis) are stored the same
              way; the header's quantizer says "trellis": true and decoding gives their levels.
    lossless  compress(t, lossless=True) returns a `slc.lossless.LosslessTensor`: exponent and
              sign+mantissa planes of the float bits, exact bit for bit (format v3).

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
from .lossless import VERSION as VERSION_LOSSLESS
from .lossless import LosslessTensor
from .lossless import decompress_buffers as lossless_decompress
from .quant import FLOAT_DTYPES, QuantizedTensor, Quantizer, as_float_tensor, dtype_name
from .symbols import (PREDICTORS, apply_predictor, code_dtype, entropy_bits, join_escapes, split_escapes,
                      undo_predictor, zigzag)

MAGIC = b"SLCT"
VERSION = 1              # affine codes
VERSION_ECSQ = 2         # v1 + an escapes field (int32 codes of escaped symbols)
MAX_NUMEL = 2 ** 31 - 1
_DTYPES = {dtype_name(d): d for d in FLOAT_DTYPES}
_HEADER_FIELDS = {"bits", "scheme", "granularity", "axis", "group_size"}
_ECSQ_HEADER_FIELDS = _HEADER_FIELDS | {"mode", "step", "dead_zone", "reference"}
_TRELLIS_HEADER_FIELDS = _ECSQ_HEADER_FIELDS | {"trellis"}   # written only as true (Quantizer.to_dict)


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
    escapes: torch.Tensor | None = None     # ecsq: int32 codes of the escaped positions, in order
    escape_symbol: int | None = None        # ecsq: symbols >= this were escaped (coded as it)
    _nbytes: int | None = field(default=None, repr=False, compare=False)

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def compress(cls, tensor, quantizer: Quantizer | None = None, predictor: str = "auto",
                 backend: str = "fast", scale_bits: int | None = None, lossless: bool = False):
        """Quantise `tensor` (default int8 per channel) and rANS-code its codes.

        lossless=True keeps every bit instead (no quantiser): it returns a
        `slc.lossless.LosslessTensor`, which has this class's interface.
        """
        if lossless:
            if quantizer is not None:
                raise ValueError("lossless=True keeps every bit: it takes no quantizer (drop one of the two)")
            return LosslessTensor.compress(tensor, backend=backend)
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
        if qt.quantizer.mode == "ecsq":
            return cls._from_ecsq(qt, predictor, backend, scale_bits)
        codes = qt.symbols()
        bits, shape = qt.bits, qt.original_shape
        candidates = PREDICTORS if predictor == "auto" else (predictor,)
        residuals = {p: apply_predictor(codes, p, bits, shape) for p in candidates}
        entropies = {p: entropy_bits(r) / max(codes.size, 1) for p, r in residuals.items()}
        chosen = min(entropies, key=entropies.get)       # ties keep "none" (listed first)
        stream = rans.encode_stream(residuals[chosen], scale_bits=scale_bits, backend=backend)
        return cls(stream, qt.scale.detach().cpu(), None if qt.zero_point is None else qt.zero_point.detach().cpu(),
                   qt.quantizer, tuple(shape), qt.original_dtype, chosen, entropies)

    @classmethod
    def _from_ecsq(cls, qt: QuantizedTensor, predictor: str, backend: str, scale_bits) -> "CompressedTensor":
        if predictor not in ("auto", "none"):
            raise ValueError(f"predictor={predictor!r} is for affine codes; ecsq codes are coded as they are "
                             "(use predictor='none' or 'auto')")
        sym, E, esc = split_escapes(qt.codes.detach().cpu().reshape(-1).numpy())
        stream = rans.encode_stream(sym, scale_bits=scale_bits, backend=backend)
        entropies = {"none": entropy_bits(sym) / max(sym.size, 1)}
        return cls(stream, qt.scale.detach().cpu(), None, qt.quantizer, tuple(qt.original_shape),
                   qt.original_dtype, "none", entropies, torch.from_numpy(esc), E)

    # --- decoding ---------------------------------------------------------------------------
    def codes(self, backend: str = "fast") -> np.ndarray:
        """The quantiser's codes as uint16 symbols in [0, 2**bits), row-major (ecsq: zig-zag, uint32)."""
        if self.quantizer.mode == "ecsq":
            sym = rans.decode_stream(self.stream, backend=backend)
            return zigzag(join_escapes(sym, self.escape_symbol, self.escapes.numpy()))
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
        # a parsed stream's arrays are read-only views of its bytes: copy those, or a tensor written
        # to later (load_state_dict) would write into an immutable bytes object
        out = {
            "words": torch.from_numpy(np.require(s.words, requirements=["C", "W"]).view(np.int16)),
            "states": torch.from_numpy(np.require(s.states, requirements=["C", "W"]).view(np.int32)),
            "freqs": torch.from_numpy(np.ascontiguousarray(s.freqs).astype(np.int32)),
            "scale": self.scale,
        }
        if self.zero_point is not None:
            out["zero_point"] = self.zero_point
        if self.escapes is not None:
            out["escapes"] = self.escapes
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out

    @property
    def meta(self) -> dict:
        """JSON-able description: together with buffers() it is the whole tensor."""
        q = self.quantizer
        extra = {}
        if q.mode == "ecsq":
            extra = {"escape_symbol": int(self.escape_symbol), "n_escapes": int(self.escapes.numel())}
        return {
            "shape": list(self.original_shape), "dtype": dtype_name(self.original_dtype),
            "quantizer": q.to_dict(compact=True),
            "predictor": self.predictor, "predictor_entropies": self.predictor_entropies,
            "n_symbols": int(self.stream.n_symbols), "lanes": int(self.stream.lanes),
            "scale_bits": int(self.stream.scale_bits), **extra,
        }

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor], meta: dict) -> "CompressedTensor":
        """Inverse of (buffers(), meta); validates everything (raises FormatError)."""
        if isinstance(meta, dict) and meta.get("mode") == "lossless":
            return LosslessTensor.from_buffers(buffers, meta)
        m = check_header(meta)
        b = {k: v.detach().cpu() for k, v in buffers.items()}
        for key in ("words", "states", "freqs", "scale"):
            if key not in b:
                raise FormatError(f"compressed tensor is missing buffer {key!r}")
        stream = rans.RansStream(
            n_symbols=m["n_symbols"], lanes=m["lanes"], scale_bits=m["scale_bits"],
            freqs=b["freqs"].numpy().astype(np.uint32), states=b["states"].numpy().view(np.uint32),
            words=b["words"].numpy().view(np.uint16))
        stream.validate()                                          # fields fit together: to_bytes needs that
        stream = rans.RansStream.from_bytes(stream.to_bytes())     # validates every field of the stream
        q = m["quantizer_obj"]
        _check_scales(b["scale"], b.get("zero_point"), q, m["shape"])
        escapes, E = None, None
        if q.mode == "ecsq":
            E = m["escape_symbol"]
            escapes = b.get("escapes")
            if escapes is None or escapes.dtype != torch.int32 or escapes.dim() != 1:
                raise FormatError("an ecsq tensor needs a 1-D int32 buffer 'escapes'")
            if escapes.numel() != m["n_escapes"]:
                raise FormatError(f"escapes has {escapes.numel()} codes, header says {m['n_escapes']}")
            if len(stream.freqs) > E + 1:
                raise FormatError(f"frequency table has {len(stream.freqs)} symbols, beyond escape symbol {E}")
            if E < len(stream.freqs) and int(stream.freqs[E]) == 0 and escapes.numel():
                raise FormatError("escaped codes are present but the escape symbol never occurs")
        elif len(stream.freqs) > 2 ** q.bits:
            raise FormatError(f"frequency table has {len(stream.freqs)} symbols, more than 2**bits={2 ** q.bits}")
        return cls(stream, b["scale"].float(), None if b.get("zero_point") is None else b["zero_point"].float(),
                   q, tuple(m["shape"]), _DTYPES[m["dtype"]], m["predictor"], dict(m.get("predictor_entropies", {})),
                   escapes, E)

    # --- bytes ------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """MAGIC | version u8 | header len u32 | header JSON | scale | zero point | [escapes] | stream | crc32.

        Version 1 (affine) has no escapes field; version 2 (ecsq) has it (int32 little-endian)."""
        header = json.dumps(self.meta, separators=(",", ":")).encode()
        scale = self.scale.float().contiguous().numpy().astype("<f4").tobytes()
        zp = b"" if self.zero_point is None else self.zero_point.float().contiguous().numpy().astype("<f4").tobytes()
        stream = self.stream.to_bytes()
        ecsq = self.quantizer.mode == "ecsq"
        esc = ([struct.pack("<I", 4 * self.escapes.numel()), self.escapes.numpy().astype("<i4").tobytes()]
               if ecsq else [])
        body = b"".join([MAGIC, struct.pack("<BI", VERSION_ECSQ if ecsq else VERSION, len(header)), header,
                         struct.pack("<I", len(scale)), scale, struct.pack("<I", len(zp)), zp, *esc,
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
        if version == VERSION_LOSSLESS:
            return LosslessTensor.from_bytes(data)
        if version not in (VERSION, VERSION_ECSQ):
            raise FormatError(f"compressed tensor format version {version} is not supported "
                              f"(this slc reads {VERSION}, {VERSION_ECSQ} and {VERSION_LOSSLESS})")
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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:   # "[[[[..." nests past the stack
            raise FormatError(f"compressed tensor header is not valid JSON: {e}") from None
        scale = take(take_len("scale"), "scale")
        zp = take(take_len("zero_point"), "zero_point")
        esc = take(take_len("escapes"), "escapes") if version == VERSION_ECSQ else None
        stream_bytes = take(take_len("stream"), "stream")
        if pos != end:
            raise FormatError(f"compressed tensor has {end - pos} unexpected trailing bytes")
        if len(scale) % 4 or len(zp) % 4 or (esc is not None and len(esc) % 4):
            raise FormatError("scale / zero_point / escapes byte length is not a multiple of 4")
        m = check_header(meta)
        if (m["quantizer_obj"].mode == "ecsq") != (version == VERSION_ECSQ):
            raise FormatError(f"format version {version} does not match quantizer mode {m['quantizer_obj'].mode!r}")
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
        if esc is not None:
            buffers["escapes"] = torch.from_numpy(np.frombuffer(esc, dtype="<i4").astype(np.int32))
        q = m["quantizer_obj"]
        shape = q.scale_shape(m["shape"])
        for key in ("scale", "zero_point"):
            if key in buffers:
                if buffers[key].numel() != int(np.prod(shape)):
                    raise FormatError(f"{key} has {buffers[key].numel()} values, expected {int(np.prod(shape))} "
                                      f"for shape {m['shape']} with {q.describe()}")
                buffers[key] = buffers[key].reshape(shape)
        return cls.from_buffers(buffers, meta)


def _check_scales(scale: torch.Tensor, zp, q: Quantizer, shape) -> None:
    expected = q.scale_shape(shape)
    if tuple(scale.shape) != expected:
        raise FormatError(f"scale has shape {tuple(scale.shape)}, expected {expected} for {q.describe()}")
    if scale.dtype != torch.float32 or not bool(torch.isfinite(scale).all()):
        raise FormatError("scale must be finite float32")
    if (zp is None) != (q.scheme == "symmetric"):
        raise FormatError(f"zero_point {'missing' if zp is None else 'present'} for scheme {q.scheme!r}")
    if zp is not None and (tuple(zp.shape) != expected or not bool(torch.isfinite(zp).all())):
        raise FormatError(f"zero_point must be finite with shape {expected}")


def check_header(meta) -> dict:
    """Validate a compressed tensor's JSON header (its `meta`); returns it with the built Quantizer
    under "quantizer_obj". Raises FormatError naming the bad field."""
    if not isinstance(meta, dict):
        raise FormatError("compressed tensor header must be a JSON object")
    try:
        shape = meta["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                  for d in shape):
            raise FormatError(f"shape must be a list of positive ints, got {shape!r}")
        if len(shape) > 8 or int(np.prod(shape, dtype=np.float64)) > MAX_NUMEL:
            raise FormatError(f"shape {shape} is too large")
        if meta["dtype"] not in _DTYPES:
            raise FormatError(f"dtype {meta['dtype']!r} is not one of {sorted(_DTYPES)}")
        if meta["predictor"] not in PREDICTORS:
            raise FormatError(f"unknown predictor {meta['predictor']!r}")
        qd = meta["quantizer"]
        if not isinstance(qd, dict) or set(qd) not in (_HEADER_FIELDS, _ECSQ_HEADER_FIELDS, _TRELLIS_HEADER_FIELDS) \
                or qd.get("trellis", True) is not True:
            raise FormatError(f"quantizer must have fields bits, scheme, granularity, axis, group_size "
                              f"(+ mode, step, dead_zone, reference for ecsq, + trellis: true for trellis codes); "
                              f"got {qd!r}")
        q = Quantizer.from_dict(qd)
        if q.mode == "ecsq":
            for key in ("escape_symbol", "n_escapes"):
                if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 0:
                    raise FormatError(f"{key} must be a non-negative int")
            if meta["escape_symbol"] >= 1 << 16:
                raise FormatError(f"escape_symbol {meta['escape_symbol']} is not a 16-bit symbol")
            if meta["predictor"] != "none":
                raise FormatError("ecsq codes take no predictor")
        q.scale_shape(shape)                                          # axis / group size fit the shape
        for key in ("n_symbols", "lanes", "scale_bits"):
            if not isinstance(meta[key], int) or isinstance(meta[key], bool):
                raise FormatError(f"{key} must be an int")
        if meta["n_symbols"] != int(np.prod(shape)):
            raise FormatError(f"n_symbols {meta['n_symbols']} != number of weights {int(np.prod(shape))}")
        if meta["lanes"] < rans.choose_lanes(meta["n_symbols"]) // 8:
            # compress() always takes choose_lanes(n). Far fewer lanes would make the NumPy and torch
            # decoders loop over n / lanes steps (lanes = 1: minutes on a GPU); allow 8x for future tuning.
            raise FormatError(f"lanes {meta['lanes']} is too few for {meta['n_symbols']} symbols "
                              f"(compress uses {rans.choose_lanes(meta['n_symbols'])})")
        ent = meta.get("predictor_entropies", {})
        if not (isinstance(ent, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in ent.values())):
            raise FormatError(f"predictor_entropies must map predictor names to numbers, got {ent!r:.80}")
    except KeyError as e:
        raise FormatError(f"compressed tensor header is missing field {e}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"compressed tensor header is invalid: {e}") from None
    return {**meta, "quantizer_obj": q}


def decode_codes(buffers: dict[str, torch.Tensor], meta: dict, device=None, backend: str = "auto",
                 quantizer: Quantizer | None = None) -> torch.Tensor:
    """The integer codes of a quantized CompressedTensor, decoded from its buffers on `device`.

    backend "auto": numba on CPU, the torch decoder elsewhere (e.g. CUDA, where the words live);
    "torch": the torch decoder everywhere (the CUDA path, testable on CPU). Codes come back in the
    storage dtype of QuantizedTensor: int8 (symmetric) / uint8 (asymmetric), int16/int32 for ecsq.
    `quantizer`: meta["quantizer"] already parsed (a CompressedLinear parses it once, at load).
    """
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    q = quantizer or Quantizer.from_dict(meta["quantizer"])
    shape = tuple(meta["shape"])
    words = buffers["words"]
    device = torch.device(device) if device is not None else words.device
    if backend == "auto" and device.type == "cpu" and words.device.type == "cpu":
        stream = rans.RansStream(n_symbols=meta["n_symbols"], lanes=meta["lanes"], scale_bits=meta["scale_bits"],
                                 freqs=buffers["freqs"].numpy().astype(np.uint32),
                                 states=buffers["states"].numpy().view(np.uint32),
                                 words=words.numpy().view(np.uint16))
        sym = rans.decode_stream(stream, backend="fast")
        if q.mode == "ecsq":
            codes = join_escapes(sym, meta["escape_symbol"], buffers["escapes"].numpy())
            return torch.from_numpy(codes.astype(code_dtype(codes)).reshape(shape))
        return QuantizedTensor.codes_from_symbols(undo_predictor(sym, meta["predictor"], q.bits, shape), q, shape)
    b = {k: buffers[k].to(device) for k in ("words", "states", "freqs")}
    sym = rans.decode_torch(b["words"], b["states"], b["freqs"], meta["n_symbols"], meta["lanes"], meta["scale_bits"])
    if q.mode == "ecsq":
        codes = join_escapes(sym, meta["escape_symbol"], buffers["escapes"].to(device))
        return codes.to(code_dtype(codes)).reshape(shape)
    codes = undo_predictor(sym.to(torch.int64), meta["predictor"], q.bits, shape) + q.qmin
    return codes.to(q.storage_dtype).reshape(shape)


def decompress_buffers(buffers: dict[str, torch.Tensor], meta: dict, dtype=None, device=None) -> torch.Tensor:
    """Decode on the buffers' device: numba on CPU, the torch backend elsewhere (e.g. CUDA).

    This is the low-memory path: between uses only the coded words live on the device.
    """
    if meta.get("mode") == "lossless":
        return lossless_decompress(buffers, meta, dtype, device)
    q = Quantizer.from_dict(meta["quantizer"])
    shape = tuple(meta["shape"])
    dtype = dtype or _DTYPES[meta["dtype"]]
    device = torch.device(device) if device is not None else buffers["words"].device
    codes = decode_codes(buffers, meta, device, quantizer=q)
    zp = buffers.get("zero_point")
    qt = QuantizedTensor(codes, buffers["scale"].to(device), None if zp is None else zp.to(device), q, shape, dtype)
    return qt.dequantize(dtype=dtype, device=device)

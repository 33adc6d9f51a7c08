"""Lossless float mode: split the bits of every weight into planes, entropy-code what gains.

A float is sign | exponent | mantissa. In trained weights the exponent is very
predictable (weights are bell-shaped around 0, so a handful of exponents take almost
all of the mass: about 2.6 bits of entropy in 8), while sign and mantissa are close to
uniform noise. So:

    exponent plane       e = (bits >> M) & (2**E - 1)         -> rANS (E = 8 bf16/fp32, 5 fp16, 11 fp64)
    sign+mantissa bytes  r = sign << M | mantissa, cut into bytes, low byte first
                         each byte plane -> rANS if that is smaller than raw, else kept raw

Decoding puts the bits back together: `bits = (r >> M) << (W-1) | e << M | (r & (2**M - 1))`.
Pure bit manipulation, so every pattern comes back exactly: NaN payloads, +-Inf,
denormals, -0.0. On all-MiniLM-L6-v2 cast to bf16 this lands at about 0.66 x the bf16
bytes (DFloat11 and ZipNN report about 0.67-0.70); fp32 and fp16 gain much less (about
0.83 and 0.85) because their long mantissas are incompressible.

Byte layout (`LosslessTensor.to_bytes`, little-endian), shared magic with slc.tensor:

    b"SLCT" | version 3 (u8) | header length (u32) | header JSON | per plane: length (u32), bytes | CRC32

where a coded plane's bytes are a complete `rans.RansStream` and a raw plane's are its values
(uint8, or uint16 for an 11-bit fp64 exponent kept raw).

>>> import torch
>>> w = torch.randn(256, 384).to(torch.bfloat16)
>>> lt = LosslessTensor.compress(w)
>>> back = LosslessTensor.from_bytes(lt.to_bytes()).decompress()
>>> bool(torch.equal(back.view(torch.int16), w.view(torch.int16))) and lt.ratio < 0.75
True
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

# dtype -> (total bits W, exponent bits E, mantissa bits M, signed int view of the same width)
LAYOUTS = {
    torch.bfloat16: (16, 8, 7, torch.int16),
    torch.float16: (16, 5, 10, torch.int16),
    torch.float32: (32, 8, 23, torch.int32),
    torch.float64: (64, 11, 52, torch.int64),
}
_NAMES = {str(d).removeprefix("torch."): d for d in LAYOUTS}
MAGIC = b"SLCT"
VERSION = 3                       # the container version slc.tensor reserves for lossless tensors
MAX_NUMEL = 2 ** 31 - 1


def plane_names(dtype: torch.dtype) -> list[str]:
    """'exp' then one 'b<i>' per byte of sign+mantissa, low byte first."""
    W, E, M, _ = LAYOUTS[dtype]
    return ["exp"] + [f"b{i}" for i in range(-(-(1 + M) // 8))]


def plane_bits(dtype: torch.dtype, name: str) -> int:
    """How many bits of a symbol of this plane can be set."""
    W, E, M, _ = LAYOUTS[dtype]
    if name == "exp":
        return E
    i = int(name[1:])
    return min(8, 1 + M - 8 * i)


def split_planes(t: torch.Tensor) -> dict[str, np.ndarray]:
    """Float tensor -> {plane name: 1-D unsigned array}, row-major. Exact for every bit pattern."""
    W, E, M, ity = LAYOUTS[t.dtype]
    u = t.detach().cpu().contiguous().view(ity).reshape(-1).numpy().view(f"u{W // 8}").astype(np.uint64)
    e = (u >> np.uint64(M)) & np.uint64((1 << E) - 1)
    r = ((u >> np.uint64(W - 1)) << np.uint64(M)) | (u & np.uint64((1 << M) - 1))  # sign | mantissa
    planes = {"exp": e.astype(np.uint16)}
    for name in plane_names(t.dtype)[1:]:
        i = int(name[1:])
        planes[name] = ((r >> np.uint64(8 * i)) & np.uint64(0xFF)).astype(np.uint8)
    return planes


def join_planes(planes: dict, dtype: torch.dtype, shape) -> torch.Tensor:
    """Inverse of split_planes; planes are numpy arrays or torch tensors (any device, any int dtype)."""
    W, E, M, ity = LAYOUTS[dtype]
    if isinstance(planes["exp"], torch.Tensor):
        dev = planes["exp"].device
        r = torch.zeros(planes["exp"].numel(), dtype=torch.int64, device=dev)
        for name in plane_names(dtype)[1:]:
            r |= (planes[name].reshape(-1).to(torch.int64) & 0xFF) << (8 * int(name[1:]))
        e = planes["exp"].reshape(-1).to(torch.int64) & ((1 << E) - 1)
        u = ((r >> M) << (W - 1)) | (e << M) | (r & ((1 << M) - 1))     # W = 64: 1 << 63 wraps to the sign bit
        if W < 64:
            u = torch.where(u >= 1 << (W - 1), u - (1 << W), u)         # unsigned -> the signed view's value
        return u.to(ity).view(dtype).reshape(shape)
    r = np.zeros(planes["exp"].size, dtype=np.uint64)
    for name in plane_names(dtype)[1:]:
        r |= np.asarray(planes[name]).reshape(-1).astype(np.uint64) << np.uint64(8 * int(name[1:]))
    e = np.asarray(planes["exp"]).reshape(-1).astype(np.uint64)
    u = ((r >> np.uint64(M)) << np.uint64(W - 1)) | (e << np.uint64(M)) | (r & np.uint64((1 << M) - 1))
    arr = u.astype(f"u{W // 8}").view(f"i{W // 8}")
    return torch.from_numpy(arr.copy()).view(dtype).reshape(tuple(shape))


def _raw_dtype(bits: int):
    return np.uint8 if bits <= 8 else np.uint16


@dataclass
class LosslessTensor:
    """A float tensor kept bit for bit: its exponent (and any byte plane that gains) rANS-coded.

    tensor fields: planes {name: rans.RansStream (coded) or np.ndarray (raw, uint8/uint16)}
    attributes:    original_shape, original_dtype
    Same interface as CompressedTensor: decompress, buffers/meta/from_buffers, to_bytes/from_bytes,
    nbytes, bits_per_weight; plus `ratio` (bytes / original bytes) and `plane_report()`.
    """
    planes: dict
    original_shape: tuple
    original_dtype: torch.dtype
    _nbytes: int | None = field(default=None, repr=False, compare=False)

    lossless = True
    quantizer = None

    @classmethod
    def compress(cls, tensor, backend: str = "fast") -> "LosslessTensor":
        """Split `tensor` (bf16, fp16, fp32 or fp64; NaN/Inf allowed) into planes and code each that gains."""
        if isinstance(tensor, np.ndarray):
            if tensor.dtype.kind != "f":
                raise TypeError(f"lossless mode keeps floats; got numpy dtype {tensor.dtype}")
            tensor = torch.from_numpy(np.ascontiguousarray(tensor))
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor must be a torch.Tensor or numpy array, got {type(tensor).__name__}")
        if tensor.dtype not in LAYOUTS:
            raise TypeError(f"lossless mode handles bfloat16, float16, float32 and float64, got {tensor.dtype}")
        if tensor.numel() == 0:
            raise ValueError(f"tensor is empty (shape {tuple(tensor.shape)}): nothing to compress")
        if tensor.numel() > MAX_NUMEL:
            raise ValueError(f"tensor has {tensor.numel()} elements; split it (limit {MAX_NUMEL})")
        planes = {}
        for name, sym in split_planes(tensor).items():
            raw = sym.astype(_raw_dtype(plane_bits(tensor.dtype, name)))
            stream = rans.encode_stream(sym, backend=backend)
            planes[name] = stream if stream.nbytes < raw.nbytes else raw    # keep whichever is smaller
        return cls(planes, tuple(tensor.shape), tensor.dtype)

    # --- decoding ---------------------------------------------------------------------------
    def decompress(self, dtype: torch.dtype | None = None, device=None, backend: str | None = None) -> torch.Tensor:
        """The exact original tensor (cast to `dtype` only if asked), on `device`."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "cpu" or backend == "torch":
            return decompress_buffers(self.buffers(device), self.meta, dtype, device)
        planes = {k: (rans.decode_stream(v, backend=backend or "fast") if isinstance(v, rans.RansStream) else v)
                  for k, v in self.planes.items()}
        out = join_planes(planes, self.original_dtype, self.original_shape)
        return out if dtype is None else out.to(dtype)

    # --- sizes ------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return int(np.prod(self.original_shape))

    @property
    def nbytes(self) -> int:
        """Everything to_bytes() holds: header, plane streams or raw planes, checksum."""
        if self._nbytes is None:
            self._nbytes = len(self.to_bytes())
        return self._nbytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    @property
    def ratio(self) -> float:
        """Compressed bytes / original bytes (1.0 = no gain)."""
        return self.nbytes / (self.numel * self.original_dtype.itemsize)

    def plane_report(self) -> list[dict]:
        """Per plane: bits it holds, whether it is coded, its bits per weight."""
        rows = []
        for name, p in self.planes.items():
            nb = p.nbytes if isinstance(p, rans.RansStream) else p.nbytes
            rows.append({"plane": name, "bits": plane_bits(self.original_dtype, name),
                         "coded": isinstance(p, rans.RansStream), "bits_per_weight": 8 * nb / self.numel})
        return rows

    # --- buffers ----------------------------------------------------------------------------
    def buffers(self, device=None) -> dict[str, torch.Tensor]:
        """{plane_words/_states/_freqs} for coded planes, {plane_raw} for raw ones (int views; no dots, so
        they are valid register_buffer names)."""
        out = {}
        for name, p in self.planes.items():
            if isinstance(p, rans.RansStream):
                out[f"{name}_words"] = torch.from_numpy(np.ascontiguousarray(p.words).view(np.int16))
                out[f"{name}_states"] = torch.from_numpy(np.ascontiguousarray(p.states).view(np.int32))
                out[f"{name}_freqs"] = torch.from_numpy(np.ascontiguousarray(p.freqs).astype(np.int32))
            else:
                raw = np.ascontiguousarray(p)
                out[f"{name}_raw"] = torch.from_numpy(raw if raw.dtype == np.uint8 else raw.view(np.int16))
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out

    @property
    def meta(self) -> dict:
        planes = []
        for name, p in self.planes.items():
            d = {"name": name, "coded": isinstance(p, rans.RansStream)}
            if d["coded"]:
                d.update(n_symbols=int(p.n_symbols), lanes=int(p.lanes), scale_bits=int(p.scale_bits))
            planes.append(d)
        return {"mode": "lossless", "shape": list(self.original_shape),
                "dtype": str(self.original_dtype).removeprefix("torch."), "planes": planes}

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor], meta: dict) -> "LosslessTensor":
        """Inverse of (buffers(), meta); validates everything (raises FormatError)."""
        m = _check_meta(meta)
        b = {k: v.detach().cpu() for k, v in buffers.items()}
        planes = {}
        for d in m["planes"]:
            name, bits = d["name"], plane_bits(m["dtype_obj"], d["name"])
            if d["coded"]:
                keys = [f"{name}_{k}" for k in ("words", "states", "freqs")]
                if any(k not in b for k in keys):
                    raise FormatError(f"lossless tensor is missing one of the buffers {keys}")
                s = rans.RansStream(n_symbols=d["n_symbols"], lanes=d["lanes"], scale_bits=d["scale_bits"],
                                    freqs=b[keys[2]].numpy().astype(np.uint32),
                                    states=b[keys[1]].numpy().view(np.uint32), words=b[keys[0]].numpy().view(np.uint16))
                planes[name] = _check_stream(rans.RansStream.from_bytes(s.to_bytes()), name, bits, m["numel"])
            else:
                if f"{name}_raw" not in b:
                    raise FormatError(f"lossless tensor is missing buffer {name + '_raw'!r}")
                raw = b[f"{name}_raw"].numpy()
                planes[name] = _check_raw(raw.view(_raw_dtype(bits)) if raw.dtype != np.uint8 else raw,
                                          name, bits, m["numel"])
        return cls(planes, tuple(m["shape"]), m["dtype_obj"])

    # --- bytes ------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        header = json.dumps(self.meta, separators=(",", ":")).encode()
        parts = [MAGIC, struct.pack("<BI", VERSION, len(header)), header]
        for p in self.planes.values():
            data = p.to_bytes() if isinstance(p, rans.RansStream) else np.ascontiguousarray(p).astype(
                p.dtype.newbyteorder("<")).tobytes()
            parts += [struct.pack("<I", len(data)), data]
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data) -> "LosslessTensor":
        """Parse and validate (magic, version, checksum, header, every plane) before decoding anything."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"from_bytes needs bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < 13 or data[:4] != MAGIC:
            raise FormatError("not an slc compressed tensor (bad magic or too short)")
        if zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
            raise FormatError("compressed tensor checksum mismatch: the bytes are corrupt or truncated")
        version, hlen = struct.unpack_from("<BI", data, 4)
        if version != VERSION:
            raise FormatError(f"not a lossless tensor (format version {version}, expected {VERSION})")
        pos, end = 9, len(data) - 4
        if pos + hlen > end:
            raise FormatError("lossless tensor header runs past the end")
        try:
            meta = json.loads(data[pos:pos + hlen].decode())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise FormatError(f"lossless tensor header is not valid JSON: {e!r}") from None
        pos += hlen
        m = _check_meta(meta)
        planes = {}
        for d in m["planes"]:
            if pos + 4 > end:
                raise FormatError(f"plane {d['name']!r} length runs past the end")
            (n,) = struct.unpack_from("<I", data, pos)
            pos += 4
            if pos + n > end:
                raise FormatError(f"plane {d['name']!r} ({n} bytes) runs past the end")
            chunk = data[pos:pos + n]
            pos += n
            bits = plane_bits(m["dtype_obj"], d["name"])
            if d["coded"]:
                s = rans.RansStream.from_bytes(chunk)
                if (s.n_symbols, s.lanes, s.scale_bits) != (d["n_symbols"], d["lanes"], d["scale_bits"]):
                    raise FormatError(f"plane {d['name']!r}: header disagrees with its rANS stream")
                planes[d["name"]] = _check_stream(s, d["name"], bits, m["numel"])
            else:
                dt = np.dtype(_raw_dtype(bits)).newbyteorder("<")
                if n % dt.itemsize:
                    raise FormatError(f"plane {d['name']!r}: {n} bytes is not a whole number of values")
                planes[d["name"]] = _check_raw(np.frombuffer(chunk, dtype=dt).astype(_raw_dtype(bits)),
                                               d["name"], bits, m["numel"])
        if pos != end:
            raise FormatError(f"lossless tensor has {end - pos} unexpected trailing bytes")
        return cls(planes, tuple(m["shape"]), m["dtype_obj"])


def _check_meta(meta) -> dict:
    if not isinstance(meta, dict) or meta.get("mode") != "lossless":
        raise FormatError("not a lossless tensor header (mode != 'lossless')")
    try:
        shape, dtype, planes = meta["shape"], meta["dtype"], meta["planes"]
    except KeyError as e:
        raise FormatError(f"lossless tensor header is missing field {e}") from None
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise FormatError(f"shape must be a list of positive ints, got {shape!r}")
    if len(shape) > 8 or int(np.prod(shape, dtype=np.float64)) > MAX_NUMEL:
        raise FormatError(f"shape {shape} is too large")
    if dtype not in _NAMES:
        raise FormatError(f"dtype {dtype!r} is not one of {sorted(_NAMES)}")
    dt = _NAMES[dtype]
    if (not isinstance(planes, list)
            or [p.get("name") if isinstance(p, dict) else None for p in planes] != plane_names(dt)):
        raise FormatError(f"planes must be {plane_names(dt)} for {dtype}")
    numel = int(np.prod(shape))
    for p in planes:
        if not isinstance(p.get("coded"), bool):
            raise FormatError(f"plane {p['name']!r}: 'coded' must be true or false")
        if p["coded"]:
            for key in ("n_symbols", "lanes", "scale_bits"):
                if not isinstance(p.get(key), int) or isinstance(p.get(key), bool):
                    raise FormatError(f"plane {p['name']!r}: {key} must be an int")
            if p["n_symbols"] != numel:
                raise FormatError(f"plane {p['name']!r} has {p['n_symbols']} symbols, expected {numel}")
    return {**meta, "dtype_obj": dt, "numel": numel}


def _check_stream(s: rans.RansStream, name: str, bits: int, numel: int) -> rans.RansStream:
    if s.n_symbols != numel:
        raise FormatError(f"plane {name!r} holds {s.n_symbols} symbols, expected {numel}")
    if len(s.freqs) > 1 << bits:
        raise FormatError(f"plane {name!r}: table has {len(s.freqs)} symbols, more than 2**{bits}")
    return s


def _check_raw(raw: np.ndarray, name: str, bits: int, numel: int) -> np.ndarray:
    if raw.ndim != 1 or raw.size != numel:
        raise FormatError(f"raw plane {name!r} has {raw.size} values, expected {numel}")
    if raw.size and int(raw.max()) >= 1 << bits:
        raise FormatError(f"raw plane {name!r} has values beyond {bits} bits")
    return raw


def decompress_buffers(buffers: dict[str, torch.Tensor], meta: dict, dtype=None, device=None) -> torch.Tensor:
    """Rebuild the exact tensor on the buffers' device (numba on CPU, the torch rANS decoder elsewhere)."""
    m = _check_meta(meta)
    first = next(iter(buffers.values()))
    device = torch.device(device) if device is not None else first.device
    if device.type == "cpu":
        out = LosslessTensor.from_buffers(buffers, meta).decompress()
    else:
        planes = {}
        for d in m["planes"]:
            name = d["name"]
            if d["coded"]:
                b = {k: buffers[f"{name}_{k}"].to(device) for k in ("words", "states", "freqs")}
                planes[name] = rans.decode_torch(b["words"], b["states"], b["freqs"], d["n_symbols"],
                                                 d["lanes"], d["scale_bits"])
            else:
                raw = buffers[f"{name}_raw"].to(device)
                planes[name] = raw.to(torch.int64) & ((1 << (8 * raw.element_size())) - 1)
        out = join_planes(planes, m["dtype_obj"], tuple(m["shape"]))
    return out if dtype is None else out.to(dtype)

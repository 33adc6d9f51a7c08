"""GPTQ: round column by column, pushing each column's error onto the columns not yet rounded.

Works on any of slc's grids (affine int-b or ECSQ steps): the grid and its scales come from the
quantiser; only the choice of codes changes. The result is a QuantizedTensor like any other, so
it is entropy-coded and stored exactly as `Quantizer.quantize` output would be.

With a rotation (slc.rotation, a LinearSpec's `rotate=`) the weight quantised is W R and the Hessian
R^T C R: the inputs of the rotated layer are R^T x, so its output error is tr(dW' R^T C R dW'^T).
"""
from __future__ import annotations

import torch

from . import trellis
from .quant import QuantizedTensor
from .rotation import Rotation


def gptq(w, x_cov: torch.Tensor, quantizer, block: int = 128, damp: float = 0.01,
         grid: QuantizedTensor | None = None, rotation: Rotation | None = None, act_order: bool = False):
    """Quantise `w` (out, in) on `quantizer`'s grid with GPTQ error feedback; returns a QuantizedTensor.

    Same grid and scales as quantizer.quantize(w) (for ecsq: step x row RMS of w; for affine: its
    ranges), but codes chosen to minimise the output error tr(dW C dW^T), C = x_cov = sum x x^T over
    calibration inputs, instead of each weight's own error: columns are rounded left to right and
    each one's error, scaled by the inverse Hessian, is subtracted from the columns to its right
    (Frantar et al., 2022, with the Cholesky form of the inverse and lazy block updates). `damp`
    (fraction of the mean diagonal) keeps C invertible. Granularity: channel (axis 0) or group.
    The result goes to CompressedTensor.from_quantized like any other QuantizedTensor.
    grid: a QuantizedTensor of w on `quantizer` whose scales (and zero points) to use instead of
    quantizer.quantize(w)'s, e.g. slc.importance.weighted_quantize's.
    rotation: w and x_cov are given as they are (unrotated); W R is quantised with the Hessian R^T C R and
    the result holds W R (what CompressedLinear.from_quantized takes for a spec that rotates; a grid must
    then be one of W R).
    act_order: round the columns in order of decreasing Hessian diagonal (the inputs with the most energy
    first, while the most columns are left to absorb their error) instead of left to right. The grid is fixed
    before any column is rounded, so each column keeps its own scale whatever the order; the codes come back
    in the weight's own column order.
    A trellis quantiser (Quantizer(trellis=True), slc.trellis) is searched a block at a time: inside a block each of
    the trellis' 8 surviving paths feeds its own errors forward (slc.trellis.search_block), between blocks the lazy
    update is GPTQ's. Its codes depend on their order along the row, so act_order is refused for it.
    """
    w = torch.as_tensor(w).detach()
    if w.dim() != 2:
        raise ValueError(f"gptq needs a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if rotation is not None:
        if tuple(x_cov.shape) != (w.shape[1], w.shape[1]) or rotation.width != w.shape[1]:
            raise ValueError(f"rotation ({rotation.width} wide) and x_cov {tuple(x_cov.shape)} must match the "
                             f"weight's {w.shape[1]} inputs")
        dtype = w.dtype
        w = rotation.apply(w.double()).to(dtype if dtype == torch.float64 else torch.float32)
        qt = gptq(w, rotation.conjugate(x_cov.detach().double()), quantizer, block, damp, grid, act_order=act_order)
        qt.original_dtype = dtype
        return qt
    q = quantizer
    if q.granularity == "tensor" or (q.granularity == "channel" and q.axis not in (0, -2)):
        raise ValueError("gptq needs scales per output row (granularity='channel', axis=0) or per group")
    rows, n = w.shape
    if tuple(x_cov.shape) != (n, n):
        raise ValueError(f"x_cov must be ({n}, {n}) for a weight with {n} inputs, got {tuple(x_cov.shape)}")
    if q.trellis and act_order:
        raise ValueError("act_order reorders the columns, but trellis codes are decoded in the row's own order: "
                         "use act_order=False with a trellis quantiser")
    if grid is not None and (grid.quantizer != q or tuple(grid.original_shape) != tuple(w.shape)):
        raise ValueError("grid must be a QuantizedTensor of this weight on this quantizer")
    ref = q.quantize(w) if grid is None else grid                    # the grid: scales (and zero points)
    gs = n if q.granularity == "channel" else q.group_size
    scale = ref.scale.reshape(rows, -1).double()                     # (rows, n // gs)
    zp = None if ref.zero_point is None else ref.zero_point.reshape(rows, -1).double()
    ecsq = q.mode == "ecsq"
    off = 0.5 - q.dead_zone if ecsq else 0.5

    def round_col(col, j):
        s = scale[:, j // gs]
        if ecsq:
            return torch.copysign(torch.floor(col.abs() / s + off).clamp_min(0), col)
        c = col / s + (0 if zp is None else zp[:, j // gs])
        c = torch.floor(c + 0.5).clamp(q.qmin, q.qmax)
        return c

    def value(c, j):
        s = scale[:, j // gs]
        return (c - (0 if zp is None else zp[:, j // gs])) * s

    W = w.double().clone()
    H = x_cov.detach().double().clone()
    dead = torch.diag(H) == 0                                        # inputs never active: any value will do
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    order = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(n)
    W, H = W[:, order], H[order][:, order]                           # column i of W, H is the weight's order[i]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(rows, n, dtype=torch.float64)
    if q.trellis:
        steps = scale.repeat_interleave(gs, dim=1).numpy()                      # (rows, n): each weight's step
        state = torch.zeros(rows, dtype=torch.int64).numpy()
        for i1 in range(0, n, block):
            i2 = min(i1 + block, n)
            k, err, state = trellis.search_block(W[:, i1:i2].numpy(), Hinv[i1:i2, i1:i2].numpy(),
                                                 steps[:, i1:i2], state)
            codes[:, i1:i2] = torch.from_numpy(k).double()
            W[:, i2:] -= torch.from_numpy(err) @ Hinv[i1:i2, i2:]
    else:
        for i1 in range(0, n, block):
            i2 = min(i1 + block, n)
            W1, E1, Hi = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=torch.float64), Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = int(order[i1 + i])                                   # the weight's own column: its scale
                c = round_col(W1[:, i], j)
                codes[:, j] = c
                err = (W1[:, i] - value(c, j)) / Hi[i, i]
                W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]           # the columns of this block to the right
                E1[:, i] = err
            W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]                           # lazy update of everything further right
    if ecsq:
        dtype = torch.int16 if float(codes.abs().max()) < 2 ** 15 - 1 else torch.int32
    else:
        dtype = ref.codes.dtype
    return QuantizedTensor(codes.to(dtype), ref.scale, ref.zero_point, q, tuple(w.shape), w.dtype)

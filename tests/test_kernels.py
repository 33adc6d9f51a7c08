"""slc.kernels.int8_linear: the int8-weight kernel for generation, against torch's dense matmul."""
import threading

import pytest
import torch
import torch.nn.functional as F

from slc import kernels
from slc.nn import CompressedLinear, LinearSpec
from slc.quant import Quantizer


def int8_weight(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    scale = w.abs().amax(1) / 127
    codes = torch.round(w / scale[:, None]).to(torch.int8)
    return codes, scale


def reference(x, codes, scale):
    return F.linear(x.double(), codes.double() * scale.double()[:, None]).float()


@pytest.mark.parametrize("rows", [1, 2, 5, kernels.MAX_ROWS])
@pytest.mark.parametrize("n,k", [(48, 64), (7, 13), (192, 576), (1, 1)])
def test_matches_dense_matmul(rows, n, k):
    codes, scale = int8_weight(n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    y = kernels.int8_linear(x, codes, scale)
    ref = reference(x, codes, scale)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    # fp32 accumulation of k products: relative to the sum of |terms|, well under 1e-5 for k <= 576
    bound = 1e-5 * (x.abs().double() @ (codes.double().abs() * scale.double()[:, None]).T).float() + 1e-7
    assert ((y - ref).abs() <= bound).all()


def test_leading_dims_and_non_contiguous_input():
    codes, scale = int8_weight(32, 40)
    x = torch.randn(40, 2, 3).permute(1, 2, 0)                      # (2, 3, 40), not contiguous
    y = kernels.int8_linear(x, codes, scale)
    assert y.shape == (2, 3, 32)
    assert torch.allclose(y, reference(x, codes, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda x: x.double(),                                           # not float32
    lambda x: x.half(),
    lambda x: torch.randn(kernels.MAX_ROWS + 1, x.shape[-1]),      # too many rows
    lambda x: x[:, :-1],                                            # width mismatch
    lambda x: x.clone().requires_grad_(True),                       # autograd wanted
])
def test_not_usable_gives_clear_error(make):
    codes, scale = int8_weight(8, 16)
    x = make(torch.randn(2, 16))
    assert not kernels.usable(x, codes)
    with pytest.raises(ValueError, match="int8_linear needs"):
        kernels.int8_linear(x, codes, scale)


def test_wrong_scale_count_is_refused():
    codes, scale = int8_weight(8, 16)
    with pytest.raises(ValueError, match="one scale per output row"):
        kernels.int8_linear(torch.randn(1, 16), codes, scale[:4])


def test_concurrent_calls_from_threads_are_correct():
    codes, scale = int8_weight(256, 96)
    xs = [torch.randn(1, 96, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    out, errors = [None] * len(xs), []

    def work(i):
        try:
            for _ in range(20):
                out[i] = kernels.int8_linear(xs[i], codes, scale)
        except Exception as e:                                       # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for x, y in zip(xs, out, strict=True):
        assert torch.allclose(y, reference(x, codes, scale), rtol=1e-5, atol=1e-6)


def test_compressed_linear_uses_kernel_for_few_rows_and_agrees_with_many(monkeypatch):
    lin = torch.nn.Linear(96, 40)
    cl = CompressedLinear.from_linear(lin, LinearSpec("quantized")).eval()
    calls = []
    real = kernels.int8_linear
    monkeypatch.setattr(kernels, "int8_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(20, 96)
    with torch.no_grad():
        many = cl(x)                                                # 20 rows: torch GEMM path
        assert not calls
        few = torch.cat([cl(x[i:i + 1]) for i in range(20)])        # one row at a time: the kernel
    assert len(calls) == 20
    assert torch.allclose(few, many, rtol=1e-5, atol=1e-5)


def test_gradients_still_flow_through_x():
    cl = CompressedLinear.from_linear(torch.nn.Linear(16, 8), LinearSpec("quantized"))
    x = torch.randn(1, 16, requires_grad=True)
    cl(x).sum().backward()                                          # falls back to torch ops
    w = cl.weight_dense(torch.float32)
    assert torch.allclose(x.grad, w.sum(0, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("quantizer", [
    Quantizer(bits=4, granularity="group", group_size=16),
    Quantizer(bits=4, scheme="asymmetric", granularity="group", group_size=32),
    Quantizer(bits=3, granularity="channel"),
    Quantizer(bits=2, scheme="asymmetric", granularity="group", group_size=8),
], ids=["int4-g16", "uint4-g32", "int3-channel", "uint2-g8"])
@pytest.mark.parametrize("rows", [1, 3, kernels.MAX_ROWS])
def test_packed_kernel_matches_dequantised_weight(quantizer, rows):
    lin = torch.nn.Linear(96, 40, bias=False)
    cl = CompressedLinear.from_linear(lin, LinearSpec("quantized", quantizer)).eval()
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(2))
    gs = cl._packed_group()
    assert gs and kernels.packed_usable(x, 96, gs)
    with torch.no_grad():
        y = kernels.packed4_linear(x, cl.codes, cl.scale, getattr(cl, "zero_point", None), quantizer.qmin, cl.shape, gs)
        ref = F.linear(x.double(), cl.weight_dense(torch.float64))
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(cl(x).double(), ref, rtol=1e-5, atol=1e-5)          # forward takes the kernel


def test_packed_kernel_refuses_what_it_cannot_do():
    cl = CompressedLinear.from_linear(torch.nn.Linear(10, 4),
                                      LinearSpec("quantized", Quantizer(bits=4, granularity="group", group_size=5)))
    x = torch.randn(1, 10)
    assert not kernels.packed_usable(x, 10, 5)                      # odd group size: torch path instead
    assert torch.allclose(cl(x), F.linear(x, cl.weight_dense(torch.float32), cl.bias), atol=1e-5)
    with pytest.raises(ValueError, match="packed4_linear needs"):
        kernels.packed4_linear(x, cl.codes, cl.scale, None, -7, cl.shape, 5)


def test_a_forked_child_can_still_use_the_kernel():
    """numba's OpenMP layer kills a process that forks after using it; slc.kernels selects workqueue."""
    import multiprocessing as mp
    codes, scale = int8_weight(64, 32)
    x = torch.randn(1, 32)
    y = kernels.int8_linear(x, codes, scale)                        # the parent has used the thread pool
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_kernel, args=(q, x, codes, scale))
    p.start()
    p.join(60)
    assert p.exitcode == 0, f"forked child died (exit code {p.exitcode})"
    assert torch.equal(torch.tensor(q.get(timeout=5)), y)


def _child_kernel(q, x, codes, scale):
    q.put(kernels.int8_linear(x, codes, scale).tolist())      # plain floats: no shared-memory handles

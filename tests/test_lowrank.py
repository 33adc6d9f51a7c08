"""Low rank: exactness at full rank, rank targets on real MiniLM weights, whitening, the rank allocator."""
import doctest

import pytest
import torch

import slc.lowrank
from slc.lowrank import allocate_ranks, choose_rank, low_rank, quantize_factors, svd
from slc.models import linear_weights
from slc.quant import Quantizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """LAPACK with 2 OpenMP threads on a busy 2-core machine runs SVDs 10-30x slower than with 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def minilm():
    """Three real fp32 weights of all-MiniLM-L6-v2 (one of each shape)."""
    w = linear_weights("minilm-l6")
    return {k: w[k] for k in ("encoder.layer.0.attention.self.query.weight",
                              "encoder.layer.2.intermediate.dense.weight", "encoder.layer.5.output.dense.weight")}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_full_rank_is_exact(minilm):
    for w in list(minilm.values()) + [torch.randn(7, 3), torch.randn(3, 7)]:
        lr = low_rank(w, rank=min(w.shape))
        assert lr.U.shape == (w.shape[0], lr.rank) and lr.Vh.shape == (lr.rank, w.shape[1])
        assert rel(lr.dense(), w) < 1e-5
        assert lr.params == lr.rank * sum(w.shape)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_target_is_met_by_the_smallest_rank(minilm, energy):
    for w in minilm.values():
        S = torch.linalg.svdvals(w.double())
        r = low_rank(w, energy=energy).rank
        kept = lambda k: float((S[:k] ** 2).sum() / (S ** 2).sum())
        assert kept(r) >= energy - 1e-9 and (r == 1 or kept(r - 1) < energy)


@pytest.mark.parametrize("error", [0.1, 0.3, 0.5])
def test_error_target_is_met_by_the_smallest_rank(minilm, error):
    for w in minilm.values():
        lr = low_rank(w, error=error)
        assert rel(lr.dense(), w) <= error + 1e-5
        smaller = low_rank(w, rank=lr.rank - 1)
        assert rel(smaller.dense(), w) > error


def test_rank_choice_errors():
    S = torch.tensor([3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match=r"use 1\.\.3"):
        choose_rank(S, rank=4)
    with pytest.raises(ValueError, match="exactly one"):
        choose_rank(S)
    with pytest.raises(ValueError, match="exactly one"):
        choose_rank(S, rank=1, energy=0.5)
    with pytest.raises(ValueError, match="fraction"):
        choose_rank(S, energy=0.0)
    assert choose_rank(S, energy=1.0) == 3 and choose_rank(S, error=0.0) == 3
    with pytest.raises(ValueError, match="2-D"):
        low_rank(torch.randn(2, 3, 4), rank=1)


def test_whitening_is_exact_at_full_rank_and_better_in_the_output_norm(minilm):
    torch.manual_seed(0)
    w = minilm["encoder.layer.0.attention.self.query.weight"]
    x = torch.randn(2048, w.shape[1]) * torch.logspace(-2, 1, w.shape[1])     # very uneven input channels
    cov = x.T @ x / len(x)
    full = low_rank(w, rank=min(w.shape), x_cov=cov)
    assert full.whitened and rel(full.dense(), w) < 1e-4
    out_err = lambda lr: rel(x @ lr.dense().T, x @ w.T)
    assert out_err(low_rank(w, rank=64, x_cov=cov)) < 0.8 * out_err(low_rank(w, rank=64))
    diag = low_rank(w, rank=64, x_cov=torch.diagonal(cov))                  # ASVD's diagonal form also accepted
    assert out_err(diag) < out_err(low_rank(w, rank=64))
    with pytest.raises(ValueError, match="x_cov must have shape"):
        svd(w, torch.eye(5))


def test_quantized_factors_cost_little(minilm):
    w = minilm["encoder.layer.2.intermediate.dense.weight"]
    lr = low_rank(w, rank=128)
    ut, vh = quantize_factors(lr, Quantizer())                               # one scale per singular vector
    assert ut.scale.shape == (128, 1) and vh.scale.shape == (128, 1)
    approx = (ut.dequantize().T * lr.S) @ vh.dequantize()
    assert rel(approx, lr.dense()) < 0.02           # ~0.9 % per int8 unit vector, two factors add in quadrature


def test_allocate_ranks_respects_the_budget(minilm):
    dense = sum(w.numel() for w in minilm.values())
    for budget in (0.1, 0.5, 30_000):
        ranks = allocate_ranks(minilm, budget)
        used = sum(r * sum(minilm[k].shape) for k, r in ranks.items())
        limit = int(budget * dense) if isinstance(budget, float) else budget
        assert used <= limit and all(1 <= r <= min(minilm[k].shape) for k, r in ranks.items())
        assert used > limit - max(sum(w.shape) for w in minilm.values())    # greedy leaves less than one step unused
    with pytest.raises(ValueError, match="cannot even hold"):
        allocate_ranks(minilm, 100)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        allocate_ranks(minilm, 1.5)
    with pytest.raises(TypeError, match="param_budget"):
        allocate_ranks(minilm, "half")


def test_allocate_ranks_follows_the_spectrum():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64))
    steep = (q * torch.logspace(0, -4, 64)) @ q.T                           # energy in a few directions
    flat = torch.randn(64, 64)                                               # energy spread evenly
    ranks = allocate_ranks({"steep": steep, "flat": flat}, 40 * 128)         # 40 rank steps of 64 + 64
    assert sum(ranks.values()) == 40 and ranks["flat"] > 2 * ranks["steep"]   # measured: steep 11, flat 29
    raw = allocate_ranks({"steep": steep, "flat": flat}, 40 * 128, relative=False)
    assert raw["steep"] < ranks["steep"]                                      # flat also has the bigger norm


def test_adaptive_keeps_more_energy_than_uniform_at_the_same_budget(minilm):
    r_uniform = 64
    budget = sum(r_uniform * sum(w.shape) for w in minilm.values())
    ranks = allocate_ranks(minilm, budget)

    def mean_rel_energy_lost(rank_of):
        lost = []
        for k, w in minilm.items():
            S2 = torch.linalg.svdvals(w.double()) ** 2
            lost.append(float(S2[rank_of(k):].sum() / S2.sum()))
        return sum(lost)
    assert mean_rel_energy_lost(ranks.get) <= mean_rel_energy_lost(lambda k: r_uniform)


def test_docstring_examples():
    assert doctest.testmod(slc.lowrank).failed == 0

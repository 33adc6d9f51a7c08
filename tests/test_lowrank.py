"""Low rank: exactness at full rank, rank targets on real MiniLM weights, whitening, the rank allocator."""
import doctest

import pytest
import torch

import slc.lowrank
from slc.hf import dense_weight_of, target_layers
from slc.lowrank import (
    allocate_ranks,
    choose_rank,
    low_rank,
    quantize_factors,
    rank_sensitivity,
    svd,
)
from slc.models import ByteTokenizer, linear_weights, tiny_model
from slc.quant import Quantizer


pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


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
        kept = lambda k, S=S: float((S[:k] ** 2).sum() / (S ** 2).sum())
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


def tail(sens, r):
    return float(sens[r:].sum())


def test_sensitivity_gives_the_sensitive_layer_more_rank():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    weights = {"cold": w, "hot": w.clone()}                                  # identical spectra
    plain = allocate_ranks(weights, 32 * 80)                                 # 32 rank steps of 48 + 32
    assert plain["cold"] == plain["hot"] == 16
    S2 = torch.linalg.svdvals(w.double()) ** 2
    sens = {"cold": S2, "hot": 10 * S2}                                      # "hot" costs the loss 10x more
    ranks = allocate_ranks(weights, 32 * 80, sensitivity=sens, power=1)
    assert ranks["hot"] > ranks["cold"] + 4, ranks
    assert sum(r * 80 for r in ranks.values()) == 32 * 80                    # every step is 80: spent exactly
    # power=1 is the exact optimum here (decreasing sensitivities): no single swap of one rank lowers sum D
    total = lambda r: tail(sens["cold"], r["cold"]) + tail(sens["hot"], r["hot"])
    for a, b in (("cold", "hot"), ("hot", "cold")):
        moved = {a: ranks[a] + 1, b: ranks[b] - 1}
        assert total(moved) >= total(ranks)


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8, 50_000])
def test_sensitivity_allocation_respects_the_budget_and_floor(minilm, budget):
    gen = torch.Generator().manual_seed(1)
    sens = {k: torch.rand(min(w.shape), generator=gen, dtype=torch.float64) for k, w in minilm.items()}
    shapes = {k: tuple(w.shape) for k, w in minilm.items()}                  # shapes are enough with sensitivity
    dense = sum(w.numel() for w in minilm.values())
    limit = int(budget * dense) if isinstance(budget, float) else budget
    for power in (1, 2, 4):
        ranks = allocate_ranks(shapes, budget, sensitivity=sens, power=power, min_rank=8)
        used = sum(r * sum(shapes[k]) for k, r in ranks.items())
        assert limit - max(sum(s) for s in shapes.values()) < used <= limit, (power, used, limit)
        assert all(8 <= r <= min(shapes[k]) for k, r in ranks.items())
    everything = sum(min(s) * sum(s) for s in shapes.values())               # full rank costs more than m * n
    assert allocate_ranks(shapes, everything, sensitivity=sens) == {k: min(s) for k, s in shapes.items()}


def test_power_spreads_the_estimated_damage():
    sens = {"steep": torch.logspace(0, -3, 64, dtype=torch.float64),       # a few vectors matter a lot
            "flat": torch.full((64,), 0.02, dtype=torch.float64)}           # every vector matters a little
    shapes = {"steep": (64, 64), "flat": (64, 64)}
    D = lambda ranks: {k: tail(sens[k], r) for k, r in ranks.items()}
    one, two = (D(allocate_ranks(shapes, 40 * 128, sensitivity=sens, power=p)) for p in (1, 2))
    assert sum(one.values()) <= sum(two.values())                           # power 1 minimises the sum
    assert max(two.values()) < max(one.values())                            # power 2 the larger share


def test_sensitivity_argument_errors(minilm):
    sens = {k: torch.ones(min(w.shape)) for k, w in minilm.items()}
    k0 = next(iter(minilm))
    with pytest.raises(ValueError, match="x_covs"):
        allocate_ranks(minilm, 0.5, x_covs={}, sensitivity=sens)
    with pytest.raises(ValueError, match="no entry"):
        allocate_ranks(minilm, 0.5, sensitivity={k: v for k, v in sens.items() if k != k0})
    with pytest.raises(ValueError, match="singular vectors"):
        allocate_ranks(minilm, 0.5, sensitivity={**sens, k0: torch.ones(3)})
    with pytest.raises(ValueError, match="power"):
        allocate_ranks(minilm, 0.5, sensitivity=sens, power=0.5)
    with pytest.raises(ValueError, match="cannot even hold"):
        allocate_ranks(minilm, 100, sensitivity=sens)
    with pytest.raises(TypeError, match="param_budget"):
        allocate_ranks(minilm, "half", sensitivity=sens)


byte_tok = ByteTokenizer()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rank_sensitivity_is_the_rank1_empirical_fisher(arch):
    """Against an explicit computation: per sequence, g = d(summed loss)/d(layer output), one layer at a time."""
    model = tiny_model(arch)
    layers = target_layers(model)
    factors = {n: svd(dense_weight_of(m).float()) for n, m in layers.items()}
    text = "Low rank keeps the directions that the loss needs; calibration text feeds it. " * 2   # 3 chunks of <= 64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = rank_sensitivity(model, byte_tok, factors, text)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())                   # restored as it was
    ids = byte_tok(text).input_ids
    for name in (next(iter(layers)), list(layers)[-1]):
        U, S, Vh = factors[name]
        acc, tokens = torch.zeros(S.numel(), dtype=torch.float64), 0
        for i in range(0, ids.shape[1], 64):
            chunk = ids[:, i:i + 64]
            seen = {}

            def keep(module, args, out, seen=seen):
                seen.update(x=args[0], y=out)
                out.retain_grad()
            h = layers[name].register_forward_hook(keep)
            loss = model(chunk, labels=chunk).loss * (chunk.shape[1] - 1)                   # summed over tokens
            h.remove()
            loss.backward()
            model.zero_grad()
            x, g = seen["x"].detach().reshape(-1, Vh.shape[1]), seen["y"].grad.reshape(-1, U.shape[0])
            acc += ((g @ U).pow(2) * (x @ Vh.T).pow(2)).sum(0).double()
            tokens += chunk.shape[1] - 1
        expect = S.double() ** 2 * acc / (2 * tokens)
        assert torch.allclose(sens[name], expect, rtol=1e-4, atol=1e-12 * float(expect.max())), name
    assert all(s.shape == (min(dense_weight_of(layers[n]).shape),) and bool((s >= 0).all()) for n, s in sens.items())


def test_rank_sensitivity_errors():
    model = tiny_model("llama")
    name, m = next(iter(target_layers(model).items()))
    U, S, Vh = svd(dense_weight_of(m).float())
    with pytest.raises(ValueError, match="not a module"):
        rank_sensitivity(model, byte_tok, {"nope": (U, S, Vh)}, "some text")
    with pytest.raises(ValueError, match="do not fit"):
        rank_sensitivity(model, byte_tok, {name: (U[:, :3], S, Vh)}, "some text")
    with pytest.raises(ValueError, match="too short"):
        rank_sensitivity(model, byte_tok, {name: (U, S, Vh)}, "a")
    with pytest.raises(ValueError, match="empty"):
        rank_sensitivity(model, byte_tok, {}, "some text")


def test_docstring_examples():
    assert doctest.testmod(slc.lowrank).failed == 0

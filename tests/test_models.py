"""slc.models: the derived off-grid SmolLM2 (dither_off_grid and the folder it is built into)."""
import pytest
import torch
from safetensors.torch import load_file

from slc import models


def q4_1_grid(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Weights as GGUF Q4_1 leaves them: per group of 32, min + step * q with q in 0..15 (both ends used)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    lo = torch.randn(rows, cols // 32, 1, generator=g) * 0.1
    step = torch.rand(rows, cols // 32, 1, generator=g) * 0.01 + 0.001
    return (lo + step * q).reshape(rows, cols), step.expand(-1, -1, 32).reshape(rows, cols)


def test_dither_moves_every_weight_within_its_grid_cell_and_off_the_grid():
    w, step = q4_1_grid(8, 96)
    d = models.dither_off_grid(w, torch.Generator().manual_seed(0))
    assert d.shape == w.shape and d.dtype == w.dtype
    assert ((d - w).abs() <= step / 2 + 1e-6).all()
    # On the grid a group of 32 holds at most 16 values; off it, every weight is its own.
    assert all(len(set(g.tolist())) == 32 for g in d.reshape(-1, 32))
    # The noise fills the cell: about uniform on (-1/2, 1/2) steps (variance 1/12).
    u = ((d - w) / step).flatten()
    assert abs(float(u.mean())) < 0.05 and abs(float(u.var()) - 1 / 12) < 0.01
    # The same generator state gives the same noise.
    assert torch.equal(d, models.dither_off_grid(w, torch.Generator().manual_seed(0)))


def test_dither_leaves_a_constant_group_alone_and_refuses_other_shapes():
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-1, 1, 64)
    d = models.dither_off_grid(w, torch.Generator().manual_seed(1))
    assert torch.equal(d[0], w[0]) and not torch.equal(d[1], w[1])
    with pytest.raises(ValueError, match="multiple of 32"):
        models.dither_off_grid(torch.zeros(4, 48), torch.Generator())
    with pytest.raises(ValueError, match="2-D"):
        models.dither_off_grid(torch.zeros(64), torch.Generator())


def test_the_derived_model_is_built_from_its_base_with_only_the_block_linears_dithered(tmp_path, monkeypatch):
    # A tiny Llama stands in for SmolLM2 (plumbing only): its folder is where fetch() would have put SmolLM2.
    monkeypatch.setattr(models, "CACHE", tmp_path)
    base = tmp_path / "smollm2-135m"
    tiny = models.tiny_model("llama", seed=0)
    tiny.save_pretrained(base)
    (base / models.GGUF_FILE).write_bytes(b"not copied")
    name = "smollm2-135m-dithered"
    folder = models.fetch(name, quiet=True)
    assert folder == tmp_path / name and not (folder / models.GGUF_FILE).exists()
    assert not list(tmp_path.glob(f".{name}-*"))                    # no half-made folder left behind
    before, after = load_file(base / "model.safetensors"), load_file(folder / "model.safetensors")
    assert set(before) == set(after)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {k for k, v in before.items() if models.weight_kind(k) in
                     ("q", "k", "v", "o", "gate", "up", "down")} and moved
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert all(torch.equal(loaded[k], after[k]) for k in moved)
    assert models.task(name) == "causal-lm" and models.task("minilm-l6") == "encoder"
    # Built once: a second fetch returns the same folder without rebuilding it.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.fetch(name, quiet=True) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_unknown_model_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m-dithered"):
        models.model_dir("smollm2-1b")

"""slc.rotation: randomised block-Hadamard rotations are orthogonal, seeded, and undo exactly."""
import pytest
import torch

from slc.rotation import block_size, hadamard, rotate_stats, rotation


@pytest.mark.parametrize("width,block", [(576, 64), (1536, 512), (384, 128), (64, 64), (96, 32)])
def test_orthogonal_and_exactly_undone(width, block):
    assert block_size(width) == block
    r = rotation(width, seed=1)
    assert torch.allclose(r.T @ r, torch.eye(width, dtype=torch.float64), atol=1e-12)
    assert torch.equal(r, rotation(width, seed=1)) and not torch.equal(r, rotation(width, seed=2))
    w, x = torch.randn(8, width, dtype=torch.float64), torch.randn(5, width, dtype=torch.float64)
    assert torch.allclose((x @ r) @ (w @ r).T, x @ w.T, atol=1e-10)          # (W R)(R^T x) = W x
    c = x.T @ x
    assert torch.allclose(rotate_stats(c, r), ((x @ r) ** 2).sum(0))


def test_widths_without_a_power_of_two_factor_are_refused():
    with pytest.raises(ValueError, match="leave this layer unrotated"):
        rotation(45)
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)

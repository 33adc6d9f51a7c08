import os

import pytest
import torch

# Deterministic, and gentle on a 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: LAPACK with 2 OpenMP threads on a busy 2-core machine runs SVDs
    10-30x slower than with 1. Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def minilm_weights():
    from slc.models import linear_weights
    return linear_weights("minilm-l6")


@pytest.fixture(scope="session")
def minilm_query(minilm_weights):
    """One real fp32 weight matrix (384 x 384) from all-MiniLM-L6-v2."""
    return minilm_weights["encoder.layer.0.attention.self.query.weight"]

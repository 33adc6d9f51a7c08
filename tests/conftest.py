import os

import pytest
import torch

# Deterministic, and gentle on a 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))



@pytest.fixture(scope="session")
def minilm_weights():
    from slc.models import linear_weights
    return linear_weights("minilm-l6")


@pytest.fixture(scope="session")
def minilm_query(minilm_weights):
    """One real fp32 weight matrix (384 x 384) from all-MiniLM-L6-v2."""
    return minilm_weights["encoder.layer.0.attention.self.query.weight"]

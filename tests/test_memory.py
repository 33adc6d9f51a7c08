"""Memory: bytes by storage kind, RSS helpers, and mmap vs in-RAM measured the same way."""
import functools
import subprocess
import sys

import pytest
import torch
from torch import nn

from slc import memory
from slc.models import model_dir
from slc.nn import CompressedLinear, LinearSpec
from slc.quant import Quantizer


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(20, 10)                                     # 200 + 10 fp32
        self.register_buffer("codes", torch.zeros(10, 20, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(10))


def test_int8_buffer_counts_one_byte_per_element():
    b = memory.tensor_bytes(Holder())
    assert b == {"dense fp32": 210 * 4, "int8 codes": 200, "scales": 40, "total": 840 + 200 + 40}


def test_shared_storage_counts_once():
    m = nn.Module()
    m.a = nn.Linear(8, 8, bias=False)
    m.b = nn.Linear(8, 8, bias=False)
    m.b.weight = m.a.weight                                               # tied, like embed_tokens / lm_head
    assert memory.tensor_bytes(m)["total"] == 64 * 4
    m.register_buffer("view", m.a.weight.data)                           # same memory under another name
    assert memory.tensor_bytes(m)["total"] == 64 * 4


@pytest.mark.parametrize("spec,kind", [
    (LinearSpec("quantized"), "int8 codes"),
    (LinearSpec("entropy"), "entropy-coded"),
    (LinearSpec("lowrank", rank=4, factor_quantizer=Quantizer()), "low-rank factors"),
])
def test_compressed_linear_kinds(spec, kind):
    torch.manual_seed(0)
    layer = CompressedLinear.from_linear(nn.Linear(64, 32), spec)
    b = memory.tensor_bytes(layer)
    assert b[kind] > 0 and b["dense fp32"] == 32 * 4                      # only the bias stays dense
    assert b["total"] == layer.nbytes + 32 * 4
    if spec.kind == "quantized":
        assert b["int8 codes"] == 64 * 32 and b["scales"] == 32 * 4


def test_tensor_bytes_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        memory.tensor_bytes({"w": torch.ones(3)})


def test_rss_helpers():
    assert memory.rss_bytes() > 10 * memory.MB
    # rss_delta in a fresh interpreter: in this long-lived test process the allocator may hand back pages
    # that are already resident, so a new 64 MB tensor need not grow RSS at all
    code = ("import torch; from slc import memory; "
            "t, grew = memory.rss_delta(torch.ones, 64 * memory.MB, dtype=torch.uint8); print(t.numel(), grew)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    numel, grew = (int(v) for v in res.stdout.split()[-2:])
    assert numel == 64 * memory.MB and grew > 48 * memory.MB
    parts = memory.rss_breakdown()
    if parts["anon"] is not None:
        assert parts["anon"] + parts["file"] <= parts["rss"] + memory.MB


def test_measure_load_in_fresh_process():
    r = memory.measure_load(functools.partial(torch.ones, 40 * memory.MB, dtype=torch.uint8), preimport=("torch",))
    assert 35 * memory.MB < r["growth"] < 60 * memory.MB and r["touched_bytes"] == 40 * memory.MB


def test_measure_load_needs_importable_loader():
    with pytest.raises(TypeError, match="importable|cannot import"):
        memory.measure_load(lambda: torch.ones(3))


@pytest.mark.slow
def test_mmap_vs_in_ram_minilm():
    path = model_dir("minilm-l6") / "model.safetensors"
    rows = {r["mode"]: r for r in memory.measure_safetensors(path)}
    assert rows["mmap, untouched"]["growth_vs_file"] < 0.3                 # looks free ...
    assert rows["mmap, all pages read"]["growth_vs_file"] > 0.9            # ... until the pages are read
    assert rows["mmap, all pages read"]["file_backed_mb"] > 0.9 * rows["mmap, all pages read"]["file_mb"]
    assert rows["copied into RAM"]["anon_mb"] > 0.9 * rows["copied into RAM"]["file_mb"]
    with pytest.raises(ValueError, match="safetensors"):
        memory.measure_safetensors(model_dir("minilm-l6") / "config.json")

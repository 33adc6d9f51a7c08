"""slc.llamacpp without the llama.cpp build: block names, types per kind, true bits/weight, missing build.

The tiny GGUF files are written here with gguf.GGUFWriter, so these tests run on any install; only
tests that run llama.cpp's tools need `make peers`, and they skip with that reason when it is missing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slc import llamacpp
from slc.llamacpp import BlockSummary, block_name, block_summary, read_block_weights, tool
from slc.sources import unpermute_rotary

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _write(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, object]], width: int = 64) -> Path:
    """A GGUF file of `arch` holding {name: (fp32 weight (out, in), GGML type)}; quantised with gguf.quants."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_context_length(64)                   # what llama.cpp's loader asks for
    w.add_embedding_length(width)
    w.add_feed_forward_length(2 * width)
    w.add_rope_dimension_count(width // 2)
    w.add_layer_norm_rms_eps(1e-5)
    for name, (x, qtype) in tensors.items():
        if qtype == Q.F32:
            w.add_tensor(name, x.astype(np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(x.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def llama_file(tmp_path):
    rng = np.random.default_rng(0)
    t = {
        "token_embd.weight": (rng.standard_normal((16, 64)), Q.F32),         # not a block linear
        "blk.0.attn_norm.weight": (rng.standard_normal(64), Q.F32),          # 1-D: not a block linear
        "blk.0.attn_q.weight": (rng.standard_normal((64, 64)), Q.Q8_0),      # 64 x 64 = 4096 weights
        "blk.0.attn_k.weight": (rng.standard_normal((32, 64)), Q.Q4_0),      # 2048
        "blk.0.attn_v.weight": (rng.standard_normal((32, 64)), Q.Q8_0),      # 2048
        "blk.0.ffn_down.weight": (rng.standard_normal((64, 96)), Q.F32),     # 6144
    }
    return _write(tmp_path / "tiny-llama.gguf", "llama", t), t


def test_block_summary_counts_types_and_bytes(llama_file):
    path, _ = llama_file
    s = block_summary(path)
    assert s.tensors == 4
    assert s.numel == 4096 + 2048 + 2048 + 6144
    # Q8_0: 34 bytes per 32 weights; Q4_0: 18 bytes per 32; F32: 4 bytes per weight
    assert s.nbytes == 4096 // 32 * 34 + 2048 // 32 * 18 + 2048 // 32 * 34 + 6144 * 4
    assert s.bits_per_weight == pytest.approx(8 * s.nbytes / s.numel)
    assert {k: dict(c) for k, c in s.types.items()} == {"q": {"Q8_0": 1}, "k": {"Q4_0": 1}, "v": {"Q8_0": 1},
                                                       "down": {"F32": 1}}
    assert s.types_used() == "q Q8_0; k Q4_0; v Q8_0; down F32"


def test_types_used_shows_counts_when_a_kind_mixes_types():
    from collections import Counter
    s = BlockSummary(types={"down": Counter({"Q6_K": 10, "Q4_K": 20}), "q": Counter({"Q5_0": 30})})
    assert s.types_used() == "q Q5_0; down Q4_K 20, Q6_K 10"


def test_read_block_weights_dequantises_and_unpermutes(llama_file):
    path, t = llama_file
    w = read_block_weights(path)
    assert sorted(w) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert torch.equal(w["model.layers.0.mlp.down_proj"], torch.from_numpy(t["blk.0.ffn_down.weight"][0]).float())
    v = torch.from_numpy(t["blk.0.attn_v.weight"][0]).float()
    assert w["model.layers.0.self_attn.v_proj"].shape == (32, 64)
    assert (w["model.layers.0.self_attn.v_proj"] - v).abs().max() < 0.05          # Q8_0 rounding only
    x = t["blk.0.attn_q.weight"][0].astype(np.float32)
    stored = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0).copy())
    got = w["model.layers.0.self_attn.q_proj"]
    assert torch.equal(got, unpermute_rotary(stored, 2))     # Q rows come back in transformers' order
    assert not torch.equal(got, stored)


def test_bert_names(tmp_path):
    rng = np.random.default_rng(1)
    path = _write(tmp_path / "tiny-bert.gguf", "bert", {
        "blk.1.attn_q.weight": (rng.standard_normal((32, 32)), Q.Q8_0),
        "blk.1.attn_output.weight": (rng.standard_normal((32, 32)), Q.Q4_0),
        "blk.1.ffn_up.weight": (rng.standard_normal((64, 32)), Q.Q4_0),
        "blk.1.attn_q.bias": (rng.standard_normal(32), Q.F32),
        "token_embd.weight": (rng.standard_normal((10, 32)), Q.F32),
    })
    s = block_summary(path)
    assert s.types_used() == "q Q8_0; o Q4_0; up Q4_0"
    assert sorted(read_block_weights(path)) == ["encoder.layer.1.attention.output.dense",
                                                "encoder.layer.1.attention.self.query",
                                                "encoder.layer.1.intermediate.dense"]
    assert block_name("blk.0.ffn_down.weight", "bert") == "encoder.layer.0.output.dense"
    assert block_name("blk.0.ffn_down.bias", "bert") is None
    assert block_name("model.layers.2.mlp.gate_proj.weight", "llama") == "model.layers.2.mlp.gate_proj"
    assert block_name("model.embed_tokens.weight", "llama") is None
    with pytest.raises(ValueError, match="llama"):
        block_name("blk.0.x.weight", "gpt2")


def test_no_block_weights_is_an_error(tmp_path):
    path = _write(tmp_path / "empty.gguf", "llama", {"token_embd.weight": (np.ones((4, 32)), Q.F32)})
    with pytest.raises(ValueError, match="no block linear"):
        block_summary(path)


def test_missing_build_says_run_make_peers(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `make peers`"):
        tool("llama-quantize", tmp_path)
    with pytest.raises(FileNotFoundError, match="run `make peers`"):
        llamacpp.source_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="run `make peers`"):
        llamacpp.quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q4_0", peers_dir=tmp_path)
    with pytest.raises(ValueError, match="make peers"):
        tool("llama-server", tmp_path)


@pytest.mark.skipif(not (llamacpp.PEERS_DIR / "bin" / "llama-quantize").exists(),
                    reason="llama.cpp tools not built: run `make peers` (bench-only)")
def test_quantize_a_tiny_file_with_the_real_tool(tmp_path):
    rng = np.random.default_rng(2)
    f32 = _write(tmp_path / "f32.gguf", "llama", {
        "token_embd.weight": (rng.standard_normal((32, 64)), Q.F32),
        "output_norm.weight": (np.ones(64), Q.F32),
        "blk.0.attn_norm.weight": (np.ones(64), Q.F32),
        "blk.0.ffn_norm.weight": (np.ones(64), Q.F32),
        "blk.0.attn_q.weight": (rng.standard_normal((64, 64)), Q.F32),
        "blk.0.attn_k.weight": (rng.standard_normal((32, 64)), Q.F32),
        "blk.0.attn_v.weight": (rng.standard_normal((32, 64)), Q.F32),
        "blk.0.attn_output.weight": (rng.standard_normal((64, 64)), Q.F32),
        "blk.0.ffn_gate.weight": (rng.standard_normal((128, 64)), Q.F32),
        "blk.0.ffn_up.weight": (rng.standard_normal((128, 64)), Q.F32),
        "blk.0.ffn_down.weight": (rng.standard_normal((64, 128)), Q.F32),
    })
    out = llamacpp.quantize(f32, tmp_path / "q.gguf", "Q4_0")
    s = block_summary(out)
    assert s.tensors == 7 and set().union(*s.types.values()) <= {"Q4_0", "Q4_1", "Q5_0", "Q6_K", "Q8_0"}
    assert 4.5 <= s.bits_per_weight < 8.5


def test_bench_peers_without_the_build_exits_with_the_fix(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "bench" / "peers.py"), "--model", "minilm-l6"],
                         capture_output=True, text=True, env=dict(os.environ, SLC_PEERS_DIR=str(tmp_path)), timeout=300)
    assert res.returncode == 1 and "run `make peers`" in res.stderr, res.stderr[-2000:]

"""slc.synthetic: Llama-shaped checkpoints transformers accepts; deterministic, cached, with the stated statistics."""
import json
import math
import time

import pytest
import torch

from slc.sources import open_checkpoint
from slc.synthetic import (MARKER, SHAPES, LlamaShape, SyntheticStats, as_shape, generate_tensor,
                           write_synthetic_checkpoint)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("syn") / "tiny", "tiny", progress=False)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_names_and_shapes_match_transformers_meta_model(tmp_path, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = SHAPES[name]
    (tmp_path / "config.json").write_text(json.dumps(shape.config()))
    cfg = AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    sd = model.state_dict()
    assert [n for n, _ in shape.tensors()] == list(sd)                  # same names, same order
    assert all(tuple(sd[n].shape) == s for n, s in shape.tensors())
    assert shape.n_params == sum(p.numel() for p in model.parameters())


def test_published_sizes():
    assert round(SHAPES["tinyllama-1.1b"].n_params / 1e9, 2) == 1.10
    assert round(SHAPES["llama-2-7b"].n_params / 1e9, 2) == 6.74                 # 13.5 GB of bf16
    assert SHAPES["llama-2-7b"].n_params * 2 / 1e9 == pytest.approx(13.48, abs=0.01)


def test_tiny_checkpoint_reads_back_and_is_fast(tmp_path, tiny):
    t0 = time.perf_counter()
    write_synthetic_checkpoint(tmp_path / "again", "tiny", progress=False, seed=1)
    assert time.perf_counter() - t0 < 5                                   # typically 0.2-0.4 s
    ckpt = open_checkpoint(tiny)
    assert ckpt.config["num_hidden_layers"] == 2 and ckpt.config["architectures"] == ["LlamaForCausalLM"]
    assert [(i.name, i.shape) for i in ckpt] == SHAPES["tiny"].tensors()
    assert all(i.dtype == torch.bfloat16 for i in ckpt)
    assert ckpt.nbytes == 2 * SHAPES["tiny"].n_params


def test_shards_index_and_determinism(tmp_path, tiny):
    sharded = write_synthetic_checkpoint(tmp_path / "sharded", "tiny", shard_bytes=1e6, progress=False)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert index["metadata"]["total_size"] == 2 * SHAPES["tiny"].n_params
    a, b = open_checkpoint(tiny), open_checkpoint(sharded)
    for info in a:                                        # the bytes do not depend on the sharding
        assert torch.equal(a.read(info.name), b.read(info.name)), info.name
    other = open_checkpoint(write_synthetic_checkpoint(tmp_path / "seed1", "tiny", seed=1, progress=False))
    assert not torch.equal(a.read("model.layers.0.mlp.up_proj.weight"), other.read("model.layers.0.mlp.up_proj.weight"))
    # one tensor on its own equals the same tensor inside a checkpoint (order-independent)
    alone = torch.cat(list(generate_tensor("model.layers.1.mlp.down_proj.weight", (256, 688))))
    assert torch.equal(alone, a.read("model.layers.1.mlp.down_proj.weight"))


def test_cache(tmp_path):
    folder = write_synthetic_checkpoint(tmp_path / "c", "tiny", progress=False)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert write_synthetic_checkpoint(tmp_path / "c", "tiny", progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp     # not rewritten
    write_synthetic_checkpoint(tmp_path / "c", "tiny", seed=3, progress=False)
    assert json.loads((folder / MARKER).read_text())["seed"] == 3          # other settings: rebuilt
    assert not list(tmp_path.glob(".*partial"))
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a synthetic checkpoint"):
        write_synthetic_checkpoint(tmp_path / "user", "tiny", progress=False)


def test_custom_shapes_and_bad_ones(tmp_path):
    custom = dict(layers=1, hidden=64, intermediate=96, heads=4, kv_heads=1, vocab=100, tied=True)
    ckpt = open_checkpoint(write_synthetic_checkpoint(tmp_path / "c", custom, dtype=torch.float16, progress=False))
    assert "lm_head.weight" not in ckpt and ckpt.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (16, 64)
    assert ckpt.read("model.norm.weight").dtype == torch.float16 and ckpt.config["tie_word_embeddings"] is True
    assert as_shape(LlamaShape(**custom)) == as_shape(custom)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        as_shape(dict(custom, kv_heads=3))
    with pytest.raises(ValueError, match="unknown shape"):
        as_shape("70b")
    with pytest.raises(ValueError, match="dtype"):
        write_synthetic_checkpoint(tmp_path / "d", "tiny", dtype=torch.int8, progress=False)


def test_statistics(tiny):
    """The stated statistics, on the tiny shape (256-wide rows: loose bounds for sampling error)."""
    stats = SyntheticStats()
    ckpt = open_checkpoint(tiny)
    outlier_sets = {}
    for info, w in ckpt.stream(dtype=torch.float32):
        if w.dim() == 1:
            assert abs(w.mean().item() - 1) < 0.05 and abs(w.std().item() - stats.norm_sd) < 0.03, info.name
            continue
        col_rms = w.pow(2).mean(0).sqrt()
        outliers = col_rms > 3 * col_rms.median()
        assert 1 <= outliers.sum() <= max(2, 0.01 * w.shape[1]), info.name
        if info.shape[1] == 256 and "o_proj" not in info.name:
            outlier_sets[info.name] = tuple(outliers.nonzero().flatten().tolist())
        body = w[:, ~outliers]
        rms = body.pow(2).mean(1).sqrt()
        kind = next(k for key, k in [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"),
                                     ("gate", "gate"), ("up", "up"), ("down", "down"), ("embed", "embed"),
                                     ("lm_head", "head")] if key in info.name)
        # spread of log row RMS: the drawn one plus the sampling spread of an RMS over ~256 t_12 draws
        expected = math.hypot(stats.row_log_sd[kind], 0.06 * math.sqrt(256 / body.shape[1]))
        assert abs(rms.log().std().item() - expected) < 0.25 * expected + 0.02, (info.name, rms.log().std())
        x = body / rms[:, None]
        assert 3.3 < x.pow(4).mean().item() < 4.6, info.name                # t_12: kurtosis 3.75
    # the layers that read the residual stream share their outlier channels
    assert len(set(outlier_sets.values())) == 1, outlier_sets

"""compress_checkpoint: the same file as save_compressed(compress_model(...)), streamed, resumable, on Dask."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import slc.streaming as streaming
from slc import FormatError, LinearSpec, Quantizer, compress_model, load_compressed, save_compressed
from slc.integrity import temp_files
from slc.streaming import compress_checkpoint, journal_path, layer_statistics, write_safetensors
from slc.synthetic import LlamaShape, write_synthetic_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = LlamaShape(layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=128, max_positions=64)
TIED = LlamaShape(layers=1, hidden=64, intermediate=96, heads=4, kv_heads=1, vocab=100, max_positions=64, tied=True)
LONG = LlamaShape(layers=6, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=128, max_positions=64)

POLICIES = {
    "int8": LinearSpec(),
    "int8+rANS": LinearSpec("entropy"),
    "ecsq 0.2": LinearSpec("entropy", Quantizer(mode="ecsq", step=0.2)),
    "int4 g32": LinearSpec("quantized", Quantizer(bits=4, granularity="group", group_size=32)),
    "lowrank": LinearSpec("lowrank", rank=8),
    "patterns": {"*mlp.down_proj": None, "*mlp*": LinearSpec("entropy"), "*": LinearSpec()},
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ck") / "small", SMALL, shard_bytes=40_000,
                                      progress=False)


def reference(src, policy, path, dtype=None, embeddings=None):
    """What the whole-model path writes: from_pretrained, compress_model, save_compressed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src) if dtype is None else \
        AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_model(model, policy, progress=False, embeddings=embeddings)
    return save_compressed(model, path)


@pytest.mark.parametrize("name", list(POLICIES))
def test_same_bytes_as_save_compressed(small, tmp_path, name):
    ref = reference(small, POLICIES[name], tmp_path / "ref.slc")
    report = compress_checkpoint(small, tmp_path / "out.slc", POLICIES[name], progress=False)
    assert (tmp_path / "out.slc").read_bytes() == ref.read_bytes()
    assert not journal_path(tmp_path / "out.slc").exists() and not temp_files(tmp_path / "out.slc")
    assert report.tensors == 2 * 9 + 3                   # embedding, 2 x (7 linear + 2 norms), norm, lm_head
    assert report.reused == 0 and report.bytes_out == ref.stat().st_size
    model = load_compressed(tmp_path / "out.slc")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, SMALL.vocab)


def test_tied_embeddings_and_fp32_dtype(tmp_path):
    src = write_synthetic_checkpoint(tmp_path / "tied", TIED, progress=False)
    ref = reference(src, LinearSpec("entropy"), tmp_path / "ref.slc", dtype=torch.float32)
    compress_checkpoint(src, tmp_path / "out.slc", LinearSpec("entropy"), dtype=torch.float32, progress=False)
    assert (tmp_path / "out.slc").read_bytes() == ref.read_bytes()
    model = load_compressed(tmp_path / "out.slc")
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float32


EMBEDDINGS = [LinearSpec("quantized"), LinearSpec("quantized", Quantizer(bits=4, granularity="group", group_size=32))]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("emb", EMBEDDINGS, ids=["int8", "int4 g32"])
def test_compressed_embeddings_same_bytes_as_save_compressed(small, tmp_path, tied, emb):
    src = write_synthetic_checkpoint(tmp_path / "tied", TIED, progress=False) if tied else small
    ref = reference(src, LinearSpec("entropy"), tmp_path / "ref.slc", embeddings=emb)
    report = compress_checkpoint(src, tmp_path / "out.slc", LinearSpec("entropy"), embeddings=emb, progress=False)
    assert (tmp_path / "out.slc").read_bytes() == ref.read_bytes()
    assert [r.kind for r in report.rows].count("embedding") == 1
    assert (("lm_head", "tied to the compressed input embedding") in report.skipped) == tied
    model = load_compressed(tmp_path / "out.slc")
    assert type(model.model.embed_tokens).__name__ == "CompressedEmbedding"
    assert type(model.lm_head).__name__ == ("TiedLinear" if tied else "Linear")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)


def test_compressed_embeddings_need_a_quantized_spec(small, tmp_path):
    with pytest.raises(ValueError, match="model.embed_tokens: embeddings take a LinearSpec of kind 'quantized'"):
        compress_checkpoint(small, tmp_path / "out.slc", LinearSpec(), embeddings=LinearSpec("entropy"),
                            progress=False)
    assert not (tmp_path / "out.slc").exists()


def test_write_safetensors_equals_save_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.x": torch.randint(-128, 127, (3, 5), generator=g, dtype=torch.int8),
               "a": torch.randn(4, 4, generator=g), "c": torch.randn(7, generator=g).bfloat16(),
               "d": torch.arange(3, dtype=torch.int32), "e": torch.ones(1, dtype=torch.uint8),
               "f": torch.randn(2, 3, generator=g).half(), "g": torch.arange(2), "h": torch.zeros(0),
               "i": torch.tensor([True]), "j": torch.randn(3, generator=g).double()}
    for meta in (None, {"slc": '{"x": "\\u00e9 \\" q"}'}):
        save_file(tensors, tmp_path / "a.safetensors", metadata=meta)
        write_safetensors(tmp_path / "b.safetensors", tensors, meta)
        assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


# --- interruptions -----------------------------------------------------------------------------------------

def test_sigkill_then_resume_is_byte_identical(tmp_path):
    src = write_synthetic_checkpoint(tmp_path / "long", LONG, progress=False)
    spec = LinearSpec("entropy")
    compress_checkpoint(src, tmp_path / "whole.slc", spec, progress=False)
    dst = tmp_path / "killed.slc"
    script = textwrap.dedent(f"""
        import time, slc.streaming as s
        from slc import LinearSpec
        slow = s.compress_unit
        s.compress_unit = lambda *a, **k: (time.sleep(0.15), slow(*a, **k))[1]
        s.compress_checkpoint({str(src)!r}, {str(dst)!r}, LinearSpec("entropy"), progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    journal = journal_path(dst)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_dir() and len(list(journal.glob("*.safetensors"))) >= 8:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(journal.glob("*.safetensors")))
    assert not dst.exists() and 8 <= done < 6 * 9 + 3
    report = compress_checkpoint(src, dst, spec, progress=False)
    assert report.reused >= 8
    assert dst.read_bytes() == (tmp_path / "whole.slc").read_bytes()
    assert not journal.exists() and not temp_files(dst) and sorted(p.name for p in tmp_path.iterdir()) == \
        ["killed.slc", "long", "whole.slc"]


@pytest.mark.parametrize("when", [3, 10_000])        # during the parts; during assembly (after every part)
def test_disk_full_keeps_the_journal_and_writes_nothing(small, tmp_path, monkeypatch, when):
    whole = compress_checkpoint(small, tmp_path / "whole.slc", LinearSpec("entropy"), progress=False)
    n_parts = whole.tensors
    calls = {"n": 0}
    real = streaming.write_all

    def full(f, data):
        calls["n"] += 1
        limit = when if when < 10_000 else n_parts * 3 + 2     # parts take 1 + their tensors' writes
        if calls["n"] > limit and (when < 10_000 or Path(f.name).name == "out.slc"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(streaming, "write_all", full)
    dst = tmp_path / "out.slc"
    with pytest.raises(OSError, match=r"out.slc: the disk filled up .* journal .* finished parts.*resume=True") as e:
        compress_checkpoint(small, dst, LinearSpec("entropy"), progress=False)
    assert e.value.errno == errno.ENOSPC
    assert not dst.exists() and not temp_files(dst) and journal_path(dst).is_dir()
    monkeypatch.setattr(streaming, "write_all", real)
    again = compress_checkpoint(small, dst, LinearSpec("entropy"), progress=False)
    assert again.reused >= (1 if when < 10_000 else n_parts)
    assert dst.read_bytes() == (tmp_path / "whole.slc").read_bytes()


def test_corrupt_or_stale_parts_are_redone(small, tmp_path):
    spec = LinearSpec("entropy")
    compress_checkpoint(small, tmp_path / "ref.slc", spec, progress=False)
    dst = tmp_path / "out.slc"
    journal = journal_path(dst)

    def half_run(policy):                   # stop after 5 parts: an exception in the 6th
        real, n = streaming.compress_unit, {"k": 0}

        def unit(*a, **k):
            n["k"] += 1
            if n["k"] > 5:
                raise KeyboardInterrupt
            return real(*a, **k)
        streaming.compress_unit = unit
        try:
            with pytest.raises(KeyboardInterrupt):
                compress_checkpoint(small, dst, policy, progress=False)
        finally:
            streaming.compress_unit = real

    half_run(spec)
    parts = sorted(journal.glob("*.safetensors"))
    assert len(parts) == 5 and not dst.exists()
    blob = bytearray(parts[0].read_bytes())
    blob[-1] ^= 1                                        # bit rot in one part's last tensor
    parts[0].write_bytes(bytes(blob))
    report = compress_checkpoint(small, dst, spec, progress=False)
    assert report.reused == 4 and dst.read_bytes() == (tmp_path / "ref.slc").read_bytes()
    dst.unlink()
    half_run(LinearSpec())                               # parts of another policy: embedding, q, k, v, o
    report = compress_checkpoint(small, dst, spec, progress=False)
    assert report.reused == 1                            # only the embedding, kept as it is by both
    assert dst.read_bytes() == (tmp_path / "ref.slc").read_bytes()
    dst.unlink()
    half_run(spec)
    assert compress_checkpoint(small, dst, spec, resume=False, progress=False).reused == 0


# --- bad input ---------------------------------------------------------------------------------------------

def test_bad_input(small, tmp_path):
    with pytest.raises(ValueError, match=r"selects no linear layer .* look like 'model.layers.0.self_attn.q_proj'"):
        compress_checkpoint(small, tmp_path / "o.slc", {"*attention*": LinearSpec()}, progress=False)
    with pytest.warns(UserWarning, match=r"matched no layer: \['\*nothing\*'\]"):
        compress_checkpoint(small, tmp_path / "o.slc", {"*nothing*": None, "*": LinearSpec()}, progress=False)
    with pytest.raises(TypeError, match="policy must be a LinearSpec"):
        compress_checkpoint(small, tmp_path / "o.slc", "int8", progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        compress_checkpoint(tmp_path / "nowhere", tmp_path / "o.slc", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in small.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])          # truncated shard
    with pytest.raises(FormatError, match=rf"{shard.name}: .*"):
        compress_checkpoint(broken, tmp_path / "b.slc", progress=False)
    assert not (tmp_path / "b.slc").exists()
    lone = tmp_path / "lone.safetensors"
    save_file({"w": torch.zeros(2, 2)}, lone)
    with pytest.raises(ValueError, match="no config.json"):
        compress_checkpoint(lone, tmp_path / "l.slc", progress=False)


def test_layer_statistics(small):
    rows = list(layer_statistics(small, spectrum_rows=32, spectrum_points=8))
    assert [r["kind"] for r in rows][:3] == ["q", "k", "v"]
    assert len(rows) == 2 * 7
    for r in rows:
        assert 0 < r["entropy_bits"] <= r["bits_per_weight"] < 8.6
        assert 0 <= r["outlier_share"] < 0.05 and 0 < r["top_energy"] <= 1
        assert len(r["spectrum"]) == 8 and r["spectrum"][0] == 1.0
        assert all(a >= b for a, b in zip(r["spectrum"], r["spectrum"][1:], strict=False))


# --- Dask --------------------------------------------------------------------------------------------------

def test_two_worker_local_cluster_gives_the_same_bytes(small, tmp_path):
    from dask.distributed import Client, LocalCluster

    spec = {"*mlp*": LinearSpec("entropy", Quantizer(mode="ecsq", step=0.2)), "*": LinearSpec("entropy")}
    compress_checkpoint(small, tmp_path / "serial.slc", spec, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        report = compress_checkpoint(small, tmp_path / "dask.slc", spec, client=client, progress=False)
        assert report.workers == 2
        report = compress_checkpoint(small, tmp_path / "addr.slc", spec, client=cluster.scheduler_address,
                                     progress=False)
    assert (tmp_path / "dask.slc").read_bytes() == (tmp_path / "serial.slc").read_bytes()
    assert (tmp_path / "addr.slc").read_bytes() == (tmp_path / "serial.slc").read_bytes()


# --- the real SmolLM2, from its folder and from its original GGUF file ----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_smollm2_same_file_as_save_compressed(tmp_path_factory, source):
    from slc.models import GGUF_FILE, load, model_dir

    folder = model_dir("smollm2-135m")
    if not (folder / ("original-" + GGUF_FILE)).exists():
        pytest.skip("SmolLM2 not fetched (run `make models`)")
    spec = {"*mlp*": LinearSpec("entropy", Quantizer(mode="ecsq", step=0.2)), "*": LinearSpec("entropy")}
    tmp = tmp_path_factory.mktemp("smol")
    model, _ = load("smollm2-135m")
    compress_model(model, spec, progress=False)
    ref = save_compressed(model, tmp / "ref.slc")
    src = folder if source == "folder" else folder / ("original-" + GGUF_FILE)
    report = compress_checkpoint(src, tmp / "out.slc", spec, progress=False)
    assert (tmp / "out.slc").read_bytes() == ref.read_bytes()
    assert len(report.rows) == 30 * 7


# --- the loader's budget (slc.checkpoint.load_compressed) ----------------------------------------------------

def test_load_compressed_refuses_a_file_over_budget(small, tmp_path):
    import json
    import struct

    path = compress_checkpoint(small, tmp_path / "m.slc", LinearSpec("entropy"), progress=False).path
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    need = len(raw) - 8 - n + 4 * 96 * 64                # tensors + the largest layer as fp32
    assert load_compressed(path, max_bytes=need) is not None
    with pytest.raises(FormatError, match=r"m.slc: loading would take .* over the budget"):
        load_compressed(path, max_bytes=need - 1)
    # a tiny hostile file: its metadata declares a 2^31-weight layer (and nothing is allocated to refuse it)
    head = json.loads(raw[8:8 + n])
    meta = json.loads(head["__metadata__"]["slc"])
    layer = meta["layers"]["model.layers.0.mlp.up_proj"]
    layer["out_features"], layer["in_features"] = 2**16, 2**15
    head["__metadata__"]["slc"] = json.dumps(meta)
    blob = json.dumps(head).encode()
    blob += b" " * (-len(blob) % 8)
    (tmp_path / "h.slc").write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(FormatError, match=r"h.slc: loading would take 8.0\d GiB"):
        load_compressed(tmp_path / "h.slc", max_bytes=2**31)
    # a header declaring a 2^31-weight tensor in a small file
    head = json.loads(raw[8:8 + n])
    head["model.norm.weight"]["shape"] = [2**31]
    blob = json.dumps(head).encode()
    (tmp_path / "t.slc").write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(FormatError, match=r"t.slc.*(invalid shape|declares shape)"):
        load_compressed(tmp_path / "t.slc")


def test_read_layer_alone(small, tmp_path):
    from slc.streaming import read_layer

    path = compress_checkpoint(small, tmp_path / "m.slc", LinearSpec("entropy"), progress=False).path
    model = load_compressed(path)
    layer = read_layer(path, "model.layers.1.mlp.up_proj")
    assert torch.equal(layer.weight_dense(), model.model.layers[1].mlp.up_proj.weight_dense())
    with pytest.raises(KeyError, match="no compressed layer 'model.embed_tokens'"):
        read_layer(path, "model.embed_tokens")


def test_a_live_run_holds_the_journal(small, tmp_path):
    dst = tmp_path / "o.slc"
    journal = journal_path(dst)
    journal.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (journal / "lock").write_text(str(sleeper.pid))
        with pytest.raises(RuntimeError, match=rf"another compress_checkpoint \(pid {sleeper.pid}\)"):
            compress_checkpoint(small, dst, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    compress_checkpoint(small, dst, progress=False)      # the holder is gone: its lock is taken over
    assert dst.exists() and not journal.exists()

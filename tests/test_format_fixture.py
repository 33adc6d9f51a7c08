"""Files written by an earlier slc still load, and load + save gives back the very same bytes.

The fixtures in tests/fixtures/ were written once by tests/fixtures/make_fixtures.py with slc at
commit 6cab49e, before the modules were re-layered (issue 10). They are committed: nothing here
regenerates them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slc import CompressedTensor, load_compressed, save_compressed

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODEL = FIXTURES / "tiny_llama_v1.slc.safetensors"
STREAMS = sorted(FIXTURES.glob("tensor_*.slct"))


def _tensors_and_meta(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["slc"])
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def test_fixture_model_loads_and_predicts_as_when_written():
    model = load_compressed(MODEL)
    kinds = sorted({type(m).__name__ for m in model.modules() if "Compressed" in type(m).__name__ or
                    type(m).__name__ == "TiedLinear"})
    assert kinds == ["CompressedEmbedding", "CompressedLinear", "TiedLinear"]
    ref = json.loads((FIXTURES / "tiny_llama_v1.logits.json").read_text())
    with torch.inference_mode():
        logits = model(torch.tensor(ref["ids"])).logits[0, -4:]
    torch.testing.assert_close(logits, torch.tensor(ref["last4"]), rtol=1e-4, atol=1e-4)


def test_fixture_model_saves_back_to_the_same_tensors_and_metadata(tmp_path):
    out = save_compressed(load_compressed(MODEL), tmp_path / "again.slc.safetensors")
    old_t, old_m = _tensors_and_meta(MODEL)
    new_t, new_m = _tensors_and_meta(out)
    assert new_m == old_m
    assert sorted(new_t) == sorted(old_t)
    for k, t in old_t.items():
        assert new_t[k].dtype == t.dtype and torch.equal(new_t[k], t), k


@pytest.mark.parametrize("path", STREAMS, ids=[p.stem for p in STREAMS])
def test_fixture_tensor_bytes_round_trip_exactly(path):
    data = path.read_bytes()
    ct = CompressedTensor.from_bytes(data)
    assert ct.to_bytes() == data
    assert torch.isfinite(ct.decompress().float()).all()


def test_fixture_streams_cover_every_tensor_format_version():
    versions = sorted(p.read_bytes()[4] for p in STREAMS)
    assert versions == [1, 2, 3]
    ecsq = CompressedTensor.from_bytes((FIXTURES / "tensor_ecsq_v2.slct").read_bytes())
    assert ecsq.meta["n_escapes"] > 0                      # the escape path is in the fixture

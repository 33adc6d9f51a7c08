"""The `slc` command line, end to end on the real MiniLM (compress -> inspect -> eval) and on bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest

from slc import load_compressed
from slc.cli import layer_rows, main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mini_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "mini.slc"
    assert main(["compress", "minilm-l6", "-o", str(out), "--ecsq", "0.3", "-q"]) == 0
    return out


def test_compress_writes_a_file_that_loads(mini_file, capsys):
    rows = layer_rows(mini_file)
    assert len(rows) == 37 and all(r["checksum"] == "ok" and r["kind"] == "entropy" for r in rows)
    assert all(3.0 < r["bits/weight"] < 5.0 for r in rows)
    assert sum(type(m).__name__ == "CompressedLinear" for m in load_compressed(mini_file).modules()) == 37


def test_inspect_prints_every_layer(mini_file, capsys):
    assert main(["inspect", str(mini_file)]) == 0
    out = capsys.readouterr().out
    assert "BertModel, 37 compressed layers" in out and out.count("ecsq step 0.3") == 37 and "total:" in out


def test_inspect_fails_on_a_flipped_byte(mini_file, tmp_path, capsys):
    data = bytearray(mini_file.read_bytes())
    data[-100] ^= 0xFF                                          # inside the last tensor's bytes
    bad = tmp_path / "bad.slc"
    bad.write_bytes(bytes(data))
    assert main(["inspect", str(bad)]) == 2
    assert "checksum" in capsys.readouterr().err


def test_eval_encoder_reports_embedding_cosine(mini_file, tmp_path, capsys):
    text = tmp_path / "s.txt"
    text.write_text("The cat sat on the mat.\nInterest rates rose again.\nThe server restarted at noon.\n")
    assert main(["eval", str(mini_file), "--text", str(text)]) == 0
    out = capsys.readouterr().out
    cos = float(out.split('"embedding_cosine":')[1].split(",")[0])
    assert 0.95 < cos < 1.0 and '"sentences": 3' in out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "does-not-exist.slc"], "does not exist"),
    (["compress", "no-such-model", "-o", "x.slc"], "neither an offline model"),
    (["eval", "does-not-exist.slc"], "does not exist"),
])
def test_user_errors_are_one_line_and_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_existing_output_needs_force(mini_file, capsys):
    assert main(["compress", "minilm-l6", "-o", str(mini_file), "--ecsq", "0.3", "-q"]) == 2
    assert "--force" in capsys.readouterr().err


def test_not_a_safetensors_file(tmp_path, capsys):
    bad = tmp_path / "junk.slc"
    bad.write_bytes(b"not a model at all")
    assert main(["inspect", str(bad)]) == 2
    assert "safetensors" in capsys.readouterr().err


def test_python_dash_m_and_help_show_examples():
    res = subprocess.run([sys.executable, "-m", "slc", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "slc compress smollm2-135m" in res.stdout
    res = subprocess.run([sys.executable, "-m", "slc", "compress", "--int8"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "usage:" in res.stderr

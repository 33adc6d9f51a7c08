"""slc.sources: checkpoints read from disk one tensor at a time; every malformed input is a FormatError."""
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from slc.errors import FormatError
from slc.sources import TensorInfo, gguf_to_hf_name, open_checkpoint, unpermute_rotary

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tensors(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape in
            [("model.embed_tokens.weight", (16, 8)), ("model.layers.0.mlp.up_proj.weight", (12, 8)),
             ("model.layers.0.input_layernorm.weight", (8,)), ("model.norm.weight", (8,))]}


def write_sharded(folder, sd, n_shards=2):
    """A HF-style sharded folder: model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: sd[n] for n in names[i::n_shards]}
        save_file(part, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    return folder


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_file_round_trip(tmp_path, dtype):
    sd = tensors(dtype)
    save_file(sd, tmp_path / "w.safetensors")
    with open_checkpoint(tmp_path / "w.safetensors") as ckpt:
        assert len(ckpt) == len(sd) and set(ckpt.tensors) == set(sd) and ckpt.format == "safetensors"
        for info in ckpt:
            assert isinstance(info, TensorInfo) and info.dtype == dtype and info.shape == tuple(sd[info.name].shape)
            assert info.nbytes == sd[info.name].numel() * dtype.itemsize
            assert torch.equal(ckpt.read(info.name), sd[info.name])
            assert torch.equal(ckpt.read(info.name, dtype=torch.float32), sd[info.name].float())
        offsets = [t.offset for t in ckpt]
        assert offsets == sorted(offsets)                       # read order is file order
        assert ckpt.config is None and ckpt.nbytes == sum(v.numel() * dtype.itemsize for v in sd.values())


@pytest.mark.parametrize("which", ["folder", "index"])
def test_sharded_folder(tmp_path, which):
    sd = tensors(torch.bfloat16)
    folder = write_sharded(tmp_path / "m", sd, n_shards=3)
    ckpt = open_checkpoint(folder if which == "folder" else folder / "model.safetensors.index.json")
    assert set(ckpt.tensors) == set(sd) and ckpt.config == {"model_type": "llama", "hidden_size": 8}
    assert len({t.file for t in ckpt}) == 3
    for info, t in ckpt.stream():
        assert torch.equal(t, sd[info.name])
    clone = pickle.loads(pickle.dumps(ckpt))                   # workers get a copy of the listing, not the data
    assert torch.equal(clone.read("model.norm.weight"), sd["model.norm.weight"])
    assert ckpt.largest.name == "model.embed_tokens.weight"


def test_folder_with_single_model_file(tmp_path):
    save_file(tensors(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    ckpt = open_checkpoint(tmp_path)
    assert len(ckpt) == 4 and ckpt.config == {"hidden_size": 8}
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        ckpt.read("nope")


def test_missing_shard(tmp_path):
    folder = write_sharded(tmp_path / "m", tensors(), n_shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match=r"model-00002-of-00002.safetensors is missing.*tensor 'model\."):
        open_checkpoint(folder)


def test_index_names_a_tensor_no_shard_has(tmp_path):
    folder = write_sharded(tmp_path / "m", tensors(), n_shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match=r"00001-of-00002.safetensors: the index names tensor "
                                          r"'model.layers.0.self_attn.q_proj.weight'"):
        open_checkpoint(folder)


def test_index_that_is_not_an_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(FormatError, match="not a safetensors index"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 8, 20])
def test_truncated_safetensors_header(tmp_path, keep):
    save_file(tensors(), tmp_path / "w.safetensors")
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(raw[:keep])
    with pytest.raises(FormatError, match=r"w.safetensors: truncated safetensors header"):
        open_checkpoint(tmp_path / "w.safetensors")


def test_offsets_past_the_end_of_the_file(tmp_path):
    save_file(tensors(), tmp_path / "w.safetensors")
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(raw[:-10])          # header intact, data cut short
    with pytest.raises(FormatError, match=r"w.safetensors: tensor '.+' runs past the end of the file"):
        open_checkpoint(tmp_path / "w.safetensors")


def raw_safetensors(path, header: dict, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_hostile_huge_tensor_is_refused_before_allocation(tmp_path):
    # 2^31 fp32 weights (8 GiB) declared in a 100-byte file: refused from the header alone.
    raw_safetensors(tmp_path / "h.safetensors", {"w": {"dtype": "F32", "shape": [2**31], "data_offsets": [0, 2**33]}})
    with pytest.raises(FormatError, match=r"h.safetensors: tensor 'w' runs past the end"):
        open_checkpoint(tmp_path / "h.safetensors", max_bytes=2**40)
    # offsets that disagree with the shape, a negative dimension, an unknown dtype: all refused by name
    for entry, why in [({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, "declares shape"),
                       ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "declares shape"),
                       ({"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}, "unsupported dtype")]:
        raw_safetensors(tmp_path / "h.safetensors", {"w": entry}, b"\0" * 16)
        with pytest.raises(FormatError, match=f"tensor 'w'.*{why}"):
            open_checkpoint(tmp_path / "h.safetensors")
    # two tensors aliasing the same bytes, a hole, trailing bytes: the format forbids all three
    a = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    for b, data, why in [([4, 12], 12, "'b' overlaps"), ([12, 20], 20, "'b' leaves a hole of 4 bytes"),
                         ([8, 16], 20, "4 bytes after the last tensor")]:
        raw_safetensors(tmp_path / "h.safetensors", {"a": a, "b": dict(a, data_offsets=b)}, b"\0" * data)
        with pytest.raises(FormatError, match=why):
            open_checkpoint(tmp_path / "h.safetensors")


def test_budget(tmp_path):
    save_file({"big": torch.zeros(1000), "small": torch.zeros(10)}, tmp_path / "w.safetensors")
    with pytest.raises(FormatError, match=r"w.safetensors: tensor 'big' would take .* over the budget"):
        open_checkpoint(tmp_path / "w.safetensors", max_bytes=1000)
    ckpt = open_checkpoint(tmp_path / "w.safetensors", max_bytes=4000)
    assert ckpt.read("big").numel() == 1000
    with pytest.raises(FormatError, match="'big' would take"):            # fp64 doubles the bytes
        ckpt.read("big", dtype=torch.float64)
    assert open_checkpoint(tmp_path / "w.safetensors").max_bytes > 2**20  # default: from available memory


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FormatError, match="notes.txt: not a checkpoint"):
        open_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(FormatError, match="not a checkpoint folder"):
        open_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path / "nowhere")


# --- GGUF ---------------------------------------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows (the inverse of unpermute_rotary)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, tensors: dict, raw: dict | None = None, heads=4, kv_heads=2, hidden=64):
    """A small llama GGUF: `tensors` {gguf name: fp32 array} stored as F32, `raw` {name: (bytes, type)}."""
    from gguf import GGUFWriter

    w = GGUFWriter(path, "llama")
    w.add_architecture()
    w.add_block_count(1)
    w.add_embedding_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    for name, a in tensors.items():
        w.add_tensor(name, a.astype(np.float32))
    for name, (a, qtype) in (raw or {}).items():
        w.add_tensor(name, a, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_names_and_rotary_unpermute(tmp_path):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    q, k, up = (rng.standard_normal(s).astype(np.float32) for s in [(64, 64), (32, 64), (128, 64)])
    up_q4 = quantize(up, GGMLQuantizationType.Q4_0)
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": llama_cpp_permute(q, 4),
                                            "blk.0.attn_k.weight": llama_cpp_permute(k, 2),
                                            "output_norm.weight": np.ones(64)},
                      raw={"blk.0.ffn_up.weight": (up_q4, GGMLQuantizationType.Q4_0)})
    ckpt = open_checkpoint(path)
    assert ckpt.format == "gguf" and set(ckpt.tensors) == {
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight",
        "model.layers.0.mlp.up_proj.weight"}
    assert torch.equal(ckpt.read("model.layers.0.self_attn.q_proj.weight"), torch.from_numpy(q))
    assert torch.equal(ckpt.read("model.layers.0.self_attn.k_proj.weight"), torch.from_numpy(k))
    up_info = ckpt.tensors["model.layers.0.mlp.up_proj.weight"]
    assert up_info.stored == "Q4_0" and up_info.shape == (128, 64) and up_info.dtype == torch.float32
    assert up_info.nbytes == up_q4.nbytes
    assert torch.equal(ckpt.read(up_info.name), torch.from_numpy(dequantize(up_q4, GGMLQuantizationType.Q4_0)))
    assert ckpt.config["num_attention_heads"] == 4 and ckpt.config["num_key_value_heads"] == 2
    assert ckpt.config["tie_word_embeddings"] is True and ckpt.config["model_type"] == "llama"


def test_gguf_name_map():
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf_name("blk.17.ffn_down.weight") == "model.layers.17.mlp.down_proj.weight"
    assert gguf_to_hf_name("blk.2.attn_output.weight") == "model.layers.2.self_attn.o_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_to_hf_name("rope_freqs.weight") == "rope_freqs.weight"          # no HF counterpart: unchanged
    w = torch.arange(48.0).reshape(12, 4)
    assert torch.equal(unpermute_rotary(torch.from_numpy(llama_cpp_permute(w.numpy(), 3)), 3), w)


def test_gguf_type_gguf_cannot_dequantise(tmp_path):
    from gguf import GGMLQuantizationType

    q8k = np.zeros((4, 292), dtype=np.uint8)                 # 4 rows of 256 weights in Q8_K blocks
    path = write_gguf(tmp_path / "m.gguf", {"output_norm.weight": np.ones(64)},
                      raw={"blk.0.ffn_up.weight": (q8k, GGMLQuantizationType.Q8_K)})
    ckpt = open_checkpoint(path)                              # listing works; reading that tensor cannot
    assert ckpt.tensors["model.layers.0.mlp.up_proj.weight"].stored == "Q8_K"
    with pytest.raises(FormatError, match=r"m.gguf: tensor 'model.layers.0.mlp.up_proj.weight' is stored as Q8_K"):
        ckpt.read("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(ckpt.read("model.norm.weight"), torch.ones(64))


def hostile_gguf(path, dims, qtype=0, data=b"\0" * 64, name=b"blk.0.attn_q.weight"):
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)
    info = struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
    info += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", qtype, 0)
    blob = head + info
    path.write_bytes(blob + b"\0" * (-len(blob) % 32) + data)
    return path


def test_gguf_hostile_and_truncated(tmp_path):
    with pytest.raises(FormatError, match=r"h.gguf: tensor 'blk.0.attn_q.weight' declares .* truncated or hostile"):
        open_checkpoint(hostile_gguf(tmp_path / "h.gguf", (2**16, 2**15)), max_bytes=2**40)   # 2^31 weights
    with pytest.raises(FormatError, match="over the budget"):
        open_checkpoint(hostile_gguf(tmp_path / "h.gguf", (4, 4)), max_bytes=32)
    with pytest.raises(FormatError, match="unknown GGML type 99"):
        open_checkpoint(hostile_gguf(tmp_path / "h.gguf", (4, 4), qtype=99))
    with pytest.raises(FormatError, match="declares 7 dimensions"):
        open_checkpoint(hostile_gguf(tmp_path / "h.gguf", (1,) * 7))
    ok = hostile_gguf(tmp_path / "ok.gguf", (4, 4))
    assert open_checkpoint(ok).read("blk.0.attn_q.weight").shape == (4, 4)   # no llama metadata: name kept
    (tmp_path / "cut.gguf").write_bytes(ok.read_bytes()[:30])
    with pytest.raises(FormatError, match=r"cut.gguf: truncated GGUF header"):
        open_checkpoint(tmp_path / "cut.gguf")
    # a metadata array claiming 2^40 strings in a tiny file is refused without looping over it
    blob = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"key" + struct.pack("<IIQ", 9, 8, 2**40)
    (tmp_path / "arr.gguf").write_bytes(blob)
    with pytest.raises(FormatError, match="does not fit the file"):
        open_checkpoint(tmp_path / "arr.gguf")


# --- the real SmolLM2, from both of its files ----------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    from slc.models import GGUF_FILE, model_dir

    folder = model_dir("smollm2-135m")
    if not (folder / ("original-" + GGUF_FILE)).exists():
        pytest.skip("SmolLM2 not fetched (run `make models`)")
    from slc.models import load

    model, _ = load("smollm2-135m")
    return folder, folder / ("original-" + GGUF_FILE), model


@pytest.mark.slow
@pytest.mark.parametrize("source", ["gguf", "folder"])
def test_smollm2_tensors_equal_the_loaded_model(smollm2, source):
    folder, gguf_file, model = smollm2
    sd = model.state_dict()
    ckpt = open_checkpoint(gguf_file if source == "gguf" else folder)
    assert set(ckpt.tensors) == set(sd) - {"lm_head.weight"}           # tied: the head is the embedding
    for info, t in ckpt.stream(dtype=torch.float32):
        assert t.shape == sd[info.name].shape and torch.equal(t, sd[info.name]), info.name
    if source == "gguf":
        hf = model.config
        for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "head_dim", "rms_norm_eps", "tie_word_embeddings",
                    "max_position_embeddings", "bos_token_id", "eos_token_id"]:
            assert ckpt.config[key] == getattr(hf, key), key
        assert ckpt.tensors["model.layers.0.mlp.up_proj.weight"].stored == "Q4_1"

"""slc.distill: the row steps and norm gains of a compressed model tuned against the original, codes fixed."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

import slc.distill as D
from slc import CompressedLinear, LinearSpec, Quantizer, compress_model
from slc.calibrate import token_chunks
from slc.distill import distill, norm_parameters, teacher_sequences
from slc.models import ByteTokenizer, tiny_model
from slc.recipe import DEFAULTS, compress_to_budget

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 30
ECSQ = LinearSpec("entropy", quantizer=Quantizer(mode="ecsq", step=0.6))


_tok = ByteTokenizer()


@pytest.fixture(autouse=True)
def few_teacher_tokens(monkeypatch):
    """The tokens the model writes by default (distill's and the recipe's calibration text's) cut to two
    tiny-model sequences: the paths run, quickly."""
    monkeypatch.setattr(D, "GENERATED", 128)
    for _, recipe in DEFAULTS["causal-lm"]:
        if recipe["written"]:
            monkeypatch.setitem(recipe, "written", 128)


def kl_to(teacher, model, chunks) -> float:
    """Mean KL(teacher || model) of the next-token distributions over the chunks."""
    out = 0.0
    with torch.no_grad():
        for x in chunks:
            out += float(D.distillation_loss(model(x), teacher(x), causal=True))
    return out / len(chunks)


def compressed(spec=ECSQ, seed=0):
    teacher = tiny_model("llama", seed=seed)
    model = copy.deepcopy(teacher)
    compress_model(model, spec, progress=False)
    return teacher, model


def snapshot(model):
    """Every compressed layer's buffers and every norm parameter, cloned."""
    layers = {n: {k: b.clone() for k, b in m.named_buffers()} for n, m in model.named_modules()
              if isinstance(m, CompressedLinear)}
    return layers, {k: p.detach().clone() for k, p in norm_parameters(model).items()}


def test_distill_lowers_the_loss_and_moves_only_scales_and_gains():
    teacher, model = compressed()
    chunks = token_chunks(model, _tok, TEXT, 4_096)
    (layers0, gains0), kl0 = snapshot(model), kl_to(teacher, model, chunks)
    report = distill(model, teacher, _tok, TEXT, epochs=3, lr=3e-3, progress=False, generated=0)
    kl1 = kl_to(teacher, model, chunks)
    assert kl1 < 0.8 * kl0, (kl0, kl1)
    layers1, gains1 = snapshot(model)
    assert report.rows == sum(m.out_features for m in model.modules() if isinstance(m, CompressedLinear))
    assert report.gains == sum(p.numel() for p in gains1.values()) > 0 and report.frozen == 0
    assert len(report.loss) == 3 and report.sequences == len(chunks) and "distilled" in str(report)
    moved = 0
    for n, bufs in layers0.items():
        for k, b in bufs.items():
            if k == "scale":
                moved += not torch.equal(b, layers1[n][k])
                assert (layers1[n][k] > 0).all()
            else:
                assert torch.equal(b, layers1[n][k]), (n, k)           # codes, tables: untouched
    assert moved == len(layers0)
    assert any(not torch.equal(gains0[k], gains1[k]) for k in gains0)
    assert all(type(m) is not D.RowScaled for m in model.modules())  # the stand-ins are gone
    assert all(p.grad is None for p in teacher.parameters())


def test_distilled_model_saves_and_reloads_the_same(tmp_path):
    from slc import load_compressed, save_compressed
    teacher, model = compressed()
    distill(model, teacher, _tok, TEXT, epochs=1, progress=False)
    ids = torch.tensor([[3, 9, 27, 81, 11]])
    path = save_compressed(model, tmp_path / "m.safetensors")
    again = load_compressed(path)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)


def test_layers_without_row_scales_stay_as_they_are():
    spec = LinearSpec("entropy", quantizer=Quantizer(bits=4, granularity="group", group_size=16))
    teacher, model = compressed(spec)
    layers0, _ = snapshot(model)
    report = distill(model, teacher, _tok, TEXT, epochs=1, progress=False)
    layers1, _ = snapshot(model)
    assert report.rows == 0 and report.frozen == len(layers0) and report.gains > 0
    assert all(torch.equal(layers0[n]["scale"], layers1[n]["scale"]) for n in layers0)


def test_a_failure_half_way_leaves_the_model_as_given(monkeypatch):
    teacher, model = compressed()
    before = snapshot(model)
    calls = {"n": 0}
    real = D.distillation_loss

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "distillation_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        distill(model, teacher, _tok, TEXT, epochs=2, progress=False)
    after = snapshot(model)
    assert all(torch.equal(before[0][n][k], after[0][n][k]) for n in before[0] for k in before[0][n])
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert sum(isinstance(m, CompressedLinear) for m in model.modules()) == len(before[0])


def test_a_non_finite_loss_is_an_error_not_a_silent_result(monkeypatch):
    teacher, model = compressed()
    before = snapshot(model)
    monkeypatch.setattr(D, "distillation_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match="nan"):
        distill(model, teacher, _tok, TEXT, epochs=1, progress=False)
    assert all(torch.equal(before[1][k], p) for k, p in norm_parameters(model).items())


def test_bad_input_is_a_clear_error():
    teacher, model = compressed()
    with pytest.raises(ValueError, match="epochs"):
        distill(model, teacher, _tok, TEXT, epochs=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        distill(model, teacher, _tok, TEXT, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="no CompressedLinear"):
        distill(teacher, model, _tok, TEXT, progress=False)
    with pytest.raises(ValueError, match="original model"):
        distill(model, model, _tok, TEXT, progress=False)
    with pytest.raises(ValueError, match="too short"):
        distill(model, teacher, _tok, "", progress=False)


def peaked_teacher(seed=0):
    """A tiny causal LM whose next-token distributions are far from uniform (its output layer scaled up)."""
    teacher = tiny_model("llama", seed=seed)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(40)
    return teacher


def test_teacher_sequences_follow_the_teacher_and_are_seeded():
    teacher = peaked_teacher()
    tok = SimpleNamespace(all_special_ids=[0, 1])
    seqs = teacher_sequences(teacher, tok, 100, length=32, seed=3, progress=False)
    assert len(seqs) == 4 and all(s.shape == (1, 32) for s in seqs)          # ceil(100 / 32) sequences
    again = teacher_sequences(teacher, tok, 100, length=32, seed=3, progress=False)
    other = teacher_sequences(teacher, tok, 100, length=32, seed=4, progress=False)
    assert torch.equal(torch.cat(seqs), torch.cat(again)) and not torch.equal(torch.cat(seqs), torch.cat(other))
    x = torch.cat(seqs)
    assert not torch.isin(x, torch.tensor([0, 1])).any()                     # special tokens never drawn
    with torch.no_grad():                                                    # scored again without the cache
        own = F.log_softmax(teacher(x).logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None]).mean()
        other = F.log_softmax(peaked_teacher(seed=1)(x).logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None]).mean()
    assert own > other + 1.0 and own > math.log(1 / 128) + 1.0


def test_distill_trains_on_teacher_written_tokens_too():
    teacher, model = compressed()
    rep = distill(model, teacher, _tok, TEXT, tokens=64, epochs=1, generated=100, progress=False)
    assert rep.tokens == 64 and rep.generated == 128 and rep.sequences == 1 + 2     # 2 sequences of 64 (positions)
    assert "the teacher wrote" in str(rep)
    with pytest.raises(ValueError, match="generated"):
        distill(model, teacher, _tok, TEXT, generated=-1, progress=False)
    with pytest.raises(ValueError, match="causal LM"):
        teacher_sequences(BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64)), None, 10)


def test_an_encoder_is_distilled_on_its_last_hidden_states():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    teacher = BertModel(cfg).eval()
    model = copy.deepcopy(teacher)
    compress_model(model, ECSQ, progress=False)

    def tok(text, max_length=64, truncation=True, return_overflowing_tokens=True, **_):
        ids = [b % 128 for b in text.encode()]
        return {"input_ids": [ids[i:i + max_length] for i in range(0, len(ids), max_length)]}

    text = "\n\n".join(["a passage about foxes and dogs and boxes of jugs"] * 40)
    chunks = token_chunks(model, tok, text, 4_096)

    def loss():
        with torch.no_grad():
            return sum(float(D.distillation_loss(model(x), teacher(x), causal=False)) for x in chunks)

    before = loss()
    report = distill(model, teacher, tok, text, epochs=3, lr=3e-3, progress=False)
    assert report.gains > 0 and loss() < 0.9 * before


def test_set_scale_reaches_the_fused_forward_and_checks_its_input():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 8, bias=False)
    layer = CompressedLinear.from_linear(lin, ECSQ)
    x = torch.randn(3, 48)
    y = layer(x)
    layer.set_scale(layer.scale * 2)
    assert torch.allclose(layer(x), 2 * y, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.weight_dense(torch.float32) @ x.T, 2 * y.T, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="values"):
        layer.set_scale(torch.ones(3))
    with pytest.raises(ValueError, match="> 0"):
        layer.set_scale(-layer.scale)
    low = CompressedLinear.from_linear(lin, LinearSpec("lowrank", rank=4))
    with pytest.raises(ValueError, match="no scales"):
        low.set_scale(torch.ones(8))


def test_compress_to_budget_distills_causal_lms_by_default():
    text = "calibration text for a tiny model " * 40
    model = tiny_model("llama")
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    report = compress_to_budget(model, _tok, 4.0, calibration_text=text, progress=False)
    assert report.distill is not None and "distilled" in report.recipe and "distilled" in str(report)
    for row in report.compression.rows:                                  # the error of what is stored, after
        w, w_hat = original[row.name], model.get_submodule(row.name).weight_dense(torch.float32)
        assert row.rel_error == pytest.approx(float((w_hat - w).norm() / w.norm()), rel=1e-5)
    plain = tiny_model("llama")
    assert compress_to_budget(plain, _tok, 4.0, calibration_text=text, progress=False, distill=False).distill is None
    with pytest.raises(TypeError, match="distill"):
        compress_to_budget(tiny_model("llama"), _tok, 4.0, calibration_text=text, progress=False, distill="yes")


def test_compress_to_budget_puts_the_original_layers_back_if_distillation_fails(monkeypatch):
    import slc.recipe as R
    model = tiny_model("llama")
    weights = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(R, "distill_model", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        compress_to_budget(model, _tok, 4.0, calibration_text="calibration text for a tiny model " * 40,
                           progress=False)
    assert not any(isinstance(m, CompressedLinear) for m in model.modules())
    now = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(now) == set(weights) and all(torch.equal(now[n], weights[n]) for n in weights)


def test_row_shifts_are_learned_counted_and_reloaded(tmp_path):
    from slc import load_compressed, save_compressed
    teacher, model = compressed()
    chunks = token_chunks(model, _tok, TEXT, 4_096)
    sizes = {n: m.nbytes for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    kl0 = kl_to(teacher, model, chunks)
    report = distill(model, teacher, _tok, TEXT, epochs=3, lr=3e-3, progress=False, generated=0, shift=True)
    assert kl_to(teacher, model, chunks) < 0.8 * kl0
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert report.shifts == sum(m.out_features for m in layers.values()) and "row shifts" in str(report)
    for n, m in layers.items():
        assert m.shift.dtype == torch.bfloat16 and m.shift.shape == (m.out_features,)
        assert m.nbytes == sizes[n] + 2 * m.out_features                 # 16 bits per row, counted
        x = torch.randn(2, m.in_features)
        want = F.linear(x, m.weight_dense(torch.float32), m.offset(torch.float32))
        assert torch.allclose(m(x), want, atol=1e-5) and "shift=True" in repr(m)
    assert sum(bool(m.shift.abs().max() > 0) for m in layers.values()) == len(layers)
    ids = torch.tensor([[3, 9, 27, 81, 11]])
    again = load_compressed(save_compressed(model, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)
    # a second pass starts from the stored shifts (it adds to them) and keeps them where it does not learn any
    before = {n: m.shift.clone() for n, m in layers.items()}
    distill(model, teacher, _tok, TEXT, epochs=1, progress=False, generated=0)
    assert all(torch.equal(before[n], m.shift) for n, m in layers.items())


def test_set_shift_checks_its_input_and_the_format_checks_the_kind():
    from slc.errors import FormatError
    from slc.nn import check_meta
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 8)
    layer = CompressedLinear.from_linear(lin, ECSQ)
    x = torch.randn(3, 48)
    y = layer(x)
    layer.set_shift(torch.arange(8.0))
    assert torch.allclose(layer(x), y + torch.arange(8.0), atol=1e-5)
    assert "shift" in layer.export_meta()["buffers"]
    check_meta(layer.export_meta())
    layer.set_shift(None)
    assert torch.allclose(layer(x), y) and "shift" not in layer.export_meta()["buffers"]
    with pytest.raises(ValueError, match="shape"):
        layer.set_shift(torch.ones(3))
    with pytest.raises(ValueError, match="finite"):
        layer.set_shift(torch.full((8,), float("nan")))
    low = CompressedLinear.from_linear(lin, LinearSpec("lowrank", rank=4))
    with pytest.raises(ValueError, match="cannot hold a shift"):
        low.set_shift(torch.ones(8))
    meta = low.export_meta()
    meta["buffers"]["shift"] = ["bfloat16", [8]]
    with pytest.raises(FormatError, match="cannot hold a shift"):
        check_meta(meta)


def test_compress_to_budget_counts_the_row_shifts_in_its_landing():
    text = "calibration text for a tiny model " * 40
    model = tiny_model("llama")
    report = compress_to_budget(model, _tok, 4.0, calibration_text=text, progress=False, shift=True)
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert all(m.shift is not None for m in layers) and "row shifts" in report.recipe
    n = sum(m.in_features * m.out_features for m in layers)
    assert report.bits_per_weight == pytest.approx(8 * sum(m.nbytes for m in layers) / n)
    assert 4.0 * 0.98 <= report.bits_per_weight <= 4.0
    assert report.attempts[-1][1] == pytest.approx(report.bits_per_weight)   # reserved from the first attempt
    with pytest.raises(ValueError, match="needs distill"):
        compress_to_budget(tiny_model("llama"), _tok, 4.0, calibration_text=text, progress=False, distill=False,
                           shift=True)
    with pytest.raises(TypeError, match="shift"):
        compress_to_budget(tiny_model("llama"), _tok, 4.0, calibration_text=text, progress=False, shift="yes")


@pytest.mark.parametrize("layout", ["tiled", "stream"])
def test_a_shift_survives_save_and_load_in_either_layout(tmp_path, layout):
    from slc import load_compressed, save_compressed
    spec = LinearSpec("entropy", quantizer=Quantizer(mode="ecsq", step=0.6), layout=layout)
    _, model = compressed(spec)
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            m.set_shift(0.1 * torch.randn(m.out_features))
    ids = torch.tensor([[3, 9, 27, 81, 11]])
    again = load_compressed(save_compressed(model, tmp_path / "m.safetensors"))
    assert all(m.shift.dtype == torch.bfloat16 for m in again.modules() if isinstance(m, CompressedLinear))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)


def test_a_budget_the_row_offsets_leave_out_of_reach_is_refused_up_front():
    text = "calibration text for a tiny model " * 40
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="row offsets included"):
        compress_to_budget(model, _tok, 2.6, calibration_text=text, progress=False, shift=True)
    assert not any(isinstance(m, CompressedLinear) for m in model.modules())

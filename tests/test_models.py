"""Model construction, pooling, weight checks, the frozen teacher runner and the distillation module.

Uses the packaged all-MiniLM-L6-v2 and tiny BERT classifiers (1 layer, hidden 32).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertTokenizer

from codir_ds.assets import MINILM_SHA256, minilm_dir, sha256_file
from codir_ds.config import ModelConfig
from codir_ds.distill.heads import DistillationModule, ProjectionHead
from codir_ds.engine.teacher import TeacherOutput, TeacherRunner
from codir_ds.errors import CodirError
from codir_ds.models.loading import (EXPORT_MANIFEST, WEIGHTS, build_student, check_same_vocab, export_student,
                                     load_teacher, model_dir, resolve_layers, verify_weights)
from codir_ds.models.pooling import pool_hidden, pool_layers

NUM_LABELS = 3
TINY = dict(student_layers=1, student_hidden=32, student_heads=2)
TEXTS = ["a short one", "this sentence is quite a bit longer than the first"]


def _one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def minilm():
    return minilm_dir()


@pytest.fixture(scope="module")
def tok(minilm):
    return AutoTokenizer.from_pretrained(str(minilm))


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert enc["attention_mask"][0].sum() < enc["attention_mask"][1].sum()  # row 0 is padded
    return enc


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tok):
    """A tiny 3-way classifier exported with export_student: (dir, original model, digest)."""
    torch.manual_seed(0)
    model = build_student(ModelConfig(**TINY), NUM_LABELS, False, tok)
    model.eval()
    out = tmp_path_factory.mktemp("tiny") / "export"
    digest = export_student(model, tok, out, extra={"method": "ce"})
    return out, model, digest


@pytest.fixture()
def small_tokenizer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


# ----------------------------------------------------------------------------- pooling

def _layer():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                      [[5.0, 6.0], [-100.0, 7.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return h, mask


def test_pool_mean_ignores_padding():
    h, mask = _layer()
    out = pool_hidden(h, mask, "mean")
    # row 0: mean of the first two rows only (the 100s are padding)
    expected = torch.tensor([[2.0, 3.0], [(5 - 100 + 9) / 3, (6 + 7 + 9) / 3]])
    assert out.shape == (2, 2)
    torch.testing.assert_close(out, expected)


def test_pool_mean_bool_mask_and_empty_row():
    h, _ = _layer()
    mask = torch.tensor([[True, False, False], [False, False, False]])
    out = pool_hidden(h, mask, "mean")
    torch.testing.assert_close(out[0], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(out[1], torch.zeros(2))  # no real token: zeros, not NaN


def test_pool_cls():
    h, mask = _layer()
    torch.testing.assert_close(pool_hidden(h, mask, "cls"), torch.tensor([[1.0, 2.0], [5.0, 6.0]]))


def test_pool_unknown_mode():
    h, mask = _layer()
    with pytest.raises(ValueError, match="max"):
        pool_hidden(h, mask, "max")


def test_pool_layers_concatenation_order():
    h, mask = _layer()
    states = (h, h + 10.0, h * 2.0)
    out = pool_layers(states, mask, [2, 0], "mean")
    assert out.shape == (2, 4)
    torch.testing.assert_close(out[:, :2], pool_hidden(h * 2.0, mask, "mean"))
    torch.testing.assert_close(out[:, 2:], pool_hidden(h, mask, "mean"))
    torch.testing.assert_close(out[0], torch.tensor([4.0, 6.0, 2.0, 3.0]))
    cls = pool_layers(states, mask, [1], "cls")
    torch.testing.assert_close(cls, torch.tensor([[11.0, 12.0], [15.0, 16.0]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pool_half_precision_does_not_overflow(dtype):
    # 8 x 60000 = 480000 overflows fp16 (max 65504) if summed in fp16
    h = torch.full((2, 8, 4), 60000.0, dtype=dtype)
    h[1, 4:] = 1.0e4  # padding rows with different values
    mask = torch.tensor([[1] * 8, [1] * 4 + [0] * 4])
    out = pool_hidden(h, mask, "mean")
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), torch.full((2, 4), 60000.0).to(dtype).float())


# ----------------------------------------------------------------------------- verify_weights / model_dir

def test_packaged_minilm_passes_checksum(minilm):
    assert verify_weights(minilm, None, "model.teacher") == MINILM_SHA256


def test_exported_model_passes_manifest_checksum(tiny_export):
    out, _, digest = tiny_export
    assert verify_weights(out, None, "model.teacher") == digest


def test_flipped_byte_fails_checksum(tiny_export, tmp_path):
    out, _, _ = tiny_export
    copy = tmp_path / "corrupt"
    shutil.copytree(out, copy)
    weights = copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CodirError) as info:
        verify_weights(copy, None, "model.teacher")
    msg = _one_line(info)
    assert "checksum" in msg and str(weights) in msg
    with pytest.raises(CodirError, match="checksum"):
        load_teacher(str(copy), NUM_LABELS, torch.float32)


def test_configured_sha256_override(tiny_export):
    out, _, digest = tiny_export
    with pytest.raises(CodirError) as info:
        verify_weights(out, "0" * 64, "model.teacher")
    assert "checksum" in _one_line(info)
    with pytest.raises(CodirError, match="checksum"):
        load_teacher(str(out), NUM_LABELS, torch.float32, sha256="ab" * 32)
    # the configured value wins over the manifest, case-insensitively
    assert verify_weights(out, digest.upper(), "model.teacher") == digest


def test_no_expected_checksum_returns_none(tiny_export, tmp_path):
    out, _, _ = tiny_export
    copy = tmp_path / "nomanifest"
    shutil.copytree(out, copy)
    (copy / EXPORT_MANIFEST).unlink()
    assert verify_weights(copy, None, "model.teacher") is None


def test_corrupt_manifest_is_a_codir_error(tiny_export, tmp_path):
    out, _, _ = tiny_export
    copy = tmp_path / "badmanifest"
    shutil.copytree(out, copy)
    (copy / EXPORT_MANIFEST).write_text('{"sha256": "ab')  # truncated
    with pytest.raises(CodirError) as info:
        verify_weights(copy, None, "model.teacher")
    assert EXPORT_MANIFEST in _one_line(info)


def test_expected_checksum_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CodirError) as info:
        verify_weights(tmp_path, "ab" * 32, "model.teacher")
    assert WEIGHTS in _one_line(info)


def test_model_dir_errors(tmp_path):
    with pytest.raises(CodirError, match="does not exist"):
        model_dir(str(tmp_path / "missing"), "model.teacher")
    with pytest.raises(CodirError, match="config.json"):
        model_dir(str(tmp_path), "model.teacher")
    assert model_dir("all-MiniLM-L6-v2", "model.teacher") == minilm_dir()


# ----------------------------------------------------------------------------- load_teacher

@pytest.mark.parametrize("spec", ["minilm_path", "all-MiniLM-L6-v2"])
def test_load_teacher_refuses_model_without_head(minilm, spec):
    spec = str(minilm) if spec == "minilm_path" else spec
    with pytest.raises(CodirError) as info:
        load_teacher(spec, NUM_LABELS, torch.float32)
    msg = _one_line(info)
    assert "launchers/finetune.py" in msg and "classification head" in msg


def test_load_teacher_refuses_wrong_num_labels(tiny_export):
    out, _, _ = tiny_export
    with pytest.raises(CodirError) as info:
        load_teacher(str(out), 5, torch.float32)
    assert "5-way" in _one_line(info)


def test_load_teacher_frozen(tiny_export, batch):
    out, original, _ = tiny_export
    teacher = load_teacher(str(out), NUM_LABELS, torch.float32)
    params = list(teacher.parameters())
    assert params and all(not p.requires_grad for p in params)
    assert teacher.training is False
    assert all(not m.training for m in teacher.modules())
    with torch.no_grad():
        torch.testing.assert_close(teacher(**batch).logits, original(**batch).logits)


def test_load_teacher_dtype(tiny_export):
    out, _, _ = tiny_export
    teacher = load_teacher(str(out), NUM_LABELS, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())


def test_teacher_runs_half_precision_sdpa_without_autograd(tiny_export, batch, monkeypatch):
    """The teacher path of a bf16 run: bf16 weights, PyTorch's scaled_dot_product_attention in every
    layer (flash / memory-efficient kernels on GPU), inference mode, outputs with no graph."""
    out, _, _ = tiny_export
    teacher = load_teacher(str(out), NUM_LABELS, torch.bfloat16)
    assert teacher.config._attn_implementation == "sdpa"
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.dtype, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    runner = TeacherRunner(teacher, resolve_layers("all", teacher, "method.teacher_layers"), "mean")
    t_out = runner(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    assert len(calls) == teacher.config.num_hidden_layers
    assert all(c == (torch.bfloat16, True, False) for c in calls), calls
    for t in (t_out.logits, t_out.features):
        assert t.dtype == torch.bfloat16 and not t.requires_grad and t.grad_fn is None
        assert not t.is_inference()  # cloned out: the projection head may consume it under autograd


def test_mlm_teacher_runs_half_precision_sdpa(tiny_mlm_teacher, batch, monkeypatch):
    from codir_ds.engine.teacher import MLMTeacherRunner
    from codir_ds.models.mlm import load_mlm_teacher
    teacher = load_mlm_teacher(str(tiny_mlm_teacher), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.parameters())
    assert teacher.config._attn_implementation == "sdpa"
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append(q.dtype)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    rows = torch.tensor([1, 2])
    t_out = MLMTeacherRunner(teacher, None, "mean", logits=True)(batch["input_ids"], batch["attention_mask"], rows)
    assert calls == [torch.bfloat16] * teacher.config.num_hidden_layers
    # logits at the masked rows only, never [B, T, V]
    assert t_out.logits.shape == (2, teacher.config.vocab_size) and t_out.logits.grad_fn is None


# ----------------------------------------------------------------------------- check_same_vocab

def test_check_same_vocab_passes_for_same_tokenizer(tok, minilm):
    check_same_vocab(tok, minilm, "model.student_init")


def test_check_same_vocab_different_vocab(small_tokenizer, minilm):
    with pytest.raises(CodirError) as info:
        check_same_vocab(small_tokenizer, minilm, "model.student_init")
    msg = _one_line(info)
    assert "different tokenizer vocabulary" in msg and "30522" in msg and "7 tokens" in msg


def test_check_same_vocab_reverse_direction(tok, small_tokenizer, tmp_path, minilm):
    # a model directory whose tokenizer is the small one
    (tmp_path / "config.json").write_text((minilm / "config.json").read_text())
    small_tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(CodirError, match="different tokenizer vocabulary"):
        check_same_vocab(tok, tmp_path, "model.teacher")


def test_check_same_vocab_config_vocab_too_small(tok, tmp_path, minilm):
    cfg = json.loads((minilm / "config.json").read_text())
    cfg["vocab_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # no tokenizer files
    with pytest.raises(CodirError) as info:
        check_same_vocab(tok, tmp_path, "model.teacher")
    assert "vocab_size 100" in _one_line(info)


def test_build_student_checks_vocab(small_tokenizer, minilm):
    cfg = ModelConfig(student_init=str(minilm), student_init_layers=[0])
    with pytest.raises(CodirError, match="different tokenizer vocabulary"):
        build_student(cfg, 2, False, small_tokenizer)


# ----------------------------------------------------------------------------- build_student

def test_student_init_from_minilm_layers(tok, minilm, batch):
    cfg = ModelConfig(student_init=str(minilm), student_init_layers=[0, 3], dropout=0.0)
    student = build_student(cfg, 2, False, tok)
    assert student.config.num_hidden_layers == 2
    layers = student.bert.encoder.layer
    assert len(layers) == 2
    ref = load_file(str(minilm / WEIGHTS))
    for new_idx, old_idx in enumerate([0, 3]):
        state = layers[new_idx].state_dict()
        assert state
        for name, value in state.items():
            torch.testing.assert_close(value, ref[f"encoder.layer.{old_idx}.{name}"], rtol=0, atol=0)
        for mod in layers[new_idx].modules():
            if hasattr(mod, "layer_idx"):
                assert mod.layer_idx == new_idx
    torch.testing.assert_close(student.bert.embeddings.word_embeddings.weight,
                               ref["embeddings.word_embeddings.weight"], rtol=0, atol=0)
    assert student.config.num_labels == 2
    assert student.config.hidden_dropout_prob == 0.0
    student.eval()
    with torch.no_grad():
        out = student(**batch, output_hidden_states=True)
    assert out.logits.shape == (2, 2)
    assert len(out.hidden_states) == 3


def test_student_init_all_layers(tok, minilm):
    student = build_student(ModelConfig(student_init=str(minilm)), 1, True, tok)
    assert student.config.num_hidden_layers == 6 and len(student.bert.encoder.layer) == 6
    assert student.config.problem_type == "regression" and student.config.num_labels == 1


@pytest.mark.parametrize("layers", [[6], [-1], [], [0, 7]])
def test_student_init_bad_layers(tok, minilm, layers):
    cfg = ModelConfig(student_init=str(minilm), student_init_layers=layers)
    with pytest.raises(CodirError) as info:
        build_student(cfg, 2, False, tok)
    assert "0..5" in _one_line(info)


def test_student_from_config(tok, batch):
    cfg = ModelConfig(student_layers=2, student_hidden=32, student_heads=4, dropout=0.2)
    student = build_student(cfg, NUM_LABELS, False, tok)
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (2, 32, 4)
    assert c.intermediate_size == 128  # default 4 x hidden
    assert c.vocab_size == len(tok) == 30522
    assert c.num_labels == NUM_LABELS and c.problem_type == "single_label_classification"
    assert c.hidden_dropout_prob == 0.2 and c.pad_token_id == tok.pad_token_id
    assert len(student.bert.encoder.layer) == 2
    assert all(p.dtype == torch.float32 for p in student.parameters())
    student.eval()
    with torch.no_grad():
        assert student(**batch).logits.shape == (2, NUM_LABELS)


def test_student_from_config_with_template(tok, minilm):
    cfg = ModelConfig(student_layers=1, student_hidden=32, student_heads=2, student_intermediate=48)
    student = build_student(cfg, 1, True, tok, template_dir=minilm)
    c = student.config
    assert c.model_type == "bert" and c.vocab_size == 30522 and c.intermediate_size == 48
    assert c.problem_type == "regression" and c.num_labels == 1


def test_resolve_layers(tiny_export):
    _, model, _ = tiny_export  # 1 layer
    assert resolve_layers("all", model, "method.student_layers") == [1]
    assert resolve_layers([0, 1], model, "method.student_layers") == [0, 1]
    with pytest.raises(CodirError, match="0..1"):
        resolve_layers([2], model, "method.student_layers")


# ----------------------------------------------------------------------------- export_student

def test_export_loads_with_auto_classes(tiny_export, tok, batch):
    out, original, digest = tiny_export
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out))
    loaded.eval()
    loaded_tok = AutoTokenizer.from_pretrained(str(out))
    enc = loaded_tok(TEXTS, padding=True, return_tensors="pt")
    torch.testing.assert_close(enc["input_ids"], batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, original(**batch).logits, rtol=1e-6, atol=1e-6)
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert manifest["sha256"] == digest == sha256_file(out / WEIGHTS)
    assert manifest["method"] == "ce"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_export_half_precision_model_is_saved_fp32(tok, tmp_path):
    torch.manual_seed(1)
    model = build_student(ModelConfig(**TINY), 2, False, tok).to(torch.bfloat16)
    export_student(model, tok, tmp_path / "e")
    state = load_file(str(tmp_path / "e" / WEIGHTS))
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert verify_weights(tmp_path / "e", None, "model.teacher") is not None


# ----------------------------------------------------------------------------- TeacherRunner

@pytest.fixture(scope="module")
def teacher(tiny_export):
    out, _, _ = tiny_export
    return load_teacher(str(out), NUM_LABELS, torch.float32)


def test_teacher_runner_outputs_are_trainable_inputs(teacher, batch):
    runner = TeacherRunner(teacher, layers=[0, 1], pooling="mean")
    out = runner(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert isinstance(out, TeacherOutput)
    assert out.logits.shape == (2, NUM_LABELS)
    assert out.features.shape == (2, 2 * 32)
    assert not out.features.is_inference() and not out.logits.is_inference()
    assert not out.features.requires_grad
    head = torch.nn.Linear(64, 4)
    loss = head(out.features).pow(2).sum() + (out.logits * head(out.features)[:, :NUM_LABELS]).sum()
    loss.backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_runner_features_match_pooling(teacher, batch):
    runner = TeacherRunner(teacher, layers=[1], pooling="mean")
    out = runner(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.features, pool_hidden(ref.hidden_states[1], batch["attention_mask"], "mean"))


def test_teacher_runner_without_layers(teacher, batch):
    out = TeacherRunner(teacher, layers=None, pooling="mean")(batch["input_ids"], batch["attention_mask"])
    assert out.features is None and out.logits.shape == (2, NUM_LABELS)


def test_teacher_runner_refuses_trainable_model(tok):
    model = build_student(ModelConfig(**TINY), 2, False, tok)
    with pytest.raises(AssertionError, match="frozen"):
        TeacherRunner(model, layers=[1], pooling="mean")


# ----------------------------------------------------------------------------- DistillationModule

@pytest.fixture(scope="module")
def student(tok):
    torch.manual_seed(2)
    return build_student(ModelConfig(**TINY, dropout=0.0), NUM_LABELS, False, tok)


def test_distillation_module_with_heads(student, teacher, batch):
    feats = TeacherRunner(teacher, layers=[0, 1], pooling="mean")(batch["input_ids"], batch["attention_mask"]).features
    module = DistillationModule(student, student_layers=[1], pooling="mean", teacher_dim=64, projection_dim=16)
    assert isinstance(module.proj_s, ProjectionHead) and module.proj_s.linear.in_features == 32
    assert module.proj_t.linear.in_features == 64
    out = module(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], teacher_features=feats)
    assert set(out) == {"logits", "h_s", "h_t"}
    assert out["logits"].shape == (2, NUM_LABELS)
    assert out["h_s"].shape == (2, 16) and out["h_t"].shape == (2, 16)
    (out["h_s"].sum() + out["h_t"].sum()).backward()
    assert module.proj_t.linear.weight.grad is not None
    assert module.proj_s.linear.weight.grad is not None
    assert student.bert.encoder.layer[0].output.dense.weight.grad is not None
    module.zero_grad(set_to_none=True)


def test_distillation_module_without_heads(student, batch):
    module = DistillationModule(student, student_layers=[1], pooling="mean")
    assert module.proj_s is None and module.proj_t is None
    out = module(batch["input_ids"], batch["attention_mask"], teacher_features=torch.zeros(2, 64))
    assert set(out) == {"logits"} and out["logits"].shape == (2, NUM_LABELS)


def test_distillation_module_heads_without_teacher_features(student, batch):
    module = DistillationModule(student, student_layers=[0, 1], pooling="cls", teacher_dim=64, projection_dim=8)
    assert module.proj_s.linear.in_features == 64
    out = module(batch["input_ids"], batch["attention_mask"])
    assert set(out) == {"logits"}

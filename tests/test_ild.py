"""Intermediate-layer distillation (pkd, tinybert, distilbert, cr_ild): losses against hand values,
layer maps, mixup and the consistency ramp, the student module's features, the methods' loss sums."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from codir_ds.config import MethodConfig, load_config
from codir_ds.distill.heads import DistillationModule, build_ild_spec
from codir_ds.distill.ild import (attention_mse, consistency_weight, cosine_loss, hidden_mse, layer_pairs,
                                  mix_targets, mixup_draw, mixup_embeddings, pkd_loss)
from codir_ds.distill.methods import (Consistency, LayerFeatures, LossInputs, StudentOutput, TeacherOutput,
                                      build_method, get_method)
from codir_ds.engine.teacher import TeacherRunner
from codir_ds.errors import CodirError


# ----------------------------------------------------------------------------- layer maps

def _pairs(name: str, layer_map, ls: int, lt: int, stage: str = "finetune"):
    """``method.layer_pairs`` of method ``name`` with ``method.layer_map = layer_map``."""
    return get_method(name)(MethodConfig(name=name, layer_map=layer_map), stage).layer_pairs(ls, lt)


def test_layer_maps_default_uniform_last_and_explicit():
    assert _pairs("pkd", "default", 3, 6) == [(1, 2), (2, 4)]          # PKD-skip, last left to KD
    assert _pairs("pkd", "default", 1, 6) == [(1, 6)]
    assert _pairs("tinybert", "default", 2, 6) == [(0, 0), (1, 3), (2, 6)]
    assert _pairs("distilbert", "default", 2, 6) == [(2, 6)]
    assert _pairs("cr_ild", "default", 4, 12) == [(4, 12)]
    assert _pairs("pkd", "uniform", 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert _pairs("tinybert", "uniform", 4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert _pairs("tinybert", "last", 2, 6) == [(2, 6)]
    assert _pairs("tinybert", [[1, 5], [0, 0]], 2, 6) == [(1, 5), (0, 0)]
    with pytest.raises(CodirError, match="method.layer_map"):
        _pairs("tinybert", [[3, 1]], 2, 6)
    # pre-training methods map their layers the same way
    assert _pairs("tinybert", "default", 2, 6, "pretrain") == [(0, 0), (1, 3), (2, 6)]
    assert _pairs("distilbert", "default", 2, 6, "pretrain") == [(2, 6)]


def test_default_pairs_are_each_methods_own_map():
    def default(name, ls, lt):
        return get_method(name)(MethodConfig(name=name, layer_map="uniform"), "finetune").default_pairs(ls, lt)
    # the method's own map whatever method.layer_map says
    assert default("pkd", 3, 6) == [(1, 2), (2, 4)]
    assert default("pkd", 1, 6) == [(1, 6)]
    assert default("tinybert", 2, 6) == [(0, 0), (1, 3), (2, 6)]
    assert default("distilbert", 2, 6) == [(2, 6)]
    assert default("cr_ild", 4, 12) == [(4, 12)]


def test_layer_pairs_takes_the_default_map_it_is_given():
    default = [(1, 2), (2, 4)]
    assert layer_pairs("default", default, 3, 6) == [(1, 2), (2, 4)]
    assert layer_pairs("default", [[0, 0], [2, 6]], 2, 6) == [(0, 0), (2, 6)]      # lists become tuples
    assert layer_pairs("uniform", default, 3, 6) == [(1, 2), (2, 4), (3, 6)]        # default ignored
    assert layer_pairs("uniform", default, 4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert layer_pairs("last", default, 2, 6) == [(2, 6)]
    assert layer_pairs([[1, 5], [0, 0]], default, 2, 6) == [(1, 5), (0, 0)]
    with pytest.raises(CodirError, match="method.layer_map"):
        layer_pairs([[3, 1]], default, 2, 6)


def test_layer_map_config_validation():
    with pytest.raises(CodirError, match="method.layer_map"):
        load_config(None, ["model.teacher=x", "method.name=tinybert", "method.layer_map=sideways"])
    with pytest.raises(CodirError, match="method.layer_map"):
        load_config(None, ["model.teacher=x", "method.name=tinybert", "method.layer_map=[[1, 2, 3]]"])
    cfg = load_config(None, ["model.teacher=x", "method.name=tinybert", "method.layer_map=[[1, 2], [2, 4]]"])
    assert cfg.method.layer_map == [[1, 2], [2, 4]]


# ----------------------------------------------------------------------------- losses, hand-computed

def test_pkd_loss_hand_value():
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]])          # normalised: [.6, .8], [1, 0]
    t = torch.tensor([[0.0, 2.0], [0.0, -5.0]])         # normalised: [0, 1], [0, -1]
    # row 0: (.6)^2 + (-.2)^2 = .40; row 1: 1 + 1 = 2; mean 1.2 per layer; two identical layers -> 2.4
    assert pkd_loss([s, s], [t, t]).item() == pytest.approx(2.4, abs=1e-6)


def test_hidden_mse_counts_real_tokens_only():
    s = torch.zeros(1, 3, 2)
    t = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [100.0, 100.0]]])   # last position is padding
    mask = torch.tensor([[1, 1, 0]])
    # token 0: (1 + 9) / 2 = 5; token 1: (4 + 4) / 2 = 4; mean over 2 real tokens = 4.5
    assert hidden_mse([s], [t], mask).item() == pytest.approx(4.5)
    assert hidden_mse([s, s], [t, t], mask).item() == pytest.approx(9.0)   # summed over pairs


def test_attention_mse_real_entries_and_head_mismatch():
    mask = torch.tensor([[1, 1, 0]])
    a_t = torch.zeros(1, 2, 3, 3)
    a_s = torch.zeros(1, 2, 3, 3)
    a_s[0, 0, 0, 0] = 1.0          # real (q=0, k=0), head 0: squared error 1, mean over 2 heads 0.5
    a_s[0, :, 2, 2] = 9.0          # padding entries are ignored
    # 4 real (q, k) entries: 0.5 / 4
    assert attention_mse([a_s], [a_t], mask).item() == pytest.approx(0.125)
    # 1 student head vs 2 teacher heads: head-averaged maps are compared
    a_s1 = torch.full((1, 1, 3, 3), 0.5)
    a_t2 = torch.zeros(1, 2, 3, 3)
    a_t2[:, 0] = 1.0               # teacher mean = 0.5 everywhere: zero loss
    assert attention_mse([a_s1], [a_t2], mask).item() == pytest.approx(0.0)


def test_cosine_loss_hand_value():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # 1 - cos: 1 (orthogonal), 0 (parallel); padding ignored -> 0.5
    assert cosine_loss(s, t, mask).item() == pytest.approx(0.5)


def test_losses_in_fp32_from_half_inputs_and_teacher_detached():
    s = torch.randn(2, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.long)
    for loss in (hidden_mse([s], [t], mask), cosine_loss(s, t, mask), pkd_loss([s[:, 0]], [t[:, 0]])):
        assert loss.dtype == torch.float32
        loss.backward()
    assert s.grad is not None and t.grad is None


# ----------------------------------------------------------------------------- mixup and the ramp

def test_mixup_draw_is_reproducible_and_lambda_at_least_half():
    lams = []
    for seed in range(50):
        lam, partner = mixup_draw(1.0, 6, seed)
        assert 0.5 <= lam <= 1.0
        assert sorted(partner.tolist()) == list(range(6))
        lams.append(lam)
        assert mixup_draw(1.0, 6, seed)[0] == lam and torch.equal(mixup_draw(1.0, 6, seed)[1], partner)
    assert len(set(lams)) == 50 and abs(sum(lams) / 50 - 0.75) < 0.06   # max(U, 1-U) has mean 3/4


def test_mixup_embeddings_and_targets():
    e = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    partner = torch.tensor([1, 0])
    mixed, union = mixup_embeddings(e, mask, 0.75, partner)
    assert mixed.shape == e.shape
    assert torch.allclose(mixed[0], 0.75 * e[0] + 0.25 * e[1])
    assert torch.allclose(mixed[1], 0.75 * e[1] + 0.25 * e[0])
    assert union.tolist() == [[1, 1, 0], [1, 1, 0]]
    clean = torch.randn(2, 3, 4, requires_grad=True)
    target = mix_targets(clean, 0.75, partner)
    assert not target.requires_grad
    assert torch.allclose(target[0], 0.75 * clean[0] + 0.25 * clean[1])


def test_consistency_weight_ramps_linearly_then_holds():
    # ILD stage of 10 steps, ramp over half of it (5 steps) to 2.0
    assert [consistency_weight(s, 10, 0.5, 2.0) for s in (0, 1, 4, 5, 9)] == [0.0, 0.4, 1.6, 2.0, 2.0]
    assert consistency_weight(3, 10, 1.0, 1.0) == pytest.approx(0.3)


# ----------------------------------------------------------------------------- module and method losses

def _bert(layers: int, hidden: int, heads: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _method(name: str, **sets):
    over = [f"method.name={name}", "model.teacher=x"] + [f"method.{k}={v}" for k, v in sets.items()]
    return load_config(None, over).method


@pytest.mark.parametrize("name", ["pkd", "tinybert", "distilbert", "cr_ild"])
def test_student_features_projected_to_teacher_width(name):
    student, teacher = _bert(2, 8, 2, 0), _bert(4, 12, 3, 1).requires_grad_(False)
    mcfg = _method(name)
    method = build_method(mcfg, "finetune")
    spec = build_ild_spec(method, student, teacher)
    module = DistillationModule(student, [1, 2], "mean", ild_spec=spec, teacher_width=12)
    ids = torch.randint(5, 50, (3, 5))
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]])
    mix = mixup_draw(1.0, 3, 0) if name == "cr_ild" else None
    out = module(ids, mask, ild=True, mix=mix)
    t_out = TeacherRunner(teacher, None, "mean", spec)(ids, mask, ild=True, mix=mix)
    s_layers, t_layers = out["layers"], t_out.layers
    assert isinstance(t_layers, LayerFeatures)
    if name == "pkd":
        assert [x.shape for x in s_layers["cls"]] == [(3, 12)] and [x.shape for x in t_layers.cls] == [(3, 12)]
    else:
        assert all(s.shape == t.shape == (3, 5, 12) for s, t in zip(s_layers["hidden"], t_layers.hidden))
    if name in ("tinybert", "cr_ild"):
        assert [a.shape for a in s_layers["attn"]] == [(3, 2, 5, 5)] * len(spec.attention_pairs)
        assert [a.shape for a in t_layers.attn] == [(3, 3, 5, 5)] * len(spec.attention_pairs)
    if name == "cr_ild":
        assert out["consistency"]["hidden"].shape == out["consistency"]["hidden_target"].shape == (3, 5, 8)
        assert not out["consistency"]["hidden_target"].requires_grad
        assert torch.equal(s_layers["mask"], torch.maximum(mask, mask[mix[1]]))   # union of the pair's masks
        assert torch.equal(t_layers.mask, s_layers["mask"])
    else:
        assert "consistency" not in out
    student_out = StudentOutput.from_module(out)
    total, terms = method.loss(student_out, t_out, LossInputs(torch.tensor([0, 1, 2]), stage="ild",
                                                              consistency_weight=0.5))
    total.backward()
    # The student and its projections get gradients, the teacher none.
    assert student.bert.encoder.layer[-1].output.dense.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    if module.ild_proj is not None and name != "distilbert":
        assert module.ild_proj[0].weight.grad is not None


def test_method_loss_sums_terms_with_their_weights():
    torch.manual_seed(0)
    logits, t_logits = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    s_h, t_h = [torch.randn(4, 5, 6)], [torch.randn(4, 5, 6)]
    s_a, t_a = [torch.rand(4, 2, 5, 5)], [torch.rand(4, 2, 5, 5)]
    mask = torch.ones(4, 5, dtype=torch.long)
    student = StudentOutput(logits, layers=LayerFeatures(mask, hidden=s_h, attn=s_a))
    teacher = TeacherOutput(t_logits, layers=LayerFeatures(mask, hidden=t_h, attn=t_a))
    obj = build_method(_method("tinybert", alpha_kd=0.7, alpha_hidden=0.3, alpha_attention=2.0), "finetune")
    total, terms = obj.loss(student, teacher, LossInputs(labels))
    kd = F.kl_div(F.log_softmax(logits / 2, -1), F.log_softmax(t_logits / 2, -1), reduction="batchmean",
                  log_target=True) * 4
    want = F.cross_entropy(logits, labels) + 0.7 * kd + 0.3 * F.mse_loss(s_h[0], t_h[0]) + \
        2.0 * F.mse_loss(s_a[0], t_a[0])
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    assert set(terms) >= {"loss/task", "loss/kd", "loss/hidden_mse", "loss/attention_mse"}

    # CR-ILD: the ILD stage has no task / KD term; the KD stage has no ILD term.
    cr = build_method(_method("cr_ild", alpha_hidden=1.0, alpha_attention=0.0), "finetune")
    cons = torch.randn(4, 5, 6)
    student_cr = StudentOutput(logits, layers=LayerFeatures(mask, hidden=s_h, attn=s_a),
                               consistency=Consistency(cons, torch.zeros(4, 5, 6)))
    total, terms = cr.loss(student_cr, teacher, LossInputs(labels, stage="ild", consistency_weight=0.25))
    want = F.mse_loss(s_h[0], t_h[0]) + 0.25 * cons.pow(2).mean()
    assert total.item() == pytest.approx(want.item(), rel=1e-5) and "loss/task" not in terms
    total, terms = cr.loss(StudentOutput(logits), TeacherOutput(t_logits), LossInputs(labels, stage="kd"))
    assert total.item() == pytest.approx((F.cross_entropy(logits, labels) + 0.7 * kd).item(), rel=1e-5)

    # DistilBERT pre-training: MLM + KD + cosine on the last hidden states.
    pre = build_method(_method("distilbert", alpha_kd=0.5, alpha_hidden=1.0), "pretrain")
    total, terms = pre.loss(StudentOutput(logits, layers=LayerFeatures(mask, hidden=s_h)),
                            TeacherOutput(t_logits, layers=LayerFeatures(mask, hidden=t_h)),
                            LossInputs(labels, pretraining=True))
    cos = (1 - F.cosine_similarity(s_h[0], t_h[0], dim=-1)).mean()
    assert total.item() == pytest.approx((F.cross_entropy(logits, labels) + 0.5 * kd + cos).item(), rel=1e-5)
    assert math.isfinite(terms["loss/cosine"].item())


def test_supplementary_data_shapes_and_errors(tmp_path):
    from codir_ds.data.tasks import load_supplementary, load_task
    cfg = load_config(None, ["model.teacher=x", "method.name=cr_ild", "data.task=movie_snippets",
                             "data.supplementary=trec6", "data.supplementary_max_examples=50"])
    task = load_task(cfg.data)
    extra = load_supplementary(cfg.data, task)
    assert len(extra) == 50 and all(ex.id < 0 for ex in extra) and len({ex.id for ex in extra}) == 50
    txt = tmp_path / "extra.txt"
    txt.write_text("one line\n\nanother line\n")
    cfg.data.supplementary = str(txt)
    cfg.data.supplementary_max_examples = None
    assert [ex.text for ex in load_supplementary(cfg.data, task)] == ["one line", "another line"]
    cfg.data.supplementary = str(tmp_path / "missing.txt")
    with pytest.raises(CodirError, match="data.supplementary"):
        load_supplementary(cfg.data, task)
    with pytest.raises(CodirError, match="only cr_ild"):
        load_config(None, ["model.teacher=x", "method.name=kd", "data.supplementary=trec6"])

"""Losses of Eq. 1 (ce / kd / codir methods) against independent and hand computations."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from codir_ds.config import MethodConfig
from codir_ds.distill.losses import crd_loss, kd_loss
from codir_ds.distill.methods import LossInputs, Method, StudentOutput, TeacherOutput, build_method
from codir_ds.distill.negatives import BatchNegatives, ClassNegatives
from codir_ds.errors import CodirError


def _ns(**kw):
    base = dict(name="codir", alpha_kd=0.7, alpha_crd=0.5, kd_temperature=2.0, kd_t2_scale=True,
                crd_temperature=0.1)
    base.update(kw)
    return SimpleNamespace(**base)


def _inputs(seed=0, b=4, c=3, m=8, k=5):
    g = torch.Generator().manual_seed(seed)
    return dict(
        logits=torch.randn(b, c, generator=g, requires_grad=True),
        labels=torch.randint(0, c, (b,), generator=g),
        teacher_logits=torch.randn(b, c, generator=g),
        h_t=torch.randn(b, m, generator=g, requires_grad=True),
        h_s=torch.randn(b, m, generator=g, requires_grad=True),
        negatives=torch.randn(b, k, m, generator=g),
    )


def _per_anchor(negatives):
    """``[B, K, m]`` negatives of each anchor as CRD negatives: one "class" per anchor."""
    return ClassNegatives(negatives, torch.arange(negatives.shape[0]))


def _per_anchor_shared(negatives):
    """The same per-anchor negatives as one shared candidate set: anchor b excludes every row not its own."""
    b, k, m = negatives.shape
    owner = torch.arange(b).repeat_interleave(k)                   # candidate row -> its anchor
    return BatchNegatives(negatives.reshape(b * k, m), owner[None, :] != torch.arange(b)[:, None])


NEGATIVES = {"class": _per_anchor, "batch": _per_anchor_shared}


def _loss(method, logits, labels, is_regression=False, teacher_logits=None, h_t=None, h_s=None, negatives=None):
    """``method.loss`` on finetuning inputs (``negatives``: a CRD negatives object or None)."""
    teacher = TeacherOutput(teacher_logits) if teacher_logits is not None else None
    return method.loss(StudentOutput(logits, h_s=h_s, h_t=h_t), teacher,
                       LossInputs(labels, is_regression=is_regression, negatives=negatives))


def _log_softmax(row):
    mx = max(row)
    lse = mx + math.log(sum(math.exp(v - mx) for v in row))
    return [v - lse for v in row]


# ----------------------------------------------------------------------------- build_method

def test_build_ce():
    obj = build_method(MethodConfig(name="ce", alpha_kd=0.9), "finetune")
    assert isinstance(obj, Method)
    assert obj.name == "ce" and obj.teacher is None
    assert obj.bank is None and obj.contrast is None
    # unused weights do not leak in: with a teacher and negatives at hand, the loss is the task loss alone
    x = _inputs(7)
    total, terms = _loss(obj, x["logits"], x["labels"], teacher_logits=x["teacher_logits"], h_t=x["h_t"],
                         h_s=x["h_s"], negatives=_per_anchor(x["negatives"]))
    torch.testing.assert_close(total, F.cross_entropy(x["logits"], x["labels"]))
    assert set(terms) == {"loss/task", "loss/total"}


def test_build_kd():
    obj = build_method(MethodConfig(name="kd", alpha_kd=0.3, alpha_crd=0.9, kd_temperature=4.0,
                                    kd_t2_scale=False), "finetune")
    assert obj.teacher.logits and obj.bank is None and obj.contrast is None
    assert (obj.cfg.alpha_kd, obj.cfg.kd_temperature, obj.cfg.kd_t2_scale) == (0.3, 4.0, False)
    # alpha_crd is not kd's: no CRD term even when negatives are given
    x = _inputs(8)
    total, terms = _loss(obj, x["logits"], x["labels"], teacher_logits=x["teacher_logits"], h_t=x["h_t"],
                         h_s=x["h_s"], negatives=_per_anchor(x["negatives"]))
    want = F.cross_entropy(x["logits"], x["labels"]) + 0.3 * kd_loss(x["logits"], x["teacher_logits"], 4.0)
    torch.testing.assert_close(total, want)
    assert "loss/crd" not in terms


def test_build_codir_from_namespace():
    obj = build_method(_ns(alpha_crd=0.25, crd_temperature=0.05), "finetune")
    assert obj.name == "codir" and obj.teacher is not None
    assert (obj.cfg.alpha_kd, obj.cfg.alpha_crd, obj.cfg.kd_temperature, obj.cfg.crd_temperature) == \
        (0.7, 0.25, 2.0, 0.05)
    assert obj.cfg.kd_t2_scale is True


def test_build_unknown():
    with pytest.raises(CodirError, match="mse"):
        build_method(_ns(name="mse"), "finetune")


# ----------------------------------------------------------------------------- ce

def test_ce_by_hand():
    obj = build_method(_ns(name="ce"), "finetune")
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    labels = torch.tensor([1, 0])
    total, terms = _loss(obj, logits, labels, is_regression=False)
    expected = -(_log_softmax([1.0, 2.0, 0.0])[1] + _log_softmax([0.5, -1.0, 3.0])[0]) / 2
    assert expected == pytest.approx((0.40760596 + 2.59567433) / 2, rel=1e-7)
    # -log(e^2 / (e + e^2 + 1)) = 0.40760596..., second row 2.59567433...
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert set(terms) == {"loss/task", "loss/total"}
    assert terms["loss/task"].item() == pytest.approx(expected, rel=1e-6)
    assert terms["loss/total"].item() == pytest.approx(expected, rel=1e-6)


def test_ce_ignores_teacher_inputs():
    obj = build_method(_ns(name="ce"), "finetune")
    x = _inputs()
    total, terms = _loss(obj, x["logits"], x["labels"], False, teacher_logits=x["teacher_logits"],
                         h_t=x["h_t"], h_s=x["h_s"], negatives=_per_anchor(x["negatives"]))
    assert total.item() == pytest.approx(F.cross_entropy(x["logits"], x["labels"]).item(), rel=1e-6)
    assert "loss/kd" not in terms and "loss/crd" not in terms


# ----------------------------------------------------------------------------- kd

def test_kd_by_hand():
    rho, alpha = 2.0, 0.5
    obj = build_method(_ns(name="kd", alpha_kd=alpha, kd_temperature=rho), "finetune")
    zs, zt = [1.0, 0.0], [0.0, 2.0]
    logits, teacher = torch.tensor([zs]), torch.tensor([zt])
    total, terms = _loss(obj, logits, torch.tensor([0]), False, teacher_logits=teacher)
    task = -_log_softmax(zs)[0]
    ls, lt = _log_softmax([v / rho for v in zs]), _log_softmax([v / rho for v in zt])
    kl = sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    assert terms["loss/task"].item() == pytest.approx(task, rel=1e-6)
    assert terms["loss/kd"].item() == pytest.approx(rho ** 2 * kl, rel=1e-5)
    assert total.item() == pytest.approx(task + alpha * rho ** 2 * kl, rel=1e-6)
    assert set(terms) == {"loss/task", "loss/kd", "loss/total"}


def test_kd_matches_losses_module():
    x = _inputs(1)
    cfg = MethodConfig(name="kd", alpha_kd=0.7, kd_temperature=3.0)
    total, terms = _loss(build_method(cfg, "finetune"), x["logits"], x["labels"], False,
                         teacher_logits=x["teacher_logits"])
    task = F.cross_entropy(x["logits"], x["labels"])
    kd = kd_loss(x["logits"], x["teacher_logits"], 3.0)
    torch.testing.assert_close(total, task + 0.7 * 9.0 * kd)
    torch.testing.assert_close(terms["loss/kd"], (9.0 * kd).detach())


def test_kd_without_t2_scale():
    x = _inputs(2)
    obj = build_method(_ns(name="kd", alpha_kd=0.7, kd_temperature=4.0, kd_t2_scale=False), "finetune")
    total, terms = _loss(obj, x["logits"], x["labels"], False, teacher_logits=x["teacher_logits"])
    task = F.cross_entropy(x["logits"], x["labels"])
    kd = kd_loss(x["logits"], x["teacher_logits"], 4.0)
    torch.testing.assert_close(total, task + 0.7 * kd)
    torch.testing.assert_close(terms["loss/kd"], kd.detach())


def test_kd_gradient_does_not_reach_teacher():
    x = _inputs(3)
    zt = x["teacher_logits"].clone().requires_grad_(True)
    total, _ = _loss(build_method(_ns(name="kd"), "finetune"), x["logits"], x["labels"], False, teacher_logits=zt)
    total.backward()
    assert x["logits"].grad is not None and torch.isfinite(x["logits"].grad).all()
    assert zt.grad is None


# ----------------------------------------------------------------------------- codir

@pytest.mark.parametrize("kind", sorted(NEGATIVES))
def test_codir_total_and_terms(kind):
    x = _inputs(4)
    cfg = MethodConfig(name="codir", alpha_kd=0.7, alpha_crd=0.5, kd_temperature=2.0, crd_temperature=0.1)
    total, terms = _loss(build_method(cfg, "finetune"), x["logits"], x["labels"], False,
                         teacher_logits=x["teacher_logits"], h_t=x["h_t"], h_s=x["h_s"],
                         negatives=NEGATIVES[kind](x["negatives"]))
    task = F.cross_entropy(x["logits"], x["labels"])
    kd = kd_loss(x["logits"], x["teacher_logits"], 2.0)
    crd = crd_loss(x["h_t"], x["h_s"], x["negatives"], 0.1)
    torch.testing.assert_close(total, task + 0.7 * 4.0 * kd + 0.5 * crd)
    assert {"loss/task", "loss/kd", "loss/crd", "bank/pos_sim", "bank/neg_sim", "loss/total"} <= set(terms)
    torch.testing.assert_close(terms["loss/crd"], crd.detach())
    cos_pos = F.cosine_similarity(x["h_t"], x["h_s"], dim=-1).mean()
    cos_neg = F.cosine_similarity(x["h_t"].unsqueeze(1), x["negatives"], dim=-1).mean()
    torch.testing.assert_close(terms["bank/pos_sim"], cos_pos.detach())
    torch.testing.assert_close(terms["bank/neg_sim"], cos_neg.detach())
    for v in terms.values():
        assert v.dim() == 0 and not v.requires_grad and v.dtype == torch.float32
    total.backward()
    assert x["h_t"].grad is not None and x["h_s"].grad is not None and x["logits"].grad is not None


def test_codir_class_negatives_are_the_anchors_class_rows():
    """Finetuning's shared per-class negatives equal per-anchor negatives ``rows[classes]``."""
    x = _inputs(9)
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(3, 5, 8, generator=g)                      # [C, K, m]
    cfg = MethodConfig(name="codir", alpha_kd=0.7, alpha_crd=0.5, kd_temperature=2.0, crd_temperature=0.1)
    total, terms = _loss(build_method(cfg, "finetune"), x["logits"], x["labels"], False,
                         teacher_logits=x["teacher_logits"], h_t=x["h_t"], h_s=x["h_s"],
                         negatives=ClassNegatives(rows, x["labels"]))
    crd = crd_loss(x["h_t"], x["h_s"], rows[x["labels"]], 0.1)
    want = (F.cross_entropy(x["logits"], x["labels"]) + 0.7 * 4.0 * kd_loss(x["logits"], x["teacher_logits"], 2.0)
            + 0.5 * crd)
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(terms["loss/crd"], crd.detach())


def test_codir_without_negatives_is_refused():
    x = _inputs(10)
    with pytest.raises(CodirError, match="negatives"):
        _loss(build_method(MethodConfig(name="codir"), "finetune"), x["logits"], x["labels"], False,
              teacher_logits=x["teacher_logits"], h_t=x["h_t"], h_s=x["h_s"], negatives=None)


def test_codir_crd_by_hand():
    tau = 0.5
    obj = build_method(MethodConfig(name="codir", alpha_kd=0.0, alpha_crd=2.0, crd_temperature=tau), "finetune")
    logits = torch.tensor([[0.0, 0.0]])
    h_t, h_s = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    negs = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # class 1's negatives are negs; class 0's row (never read: the anchor has label 1) is arbitrary
    rows = torch.stack([torch.tensor([[5.0, -3.0], [0.3, 0.2]]), negs])
    total, terms = _loss(obj, logits, torch.tensor([1]), False, teacher_logits=torch.tensor([[0.0, 0.0]]),
                         h_t=h_t, h_s=h_s, negatives=ClassNegatives(rows, torch.tensor([1])))
    # cosines: positive 1/sqrt(2), negatives 0 and -1
    pos = math.exp((1 / math.sqrt(2)) / tau)
    crd = -math.log(pos / (pos + math.exp(0.0) + math.exp(-1 / tau)))
    assert terms["loss/kd"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["loss/crd"].item() == pytest.approx(crd, rel=1e-6)
    assert total.item() == pytest.approx(math.log(2) + 2.0 * crd, rel=1e-6)
    assert terms["bank/pos_sim"].item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert terms["bank/neg_sim"].item() == pytest.approx(-0.5, rel=1e-6)
    # the collapse diagnostics: gap, L_CRD / log(K+1) with K = 2, the projected features' norms
    assert terms["bank/sim_gap"].item() == pytest.approx(1 / math.sqrt(2) + 0.5, rel=1e-6)
    assert terms["crd/loss_over_log_k1"].item() == pytest.approx(crd / math.log(3), rel=1e-6)
    assert terms["crd/student_norm"].item() == pytest.approx(math.sqrt(2), rel=1e-6)
    assert terms["crd/teacher_norm"].item() == pytest.approx(1.0, rel=1e-6)


def test_codir_half_precision_logits_give_fp32_total():
    x = _inputs(5)
    obj = build_method(MethodConfig(), "finetune")
    total, _ = _loss(obj, x["logits"].detach().half(), x["labels"], False, teacher_logits=x["teacher_logits"].half(),
                     h_t=x["h_t"].detach().half(), h_s=x["h_s"].detach().half(),
                     negatives=_per_anchor(x["negatives"].half()))
    assert total.dtype == torch.float32 and torch.isfinite(total)


# ----------------------------------------------------------------------------- regression

def test_regression_task_and_kd_are_mse():
    alpha = 0.7
    obj = build_method(_ns(name="kd", alpha_kd=alpha, kd_temperature=2.0, kd_t2_scale=True), "finetune")
    preds = torch.tensor([[1.0], [2.0], [-1.0]], requires_grad=True)
    targets = torch.tensor([0.5, 2.5, 1.0])
    teacher = torch.tensor([[1.5], [1.0], [-1.0]])
    total, terms = _loss(obj, preds, targets, True, teacher_logits=teacher)
    task = (0.25 + 0.25 + 4.0) / 3       # 1.5
    kd = (0.25 + 1.0 + 0.0) / 3          # 0.41666...
    assert terms["loss/task"].item() == pytest.approx(task, rel=1e-6)
    assert terms["loss/kd"].item() == pytest.approx(kd, rel=1e-6)  # no rho^2 on an MSE
    assert total.item() == pytest.approx(task + alpha * kd, rel=1e-6)
    total.backward()
    # d/dz [ (z-y)^2/3 + a (z-t)^2/3 ] = 2(z-y)/3 + 2a(z-t)/3
    expected = [2 * (p - y) / 3 + 2 * alpha * (p - t) / 3 for p, y, t in ((1.0, 0.5, 1.5), (2.0, 2.5, 1.0),
                                                                          (-1.0, 1.0, -1.0))]
    torch.testing.assert_close(preds.grad.squeeze(-1), torch.tensor(expected))


def test_regression_codir_adds_crd():
    x = _inputs(6)
    preds = torch.randn(4, 1)
    targets = torch.randn(4)
    teacher = torch.randn(4, 1)
    obj = build_method(_ns(alpha_kd=0.3, alpha_crd=0.2, crd_temperature=0.07), "finetune")
    total, terms = _loss(obj, preds, targets, True, teacher_logits=teacher, h_t=x["h_t"], h_s=x["h_s"],
                         negatives=_per_anchor(x["negatives"]))
    expected = (F.mse_loss(preds.squeeze(-1), targets) + 0.3 * F.mse_loss(preds, teacher)
                + 0.2 * crd_loss(x["h_t"], x["h_s"], x["negatives"], 0.07))
    torch.testing.assert_close(total, expected)
    assert "bank/pos_sim" in terms and "bank/neg_sim" in terms

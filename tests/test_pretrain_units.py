"""Pre-training components: masking, in-batch negatives, KD on masked positions, MLM models."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from codir_ds.assets import minilm_dir
from codir_ds.data.mlm import IGNORE_INDEX, MLMCollator
from codir_ds.distill.losses import crd_loss, crd_loss_shared, kd_loss
from codir_ds.distill.methods import LossInputs, StudentOutput, TeacherOutput, build_method
from codir_ds.distill.negatives import BatchNegatives, batch_negatives, self_mask
from codir_ds.errors import CodirError
from codir_ds.models.loading import build_student, export_student, load_tokenizer
from codir_ds.models.mlm import gather_rows, load_mlm_teacher, masked_rows


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(minilm_dir())


def _blocks(tok, n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(1000, 30000, (n, length - 2), generator=g)
    cls, sep = torch.full((n, 1), tok.cls_token_id), torch.full((n, 1), tok.sep_token_id)
    return list(torch.cat([cls, body, sep], dim=1))


def test_masking_statistics(tok):
    coll = MLMCollator(tok, 0.15, seed=3)
    blocks = _blocks(tok, 400, 128)
    batch = coll(blocks, list(range(400)), epoch=0)
    orig = torch.stack(blocks)
    selected = batch["labels"] != IGNORE_INDEX
    ordinary = selected.numel() - 2 * 400
    assert abs(selected.sum().item() / ordinary - 0.15) < 0.005
    n = selected.sum().item()
    masked = (batch["input_ids"] == tok.mask_token_id) & selected
    unchanged = (batch["input_ids"] == orig) & selected
    replaced = selected & ~masked & ~unchanged
    assert abs(masked.sum().item() / n - 0.8) < 0.015
    assert abs(unchanged.sum().item() / n - 0.1) < 0.012  # (a random token may equal the original: ~0)
    assert abs(replaced.sum().item() / n - 0.1) < 0.012
    # labels hold the original tokens at selected positions only
    assert torch.equal(batch["labels"][selected], orig[selected])
    # random replacements are never special tokens
    special = torch.tensor(tok.all_special_ids)
    assert not torch.isin(batch["input_ids"][replaced], special).any()


def test_special_tokens_and_padding_never_masked(tok):
    coll = MLMCollator(tok, 0.9, seed=0)  # high rate so that any leak would show
    blocks = [torch.tensor([tok.cls_token_id] + [2000 + i for i in range(n)] + [tok.sep_token_id]) for n in (3, 10, 30)]
    batch = coll(blocks, [0, 1, 2])
    lab, inp, att = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert lab.shape == (3, 32)
    assert (lab[:, 0] == IGNORE_INDEX).all()
    for row, b in enumerate(blocks):
        n = b.numel()
        assert lab[row, n - 1] == IGNORE_INDEX and inp[row, n - 1] == tok.sep_token_id
        assert (lab[row, n:] == IGNORE_INDEX).all() and (inp[row, n:] == tok.pad_token_id).all()
        assert att[row, :n].all() and not att[row, n:].any()
        assert inp[row, 0] == tok.cls_token_id


def test_masking_is_dynamic_but_reproducible(tok):
    coll = MLMCollator(tok, 0.15, seed=5)
    blocks = _blocks(tok, 4, 64)
    a = coll(blocks, [10, 11, 12, 13], epoch=1)
    b = coll(blocks[2:], [12, 13], epoch=1)  # another batch composition: same masks per example id
    assert torch.equal(a["input_ids"][2:], b["input_ids"]) and torch.equal(a["labels"][2:], b["labels"])
    c = coll(blocks, [10, 11, 12, 13], epoch=2)  # a new epoch: a new mask
    assert not torch.equal(a["labels"], c["labels"])
    d = MLMCollator(tok, 0.15, seed=5)(blocks, [10, 11, 12, 13], epoch=1)
    assert torch.equal(a["input_ids"], d["input_ids"])


def test_shared_crd_equals_per_anchor_crd():
    torch.manual_seed(0)
    b, g, m = 4, 7, 8
    h_t, h_s, cand = torch.randn(b, m), torch.randn(b, m), torch.randn(g, m)
    anchor_ids = torch.tensor([100, 3, 5, 200])
    cand_ids = torch.tensor([1, 3, 5, 7, 9, 11, 13])
    exclude = self_mask(anchor_ids, cand_ids)
    loss, pos, neg = crd_loss_shared(h_t, h_s, cand, exclude, 0.1)
    per_anchor = []
    for i in range(b):
        negs = cand[~exclude[i]].unsqueeze(0)
        per_anchor.append(crd_loss(h_t[i:i + 1], h_s[i:i + 1], negs, 0.1))
    assert torch.allclose(loss, torch.stack(per_anchor).mean(), atol=1e-6)
    assert torch.allclose(pos, F.cosine_similarity(h_t, h_s), atol=1e-6)
    # hand check of anchor 1 (id 3 is candidate 1, excluded): explicit InfoNCE
    t, s, c = F.normalize(h_t[1], dim=0), F.normalize(h_s[1], dim=0), F.normalize(cand, dim=1)
    logits = torch.cat([(t @ s).view(1), c[[0, 2, 3, 4, 5, 6]] @ t]) / 0.1
    assert torch.allclose(per_anchor[1], -torch.log_softmax(logits, 0)[0], atol=1e-6)


def test_in_batch_negatives_exclude_the_positive():
    ids = torch.tensor([4, 9, 2, 7, 11, 0])
    cand = batch_negatives(ids, num_negatives=100, seed=1, step=0, world=1)
    assert torch.equal(cand, torch.sort(ids).values)  # all of the global batch when it is small, by id
    mask = self_mask(ids, cand)
    assert torch.equal(mask.sum(1), torch.ones(6, dtype=torch.long))  # exactly the anchor itself
    assert torch.equal(cand[mask.int().argmax(1)], ids)
    # the subset depends on the set of ids, not on the order ranks contributed them in
    big = torch.arange(50)
    assert torch.equal(batch_negatives(big, 9, seed=1, step=3, world=1),
                       batch_negatives(big.flip(0), 9, seed=1, step=3, world=1))
    # capped: a seeded subset of num_negatives + 1 rows, the same for the same step
    big = torch.arange(50)
    a = batch_negatives(big, 9, seed=1, step=3, world=1)
    assert a.numel() == 10 and len(set(a.tolist())) == 10
    assert torch.equal(a, batch_negatives(big, 9, seed=1, step=3, world=1))
    assert not torch.equal(a, batch_negatives(big, 9, seed=1, step=4, world=1))
    m = self_mask(big[:5], a)
    assert (m.sum(1) <= 1).all()
    # the positive's own bank row gets no weight in the loss: changing it changes nothing
    h_t, h_s = torch.randn(6, 4), torch.randn(6, 4)
    rows = torch.randn(6, 4)
    l1, _, _ = crd_loss_shared(h_t, h_s, rows, mask, 0.07)
    rows2 = rows.clone()
    rows2[int(mask[0].int().argmax())] = 100 * torch.randn(4)  # anchor 0's own row
    changed = crd_loss_shared(h_t[:1], h_s[:1], rows2, mask[:1], 0.07)[0]
    assert torch.allclose(changed, crd_loss_shared(h_t[:1], h_s[:1], rows, mask[:1], 0.07)[0])


def _mlm_model(tok, seed, layers=1):
    torch.manual_seed(seed)
    cfg = SimpleNamespace(init_from=None, student_init=None, student_init_layers=None, student_layers=layers,
                          student_hidden=16, student_heads=2, student_intermediate=32, dropout=0.0)
    return build_student(cfg, 0, False, tok, masked_lm=True).eval()


def test_kd_on_masked_positions_only(tok):
    """The pre-training KD term equals a hand-computed KL over masked positions of full logits."""
    from codir_ds.distill.heads import PretrainModule
    from codir_ds.engine.teacher import MLMTeacherRunner

    student, teacher = _mlm_model(tok, 0), _mlm_model(tok, 1, layers=2).requires_grad_(False)
    coll = MLMCollator(tok, 0.3, seed=0)
    batch = coll(_blocks(tok, 3, 20), [0, 1, 2])
    rows = masked_rows(batch["labels"])
    module = PretrainModule(student, [1], "mean")
    out = module(batch["input_ids"], batch["attention_mask"], rows)
    t_out = MLMTeacherRunner(teacher, None, "mean", logits=True)(batch["input_ids"], batch["attention_mask"], rows)
    labels = batch["labels"].reshape(-1)[rows]
    assert out["logits"].shape == (rows.numel(), student.config.vocab_size) == t_out.logits.shape
    cfg = SimpleNamespace(name="kd", alpha_kd=0.5, kd_temperature=2.0, kd_t2_scale=True, crd_temperature=0.07)
    method = build_method(cfg, "pretrain")
    assert method.teacher.logits
    total, terms = method.loss(StudentOutput.from_module(out), t_out, LossInputs(labels, pretraining=True))

    full_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sel = batch["labels"] != IGNORE_INDEX
    zs, zt = full_s[sel] / 2.0, full_t[sel] / 2.0
    kl = (F.softmax(zt, -1) * (F.log_softmax(zt, -1) - F.log_softmax(zs, -1))).sum(-1).mean() * 4.0
    mlm = F.cross_entropy(full_s[sel], batch["labels"][sel])
    assert torch.allclose(terms["loss/kd"], kl, atol=1e-5)
    assert torch.allclose(terms["loss/mlm"], mlm, atol=1e-5)
    assert torch.allclose(total, mlm + 0.5 * kl, atol=1e-5)
    # unmasked positions of the teacher do not matter: perturbing them leaves KD unchanged
    assert sel.sum() < sel.numel()


def test_mlm_objective_without_masked_tokens_is_zero():
    cfg = SimpleNamespace(name="mlm")
    logits = torch.zeros(0, 10, requires_grad=True)
    total, terms = build_method(cfg, "pretrain").loss(StudentOutput(logits), None,
                                                      LossInputs(torch.zeros(0, dtype=torch.long), pretraining=True))
    assert total.item() == 0.0
    total.backward()


def test_token_scale_multiplies_mlm_and_kd():
    """The global-batch token scale multiplies the masked-LM and KD means (not alpha_kd)."""
    torch.manual_seed(3)
    logits, t_logits = torch.randn(5, 11, requires_grad=True), torch.randn(5, 11)
    labels = torch.randint(0, 11, (5,))
    scale = torch.tensor(1.5)
    cfg = SimpleNamespace(name="kd", alpha_kd=0.5, kd_temperature=2.0, kd_t2_scale=True)
    total, terms = build_method(cfg, "pretrain").loss(StudentOutput(logits), TeacherOutput(t_logits),
                                                      LossInputs(labels, pretraining=True, token_scale=scale))
    mlm, kd = F.cross_entropy(logits, labels), kd_loss(logits, t_logits, 2.0) * 4.0
    assert set(terms) == {"loss/mlm", "loss/kd", "loss/total"}
    assert torch.allclose(terms["loss/mlm"], 1.5 * mlm.detach(), atol=1e-6)
    assert torch.allclose(terms["loss/kd"], 1.5 * kd.detach(), atol=1e-6)
    assert torch.allclose(total, 1.5 * mlm + 0.5 * 1.5 * kd, atol=1e-6)
    # MLM alone: scaled the same way
    total, terms = build_method(SimpleNamespace(name="mlm"), "pretrain").loss(
        StudentOutput(logits), None, LossInputs(labels, pretraining=True, token_scale=scale))
    assert set(terms) == {"loss/mlm", "loss/total"} and torch.allclose(total, 1.5 * mlm, atol=1e-6)


def test_codir_pretrain_with_in_batch_negatives():
    """CoDIR-Pre: MLM + KD + CRD against the shared in-batch candidates; alpha_kd = 0 needs no teacher logits."""
    torch.manual_seed(4)
    b, g, m = 4, 6, 8
    logits, t_logits = torch.randn(7, 11), torch.randn(7, 11)
    labels = torch.randint(0, 11, (7,))
    h_t, h_s, cand = torch.randn(b, m), torch.randn(b, m), torch.randn(g, m)
    exclude = self_mask(torch.tensor([2, 9, 4, 30]), torch.tensor([0, 2, 4, 6, 8, 9]))
    neg = BatchNegatives(cand, exclude)
    crd, pos, mean_neg = crd_loss_shared(h_t, h_s, cand, exclude, 0.07)
    cfg = SimpleNamespace(name="codir", alpha_kd=0.5, alpha_crd=0.2, kd_temperature=2.0, kd_t2_scale=True,
                          crd_temperature=0.07)
    method = build_method(cfg, "pretrain")
    assert method.teacher is not None and method.teacher.logits
    total, terms = method.loss(StudentOutput(logits, h_s=h_s, h_t=h_t), TeacherOutput(t_logits),
                               LossInputs(labels, pretraining=True, negatives=neg))
    want = F.cross_entropy(logits, labels) + 0.5 * 4.0 * kd_loss(logits, t_logits, 2.0) + 0.2 * crd
    assert torch.allclose(total, want, atol=1e-6)
    assert torch.allclose(terms["loss/crd"], crd) and torch.allclose(terms["bank/pos_sim"], pos.mean())
    assert torch.allclose(terms["bank/neg_sim"], mean_neg.mean())
    # alpha_kd = 0: the teacher's MLM head is not needed; no KD term, no teacher logits read
    cfg.alpha_kd = 0.0
    method = build_method(cfg, "pretrain")
    assert method.teacher is not None and not method.teacher.logits
    total, terms = method.loss(StudentOutput(logits, h_s=h_s, h_t=h_t), TeacherOutput(None),
                               LossInputs(labels, pretraining=True, negatives=neg))
    assert "loss/kd" not in terms
    assert torch.allclose(total, F.cross_entropy(logits, labels) + 0.2 * crd, atol=1e-6)


def test_headless_teacher_is_refused_for_kd(tok, tiny_teacher, tiny_mlm_teacher):
    with pytest.raises(CodirError, match="fit_teacher_head.py"):
        load_mlm_teacher(str(tiny_teacher), torch.float32, need_head=True)
    body = load_mlm_teacher(str(tiny_teacher), torch.float32, need_head=False)
    assert not any(p.requires_grad for p in body.parameters()) and not body.training
    full = load_mlm_teacher(str(tiny_mlm_teacher), torch.float32, need_head=True)
    assert type(full).__name__ == "BertForMaskedLM" and not any(p.requires_grad for p in full.parameters())


def test_init_from_loads_previous_stage(tmp_path, tok):
    stage1 = _mlm_model(tok, 4)
    export_student(stage1, tok, tmp_path / "run1" / "export", {"stage": "pretrain"})
    cfg = SimpleNamespace(init_from=str(tmp_path / "run1"), student_init=None, student_init_layers=None,
                          dropout=0.1)
    stage2 = build_student(cfg, 0, False, tok, masked_lm=True)
    ref = stage1.state_dict()
    for k, v in stage2.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # finetuning from a pre-trained student: the body comes from stage 1, the classifier is new
    clf = build_student(cfg, 2, False, tok)
    assert torch.equal(clf.bert.embeddings.word_embeddings.weight, stage1.bert.embeddings.word_embeddings.weight)
    (tmp_path / "run2" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CodirError, match="no export/ yet"):
        build_student(SimpleNamespace(init_from=str(tmp_path / "run2"), student_init=None, dropout=0.1),
                      0, False, tok, masked_lm=True)


def test_gather_rows_matches_boolean_indexing():
    seq = torch.randn(3, 5, 4)
    labels = torch.full((3, 5), -100)
    labels[0, 1] = labels[2, 3] = labels[2, 4] = 7
    rows = masked_rows(labels)
    assert torch.equal(gather_rows(seq, rows), seq[labels != -100])

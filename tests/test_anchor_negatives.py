"""method.finetune_negatives=anchor: each anchor draws its own K negatives of another label.

Sampler (label rule, independence, determinism), the loss against a hand computation and against
the per-class loss, the collective fetch on two real gloo ranks against a one-process reference,
and a real finetuning run that trains with it.
"""
from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from codir_ds.config import load_config
from codir_ds.distill.losses import crd_loss, crd_loss_anchors, crd_loss_classes
from codir_ds.distill.memory_bank import ShardedMemoryBank
from codir_ds.distill.negatives import AnchorNegatives, LabelNegativeSampler
from codir_ds.errors import CodirError
from test_memory_bank import _free_port, _spawn

DS = "ds_configs/zero2.json"
N, M, K = 40, 6, 5


def _labels():
    return torch.arange(N) % 3


def test_each_anchor_draws_its_own_negatives_of_another_label():
    labels = _labels()
    s = LabelNegativeSampler(labels, num_negatives=50, seed=4)
    anchors = torch.tensor([0, 3, 6, 1, 2])  # three anchors of class 0
    neg = s.sample_anchors(7, anchors)
    assert neg.shape == (5, 50) and neg.dtype == torch.long
    for i, a in enumerate(anchors.tolist()):
        assert (labels[neg[i]] != labels[a]).all()
    # anchors of one class do not share a set (the per-class rule would give them the same row)
    assert not torch.equal(neg[0], neg[1]) and not torch.equal(neg[1], neg[2])
    # no hidden state: the same (seed, step, anchors) gives the same draw, another step another one
    assert torch.equal(neg, s.sample_anchors(7, anchors))
    assert not torch.equal(neg, s.sample_anchors(8, anchors))
    # every candidate of another label can be drawn
    many = torch.cat([s.sample_anchors(t, torch.tensor([0]))[0] for t in range(40)])
    assert set(many.tolist()) == set((labels != 0).nonzero().flatten().tolist())


def test_anchor_loss_matches_a_hand_computation_and_the_class_loss():
    h_t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    h_s = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    rows = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]], [[1.0, 0.0], [0.0, -3.0]]])  # [B=2, K=2, m=2]
    tau = 0.5
    # anchor 0: pos cos 1/sqrt2, neg cos 0 and -1; anchor 1: pos 1, neg 0 and -1
    want = [-math.log(math.exp(p / tau) / (math.exp(p / tau) + math.exp(0) + math.exp(-1 / tau)))
            for p in (1 / math.sqrt(2), 1.0)]
    loss, pos, neg = crd_loss_anchors(h_t, h_s, rows, tau)
    assert loss.item() == pytest.approx(sum(want) / 2, rel=1e-6)
    assert pos.tolist() == pytest.approx([1 / math.sqrt(2), 1.0]) and neg.tolist() == pytest.approx([-0.5, -0.5])
    assert crd_loss(h_t, h_s, rows, tau).item() == pytest.approx(loss.item(), rel=1e-7)
    # the same rows given as one set per "class" (anchor b has class b): the per-class loss agrees
    classes = crd_loss_classes(h_t, h_s, rows, torch.tensor([0, 1]), tau)
    assert classes[0].item() == pytest.approx(loss.item(), rel=1e-6)
    # what the recipe hands the method
    out = AnchorNegatives(rows).loss(h_t, h_s, tau)
    assert out[0].item() == pytest.approx(loss.item(), rel=1e-7) and AnchorNegatives(rows).per_anchor == 2.0


def test_one_rank_fetch_reads_the_sampled_rows_per_micro_batch():
    labels = _labels()
    s = LabelNegativeSampler(labels, K, seed=1)
    bank = ShardedMemoryBank(N, M, 0.5, seed=0)
    step_ids = torch.tensor([9, 2, 30, 17])
    got = s.anchor_negatives(bank, 3, step_ids, world=1)
    assert torch.equal(got.ids, torch.tensor([2, 9, 17, 30]))
    want = bank.rows[s.sample_anchors(3, torch.tensor([2, 9, 17, 30]))]
    assert torch.equal(got.rows, want)
    micro = got.for_batch(torch.tensor([30, 9]))  # one micro-batch, in its own order
    assert torch.equal(micro.rows, want[torch.tensor([3, 1])])
    for stray in ([30, 10], [31]):  # an id the step did not draw for (inside and past the sorted range)
        with pytest.raises(ValueError, match="not among the step's ids"):
            got.for_batch(torch.tensor(stray))
    with pytest.raises(ValueError, match="bank has"):
        s.anchor_negatives(ShardedMemoryBank(N + 1, M, 0.5), 3, step_ids, world=1)


def _worker(rank, world, port, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        bank = ShardedMemoryBank(N, M, 0.5, seed=3)
        bank.update(bank.owned_ids(), torch.randn(bank.num_local, M, generator=torch.Generator().manual_seed(rank)))
        s = LabelNegativeSampler(_labels(), K, seed=1)
        local = torch.tensor([[4, 10, 22], [7, 1, 33]])[rank]  # each rank's own ids of the step
        got = s.anchor_negatives(bank, 5, local, world)
        torch.save({"ids": got.ids, "rows": got.rows, "mine": got.for_batch(local).rows,
                    "bank": bank.state_dict()}, os.path.join(tmp, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_fetch_the_same_rows_as_one_process(tmp_path):
    _spawn(_worker, 2, (_free_port(), str(tmp_path)))
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref_bank = ShardedMemoryBank(N, M, 0.5, seed=3)
    ref_bank.load_state_dict([o["bank"] for o in outs])  # the two shards as one bank
    s = LabelNegativeSampler(_labels(), K, seed=1)
    ids = torch.tensor([1, 4, 7, 10, 22, 33])
    ref = s.anchor_negatives(ref_bank, 5, ids, world=1)
    for r, out in enumerate(outs):
        assert torch.equal(out["ids"], ids)
        assert torch.allclose(out["rows"], ref.rows)
        local = torch.tensor([[4, 10, 22], [7, 1, 33]])[r]
        assert torch.allclose(out["mine"], ref.for_batch(local).rows)


def test_a_finetuning_run_trains_with_per_anchor_negatives(tmp_path, tiny_config, single_process_env):
    from codir_ds.recipes import recipe_for
    cfg = load_config(str(tiny_config), ["method.finetune_negatives=anchor", "training.checkpoint_every=0"])
    recipe = recipe_for(cfg, "finetune", DS, str(tmp_path / "run"))
    recipe.setup()
    seen = []
    loss = recipe.method.loss

    def spy(student, teacher, batch):
        seen.append((type(batch.negatives).__name__, tuple(batch.negatives.rows.shape), len(batch.labels)))
        return loss(student, teacher, batch)

    recipe.method.loss = spy
    recipe.train()
    k, m = cfg.method.num_negatives, cfg.method.projection_dim
    assert seen and all(name == "AnchorNegatives" and shape == (b, k, m) for name, shape, b in seen), seen


def test_an_unknown_negative_rule_is_a_one_line_config_error(tiny_config):
    with pytest.raises(CodirError, match="method.finetune_negatives") as err:
        load_config(str(tiny_config), ["method.finetune_negatives=sample"])
    assert "\n" not in str(err.value)

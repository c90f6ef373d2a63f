"""LabelNegativeSampler: label rule, determinism per (seed, step), bank lookup.

The two-rank case (same negatives on both ranks via the collective gather) is
in test_memory_bank.py::test_two_gloo_ranks_match_reference.
"""

import pytest
import torch

from codir_ds.distill.memory_bank import ShardedMemoryBank
from codir_ds.distill.negatives import LabelNegativeSampler
from oracles import ids_for_batch, negatives_for_batch


def _labels():
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 3, (200,), generator=g)
    lab[:5] = 4  # class 3 has no example: a gap in the label ids
    return lab


def test_sampled_ids_have_a_different_label():
    labels = _labels()
    s = LabelNegativeSampler(labels, num_negatives=50, seed=2)
    assert s.num_classes == 5
    for step in range(5):
        neg = s.sample(step)
        assert neg.shape == (5, 50) and neg.dtype == torch.long
        assert int(neg.min()) >= 0 and int(neg.max()) < labels.numel()
        for c in range(5):
            assert (labels[neg[c]] != c).all()
    # every candidate can be drawn: over many draws class 0's negatives cover
    # most ids of the other classes
    many = torch.cat([s.sample(t)[0] for t in range(100)])
    assert set(many.tolist()) == set((labels != 0).nonzero().flatten().tolist())


def test_same_seed_and_step_same_sets_different_steps_differ():
    labels = _labels()
    a = LabelNegativeSampler(labels, 16, seed=9)
    b = LabelNegativeSampler(labels.clone(), 16, seed=9)
    assert torch.equal(a.sample(7), b.sample(7))
    assert torch.equal(a.sample(7), a.sample(7))  # no hidden state: resume-safe
    assert not torch.equal(a.sample(7), a.sample(8))
    assert not torch.equal(a.sample(7), LabelNegativeSampler(labels, 16, seed=10).sample(7))
    ids = ids_for_batch(a, 7, torch.tensor([2, 0, 2]))
    assert torch.equal(ids, a.sample(7)[torch.tensor([2, 0, 2])])


def test_negatives_for_batch_reads_bank_rows():
    labels = _labels()
    s = LabelNegativeSampler(labels, 8, seed=1)
    bank = ShardedMemoryBank(labels.numel(), 4, 0.5, seed=0)
    batch_labels = torch.tensor([1, 0, 1, 4])
    feats = negatives_for_batch(s, bank, 3, batch_labels)
    assert feats.shape == (4, 8, 4) and feats.dtype == torch.float32
    assert torch.equal(feats, bank.rows[s.sample(3)[batch_labels]])
    assert negatives_for_batch(s, bank, 3, torch.tensor([], dtype=torch.long)).shape == (0, 8, 4)
    with pytest.raises(ValueError, match="bank has"):
        negatives_for_batch(s, ShardedMemoryBank(10, 4, 0.5), 3, batch_labels)
    with pytest.raises(ValueError, match="batch labels"):
        negatives_for_batch(s, bank, 3, torch.tensor([5]))


def test_construction_errors():
    with pytest.raises(ValueError, match="different label"):
        LabelNegativeSampler(torch.zeros(10, dtype=torch.long), 4, seed=0)
    with pytest.raises(ValueError, match="regression"):
        LabelNegativeSampler(torch.rand(10), 4, seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        LabelNegativeSampler(torch.tensor([0, 1, -100]), 4, seed=0)
    with pytest.raises(ValueError, match="num_negatives"):
        LabelNegativeSampler(torch.tensor([0, 1]), 0, seed=0)

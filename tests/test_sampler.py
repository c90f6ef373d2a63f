"""OwnedShardSampler: ownership, equal batch counts, determinism, exact resume."""

import pytest
import torch

from codir_ds.data.sampler import OwnedShardSampler, owner_of


def _epoch(sampler):
    return [b.tolist() for b in sampler]


@pytest.mark.parametrize("n,w,bs", [(103, 4, 5), (100, 3, 7), (64, 1, 8), (10, 3, 3)])
def test_ownership_and_equal_batch_counts(n, w, bs):
    per_rank = []
    for r in range(w):
        s = OwnedShardSampler(n, bs, r, w, seed=7)
        batches = _epoch(s)
        assert len(batches) == s.batches_per_epoch == (n // w) // bs
        assert all(len(b) == bs for b in batches)
        ids = [i for b in batches for i in b]
        assert len(ids) == len(set(ids))  # no id twice within an epoch
        assert all(i % w == r for i in ids)
        assert all(0 <= i < n for i in ids)
        assert (owner_of(torch.tensor(ids, dtype=torch.long), w) == r).all()
        per_rank.append(set(ids))
    # every rank yields the same number of batches even though N % W != 0
    assert len({len(p) for p in per_rank}) == 1
    for a in range(w):
        for b in range(a + 1, w):
            assert not per_rank[a] & per_rank[b]
    assert set().union(*per_rank) <= set(range(n))
    assert owner_of(7, 3) == 1


def test_determinism_and_epochs_differ():
    a = OwnedShardSampler(200, 8, 1, 2, seed=3)
    b = OwnedShardSampler(200, 8, 1, 2, seed=3)
    assert _epoch(a) == _epoch(b)
    a.set_epoch(1)
    e1 = _epoch(a)
    b.set_epoch(0)
    assert e1 != _epoch(b)
    c = OwnedShardSampler(200, 8, 1, 2, seed=4)
    assert _epoch(c) != _epoch(OwnedShardSampler(200, 8, 1, 2, seed=3))
    # iterating again without set_epoch yields nothing: the epoch is consumed
    assert _epoch(a) == []
    a.set_epoch(1)
    assert _epoch(a) == e1


def test_resume_mid_epoch_equals_uninterrupted():
    ref = OwnedShardSampler(150, 4, 2, 3, seed=11)
    ref.set_epoch(2)
    full = _epoch(ref)

    s = OwnedShardSampler(150, 4, 2, 3, seed=11)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it).tolist() for _ in range(5)]
    state = s.state_dict()
    assert state["position"] == 5 and state["epoch"] == 2

    resumed = OwnedShardSampler(150, 4, 2, 3, seed=11)
    resumed.load_state_dict(state)
    assert head + _epoch(resumed) == full


def test_load_state_validation_and_non_strict():
    s = OwnedShardSampler(120, 4, 0, 2, seed=1)
    it = iter(s)
    for _ in range(6):
        next(it)
    state = s.state_dict()
    other = OwnedShardSampler(120, 4, 0, 3, seed=1)
    with pytest.raises(ValueError, match="different layout"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert other.epoch == 0 and other.position == (6 * 4 * 2) // (4 * 3)
    with pytest.raises(ValueError):
        OwnedShardSampler(5, 4, 0, 2, seed=0)  # fewer ids than a batch per rank

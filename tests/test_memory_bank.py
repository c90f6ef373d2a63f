"""ShardedMemoryBank against a naive full-replica reference, 1 and 2 gloo ranks."""

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from codir_ds.distill import memory_bank as mb
from codir_ds.distill.memory_bank import ShardedMemoryBank
from codir_ds.distill.negatives import LabelNegativeSampler
from oracles import negatives_for_batch

N, M, BETA, SEED = 37, 6, 0.75, 5


class RefBank:
    """Naive full replica: every row on one tensor; the feature L2-normalised, Eq. 5, then L2 re-normalise."""

    def __init__(self, init_rows, beta):
        self.rows = init_rows.clone()
        self.beta = beta

    def update(self, ids, feats):
        for i, f in zip(ids.tolist(), feats.float()):
            self.rows[i] = F.normalize(self.beta * self.rows[i] + (1 - self.beta) * F.normalize(f, dim=0), dim=0)


def _steps(n_steps=3, batch=12):
    """Deterministic global batches (ids without duplicates, features)."""
    out = []
    for step in range(n_steps):
        g = torch.Generator().manual_seed(100 + step)
        ids = torch.randperm(N, generator=g)[:batch]
        feats = (torch.randn(batch, M, generator=g) * 3).to(torch.bfloat16 if step == 1 else torch.float32)
        out.append((ids, feats))
    return out


def _reference():
    ref = RefBank(ShardedMemoryBank(N, M, BETA, seed=SEED).rows, BETA)
    for ids, feats in _steps():
        ref.update(ids, feats)
    return ref


def _fake_layout(monkeypatch, rank, world):
    monkeypatch.setattr(mb, "_dist_layout", lambda group: (rank, world))


# ----------------------------------------------------------- single process
def test_init_rows_unit_norm_deterministic_and_world_size_independent(monkeypatch):
    n = mb._INIT_CHUNK + 50  # crosses an init chunk boundary
    full = ShardedMemoryBank(n, 4, 0.5, seed=3)
    assert full.rows.shape == (n, 4) and full.rows.dtype == torch.float32
    assert torch.allclose(full.rows.norm(dim=1), torch.ones(n), atol=1e-5)
    assert torch.equal(full.rows, ShardedMemoryBank(n, 4, 0.5, seed=3).rows)
    assert not torch.equal(full.rows, ShardedMemoryBank(n, 4, 0.5, seed=4).rows)
    for r in range(3):
        _fake_layout(monkeypatch, r, 3)
        shard = ShardedMemoryBank(n, 4, 0.5, seed=3)
        owned = shard.owned_ids()
        assert torch.equal(owned, torch.arange(r, n, 3))
        assert torch.equal(shard.rows, full.rows[owned])


def test_update_normalises_the_feature_before_eq5():
    """By hand: row (1, 0), feature (0, 10), β = 0.5 -> normalize(0.5·(1, 0) + 0.5·(0, 1)) = (√½, √½).
    Eq. 5 on the raw feature would give normalize((0.5, 5)) = (0.0995, 0.995): the row would follow
    the feature's norm instead of β."""
    bank = ShardedMemoryBank(2, 2, 0.5, seed=0)
    bank.rows[:] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank.update(torch.tensor([0]), torch.tensor([[0.0, 10.0]]))
    half = 0.5 ** 0.5
    assert torch.allclose(bank.rows, torch.tensor([[half, half], [0.0, 1.0]]), atol=1e-7)
    bank.rows[1] = torch.tensor([1.0, 0.0])
    bank.update(torch.tensor([1]), torch.tensor([[0.0, 1e-3]]))  # a tiny feature moves the row just as far
    assert torch.allclose(bank.rows[1], torch.tensor([half, half]), atol=1e-6)


def test_raw_feature_update_is_the_ablation():
    """normalize_features=False (method.bank_normalize=false) applies Eq. 5 to the raw feature:
    row (1, 0), feature (0, 10), β = 0.5 -> normalize((0.5, 5)) = (0.0995, 0.995), by hand."""
    bank = ShardedMemoryBank(2, 2, 0.5, seed=0, normalize_features=False)
    bank.rows[:] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank.update(torch.tensor([0]), torch.tensor([[0.0, 10.0]]))
    r = 1.0 / (0.5 ** 2 + 5.0 ** 2) ** 0.5
    assert torch.allclose(bank.rows[0], torch.tensor([0.5 * r, 5.0 * r]), atol=1e-6)
    assert abs(bank.rows[0, 0].item() - 0.0995) < 1e-4


def test_single_process_updates_match_reference_and_read():
    bank = ShardedMemoryBank(N, M, BETA, seed=SEED)
    assert (bank.rank, bank.world_size) == (0, 1)
    for ids, feats in _steps():
        bank.update(ids, feats)
    ref = _reference()
    assert torch.allclose(bank.rows, ref.rows, atol=1e-6)
    q = torch.tensor([3, 3, 0, N - 1])
    assert torch.allclose(bank.read(q), ref.rows[q], atol=1e-6)
    assert torch.allclose(bank.gather(q), ref.rows[q], atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        bank.read(torch.tensor([N]))


def test_duplicate_ids_in_one_update_are_sequential():
    a = ShardedMemoryBank(N, M, BETA, seed=1)
    b = ShardedMemoryBank(N, M, BETA, seed=1)
    ids = torch.tensor([4, 9, 4, 4, 2])
    feats = torch.randn(5, M)
    a.update(ids, feats)
    for i in range(5):
        b.update(ids[i : i + 1], feats[i : i + 1])
    assert torch.allclose(a.rows, b.rows, atol=1e-6)


def test_update_validates_ownership_and_shape(monkeypatch):
    _fake_layout(monkeypatch, 1, 2)
    bank = ShardedMemoryBank(N, M, BETA, seed=SEED)
    with pytest.raises(ValueError, match="not owned by rank 1"):
        bank.update(torch.tensor([1, 2]), torch.randn(2, M))
    with pytest.raises(ValueError, match="not owned"):
        bank.read(torch.tensor([4]))
    with pytest.raises(ValueError, match="feats must be"):
        bank.update(torch.tensor([1, 3]), torch.randn(3, M))
    bank.update(torch.tensor([1, 3]), torch.randn(2, M))  # owned ids are fine


def test_state_dict_reshards_between_world_sizes(monkeypatch):
    ref = _reference()
    # three fake ranks each update their owned part of every global batch
    shards = []
    for r in range(3):
        _fake_layout(monkeypatch, r, 3)
        bank = ShardedMemoryBank(N, M, BETA, seed=SEED)
        for ids, feats in _steps():
            mine = ids % 3 == r
            bank.update(ids[mine], feats[mine])
        st = bank.state_dict()
        assert set(st) == {"num_examples", "dim", "momentum", "world_size", "rank", "ids", "rows", "updates"}
        assert (st["world_size"], st["rank"]) == (3, r)
        shards.append(st)
    # 3 -> 2 ranks
    for r in range(2):
        _fake_layout(monkeypatch, r, 2)
        bank = ShardedMemoryBank(N, M, BETA, seed=99)
        bank.load_state_dict(shards[::-1])  # order of shards does not matter
        assert torch.allclose(bank.rows, ref.rows[bank.owned_ids()], atol=1e-6)
        # a single shard of another layout is refused with a hint
        with pytest.raises(ValueError, match="list of the shards"):
            bank.load_state_dict(shards[0])
    # 3 -> 1 rank
    _fake_layout(monkeypatch, 0, 1)
    bank = ShardedMemoryBank(N, M, BETA, seed=99)
    bank.load_state_dict(shards)
    assert torch.allclose(bank.rows, ref.rows, atol=1e-6)
    # a shard of the same layout alone is accepted
    _fake_layout(monkeypatch, 2, 3)
    same = ShardedMemoryBank(N, M, BETA, seed=99)
    same.load_state_dict(shards[2])
    assert torch.equal(same.rows, shards[2]["rows"])
    # validation
    with pytest.raises(ValueError, match="exactly once"):
        same.load_state_dict(shards[:2])
    with pytest.raises(ValueError, match="exactly once"):
        same.load_state_dict(shards + [shards[0]])
    with pytest.raises(ValueError, match="num_examples"):
        ShardedMemoryBank(N + 1, M, BETA).load_state_dict(shards)
    with pytest.raises(ValueError, match="dim"):
        ShardedMemoryBank(N, M + 1, BETA).load_state_dict(shards)


# ------------------------------------------------------------ two gloo ranks
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tmp):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        bank = ShardedMemoryBank(N, M, BETA, seed=SEED)
        assert (bank.rank, bank.world_size) == (rank, world)
        assert torch.equal(bank.owned_ids(), torch.arange(rank, N, world))
        for ids, feats in _steps():
            mine = ids % world == rank
            bank.update(ids[mine], feats[mine])
        # non-owned ids are refused
        other = torch.tensor([1 - rank])
        for fn in (lambda: bank.update(other, torch.randn(1, M)), lambda: bank.read(other)):
            try:
                fn()
            except ValueError as e:
                assert "not owned" in str(e)
            else:
                raise AssertionError("non-owned id accepted")
        out = {"state": bank.state_dict()}
        # collective gathers: duplicates, both owners, unsorted; one owner only; empty
        out["g_mixed"] = bank.gather(torch.tensor([5, 0, 5, 3, N - 1, 2, 2, 7, 0]))
        out["g_one_owner"] = bank.gather(torch.tensor([4, 2, 4]))
        out["g_empty"] = bank.gather(torch.tensor([], dtype=torch.long))
        out["read_own"] = bank.read(bank.owned_ids())
        # finetuning negatives: same sets on both ranks, local labels differ
        labels = torch.arange(N) % 3
        neg = LabelNegativeSampler(labels, num_negatives=5, seed=1)
        out["neg_fixed"] = negatives_for_batch(neg, bank, 4, torch.tensor([0, 1, 2]))
        out["neg_local"] = negatives_for_batch(neg, bank, 4, torch.tensor([rank, 2, rank]))
        # 1-rank checkpoint (one dict covering all ids, and as a list) into 2 ranks
        single = torch.load(os.path.join(tmp, "single.pt"))
        b2 = ShardedMemoryBank(N, M, BETA, seed=123)
        b2.load_state_dict(single)
        out["from_single"] = b2.rows.clone()
        b3 = ShardedMemoryBank(N, M, BETA, seed=123)
        b3.load_state_dict([single])
        out["from_single_list"] = b3.rows.clone()
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(fn, world, args, timeout=120):
    ctx = mp.spawn(fn, args=(world,) + args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):  # raises if a child raised
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"spawned ranks did not finish within {timeout}s (hang in a collective?)")


def test_two_gloo_ranks_match_reference(tmp_path):
    ref = _reference()
    # a 1-rank checkpoint with content unlike any fresh init
    single_bank = ShardedMemoryBank(N, M, BETA, seed=77)
    single_bank.update(torch.arange(N), torch.randn(N, M))
    torch.save(single_bank.state_dict(), tmp_path / "single.pt")

    _spawn(_worker, 2, (_free_port(), str(tmp_path)))
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    q_mixed = torch.tensor([5, 0, 5, 3, N - 1, 2, 2, 7, 0])
    for r, out in enumerate(outs):
        ids = torch.arange(r, N, 2)
        assert torch.equal(out["state"]["ids"], ids)
        assert torch.allclose(out["state"]["rows"], ref.rows[ids], atol=1e-6)
        assert torch.allclose(out["read_own"], ref.rows[ids], atol=1e-6)
        assert torch.allclose(out["g_mixed"], ref.rows[q_mixed], atol=1e-6)
        assert torch.allclose(out["g_one_owner"], ref.rows[torch.tensor([4, 2, 4])], atol=1e-6)
        assert out["g_empty"].shape == (0, M)
        assert torch.equal(out["from_single"], single_bank.rows[ids])
        assert torch.equal(out["from_single_list"], single_bank.rows[ids])

    # negatives: identical on both ranks and equal to the reference rows
    assert torch.equal(outs[0]["neg_fixed"], outs[1]["neg_fixed"])
    neg = LabelNegativeSampler(torch.arange(N) % 3, num_negatives=5, seed=1)
    expected = ref.rows[neg.sample(4)]  # [C, K, m]
    assert outs[0]["neg_fixed"].shape == (3, 5, M)
    assert torch.allclose(outs[0]["neg_fixed"], expected, atol=1e-6)
    for r, out in enumerate(outs):
        assert torch.allclose(out["neg_local"], expected[torch.tensor([r, 2, r])], atol=1e-6)

    # 2-rank checkpoint into a 1-rank bank
    one = ShardedMemoryBank(N, M, BETA, seed=123)
    one.load_state_dict([o["state"] for o in outs])
    assert torch.allclose(one.rows, ref.rows, atol=1e-6)

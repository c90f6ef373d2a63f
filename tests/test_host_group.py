"""Pre-training's id exchange through a host-side gloo group (no host-device sync under NCCL), 2 real gloo ranks."""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tmp):
    from codir_ds.engine import distributed
    from codir_ds.distill.negatives import batch_negatives
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        out = {"gloo_default": distributed.host_group()}  # the default group is already host-side
        local = torch.arange(rank, 40, world)[:8]       # this rank's ids of the step
        out["plain"] = batch_negatives(local, 11, seed=3, step=5, world=world, device="cpu")
        real = dist.get_backend
        dist.get_backend = lambda group=None: "nccl"   # as under NCCL: host_group() makes a gloo group
        try:
            group = distributed.host_group()
            out["same_group_again"] = distributed.host_group() is group
        finally:
            dist.get_backend = real
        out["group_backend"] = dist.get_backend(group)
        out["via_group"] = batch_negatives(local.to(torch.int64), 11, seed=3, step=5, world=world,
                                           device="cpu", group=group)
        out["all"] = batch_negatives(local, 10 ** 6, seed=3, step=5, world=world, device="cpu", group=group)
        # deterministic mode's routed bank updates: ids over the host group, features over the bank's group
        from codir_ds.distill.memory_bank import ShardedMemoryBank
        g = torch.Generator().manual_seed(rank)
        ids = torch.randperm(40, generator=g)[: 6 + rank]   # ranks send different counts, any owner
        feats = torch.randn(ids.numel(), 4, generator=g)
        banks = []
        for id_group in (None, group):
            bank = ShardedMemoryBank(40, 4, 0.5, seed=9)
            bank.update_routed(ids, feats, id_group=id_group)
            banks.append((bank.rows.clone(), bank.updates.clone()))
        out["routed"] = banks
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_batch_negatives_through_the_host_group_equal_the_default_group(tmp_path):
    ctx = mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("ranks did not finish (hang in a collective?)")
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for o in outs:
        assert o["gloo_default"] is None and o["same_group_again"] and o["group_backend"] == "gloo"
        assert torch.equal(o["via_group"], o["plain"]) and o["plain"].numel() == 12
        # every rank's ids arrive, sorted (no subset when K + 1 exceeds the global batch)
        assert o["all"].tolist() == sorted(torch.cat([torch.arange(r, 40, 2)[:8] for r in range(2)]).tolist())
    assert torch.equal(outs[0]["via_group"], outs[1]["via_group"])
    for o in outs:
        (rows_a, upd_a), (rows_b, upd_b) = o["routed"]
        assert torch.equal(rows_a, rows_b) and torch.equal(upd_a, upd_b) and int(upd_a.sum()) > 0
    assert sum(int(o["routed"][0][1].sum()) for o in outs) == 6 + 7  # every update landed on its owner once

"""Distributed evaluation on the validation split.

Each rank evaluates a strided slice, padded so that every rank runs the same number
of forward passes (ZeRO-3 gathers parameters collectively during forward); the
predictions are all-gathered and de-duplicated by example id.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from codir_ds.data.metrics import compute_metrics


def _shard(n: int, rank: int, world: int) -> list[int]:
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world)
    while len(mine) < per_rank:  # pad with a repeat; dropped by id after gathering
        mine.append(mine[-1] if mine else 0)
    return mine


@torch.no_grad()
def predict(forward, examples, collator, batch_size: int, device, rank: int = 0, world: int = 1):
    """Return ``(ids, predictions)`` over all ``examples`` (every rank gets the full result).

    ``forward(batch) -> logits [B, C]``; predictions are argmax class ids, or the
    single output for regression (``collator.is_regression``).
    """
    order = _shard(len(examples), rank, world)
    ids, preds = [], []
    for start in range(0, len(order), batch_size):
        batch = collator([examples[i] for i in order[start:start + batch_size]])
        logits = forward({k: v.to(device) for k, v in batch.items()}).float().cpu()
        ids.append(batch["ids"])
        preds.append(logits.squeeze(-1) if collator.is_regression else logits.argmax(-1))
    local = (torch.cat(ids) if ids else torch.empty(0, dtype=torch.long),
             torch.cat(preds) if preds else torch.empty(0))
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    by_id = {}
    for g_ids, g_preds in gathered:
        for i, p in zip(g_ids.tolist(), g_preds.tolist()):
            by_id[i] = p
    keys = sorted(by_id)
    return keys, [by_id[k] for k in keys]


def evaluate(forward, examples, collator, batch_size: int, device, metric_names, rank: int = 0,
             world: int = 1) -> dict[str, float]:
    ids, preds = predict(forward, examples, collator, batch_size, device, rank, world)
    labels = [examples[i].label for i in ids]
    return compute_metrics(metric_names, preds, labels)

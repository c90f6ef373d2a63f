"""Distributed evaluation: the validation split of a task, or a corpus's held-out blocks (masked LM).

Each rank evaluates a strided slice, padded so that every rank runs the same number
of forward passes (ZeRO-3 gathers parameters collectively during forward); the
predictions are all-gathered and de-duplicated by example id.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from codir_ds.data.metrics import compute_metrics
from codir_ds.models.mlm import masked_rows


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


@torch.no_grad()
def evaluate_mlm(forward, corpus, collator,
                 batch_size: int, device, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Held-out masked-LM loss, accuracy and perplexity (fixed masks). Collective.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters during
    forward); rows added for padding have no labels and count for nothing.
    """
    ids = list(corpus.validation_ids)
    if not ids:
        return {}
    mine = ids[rank::world]
    per_rank = math.ceil(len(ids) / world)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count (all-reduced on device)
    for start in range(0, per_rank, batch_size):
        chunk = mine[start:start + batch_size]
        padding = min(batch_size, per_rank - start) - len(chunk)
        chunk_ids = chunk + [ids[0]] * padding
        batch = collator([corpus[i] for i in chunk_ids], chunk_ids, epoch=0)
        if padding:
            batch["labels"][len(chunk):] = -100
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = masked_rows(batch["labels"])
        logits = forward({**batch, "rows": rows}).float()
        labels = batch["labels"].reshape(-1)[rows]
        if labels.numel():
            sums[0] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            sums[1] += (logits.argmax(-1) == labels).sum()
            sums[2] += labels.numel()
    if world > 1:
        dist.all_reduce(sums)
    loss_sum, correct, count = sums.tolist()
    loss = loss_sum / max(count, 1.0)
    return {"mlm_loss": loss, "mlm_accuracy": correct / max(count, 1.0),
            "perplexity": math.exp(min(loss, 50.0)), "masked_tokens": int(count)}

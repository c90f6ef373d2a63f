"""Batching of finetuning examples for sequence classification / regression."""

from __future__ import annotations

from typing import Sequence

import torch

from codir_ds.data.tasks import Example


class ClassificationCollator:
    """Tokenise a list of :class:`Example` into a padded batch.

    Padding is dynamic (to the longest sequence in the batch) and sequences are
    truncated to ``max_length`` tokens (pairs longest-first). The batch is::

        ids             int64   [B]     stable example ids (memory-bank rows)
        input_ids       int64   [B, L]
        attention_mask  int64   [B, L]  1 for real tokens, 0 for padding
        token_type_ids  int64   [B, L]  segment ids (all 0 for single texts)
        labels          int64 [B] class ids, or float32 [B] scores when is_regression

    with ``L <= max_length``. All examples of a batch must agree on whether
    they have a ``text_pair`` (tasks from :func:`load_task` always do).
    """

    def __init__(self, tokenizer, max_length: int, is_regression: bool):
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the special tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.is_regression = bool(is_regression)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        texts = [ex.text for ex in examples]
        has_pair = [ex.text_pair is not None for ex in examples]
        if any(has_pair) and not all(has_pair):
            raise ValueError("a batch mixes examples with and without text_pair")
        pairs = [ex.text_pair for ex in examples] if has_pair[0] else None
        enc = self.tokenizer(
            texts,
            pairs,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_token_type_ids=True,
            return_tensors="pt",
        )
        input_ids = enc["input_ids"].long()
        # Tokenizers of models without segment embeddings (e.g. MPNet) may still omit them.
        token_type_ids = enc.get("token_type_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        label_dtype = torch.float32 if self.is_regression else torch.int64
        return {
            "ids": torch.tensor([ex.id for ex in examples], dtype=torch.int64),
            "input_ids": input_ids,
            "attention_mask": enc["attention_mask"].long(),
            "token_type_ids": token_type_ids.long(),
            "labels": torch.tensor([ex.label for ex in examples], dtype=label_dtype),
        }


def token_lengths(tokenizer, examples: Sequence[Example], max_length: int, chunk: int = 4096) -> torch.Tensor:
    """``[N]`` token count of every example as :class:`ClassificationCollator` encodes it (specials included,
    truncated to ``max_length``): the lengths ``data.group_by_length`` sorts by."""
    out = []
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        pairs = [ex.text_pair for ex in part] if part and part[0].text_pair is not None else None
        enc = tokenizer([ex.text for ex in part], pairs, truncation=True, max_length=max_length)
        out.extend(len(ids) for ids in enc["input_ids"])
    return torch.tensor(out, dtype=torch.long)


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Move a host batch to ``device`` without stalling the host on CUDA.

    On CUDA the tensors are pinned and copied with ``non_blocking=True``: the copies are
    queued on the current stream like the kernels after them, so the training step has
    no host-device synchronisation for its inputs. Elsewhere a plain ``.to(device)``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}

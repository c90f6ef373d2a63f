"""Dynamic masking for masked-LM pre-training (BERT/RoBERTa recipe, no next-sentence task).

Of the non-special tokens of each block, every token is selected for prediction
with probability ``mlm_probability`` (15%); a selected token becomes ``[MASK]``
80% of the time, a random non-special token 10%, and stays unchanged 10%.
``labels`` hold the original token at selected positions and -100 elsewhere.

Masking is *dynamic* (a new mask every epoch) but reproducible: the random draws
for a block depend only on ``(seed, epoch, example id)``, never on the rank,
the world size or the batch a block lands in. A resumed run and a run on another
number of ranks mask every block exactly as an uninterrupted run would.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
MASK_FRACTION = 0.8     # of selected tokens -> [MASK]
RANDOM_FRACTION = 0.1   # of selected tokens -> random token (the remaining 10% stay unchanged)


class MLMCollator:
    """``(blocks, ids, epoch) -> {input_ids, attention_mask, labels, ids}`` padded to the longest block."""

    def __init__(self, tokenizer, mlm_probability: float = 0.15, seed: int = 0):
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("masked-LM pre-training needs a tokenizer with [MASK] and [PAD] tokens")
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = tokenizer.pad_token_id
        special = set(tokenizer.all_special_ids)
        vocab = len(tokenizer)
        self.special = torch.zeros(max(vocab, max(special) + 1), dtype=torch.bool)
        self.special[list(special)] = True
        # Random replacements are drawn from the ordinary tokens only.
        self.replacements = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)

    def mask_block(self, tokens: torch.Tensor, example_id: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked copy of one block and its labels; deterministic in ``(seed, epoch, example_id)``."""
        rng = np.random.default_rng([self.seed, epoch, int(example_id)])
        n = tokens.numel()
        draws = torch.from_numpy(rng.random((3, n)))
        selectable = ~self.special[tokens]
        selected = (draws[0] < self.mlm_probability) & selectable
        labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
        to_mask = selected & (draws[1] < MASK_FRACTION)
        to_random = selected & (draws[1] >= MASK_FRACTION) & (draws[1] < MASK_FRACTION + RANDOM_FRACTION)
        random_tokens = self.replacements[(draws[2] * len(self.replacements)).long().clamp_(max=len(self.replacements) - 1)]
        inputs = torch.where(to_mask, torch.full_like(tokens, self.mask_id), tokens)
        inputs = torch.where(to_random, random_tokens, inputs)
        return inputs, labels

    def __call__(self, blocks: Sequence[torch.Tensor], ids: Sequence[int], epoch: int = 0) -> dict:
        width = max(b.numel() for b in blocks)
        batch = len(blocks)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, (block, example_id) in enumerate(zip(blocks, ids)):
            inputs, lab = self.mask_block(block.long(), int(example_id), epoch)
            n = block.numel()
            input_ids[row, :n] = inputs
            labels[row, :n] = lab
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "ids": torch.as_tensor([int(i) for i in ids], dtype=torch.long)}

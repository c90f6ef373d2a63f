"""Fit a masked-LM head on a frozen teacher body (for logit KD in pre-training).

The packaged teachers are bare encoders (no MLM head). KD-Pre and CoDIR-Pre with
alpha_kd > 0 need the teacher's distribution over the vocabulary at masked
positions, so this fits the usual BERT head -- dense + GELU + LayerNorm, then a
decoder *tied to the teacher's word embeddings* plus a bias -- with the body and
the embeddings frozen. Only the head's transform and bias are trained, on the same
corpus pipeline and masking as pre-training. The result is a Hugging Face
``*ForMaskedLM`` directory (weights, tokenizer, ``codir_export.json`` with the
sha256) that ``model.teacher`` can point at.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM

from codir_ds.config import CorpusConfig
from codir_ds.data.corpus import load_corpus
from codir_ds.data.mlm import MLMCollator
from codir_ds.engine.evaluation import evaluate_mlm
from codir_ds.errors import CodirError
from codir_ds.models.loading import EXPORT_MANIFEST, WEIGHTS, load_tokenizer, model_dir, verify_weights
from codir_ds.models.mlm import gather_rows, masked_rows, mlm_parts
from codir_ds.assets import sha256_file


def head_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The MLM head's own parameters: everything in the head except the tied decoder weight."""
    _, head = mlm_parts(model)
    tied = model.get_input_embeddings().weight
    return [(n, p) for n, p in head.named_parameters() if p is not tied]


def _check_args(out: Path, steps: int, batch_size: int, lr: float, overwrite: bool) -> None:
    """Refuse a non-empty output directory (unless ``overwrite``) and non-positive hyper-parameters."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CodirError(f"output directory '{out}' is not empty: pass --overwrite to replace it, or choose "
                         f"another --output_dir")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise CodirError(f"--steps, --batch_size and --lr must be positive (got {steps}, {batch_size}, {lr})")


def _load_teacher_data(teacher: str, sha256: Optional[str], corpus_cfg: CorpusConfig, batch_size: int):
    """Verify the teacher, load its tokenizer and the corpus; returns (src, source_sha, tokenizer, corpus)."""
    src = model_dir(teacher, "--teacher")
    source_sha = verify_weights(src, sha256, "--teacher")
    tokenizer = load_tokenizer(src)
    corpus = load_corpus(corpus_cfg, tokenizer, verbose=True)
    if len(corpus.train_ids) < batch_size:
        raise CodirError(f"the corpus has {len(corpus.train_ids)} training blocks, fewer than --batch_size "
                         f"{batch_size}: add text or lower --batch_size")
    return src, source_sha, tokenizer, corpus


def _frozen_teacher(src: Path, seed: int) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """Load teacher + MLM head (seeded), freeze all but the head's own parameters; returns (model, params)."""
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_pretrained(str(src), dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()  # no dropout anywhere: the body is a fixed feature extractor
    params = [p for _, p in head_parameters(model)]
    for p in params:
        p.requires_grad_(True)
    return model, params


def _optimizer(params: list[torch.nn.Parameter], lr: float, steps: int):
    """AdamW with a linear warm-up over the first tenth of ``steps`` and a linear decay to zero."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                              * max(0.0, (steps - s) / steps))
    return opt, sched


def _head_forward(model: torch.nn.Module):
    """forward(batch) -> head logits at the masked rows, with the body run under inference mode."""
    body, head = mlm_parts(model)

    def forward(batch: dict) -> torch.Tensor:
        with torch.inference_mode():
            hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            masked = gather_rows(hidden, batch["rows"])
        return head(masked.clone())  # out of inference mode: the head trains on the masked rows only
    return forward


def _train_head(forward, opt, sched, corpus, collator: MLMCollator, steps: int, batch_size: int, seed: int,
                log_every: int, t0: float) -> None:
    """The training loop: seeded epoch permutations of the training blocks, one optimiser step per batch."""
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    epoch, running = 0, []
    for step in range(steps):
        if order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(len(corpus.train_ids), generator=g)])
            epoch += 1
        ids, order = order[:batch_size], order[batch_size:]
        batch = collator([corpus[i] for i in ids.tolist()], ids, epoch)
        batch["rows"] = masked_rows(batch["labels"])
        labels = batch["labels"].reshape(-1)[batch["rows"]]
        logits = forward(batch)
        loss = F.cross_entropy(logits.float(), labels) if labels.numel() else logits.sum() * 0.0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rate = (step + 1) * batch_size / (time.perf_counter() - t0)
            print(f"step {step + 1}/{steps}: mlm_loss {sum(running) / len(running):.4f} "
                  f"({rate:.1f} blocks/s)", flush=True)
            running = []


def _evaluate(forward, corpus, collator: MLMCollator, when: str) -> dict:
    """Held-out MLM metrics, printed as 'held-out MLM <when> fitting: ...'."""
    metrics = evaluate_mlm(forward, corpus, collator, 64, "cpu")
    print(f"held-out MLM {when} fitting: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    return metrics


def _export(model: torch.nn.Module, tokenizer, out: Path, fields: dict, t0: float) -> dict:
    """Save model + tokenizer + manifest to ``out.tmp``, then swap it into ``out``; returns the manifest."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    manifest = {"sha256": sha256_file(tmp / WEIGHTS), "kind": "teacher_with_mlm_head", **fields,
                "seconds": round(time.perf_counter() - t0, 1)}
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return manifest


def fit_teacher_head(teacher: str, output_dir: str, corpus_cfg: CorpusConfig, steps: int = 300,
                     batch_size: int = 32, lr: float = 1e-3, seed: int = 42, mlm_probability: float = 0.15,
                     sha256: Optional[str] = None, overwrite: bool = False, log_every: int = 50) -> dict:
    """Train the head, save teacher + head to ``output_dir``; returns the manifest written there."""
    out = Path(output_dir)
    _check_args(out, steps, batch_size, lr, overwrite)
    src, source_sha, tokenizer, corpus = _load_teacher_data(teacher, sha256, corpus_cfg, batch_size)
    model, params = _frozen_teacher(src, seed)
    opt, sched = _optimizer(params, lr, steps)
    collator = MLMCollator(tokenizer, mlm_probability, seed=seed)
    forward = _head_forward(model)

    before = _evaluate(forward, corpus, collator, "before")
    t0 = time.perf_counter()
    _train_head(forward, opt, sched, corpus, collator, steps, batch_size, seed, log_every, t0)
    after = _evaluate(forward, corpus, collator, "after")

    manifest = _export(model, tokenizer, out, {
        "source": str(src), "source_sha256": source_sha, "steps": steps, "batch_size": batch_size, "lr": lr,
        "seed": seed, "corpus": str(corpus.path), "block_size": corpus.block_size,
        **{f"validation_before_{k}": v for k, v in before.items()},
        **{f"validation_{k}": v for k, v in after.items()}}, t0)
    print(f"teacher with MLM head written to {out} (held-out perplexity {before.get('perplexity', math.nan):.1f} "
          f"-> {after.get('perplexity', math.nan):.1f})", flush=True)
    return manifest

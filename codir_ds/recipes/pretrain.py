"""Pre-training distillation (MLM-Pre, KD-Pre, CoDIR-Pre, TinyBERT / DistilBERT-style) on a text corpus.

One optimizer step (the recipes' one ``train_step``, with this stage's micro-batches) reads:

1. take this rank's ``accumulation`` micro-batches of block ids;
2. CRD only: all-gather every rank's ids -> the global mini-batch, and read its bank rows with
   one collective ``bank.gather`` (the in-batch negatives, shared by the step's micro steps);
3. dynamic masking of the whole step on the host, and one all-reduce of its masked-token count
   (the MLM / KD terms are means over the GLOBAL batch's masked tokens);
4. per micro step: teacher forward under inference mode (MLM logits at masked positions,
   pooled layers), student forward, the method's loss terms, backward, step;
5. after the optimizer step (and only if it was applied): the positives' bank rows get the
   momentum update, locally on their owner rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from codir_ds import checks
from codir_ds.config import teacher_hint
from codir_ds.data.collate import to_device
from codir_ds.data.corpus import load_corpus
from codir_ds.data.mlm import MLMCollator
from codir_ds.distill.heads import build_module
from codir_ds.engine.distributed import set_seed
from codir_ds.engine.evaluation import evaluate_mlm
from codir_ds.engine.teacher import MLMTeacherRunner
from codir_ds.errors import CodirError
from codir_ds.models.loading import (build_student, check_same_vocab, load_tokenizer, model_dir, position_limit,
                                     tokenizer_dir, verify_weights)
from codir_ds.models.mlm import load_mlm_teacher, masked_rows
from codir_ds.recipes.base import Recipe
from codir_ds.recipes.stages import DataStage, MicroBatch


@dataclass
class MaskedMicroBatch:
    """One micro-batch of a pre-training step, masked on the host."""
    ids: torch.Tensor          # [B] block ids (host)
    host: dict                 # collated tensors on the host
    rows: torch.Tensor         # flat indices of the masked positions (host)
    token_scale: torch.Tensor  # micro-batch mean -> global per-token mean (device)


def mask_step(recipe: Recipe, batches) -> list[MaskedMicroBatch]:
    """Dynamic masking of one optimizer step's micro-batches on the host. Collective (one all-reduce).

    The MLM and KD terms are means over the masked tokens of the GLOBAL batch (one all-reduce of
    the count, no host sync), so the gradient does not depend on how tokens fall into micro-batches
    and ranks. Host-side ``masked_rows``: ``nonzero()`` on a GPU would sync.
    """
    hosts = [recipe.collator([recipe.corpus[i] for i in ids.tolist()], ids, epoch) for epoch, ids in batches]
    row_sets = [masked_rows(h["labels"]) for h in hosts]
    step_masked = torch.tensor(float(sum(len(r) for r in row_sets))).to(recipe.device, non_blocking=True)
    if recipe.world > 1:
        dist.all_reduce(step_masked)
    per_token = recipe.accum * recipe.world / step_masked.clamp(min=1.0)
    return [MaskedMicroBatch(ids, host, rows, per_token * len(rows))
            for (_, ids), host, rows in zip(batches, hosts, row_sets)]


def check_corpus_inputs(recipe: Recipe) -> None:
    """Pre-training's input checks, cheap first (the teacher's checksum before the corpus is tokenized,
    which can take long); sets ``teacher_dir``, ``tokenizer``, ``corpus``, ``num_train``. Shared with
    co-training."""
    from transformers import AutoConfig
    cfg = recipe.cfg
    recipe.teacher_dir = model_dir(cfg.model.teacher, "model.teacher") if cfg.model.teacher else None
    if recipe.method.teacher is not None:
        if recipe.teacher_dir is None:
            raise CodirError(f"method.name={cfg.method.name} needs a teacher: set model.teacher to {teacher_hint('pretrain')}")
        verify_weights(recipe.teacher_dir, cfg.model.teacher_sha256, "model.teacher")
    recipe.tokenizer = load_tokenizer(tokenizer_dir(cfg.model))
    if recipe.teacher_dir is not None:
        check_same_vocab(recipe.tokenizer, recipe.teacher_dir, "model.teacher")
        limit = position_limit(AutoConfig.from_pretrained(str(recipe.teacher_dir)))
        if cfg.corpus.block_size > limit:
            raise CodirError(f"corpus.block_size {cfg.corpus.block_size} exceeds the teacher's {limit} positions: "
                             f"lower corpus.block_size")
    check_masking(recipe)
    recipe.corpus = load_corpus(cfg.corpus, recipe.tokenizer, verbose=recipe.rank == 0)
    micro = recipe.ds["train_micro_batch_size_per_gpu"]
    if len(recipe.corpus.train_ids) // recipe.world < micro:
        raise CodirError(f"the corpus has {len(recipe.corpus.train_ids)} training blocks, fewer than one global "
                         f"micro-batch ({micro} x {recipe.world} ranks): add text, lower corpus.block_size or the "
                         f"batch size")
    checks.fits_global_batch(len(recipe.corpus.train_ids), "the corpus", recipe.ds, cfg.training.deterministic,
                             "training blocks")
    check_maskable_tokens(recipe.corpus, recipe.tokenizer)
    recipe.num_train = len(recipe.corpus.train_ids)  # training block ids are 0..num_train-1


def check_masking(recipe: Recipe) -> None:
    """Settings that leave a step without masked tokens (no MLM signal) or CRD without in-batch negatives."""
    cfg, batch = recipe.cfg, recipe.ds["train_batch_size"]
    p, block = recipe.method.mlm_probability, cfg.corpus.block_size
    if p * (block - 2) * batch < 1:
        raise CodirError(f"method.mlm_probability {p} x {block - 2} tokens per block (corpus.block_size {block}) x "
                         f"global batch {batch} masks fewer than one token per optimizer step on average, so most "
                         f"steps have nothing to predict: raise method.mlm_probability, corpus.block_size or the "
                         f"batch size")
    if recipe.method.contrast is not None and batch < 2:
        raise CodirError(f"method.name={cfg.method.name} contrasts each block with the other blocks of its global "
                         f"batch, and a global batch of {batch} has none: set the global batch "
                         f"(training.train_batch_size) to at least 2")


def check_maskable_tokens(corpus, tokenizer) -> None:
    """The training blocks hold some ordinary token: special tokens ([CLS], [MASK], ...) are never masked."""
    special = np.asarray(sorted(tokenizer.all_special_ids))
    end, chunk = len(corpus.train_ids) * (corpus.block_size - 2), 1 << 22
    for start in range(0, min(end, len(corpus.tokens)), chunk):
        if not np.isin(corpus.tokens[start:min(start + chunk, end)], special).all():
            return
    raise CodirError(f"the corpus {', '.join(corpus.sources)} holds only special tokens "
                     f"({', '.join(tokenizer.all_special_tokens)}), which are never masked, so there is nothing to "
                     f"predict: put ordinary text in corpus.sources")


def corpus_summary(corpus) -> str:
    return (f"{len(corpus.train_ids)} blocks of <= {corpus.block_size} tokens "
            f"({len(corpus.validation_ids)} held out)")


def count_tokens(tokens: int, device, world: int) -> int:
    """Sum of every rank's host-side token count. Collective."""
    if world > 1:
        total = torch.tensor(tokens, dtype=torch.long, device=device)
        dist.all_reduce(total)
        return int(total)
    return tokens


class CorpusStage(DataStage):
    """Pre-training's data: masked-LM blocks of the corpus, masked on the host per optimizer step; held-out MLM
    metrics; the final models exported."""
    name = "pretrain"
    masked_lm = True

    def check_inputs(self) -> None:
        check_corpus_inputs(self.recipe)

    def collator(self):
        r = self.recipe
        return MLMCollator(r.tokenizer, r.method.mlm_probability, seed=r.cfg.training.seed)

    def load_teacher(self, path: str):
        """A masked-LM model when its logits are used, else its body alone."""
        r = self.recipe
        return load_mlm_teacher(path, r.dtype, r.cfg.model.teacher_sha256, need_head=r.method.teacher.logits,
                                source=r.cfg.source)

    def teacher_runner(self, teacher, layers=None, pooling: str = "mean", ild_spec=None):
        return MLMTeacherRunner(teacher, layers, pooling, logits=self.recipe.method.teacher.logits,
                                ild_spec=ild_spec)

    def micro_batches(self, batches, stage: str = "train"):
        r = self.recipe
        for mb in mask_step(r, batches):  # COLLECTIVE on the first; vocabulary logits at the masked positions only
            batch = to_device(mb.host, r.device)
            labels = mb.host["labels"].reshape(-1)[mb.rows].to(r.device, non_blocking=True)
            r.tokens += int(mb.host["attention_mask"].sum())
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          rows=mb.rows.to(r.device, non_blocking=True))
            yield MicroBatch(mb.ids, inputs, labels, len(mb.ids), token_scale=mb.token_scale)

    def feature_batch(self, ids: torch.Tensor) -> dict:
        """Masked as in epoch 0 (the bank holds features of masked blocks)."""
        r = self.recipe
        return to_device(r.collator([r.corpus[i] for i in ids.tolist()], ids, 0), r.device)

    def forward_with(self, engine):
        return lambda b: engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], rows=b["rows"])["logits"]

    def evaluate(self, forward) -> dict:
        r = self.recipe
        return evaluate_mlm(forward, r.corpus, r.collator, r.cfg.training.eval_batch_size, r.device, r.rank, r.world)

    def manifest(self) -> dict:
        return {"stage": "pretrain"}

    def summary(self) -> str:
        return corpus_summary(self.recipe.corpus)

    def results(self, final: dict, progress) -> dict:
        r = self.recipe
        tokens = count_tokens(r.tokens, r.device, r.world)
        return {"stage": "pretrain", "block_size": r.corpus.block_size, "num_train_blocks": r.num_train,
                "num_validation_blocks": len(r.corpus.validation_ids), "corpus": str(r.corpus.path),
                "final": final, "history": progress.history,
                "tokens_per_second": round(tokens / max(r.elapsed, 1e-9), 1)}


class PretrainRecipe(Recipe):
    """Distil a frozen MLM teacher into a masked-LM student on a packed corpus."""
    stage = "pretrain"
    data_stage = CorpusStage
    monitor_name = property(lambda self: f"{self.method.name}-pre")

    def check_inputs(self) -> None:
        super().check_inputs()
        self.data.check_inputs()

    def setup_models(self) -> None:
        """Teacher (checksum, MLM head when its logits are used), student, the method's heads."""
        cfg = self.cfg
        self.teacher = self.load_teacher_model() if self.method.teacher is not None else None
        set_seed(cfg.training.seed)  # identical student / head initialisation on every rank
        student = self.build_student_model()
        if cfg.corpus.block_size > position_limit(student.config):
            raise CodirError(f"corpus.block_size {cfg.corpus.block_size} exceeds the student's "
                             f"{position_limit(student.config)} positions: lower corpus.block_size")
        self.module, self.teacher_layers = build_module(student, self.teacher, self.method, masked_lm=True)

    def load_teacher_model(self) -> torch.nn.Module:
        """The frozen teacher: a masked-LM model when its logits are used, else its body alone."""
        return self.data.load_teacher(str(self.teacher_dir))

    def build_student_model(self) -> torch.nn.Module:
        """The masked-LM student (``model.*``)."""
        return build_student(self.cfg.model, 0, False, self.tokenizer, template_dir=self.teacher_dir, masked_lm=True)

    def setup_data(self) -> None:
        super().setup_data()
        self.collator = self.data.collator()

    def setup_components(self) -> None:
        self.build_teacher_step()
        self.build_bank()  # pre-training's negatives: the rows of the global mini-batch
        self.tokens = 0  # real tokens trained on, counted on the host side of the batch (no device sync)

    def describe(self) -> str:
        return f"{self.method.name} pre-training: {self.data.summary()}, {self.batch_summary()}"

    # ------------------------------------------------------------------ evaluation and the end
    def results(self, final: dict, reported: dict, timing: dict) -> dict:
        return {**self.common_results(), **self.data.results(final["student"], self.progress), **timing,
                "export_dir": str(self.run_dir / "export")}

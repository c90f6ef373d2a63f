"""What a distillation method is: its config, what it needs from a run, and its loss.

A method is a :class:`Method` subclass registered by name (:func:`register_method`). The
recipes never branch on a method's name and never read its options: they read its
its specs, each None when the method has no use for it: :class:`TeacherSpec` (a frozen teacher
and which of its outputs), :class:`LayerSpec` (mapped intermediate layers), :class:`ContrastSpec`
(pooled layers projected into a contrastive space), :class:`BankSpec` (the sharded memory bank and
its negatives), :class:`MixSpec` (mixup inputs) and :class:`SecondModelSpec` (a second trainable
model: the co-training recipe); they build what the specs ask for and call
:meth:`Method.loss` with typed outputs of the student (:class:`StudentOutput`) and the frozen
teacher (:class:`TeacherOutput`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

import torch
import torch.nn.functional as F

from codir_ds import checks
from codir_ds.distill.losses import kd_loss

STAGES = ("finetune", "pretrain")


def option(default=None, help: str = "", default_factory=None):  # noqa: A002 - "help" as in argparse
    """A method config field with its help text (shown by ``docs/configuration.md``)."""
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class PretrainingConfig:
    """Options of every pre-training method."""
    mlm_probability: float = option(0.15, "pre-training: fraction of (non-special) tokens selected for masked-LM "
                                          "prediction; selected tokens become [MASK] 80%, a random token 10%, "
                                          "unchanged 10%")

    @staticmethod
    def check(m) -> None:
        checks.in_range("method.mlm_probability", m.mlm_probability, 0.0 < m.mlm_probability < 1.0, "(0, 1)")


@dataclass(frozen=True)
class TeacherSpec:
    """The frozen teacher a method reads: ``model.teacher`` must be set, its vocabulary is checked, and the
    teacher runs under inference mode on every rank (never in the optimizer)."""
    logits: bool = True        # its logits are computed (pre-training: its MLM head is loaded)
    cacheable: bool = False    # finetuning: its per-example outputs may be kept by training.teacher_cache


@dataclass(frozen=True)
class LayerSpec:
    """Mapped intermediate layers of both models (ILD); the method's ``layer_pairs(Ls, Lt)`` pairs them."""
    kind: str = "hidden"       # "cls": the [CLS] row of each mapped layer; "hidden": whole sequences
    attention: bool = False    # also the attention maps of the mapped Transformer layers (eager attention)
    consistency: bool = False  # CR-ILD: mixup consistency targets from the clean inputs


@dataclass(frozen=True)
class MixSpec:
    """Mixup of word embeddings in the stages where ``Method.mixes_inputs(stage)``: lambda ~ Beta(alpha, alpha)."""
    alpha: float
    supplementary: bool = True  # data.supplementary examples join the mixed batches


@dataclass(frozen=True)
class SecondModelSpec:
    """A second trainable model in its own DeepSpeed engine (the co-training recipe, CTCD's larger model)."""
    init: Optional[str]        # a model directory, packaged name or CTCD run; None: a random model of ``sizes``
    sizes: dict                # a random model's ``model.*`` sizes (student_layers, student_hidden, student_heads)
    one_way: bool = False      # the frozen model.teacher distils into both models, which do not distil mutually


@dataclass(frozen=True)
class ContrastSpec:
    """Pooled layers of both models projected into a contrastive space: the student module gets phi_s and
    phi_t, the teacher runner pools ``teacher_layers``, and the student output carries ``h_s`` / ``h_t``.

    Layers: ``"all"``, ``"last"`` or indices (0 = the embedding output, 1..L the Transformer layers).
    """
    teacher_layers: Union[str, list] = "all"
    student_layers: Union[str, list] = "all"
    pooling: str = "mean"          # mean (masked mean over real tokens) or cls
    projection_dim: int = 128      # m, the width of the contrastive space


@dataclass(frozen=True)
class BankSpec:
    """The sharded memory bank of projected student features and how negatives are read from it."""
    momentum: float                # beta of Eq. 5
    normalize: bool = True         # L2-normalise the feature before the momentum update
    init: str = "random"           # random unit rows, or student: one pass of the student's features
    num_negatives: int = 100       # K
    finetune_negatives: str = "class"   # class: one set of K rows per class and step; anchor: K per anchor
    pretrain_negatives: str = "batch"   # batch: the global mini-batch's rows; bank: also rows of the whole bank
    regression_bins: int = 5       # regression tasks: negatives come from other equal-frequency target bins


@dataclass
class LayerFeatures:
    """Mapped intermediate layers of one model (ILD methods), in layer-pair order.

    ``mask`` ``[B, L]`` (1 = real token; the union of both masks on mixed inputs); ``cls``: ``[B, d]``
    [CLS] rows (pkd); ``hidden``: ``[B, L, d]`` states (student's projected to the teacher's width);
    ``attn``: ``[B, H, L, L]`` attention probabilities of the Transformer-layer pairs.
    """
    mask: torch.Tensor
    cls: Optional[list] = None
    hidden: Optional[list] = None
    attn: Optional[list] = None


@dataclass
class Consistency:
    """CR-ILD's consistency pairs: the student's last layer on mixed inputs and its (no-grad) targets."""
    hidden: torch.Tensor
    hidden_target: torch.Tensor
    attn: Optional[torch.Tensor] = None
    attn_target: Optional[torch.Tensor] = None


@dataclass
class StudentOutput:
    """The trained module's outputs: logits (``[B, C]``, or ``[M, V]`` at masked positions), CRD's
    projected features ``h_s`` / ``h_t`` ``[B, m]``, mapped layers, consistency pairs."""
    logits: torch.Tensor
    h_s: Optional[torch.Tensor] = None
    h_t: Optional[torch.Tensor] = None
    layers: Optional[LayerFeatures] = None
    consistency: Optional[Consistency] = None

    @classmethod
    def from_module(cls, out: dict) -> "StudentOutput":
        """From the engine's output dict (plain containers, so that ZeRO-3 hooks reach every tensor)."""
        layers = LayerFeatures(**out["layers"]) if "layers" in out else None
        cons = Consistency(**out["consistency"]) if "consistency" in out else None
        return cls(out["logits"], out.get("h_s"), out.get("h_t"), layers, cons)


@dataclass
class TeacherOutput:
    """The frozen teacher's outputs, computed without autograd."""
    logits: Optional[torch.Tensor]            # [B, C] (finetuning) or [M, V] at masked positions (pre-training)
    features: Optional[torch.Tensor] = None   # [B, Lt*d_t] pooled layers (CRD only)
    layers: Optional[LayerFeatures] = None    # mapped layers (ILD methods)


@dataclass
class LossInputs:
    """Everything of a micro-batch a loss reads besides the two models' outputs.

    ``labels``: ``[B]`` classes / targets (finetuning) or ``[M]`` token ids at the masked positions
    (pre-training, ``pretraining=True``); ``token_scale``: pre-training's factor that turns a
    micro-batch mean into the global batch's per-token mean; ``negatives``: CRD negatives (an
    object with ``loss(h_t, h_s, tau) -> (loss, pos_sim, neg_sim)``, see
    :mod:`codir_ds.distill.negatives`); ``stage`` and ``consistency_weight``: staged methods'.
    """
    labels: torch.Tensor
    pretraining: bool = False
    is_regression: bool = False
    token_scale: Optional[torch.Tensor] = None
    negatives: Optional[object] = None
    stage: str = "train"
    consistency_weight: float = 0.0


def task_loss(logits: torch.Tensor, batch: LossInputs) -> tuple[torch.Tensor, str]:
    """L_task and its log name: masked-LM cross-entropy (times ``token_scale``), or CE / MSE on labels."""
    logits32 = logits.float()
    if batch.pretraining:
        if batch.labels.numel():
            mlm = F.cross_entropy(logits32, batch.labels)
        else:  # no masked token in this micro-batch: contribute nothing, keep the graph connected
            mlm = logits32.sum() * 0.0
        if batch.token_scale is not None:
            mlm = mlm * batch.token_scale
        return mlm, "loss/mlm"
    if batch.is_regression:
        return F.mse_loss(logits32.squeeze(-1), batch.labels.float()), "loss/task"
    return F.cross_entropy(logits32, batch.labels), "loss/task"


def soft_kd(logits: torch.Tensor, target: torch.Tensor, temperature: float, t2_scale: bool,
            is_regression: bool = False) -> torch.Tensor:
    """KD towards ``target`` logits: KL(softmax(z_t/rho) || softmax(z_s/rho)) [times rho^2], fp32.

    On regression tasks (one output, where a softmax is constant) the MSE between the predictions.
    """
    if is_regression:
        return F.mse_loss(logits.float(), target.float())
    kd = kd_loss(logits.float(), target, temperature)
    return kd * temperature ** 2 if t2_scale else kd


# The TensorBoard tags of the task loss (task_loss): written by every method that trains on the task itself.
TASK_TAGS = {"loss/task": "finetuning: cross-entropy (MSE on regression tasks)",
             "loss/mlm": "pre-training: the masked-LM loss"}


class Method:
    """Base of every method: ``name``, ``config`` (its option dataclass), supported ``stages``.

    Subclasses override :meth:`loss` and the specs they need (:meth:`teacher_spec`, :meth:`layer_spec`,
    :meth:`contrast_spec`, :meth:`bank_spec`, :meth:`mix_spec`, :meth:`second_model_spec`); staged methods
    also :meth:`stage_at`.
    ``compare_keys`` / ``compare_sets``: the settings ``bench/compare.py`` writes out for it.
    """
    name: ClassVar[str] = ""
    config: ClassVar[Optional[type]] = None
    stages: ClassVar[tuple[str, ...]] = STAGES
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""           # the paper it follows, e.g. "CoDIR, Sun et al. 2020" (the method index)
    compare_keys: ClassVar[tuple[str, ...]] = ()
    compare_sets: ClassVar[tuple[str, ...]] = ()
    teacher_condition: ClassVar[str] = ""   # when the teacher is needed only with some option, e.g. " with ..."
    # TensorBoard tags the loss terms add ({tag: what it is}); a class's own, merged along the MRO by declared_tags().
    # docs/running.md's tag reference is generated from them (python -m codir_ds.tag_reference --write).
    tags: ClassVar[dict] = {"loss/total": "the loss minimised (`ctcd`: both models' losses summed)"}

    @classmethod
    def declared_tags(cls) -> dict:
        """Every tag this method's loss terms may write: its own ``tags`` and its base classes'."""
        out: dict = {}
        for klass in reversed(cls.__mro__):
            out.update(klass.__dict__.get("tags", {}))
        return out

    def __init__(self, cfg, stage: str = "finetune"):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.cfg = cfg
        self.stage = stage
        self.pretraining = stage == "pretrain"

    # ------------------------------------------------------------------ specs: what the recipe builds
    @property
    def teacher(self) -> Optional[TeacherSpec]:
        return self.teacher_spec()

    @property
    def layers(self) -> Optional[LayerSpec]:
        return self.layer_spec()

    @property
    def contrast(self) -> Optional[ContrastSpec]:
        return self.contrast_spec()

    @property
    def bank(self) -> Optional[BankSpec]:
        return self.bank_spec()

    @property
    def mixing(self) -> Optional[MixSpec]:
        return self.mix_spec()

    @property
    def second_model(self) -> Optional[SecondModelSpec]:
        return self.second_model_spec()

    def teacher_spec(self) -> Optional[TeacherSpec]:
        """The frozen teacher this method reads in ``self.stage`` with ``self.cfg``; None: no teacher."""
        return None

    def layer_spec(self) -> Optional[LayerSpec]:
        """The mapped intermediate layers this method distils (with :meth:`layer_pairs`); None: none."""
        return None

    def mix_spec(self) -> Optional[MixSpec]:
        """Mixup inputs of the stages where :meth:`mixes_inputs`; None: never mixed."""
        return None

    def second_model_spec(self) -> Optional[SecondModelSpec]:
        """A second trainable model (the co-training recipe); None: the student alone."""
        return None

    def contrast_spec(self) -> Optional[ContrastSpec]:
        """The pooled, projected layers this method contrasts (``h_s`` / ``h_t``); None: none."""
        return None

    def bank_spec(self) -> Optional[BankSpec]:
        """The memory bank this method reads negatives from (it holds the contrast spec's projected student
        features, so a bank needs a :meth:`contrast_spec`); None: no bank."""
        return None

    @property
    def encoder_delay(self) -> int:
        """Optimizer steps during which the contrastive gradient stops at the projection heads (0: none)."""
        return 0

    @property
    def mlm_probability(self) -> float:
        """Pre-training: the fraction of tokens selected for masked-LM prediction."""
        return self.cfg.mlm_probability

    @classmethod
    def validate(cls, cfg) -> None:
        """Cross-key checks of the whole experiment config when this method is chosen (one-line errors)."""

    def stage_at(self, step: int, total_steps: int) -> str:
        """The stage optimizer step ``step`` (0-based) belongs to; one stage unless the method is staged."""
        return "train"

    def uses_layers(self, stage: str) -> bool:
        """Whether the mapped layers' features are computed in ``stage``."""
        return self.layers is not None

    def mixes_inputs(self, stage: str) -> bool:
        """Whether ``stage`` trains on mixup inputs (plus ``data.supplementary`` examples): every stage with a
        :class:`MixSpec` unless a staged method says otherwise."""
        return self.mixing is not None

    def consistency_weight(self, step: int, total_steps: int) -> float:
        """Weight of a consistency term at optimizer step ``step`` (0 for methods without one)."""
        return 0.0

    @property
    def ema_decay(self) -> float:
        """Decay of an EMA copy of the student that provides targets (0 = none)."""
        return 0.0

    def check_engine(self, ds: dict) -> None:
        """Start-up check against the resolved DeepSpeed config (one-line error)."""

    def loss(self, student: StudentOutput, teacher: Optional[TeacherOutput],
             batch: LossInputs) -> tuple[torch.Tensor, dict]:
        """``(total, terms)``: the loss to back-propagate and detached fp32 scalars to log."""
        raise NotImplementedError

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.config)] if cls.config is not None else []

    # options only one stage reads: {option: stage}; the other stage refuses them (config.load_config)
    stage_options: ClassVar[dict] = {}

    @classmethod
    def reads(cls, stage: Optional[str] = None) -> set:
        """The ``method.*`` keys this method reads (``name`` included), in ``stage`` when given."""
        keys = {"name", *cls.option_names()}
        if "pretrain" in cls.stages and stage != "finetune":
            keys |= {f.name for f in dataclasses.fields(PretrainingConfig)}
        return {k for k in keys if not cls.stage_ignores(k, stage)}

    @classmethod
    def stage_ignores(cls, key: str, stage: Optional[str]) -> str:
        """Why ``stage`` ignores option ``key`` of this method ("" when it reads it, or no stage is given)."""
        pretraining = {f.name for f in dataclasses.fields(PretrainingConfig)}
        only = cls.stage_options.get(key) or ("pretrain" if key in pretraining else None)
        if stage is None or only in (None, stage):
            return ""
        what = {"finetune": "finetuning", "pretrain": "pre-training"}
        return f"read in {what[only]} only, and this is {what[stage]} (method.name={cls.name})"


class TaskMethod(Method):
    """The task loss alone (``ce`` in finetuning, ``mlm`` in pre-training): no teacher."""
    tags = TASK_TAGS

    def loss(self, student, teacher, batch):
        total, key = task_loss(student.logits, batch)
        return total, {key: total.detach(), "loss/total": total.detach()}

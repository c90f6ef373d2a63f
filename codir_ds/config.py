"""Typed experiment configuration: a YAML file plus ``--set key=value`` overrides.

The experiment (model, data, method, training, logging) lives here; the engine
(batch sizes, precision, ZeRO stage) lives in the DeepSpeed JSON passed with
``--deepspeed_config``. Everything is validated before any expensive work: an
unknown key names the closest valid ones, a bad value names the allowed ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from codir_ds.errors import CodirError

ConfigError = CodirError

OBJECTIVES = ("ce", "mlm", "kd", "codir", "pkd", "tinybert", "distilbert", "cr_ild", "ctcd")
# Which objectives each stage accepts: finetuning has labels, pre-training has a corpus.
# PKD and CR-ILD are finetuning methods in their papers; the others have both stages.
FINETUNE_OBJECTIVES = ("ce", "kd", "codir", "pkd", "tinybert", "distilbert", "cr_ild", "ctcd")
PRETRAIN_OBJECTIVES = ("mlm", "kd", "codir", "tinybert", "distilbert", "ctcd")
# Methods whose loss reads the teacher (ctcd only in its one-way variant).
TEACHER_OBJECTIVES = ("kd", "codir", "pkd", "tinybert", "distilbert", "cr_ild")
POOLINGS = ("mean", "cls")
PRECISION_FALLBACKS = ("bf16", "fp32")
# training.optimizer_impl: AdamW's implementation (auto = fused where the run's device has the kernel, else foreach).
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "plain")


@dataclass
class ModelConfig:
    # Teacher: a local Hugging Face directory, or the packaged name "all-MiniLM-L6-v2".
    teacher: Optional[str] = None
    # Expected sha256 of the teacher's model.safetensors (checked at load). The packaged
    # MiniLM and directories exported by codir-ds are always checked.
    teacher_sha256: Optional[str] = None
    # Tokenizer directory; defaults to the teacher's, else the student init directory.
    tokenizer: Optional[str] = None
    # Student initialisation from a Hugging Face directory (e.g. the pre-trained teacher body),
    # copying the layers listed in student_init_layers (all layers when null).
    student_init: Optional[str] = None
    student_init_layers: Optional[list[int]] = None
    # Student built from a config when student_init is null.
    student_layers: int = 2
    student_hidden: int = 128
    student_heads: int = 2
    student_intermediate: Optional[int] = None  # default 4 x hidden
    dropout: float = 0.1
    # Two-stage training: start the student from a previous codir-ds run (its export/
    # directory) or a Hugging Face directory, all weights included (e.g. stage 2 of
    # CoDIR-Pre from the stage-1 MLM run, or finetuning a pre-trained student).
    init_from: Optional[str] = None


@dataclass
class DataConfig:
    # A packaged task (movie_snippets, movie_snippets_regression, trec6), a GLUE task name
    # (with data.glue_dir), or "files" (data.train_file / data.validation_file).
    task: str = "movie_snippets"
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    task_type: str = "auto"
    glue_dir: Optional[str] = None
    validation_fraction: float = 0.1
    split_seed: int = 13
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    max_length: int = 128
    # CR-ILD: supplementary inputs for the ILD stage (labels unused): a packaged task name
    # (movie_snippets, trec6, ...), or a .txt (one text per line) / .jsonl / .csv / .tsv file
    # whose text_column (and text_pair_column when set) is read. null = the task's own inputs only.
    supplementary: Optional[str] = None
    supplementary_max_examples: Optional[int] = None
    # Finetuning: cut micro-batches from windows of group_window batches sorted by token count,
    # so a batch pads to about its own length (see README, "Padding"). Off: uniformly shuffled batches.
    group_by_length: bool = False
    group_window: int = 50


@dataclass
class CorpusConfig:
    """Pre-training text: raw sources -> tokenized, packed blocks cached on disk."""
    # The packaged name moviedialog, or paths: .txt (one document per line),
    # .jsonl / .csv / .tsv (columns in text_columns), or a `datasets` save_to_disk directory.
    sources: list[str] = field(default_factory=lambda: ["moviedialog"])
    # Columns joined with a space into one document (JSONL/CSV/datasets sources).
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    block_size: int = 128           # tokens per packed block, [CLS] and [SEP] included (<= 512)
    max_documents: Optional[int] = None  # first N documents of all sources together (small runs)
    validation_blocks: int = 256    # the last N blocks are held out for MLM evaluation
    # Where tokenized corpora are cached (keyed by sources, tokenizer and block size);
    # null = $CODIR_DS_CACHE or ~/.cache/codir_ds.
    cache_dir: Optional[str] = None
    num_proc: int = 0               # tokenization processes; 0 = all available cores


@dataclass
class MethodConfig:
    # Objective by name: ce (finetuning), kd (CE + KD), codir (CE + KD + CRD).
    name: str = "codir"
    alpha_kd: float = 0.7          # alpha_1 of Eq. 1
    alpha_crd: float = 0.1         # alpha_2 of Eq. 1
    kd_temperature: float = 2.0    # rho of Eq. 2
    kd_t2_scale: bool = True       # multiply the KD term by rho^2 (common practice; explicit here)
    crd_temperature: float = 0.07  # tau of Eq. 4
    num_negatives: int = 100       # K
    bank_momentum: float = 0.5     # beta of Eq. 5
    projection_dim: int = 128      # m
    pooling: str = "mean"          # mean (masked mean over real tokens, the paper's choice) or cls
    # Layers whose pooled features are concatenated: "all" or a list of 1-based layer
    # indices (0 is the embedding output).
    teacher_layers: Union[str, list[int]] = "all"
    student_layers: Union[str, list[int]] = "all"
    # Regression tasks: targets are cut into this many equal-frequency bins and CRD
    # negatives come from other bins (see README, "CRD on regression tasks").
    regression_bins: int = 5
    # Pre-training: fraction of (non-special) tokens selected for masked-LM prediction;
    # selected tokens become [MASK] 80%, a random token 10%, unchanged 10%.
    mlm_probability: float = 0.15
    # ---- intermediate-layer distillation (pkd, tinybert, distilbert, cr_ild; METHODS.md 4-5)
    # Which teacher layer feeds which student layer: "default" (the method's own: pkd uniform
    # over the intermediate layers, tinybert uniform plus embeddings, distilbert and cr_ild
    # last only), "uniform" (student layer i <- teacher layer i * Lt / Ls), "last" (last <-
    # last), or a list of [student_layer, teacher_layer] pairs (1-based, 0 = embeddings).
    layer_map: Union[str, list[list[int]]] = "default"
    alpha_hidden: float = 1.0     # hidden-state term: pkd normalised [CLS] MSE, tinybert/cr_ild MSE,
                                  # distilbert cosine loss
    alpha_attention: float = 1.0  # attention-map MSE (tinybert, cr_ild)
    # ---- CR-ILD (METHODS.md 2): ILD stage on the first ild_fraction of the steps, then
    # prediction-layer KD (+ CE) with alpha_kd / kd_temperature.
    ild_fraction: float = 0.5
    alpha_consistency: float = 1.0  # final weight of the mixup consistency term
    consistency_ramp: float = 1.0   # fraction of the ILD stage over which that weight rises 0 -> final
    mixup_alpha: float = 1.0        # lambda ~ Beta(a, a), then lambda = max(lambda, 1 - lambda)
    consistency_ema: float = 0.0    # 0: clean targets from the student itself (no grad); in (0, 1):
                                    # from an EMA copy of the student with this decay
    # ---- CTCD (METHODS.md 3): a larger and a smaller trainable model trained together.
    # The larger model: a directory (e.g. all-MiniLM-L6-v2) or null for a random model of
    # ctcd_large_layers x ctcd_large_hidden / ctcd_large_heads. The smaller model is the student.
    ctcd_large_init: Optional[str] = None
    ctcd_large_layers: int = 4
    ctcd_large_hidden: int = 256
    ctcd_large_heads: int = 4
    alpha_small_to_large: float = 0.5   # weight of KD(small -> large) in the larger model's loss
    alpha_large_to_small: float = 0.5   # weight of KD(large -> small) in the smaller model's loss
    # One-way variant: the frozen model.teacher distils into both models (alpha_kd each),
    # and the two models do not distil into each other.
    ctcd_one_way: bool = False


@dataclass
class TrainingConfig:
    seed: int = 42
    epochs: float = 3.0
    max_steps: int = -1             # > 0 overrides epochs
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    adam_eps: float = 1e-6
    # Optional overrides of the DeepSpeed JSON's batch settings (small-batch CPU runs).
    train_batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    # Where the accelerator has no fp16 (CPU), the DeepSpeed JSON's fp16 becomes this.
    fp16_fallback: str = "bf16"
    eval_every: int = 0             # steps; 0 = only at the end
    eval_batch_size: int = 64
    checkpoint_every: int = 0       # steps; 0 = only at the end
    keep_checkpoints: int = 2
    # Stop (after saving a checkpoint) once this many optimizer steps are done, as if the
    # job were preempted; `--resume` continues it. 0 = run to the end. For time-limited jobs.
    stop_at_step: int = 0
    # World-size-invariant sampling: one global shuffle per epoch cut into global batches,
    # each split over ranks and micro steps; bank updates are routed to the owner rank. The
    # run then depends on the seed and global batch only, not on ranks or accumulation.
    deterministic: bool = False
    # Non-finite policy: an optimizer step with non-finite gradients (NaN/inf loss, fp16
    # overflow) is skipped and counted; this many skipped steps in a row stop the run.
    max_consecutive_skips: int = 50
    # Finetuning with kd / codir: keep the frozen teacher's logits and pooled features per
    # example in memory-mapped files under <run>/teacher_cache/, so that later epochs skip the
    # teacher forward (see README, "Teacher-output cache").
    teacher_cache: bool = False
    # AdamW implementation: auto (fused where the run's device has the fused kernel, else foreach),
    # fused (one kernel for all parameters; refused where unsupported), foreach, plain (per-parameter loop).
    optimizer_impl: str = "auto"
    # Compile the student (and larger CTCD model) with torch.compile(dynamic=True); the first steps and the
    # first evaluation pay the compilation. Checkpoint and export keys are unchanged.
    compile: bool = False


@dataclass
class LoggingConfig:
    log_every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class ExperimentConfig:
    name: str = "codir"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading

def _fix(key: str) -> str:
    """The fix clause of a bad-value message."""
    return f"fix it in the YAML or with --set {key}=..."


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "valid keys: " + ", ".join(valid)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is not None:  # list[int], not just "list"
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with int -> float widening)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except CodirError as e:
                errors.append(str(e))
        allowed = " or ".join(_type_name(a) if a is not type(None) else "null" for a in args)
        raise CodirError(f"config key '{key}' must be {allowed}, got {value!r}: {_fix(key)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise CodirError(f"config key '{key}' must be a list of {_type_name(item_tp)}, got {value!r}: {_fix(key)}")
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise CodirError(f"config key '{key}' must be true or false, got {value!r}: {_fix(key)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise CodirError(f"config key '{key}' must be an integer, got {value!r}: {_fix(key)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise CodirError(f"config key '{key}' must be a number, got {value!r}: {_fix(key)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise CodirError(f"config key '{key}' must be a string, got {value!r}: {_fix(key)}")
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            valid = [f"{prefix}{k}" for k in fields]
            raise CodirError(f"unknown config key '{full}': {_suggest(full, valid)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:  # a section whose keys are all commented out
                value = {}
            if not isinstance(value, dict):
                raise CodirError(f"config key '{full}' must be a mapping of {tp.__name__} keys, got {value!r}: "
                                 f"write it as a section with indented keys")
            kwargs[key] = _build(tp, value, full + ".")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise CodirError(f"--set expects key=value, got {item!r}: write e.g. --set training.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise CodirError(f"--set expects key=value, got {item!r}: write e.g. --set training.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _merge(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise CodirError(f"--set {'.'.join(path)}: '{part}' is not a section: set a key inside a section, e.g. "
                             f"--set training.lr=1e-4")
        node = nxt
    node[path[-1]] = value


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Read a YAML experiment file, apply ``key=value`` overrides, validate, return the config."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise CodirError(f"config file '{path}' does not exist: pass --config with an existing YAML file (see configs/)")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "parse error"
            raise CodirError(f"config file '{path}' is not valid YAML ({first}): fix the syntax") from None
        if not isinstance(tree, dict):
            raise CodirError(f"config file '{path}' must hold a mapping of sections (model, data, method, training, "
                             f"logging): see configs/ for examples")
    for item in overrides or []:
        keys, value = _parse_override(item)
        _merge(tree, keys, value)
    cfg = _build(ExperimentConfig, tree, "")
    validate(cfg)
    return cfg


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise CodirError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}: "
                         f"{_fix(key)}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise CodirError(f"config key '{key}' must be a finite number {'>= 0' if allow_zero else '> 0'}, "
                         f"got {value!r}: {_fix(key)}")


def _layers(key: str, value) -> None:
    if isinstance(value, str):
        if value != "all":
            raise CodirError(f"config key '{key}' must be 'all' or a list of layer indices, got {value!r}: {_fix(key)}")
    elif not value or any(v < 0 for v in value):
        raise CodirError(f"config key '{key}' must be 'all' or a non-empty list of layer indices >= 0, got {value!r}: "
                         f"{_fix(key)}")


def validate(cfg: ExperimentConfig) -> None:
    """Value checks that do not need files or models (those come at load time)."""
    m, d, t = cfg.method, cfg.data, cfg.training
    _choice("method.name", m.name, OBJECTIVES)
    _choice("method.pooling", m.pooling, POOLINGS)
    _choice("data.task_type", d.task_type, ("auto", "classification", "regression"))
    _choice("training.fp16_fallback", t.fp16_fallback, PRECISION_FALLBACKS)
    _choice("training.optimizer_impl", t.optimizer_impl, OPTIMIZER_IMPLS)
    _layers("method.teacher_layers", m.teacher_layers)
    _layers("method.student_layers", m.student_layers)
    for key in ("kd_temperature", "crd_temperature", "num_negatives", "projection_dim", "regression_bins"):
        _positive(f"method.{key}", getattr(m, key))
    for key in ("alpha_kd", "alpha_crd"):
        _positive(f"method.{key}", getattr(m, key), allow_zero=True)
    if not 0.0 <= m.bank_momentum < 1.0:
        raise CodirError(f"config key 'method.bank_momentum' must be in [0, 1), got {m.bank_momentum}: "
                         f"{_fix('method.bank_momentum')}")
    if not 0.0 < d.validation_fraction < 1.0:
        raise CodirError(f"config key 'data.validation_fraction' must be in (0, 1), got {d.validation_fraction}: "
                         f"{_fix('data.validation_fraction')}")
    _positive("data.max_length", d.max_length)
    _positive("data.group_window", d.group_window)
    if d.train_file and d.task != "files":
        raise CodirError(f"data.train_file is set but data.task is {d.task!r}: set data.task=files to train on your files")
    if d.task == "files" and not d.train_file:
        raise CodirError("data.task=files needs data.train_file: set data.train_file to a CSV, TSV or JSONL file")
    _positive("training.lr", t.lr)
    _positive("training.epochs", t.epochs, allow_zero=True)
    _positive("training.eval_batch_size", t.eval_batch_size)
    _positive("training.keep_checkpoints", t.keep_checkpoints)
    _positive("training.eval_every", t.eval_every, allow_zero=True)
    _positive("training.checkpoint_every", t.checkpoint_every, allow_zero=True)
    _positive("training.stop_at_step", t.stop_at_step, allow_zero=True)
    for key in ("train_batch_size", "micro_batch_size"):
        if getattr(t, key) is not None:
            _positive(f"training.{key}", getattr(t, key))
    _positive("training.max_consecutive_skips", t.max_consecutive_skips)
    if t.max_steps <= 0 and t.epochs <= 0:
        raise CodirError("training.epochs and training.max_steps are both 0: set one of them > 0")
    if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
        raise CodirError(f"config key 'training.adam_betas' must be two numbers in [0, 1), got {t.adam_betas}: "
                         f"{_fix('training.adam_betas')}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise CodirError(f"config key 'training.warmup_ratio' must be in [0, 1), got {t.warmup_ratio}: "
                         f"{_fix('training.warmup_ratio')}")
    c = cfg.corpus
    if not c.sources:
        raise CodirError("corpus.sources is empty: list the packaged moviedialog corpus or your text files")
    if not 8 <= c.block_size <= 512:
        raise CodirError(f"config key 'corpus.block_size' must be in 8..512, got {c.block_size}: "
                         f"{_fix('corpus.block_size')}")
    _positive("corpus.validation_blocks", c.validation_blocks, allow_zero=True)
    _positive("corpus.num_proc", c.num_proc, allow_zero=True)
    if c.max_documents is not None:
        _positive("corpus.max_documents", c.max_documents)
    if not 0.0 < m.mlm_probability < 1.0:
        raise CodirError(f"config key 'method.mlm_probability' must be in (0, 1), got {m.mlm_probability}: "
                         f"{_fix('method.mlm_probability')}")
    mc = cfg.model
    if mc.init_from and mc.student_init:
        raise CodirError("model.init_from and model.student_init are both set: use init_from to continue a "
                         "previous run's student, student_init to copy layers of another model; not both")
    if mc.student_init is None and mc.init_from is None:
        for key in ("student_layers", "student_hidden", "student_heads"):
            _positive(f"model.{key}", getattr(mc, key))
        if mc.student_hidden % mc.student_heads:
            raise CodirError(
                f"model.student_hidden ({mc.student_hidden}) must be divisible by model.student_heads "
                f"({mc.student_heads}): change one of them")
    for key in ("alpha_hidden", "alpha_attention", "alpha_consistency", "alpha_small_to_large",
                "alpha_large_to_small"):
        _positive(f"method.{key}", getattr(m, key), allow_zero=True)
    _positive("method.mixup_alpha", m.mixup_alpha)
    if isinstance(m.layer_map, str):
        _choice("method.layer_map", m.layer_map, ("default", "uniform", "last"))
    elif not m.layer_map or any(len(pair) != 2 or min(pair) < 0 for pair in m.layer_map):
        raise CodirError(f"config key 'method.layer_map' must be default, uniform, last or a list of [student_layer, "
                         f"teacher_layer] pairs of indices >= 0, got {m.layer_map!r}: {_fix('method.layer_map')}")
    for key, ok, allowed in (("ild_fraction", 0.0 <= m.ild_fraction <= 1.0, "[0, 1]"),
                             ("consistency_ramp", 0.0 < m.consistency_ramp <= 1.0, "(0, 1]"),
                             ("consistency_ema", 0.0 <= m.consistency_ema < 1.0, "[0, 1)")):
        if not ok:
            raise CodirError(f"config key 'method.{key}' must be in {allowed}, got {getattr(m, key)}: "
                             f"{_fix('method.' + key)}")
    if m.name == "ctcd" and not m.ctcd_large_init:
        for key in ("ctcd_large_layers", "ctcd_large_hidden", "ctcd_large_heads"):
            _positive(f"method.{key}", getattr(m, key))
        if m.ctcd_large_hidden % m.ctcd_large_heads:
            raise CodirError(f"method.ctcd_large_hidden ({m.ctcd_large_hidden}) must be divisible by "
                             f"method.ctcd_large_heads ({m.ctcd_large_heads}): change one of them")
    if d.supplementary_max_examples is not None:
        _positive("data.supplementary_max_examples", d.supplementary_max_examples)
    if d.supplementary and m.name != "cr_ild":
        raise CodirError(f"data.supplementary is set but method.name is {m.name}: only cr_ild reads supplementary "
                         f"data; unset data.supplementary or use method.name=cr_ild")
    if t.teacher_cache and m.name not in ("kd", "codir"):
        raise CodirError(f"training.teacher_cache caches per-example teacher logits and pooled features, which "
                         f"only kd and codir use (method.name is {m.name}): set training.teacher_cache=false")
    needs_teacher = m.name in TEACHER_OBJECTIVES or (m.name == "ctcd" and m.ctcd_one_way)
    if needs_teacher and not mc.teacher:
        raise CodirError(f"method.name={m.name}{' with method.ctcd_one_way' if m.name == 'ctcd' else ''} needs a "
                         f"teacher: set model.teacher to a directory or 'all-MiniLM-L6-v2'")
    if mc.tokenizer is None and mc.teacher is None and mc.student_init is None and mc.init_from is None:
        raise CodirError("no tokenizer: set model.tokenizer, model.teacher, model.student_init or model.init_from "
                         "to a model directory")


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

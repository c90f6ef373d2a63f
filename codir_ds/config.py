"""Typed experiment configuration: a YAML file plus ``--set key=value`` overrides.

The experiment (model, data, method, training, logging) lives here; the engine
(batch sizes, precision, ZeRO stage) lives in the DeepSpeed JSON passed with
``--deepspeed_config``. Everything is validated before any expensive work: an
unknown key names the closest valid ones, a bad value names the allowed ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import yaml

from codir_ds.errors import CodirError

from codir_ds import checks
from codir_ds.assets import is_packaged_minilm, user_spec
from codir_ds.distill.methods import get_method, method_config_class, method_names, validate_options

PRECISION_FALLBACKS = ("bf16", "fp32")
# training.optimizer_impl: AdamW's implementation (auto = fused where the run's device has the kernel, else foreach).
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "plain")


@dataclass
class ModelConfig:
    teacher: Optional[str] = field(default=None, metadata={
        "help": "Teacher: a local Hugging Face directory, or the packaged name all-MiniLM-L6-v2."})
    teacher_sha256: Optional[str] = field(default=None, metadata={
        "help": "Expected sha256 of the teacher's model.safetensors (checked at load). The packaged MiniLM and "
                "directories exported by codir-ds are always checked."})
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "Tokenizer directory; null = the teacher's, else the student init directory."})
    student_init: Optional[str] = field(default=None, metadata={
        "help": "Initialise the student from a Hugging Face directory (e.g. the pre-trained teacher body), "
                "copying the layers listed in student_init_layers."})
    student_init_layers: Optional[list[int]] = field(default=None, metadata={
        "help": "0-based Transformer blocks of student_init copied into the student; null = all layers."})
    student_layers: int = field(default=2, metadata={
        "help": "Layers of a student built from a config (when student_init and init_from are null)."})
    student_hidden: int = field(default=128, metadata={
        "help": "Hidden size of a student built from a config."})
    student_heads: int = field(default=2, metadata={
        "help": "Attention heads of a student built from a config (must divide student_hidden)."})
    student_intermediate: Optional[int] = field(default=None, metadata={
        "help": "Feed-forward size of a student built from a config; null = 4 x student_hidden."})
    dropout: float = field(default=0.1, metadata={
        "help": "Dropout (hidden and attention probabilities) of the student, however it is initialised."})
    init_from: Optional[str] = field(default=None, metadata={
        "help": "Two-stage training: start the student from a previous codir-ds run (its export/ directory) or a "
                "Hugging Face directory, all weights included (e.g. stage 2 of CoDIR-Pre from the stage-1 MLM run, "
                "or finetuning a pre-trained student)."})


@dataclass
class DataConfig:
    task: str = field(default="movie_snippets", metadata={
        "help": "A packaged task (movie_snippets, movie_snippets_regression, trec6), a GLUE task name (with "
                "data.glue_dir), or files (data.train_file / data.validation_file)."})
    train_file: Optional[str] = field(default=None, metadata={
        "help": "data.task=files: the training data: a .csv, .tsv, .jsonl or .parquet file, or a datasets "
                "save_to_disk directory (a DatasetDict's split by its folder, e.g. my_dataset/train)."})
    validation_file: Optional[str] = field(default=None, metadata={
        "help": "data.task=files: the validation data, in the same kinds as data.train_file (e.g. "
                "my_dataset/validation); null = a seeded split of the training data."})
    text_column: str = field(default="text", metadata={
        "help": "Column holding the text (files, and .jsonl/.csv/.tsv supplementary data)."})
    text_pair_column: Optional[str] = field(default=None, metadata={
        "help": "Column holding the second text of a sentence pair; null = single sentences."})
    label_column: str = field(default="label", metadata={
        "help": "Column holding the label (files)."})
    task_type: str = field(default="auto", metadata={
        "help": "auto, classification or regression (files). auto: regression only when the labels are numbers "
                "and some are not whole."})
    glue_dir: Optional[str] = field(default=None, metadata={
        "help": "Directory in the standard GLUE TSV layout, for GLUE task names."})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "Share of the rows held out for validation where the source has no validation split."})
    test_fraction: float = field(default=0.1, metadata={
        "help": "Packaged tasks (movie_snippets, trec6): share of all rows held out as a test split, taken from the "
                "end of the seeded training permutation, so validation and the first training rows do not change; "
                "never trained on, never used for checkpoint selection. 0 = no test split."})
    split_seed: int = field(default=13, metadata={
        "help": "Seed of that train/validation split and of the example order."})
    max_train_examples: Optional[int] = field(default=None, metadata={
        "help": "Use only the first N training examples (a seeded random subset); null = all."})
    max_eval_examples: Optional[int] = field(default=None, metadata={
        "help": "Evaluate on the first N validation (and test) examples; null = all."})
    max_length: int = field(default=128, metadata={
        "help": "Tokens per example after truncation, special tokens included."})
    supplementary: Optional[str] = field(default=None, metadata={
        "help": "CR-ILD: supplementary inputs for the ILD stage (labels unused): a packaged task name "
                "(movie_snippets, trec6, ...), or a .txt (one text per line) / .jsonl / .csv / .tsv file whose "
                "text_column (and text_pair_column when set) is read. null = the task's own inputs only."})
    supplementary_max_examples: Optional[int] = field(default=None, metadata={
        "help": "CR-ILD: use at most N supplementary inputs; null = all."})
    group_by_length: bool = field(default=False, metadata={
        "help": "Finetuning: cut micro-batches from windows of group_window batches sorted by token count, so a "
                "batch pads to about its own length. false: uniformly shuffled batches."})
    group_window: int = field(default=50, metadata={
        "help": "Batches per length-sorted window (group_by_length)."})


@dataclass
class CorpusConfig:
    """Pre-training text: raw sources -> tokenized, packed blocks cached on disk."""
    sources: list[str] = field(default_factory=lambda: ["moviedialog"], metadata={
        "help": "The packaged name moviedialog, or paths: .txt (one document per line), .json / .jsonl / .csv / .tsv "
                "(columns in text_columns), or a datasets save_to_disk directory."})
    text_columns: list[str] = field(default_factory=lambda: ["text"], metadata={
        "help": "Columns joined with a space into one document (JSON/JSONL/CSV/TSV/datasets sources)."})
    block_size: int = field(default=128, metadata={
        "help": "Tokens per packed block, [CLS] and [SEP] included (8..512)."})
    max_documents: Optional[int] = field(default=None, metadata={
        "help": "Use the first N documents of all sources together (small runs); null = all."})
    validation_blocks: int = field(default=256, metadata={
        "help": "The last N blocks are held out for MLM evaluation."})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "Where tokenized corpora are cached (keyed by sources, tokenizer and block size); "
                "null = $CODIR_DS_CACHE, else ~/.cache/codir_ds."})
    num_proc: int = field(default=0, metadata={
        "help": "Tokenization processes; 0 = all available cores."})


# The ``method`` section: ``name`` plus every registered method's options, each declared (with its
# default and help text) in its method's module under codir_ds/distill/methods/.
MethodConfig = method_config_class()


@dataclass
class TrainingConfig:
    seed: int = field(default=42, metadata={
        "help": "Seed of initialisation, sampling, masking, negatives and dropout."})
    epochs: float = field(default=3.0, metadata={
        "help": "Passes over the training data (may be fractional); ignored when max_steps > 0."})
    max_steps: int = field(default=-1, metadata={
        "help": "Optimizer steps; > 0 overrides epochs."})
    lr: float = field(default=2e-5, metadata={
        "help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.01, metadata={
        "help": "AdamW weight decay (not applied to biases and norm weights)."})
    warmup_ratio: float = field(default=0.06, metadata={
        "help": "Share of the steps with linear warm-up; then linear decay to 0."})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.98], metadata={
        "help": "AdamW betas."})
    adam_eps: float = field(default=1e-6, metadata={
        "help": "AdamW epsilon."})
    train_batch_size: Optional[int] = field(default=None, metadata={
        "help": "Override of the DeepSpeed JSON's global batch (small-batch CPU runs); null = the JSON's."})
    micro_batch_size: Optional[int] = field(default=None, metadata={
        "help": "Override of the DeepSpeed JSON's micro-batch per rank; gradient accumulation is derived. "
                "null = the JSON's."})
    fp16_fallback: str = field(default="bf16", metadata={
        "help": "Where the accelerator has no fp16 (CPU), the DeepSpeed JSON's fp16 becomes this: bf16 or fp32."})
    eval_every: int = field(default=0, metadata={
        "help": "Evaluate every N optimizer steps; 0 = only at the end."})
    eval_batch_size: int = field(default=64, metadata={
        "help": "Examples per evaluation forward pass."})
    checkpoint_every: int = field(default=0, metadata={
        "help": "Save a checkpoint every N optimizer steps; 0 = only at the end."})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "How many of the newest complete checkpoints are kept."})
    stop_at_step: int = field(default=0, metadata={
        "help": "Stop (after saving a checkpoint) once this many optimizer steps are done, as if the job were "
                "preempted; --resume continues it. 0 = run to the end. For time-limited jobs."})
    deterministic: bool = field(default=False, metadata={
        "help": "World-size-invariant sampling: one global shuffle per epoch cut into global batches, each split "
                "over ranks and micro steps; bank updates are routed to the owner rank. The run then depends on "
                "the seed and global batch only, not on ranks or accumulation."})
    max_consecutive_skips: int = field(default=50, metadata={
        "help": "Non-finite policy: an optimizer step with non-finite gradients (NaN/inf loss, fp16 overflow) is "
                "skipped and counted; this many skipped steps in a row stop the run."})
    teacher_cache: bool = field(default=False, metadata={
        "help": "Finetuning with kd / codir: keep the frozen teacher's logits and pooled features per example in "
                "memory-mapped files under <run>/teacher_cache/, so that later epochs skip the teacher forward."})
    optimizer_impl: str = field(default="auto", metadata={
        "help": "AdamW implementation: auto (fused where the run's device has the fused kernel, else foreach), "
                "fused (one kernel for all parameters; refused where unsupported), foreach, plain "
                "(per-parameter loop)."})
    compile: bool = field(default=False, metadata={
        "help": "Compile the student (and the larger CTCD model) with torch.compile(dynamic=True); the first steps "
                "and the first evaluation pay the compilation. Checkpoint and export keys are unchanged."})


@dataclass
class LoggingConfig:
    log_every: int = field(default=10, metadata={
        "help": "Write losses to TensorBoard and the progress bar every N optimizer steps."})
    tensorboard: bool = field(default=True, metadata={
        "help": "Write TensorBoard events under <run>/tensorboard/."})
    progress_bar: bool = field(default=True, metadata={
        "help": "Show a progress bar (rank 0)."})


@dataclass
class ExperimentConfig:
    name: str = field(default="codir", metadata={
        "help": "Experiment name; pretrain.py writes to runs/<name> when --output_dir is not given."})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # The YAML it was read from (set by load_config; not a config key): errors suggest commands with it.
    source: ClassVar[Optional[str]] = None

    def to_dict(self) -> dict:
        """Every section; of ``method``, the name and the options the chosen method reads (what config.yaml holds)."""
        out = dataclasses.asdict(self)
        if self.method.name in method_names():
            reads = get_method(self.method.name).reads()
            out["method"] = {k: v for k, v in out["method"].items() if k in reads}
        return out


# ----------------------------------------------------------------------------- loading

def _initials(name: str) -> Optional[str]:
    """``learning_rate`` -> ``lr`` (None for a one-word name)."""
    words = [w for w in name.split("_") if w]
    return "".join(w[0] for w in words) if len(words) > 1 else None


def _close_names(name: str, valid: list[str], cutoff: float = 0.75, margin: float = 0.1) -> list[str]:
    """The names in ``valid`` that ``name`` is plausibly a typo of, best first (at most 3).

    Similarity is difflib's ratio of the names alone (never of a shared section prefix, which made
    ``training.lrr`` look close to ``training.seed``); a whole word of a name (``warmup`` ->
    ``warmup_ratio``), its start (``kd_temp``) and its initials (``learning_rate`` -> ``lr``) count as
    close too. Only names within ``margin`` of the best match are kept, so one clear match stands alone.
    """
    scored = []
    for v in valid:
        score = difflib.SequenceMatcher(None, name, v).ratio()
        if (len(name) >= 3 and (name in v.split("_") or v.startswith(name))) or _initials(v) == name \
                or _initials(name) == v:
            score = max(score, 0.8)
        if score >= cutoff:
            scored.append((score, v))
    if not scored:
        return []
    best = max(s for s, _ in scored)
    return [v for s, v in sorted(scored, key=lambda sv: -sv[0]) if s >= best - margin][:3]


def _section_keys() -> dict[str, list[str]]:
    """Every section's key names: ``{"": top-level names, "training": [...], ...}``."""
    hints = typing.get_type_hints(ExperimentConfig)
    out = {"": [f.name for f in dataclasses.fields(ExperimentConfig)]}
    for f in dataclasses.fields(ExperimentConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = [sub.name for sub in dataclasses.fields(hints[f.name])]
    return out


def _suggest(key: str, valid: list[str]) -> str:
    """The fix for the unknown ``key`` (``section.name``): the close names of its section (``valid``, full
    keys), else the same name in another section, else the section's valid keys."""
    prefix, _, name = key.rpartition(".")
    prefix = prefix + "." if prefix else ""
    close = [prefix + c for c in _close_names(name, [v[len(prefix):] for v in valid])]
    if not close and prefix:
        close = [f"{section}.{name}" for section, names in _section_keys().items()
                 if section and f"{section}." != prefix and name in names]
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


# model.init_from and model.student_init exclude each other: one set by --set replaces the YAML's other.
_INIT_ALTERNATIVES = {"init_from": ("student_init", "student_init_layers"), "student_init": ("init_from",)}


def _drop_replaced_init(tree: dict, parsed: list[tuple[list[str], Any]]) -> None:
    """``--set model.init_from=RUN`` on a YAML with ``model.student_init`` (or the reverse) replaces it."""
    model = tree.get("model")
    if not isinstance(model, dict):
        return
    for keys, value in parsed:
        if keys[:1] == ["model"] and len(keys) == 2 and value is not None:
            for other in _INIT_ALTERNATIVES.get(keys[1], ()):
                model.pop(other, None)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, stage: Optional[str] = None,
                evaluation: bool = False) -> ExperimentConfig:
    """Read a YAML experiment file, apply ``key=value`` overrides, validate, return the config.

    ``stage`` (``"finetune"``/``"pretrain"``, the launcher's) makes the errors' suggested commands fit it.
    ``evaluation``: the config only names a task to evaluate a model on (``launchers/evaluate.py``), so the
    model and method settings (teacher, student, distillation) are not checked.
    """
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
    parsed = [_parse_override(item) for item in overrides or []]
    _drop_replaced_init(tree, parsed)
    file_keys = set(tree["method"]) if isinstance(tree.get("method"), dict) else set()
    for keys, value in parsed:
        _merge(tree, keys, value)
    if not evaluation:
        _check_stage_sections(tree, parsed, stage, path)
        _check_method_keys(tree, file_keys, parsed, stage, path)
    cfg = _build(ExperimentConfig, tree, "")
    validate(cfg, stage, path, evaluation)
    cfg.source = path
    return cfg


# The section a stage never reads: finetuning trains on a task (data.*), pre-training on a corpus (corpus.*).
_IGNORED_SECTION = {"finetune": ("corpus", "pre-training", "pretrain"), "pretrain": ("data", "finetuning", "finetune")}


def _check_stage_sections(tree: dict, parsed: list, stage: Optional[str], path: Optional[str]) -> None:
    """With the launcher's ``stage``: keys of the section that stage never reads are refused, not ignored."""
    if stage not in _IGNORED_SECTION:
        return
    name = (tree.get("method") or {}).get("name", MethodConfig().name) if isinstance(tree.get("method"), dict) \
        else MethodConfig().name
    if name in method_names() and stage not in get_method(name).stages:
        return  # the method itself is of the other stage: its own error names the launcher to use
    section, reader, launcher = _IGNORED_SECTION[stage]
    keys = tree.get(section)
    if not isinstance(keys, dict) or not keys:
        return
    cli = [".".join(k) for k, _ in parsed if k[:1] == [section]]
    where = " (--set)" if cli else (f" from {path}" if path else "")
    first = cli[0] if cli else f"{section}.{next(iter(keys))}"
    this = "finetuning" if stage == "finetune" else "pre-training"
    raise CodirError(f"{first} is read in {reader} only, and this is {this}: remove the {section} keys{where}, or "
                     f"run launchers/{launcher}.py")


def _check_method_keys(tree: dict, file_keys: set, parsed: list, stage: Optional[str], path: Optional[str]) -> None:
    """Only the chosen method's options are accepted, and (``stage`` given) only those its stage reads.

    A key of another method is one error line naming the methods that read it. Switching ``method.name`` on the
    command line drops the YAML's keys the new method does not read (the YAML described another method); a key
    the YAML sets for its own method, or one given on the command line, that the chosen method does not read
    is an error.
    """
    section = tree.get("method")
    if not isinstance(section, dict):
        return
    name = section.get("name", MethodConfig().name)
    if not isinstance(name, str) or name not in method_names():
        return  # the unknown name gets its own error
    method = get_method(name)
    reads = method.reads(stage)
    cli = {keys[1] for keys, _ in parsed if keys[:1] == ["method"] and len(keys) == 2}
    switched = "name" in cli
    fields = {f.name: f for f in dataclasses.fields(MethodConfig)}
    for key in list(section):
        if key in reads or key not in fields:  # unknown keys get _build's error with suggestions
            continue
        if key in file_keys and key not in cli and switched:
            del section[key]
            continue
        where = (f" from {path}" if path and key in file_keys and key not in cli else "") or " (--set)"
        ignored = method.stage_ignores(key, stage)
        if ignored:
            raise CodirError(f"method.{key} is {ignored}: remove it{where}")
        owners = [n for n in fields[key].metadata.get("methods", ()) if n != name]
        raise CodirError(f"method.{key} is an option of {', '.join(owners) or 'no method'}, not of method.name={name}"
                         f" (which reads {', '.join(sorted(reads - {'name'})) or 'no options'}): remove it{where}"
                         + (f", or set method.name={owners[0]}" if owners else ""))


_fix = checks.fix
_choice = checks.choice
_positive = checks.positive


def validate(cfg: ExperimentConfig, stage: Optional[str] = None, source: Optional[str] = None,
             evaluation: bool = False) -> None:
    """Value checks that do not need files or models (those come at load time), section by section.

    ``stage`` and ``source`` (the YAML's path) shape the commands the errors suggest; ``evaluation``
    skips the model and method sections (see :func:`load_config`)."""
    _validate_choices(cfg)
    _validate_data(cfg.data)
    _validate_training(cfg.training)
    _validate_corpus(cfg.corpus)
    _validate_extremes(cfg, evaluation)
    if not evaluation:
        _validate_model(cfg.model)
        _validate_method_needs(cfg, stage, source)


def _validate_choices(cfg: ExperimentConfig) -> None:
    m, d, t = cfg.method, cfg.data, cfg.training
    _choice("method.name", m.name, method_names())
    _choice("data.task_type", d.task_type, ("auto", "classification", "regression"))
    _choice("training.fp16_fallback", t.fp16_fallback, PRECISION_FALLBACKS)
    _choice("training.optimizer_impl", t.optimizer_impl, OPTIMIZER_IMPLS)
    validate_options(m)  # every method option's value check (codir_ds/distill/methods/)


def _validate_data(d: DataConfig) -> None:
    if isinstance(d.test_fraction, bool) or not 0.0 <= d.test_fraction < 1.0 \
            or d.validation_fraction + d.test_fraction >= 1.0:
        raise CodirError(f"config key 'data.test_fraction' must be in [0, 1) and leave training rows beside "
                         f"data.validation_fraction {d.validation_fraction}, got {d.test_fraction}: "
                         f"{_fix('data.test_fraction')}")
    if not 0.0 < d.validation_fraction < 1.0:
        raise CodirError(f"config key 'data.validation_fraction' must be in (0, 1), got {d.validation_fraction}: "
                         f"{_fix('data.validation_fraction')}")
    _positive("data.max_length", d.max_length)
    _positive("data.group_window", d.group_window)
    if d.train_file and d.task != "files":
        raise CodirError(f"data.train_file is set but data.task is {d.task!r}: set data.task=files to train on your files")
    if d.task == "files" and not d.train_file:
        raise CodirError("data.task=files needs data.train_file: set data.train_file to a CSV, TSV, JSONL or Parquet "
                         "file, or a datasets save_to_disk split folder")


def _validate_training(t: TrainingConfig) -> None:
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


def _validate_extremes(cfg: ExperimentConfig, evaluation: bool = False) -> None:
    """Numbers at their extremes that the loop, the optimizer or the model cannot run with (a zero log
    interval, NaN weight decay, a zero Adam epsilon, a seed numpy rejects, dropout 1, attention-map ILD on
    the embeddings alone)."""
    t, mc = cfg.training, cfg.model
    _positive("logging.log_every", cfg.logging.log_every)
    _positive("training.weight_decay", t.weight_decay, allow_zero=True)
    _positive("training.adam_eps", t.adam_eps)
    checks.in_range("training.seed", t.seed, 0 <= t.seed < 2 ** 53, "[0, 2**53)")
    if evaluation:
        return
    checks.in_range("model.dropout", mc.dropout, 0.0 <= mc.dropout < 1.0, "[0, 1)")
    if mc.student_intermediate is not None and mc.student_init is None and mc.init_from is None:
        _positive("model.student_intermediate", mc.student_intermediate)
    method = get_method(cfg.method.name)
    layer_map = getattr(cfg.method, "layer_map", None)
    layers = method(cfg.method, method.stages[0]).layers
    if (isinstance(layer_map, list) and layers is not None and layers.attention
            and not any(s > 0 and t_ > 0 for s, t_ in layer_map)):
        raise CodirError(f"method.layer_map {layer_map} maps only the embeddings (layer 0), which have no attention "
                         f"maps for method.alpha_attention: add a [student_layer, teacher_layer] pair of Transformer "
                         f"layers (1..L) or set method.alpha_attention=0")


def _validate_corpus(c: CorpusConfig) -> None:
    if not c.sources:
        raise CodirError("corpus.sources is empty: list the packaged moviedialog corpus or your text files")
    if not 8 <= c.block_size <= 512:
        raise CodirError(f"config key 'corpus.block_size' must be in 8..512, got {c.block_size}: "
                         f"{_fix('corpus.block_size')}")
    _positive("corpus.validation_blocks", c.validation_blocks, allow_zero=True)
    _positive("corpus.num_proc", c.num_proc, allow_zero=True)
    if c.max_documents is not None:
        _positive("corpus.max_documents", c.max_documents)


def _validate_model(mc: ModelConfig) -> None:
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


def _validate_method_needs(cfg: ExperimentConfig, stage: Optional[str] = None, source: Optional[str] = None) -> None:
    """The chosen method's cross-key checks, and the settings only some methods read."""
    m, d, t, mc = cfg.method, cfg.data, cfg.training, cfg.model
    method = get_method(m.name)
    method.validate(cfg)
    chosen = method(m, stage if stage in method.stages else method.stages[0])  # for the launcher's stage
    teacher, mixing = chosen.teacher, chosen.mixing
    if d.supplementary_max_examples is not None:
        _positive("data.supplementary_max_examples", d.supplementary_max_examples)
    if d.supplementary and not (mixing is not None and mixing.supplementary):
        readers = _methods_where(lambda m: m.mixing is not None and m.mixing.supplementary)
        raise CodirError(f"data.supplementary is set but method.name is {m.name}: only {' and '.join(readers)} reads "
                         f"supplementary data; unset data.supplementary or use method.name={readers[0]}")
    if t.teacher_cache and not (teacher is not None and teacher.cacheable):
        where = " pre-training" if stage == "pretrain" else ""
        cached = _methods_where(lambda m: m.teacher is not None and m.teacher.cacheable)
        raise CodirError(f"training.teacher_cache caches per-example teacher logits and pooled features for "
                         f"finetuning with {' and '.join(cached)} (this is{where} "
                         f"method.name={m.name}): set training.teacher_cache=false")
    if teacher is not None and not mc.teacher:
        raise CodirError(f"method.name={m.name}{method.teacher_condition} needs a teacher: set model.teacher to "
                         f"{teacher_hint(stage, source)}")
    if stage == "pretrain" and stage in method.stages and mc.teacher and is_packaged_minilm(mc.teacher) \
            and teacher is not None and teacher.logits:
        # known without loading it: the packaged MiniLM is a sentence-embedding model without an MLM head
        raise CodirError(missing_mlm_head(mc.teacher, source))
    if mc.tokenizer is None and mc.teacher is None and mc.student_init is None and mc.init_from is None:
        raise CodirError("no tokenizer: set model.tokenizer, model.teacher, model.student_init or model.init_from "
                         "to a model directory")


MLM_TEACHER_DIR = "runs/teacher_mlm"  # where docs/pretraining.md and the errors put a teacher with a fitted MLM head


def _shown_path(path: str) -> str:
    """``path`` as a user types it from the current directory: relative when it lies below it."""
    rel = os.path.relpath(os.path.abspath(path))
    return rel if not rel.startswith(os.pardir) else path


def _holds_head_of(directory: Path, teacher: str) -> bool:
    """Whether ``directory`` holds a finished launchers/fit_teacher_head.py output for ``teacher``."""
    from codir_ds.assets import EXPORT_MANIFEST, WEIGHTS, resolve_model_dir
    try:  # read here, not with models.loading.read_manifest: models.loading imports this module
        manifest = json.loads((directory / EXPORT_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("kind") != "teacher_with_mlm_head" \
            or not (directory / WEIGHTS).is_file():
        return False
    try:
        return Path(manifest.get("source", "")).resolve() == resolve_model_dir(teacher).resolve()
    except (CodirError, OSError):
        return False


def mlm_head_fix(teacher: str = "all-MiniLM-L6-v2", source: Optional[str] = None) -> tuple[Optional[str], str]:
    """How to get ``teacher`` with an MLM head, from the current directory: ``(command, directory)``.

    ``directory`` is the first of runs/teacher_mlm, runs/teacher_mlm_2, ... that already holds a head fitted on
    ``teacher`` (``command`` None: nothing to fit) or else is free (missing or empty); ``command`` then fits one
    there, with ``--config source`` (the run's YAML: its corpus) when known. It never needs --overwrite, so it
    runs as written after docs/pretraining.md's own command has filled runs/teacher_mlm.
    """
    name = user_spec(teacher)
    for i in range(1, 1000):
        out = MLM_TEACHER_DIR if i == 1 else f"{MLM_TEACHER_DIR}_{i}"
        path = Path(out)
        if path.is_dir() and _holds_head_of(path, teacher):
            return None, out
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            break
    launcher = _shown_path(str(Path(__file__).resolve().parent.parent / "launchers" / "fit_teacher_head.py"))
    argv = ["python", launcher, "--teacher", name, "--output_dir", out]
    if source:
        argv += ["--config", _shown_path(source)]
    return shlex.join(argv), out


def missing_mlm_head(teacher: str, source: Optional[str] = None, detail: str = "") -> str:
    """The error for a pre-training teacher without an MLM head where logit KD needs one (``detail``: what is
    missing), with the fix that runs as written (:func:`mlm_head_fix`)."""
    command, out = mlm_head_fix(teacher, source)
    fix = (f"fit one with `{command}` and set model.teacher={out}" if command else
           f"{out} already holds it with a fitted head: set model.teacher={out}")
    return (f"teacher '{user_spec(teacher)}' has no masked-LM head{detail}: logit KD (method.alpha_kd > 0) needs "
            f"one; {fix}, or set method.alpha_kd=0")


def teacher_hint(stage: Optional[str], source: Optional[str] = None, body: str = "all-MiniLM-L6-v2") -> str:
    """How to get a teacher for ``stage``, with a command that runs as written (``source``: the run's YAML,
    ``body``: the model a finetuning teacher starts from)."""
    command, out = mlm_head_fix("all-MiniLM-L6-v2", source)
    mlm = ("a masked-LM teacher, e.g. the packaged MiniLM with a fitted MLM head: "
           + (f"`{command}` then model.teacher={out}" if command else f"model.teacher={out}, which holds one")
           + " (or model.teacher=all-MiniLM-L6-v2 with method.alpha_kd=0)")
    if stage == "pretrain":
        return mlm
    config = source or "configs/fine_movie_snippets_cpu.yaml"
    fine = (f"a classifier finetuned on this task, e.g. `python launchers/finetune.py --deepspeed_config "
            f"ds_configs/zero2.json --config {config} --set method.name=ce --set model.teacher=null --set "
            f"model.student_init={body} --set model.student_init_layers=null --output_dir runs/teacher` "
            f"(with this run's other --set options) then model.teacher=runs/teacher/export")
    return fine if stage == "finetune" else f"{fine}; for pre-training, {mlm}"


def _methods_where(test) -> list[str]:
    """Names of the registered methods for which ``test(method)`` holds, each built with its default options for
    its first stage."""
    names = []
    for name in method_names():
        cls = get_method(name)
        if test(cls(MethodConfig(name=name), cls.stages[0])):
            names.append(name)
    return names


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

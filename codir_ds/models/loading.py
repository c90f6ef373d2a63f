"""Teacher and student construction from local Hugging Face directories.

The teacher is frozen (``requires_grad=False``, ``eval()``) and is never handed to
``deepspeed.initialize``; the student is a ``*ForSequenceClassification`` model
built from a config or initialised from chosen layers of a pre-trained directory.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
import transformers
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from codir_ds.assets import EXPORT_MANIFEST, WEIGHTS, known_sha256, resolve_model_dir, sha256_file
from codir_ds.errors import CodirError

log = logging.getLogger(__name__)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# EXPORT_MANIFEST (imported above, re-exported here) is written by export_student next to WEIGHTS so a later run
# can check them.


def model_dir(spec: str, what: str) -> Path:
    """Resolve ``spec`` (directory or packaged name) and check it looks like an HF model dir."""
    path = resolve_model_dir(spec)
    if not path.is_dir():
        problem = "is a file, not a directory" if path.exists() else "does not exist"
        raise CodirError(f"{what} directory '{spec}' {problem}: point {what} at a local Hugging Face model "
                         f"directory (written by save_pretrained) or use the packaged 'all-MiniLM-L6-v2'")
    if not (path / "config.json").is_file():
        raise CodirError(f"{what} directory '{path}' has no config.json: it must be a Hugging Face model "
                         f"directory written by save_pretrained")
    return path


def expected_sha256(path: Path, configured: Optional[str]) -> Optional[str]:
    """The checksum the weights must have: configured, packaged asset, or export manifest."""
    if configured:
        return configured.lower()
    known = known_sha256(path)
    if known:
        return known
    return read_manifest(path).get("sha256")


def read_manifest(path: Path, strict: bool = True) -> dict:
    """The codir-ds export manifest of a model directory; ``{}`` when there is none.

    An unreadable manifest is a one-line CodirError, or ``{}`` when ``strict`` is False.
    """
    manifest = Path(path) / EXPORT_MANIFEST
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        data = None
    if isinstance(data, dict):
        return data
    if strict:
        raise CodirError(f"export manifest '{manifest}' is not valid JSON: re-export the model or delete "
                         f"the manifest")
    return {}


def verify_weights(path: Path, configured: Optional[str], what: str) -> Optional[str]:
    """Check ``model.safetensors`` against the expected sha256 (if any); return the digest."""
    weights = path / WEIGHTS
    expected = expected_sha256(path, configured)
    if expected is None:
        return None
    if not weights.is_file():
        raise CodirError(f"{what} directory '{path}' has no {WEIGHTS} to check against sha256 {expected[:12]}…: "
                         f"re-export the model with save_pretrained(safe_serialization=True)")
    digest = sha256_file(weights)
    if digest != expected:
        if configured:
            raise CodirError(f"{what} weights '{weights}' fail the checksum: their sha256 is {digest}, "
                             f"{what}_sha256 expects {expected}: point {what} at the intended model, or set "
                             f"{what}_sha256 to {digest} if this is it")
        source = "the packaged asset's known digest" if known_sha256(path) else f"{EXPORT_MANIFEST}"
        hint = (f", or set {what}_sha256 to {digest} if the change is intended"
                if what in ("model.teacher", "--teacher") else "")
        raise CodirError(f"{what} weights '{weights}' fail the checksum (sha256 {digest}, expected {expected} from "
                         f"{source}): the file is corrupted or was changed after export; reinstall or re-export "
                         f"it{hint}")
    return digest


def load_tokenizer(path: Path):
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CodirError(f"no tokenizer could be loaded from '{path}' ({type(e).__name__}): set model.tokenizer "
                         f"to a Hugging Face directory written by save_pretrained (tokenizer.json or vocab.txt plus "
                         f"tokenizer_config.json/config.json)") from None


def tokenizer_dir(model_cfg) -> Path:
    """The run's tokenizer: model.tokenizer, else the teacher's, the student init's or init_from's."""
    if model_cfg.tokenizer or model_cfg.teacher or model_cfg.student_init:
        return resolve_model_dir(model_cfg.tokenizer or model_cfg.teacher or model_cfg.student_init)
    return resolve_init_from(model_cfg.init_from)


def check_same_vocab(tokenizer, other_dir: Path, what: str) -> None:
    """Teacher and student must index the same vocabulary, or logits and inputs disagree."""
    has_tok = any((other_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json"))
    config = AutoConfig.from_pretrained(str(other_dir))
    vocab = len(tokenizer)
    if has_tok:
        other = load_tokenizer(other_dir)
        if other.get_vocab() != tokenizer.get_vocab():
            raise CodirError(f"{what} '{other_dir}' uses a different tokenizer vocabulary ({len(other)} tokens) than "
                             f"the run's tokenizer ({vocab} tokens): teacher and student must share one vocabulary; "
                             f"pick models with the same tokenizer or set model.tokenizer")
    if config.vocab_size < vocab:
        raise CodirError(f"{what} '{other_dir}' has vocab_size {config.vocab_size} but the tokenizer has {vocab} tokens: "
                         f"teacher and student must share one vocabulary")


def _check_head(config, num_labels: int, path: Path, source: Optional[str]) -> None:
    from codir_ds.config import teacher_hint
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != num_labels:
        raise CodirError(
            f"teacher '{path}' has no {num_labels}-way classification head (architectures={archs}, "
            f"num_labels={config.num_labels}): finetune it on this task first and set model.teacher to "
            f"{teacher_hint('finetune', source, body=str(path))}")


def load_teacher(spec: str, num_labels: int, dtype: torch.dtype, sha256: Optional[str] = None,
                 device: Optional[torch.device] = None, source: Optional[str] = None) -> torch.nn.Module:
    """Load a finetuned classification teacher, frozen, in ``dtype``.

    Frozen means: every parameter has ``requires_grad=False``, the module is in
    ``eval()`` mode (no dropout), and the caller runs it under ``torch.inference_mode()``.
    """
    path = model_dir(spec, "model.teacher")
    verify_weights(path, sha256, "model.teacher")
    config = AutoConfig.from_pretrained(str(path))
    _check_head(config, num_labels, path, source)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of Transformer blocks of a BERT/RoBERTa/MPNet-style model."""
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise CodirError(f"cannot find encoder layers in {type(model).__name__}: student_init_layers supports "
                         f"BERT-style models (base.encoder.layer)")
    return layers


def resolve_init_from(spec: str) -> Path:
    """``model.init_from``: a codir-ds run directory (its ``export/``) or a Hugging Face model directory."""
    path = Path(spec)
    if (path / "export" / "config.json").is_file():
        path = path / "export"
    elif not (path / "config.json").is_file():
        hint = (" (the run has no export/ yet: let it finish, or export a checkpoint with launchers/export.py)"
                if (path / "checkpoints").is_dir() else "")
        raise CodirError(f"model.init_from '{spec}' is neither a codir-ds run directory with export/ nor a Hugging "
                         f"Face model directory{hint}: point it at the previous stage's run directory")
    verify_weights(path, None, "model.init_from")
    return path


def keep_layers(model: torch.nn.Module, keep: Sequence[int], path: Path) -> None:
    """Keep only the Transformer blocks ``keep`` (0-based, in order) of ``model``, in place."""
    layers = encoder_layers(model)
    keep = list(keep)
    bad = [i for i in keep if not 0 <= i < len(layers)]
    if bad or not keep:
        raise CodirError(f"model.student_init_layers {keep} must be non-empty indices in 0..{len(layers) - 1} "
                         f"of '{path}': fix model.student_init_layers")
    new = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new):  # attention modules know their index (KV caches)
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    base = getattr(model, model.base_model_prefix)
    base.encoder.layer = new
    model.config.num_hidden_layers = len(keep)


def build_student(model_cfg, num_labels: int, is_regression: bool, tokenizer,
                  template_dir: Optional[Path] = None, masked_lm: bool = False,
                  label_names: Sequence[str] = ()) -> torch.nn.Module:
    """Student model in fp32 (DeepSpeed casts it to the run's precision).

    A ``*ForSequenceClassification`` model, or ``*ForMaskedLM`` with ``masked_lm`` (pre-training;
    ``num_labels``/``is_regression``/``label_names`` are then ignored). ``label_names`` name the classes
    in the config's ``id2label``.

    - ``model_cfg.init_from`` set: all weights of a previous run's export (two-stage training).
    - ``model_cfg.student_init`` set: load that directory; keep the layers listed in
      ``student_init_layers`` (0-based block indices, in order), e.g. [0, 2, 4] takes every
      other layer of a 6-layer model (DistilBERT-style initialisation).
    - otherwise: a randomly initialised model of ``template_dir``'s architecture (BERT when
      none) with ``student_layers`` x ``student_hidden`` / ``student_heads``.
    """
    auto = AutoModelForMaskedLM if masked_lm else AutoModelForSequenceClassification
    if model_cfg.init_from or model_cfg.student_init:
        if model_cfg.init_from:
            path = resolve_init_from(model_cfg.init_from)
            check_same_vocab(tokenizer, path, "model.init_from")
        else:
            path = model_dir(model_cfg.student_init, "model.student_init")
            check_same_vocab(tokenizer, path, "model.student_init")
        config = AutoConfig.from_pretrained(str(path))
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = model_cfg.dropout
        if not masked_lm:  # e.g. a regression student from a classifier's export: the head is re-made
            set_head(config, num_labels, is_regression, label_names)
        model = auto.from_pretrained(str(path), config=config, dtype=torch.float32, ignore_mismatched_sizes=True)
        if model_cfg.student_init and model_cfg.student_init_layers is not None:
            keep_layers(model, model_cfg.student_init_layers, path)
        return model
    template = AutoConfig.from_pretrained(str(template_dir)) if template_dir else None
    model_type = template.model_type if template is not None else "bert"
    hidden = model_cfg.student_hidden
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer) if template is None else max(template.vocab_size, len(tokenizer)),
        hidden_size=hidden,
        num_hidden_layers=model_cfg.student_layers,
        num_attention_heads=model_cfg.student_heads,
        intermediate_size=model_cfg.student_intermediate or 4 * hidden,
        max_position_embeddings=getattr(template, "max_position_embeddings", 512),
        type_vocab_size=getattr(template, "type_vocab_size", 2),
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=model_cfg.dropout,
        attention_probs_dropout_prob=model_cfg.dropout,
    )
    if not masked_lm:
        set_head(config, num_labels, is_regression, label_names)
    return auto.from_config(config)


def set_head(config, num_labels: int, is_regression: bool, label_names: Sequence[str] = ()) -> None:
    """A classification head's config: size, problem type and, when the task names its classes, ``id2label`` /
    ``label2id`` (so ``pipeline("text-classification")`` answers with the task's label names)."""
    config.problem_type = None  # a saved "single_label_classification" would refuse num_labels=1 (regression)
    config.num_labels = num_labels
    config.problem_type = "regression" if is_regression else "single_label_classification"
    if label_names and len(label_names) == num_labels and not is_regression:
        config.id2label = {i: str(name) for i, name in enumerate(label_names)}
        config.label2id = {str(name): i for i, name in enumerate(label_names)}


def num_layers(model: torch.nn.Module) -> int:
    return model.config.num_hidden_layers


def hidden_size(model: torch.nn.Module) -> int:
    return model.config.hidden_size


def resolve_layers(spec, model: torch.nn.Module, key: str) -> list[int]:
    """'all' -> [1..L]; 'last' -> [L]; a list is checked against the model depth (0 = embedding output)."""
    n = num_layers(model)
    if spec == "all":
        return list(range(1, n + 1))
    if spec == "last":
        return [n]
    bad = [i for i in spec if not 0 <= i <= n]
    if bad:
        raise CodirError(f"{key} {list(spec)} has indices outside 0..{n} for a {n}-layer model "
                         f"(1-based Transformer layers; 0 is the embedding output): fix {key}")
    return list(spec)


def export_student(model: torch.nn.Module, tokenizer, out_dir: Path, extra: Optional[dict] = None) -> str:
    """``save_pretrained`` model + tokenizer in fp32, plus a manifest with the weights' sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    tokenizer.save_pretrained(str(out_dir))
    digest = sha256_file(out_dir / WEIGHTS)
    manifest = {"sha256": digest, **(extra or {})}
    (out_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return digest


def position_limit(config) -> int:
    """Longest sequence a model's position embeddings allow (RoBERTa-style models reserve 2)."""
    offset = 2 if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer") else 0
    return int(getattr(config, "max_position_embeddings", 512)) - offset

"""What a model costs to store: parameter counts and bytes on disk.

"Without embeddings" excludes the embedding layer of the encoder (word, position and segment
embeddings and their LayerNorm), the part whose size depends on the vocabulary rather than on
depth and width; the classification head and every Transformer block count.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch


def _embedding_module(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The encoder's ``embeddings`` module (BERT/RoBERTa/MPNet style), else the input embeddings."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    embeddings = getattr(base, "embeddings", None)
    if isinstance(embeddings, torch.nn.Module):
        return embeddings
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """``{"total", "embeddings", "non_embedding"}``: numbers of parameters (shared tensors counted once)."""
    total = sum(p.numel() for p in model.parameters())
    emb = _embedding_module(model)
    embeddings = sum(p.numel() for p in emb.parameters()) if emb is not None else 0
    return {"total": int(total), "embeddings": int(embeddings), "non_embedding": int(total - embeddings)}


def counts_from_config(model_dir: Union[str, Path], num_labels: Optional[int] = None) -> dict[str, int]:
    """:func:`parameter_counts` of the classifier described by ``model_dir/config.json``, without loading
    its weights (the model is built on the ``meta`` device: no memory, no time)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(model_dir))
    if num_labels is not None:
        config.num_labels = num_labels
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return parameter_counts(model)


def disk_bytes(path: Union[str, Path], patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "*.onnx",
                                                                     "*.onnx.data", "*.pt")) -> int:
    """Bytes of a model directory's weight files (tokenizer and config files are a few hundred KiB at most
    and the same for every model of one vocabulary, so they are left out)."""
    root = Path(path)
    return sum(f.stat().st_size for pattern in patterns for f in root.glob(pattern) if f.is_file())


def human_count(n: Optional[int]) -> str:
    """``22713216 -> '22.7M'``."""
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def size_comparison(student: dict, teacher: Optional[dict]) -> str:
    """``'student 9.6M parameters (teacher 22.7M: 2.4x fewer)'`` for a run's start-up line."""
    text = f"student {human_count(student['total'])} parameters"
    if teacher:
        text += (f" (teacher {human_count(teacher['total'])}: {teacher['total'] / max(student['total'], 1):.1f}x "
                 f"fewer; without embeddings {human_count(student['non_embedding'])} vs "
                 f"{human_count(teacher['non_embedding'])})")
    return text

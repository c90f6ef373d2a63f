"""Training recipes: one class per kind of run, chosen from the method's specs.

- :class:`~codir_ds.recipes.finetune.FinetuneRecipe`: distillation on a classification / regression task.
- :class:`~codir_ds.recipes.pretrain.PretrainRecipe`: distillation on a text corpus (masked LM).
- :class:`~codir_ds.recipes.cotrain.CoTrainRecipe`: two trainable models (CTCD), either stage.

``recipe_for(cfg, stage)`` builds the right one; ``run()`` = ``setup()`` then ``train()``.
"""
from __future__ import annotations

from codir_ds.config import ExperimentConfig
from codir_ds.distill.methods import build_method
from codir_ds.recipes.base import ModelProgress, Progress, Recipe  # noqa: F401
from codir_ds.recipes.cotrain import CoTrainRecipe
from codir_ds.recipes.finetune import FinetuneRecipe
from codir_ds.recipes.pretrain import PretrainRecipe


def recipe_for(cfg: ExperimentConfig, stage: str, ds_config_path: str, output_dir: str, resume: bool = False,
               overwrite: bool = False) -> Recipe:
    """The recipe for ``cfg`` in ``stage`` ("finetune" or "pretrain"): co-training when the method trains a
    second model, else the stage's own. Refuses a method the stage does not have (one-line error)."""
    method = build_method(cfg.method, stage)
    if method.second_model is not None:
        return CoTrainRecipe(cfg, ds_config_path, output_dir, stage, resume=resume, overwrite=overwrite)
    cls = FinetuneRecipe if stage == "finetune" else PretrainRecipe
    return cls(cfg, ds_config_path, output_dir, resume=resume, overwrite=overwrite)


def run_finetune(cfg: ExperimentConfig, ds_config_path: str, output_dir: str, resume: bool = False,
                 overwrite: bool = False) -> dict:
    """Finetuning distillation from start to results.json (what ``launchers/finetune.py`` runs)."""
    return recipe_for(cfg, "finetune", ds_config_path, output_dir, resume, overwrite).run()


def run_pretrain(cfg: ExperimentConfig, ds_config_path: str, output_dir: str, resume: bool = False,
                 overwrite: bool = False) -> dict:
    """Pre-training distillation from start to results.json (what ``launchers/pretrain.py`` runs)."""
    return recipe_for(cfg, "pretrain", ds_config_path, output_dir, resume, overwrite).run()

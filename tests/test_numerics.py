"""Numerics: fp16 loss scaling (on CPU by patching the accelerator), skipped steps, the non-finite policy.

Policy under test (docs/scale_out.md, non-finite policy): a step whose gradients are not finite is
skipped (weights, optimizer, LR schedule and memory bank unchanged) and counted; after
``training.max_consecutive_skips`` skipped steps in a row the run stops with an error.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from codir_ds.errors import CodirError
from conftest import REPO

DS_ZERO2 = str(REPO / "ds_configs" / "zero2.json")


def _ds(tmp_path, fp16: bool, stage: int = 2, scale_power: int = 8):
    cfg = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": stage}}
    if fp16:
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": scale_power, "hysteresis": 1,
                       "loss_scale_window": 1000, "min_loss_scale": 1}
    path = tmp_path / f"ds_{'fp16' if fp16 else 'fp32'}_{stage}_{scale_power}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture()
def fp16_on_cpu(monkeypatch):
    """DeepSpeed on CPU: the fp16 path runs once the accelerator claims fp16 support."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    monkeypatch.setattr(type(acc), "is_fp16_supported", lambda self: True)
    import codir_ds.engine.ds_config as dsc
    monkeypatch.setattr(dsc, "fp16_supported", lambda: True)  # codir-ds itself never picks fp16 on a CPU
    return acc


def _nan_at(monkeypatch, micro_steps: set):
    """Make the total loss NaN at the given (0-based) micro steps of the run (the tiny config's method: codir)."""
    from codir_ds.distill.methods.codir import CoDIR
    real = CoDIR.loss
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        total, terms = real(self, *a, **k)
        if calls["n"] in micro_steps:
            total = total * float("nan")
        calls["n"] += 1
        return total, terms

    monkeypatch.setattr(CoDIR, "loss", poisoned)


def _record_bank_steps(monkeypatch):
    """Per optimizer step: (applied, bank rows unchanged by it, loss scale)."""
    from codir_ds.distill.bank_component import MemoryBankComponent
    real = MemoryBankComponent.after_optimizer_step
    log = []

    from codir_ds.recipes.base import Recipe
    real_check = Recipe.check_skipped

    def wrapped(self, applied, stage="train"):
        before = self.bank.rows.clone()
        real(self, applied, stage)
        log.append([applied, torch.equal(before, self.bank.rows), None])

    def with_scale(self):  # after the same step: the engine's loss scale
        log[-1][2] = getattr(self.engine.optimizer, "cur_scale", None)
        assert log[-1][0] == self.engine.was_step_applied()
        return real_check(self)

    monkeypatch.setattr(MemoryBankComponent, "after_optimizer_step", wrapped)
    monkeypatch.setattr(Recipe, "check_skipped", with_scale)
    return log


def _weights_finite(recipe):
    return all(torch.isfinite(p).all() for p in recipe.engine.module.parameters())


def _run(tiny_config, ds, out, overrides=()):
    """``(results, recipe)`` of a finetuning run of the tiny config."""
    from codir_ds.config import load_config
    from codir_ds.recipes import FinetuneRecipe
    cfg = load_config(str(tiny_config), ["training.max_steps=6", "logging.log_every=1", *overrides])
    recipe = FinetuneRecipe(cfg, ds, str(out))
    return recipe.run(), recipe


def test_fp16_overflow_steps_are_skipped_and_leave_the_bank_alone(tmp_path, tiny_config, single_process_env,
                                                                   fp16_on_cpu, monkeypatch):
    # 2**12 as the first loss scale overflows fp16 gradients: DeepSpeed halves the scale
    # and skips until it fits.
    log = _record_bank_steps(monkeypatch)
    results, recipe = _run(tiny_config, _ds(tmp_path, fp16=True, scale_power=12), tmp_path / "run",
                           overrides=["training.max_steps=12"])
    assert results["precision"] == "float16" and recipe.engine.module.student.dtype == torch.float16
    skipped = [entry for entry in log if not entry[0]]
    assert skipped and len(skipped) < len(log)  # some overflowed, training went on
    assert all(unchanged for applied, unchanged, _ in log if not applied)  # no bank update on a skipped step
    assert all(not unchanged for applied, unchanged, _ in log if applied)
    scales = [s for _, _, s in log]
    assert scales[0] < 2 ** 12 and scales == sorted(scales, reverse=True)
    assert _weights_finite(recipe) and recipe.engine.skipped_steps == len(skipped)
    assert math.isfinite(results["final"]["accuracy"])


@pytest.mark.parametrize("precision", ["fp16", "fp32-zero2", "fp32-zero0"])
def test_nan_loss_step_is_skipped_in_every_precision(tmp_path, tiny_config, single_process_env, fp16_on_cpu,
                                                     monkeypatch, precision):
    _nan_at(monkeypatch, {8, 9})  # micro steps 8 and 9: inside optimizer step 3 (4 micro steps each)
    log = _record_bank_steps(monkeypatch)
    ds = {"fp16": _ds(tmp_path, True), "fp32-zero2": _ds(tmp_path, False, 2),
          "fp32-zero0": _ds(tmp_path, False, 0)}[precision]
    results, recipe = _run(tiny_config, ds, tmp_path / "run")
    assert [applied for applied, _, _ in log] == [True, True, False, True, True, True]
    assert log[2][1]  # the bank did not move on the skipped step
    assert (_weights_finite(recipe), recipe.engine.skipped_steps) == (True, 1)
    assert results["steps"] == 6 and math.isfinite(results["final"]["accuracy"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ea.Reload()
    assert [e.value for e in ea.Scalars("train/skipped_steps")] == [0, 0, 1, 1, 1, 1]


def test_too_many_consecutive_skips_stop_the_run_with_one_line(tmp_path, tiny_config, single_process_env,
                                                             monkeypatch):
    _nan_at(monkeypatch, set(range(4, 100)))  # every micro step from optimizer step 2 on
    with pytest.raises(CodirError) as err:
        _run(tiny_config, DS_ZERO2, tmp_path / "run", overrides=["training.max_consecutive_skips=3",
                                                                 "training.checkpoint_every=1"])
    msg = str(err.value)
    assert "\n" not in msg and "3 optimizer steps in a row" in msg and "up to step 4" in msg
    assert "training.max_consecutive_skips" in msg and "--resume" in msg
    # the last checkpoint is the last good step; skipped steps saved nothing broken
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000003"


def test_contrastive_scores_are_fp32_for_half_inputs():
    from codir_ds.distill.losses import crd_loss, crd_loss_shared
    g = torch.Generator().manual_seed(0)
    h_t, h_s = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    negs = torch.randn(4, 5, 8, generator=g)
    ref = crd_loss(h_t, h_s, negs, 0.07)
    half = crd_loss(h_t.half(), h_s.half(), negs.half(), 0.07)
    assert half.dtype == torch.float32 and torch.allclose(half, ref, rtol=2e-3)
    cand = torch.randn(6, 8, generator=g)
    loss, _, _ = crd_loss_shared(h_t.half(), h_s.half(), cand.half(), torch.zeros(4, 6, dtype=torch.bool), 0.07)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)

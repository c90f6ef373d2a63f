"""Student-speed switches: training.optimizer_impl (fused / foreach / plain AdamW) and training.compile."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from codir_ds.config import TrainingConfig, load_config
from codir_ds.engine import compile as compile_mod
from codir_ds.engine import optim
from codir_ds.engine.compile import check_compile
from codir_ds.engine.optim import GuardedAdamW, check_optimizer_impl, optimizer_and_schedule, resolve_optimizer_impl
from codir_ds.errors import CodirError

from conftest import REPO

DS = str(REPO / "ds_configs" / "zero2.json")
ZERO0_FP32 = {"zero_optimization": {"stage": 0}}  # DeepSpeed would apply NaN steps: GuardedAdamW
ZERO2 = {"zero_optimization": {"stage": 2}}


def _one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg, f"error message must be one line: {msg!r}"
    return msg


@pytest.fixture()
def no_fused_on_cpu(monkeypatch):
    """A torch whose fused AdamW exists only on CUDA (torch < 2.4)."""
    monkeypatch.setattr(optim, "fused_adamw_devices", lambda: ["cuda"])


# ----------------------------------------------------------------------------- config validation

def test_bad_optimizer_impl_names_the_key_and_the_choices():
    with pytest.raises(CodirError) as info:
        load_config(None, ["model.teacher=x", "training.optimizer_impl=fast"])
    msg = _one_line(info)
    assert "training.optimizer_impl" in msg and "auto, fused, foreach, plain" in msg and "'fast'" in msg
    assert "--set training.optimizer_impl=" in msg


def test_compile_must_be_a_bool_and_defaults_are_auto_and_off():
    with pytest.raises(CodirError) as info:
        load_config(None, ["model.teacher=x", "training.compile=maybe"])
    assert "training.compile" in _one_line(info)
    cfg = load_config(None, ["model.teacher=x"])
    assert cfg.training.optimizer_impl == "auto" and cfg.training.compile is False


def test_fused_where_unsupported_is_refused_auto_falls_back_to_foreach(no_fused_on_cpu):
    with pytest.raises(CodirError) as info:
        resolve_optimizer_impl("fused", "cpu")
    msg = _one_line(info)
    assert "training.optimizer_impl=fused" in msg and "'cpu'" in msg and "auto, foreach or plain" in msg
    assert resolve_optimizer_impl("auto", "cpu") == "foreach"
    assert resolve_optimizer_impl("auto", "cuda") == "fused"
    assert resolve_optimizer_impl("plain", "cpu") == "plain"


def test_torch_here_has_fused_adamw_on_cpu():
    assert "cpu" in optim.fused_adamw_devices()
    assert resolve_optimizer_impl("auto", "cpu") == "fused"


def test_start_up_checks(monkeypatch, no_fused_on_cpu):
    ok = TrainingConfig()
    check_optimizer_impl(ok, ZERO2)
    check_compile(ok, ZERO2)
    with pytest.raises(CodirError) as info:  # the run's device is the CPU here
        check_optimizer_impl(TrainingConfig(optimizer_impl="fused"), ZERO2)
    assert "training.optimizer_impl=fused" in _one_line(info)
    # ZeRO optimizer offload: the optimizer runs on the CPU whatever the accelerator
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert optim.optimizer_device_type(offload) == "cpu"
    compiled = TrainingConfig(compile=True)
    check_optimizer_impl(compiled, ZERO2)
    check_compile(compiled, ZERO2)
    with pytest.raises(CodirError) as info:
        check_compile(compiled, {"zero_optimization": {"stage": 3}})
    msg = _one_line(info)
    assert "training.compile" in msg and "ZeRO-3" in msg and "training.compile=false" in msg
    with pytest.raises(CodirError) as info:
        check_compile(compiled, {**ZERO2, "compile": {"deepcompile": True}})
    assert "deepcompile" in _one_line(info)
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    with pytest.raises(CodirError) as info:
        check_compile(compiled, ZERO2)
    assert "C++ compiler" in _one_line(info)


def test_unsupported_combinations_fail_before_anything_is_written(tmp_path, tiny_config, no_fused_on_cpu):
    from codir_ds.recipes import run_finetune
    z3 = tmp_path / "zero3.json"
    z3.write_text(json.dumps({**json.loads((REPO / "ds_configs" / "zero3.json").read_text()),
                              "fp16": {"enabled": False}}))
    for ds, sets, needle in ((str(z3), ["training.compile=true"], "ZeRO-3"),
                             (DS, ["training.optimizer_impl=fused"], "no fused AdamW")):
        with pytest.raises(CodirError) as info:
            run_finetune(load_config(str(tiny_config), sets), ds, str(tmp_path / "run"))
        assert needle in _one_line(info)
        assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- optimizer choice

def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 32), torch.nn.GELU(),
                               torch.nn.LayerNorm(32), torch.nn.Linear(32, 3))


@pytest.mark.parametrize("impl, fused, foreach", [("auto", True, False), ("fused", True, False),
                                                  ("foreach", False, True), ("plain", False, False)])
@pytest.mark.parametrize("ds, cls", [(ZERO0_FP32, GuardedAdamW), (ZERO2, torch.optim.AdamW), (None, torch.optim.AdamW)])
def test_optimizer_class_and_flags(impl, fused, foreach, ds, cls):
    opt, _ = optimizer_and_schedule(_model(), TrainingConfig(optimizer_impl=impl), 10, ds, device_type="cpu")
    assert type(opt) is cls
    assert all(g["fused"] is fused and g["foreach"] is foreach for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def test_auto_is_foreach_where_fused_is_missing(no_fused_on_cpu):
    opt, _ = optimizer_and_schedule(_model(), TrainingConfig(), 10, ZERO2)
    assert opt.param_groups[0]["foreach"] is True and opt.param_groups[0]["fused"] is False


def _train(impl: str, ds, steps: int = 5, nan_at: int = -1) -> tuple[list[torch.Tensor], list[bool]]:
    model = _model()
    tcfg = TrainingConfig(optimizer_impl=impl, lr=1e-2, weight_decay=0.1, warmup_ratio=0.2)
    opt, sched = optimizer_and_schedule(model, tcfg, steps, ds, device_type="cpu")
    g = torch.Generator().manual_seed(1)
    skipped = []
    for step in range(steps):
        x = torch.randint(50, (8, 6), generator=g)
        y = torch.randint(3, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x).mean(1), y)
        if step == nan_at:
            loss = loss * float("nan")
        opt.zero_grad()
        loss.backward()
        opt.step()
        skipped.append(bool(getattr(opt, "overflow", False)))
        sched.step()
    return [p.detach().clone() for p in model.parameters()], skipped


@pytest.mark.parametrize("ds", [ZERO0_FP32, ZERO2], ids=["guarded", "plain-class"])
def test_fused_foreach_plain_reach_the_same_parameters(ds):
    ref, _ = _train("plain", ds)
    start = [p.detach() for p in _model().parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(ref, start))  # it trained
    for impl in ("fused", "foreach"):
        got, _ = _train(impl, ds)
        for a, b in zip(ref, got):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), impl


@pytest.mark.parametrize("impl", ["fused", "foreach", "plain"])
def test_guarded_adamw_skips_non_finite_steps_with_each_impl(impl):
    params, skipped = _train(impl, ZERO0_FP32, steps=4, nan_at=2)
    assert skipped == [False, False, True, False]
    assert all(torch.isfinite(p).all() for p in params)
    ref, _ = _train(impl, ZERO0_FP32, steps=4)
    assert any(not torch.allclose(a, b) for a, b in zip(params, ref))  # the skipped step changed the run


# ----------------------------------------------------------------------------- compile, end to end

def _losses(run) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars("loss/total")}


def _model_state_keys(run) -> tuple[list[str], list[str]]:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    states = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    shapes = [name for group in states["param_shapes"] for name in group]
    return sorted(states["module"]), sorted(shapes)


def test_compiled_finetune_resumes_keeps_keys_and_matches_eager(tmp_path, tiny_config, single_process_env):
    """training.compile on the tiny config (ZeRO-2, fp32): stop at step 3, resume compiled, finish.

    Checkpoint and export keys are the eager run's (no ``_orig_mod.``), and the per-step losses
    agree with the eager run's (on the CPU the compiled student draws its dropout masks from ATen's RNG).
    """
    from codir_ds.recipes import FinetuneRecipe, run_finetune
    sets = ["logging.log_every=1", "training.optimizer_impl=fused"]
    eager = run_finetune(load_config(str(tiny_config), sets), DS, str(tmp_path / "eager"))
    comp_sets = sets + ["training.compile=true"]
    recipe = FinetuneRecipe(load_config(str(tiny_config), comp_sets + ["training.stop_at_step=3"]), DS,
                            str(tmp_path / "compiled"))
    stopped = recipe.run()
    assert stopped == {"stopped_at_step": 3} and recipe.engine.is_compiled
    mid_module, mid_shapes = _model_state_keys(tmp_path / "compiled")
    compiled = run_finetune(load_config(str(tiny_config), comp_sets), DS, str(tmp_path / "compiled"), resume=True)
    assert compiled["steps"] == eager["steps"] == 6

    eager_keys = _model_state_keys(tmp_path / "eager")
    for keys in (mid_module, mid_shapes, *_model_state_keys(tmp_path / "compiled")):
        assert not any("_orig_mod" in k for k in keys)
    assert (mid_module, mid_shapes) == eager_keys == _model_state_keys(tmp_path / "compiled")
    exported = load_file(str(tmp_path / "compiled" / "export" / "model.safetensors"))
    reference = load_file(str(tmp_path / "eager" / "export" / "model.safetensors"))
    assert sorted(exported) == sorted(reference) and not any("_orig_mod" in k for k in exported)
    from transformers import AutoModelForSequenceClassification
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "compiled" / "export")  # loads as plain HF

    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-3, abs=1e-4), step
    for k in reference:
        assert torch.allclose(exported[k], reference[k], rtol=1e-3, atol=1e-4), k
    assert compiled["final"]["accuracy"] == pytest.approx(eager["final"]["accuracy"])

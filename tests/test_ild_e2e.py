"""End to end: pkd, tinybert, distilbert and cr_ild through the launchers on 2 CPU ranks, and resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, deepspeed_launch

DS = str(REPO / "ds_configs" / "zero2.json")
FAST = ["training.max_steps=4", "training.checkpoint_every=2"]


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


def _scalars(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    return {t: [e.value for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def _sets(*items: str) -> list[str]:
    out = []
    for item in items:
        out += ["--set", item]
    return out


@pytest.mark.parametrize("method,extra,expect", [
    ("pkd", [], {"loss/pkd", "loss/kd", "loss/task"}),
    ("tinybert", ["model.student_heads=1"], {"loss/hidden_mse", "loss/attention_mse", "loss/kd", "loss/task"}),
    ("distilbert", [], {"loss/cosine", "loss/kd", "loss/task"}),
    ("cr_ild", ["data.supplementary=trec6", "data.supplementary_max_examples=40", "method.consistency_ema=0.9"],
     {"loss/hidden_mse", "loss/attention_mse", "loss/consistency", "loss/kd", "loss/task"}),
])
def test_ild_method_finetunes_on_two_ranks_and_exports(tmp_path, tiny_config, method, extra, expect):
    run = tmp_path / "run"
    proc = deepspeed_launch("launchers/finetune.py", 2, ["--deepspeed_config", DS, "--config", str(tiny_config),
                                                         "--output_dir", str(run),
                                                         *_sets(f"method.name={method}", *FAST, *extra)])
    _ok(proc)
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == method and results["world_size"] == 2 and results["steps"] == 4
    scalars = _scalars(run)
    assert expect <= set(scalars), sorted(scalars)
    for tag in expect - {"loss/kd"}:  # the tiny random teacher's KD can round to 0
        assert all(v > 0 for v in scalars[tag]), (tag, scalars[tag])
    # The student export is a plain HF classifier; the ILD projections are not part of it.
    weights = load_file(str(run / "export" / "model.safetensors"))
    assert not any("ild_proj" in k or k.startswith("student.") for k in weights)
    from transformers import AutoModelForSequenceClassification
    assert AutoModelForSequenceClassification.from_pretrained(run / "export").config.num_labels == 2
    if method == "cr_ild":  # 2 ILD steps then 2 KD steps; the EMA student rides in the rank files
        assert "train/consistency_weight" in scalars
        tag = (run / "checkpoints" / "latest").read_text().strip()
        state = torch.load(run / "checkpoints" / tag / "codir_rank_00001.pt", weights_only=False)
        assert "ema" in state["extras"]


@pytest.mark.parametrize("method", ["tinybert", "distilbert"])
def test_ild_method_pretrains_on_two_ranks(tmp_path, tiny_mlm_teacher, corpus_file, method):
    from test_e2e_pretrain import PRE_YAML
    cfg = tmp_path / "pre.yaml"
    cfg.write_text(PRE_YAML.format(teacher=tiny_mlm_teacher, corpus=corpus_file, cache=tmp_path / "cache"))
    run = tmp_path / "run"
    proc = deepspeed_launch("launchers/pretrain.py", 2, ["--deepspeed_config", DS, "--config", str(cfg),
                                                         "--output_dir", str(run),
                                                         *_sets(f"method.name={method}", "training.max_steps=4")])
    _ok(proc)
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == method and results["steps"] == 4
    scalars = _scalars(run)
    want = {"loss/mlm", "loss/kd", "loss/hidden_mse", "loss/attention_mse"} if method == "tinybert" else \
        {"loss/mlm", "loss/kd", "loss/cosine"}
    assert want <= set(scalars), sorted(scalars)


def test_cr_ild_resume_equals_uninterrupted(tmp_path, tiny_config, single_process_env):
    """Stopped inside the ILD stage (EMA, supplementary data, mixup draws) and resumed: same weights."""
    from codir_ds.config import load_config
    from codir_ds.recipes import run_finetune
    sets = ["method.name=cr_ild", "data.supplementary=trec6", "data.supplementary_max_examples=40",
            "method.consistency_ema=0.9", "method.ild_fraction=0.75", "model.dropout=0.0",
            "training.max_steps=4", "training.checkpoint_every=1"]
    full = run_finetune(load_config(str(tiny_config), sets), DS, str(tmp_path / "full"))
    assert full["steps"] == 4
    assert run_finetune(load_config(str(tiny_config), sets + ["training.stop_at_step=2"]), DS,
                        str(tmp_path / "cut")) == {"stopped_at_step": 2}
    resumed = run_finetune(load_config(str(tiny_config), sets), DS, str(tmp_path / "cut"), resume=True)
    assert resumed["steps"] == 4
    a = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema = [torch.load(tmp_path / run / "checkpoints" / "step_00000003" / "codir_rank_00000.pt",
                      weights_only=False)["extras"]["ema"] for run in ("full", "cut")]
    for k in ema[0]:
        assert torch.equal(ema[0][k], ema[1][k]), k


def test_tinybert_resume_with_projections_equals_uninterrupted(tmp_path, tiny_config, single_process_env):
    """A narrower student (16 vs the teacher's 32): the learned ILD projections are checkpointed and resumed."""
    from codir_ds.config import load_config
    from codir_ds.recipes import run_finetune
    sets = ["method.name=tinybert", "model.student_hidden=16", "model.student_heads=1", "model.dropout=0.0",
            "training.max_steps=4", "training.checkpoint_every=2"]
    run_finetune(load_config(str(tiny_config), sets), DS, str(tmp_path / "full"))
    run_finetune(load_config(str(tiny_config), sets + ["training.stop_at_step=2"]), DS, str(tmp_path / "cut"))
    run_finetune(load_config(str(tiny_config), sets), DS, str(tmp_path / "cut"), resume=True)
    a = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "export" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The projections live in the DeepSpeed module state (not in the export) and were resumed too.
    states = [torch.load(next((tmp_path / run / "checkpoints" / "step_00000004").glob("mp_rank_00_model_states.pt")),
                         weights_only=False)["module"] for run in ("full", "cut")]
    proj = [k for k in states[0] if k.startswith("ild_proj.")]
    assert proj and all(torch.equal(states[0][k], states[1][k]) for k in proj)

"""End to end: the pretrain launcher through DeepSpeed (2 CPU ranks), resume, two-stage init."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_TRAINING_YAML, deepspeed_launch, python_launch
from test_help_texts import undocumented_tags

DS = str(REPO / "ds_configs" / "zero2.json")

PRE_YAML = """
name: tiny_pre
model:
  teacher: {teacher}
  student_layers: 1
  student_hidden: 32
  student_heads: 2
  student_intermediate: 64
corpus:
  sources: [{corpus}]
  block_size: 32
  validation_blocks: 16
  cache_dir: {cache}
method:
  name: codir
  alpha_kd: 0.1
  alpha_crd: 0.1
  num_negatives: 5
  projection_dim: 16
""" + TINY_TRAINING_YAML


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


@pytest.fixture()
def pre_config(tmp_path, tiny_mlm_teacher, corpus_file) -> Path:
    path = tmp_path / "pre.yaml"
    path.write_text(PRE_YAML.format(teacher=tiny_mlm_teacher, corpus=corpus_file, cache=tmp_path / "cache"))
    return path


def _bank(run: Path):
    tag = (run / "checkpoints" / "latest").read_text().strip()
    shards = [torch.load(f, weights_only=False)["bank"] for f in sorted((run / "checkpoints" / tag).glob("codir_rank_*.pt"))]
    ids = torch.cat([s["ids"] for s in shards])
    rows = torch.cat([s["rows"] for s in shards])
    return ids[ids.argsort()], rows[ids.argsort()], shards


def _scalars(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def test_codir_pretrain_two_ranks_resume_matches_uninterrupted(tmp_path, pre_config):
    """2 CPU ranks through the deepspeed launcher (its output included); a stopped-and-resumed run equals an uninterrupted one."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--deepspeed_config", DS, "--config", str(pre_config), "--set", "logging.log_every=1"]
    proc = deepspeed_launch("launchers/pretrain.py", 2, args + ["--output_dir", str(full)], runner=True)
    _ok(proc)
    # DeepSpeed's ZeRO step calls a collective torch deprecates: filtered (codir_ds/cli.py), not printed per rank.
    assert "FutureWarning" not in proc.stderr, proc.stderr[-4000:]
    results = json.loads((full / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 6 and results["stage"] == "pretrain"
    assert set(results["final"]) >= {"mlm_loss", "mlm_accuracy", "perplexity"}
    assert results["final"]["masked_tokens"] > 0
    tags = _scalars(full)
    for key in ("loss/mlm", "loss/kd", "loss/crd", "loss/total", "bank/pos_sim", "bank/neg_sim", "train/lr",
                "eval/mlm_loss"):
        assert key in tags, key
    assert not undocumented_tags(tags), "add them to docs/running.md, 'TensorBoard tags'"

    # The bank: one row per training block, each on its owner rank.
    ids, rows, shards = _bank(full)
    assert len(shards) == 2 and all((s["ids"] % 2 == r).all() for r, s in enumerate(shards))
    assert torch.equal(ids, torch.arange(results["num_train_blocks"]))
    assert torch.allclose(rows.norm(dim=1), torch.ones(len(ids)), atol=1e-5)

    # The export is a masked-LM model plain transformers can load.
    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained(full / "export")
    assert type(model).__name__ == "BertForMaskedLM"

    proc = deepspeed_launch("launchers/pretrain.py", 2, args + ["--output_dir", str(part),
                                                                "--set", "training.stop_at_step=3"])
    _ok(proc)
    assert "stopped at step 3" in proc.stdout and not (part / "results.json").exists()
    proc = deepspeed_launch("launchers/pretrain.py", 2, args + ["--output_dir", str(part), "--resume",
                                                                "--set", "training.stop_at_step=3"])
    _ok(proc)
    assert "resumed from" in proc.stdout
    resumed = json.loads((part / "results.json").read_text())
    assert resumed["final"] == results["final"]
    a, b = load_file(full / "export" / "model.safetensors"), load_file(part / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    _, rows_b, _ = _bank(part)
    assert torch.equal(rows, rows_b)
    # the per-step losses logged after the resume match the uninterrupted run's
    sa, sb = _scalars(full)["loss/total"], _scalars(part)["loss/total"]
    assert [s for s, _ in sa] == [s for s, _ in sb] == list(range(1, 7))
    for (_, x), (_, y) in zip(sa, sb):
        assert x == pytest.approx(y, rel=1e-6)


def test_two_stage_init_loads_stage1_weights_and_teacher_stays_frozen(tmp_path, pre_config, single_process_env):
    from codir_ds.config import load_config
    from codir_ds.recipes import run_pretrain

    stage1 = tmp_path / "stage1"
    run_pretrain(load_config(str(pre_config), ["method.name=mlm", "training.max_steps=2"]), DS, str(stage1))
    exported = load_file(stage1 / "export" / "model.safetensors")
    from codir_ds.recipes import PretrainRecipe

    cfg = load_config(str(pre_config), [f"model.init_from={stage1}", "training.max_steps=2", "training.lr=1e-4"])
    recipe = PretrainRecipe(cfg, DS, str(tmp_path / "stage2"))
    recipe.setup()
    teacher = recipe.teacher
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    student = {k: v.clone() for k, v in recipe.engine.module.student.state_dict().items()}
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not any(p.data_ptr() in teacher_ptrs for p in recipe.engine.module.parameters())
    results = recipe.train()
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert results["steps"] == 2
    for k, v in exported.items():
        assert torch.equal(student[k], v), k


def test_pretrain_refuses_headless_teacher_for_kd_and_finetune_objectives(tmp_path, pre_config, tiny_teacher):
    run = tmp_path / "run"
    proc = python_launch("launchers/pretrain.py", ["--deepspeed_config", DS, "--config", str(pre_config),
                                                   "--output_dir", str(run), "--set", f"model.teacher={tiny_teacher}"])
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and "fit_teacher_head.py" in err
    assert not run.exists()  # refused before anything was written
    proc = python_launch("launchers/pretrain.py", ["--deepspeed_config", DS, "--config", str(pre_config),
                                                   "--output_dir", str(run), "--set", "method.name=ce"])
    assert proc.returncode == 2 and "not a pre-training objective" in proc.stderr
    proc = python_launch("launchers/finetune.py", ["--deepspeed_config", DS, "--config", str(pre_config),
                                                   "--output_dir", str(run), "--set", "method.name=mlm"])
    assert proc.returncode == 2 and "not a finetuning objective" in proc.stderr


def test_codir_pretrain_with_bare_teacher_body_when_alpha_kd_is_zero(tmp_path, pre_config, tiny_teacher,
                                                                    single_process_env):
    """CoDIR-Pre with alpha_1 = 0 (MLM + CRD) runs on a teacher without an MLM head."""
    from codir_ds.config import load_config
    from codir_ds.recipes import run_pretrain

    cfg = load_config(str(pre_config), [f"model.teacher={tiny_teacher}", "method.alpha_kd=0", "training.max_steps=2"])
    results = run_pretrain(cfg, DS, str(tmp_path / "run"))
    assert results["steps"] == 2
    assert "loss/kd" not in _scalars(tmp_path / "run") and "loss/crd" in _scalars(tmp_path / "run")


def test_fit_teacher_head_makes_a_kd_ready_teacher(tmp_path, tiny_teacher, corpus_file):
    from codir_ds.models.mlm import load_mlm_teacher
    out = tmp_path / "teacher_mlm"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"corpus:\n  sources: [{corpus_file}]\n  block_size: 32\n  validation_blocks: 16\n"
                   f"  cache_dir: {tmp_path / 'cache'}\n")
    proc = python_launch("launchers/fit_teacher_head.py", ["--teacher", str(tiny_teacher), "--output_dir", str(out),
                                                           "--config", str(cfg), "--steps", "30", "--lr", "1e-2"])
    _ok(proc)
    manifest = json.loads((out / "codir_export.json").read_text())
    assert manifest["validation_mlm_loss"] < manifest["validation_before_mlm_loss"]
    model = load_mlm_teacher(str(out), torch.float32, need_head=True)  # checksum from the manifest, head present
    body = load_file(tiny_teacher / "model.safetensors")
    fitted = load_file(out / "model.safetensors")
    for k, v in body.items():  # the teacher body and embeddings are untouched
        if k.startswith("bert.") and not k.startswith("bert.pooler"):
            assert torch.equal(fitted[k], v), k
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    # a second run refuses to overwrite the result
    proc = python_launch("launchers/fit_teacher_head.py", ["--teacher", str(tiny_teacher), "--output_dir", str(out),
                                                           "--config", str(cfg), "--steps", "2"])
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_zero3_codir_pretrain_two_ranks_exports_gathered_student(tmp_path, pre_config):
    """ZeRO-3 partitions the student, its MLM head and the CRD heads; the export gathers full weights."""
    run = tmp_path / "z3"
    _ok(deepspeed_launch("launchers/pretrain.py", 2, ["--deepspeed_config", str(REPO / "ds_configs" / "zero3.json"),
                                                      "--config", str(pre_config), "--output_dir", str(run),
                                                      "--set", "training.max_steps=2"]))
    assert json.loads((run / "results.json").read_text())["steps"] == 2
    weights = load_file(run / "export" / "model.safetensors")
    emb = weights["bert.embeddings.word_embeddings.weight"]
    assert emb.shape == (30522, 32) and emb.abs().sum() > 0

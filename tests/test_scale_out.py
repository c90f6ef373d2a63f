"""Scale-out: the same run on 1, 2 and 4 CPU ranks (gloo), and resuming on another number of ranks.

With ``training.deterministic`` (one global order per epoch, bank updates routed to their
owners, losses averaged over the global batch) the per-step losses, the final student
weights and the bank are those of the 1-rank run within fp32 tolerance, for finetuning and
for pre-training. Dropout is 0 here: a dropout mask depends on which rank draws it.

Resuming: a ZeRO-2 checkpoint written by 2 ranks continues on 4 (and on 1) through
DeepSpeed's universal checkpoint, converted automatically, with the bank and sampler
re-sharded; in deterministic mode the result equals the uninterrupted run. In the default
(owned-shard) mode, the rest of the interrupted epoch is re-sharded so that every example
is still seen exactly once in it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_YAML, deepspeed_launch

DS = str(REPO / "ds_configs" / "zero2.json")

DETERMINISTIC = ["--set", "training.deterministic=true", "--set", "model.dropout=0.0", "--set", "logging.log_every=1"]

PRE_YAML = """
name: tiny_pre_scale
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
  alpha_crd: 0.5
  num_negatives: 5
  projection_dim: 16
training:
  seed: 7
  max_steps: 6
  lr: 1.0e-3
  train_batch_size: 8
  micro_batch_size: 2
  fp16_fallback: fp32
  eval_batch_size: 16
logging:
  progress_bar: false
"""


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


def _run(script: str, ranks: int, config: Path, out: Path, *extra: str):
    proc = deepspeed_launch(script, ranks, ["--deepspeed_config", DS, "--config", str(config), "--output_dir",
                                            str(out), *DETERMINISTIC, *extra], timeout=400)
    _ok(proc)
    return proc


def _losses(run: Path, tag: str = "loss/total") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def _bank(run: Path):
    """(rows, updates) of every example, ordered by id, from the latest checkpoint's rank files."""
    tag = (run / "checkpoints" / "latest").read_text().strip()
    shards = [torch.load(f, weights_only=False)["bank"]
              for f in sorted((run / "checkpoints" / tag).glob("codir_rank_*.pt"))]
    ids = torch.cat([s["ids"] for s in shards])
    order = ids.argsort()
    assert torch.equal(ids[order], torch.arange(ids.numel()))  # one row per example
    return torch.cat([s["rows"] for s in shards])[order], torch.cat([s["updates"] for s in shards])[order]


def _assert_same_run(a: Path, b: Path, loss_tags: tuple[str, ...]):
    for tag in loss_tags:
        la, lb = _losses(a, tag), _losses(b, tag)
        assert [s for s, _ in la] == [s for s, _ in lb] and len(la) >= 6, tag
        assert torch.allclose(torch.tensor([v for _, v in la]), torch.tensor([v for _, v in lb]),
                              rtol=1e-5, atol=1e-6), (tag, la, lb)
    wa, wb = load_file(a / "export" / "model.safetensors"), load_file(b / "export" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), k
    rows_a, upd_a = _bank(a)
    rows_b, upd_b = _bank(b)
    assert torch.equal(upd_a, upd_b)
    assert torch.allclose(rows_a, rows_b, atol=1e-5)


# ----------------------------------------------------------------------------- finetuning

@pytest.fixture(scope="module")
def ft(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("scale_ft")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY_YAML.format(teacher=tiny_teacher))
    runs = {}
    for world in (1, 2, 4):
        runs[world] = root / f"w{world}"
        _run("launchers/finetune.py", world, cfg, runs[world])
    return cfg, runs


def test_finetune_codir_same_on_1_2_4_ranks(ft):
    _, runs = ft
    for world in (2, 4):
        r = json.loads((runs[world] / "results.json").read_text())
        assert r["world_size"] == world and r["steps"] == 6
        _assert_same_run(runs[1], runs[world], ("loss/total", "loss/task", "loss/kd", "loss/crd"))
    # every example of the 6 x 8 trained was a positive once; the bank has one row per example
    _, updates = _bank(runs[1])
    assert int(updates.sum()) == 48 and int(updates.max()) == 1
    f1 = json.loads((runs[1] / "results.json").read_text())["final"]
    f4 = json.loads((runs[4] / "results.json").read_text())["final"]
    assert f1 == pytest.approx(f4, abs=1e-6)


def test_finetune_resume_on_other_world_sizes_through_universal_checkpoint(ft, tmp_path):
    cfg, runs = ft
    run = tmp_path / "resharded"
    _run("launchers/finetune.py", 2, cfg, run, "--set", "training.stop_at_step=3")
    assert (run / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    proc = _run("launchers/finetune.py", 4, cfg, run, "--set", "training.stop_at_step=3", "--resume")
    assert "re-sharded to 4" in proc.stdout and "universal" in proc.stdout
    assert (run / "checkpoints" / "step_00000003_universal" / "COMPLETE").is_file()
    assert json.loads((run / "results.json").read_text())["world_size"] == 4
    _assert_same_run(runs[1], run, ("loss/total",))


# ----------------------------------------------------------------------------- pre-training

@pytest.fixture(scope="module")
def pre(tmp_path_factory, tiny_mlm_teacher, corpus_file):
    root = tmp_path_factory.mktemp("scale_pre")
    cfg = root / "pre.yaml"
    cfg.write_text(PRE_YAML.format(teacher=tiny_mlm_teacher, corpus=corpus_file, cache=root / "cache"))
    runs = {}
    for world in (1, 2, 4):
        runs[world] = root / f"w{world}"
        _run("launchers/pretrain.py", world, cfg, runs[world])
    return cfg, runs


def test_pretrain_codir_same_on_1_2_4_ranks(pre):
    _, runs = pre
    for world in (2, 4):
        _assert_same_run(runs[1], runs[world], ("loss/total", "loss/mlm", "loss/kd", "loss/crd"))
    r1 = json.loads((runs[1] / "results.json").read_text())["final"]
    r4 = json.loads((runs[4] / "results.json").read_text())["final"]
    assert r1["masked_tokens"] == r4["masked_tokens"]
    assert r1["mlm_loss"] == pytest.approx(r4["mlm_loss"], rel=1e-5)


def test_pretrain_resume_from_4_ranks_on_1(pre, tmp_path):
    cfg, runs = pre
    run = tmp_path / "resharded"
    _run("launchers/pretrain.py", 4, cfg, run, "--set", "training.stop_at_step=3")
    proc = _run("launchers/pretrain.py", 1, cfg, run, "--set", "training.stop_at_step=3", "--resume")
    assert "re-sharded to 1" in proc.stdout
    _assert_same_run(runs[2], run, ("loss/total",))


# ------------------------------------------------------------------ default (owned-shard) mode

def test_default_mode_resume_on_fewer_ranks_sees_each_example_once_per_epoch(ft, tmp_path):
    """64 examples, batch 8: one epoch is 8 steps. Stop after 3 on 2 ranks, finish it on 1."""
    cfg, _ = ft
    run = tmp_path / "owned"
    common = ["--deepspeed_config", DS, "--config", str(cfg), "--output_dir", str(run), "--set", "training.max_steps=8",
              "--set", "training.stop_at_step=3"]
    _ok(deepspeed_launch("launchers/finetune.py", 2, common, timeout=400))
    _, updates = _bank(run)
    assert int(updates.sum()) == 24
    _ok(deepspeed_launch("launchers/finetune.py", 1, common + ["--resume"], timeout=400))
    _, updates = _bank(run)
    assert torch.equal(updates, torch.ones(64, dtype=torch.long)), updates  # none lost, none repeated

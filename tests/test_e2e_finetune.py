"""End to end: the finetune launcher through DeepSpeed, the frozen teacher, and resume."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import REPO, deepspeed_launch
from test_help_texts import undocumented_tags

DS = str(REPO / "ds_configs" / "zero2.json")


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


def _bank_rows(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' bank shards of the latest checkpoint, as (ids, rows) sorted by id."""
    tag = (run / "checkpoints" / "latest").read_text().strip()
    shards = [torch.load(f, weights_only=False)["bank"] for f in sorted((run / "checkpoints" / tag).glob("codir_rank_*.pt"))]
    ids = torch.cat([s["ids"] for s in shards])
    rows = torch.cat([s["rows"] for s in shards])
    order = ids.argsort()
    return ids[order], rows[order], shards


def _scalar_tags(run: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    return set(ea.Tags()["scalars"])


def test_codir_finetune_two_ranks_through_deepspeed_launcher(tmp_path, tiny_config):
    run = tmp_path / "run"
    proc = deepspeed_launch("launchers/finetune.py", 2, ["--deepspeed_config", DS, "--config", str(tiny_config),
                                                         "--output_dir", str(run)], runner=True)
    _ok(proc)
    # DeepSpeed's ZeRO step calls a collective torch deprecates: filtered (codir_ds/cli.py), not printed per rank.
    assert "FutureWarning" not in proc.stderr, proc.stderr[-4000:]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 6 and results["method"] == "codir"
    assert set(results["final"]) == {"accuracy", "f1"}
    assert (run / "config.yaml").is_file() and (run / "ds_config.json").is_file()

    # The exported student loads with plain transformers and classifies.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(run / "export")
    tok = AutoTokenizer.from_pretrained(run / "export")
    logits = model(**tok(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)

    # Each rank saved its own bank shard: ids are owned by id % world, and together cover every example once.
    ids, rows, shards = _bank_rows(run)
    assert len(shards) == 2
    for r, s in enumerate(shards):
        assert (s["ids"] % 2 == r).all()
    assert torch.equal(ids, torch.arange(64))
    assert torch.allclose(rows.norm(dim=1), torch.ones(64), atol=1e-5)
    # 6 steps x 8 examples = 48 positives updated: those rows moved away from their random init.
    from codir_ds.distill.memory_bank import ShardedMemoryBank
    init = ShardedMemoryBank(64, 16, 0.5, seed=7).rows
    changed = (rows - init).abs().amax(dim=1) > 1e-6
    assert changed.sum().item() == 48

    tags = _scalar_tags(run)
    for tag in ("loss/task", "loss/kd", "loss/crd", "loss/total", "bank/pos_sim", "bank/neg_sim", "train/lr",
                "perf/samples_per_s", "eval/accuracy"):
        assert tag in tags, tag
    assert not undocumented_tags(tags), "add them to docs/running.md, 'TensorBoard tags'"


def test_resume_equals_uninterrupted_run(tmp_path, tiny_config):
    """3 steps, stop, resume 3 steps == 6 uninterrupted steps: weights, bank and metrics bit-identical."""
    common = ["--deepspeed_config", DS, "--config", str(tiny_config)]
    full, split = tmp_path / "full", tmp_path / "split"
    _ok(deepspeed_launch("launchers/finetune.py", 2, common + ["--output_dir", str(full)]))
    first = deepspeed_launch("launchers/finetune.py", 2, common + ["--output_dir", str(split),
                                                                    "--set", "training.stop_at_step=3"])
    _ok(first)
    assert "stopped at step 3" in first.stdout
    assert not (split / "results.json").exists()
    # Without --resume the run directory is protected.
    again = deepspeed_launch("launchers/finetune.py", 2, common + ["--output_dir", str(split)])
    assert again.returncode != 0 and "already holds a run" in again.stdout + again.stderr
    _ok(deepspeed_launch("launchers/finetune.py", 2, common + ["--output_dir", str(split), "--resume"]))

    a, b = load_file(full / "export" / "model.safetensors"), load_file(split / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids_a, rows_a, _ = _bank_rows(full)
    ids_b, rows_b, _ = _bank_rows(split)
    assert torch.equal(ids_a, ids_b) and torch.equal(rows_a, rows_b)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, split))
    assert ra["final"] == rb["final"] and ra["steps"] == rb["steps"] == 6


def test_teacher_is_frozen_never_optimized_and_bit_identical(tmp_path, tiny_config, single_process_env):
    from codir_ds.config import load_config
    from codir_ds.recipes import FinetuneRecipe

    def check_frozen(teacher):
        assert all(not p.requires_grad for p in teacher.parameters())
        assert not teacher.training

    cfg = load_config(str(tiny_config), ["training.max_steps=3"])
    recipe = FinetuneRecipe(cfg, DS, str(tmp_path / "run"))
    recipe.setup()
    teacher = recipe.teacher
    check_frozen(teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    trained = list(recipe.engine.module.parameters())
    assert not any(p.data_ptr() in teacher_ptrs for p in trained)
    optimized = [p for g in recipe.optimizer.optimizer.param_groups for p in g["params"]]
    optimized += [p for g in getattr(recipe.optimizer, "bit16_groups", []) for p in g]
    assert optimized and not any(p.data_ptr() in teacher_ptrs for p in optimized)
    assert not any(id(p) in {id(t) for t in teacher.parameters()} for p in optimized)
    results = recipe.train()
    check_frozen(teacher)
    assert results["steps"] == 3 and recipe.progress.step == 3
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_zero3_codir_two_ranks_exports_gathered_student(tmp_path, tiny_config):
    """ZeRO-3 partitions the student and the CRD heads; export must gather full weights."""
    run = tmp_path / "z3"
    _ok(deepspeed_launch("launchers/finetune.py", 2, ["--deepspeed_config", str(REPO / "ds_configs" / "zero3.json"),
                                                      "--config", str(tiny_config), "--output_dir", str(run),
                                                      "--set", "training.max_steps=3"]))
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 3
    weights = load_file(run / "export" / "model.safetensors")
    emb = weights["bert.embeddings.word_embeddings.weight"]
    assert emb.shape == (30522, 32) and emb.abs().sum() > 0  # not an empty ZeRO-3 placeholder


def test_fp16_fallback_warns_once_and_runs_bf16(tmp_path, tiny_config):
    from conftest import python_launch
    run = tmp_path / "bf16"
    proc = python_launch("launchers/finetune.py", ["--deepspeed_config", DS, "--config", str(tiny_config),
                                                   "--output_dir", str(run), "--set", "training.fp16_fallback=bf16",
                                                   "--set", "training.max_steps=2"])
    _ok(proc)
    out = proc.stdout + proc.stderr
    warnings = [line for line in out.splitlines() if "fp16 is not supported" in line]
    assert len(warnings) == 1 and "bf16" in warnings[0]
    assert json.loads((run / "results.json").read_text())["precision"] == "bfloat16"
    # The export is fp32 whatever the training precision.
    assert all(t.dtype == torch.float32 for t in load_file(run / "export" / "model.safetensors").values())

"""Teacher-output cache (training.teacher_cache): later epochs skip the teacher and train the same."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from codir_ds.config import load_config
from codir_ds.engine.teacher import TeacherOutput
from codir_ds.engine.teacher_cache import TeacherCache
from codir_ds.errors import CodirError

DS = str(REPO / "ds_configs" / "zero2.json")


def test_cache_rows_round_trip_and_stale_meta_starts_empty(tmp_path):
    cache = TeacherCache(tmp_path, 0, 10, 3, 4, {"teacher_sha256": "a"})
    ids = torch.tensor([7, 2])
    assert cache.lookup(ids, "cpu") is None
    out = TeacherOutput(logits=torch.randn(2, 3), features=torch.randn(2, 4))
    cache.store(ids, out)
    assert cache.lookup(torch.tensor([2, 5]), "cpu") is None            # one miss: run the teacher
    hit = cache.lookup(torch.tensor([2, 7]), "cpu")
    assert torch.equal(hit.logits, out.logits.flip(0)) and torch.equal(hit.features, out.features.flip(0))
    cache.flush()
    again = TeacherCache(tmp_path, 0, 10, 3, 4, {"teacher_sha256": "a"})  # reopened (resume): rows kept
    assert again.lookup(ids, "cpu") is not None
    other = TeacherCache(tmp_path, 0, 10, 3, 4, {"teacher_sha256": "b"})  # another teacher: empty
    assert other.lookup(ids, "cpu") is None and not np.any(other.filled)
    assert json.loads((tmp_path / "meta.json").read_text()) == {"teacher_sha256": "b"}


def test_teacher_cache_only_for_kd_and_codir():
    with pytest.raises(CodirError, match="training.teacher_cache"):
        load_config(None, ["model.teacher=x", "method.name=tinybert", "training.teacher_cache=true"])


@pytest.mark.parametrize("method", ["kd", "codir"])
def test_teacher_cache_is_refused_for_pretraining_not_silently_ignored(method):
    """The config is checked for the launcher's stage: pre-training has no teacher cache."""
    sets = [f"method.name={method}", "training.teacher_cache=true"]
    with pytest.raises(CodirError, match=r"finetuning with kd and codir \(this is pre-training method.name="):
        load_config("configs/pre_codir_cpu.yaml", sets, stage="pretrain")
    assert load_config("configs/fine_movie_snippets_cpu.yaml", sets + ["model.teacher=x"],
                       stage="finetune").training.teacher_cache


@pytest.mark.parametrize("method", ["kd", "codir"])
def test_cached_run_equals_uncached_run(tmp_path, tiny_config, single_process_env, method):
    """3 epochs: epochs 2 and 3 come from the cache; weights match the run without it."""
    from codir_ds.recipes import run_finetune
    sets = [f"method.name={method}", "model.dropout=0.0", "training.max_steps=-1", "training.epochs=3",
            "training.deterministic=true"]
    plain = run_finetune(load_config(str(tiny_config), sets), DS, str(tmp_path / "plain"))
    cached = run_finetune(load_config(str(tiny_config), sets + ["training.teacher_cache=true"]), DS,
                          str(tmp_path / "cached"))
    steps = cached["steps"]                      # 64 examples / batch 8 = 8 steps per epoch, 4 micro each
    assert steps == 24 and cached["teacher_cache"]["miss_batches"] == 32
    assert cached["teacher_cache"]["hit_batches"] == 64
    assert cached["teacher_cache"]["disk_bytes_rank0"] > 0
    a = load_file(str(tmp_path / "plain" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "cached" / "export" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert plain["final"] == pytest.approx(cached["final"], abs=1e-9)

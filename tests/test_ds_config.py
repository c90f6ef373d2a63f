"""DeepSpeed JSON handling: batch arithmetic, file errors, precision fallback."""

import json
from pathlib import Path

import pytest
import torch

import codir_ds.engine.ds_config as dsc
from codir_ds.config import TrainingConfig
from codir_ds.engine.ds_config import prepare_ds_config, read_ds_config, resolve_batch
from codir_ds.errors import CodirError

ZERO2 = Path(__file__).resolve().parent.parent / "ds_configs" / "zero2.json"


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- resolve_batch

@pytest.mark.parametrize("ds, world, expected", [
    # train + micro -> accum = 64 / (4 * 2)
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}, 2, (64, 4, 8)),
    # train + accum -> micro = 48 / (3 * 4)
    ({"train_batch_size": 48, "gradient_accumulation_steps": 3}, 4, (48, 4, 3)),
    # micro + accum -> train = 5 * 3 * 2
    ({"train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": 3}, 2, (30, 5, 3)),
    # micro alone -> accum 1
    ({"train_micro_batch_size_per_gpu": 8}, 3, (24, 8, 1)),
    # train alone -> accum 1, micro = 32 / 4
    ({"train_batch_size": 32}, 4, (32, 8, 1)),
    # all three, consistent
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 4,
     (24, 2, 3)),
])
def test_resolve_batch_any_two(ds, world, expected):
    assert resolve_batch(ds, world) == expected


def test_resolve_batch_real_zero2():
    ds = read_ds_config(str(ZERO2))
    assert resolve_batch(ds, 1) == (8192, 32, 256)
    assert resolve_batch(ds, 16) == (8192, 32, 16)


def test_yaml_overrides_replace_json_values():
    ds = read_ds_config(str(ZERO2))  # 8192 / micro 32
    # train alone: accumulation 1, micro derived (the JSON's micro is dropped)
    assert resolve_batch(ds, 1, train_batch_size=64) == (64, 64, 1)
    assert resolve_batch(ds, 4, train_batch_size=64) == (64, 16, 1)
    # micro alone: the JSON's train_batch_size, accumulation derived
    assert resolve_batch(ds, 2, micro_batch_size=4) == (8192, 4, 1024)
    # both: accumulation derived
    assert resolve_batch(ds, 2, train_batch_size=16, micro_batch_size=4) == (16, 4, 2)


def test_override_drops_json_accumulation():
    ds = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 8}
    assert resolve_batch(ds, 1) == (64, 8, 8)
    # the JSON's 8 would contradict 64 = 16 x accum: accumulation is derived again
    assert resolve_batch(ds, 1, micro_batch_size=16) == (64, 16, 4)
    assert resolve_batch(ds, 1, train_batch_size=32, micro_batch_size=8) == (32, 8, 4)
    assert resolve_batch(ds, 2, train_batch_size=32) == (32, 16, 1)


def test_override_of_micro_with_json_train_and_accum():
    # only micro given in YAML, train from JSON -> accumulation derived, not the JSON's 2
    ds = {"train_batch_size": 32, "gradient_accumulation_steps": 2}
    assert resolve_batch(ds, 2, micro_batch_size=2) == (32, 2, 8)


def test_override_micro_indivisible_json_train():
    ds = read_ds_config(str(ZERO2))
    with pytest.raises(CodirError) as info:
        resolve_batch(ds, 1, micro_batch_size=3)  # 8192 % 3 != 0
    msg = _one_line(info)
    assert "8192" in msg and "micro batch 3" in msg


def test_override_train_indivisible_by_world():
    ds = read_ds_config(str(ZERO2))
    with pytest.raises(CodirError) as info:
        resolve_batch(ds, 2, train_batch_size=15)
    msg = _one_line(info)
    assert "15" in msg and "world size 2" in msg and "multiple of 2" in msg


def test_indivisible_train_by_micro_names_numbers():
    with pytest.raises(CodirError) as info:
        resolve_batch({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 2)
    msg = _one_line(info)
    assert "30" in msg and "4" in msg and "2" in msg and "multiple of 8" in msg


def test_indivisible_train_by_accum_names_numbers():
    with pytest.raises(CodirError) as info:
        resolve_batch({"train_batch_size": 30, "gradient_accumulation_steps": 4}, 2)
    msg = _one_line(info)
    assert "30" in msg and "gradient_accumulation_steps 4" in msg and "multiple of 8" in msg


def test_explicit_mismatch():
    ds = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    with pytest.raises(CodirError) as info:
        resolve_batch(ds, 2)  # 4 * 2 * 2 = 16 != 32
    msg = _one_line(info)
    assert "32" in msg and "= 16" in msg and "accumulation 2" in msg and "micro 4" in msg


def test_neither_train_nor_micro():
    with pytest.raises(CodirError) as info:
        resolve_batch({"gradient_accumulation_steps": 2}, 1)
    assert "train_batch_size" in _one_line(info)


@pytest.mark.parametrize("ds", [
    {"train_batch_size": 0},
    {"train_batch_size": -8},
    {"train_micro_batch_size_per_gpu": "4"},
    {"train_micro_batch_size_per_gpu": 2.0},
    {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 0},
])
def test_non_positive_or_non_integer(ds):
    with pytest.raises(CodirError) as info:
        resolve_batch(ds, 1)
    assert "positive integer" in _one_line(info)


# ----------------------------------------------------------------------------- read_ds_config

def test_read_real_zero2():
    ds = read_ds_config(str(ZERO2))
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["fp16"]["enabled"] is True


def test_read_missing_file(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(CodirError) as info:
        read_ds_config(str(missing))
    msg = _one_line(info)
    assert str(missing) in msg and "does not exist" in msg


def test_read_bad_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": tru}\n}\n')
    with pytest.raises(CodirError) as info:
        read_ds_config(str(p))
    msg = _one_line(info)
    assert str(p) in msg and "not valid JSON" in msg and "line 3" in msg


def test_read_json_not_object(tmp_path):
    p = tmp_path / "list.json"
    p.write_text("[1, 2]")
    with pytest.raises(CodirError, match="JSON object"):
        read_ds_config(str(p))


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_read_refuses_optimizer_and_scheduler(tmp_path, block):
    cfg = json.loads(ZERO2.read_text())
    cfg[block] = {"type": "Adam" if block == "optimizer" else "WarmupLR", "params": {}}
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(cfg))
    with pytest.raises(CodirError) as info:
        read_ds_config(str(p))
    msg = _one_line(info)
    assert f"'{block}'" in msg and "training.lr" in msg


# ----------------------------------------------------------------------------- prepare_ds_config

def _fp16_ds():
    return read_ds_config(str(ZERO2))


def test_fp16_falls_back_to_bf16(monkeypatch):
    monkeypatch.setattr(dsc, "fp16_supported", lambda: False)
    original = _fp16_ds()
    snapshot = json.loads(json.dumps(original))
    ds, dtype, warning = prepare_ds_config(original, 1, TrainingConfig(train_batch_size=8, micro_batch_size=4))
    assert dtype == torch.bfloat16
    assert ds["fp16"] == {"enabled": False}
    assert ds["bf16"] == {"enabled": True}
    assert isinstance(warning, str) and "\n" not in warning
    assert "fp16" in warning and "bf16" in warning and "training.fp16_fallback=bf16" in warning
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 4, 2)
    assert ds["zero_optimization"] == snapshot["zero_optimization"]
    assert original == snapshot  # the caller's dict is not modified


def test_fp16_falls_back_to_fp32(monkeypatch):
    monkeypatch.setattr(dsc, "fp16_supported", lambda: False)
    ds, dtype, warning = prepare_ds_config(_fp16_ds(), 2, TrainingConfig(fp16_fallback="fp32", micro_batch_size=2,
                                                                         train_batch_size=8))
    assert dtype == torch.float32
    assert ds["fp16"] == {"enabled": False}
    assert not ds.get("bf16", {}).get("enabled", False)
    assert "\n" not in warning and "fp32" in warning
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)


def test_fp16_kept_when_supported(monkeypatch):
    monkeypatch.setattr(dsc, "fp16_supported", lambda: True)
    original = _fp16_ds()
    ds, dtype, warning = prepare_ds_config(original, 4, TrainingConfig())
    assert dtype == torch.float16 and warning is None
    assert ds["fp16"] == original["fp16"]  # loss-scale settings kept
    assert "bf16" not in ds
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8192, 32, 64)
    assert "steps_per_print" in ds


def test_bf16_and_fp32_configs_untouched(monkeypatch):
    def boom():
        raise AssertionError("fp16_supported must not be asked when fp16 is off")
    monkeypatch.setattr(dsc, "fp16_supported", boom)
    ds, dtype, warning = prepare_ds_config({"train_batch_size": 4, "bf16": {"enabled": True}}, 1, TrainingConfig())
    assert dtype == torch.bfloat16 and warning is None and ds["bf16"] == {"enabled": True}
    ds, dtype, warning = prepare_ds_config({"train_batch_size": 4, "fp16": {"enabled": False}}, 1, TrainingConfig())
    assert dtype == torch.float32 and warning is None


def test_steps_per_print_respects_user_value(monkeypatch):
    monkeypatch.setattr(dsc, "fp16_supported", lambda: True)
    ds, _, _ = prepare_ds_config({"train_batch_size": 4, "steps_per_print": 5}, 1, TrainingConfig())
    assert ds["steps_per_print"] == 5


@pytest.mark.parametrize("supported", [True, False])
def test_fp16_and_bf16_both_enabled(monkeypatch, supported):
    monkeypatch.setattr(dsc, "fp16_supported", lambda: supported)
    ds = {"train_batch_size": 8, "fp16": {"enabled": True}, "bf16": {"enabled": True}}
    with pytest.raises(CodirError) as info:
        prepare_ds_config(ds, 1, TrainingConfig())
    msg = _one_line(info)
    assert "fp16" in msg and "bf16" in msg


def test_prepare_propagates_batch_errors(monkeypatch):
    monkeypatch.setattr(dsc, "fp16_supported", lambda: True)
    with pytest.raises(CodirError, match="not divisible"):
        prepare_ds_config(_fp16_ds(), 3, TrainingConfig())  # 8192 % (32 * 3) != 0


def test_fp16_supported_returns_bool():
    assert isinstance(dsc.fp16_supported(), bool)


def test_fp16_never_chosen_on_the_cpu_even_where_deepspeed_reports_it(monkeypatch):
    """CPUs with AVX512-FP16 make DeepSpeed's CPU accelerator report fp16; runs there still fall back."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        pytest.skip("the CPU accelerator's rule")
    monkeypatch.setattr(type(acc), "is_fp16_supported", lambda self: True)
    assert dsc.fp16_supported() is False
    ds, dtype, warning = dsc.prepare_ds_config(_fp16_ds(), 1, TrainingConfig(fp16_fallback="fp32", train_batch_size=8,
                                                                               micro_batch_size=4))
    assert dtype == torch.float32 and not ds.get("fp16", {}).get("enabled") and "fp16" in warning


def test_zero_stage_is_read_as_deepspeed_reads_it():
    from codir_ds.engine.ds_config import zero_stage
    assert zero_stage({}) == 0 and zero_stage({"zero_optimization": {}}) == 0
    assert [zero_stage({"zero_optimization": {"stage": s}}) for s in (0, 1, 2, 3)] == [0, 1, 2, 3]
    assert zero_stage({"zero_optimization": True}) == 1 and zero_stage({"zero_optimization": False}) == 0

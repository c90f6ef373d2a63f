"""The parts of the recipes' one training step, each alone: named step sections and their timer, the components'
hooks, the teacher step (cache or forward), mixed inputs, the checkpoint's RunState, and the bench's shared
command-line module."""
from __future__ import annotations

import ast
import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch

from codir_ds.distill.components import Component, Components, EMAComponent
from codir_ds.distill.ild import MixedInputs, mixup_draw
from codir_ds.distill.memory_bank import derive_seed
from codir_ds.distill.methods.base import TeacherOutput
from codir_ds.engine.checkpointing import RunState
from codir_ds.engine.sections import install_timer, section
from codir_ds.engine.teacher import TeacherStep
from codir_ds.recipes.stages import MicroBatch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def timed():
    """Install a timer that records the sections entered, in order; removed afterwards."""
    names: list = []

    @contextlib.contextmanager
    def timer(name):
        names.append(name)
        yield

    install_timer(timer)
    try:
        yield names
    finally:
        install_timer(None)


def test_a_section_is_timed_only_while_a_timer_is_installed(timed):
    with section("optimizer_step"):
        pass
    install_timer(None)
    with section("optimizer_step"):  # no timer: a profiler range only
        pass
    assert timed == ["optimizer_step"]


class Recorder(Component):
    name, section, stateful = "rec", "rec_section", True

    def __init__(self):
        self.calls = []

    def start_step(self, step, batches):
        self.calls.append(("start_step", step))

    def forward_inputs(self):
        return {"extra": 1}

    def loss_inputs(self, ids):
        return {"negatives": ids.sum().item()}

    def after_micro_step(self, ids, out):
        self.calls.append(("after_micro_step", ids.tolist()))

    def after_optimizer_step(self, applied, stage):
        self.calls.append(("after_optimizer_step", applied, stage))


def test_components_call_every_hook_under_the_components_section(timed):
    rec, plain = Recorder(), Component()
    comps = Components()
    comps.add(rec)
    comps.add(plain)
    ids = torch.tensor([3, 4])
    comps.start_step(7, [(0, ids)])
    assert comps.forward_inputs() == {"extra": 1}
    assert comps.loss_inputs(ids) == {"negatives": 7}
    comps.after_micro_step(ids, {})
    comps.after_optimizer_step(False, "kd")
    assert rec.calls == [("start_step", 7), ("after_micro_step", [3, 4]), ("after_optimizer_step", False, "kd")]
    assert timed.count("rec_section") == 4 and comps.stateful() == {"rec": rec}


def test_the_ema_copy_gives_the_forward_its_clean_model_and_updates_only_applied_active_steps():
    student = torch.nn.Linear(2, 2)
    ema = EMAComponent(student, 0.5, active=lambda stage: stage == "ild")
    assert ema.forward_inputs()["clean_model"] is ema.model
    before = ema.model.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    ema.after_optimizer_step(False, "ild")  # skipped step
    ema.after_optimizer_step(True, "kd")    # inactive stage
    assert torch.equal(ema.model.weight, before)
    ema.after_optimizer_step(True, "ild")
    assert torch.allclose(ema.model.weight, 0.5 * before + 0.5 * student.weight)


class FakeCache:
    def __init__(self, hit):
        self.hit, self.stored = hit, []

    def lookup(self, ids, device):
        return self.hit

    def store(self, ids, out):
        self.stored.append((ids.tolist(), out))


def test_the_teacher_step_reads_the_cache_and_runs_the_teacher_only_on_a_miss(timed):
    calls = []

    def runner(**kwargs):
        calls.append(kwargs)
        return TeacherOutput(logits=torch.zeros(2, 3))
    mb = MicroBatch(torch.tensor([1, 2]), {"input_ids": torch.ones(2, 4, dtype=torch.long)}, torch.zeros(2), 2,
                    mix=(0.7, torch.tensor([1, 0])))
    cached = TeacherOutput(logits=torch.ones(2, 3))
    assert TeacherStep(runner, FakeCache(cached))(mb, ild=True) is cached and not calls
    miss = FakeCache(None)
    out = TeacherStep(runner, miss)(mb, ild=True)
    assert calls[0]["ild"] is True and calls[0]["mix"] == mb.mix and "input_ids" in calls[0]
    assert miss.stored == [([1, 2], out)]
    TeacherStep(runner)(mb)  # no cache: a forward every time
    assert len(calls) == 2 and timed == ["teacher_forward"] * 3


def test_mixed_inputs_add_supplementary_examples_and_draw_from_the_micro_step_seed():
    supplementary = [f"s{i}" for i in range(10)]
    mixer = MixedInputs(0.4, supplementary, seed=3, rank=1)
    examples, (lam, partner) = mixer(["a", "b", "c"], micro_step=5)
    assert examples[:3] == ["a", "b", "c"] and len(examples) == 6 and set(examples[3:]) <= set(supplementary)
    assert 0.5 <= lam <= 1.0 and sorted(partner.tolist()) == list(range(6))
    want_lam, want_partner = mixup_draw(0.4, 6, derive_seed(3, 1, 5))
    assert lam == want_lam and torch.equal(partner, want_partner)  # a resumed run draws the same
    again = mixer(["a", "b", "c"], micro_step=5)
    assert again[0] == examples and again[1][0] == lam
    plain, (_, p) = MixedInputs(0.4, [], seed=3, rank=1)(["a", "b"], micro_step=5)
    assert plain == ["a", "b"] and len(p) == 2


@pytest.mark.parametrize("files, layout", [
    (["mp_rank_00_model_states.pt"], 0),
    (["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
      "zero_pp_rank_1_mp_rank_00_optim_states.pt"], 1),
    (["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], 3),
])
def test_checkpoint_zero_layout_from_its_files_and_a_mismatch_is_one_line(tmp_path, files, layout):
    """DeepSpeed's file names per layout (as written by ZeRO 0, 2 and 3 runs); resuming under another is refused."""
    from codir_ds.engine.checkpointing.universal import check_zero_stage, saved_zero_layout, zero_layout
    from codir_ds.errors import CodirError
    tag = tmp_path / "run" / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    for f in files + ["codir_rank_00000.pt"]:
        (tag / f).write_bytes(b"")
    assert saved_zero_layout(tag) == layout
    assert [zero_layout(s) for s in (0, 1, 2, 3)] == [0, 1, 1, 3]
    for stage in (0, 1, 2, 3):
        if zero_layout(stage) == layout:
            check_zero_stage(tag, stage, "ds.json")
        else:
            with pytest.raises(CodirError) as info:
                check_zero_stage(tag, stage, "ds.json")
            msg = str(info.value)
            assert "\n" not in msg and f"asks for ZeRO stage {stage}" in msg
            assert str(tmp_path / "run" / "ds_config.json") in msg


def test_run_state_splits_sharded_components_from_the_others():
    class Sharded(Component):
        sharded = True
    bank, ema = Sharded(), Component()
    state = RunState(sampler=object(), components={"bank": bank, "ema": ema})
    assert state.sharded() == {"bank": bank} and state.extras() == {"ema": ema} and state.engines == {}


def test_the_recipes_share_one_step_one_evaluation_and_one_finish():
    """FinetuneRecipe and PretrainRecipe define no step, evaluation or end of their own; co-training overrides the
    step only (two engines)."""
    defined = {}
    for name in ("finetune", "pretrain", "cotrain"):
        tree = ast.parse((REPO / "codir_ds" / "recipes" / f"{name}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Recipe"):
                defined[node.name] = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
    shared = {"train_step", "evaluate", "finish", "export", "save", "restore"}
    assert not defined["FinetuneRecipe"] & shared and not defined["PretrainRecipe"] & shared
    assert defined["CoTrainRecipe"] & shared == {"train_step"}


def test_bench_cli_reports_bad_arguments_in_one_line(capsys, tmp_path):
    sys.path.insert(0, str(REPO))
    from bench.cli import ArgumentError, Parser, read_json, shown_command

    ap = Parser(script="bench/x.py")
    ap.add_argument("--n", type=int, required=True)

    def check(args):
        if args.n < 1:
            raise ArgumentError(f"--n must be >= 1, got {args.n}")
    for argv, want in ((["--n", "0"], "error: --n must be >= 1, got 0"),
                       (["--n", "x"], "(see python bench/x.py --help)")):
        with pytest.raises(SystemExit) as e:
            ap.parse_checked(argv, check)
        err = capsys.readouterr().err
        assert e.value.code == 2 and want in err and len(err.strip().splitlines()) == 1
    assert ap.parse_checked(["--n", "2"], check).n == 2
    (tmp_path / "list.json").write_text(json.dumps([1]))
    assert read_json(tmp_path / "list.json") is None and read_json(tmp_path / "none.json") is None
    assert shown_command([sys.executable, "-m", "deepspeed.launcher.runner", "a.py"]) == "deepspeed a.py"
    assert shown_command([sys.executable, "b.py"], "X=1") == "X=1 python b.py"

"""The CRD collapse diagnostics: the watch's rule, and what a real run logs and reports."""
from __future__ import annotations

import json

from codir_ds.config import load_config
from codir_ds.distill.diagnostics import CollapseWatch, last_diagnostics

DS = "ds_configs/zero2.json"


def _window(pos: float, neg: float) -> dict:
    return {"bank/pos_sim": pos, "bank/neg_sim": neg, "bank/sim_gap": pos - neg, "crd/loss_over_log_k1": 0.9}


def test_collapse_warning_fires_once_after_three_collapsed_windows():
    watch = CollapseWatch()
    # the untrained start (nothing aligned yet) and a healthy phase never count
    seq = [(0.05, 0.02), (0.3, 0.05), (0.9, 0.2), (0.93, 0.25),
           (0.88, 0.7), (0.9, 0.8), (0.92, 0.85), (0.93, 0.9), (0.95, 0.93)]
    lines = [watch.observe(10 * (i + 1), _window(p, n)) for i, (p, n) in enumerate(seq)]
    fired = [(i, line) for i, line in enumerate(lines) if line]
    assert len(fired) == 1 and fired[0][0] == 6, lines
    line = fired[0][1]
    assert line.startswith("warning: step 70: the contrastive term has collapsed") and "\n" not in line
    assert "bank/pos_sim 0.92" in line and "bank/neg_sim 0.85" in line and "training.lr" in line


def test_collapse_watch_is_silent_on_a_healthy_run_and_when_collapse_does_not_last():
    healthy = CollapseWatch()
    assert not any(healthy.observe(s, _window(0.94, 0.21)) for s in range(0, 200, 10))
    flicker = CollapseWatch()
    pattern = [(0.9, 0.8), (0.9, 0.8), (0.9, 0.3)] * 5  # two collapsed windows, then recovered, again and again
    assert not any(flicker.observe(s, _window(p, n)) for s, (p, n) in enumerate(pattern))
    assert not CollapseWatch().observe(1, {"loss/task": 0.3})  # methods without CRD


def test_collapse_watch_state_survives_a_resume():
    a = CollapseWatch()
    for s in range(2):
        a.observe(s, _window(0.9, 0.85))
    b = CollapseWatch()
    b.load_state_dict(a.state_dict())
    assert b.observe(3, _window(0.9, 0.85))  # the third collapsed window, counted across the resume
    c = CollapseWatch()
    c.load_state_dict(b.state_dict())
    assert not c.observe(4, _window(0.9, 0.85))  # warned once per run


def test_a_codir_run_logs_and_reports_the_diagnostics(tmp_path, tiny_config, single_process_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from codir_ds.recipes import run_finetune
    results = run_finetune(load_config(str(tiny_config)), DS, str(tmp_path / "run"))
    keys = ("bank/pos_sim", "bank/neg_sim", "bank/sim_gap", "crd/loss_over_log_k1", "crd/student_norm",
            "crd/teacher_norm", "bank/never_updated")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert set(keys) <= set(acc.Tags()["scalars"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["diagnostics"]
    assert set(keys) <= set(saved) and saved["collapse_warning"] in (False, True)
    assert saved == results["diagnostics"]
    last = {k: acc.Scalars(k)[-1].value for k in keys}
    for k in keys:
        assert abs(saved[k] - last[k]) < 1e-5, k
    assert 0.0 <= saved["bank/never_updated"] <= 1.0
    # 6 steps x batch 8 = 48 positives on 64 training examples: at least 16 rows never updated
    assert saved["bank/never_updated"] >= 16 / 64
    assert last_diagnostics({"loss/task": 1.0, "bank/pos_sim": 0.5}) == {"bank/pos_sim": 0.5}


# --------------------------------------------------------------------------- method.bank_init=student

def test_warm_start_fills_exactly_the_owned_rows(monkeypatch):
    """Rank 1 of 2 writes the normalised student features of the ids it owns, nothing else, no communication."""
    import torch
    import torch.nn.functional as F
    from codir_ds.distill import memory_bank as mb
    from codir_ds.distill.bank_component import MemoryBankComponent
    from codir_ds.distill.methods import BankSpec, ContrastSpec
    monkeypatch.setattr(mb, "_dist_layout", lambda group: (1, 2))
    seen = []

    def features(ids):  # row i: i * (1, 2, -1)
        seen.append(ids.tolist())
        return ids.float().view(-1, 1).repeat(1, 3) * torch.tensor([1.0, 2.0, -1.0])

    component = MemoryBankComponent(BankSpec(0.5, init="student"), ContrastSpec(projection_dim=3), 9, 1, "cpu", 2,
                                    labels=torch.tensor([0, 1] * 4 + [0]))
    bank = component.bank
    component.warm_start(features, 2)
    assert sum(seen, []) == [1, 3, 5, 7] and all(len(s) <= 2 for s in seen)
    want = F.normalize(torch.tensor([1.0, 2.0, -1.0]).repeat(4, 1), dim=1)
    assert torch.allclose(bank.rows, want) and component.warm_start_seconds is not None
    assert int(bank.updates.sum()) == 0  # a warm start is not a momentum update
    random_rows = MemoryBankComponent(BankSpec(0.5), ContrastSpec(projection_dim=3), 9, 1, "cpu", 2,
                                      labels=torch.tensor([0, 1] * 4 + [0]))
    before = random_rows.bank.rows.clone()
    random_rows.warm_start(features, 2)  # bank_init=random: nothing to do
    assert torch.equal(random_rows.bank.rows, before) and random_rows.warm_start_seconds is None


def test_warm_start_in_a_real_run_and_resume(tmp_path, tiny_config, single_process_env, capsys):
    """The recipe's bank holds the student's projected features before step 0; a resumed run does not
    redo the pass and ends where the uninterrupted one does."""
    import torch
    import torch.nn.functional as F
    from codir_ds.recipes import recipe_for
    sets = ["method.bank_init=student", "training.checkpoint_every=0"]
    recipe = recipe_for(load_config(str(tiny_config), sets), "finetune", DS, str(tmp_path / "a"))
    recipe.setup()
    assert "bank warm start: 64 rows" in capsys.readouterr().out
    ids = torch.arange(64)
    recipe.engine.eval()
    with torch.no_grad():
        b = recipe.data.feature_batch(ids)
        want = F.normalize(recipe.engine.module.student_features(b["input_ids"], b["attention_mask"],
                                                                 b["token_type_ids"]).float(), dim=1)
    recipe.engine.train()
    assert torch.allclose(recipe.bank.rows, want, atol=1e-5)
    full = recipe.train()
    assert full["bank_warm_start_seconds"] >= 0
    from codir_ds.recipes import run_finetune
    run_finetune(load_config(str(tiny_config), sets + ["training.stop_at_step=3"]), DS, str(tmp_path / "b"))
    capsys.readouterr()
    resumed = run_finetune(load_config(str(tiny_config), sets), DS, str(tmp_path / "b"), resume=True)
    assert "bank warm start" not in capsys.readouterr().out and "bank_warm_start_seconds" not in resumed
    assert resumed["final"] == full["final"]
    assert resumed["diagnostics"]["bank/pos_sim"] == full["diagnostics"]["bank/pos_sim"]


# --------------------------------------------------------------------------- method.pretrain_negatives=bank

def test_pretraining_candidates_filled_from_the_bank():
    import torch
    from codir_ds.distill.negatives import batch_negatives, other_ids
    batch = torch.tensor([9, 3, 5])
    plain = batch_negatives(batch, 9, seed=1, step=4, world=1)
    assert plain.tolist() == [3, 5, 9]  # the paper's setting: the global batch only
    filled = batch_negatives(batch, 9, seed=1, step=4, world=1, fill_from=20)
    assert filled.numel() == 10 and filled.unique().numel() == 10 and set(plain.tolist()) <= set(filled.tolist())
    assert int(filled.min()) >= 0 and int(filled.max()) < 20
    assert torch.equal(filled, batch_negatives(batch, 9, seed=1, step=4, world=1, fill_from=20))  # every rank
    assert not torch.equal(filled, batch_negatives(batch, 9, seed=1, step=5, world=1, fill_from=20))
    # fewer examples than candidates wanted: all of them
    assert sorted(batch_negatives(batch, 20, seed=1, step=4, world=1, fill_from=10).tolist()) == list(range(10))
    # a large bank (the rejection path): distinct, never a batch id
    extra = other_ids(batch, 100, 1_000_000, seed=2, step=0)
    assert extra.numel() == 100 and extra.unique().numel() == 100 and not torch.isin(extra, batch).any()
    # a batch larger than K + 1 is subsampled as before, nothing added
    big = torch.arange(40)
    assert torch.equal(batch_negatives(big, 9, 1, 4, 1, fill_from=100), batch_negatives(big, 9, 1, 4, 1))


def test_the_main_job_prints_what_the_contrastive_term_did():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "launchers" / "demo_pretrain.py"
    spec = importlib.util.spec_from_file_location("demo_pretrain_for_test", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    diag = {"bank/pos_sim": 0.91, "bank/neg_sim": 0.12, "bank/sim_gap": 0.79, "crd/loss_over_log_k1": 0.0123,
            "collapse_warning": False}
    lines = demo.crd_lines([{"pretraining": "MLM-Pre", "crd_diagnostics": None},
                            {"pretraining": "CoDIR-Pre", "crd_diagnostics": diag}])
    assert len(lines) == 1
    assert ("CoDIR-Pre contrastive term at the end of stage 2: cosine with the positive 0.910, with the negatives "
            "0.120 (gap 0.790); L_CRD / log(K+1) = 0.0123") in lines[0] and lines[0].endswith("collapse warning: no")


def test_the_main_job_states_its_finding_beside_the_study():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "launchers" / "demo_pretrain.py"
    spec = importlib.util.spec_from_file_location("demo_pretrain_for_findings", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rows = [{"variant": "mlm", "pretraining": "MLM-Pre", "finetune_final": 0.7300, "crd_diagnostics": None},
            {"variant": "codir", "pretraining": "CoDIR-Pre", "finetune_final": 0.7250,
             "crd_diagnostics": {"crd/loss_over_log_k1": 0.0002, "bank/neg_sim": -0.004}},
            {"variant": "codir_bank", "pretraining": "CoDIR-Pre (bank negatives)", "finetune_final": 0.7330,
             "crd_diagnostics": {"crd/loss_over_log_k1": 0.195, "bank/neg_sim": 0.21}}]
    study = {"seeds": [1, 2, 3], "comparisons": [
        {"a": "codir", "b": "mlm", "claim": "CoDIR-Pre beats MLM-Pre", "paired": {
            "diffs": [0.01, -0.004, 0.0], "mean": 0.002, "std": 0.00721, "wins": 1}},
        {"a": "kd", "b": "mlm", "claim": "KD-Pre beats MLM-Pre", "paired": {  # kd did not run: not shown
            "diffs": [0.0, 0.0, 0.0], "mean": 0.0, "std": 0.0, "wins": 0}}]}
    lines = demo.findings_lines(rows, study)
    assert lines[:3] == [
        "CoDIR-Pre - MLM-Pre: -0.5 points",
        "CoDIR-Pre (bank negatives) - MLM-Pre: +0.3 points",
        "bank candidates vs in-batch negatives: L_CRD / log(K+1) 0.0002 -> 0.1950, cosine with the negatives "
        "-0.004 -> 0.210; finetuned accuracy +0.8 points"]
    assert lines[3].startswith("one seed cannot separate differences this small; over 3 paired seeds")
    # the study's numbers with their t interval (t_{0.975,2} = 4.303 x 0.721 / sqrt 3 = 1.79 points) and what they
    # read as after Holm's adjustment over the study's two comparisons; the label is the pair, never the claim
    assert lines[4:] == ["  CoDIR-Pre - MLM-Pre: +0.20 points, 95 % t interval [-1.59, +1.99], wins/ties/losses 1/1/1, "
                         "Holm p 1.00: no difference shown"]
    # the study line names the split the study reports
    assert f"({demo.STUDY.relative_to(demo.STUDY.parents[3])}, test split):" in demo.findings_lines(
        rows, {**study, "split": "test"})[3]
    # without a study (e.g. a copy of the launcher outside the repository) only the run's own lines
    assert demo.findings_lines(rows, None) == lines[:3]
    assert demo.findings_lines(rows[:1], study) == []
    # the committed study is found where the launcher looks for it, and names what the demo runs
    committed = demo.read_study()
    assert committed is not None and committed["split"] == "test" and {("codir", "mlm"), ("codir", "kd")} <= {
        (c["a"], c["b"]) for c in committed["comparisons"]}
    # ... and is left out when the run's settings are not the ones it ran at (the seed may differ)
    import argparse
    ap = argparse.ArgumentParser()
    for k in demo.STUDY_SETTINGS:
        ap.add_argument(f"--{k}", default=1)
    ap.add_argument("--seed", default=42)
    assert demo.read_study(ap.parse_args(["--seed", "7"]), ap) == committed
    assert demo.read_study(ap.parse_args(["--stage2_steps", "200"]), ap) is None

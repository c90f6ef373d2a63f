"""Fault tolerance: a rank SIGKILLed mid-training or mid-save, then ``--resume``.

Both runs end with exactly the weights, bank and per-step losses of an uninterrupted run
(fp32, ``training.deterministic``, 2 CPU ranks, ZeRO-2): no step lost, none repeated.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_YAML, deepspeed_launch

DS = str(REPO / "ds_configs" / "zero2.json")
COMMON = ["--set", "training.deterministic=true", "--set", "training.max_steps=8", "--set",
          "training.checkpoint_every=2", "--set", "training.keep_checkpoints=2", "--set", "logging.log_every=1"]


def _launch(cfg: Path, run: Path, *extra: str, fault: str = ""):
    env_before = os.environ.get("CODIR_DS_FAULT")
    if fault:
        os.environ["CODIR_DS_FAULT"] = fault
    try:
        return deepspeed_launch("launchers/finetune.py", 2, ["--deepspeed_config", DS, "--config", str(cfg),
                                                             "--output_dir", str(run), *COMMON, *extra], timeout=300)
    finally:
        if env_before is None:
            os.environ.pop("CODIR_DS_FAULT", None)
        else:
            os.environ["CODIR_DS_FAULT"] = env_before


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


def _state(run: Path):
    """Exported weights, bank rows/update counts by id, and per-step total losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tag = (run / "checkpoints" / "latest").read_text().strip()
    shards = [torch.load(f, weights_only=False)["bank"] for f in sorted((run / "checkpoints" / tag).glob("codir_rank_*.pt"))]
    ids = torch.cat([s["ids"] for s in shards])
    order = ids.argsort()
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    losses = {e.step: e.value for e in ea.Scalars("loss/total")}
    return (load_file(run / "export" / "model.safetensors"), torch.cat([s["rows"] for s in shards])[order],
            torch.cat([s["updates"] for s in shards])[order], losses)


def _assert_identical(a: Path, b: Path):
    wa, rows_a, upd_a, loss_a = _state(a)
    wb, rows_b, upd_b, loss_b = _state(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert torch.equal(rows_a, rows_b) and torch.equal(upd_a, upd_b)
    assert loss_a == loss_b and sorted(loss_a) == list(range(1, 9))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("faults")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY_YAML.format(teacher=tiny_teacher))
    reference = root / "uninterrupted"
    _ok(_launch(cfg, reference))
    return cfg, reference


def test_sigkill_one_rank_mid_training_then_resume_equals_uninterrupted(setup, tmp_path):
    cfg, reference = setup
    run = tmp_path / "killed"
    proc = _launch(cfg, run, fault="step:5:1")  # rank 1 dies after step 5; the last checkpoint is step 4
    assert proc.returncode != 0
    assert "killing rank 1 at step 5" in proc.stdout + proc.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (run / "results.json").exists()
    proc = _launch(cfg, run, "--resume")
    _ok(proc)
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    _assert_identical(reference, run)
    # keep_checkpoints=2: only the two newest survive
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_00000006", "step_00000008"]


def test_crash_during_checkpoint_save_leaves_previous_checkpoint_loadable(setup, tmp_path):
    cfg, reference = setup
    run = tmp_path / "killed_saving"
    proc = _launch(cfg, run, fault="save:6:0")  # rank 0 dies after writing its files of checkpoint 6
    assert proc.returncode != 0
    half = run / "checkpoints" / "step_00000006"
    assert half.is_dir() and any(half.iterdir()) and not (half / "COMPLETE").exists()  # written, never published
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    proc = _launch(cfg, run, "--resume")
    _ok(proc)
    assert "at step 4" in proc.stdout
    _assert_identical(reference, run)
    assert json.loads((run / "results.json").read_text())["steps"] == 8


def test_bad_fault_spec_is_a_one_line_error(setup, tmp_path):
    cfg, _ = setup
    proc = _launch(cfg, tmp_path / "x", fault="stepp:5")
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "CODIR_DS_FAULT" in lines[0]
    assert not (tmp_path / "x").exists()


def test_rank_removes_deepspeed_shm_buffer_at_exit(monkeypatch):
    """DeepSpeed's CPU comm op never unlinks its 66 MB /dev/shm buffer; codir-ds does at exit."""
    from codir_ds.engine.distributed import remove_shm_buffer, shm_buffer_path
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "3")
    path = shm_buffer_path()
    assert path.name == f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_3"
    path.write_bytes(b"x")
    remove_shm_buffer()
    assert not path.exists()
    remove_shm_buffer()  # already gone: no error


# --------------------------------------------------------------------------- preemption (SIGTERM / Ctrl-C)


def _rank_pids(run: Path, launcher_pid: int) -> list[int]:
    import psutil
    try:
        kids = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p.pid for p in kids if "launchers/finetune.py" in " ".join(p.cmdline()) and str(run) in " ".join(p.cmdline())
            and "deepspeed.launcher" not in " ".join(p.cmdline())]


def test_sigterm_to_every_rank_saves_one_checkpoint_and_resume_equals_uninterrupted(setup, tmp_path):
    """A real SIGTERM to both ranks of a 2-rank run while it trains: both finish the step in flight, agree on it,
    save one complete checkpoint, write the requeue marker and exit with 75; --resume then ends exactly as the
    uninterrupted run, and no step is logged twice."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import free_port, remove_shm_buffers
    cfg, reference = setup
    run = tmp_path / "preempted"
    port = free_port()
    # checkpoint_every=0: no periodic checkpoint, so the one found is the preemption's
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(REPO / "launchers/finetune.py"), "--deepspeed_config", DS, "--config", str(cfg), "--output_dir",
           str(run), *COMMON, "--set", "training.checkpoint_every=0", "--set", "training.max_steps=8"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CODIR_DS_FAULT", None)
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, sent = time.time() + 240, []
        while time.time() < deadline and not sent:  # training has started once step 2 is logged
            events = list((run / "tensorboard").glob("events.*")) if (run / "tensorboard").is_dir() else []
            if events and any(f.stat().st_size > 2000 for f in events):
                pids = _rank_pids(run, proc.pid)
                if len(pids) == 2:
                    for pid in pids:
                        os.kill(pid, signal.SIGTERM)
                    sent = pids
            time.sleep(0.05)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        remove_shm_buffers(port)
    assert sent, "the ranks never started training"
    assert proc.returncode == 75, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    marker = json.loads((run / "preempted.json").read_text())
    step = marker["step"]
    assert 1 <= step < 8 and marker["signal"] == "SIGTERM"
    tag = f"step_{step:08d}"
    assert (run / "checkpoints" / "latest").read_text().strip() == tag and (run / "checkpoints" / tag / "COMPLETE").is_file()
    assert not (run / "results.json").exists()
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by SIGTERM after step {step} of 8: saved checkpoint ") and last.endswith("--resume")
    assert "Traceback" not in out + err
    resumed = _launch(cfg, run, "--resume", "--set", "training.checkpoint_every=0")
    _ok(resumed)
    assert not (run / "preempted.json").exists()
    _assert_identical(reference, run)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    assert sorted(e.step for e in ea.Scalars("loss/total")) == list(range(1, 9))  # no step repeated


def test_a_second_signal_stops_at_once_and_a_burst_is_one_request(tmp_path):
    """Unit: the first SIGTERM is a request; a SIGINT in the same burst (Ctrl-C plus the launcher's SIGTERM) is the
    same request; one after SAME_EVENT_S stops the process at once (128 + signal) with one line."""
    import subprocess
    import sys
    script = tmp_path / "s.py"
    script.write_text(
        "import os, signal, time\n"
        "from codir_ds.engine import preemption as p\n"
        "p.SAME_EVENT_S = 0.3\n"
        "s = p.StopSignals().install()\n"
        "s.last_checkpoint = 'runs/x/checkpoints/step_00000004'\n"
        "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGINT)\n"
        "print('requested', s.requested(), s.name, flush=True)\n"
        "time.sleep(0.5)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "print('not reached', flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "requested True SIGTERM"
    assert proc.returncode == 128 + 15
    assert proc.stderr.strip() == ("SIGTERM again: stopped at once without saving; the last complete checkpoint is "
                                   "runs/x/checkpoints/step_00000004")


def test_resume_command_drops_overwrite_and_adds_resume(monkeypatch):
    from codir_ds.engine.preemption import resume_command
    monkeypatch.setattr("sys.argv", [str(REPO / "launchers/finetune.py"), "--local_rank=1", "--config", "a b.yaml",
                                     "--overwrite", "--output_dir", "runs/x"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(REPO)
    assert resume_command() == ("deepspeed --num_gpus 2 launchers/finetune.py --config 'a b.yaml' --output_dir runs/x "
                                "--resume")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr("sys.argv", ["launchers/pretrain.py", "--resume"])
    assert resume_command() == "python launchers/pretrain.py --resume"

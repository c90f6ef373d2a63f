"""Multi-node launch: two loopback "nodes" as one job, the DeepSpeed hostfile launcher's command,
hostfile checking, and the SLURM batch script (without SLURM)."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, deepspeed_launch, free_port

from codir_ds.engine.hostfile import parse_hostfile, parse_hostfile_lines
from codir_ds.errors import CodirError

DS = str(REPO / "ds_configs" / "zero2.json")
SBATCH = REPO / "launchers" / "slurm_multinode.sbatch"


def _ok(proc, what=""):
    assert proc.returncode == 0, (f"{what} exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                                  f"STDERR:\n{proc.stderr[-4000:]}")


def _rank_states(run: Path) -> list[dict]:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    return [torch.load(f, weights_only=False)
            for f in sorted((run / "checkpoints" / tag).glob("codir_rank_*.pt"))]


# ---------------------------------------------------------------- fake SLURM commands

FAKE_SRUN = """#!{python}
# Fake srun: records its arguments; with FAKE_SRUN_RUN=1 runs the command once per node, all in
# parallel, with SLURM_NODEID/SLURM_PROCID set (as srun --ntasks-per-node 1 does), output to node<i>.log,
# and like --kill-on-bad-exit ends the others when one fails.
import os, subprocess, sys, time
args = sys.argv[1:]
with open(os.path.join({tmp!r}, "srun_args"), "w") as f:
    f.write("\\n".join(args) + "\\n")
if os.environ.get("FAKE_SRUN_RUN") != "1":
    sys.exit(0)
cmd = args[args.index("bash"):]
procs = []
for i in range(int(args[args.index("--nodes") + 1])):
    log = open(os.path.join({tmp!r}, f"node{{i}}.log"), "w")
    env = dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i))
    procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
    time.sleep(0.2)
for p in procs:
    if p.poll() is None:
        os.killpg(p.pid, 9)
sys.exit(next((abs(r) for r in [p.wait() for p in procs] if r), 0))
"""


def _fake_slurm_bin(tmp_path: Path, nodes: list[str]) -> Path:
    """``scontrol show hostnames`` printing ``nodes``, and the fake ``srun`` above."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\n[[ \"$1 $2\" == 'show hostnames' ]] || exit 1\n"
                                      + "".join(f"echo {n}\n" for n in nodes))
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable, tmp=str(tmp_path)))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _sbatch(tmp_path, bin_dir, env_extra: dict, *args, timeout: int = 60) -> subprocess.CompletedProcess:
    """``bash launchers/slurm_multinode.sbatch`` as if SLURM ran it on the first node of a 2-node job."""
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="gpu-[01-02]", SLURM_GPUS_PER_NODE="a100:4", SLURM_SUBMIT_DIR=str(REPO),
               PYTHON=sys.executable, HOSTFILE=str(tmp_path / "hostfile"), PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"):
        env.pop(k, None)
    env.update(env_extra)
    proc = subprocess.Popen(["bash", str(SBATCH), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script, the fake srun and every node's torchrun
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _node_logs(tmp_path: Path) -> str:
    return "".join(f"\n--- {f.name}:\n{f.read_text()[-3000:]}" for f in sorted(tmp_path.glob("node*.log")))


# ---------------------------------------------------------------- a. two loopback nodes, one job

def test_two_loopback_nodes_train_as_one_job_identical_to_one_node(tmp_path, tiny_config):
    """The SLURM script on two loopback "nodes" (fake scontrol/srun): one torchrun per node, one job,
    bit-identical to a one-node 2-rank run through the deepspeed launcher."""
    overrides = ["--set", "training.max_steps=4"]
    multi, single = tmp_path / "two_nodes", tmp_path / "one_node"
    # The reference (one node, 2 ranks, the deepspeed launcher) runs alongside: both are mostly start-up.
    reference = {}
    thread = threading.Thread(target=lambda: reference.update(proc=deepspeed_launch(
        "launchers/finetune.py", 2, ["--deepspeed_config", DS, "--config", str(tiny_config), *overrides,
                                     "--output_dir", str(single)], runner=True)))
    thread.start()
    port = str(free_port())
    try:
        bin_dir = _fake_slurm_bin(tmp_path, ["127.0.0.1", "localhost"])
        nodes = _sbatch(tmp_path, bin_dir, {
            "FAKE_SRUN_RUN": "1", "SLURM_JOB_NODELIST": "loopback", "SLURM_GPUS_PER_NODE": "1",
            "MASTER_PORT": port, "SCRIPT": "launchers/finetune.py", "CONFIG": str(tiny_config), "DS_CONFIG": DS,
            "OUTPUT_DIR": str(multi), "EXTRA_ARGS": " ".join(overrides)}, timeout=240)
    finally:
        thread.join()
    _ok(nodes, f"two nodes: {_node_logs(tmp_path)}")
    _ok(reference["proc"], "one node:")
    # What srun ran on each node: torchrun with that node's rank, the first node as rendezvous.
    srun = (tmp_path / "srun_args").read_text().splitlines()
    assert srun[srun.index("bash") + 3:] == [sys.executable, "--nnodes", "2", "--nproc_per_node", "1",
                                            "--master_addr", "127.0.0.1", "--master_port", port,
                                            "launchers/finetune.py", "--deepspeed_config", DS, "--config",
                                            str(tiny_config), "--output_dir", str(multi), *overrides]

    rm, rs = (json.loads((d / "results.json").read_text()) for d in (multi, single))
    assert rm["world_size"] == rs["world_size"] == 2 and rm["steps"] == rs["steps"] == 4
    assert rm["final"] == rs["final"]

    a, b = load_file(multi / "export" / "model.safetensors"), load_file(single / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Each node's rank wrote its own bank shard into the shared run directory; shard r is rank r's on both.
    sm, ss = _rank_states(multi), _rank_states(single)
    assert [s["rank"] for s in sm] == [s["rank"] for s in ss] == [0, 1]
    for x, y in zip(sm, ss):
        assert torch.equal(x["bank"]["ids"], y["bank"]["ids"])
        assert torch.equal(x["bank"]["rows"], y["bank"]["rows"])
        assert (x["bank"]["ids"] % 2 == x["rank"]).all()


# ---------------------------------------------------------------- b. deepspeed --hostfile (pdsh), captured

def _captured_runner_command(monkeypatch, tmp_path, argv: list[str], backend: str) -> tuple[list[str], list]:
    """Run ``deepspeed.launcher.runner.main(argv)`` with the backend present and no process started."""
    from deepspeed.launcher import multinode_runner, runner

    started, checks = [], []

    class FakePopen:
        returncode = 0

        def __init__(self, cmd, env=None):
            started.append(list(cmd))

        def wait(self):
            return 0

    fake_subprocess = SimpleNamespace(Popen=FakePopen, CalledProcessError=subprocess.CalledProcessError,
                                      DEVNULL=subprocess.DEVNULL,
                                      check_call=lambda cmd, **kw: checks.append(list(cmd)) or 0,
                                      check_output=lambda cmd, **kw: pytest.fail(f"unexpected {cmd}"))
    monkeypatch.setattr(runner, "subprocess", fake_subprocess)
    monkeypatch.setattr(runner, "signal", SimpleNamespace(signal=lambda *a: None, SIGINT=2, SIGTERM=15))
    monkeypatch.setattr(getattr(multinode_runner, backend), "backend_exists", lambda self: True)
    monkeypatch.chdir(REPO)
    runner.main(argv)
    assert len(started) == 1
    return started[0], checks


def test_deepspeed_hostfile_launch_command_reaches_both_hosts(monkeypatch, tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# two nodes\nnode-a slots=2\n\nnode-b slots=2\n")
    user_args = ["--deepspeed_config", "ds_configs/zero2.json", "--config", "configs/pre_codir_cpu.yaml",
                 "--output_dir", "/shared/runs/x", "--set", "method.name=mlm"]
    cmd, checks = _captured_runner_command(
        monkeypatch, tmp_path, ["--hostfile", str(hf), "--master_addr", "node-a", "--master_port", "29512",
                                "launchers/pretrain.py", *user_args], "PDSHRunner")
    assert checks == [["ssh", "-o", "PasswordAuthentication=no", "node-a", "hostname"]]  # ssh check, first host
    assert cmd[:5] == ["pdsh", "-S", "-f", "1024", "-w"] and cmd[5] == "node-a,node-b"
    assert f"cd {REPO};" in cmd and "deepspeed.launcher.launch" in cmd
    assert "--node_rank=%n" in cmd and "--master_addr=node-a" in cmd and "--master_port=29512" in cmd
    world = next(c for c in cmd if c.startswith("--world_info="))
    assert json.loads(base64.urlsafe_b64decode(world.split("=", 1)[1])) == {"node-a": [0, 1], "node-b": [0, 1]}
    i = cmd.index("launchers/pretrain.py")
    assert cmd[i + 1:] == user_args


def test_deepspeed_slurm_launcher_runs_the_script_bare(monkeypatch, tmp_path):
    """Why the SLURM script uses torchrun: ``--launcher slurm`` starts the script under srun without the
    per-node launcher that sets RANK/LOCAL_RANK/WORLD_SIZE."""
    hf = tmp_path / "hostfile"
    hf.write_text("node-a slots=2\nnode-b slots=2\n")
    cmd, _ = _captured_runner_command(
        monkeypatch, tmp_path, ["--hostfile", str(hf), "--launcher", "slurm", "--no_ssh_check",
                                "--master_addr", "node-a", "launchers/pretrain.py", "--deepspeed_config", DS],
        "SlurmRunner")
    assert cmd[:3] == ["srun", "-n", "4"]
    assert "deepspeed.launcher.launch" not in cmd and "torch.distributed.run" not in cmd
    assert cmd[cmd.index("launchers/pretrain.py") - 2:][:2] == [sys.executable, "-u"]


# ---------------------------------------------------------------- c. hostfile parsing and check_hostfile

GOOD = """# cluster A
worker-0 slots=8

   # indented comment
worker-1\tslots=8   max_slots=8   # OpenMPI field and a trailing comment
10.0.0.7 slots=4
"""


def test_parse_hostfile_good(tmp_path):
    from deepspeed.launcher.runner import _parse_hostfile
    hf = tmp_path / "hf"
    hf.write_text(GOOD)
    hosts = parse_hostfile(hf)
    assert list(hosts.items()) == [("worker-0", 8), ("worker-1", 8), ("10.0.0.7", 4)]
    assert dict(_parse_hostfile(GOOD.splitlines(keepends=True))) == dict(hosts)  # DeepSpeed reads the same


BAD_LINES = [
    ("node2 slots=four", "slots='four': slots must be a positive whole number"),
    ("node2 slots=", "slots='': slots must be a positive whole number"),
    ("node2 slots=-1", "slots='-1': slots must be a positive whole number"),  # -1 is a whole number
    ("node2 slots = 8", "is not '<hostname> slots=<n>'"),
    ("node2", "is not '<hostname> slots=<n>'"),
    ("node2 8", "is not '<hostname> slots=<n>'"),
    ("slots=8", "is not '<hostname> slots=<n>'"),
    ("node2 slots=0", "slots must be a positive whole number (1, 2, ...), not 0"),  # DeepSpeed accepts: no rank
    ("node2 slots=8gpus", "positive whole number (1, 2, ...), not '8gpus' (DeepSpeed would read 8)"),  # reads 8
    ("node2 slots=8 gpus", "unexpected text"),   # DeepSpeed accepts and ignores the rest
    ("node2,node3 slots=8", "contains ','"),
    ("node1 slots=4", "already listed on line 2"),
]


@pytest.mark.parametrize("line,expected", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_parse_hostfile_bad_line(tmp_path, line, expected):
    hf = tmp_path / "hf"
    hf.write_text(f"# nodes\nnode1 slots=4\n{line}\n")
    with pytest.raises(CodirError) as e:
        parse_hostfile(hf)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"hostfile '{hf}' line 3: '{line}'") and expected in msg, msg
    assert "not a whole number" not in msg, msg  # slots=-1 and slots=0 are whole numbers, just not positive ones
    assert "remove the line" in msg or "use the plain host name" in msg or "list each host once" in msg


@pytest.mark.parametrize("text,expected", [(None, "does not exist"), ("", "lists no hosts"),
                                           ("# only a comment\n\n", "lists no hosts")])
def test_parse_hostfile_missing_or_empty(tmp_path, text, expected):
    hf = tmp_path / "hf"
    if text is not None:
        hf.write_text(text)
    with pytest.raises(CodirError, match=expected) as e:
        parse_hostfile(hf)
    assert "\n" not in str(e.value) and str(hf) in str(e.value)


def test_refuses_everything_deepspeed_refuses():
    from deepspeed.launcher.runner import _parse_hostfile
    for line, _ in BAD_LINES:
        lines = ["node1 slots=4", line]
        try:
            _parse_hostfile(lines)
        except ValueError:
            with pytest.raises(CodirError):
                parse_hostfile_lines(lines, "hf")


def _check_hostfile(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launchers" / "check_hostfile.py"), str(path)],
                          capture_output=True, text=True, timeout=60, cwd=str(REPO))


def test_check_hostfile_cli(tmp_path):
    good = _check_hostfile(REPO / "launchers" / "hostfile.example")
    _ok(good)
    assert good.stdout.strip().endswith("2 hosts, 16 slots")
    hf = tmp_path / "hf"
    hf.write_text("node1 slots=8\nnode2 slots=four\n")
    bad = _check_hostfile(hf)
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: hostfile '{hf}' line 2: 'node2 slots=four'"), bad.stderr


# ---------------------------------------------------------------- d. the SLURM batch script, without SLURM

def test_sbatch_syntax():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    _ok(proc)


def test_sbatch_builds_a_valid_hostfile(tmp_path):
    bin_dir = _fake_slurm_bin(tmp_path, ["gpu-01", "gpu-02"])
    proc = _sbatch(tmp_path, bin_dir, {}, "--hostfile-only")
    _ok(proc)
    assert "2 hosts, 8 slots" in proc.stdout
    assert list(parse_hostfile(tmp_path / "hostfile").items()) == [("gpu-01", 4), ("gpu-02", 4)]
    assert not (tmp_path / "srun_args").exists()


def test_sbatch_launch_command_and_resume(tmp_path):
    bin_dir = _fake_slurm_bin(tmp_path, ["gpu-01", "gpu-02"])
    run = tmp_path / "run"
    env = {"OUTPUT_DIR": str(run), "CONFIG": "configs/fine_movie_snippets_cpu.yaml", "SCRIPT": "launchers/finetune.py",
           "EXTRA_ARGS": "--set method.name=kd"}

    _ok(_sbatch(tmp_path, bin_dir, env))
    args = (tmp_path / "srun_args").read_text().splitlines()
    i = args.index("bash")
    assert args[:i] == ["--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert args[i + 1] == "-c" and '--node_rank "$SLURM_NODEID"' in args[i + 2]
    assert args[i + 3:] == [sys.executable, "--nnodes", "2", "--nproc_per_node", "4", "--master_addr", "gpu-01",
                            "--master_port", str(20000 + 4242), "launchers/finetune.py", "--deepspeed_config",
                            "ds_configs/zero2.json", "--config", "configs/fine_movie_snippets_cpu.yaml",
                            "--output_dir", str(run), "--set", "method.name=kd"]

    # A requeued job whose run has a checkpoint resumes it.
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000002")
    _ok(_sbatch(tmp_path, bin_dir, env))
    assert (tmp_path / "srun_args").read_text().splitlines()[-1] == "--resume"

    # A requeued attempt whose predecessor died before its first checkpoint starts the run again; a first
    # attempt does not (the launcher then refuses the used directory); a bad RESUME is refused.
    (run / "checkpoints" / "latest").unlink()
    (run / "config.yaml").write_text("name: x\n")
    _ok(_sbatch(tmp_path, bin_dir, dict(env, SLURM_RESTART_COUNT="1")))
    assert (tmp_path / "srun_args").read_text().splitlines()[-1] == "--overwrite"
    _ok(_sbatch(tmp_path, bin_dir, env))
    assert (tmp_path / "srun_args").read_text().splitlines()[-1] == "method.name=kd"
    _ok(_sbatch(tmp_path, bin_dir, dict(env, RESUME="1")))
    assert (tmp_path / "srun_args").read_text().splitlines()[-1] == "--resume"
    bad = _sbatch(tmp_path, bin_dir, dict(env, RESUME="yes"))
    assert bad.returncode == 2 and "RESUME must be auto, 1 or 0" in bad.stderr

    # A finished run is left alone: nothing is launched.
    (tmp_path / "srun_args").unlink()
    (run / "results.json").write_text("{}")
    proc = _sbatch(tmp_path, bin_dir, env)
    _ok(proc)
    assert "finished run" in proc.stdout and not (tmp_path / "srun_args").exists()


def test_sbatch_requeues_a_run_that_stopped_on_a_signal_and_not_a_failed_one(tmp_path):
    """After srun returns, OUTPUT_DIR/preempted.json (written by rank 0 when SIGTERM stopped the run after a
    checkpoint) makes the script run `scontrol requeue <job id>` and exit 0; a marker left by an earlier attempt is
    removed first, so a run that fails is not requeued and its exit status stays."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\nif [[ \"$1\" == requeue ]]; then echo \"$2\" >> " + str(tmp_path / "requeued") + "; exit 0; fi\n"
        "[[ \"$1 $2\" == 'show hostnames' ]] || exit 1\necho gpu-01\necho gpu-02\n")
    # srun stand-in: the ranks stop on SIGTERM (marker, torchrun's exit status 1), or fail without one
    (bin_dir / "srun").write_text("#!/bin/bash\n[[ -n \"$FAKE_PREEMPT\" ]] && echo '{\"step\": 3}' > "
                                  "\"$OUTPUT_DIR/preempted.json\"\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run = tmp_path / "run"
    run.mkdir()
    env = {"OUTPUT_DIR": str(run), "CONFIG": "configs/fine_movie_snippets_cpu.yaml", "SCRIPT": "launchers/finetune.py",
           "RESUME": "0"}
    proc = _sbatch(tmp_path, bin_dir, dict(env, FAKE_PREEMPT="1"))
    _ok(proc)
    assert "requeueing job 4242" in proc.stdout and (tmp_path / "requeued").read_text() == "4242\n"
    # the next attempt fails without stopping on a signal: the old marker does not requeue it
    proc = _sbatch(tmp_path, bin_dir, env)
    assert proc.returncode == 1 and (tmp_path / "requeued").read_text() == "4242\n"
    assert not (run / "preempted.json").exists()

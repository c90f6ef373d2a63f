"""The end-to-end tests' rank starter (tests/rank_server.py through conftest.run_processes): a forked rank behaves as
``python script args`` would, in what it sees, prints and exits with, and so does the fresh-interpreter fallback."""
from __future__ import annotations

import os
import subprocess

import pytest

import conftest
from conftest import run_processes

SCRIPT = """
import os, sys
import torch
print("argv", sys.argv[1:], "rank", os.environ.get("RANK"), "threads", torch.get_num_threads(),
      "name", __name__, "path0", os.path.basename(sys.path[0]))
print("to stderr", file=sys.stderr)
mode = sys.argv[1]
if mode == "raise":
    raise ValueError("boom")
if mode == "message":
    sys.exit("a message")
if mode == "probe":
    import probe_mod
    print("probe", probe_mod.X)
    sys.exit(0)
if mode == "hang":
    import time
    time.sleep(60)
sys.exit(int(mode))
"""


@pytest.fixture(params=["server", "fresh"])
def starter(request, monkeypatch):
    if request.param == "fresh":
        monkeypatch.setenv("CODIR_TEST_RANK_SERVER", "0")
    else:
        assert conftest.rank_server() is not None
    return request.param


def _job(tmp_path, *modes, threads="1", timeout=60):
    script = tmp_path / "job" / "script.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(SCRIPT)
    envs = [dict(os.environ, RANK=str(r), OMP_NUM_THREADS=threads) for r in range(len(modes))]
    return run_processes([[str(script), m] for m in modes], envs, timeout)


def test_a_rank_sees_its_arguments_environment_and_threads_and_prints_to_one_output(tmp_path, starter):
    proc = _job(tmp_path, "0", "0", threads="2")
    assert proc.returncode == 0
    lines = sorted(proc.stdout.splitlines())
    assert lines == [f"argv ['0'] rank {r} threads 2 name __main__ path0 job" for r in (0, 1)], proc.stdout
    assert proc.stderr.splitlines() == ["to stderr", "to stderr"]


@pytest.mark.parametrize("mode, status, err", [("3", 3, "to stderr"), ("raise", 1, "ValueError: boom"),
                                               ("message", 1, "a message")])
def test_exit_status_and_the_uncaught_exception_as_the_interpreter_gives_them(tmp_path, starter, mode, status, err):
    proc = _job(tmp_path, mode)
    assert proc.returncode == status and err in proc.stderr
    if mode == "raise":
        assert "Traceback" in proc.stderr


def test_a_failing_rank_ends_the_job_and_a_hung_one_times_out(tmp_path, starter):
    proc = _job(tmp_path, "hang", "4")  # rank 1 fails: rank 0 is killed, the job's status is rank 1's
    assert proc.returncode == 4
    with pytest.raises(subprocess.TimeoutExpired):
        _job(tmp_path, "hang", timeout=3)


def test_a_job_with_another_pythonpath_gets_fresh_interpreters(tmp_path, monkeypatch):
    """The server's imports were made with its own PYTHONPATH: a job that sets another one must see it."""
    assert conftest.rank_server() is not None
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "probe_mod.py").write_text("X = 41 + 1\n")
    monkeypatch.setenv("PYTHONPATH", str(extra))
    proc = _job(tmp_path, "probe")
    assert proc.returncode == 0 and "probe 42" in proc.stdout, proc.stderr


def test_exit_joins_threads_and_an_interrupt_is_death_by_sigint(tmp_path, starter):
    script = tmp_path / "threads.py"
    script.write_text("import sys, threading, time\n"
                      "from concurrent.futures import ThreadPoolExecutor\n"
                      "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\n"
                      "ThreadPoolExecutor(1).submit(lambda: (time.sleep(0.3), print('pool done')))\n"
                      "if sys.argv[1] == 'interrupt':\n"
                      "    raise KeyboardInterrupt\n")
    proc = run_processes([[str(script), "end"]], [dict(os.environ)], 60)
    assert proc.returncode == 0 and sorted(proc.stdout.split()) == ["done", "done", "pool", "thread"], proc.stdout
    proc = run_processes([[str(script), "interrupt"]], [dict(os.environ)], 60)
    assert proc.returncode == -2, (proc.returncode, proc.stderr)

"""A process that imports torch, transformers and DeepSpeed once and forks test ranks from itself.

Each end-to-end test starts 1-4 ranks, and each rank spends about 4 s of a 2-core machine importing the same
libraries before it does anything. This server imports them once; a rank is then a fork of it that runs the
launcher script as ``python script args`` would (``runpy``, ``__main__``, the script's folder first on
``sys.path``), with the environment, working directory and output files the request names. codir-ds itself is
not imported here, so every rank imports the code of the checkout its script belongs to.

Protocol (one JSON object per line): the client writes ``{"script", "argv", "env", "cwd", "stdout", "stderr"}``
to the server's stdin and reads ``{"pid": N}``; when a rank ends the server writes ``{"exit": N, "status": S}``
(S as ``subprocess`` reports it: the exit code, or minus the signal). The server is single-threaded (a fork
from a threaded process can inherit a held lock); it runs no torch operation before forking (an OpenMP pool
does not survive a fork).

Tests use it through ``conftest.spawn_ranks``; ``CODIR_TEST_RANK_SERVER=0`` starts every rank as a fresh
interpreter instead.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading

# Started with OMP_NUM_THREADS=1, these leave the server with one thread (numpy's OpenBLAS would start a pool).
# Besides the packages, what every rank imports lazily later: the BERT model classes (2-3 s: transformers' kernel
# hub and weight-loading modules), and DeepSpeed's engine and ZeRO optimizers (its optimizer check imports its
# Muon optimizer, which imports torch.compile's inductor: about 1.4 s).
PRELOAD = ("numpy", "yaml", "torch", "torch.distributed", "safetensors.torch", "transformers", "deepspeed",
           "transformers.models.auto.modeling_auto", "transformers.models.bert.modeling_bert",
           "transformers.models.bert.tokenization_bert", "deepspeed.runtime.engine",
           "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
           "deepspeed.runtime.zero.muon.muon_optimizer", "torch._inductor.compile_fx")


def _run_rank(req: dict) -> int:
    """In the forked child: become ``python script argv`` and return its exit status."""
    import atexit
    import io
    import runpy
    import numpy
    numpy.random.seed()  # a fresh interpreter's global numpy RNG differs per process; a fork's would not
    os.setsid()  # its own process group, as Popen(start_new_session=True): the client kills the group
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    import torch  # the server imported torch with one thread; a fresh interpreter would read the job's setting
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else len(os.sched_getaffinity(0)))
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdin = open(0, closefd=False)
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=True, write_through=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True, write_through=True,
                                  errors="backslashreplace")
    script = os.path.abspath(req["script"])
    sys.argv = [script, *req["argv"]]
    sys.path[0] = os.path.dirname(script)
    status = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except KeyboardInterrupt:  # the interpreter then dies of SIGINT itself
        status = -signal.SIGINT
    except BaseException:  # what the interpreter prints and exits with on an uncaught exception
        sys.excepthook(*sys.exc_info())
        status = 1
    try:
        threading._shutdown()  # join non-daemon threads, as at interpreter exit (executors finish their work)
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    if status == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return status


def _reap(out) -> None:
    while True:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
        out.write(json.dumps({"exit": pid, "status": status}) + "\n")
        out.flush()


def serve() -> None:
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # another library version without that module: the rank imports what it needs
            pass
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the replies go to ``out`` only: a stray print in the server cannot corrupt them
    inp = sys.stdin.buffer
    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    out.flush()
    pending = b""
    while True:
        ready, _, _ = select.select([inp], [], [], 0.05)
        _reap(out)
        if not ready:
            continue
        chunk = os.read(inp.fileno(), 65536)
        if not chunk:  # the client went away
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            req = json.loads(line)
            sys.stdout.flush(), sys.stderr.flush(), out.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(out.fileno())  # the server's reply pipe and request pipe are not the rank's
                    os.close(inp.fileno())
                    code = _run_rank(req)
                finally:
                    os._exit(code if isinstance(code, int) else 1)
            out.write(json.dumps({"pid": pid}) + "\n")
            out.flush()


if __name__ == "__main__":
    serve()

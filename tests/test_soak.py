"""Soak test (issue 4, item 6 "Load"): thousands of steps on 2 ranks, random SIGKILLs, resumes.

A tiny ``codir`` finetuning run (``training.deterministic``, fp32, ZeRO-2, 2 CPU ranks)
checkpoints every 25 steps while a killer SIGKILLs ONE random rank process, from outside,
at random moments (seeded): during start-up (imports, DeepSpeed initialisation, checkpoint
loading), in the middle of training, and while a checkpoint is being saved (the test watches
``checkpoints/`` and fires when a new ``step_*`` folder without ``COMPLETE`` appears). After
each kill the DeepSpeed launcher must tear the job down; the run is relaunched with
``--resume`` (or ``--overwrite`` when no checkpoint was published yet) until it finishes.

At the end, no optimizer step may have been lost or repeated: with the deterministic sampler
the ids of every step are a function of (seed, epoch, global batch) only, so the number of
times an uninterrupted run makes each example a positive is known by replaying
``GlobalOrderSampler``; the bank's per-row ``updates`` counter (one per applied step in
which the example was a positive) must equal it for every example. The bank must hold one
unit-norm row per example, the sampler states must be where step ``max_steps`` leaves them,
every resume must start at the newest published checkpoint, and ``checkpoints/`` must hold
at most ``keep_checkpoints`` complete checkpoints and no incomplete or ``*.tmp`` leftovers.

Not in the default suite (``pytest.ini`` deselects ``soak``). Run it with::

    python -m pytest -m soak tests/test_soak.py -q -s

Knobs (environment): ``CODIR_SOAK_STEPS`` (default 3000), ``CODIR_SOAK_KILLS`` (default 9),
``CODIR_SOAK_SEED`` (killer seed, default 1234), ``CODIR_SOAK_REFERENCE=1`` to also run the
same config uninterrupted and require bit-identical weights and bank (doubles the time).
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch

from conftest import REPO, TINY_YAML, free_port

MAX_STEPS = int(os.environ.get("CODIR_SOAK_STEPS", "3000"))
KILLS = int(os.environ.get("CODIR_SOAK_KILLS", "9"))
KILL_SEED = int(os.environ.get("CODIR_SOAK_SEED", "1234"))
REFERENCE = os.environ.get("CODIR_SOAK_REFERENCE", "0") == "1"

N = 200                 # training examples: 25 optimizer steps per epoch, so 120 epochs in 3000 steps
WORLD, MICRO, BATCH = 2, 2, 8
ACCUM = BATCH // (MICRO * WORLD)  # 2
CKPT_EVERY, KEEP = 25, 2
TRAIN_SEED = 7          # training.seed of TINY_YAML
DS = str(REPO / "ds_configs" / "zero2.json")
OVERRIDES = {
    "method.name": "codir", "training.deterministic": "true", "model.dropout": "0.0",
    "data.max_train_examples": str(N), "training.train_batch_size": str(BATCH),
    "training.micro_batch_size": str(MICRO), "training.max_steps": str(MAX_STEPS),
    "training.checkpoint_every": str(CKPT_EVERY), "training.keep_checkpoints": str(KEEP),
    "training.eval_every": "0", "training.fp16_fallback": "fp32",
    "logging.log_every": "100", "logging.progress_bar": "false",
}
SETS = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={v}")]

TEARDOWN_LIMIT_S = 60   # after one rank is SIGKILLed the launcher must end the job within this
LAUNCH_LIMIT_S = 1800   # one launch that is not killed (the last one runs most of the steps)

pytestmark = [pytest.mark.soak, pytest.mark.timeout(4 * 3600)]


# --------------------------------------------------------------------------- checkpoints on disk

STEP_DIR = re.compile(r"^step_(\d{8})$")


def _step_dirs(ckpt_root: Path) -> dict[int, bool]:
    """{step: complete?} for every ``step_XXXXXXXX`` folder (universal conversions excluded)."""
    out = {}
    try:
        entries = list(os.scandir(ckpt_root))
    except FileNotFoundError:
        return out
    for e in entries:
        m = STEP_DIR.match(e.name)
        if m and e.is_dir():
            out[int(m.group(1))] = os.path.isfile(os.path.join(e.path, "COMPLETE"))
    return out


def _latest_step(ckpt_root: Path) -> Optional[int]:
    """The checkpoint ``--resume`` loads: the one named by ``latest`` if complete, else the newest complete."""
    try:
        tag = (ckpt_root / "latest").read_text().strip()
        m = STEP_DIR.match(tag)
        if m and (ckpt_root / tag / "COMPLETE").is_file():
            return int(m.group(1))
    except (FileNotFoundError, OSError):
        pass
    done = [s for s, c in _step_dirs(ckpt_root).items() if c]
    return max(done) if done else None


# --------------------------------------------------------------------------- processes

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """{local rank: pid} of the training processes under the launcher (the shallowest match per rank)."""
    kids = _children_map()
    found: dict[int, int] = {}
    frontier = [launcher_pid]
    while frontier:
        nxt = []
        for p in frontier:
            for c in kids.get(p, []):
                rank = next((int(a.split(b"=", 1)[1]) for a in _cmdline(c) if a.startswith(b"--local_rank=")), None)
                if rank is not None:
                    found.setdefault(rank, c)
                else:
                    nxt.append(c)
        frontier = nxt
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the launcher's pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    lines = [l for l in lines if "FutureWarning" not in l and "return func(*args" not in l]
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------- the killer

@dataclass
class Launch:
    index: int
    how: str                        # fresh / overwrite / resume
    latest_at_launch: Optional[int]
    plan: str = "none"              # startup / training / save / none (last launch)
    plan_detail: str = ""
    rank: Optional[int] = None
    kill_after_s: Optional[float] = None
    latest_before_kill: Optional[int] = None
    saving_at_kill: dict = field(default_factory=dict)   # {step: complete?} of folders newer than latest
    latest_after: Optional[int] = None
    teardown_s: Optional[float] = None
    hung: bool = False
    survivors: list = field(default_factory=list)
    caught: Optional[int] = None    # save kills: the checkpoint seen being saved
    rc: Optional[int] = None
    resumed_at: Optional[int] = None
    wall_s: float = 0.0
    log: Optional[Path] = None

    @property
    def killed(self) -> bool:
        return self.kill_after_s is not None

    @property
    def mid_save(self) -> bool:
        """A save kill that landed before the checkpoint was published (else it finished first)."""
        return self.caught is not None and self.saving_at_kill.get(self.caught) is not None \
            and self.latest_after is not None and self.latest_after < self.caught


def _plan(rng: random.Random, mode: str, index: int, kills: int) -> dict:
    """Kill ``index`` of ``kills``: training and save kills aim at a checkpoint in the index-th slice
    of the run, so the kills are spread over all ``max_steps`` (not bunched at the start)."""
    if mode == "startup":
        return {"mode": mode, "delay": rng.uniform(2.0, 45.0)}
    last = (MAX_STEPS - 1) // CKPT_EVERY - 1          # the last regular checkpoint before the final one
    lo, hi = 1 + index * last // kills, max(1 + index * last // kills, (index + 1) * last // kills)
    target = rng.randint(lo, hi) * CKPT_EVERY
    if mode == "training":
        return {"mode": mode, "target": target, "delay": rng.uniform(0.0, 6.0)}
    return {"mode": mode, "target": target, "delay": rng.uniform(0.0, 0.008)}


def _wait_and_kill(proc: subprocess.Popen, launch: Launch, plan: dict, ckpt_root: Path,
                   rng_rank: int, t0: float) -> None:
    """Wait for the plan's moment, then SIGKILL rank ``rng_rank``; returns early if the launcher exits."""
    start = launch.latest_at_launch if launch.how == "resume" else 0
    start = start or 0
    mode = plan["mode"]
    pids: dict[int, int] = {}
    if mode == "startup":
        launch.plan_detail = f"{plan['delay']:.1f}s after launch"
        while time.monotonic() - t0 < plan["delay"]:
            if proc.poll() is not None:
                return
            time.sleep(0.05)
    else:
        # The planned checkpoint, or the next ones if this launch starts past it (never the final one).
        target = max(plan["target"], start + CKPT_EVERY)
        if target >= MAX_STEPS:
            target = start + CKPT_EVERY
        while (_latest_step(ckpt_root) or 0) < target:
            if proc.poll() is not None:
                return
            time.sleep(0.05)
        pids = _rank_pids(proc.pid)  # now, not at the kill: scanning /proc takes longer than a save
        if mode == "training":
            launch.plan_detail = f"{plan['delay']:.1f}s after checkpoint {target} was published"
            end = time.monotonic() + plan["delay"]
            while time.monotonic() < end:
                if proc.poll() is not None:
                    return
                time.sleep(0.02)
        else:  # save: fire when the next checkpoint folder appears without COMPLETE
            caught = None
            while caught is None:
                if proc.poll() is not None:
                    return
                latest = _latest_step(ckpt_root) or 0
                for s, complete in _step_dirs(ckpt_root).items():
                    if s > latest and not complete:
                        caught = s
                if caught is None:
                    time.sleep(0.001)
            launch.caught = caught
            launch.plan_detail = (f"checkpoint {caught} being saved, the next after {target}, "
                                  f"+{plan['delay'] * 1000:.0f}ms")
            time.sleep(plan["delay"])
    if rng_rank not in pids:
        pids = _rank_pids(proc.pid)
    if rng_rank not in pids:
        # Between processes (e.g. ranks not spawned yet): wait for them, the launcher may be mid start-up.
        deadline = time.monotonic() + 120
        while rng_rank not in pids and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            pids = _rank_pids(proc.pid)
        if rng_rank not in pids:
            return
    launch.latest_before_kill = _latest_step(ckpt_root)
    os.kill(pids[rng_rank], signal.SIGKILL)
    launch.kill_after_s = time.monotonic() - t0
    launch.rank = rng_rank
    latest = launch.latest_before_kill or 0
    launch.saving_at_kill = {s: c for s, c in _step_dirs(ckpt_root).items() if s > latest}
    t_kill = time.monotonic()
    try:
        proc.wait(timeout=TEARDOWN_LIMIT_S)
    except subprocess.TimeoutExpired:
        launch.hung = True
    launch.teardown_s = time.monotonic() - t_kill
    launch.survivors = [p for r, p in pids.items() if r != rng_rank and _alive(p)]


def _launch(cfg: Path, run: Path, how: str, log: Path) -> subprocess.Popen:
    flag = {"fresh": [], "overwrite": ["--overwrite"], "resume": ["--resume"]}[how]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(WORLD), "--master_port",
           str(free_port()), str(REPO / "launchers" / "finetune.py"), "--deepspeed_config", DS, "--config",
           str(cfg), "--output_dir", str(run), *SETS, *flag]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DEEPSPEED_TIMEOUT="2")
    env.pop("CODIR_DS_FAULT", None)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


RESUMED = re.compile(r"resumed from \S*step_(\d{8}) at step (\d+)")


def _summary(launches: list[Launch], total_s: float) -> str:
    def s(x):
        return "-" if x is None else str(x)
    killed = [l for l in launches if l.killed]
    by_mode = {m: sum(l.plan == m for l in killed) for m in ("startup", "training", "save")}
    rows = [f"soak: {MAX_STEPS} steps, {WORLD} ranks, checkpoint every {CKPT_EVERY}, keep {KEEP}, "
            f"{len(killed)} kills ({', '.join(f'{v} {k}' for k, v in by_mode.items())}; "
            f"{sum(l.mid_save for l in killed)} landed inside a save), {len(launches)} launches, {total_s:.0f}s in all"]
    for l in launches:
        row = (f"  #{l.index:<2} {l.how:<9} latest@launch={s(l.latest_at_launch):<5} "
               f"resumed@={s(l.resumed_at):<5} ")
        if l.killed:
            saving = ",".join(f"{k}{'' if c else '(incomplete)'}" for k, c in sorted(l.saving_at_kill.items())) or "-"
            row += (f"KILL rank {l.rank} at {l.kill_after_s:6.1f}s [{l.plan}: {l.plan_detail}] "
                    f"latest before={s(l.latest_before_kill)} newer folders at kill={saving} "
                    f"latest after={s(l.latest_after)} teardown={l.teardown_s:.1f}s{' HUNG' if l.hung else ''}")
            if l.caught is not None:
                row += f" -> {'INSIDE the save' if l.mid_save else 'save had been published first'}"
            if l.survivors:
                row += f" survivors={l.survivors}"
        else:
            row += f"no kill [{l.plan}] latest after={s(l.latest_after)}"
        rows.append(row + f" rc={l.rc} wall={l.wall_s:.0f}s")
    return "\n".join(rows)


# --------------------------------------------------------------------------- expectations

def _expected_positive_counts() -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """How often an uninterrupted run makes each example a positive, and each rank's final (epoch, position)."""
    from codir_ds.data.sampler import GlobalOrderSampler

    counts = torch.zeros(N, dtype=torch.long)
    finals = []
    for rank in range(WORLD):
        sampler = GlobalOrderSampler(N, MICRO, rank, WORLD, TRAIN_SEED, ACCUM)
        left = MAX_STEPS * ACCUM
        while left:
            for ids in sampler:
                counts += torch.bincount(ids, minlength=N)
                left -= 1
                if not left:
                    break
            else:
                sampler.set_epoch(sampler.epoch + 1)
        finals.append((sampler.epoch, sampler.position))
    assert int(counts.sum()) == MAX_STEPS * BATCH
    return counts, finals


def _final_rank_states(run: Path) -> list[dict]:
    tag_dir = run / "checkpoints" / f"step_{MAX_STEPS:08d}"
    files = sorted(tag_dir.glob("codir_rank_*.pt"))
    assert len(files) == WORLD, f"{tag_dir} has {len(files)} rank files, expected {WORLD}: {files}"
    return [torch.load(f, map_location="cpu", weights_only=False) for f in files]


def _bank_by_id(states: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.cat([s["bank"]["ids"] for s in states])
    order = ids.argsort()
    return (ids[order], torch.cat([s["bank"]["rows"] for s in states])[order],
            torch.cat([s["bank"]["updates"] for s in states])[order])


# --------------------------------------------------------------------------- the test

def _run_until_done(cfg: Path, run: Path, logs: Path, kills: int, seed: int, launches: list[Launch]) -> None:
    rng = random.Random(seed)
    modes = [("startup", "training", "save")[i % 3] for i in range(kills)]
    rng.shuffle(modes)
    plans = [(_plan(rng, m, i, kills), rng.randrange(WORLD)) for i, m in enumerate(modes)]
    ckpt_root = run / "checkpoints"
    while not (run / "results.json").is_file():
        i = len(launches)
        assert i < kills + 4, "too many launches without finishing:\n" + _summary(launches, 0)
        latest = _latest_step(ckpt_root)
        how = "resume" if latest is not None else ("fresh" if i == 0 else "overwrite")
        launch = Launch(index=i, how=how, latest_at_launch=latest, log=logs / f"launch_{i:02d}.log")
        launches.append(launch)
        done_kills = sum(l.killed for l in launches)
        plan, rank = plans[done_kills] if done_kills < kills else ({"mode": "none"}, None)
        launch.plan = plan["mode"]
        t0 = time.monotonic()
        proc = _launch(cfg, run, how, launch.log)
        try:
            if rank is not None:
                _wait_and_kill(proc, launch, plan, ckpt_root, rank, t0)
            try:
                launch.rc = proc.wait(timeout=LAUNCH_LIMIT_S)
            except subprocess.TimeoutExpired:
                launch.hung = True
        finally:
            _killpg(proc)  # nothing of this launch survives, whatever happened
            if launch.rc is None:
                launch.rc = proc.returncode
        launch.wall_s = time.monotonic() - t0
        launch.latest_after = _latest_step(ckpt_root)
        m = RESUMED.search(launch.log.read_text(errors="replace"))
        if m:
            launch.resumed_at = int(m.group(2))
        print(_summary([launch], 0).splitlines()[1], flush=True)
        if not launch.killed:
            assert not launch.hung, f"launch #{i} (not killed) ran past {LAUNCH_LIMIT_S}s:\n{_tail(launch.log)}"
            assert launch.rc == 0, (f"launch #{i} ({how}, not killed) failed with exit {launch.rc}: a resume or "
                                    f"training failure after an earlier kill\n{_tail(launch.log)}")


def test_soak_random_kills_lose_and_repeat_no_step(tmp_path, tiny_teacher):
    cfg = tmp_path / "soak.yaml"
    cfg.write_text(TINY_YAML.format(teacher=tiny_teacher))
    run, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    launches: list[Launch] = []
    t_start = time.monotonic()
    try:
        _run_until_done(cfg, run, logs, KILLS, KILL_SEED, launches)
    finally:
        print(_summary(launches, time.monotonic() - t_start), flush=True)
    killed = [l for l in launches if l.killed]

    # --- the job was torn down after every kill, and every resume started at the newest checkpoint
    hung = [l for l in killed if l.hung or l.survivors]
    assert not hung, "the launcher did not end the job within {}s of a rank's SIGKILL: {}\n{}".format(
        TEARDOWN_LIMIT_S, [(l.index, l.survivors) for l in hung], "\n\n".join(_tail(l.log, 30) for l in hung))
    for l in killed:
        assert l.rc != 0, f"launch #{l.index}: a rank was SIGKILLed but the job exited 0:\n{_tail(l.log)}"
    for l in launches:
        if l.how == "resume" and l.resumed_at is not None:
            assert l.resumed_at == l.latest_at_launch, (
                f"launch #{l.index} resumed at step {l.resumed_at}, but the newest published checkpoint was "
                f"{l.latest_at_launch}:\n{_tail(l.log)}")
    assert len(killed) == KILLS, (f"the run finished after {len(killed)} of {KILLS} planned kills: raise "
                                  f"CODIR_SOAK_STEPS")

    # --- the run finished exactly at max_steps
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == MAX_STEPS, f"results.json says {results['steps']} steps, expected {MAX_STEPS}"

    # --- checkpoints/: at most keep_checkpoints complete ones, no half-written folder or *.tmp left
    ckpt_root = run / "checkpoints"
    dirs = _step_dirs(ckpt_root)
    assert _latest_step(ckpt_root) == MAX_STEPS, f"latest checkpoint is {_latest_step(ckpt_root)}, not {MAX_STEPS}"
    assert all(dirs.values()), f"incomplete checkpoint folders left: {sorted(s for s, c in dirs.items() if not c)}"
    assert len(dirs) <= KEEP, f"{len(dirs)} complete checkpoints on disk ({sorted(dirs)}), keep_checkpoints={KEEP}"
    others = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir() and not STEP_DIR.match(p.name))
    assert not others, f"unexpected folders in checkpoints/ (no universal conversion expected): {others}"
    tmps = sorted(str(p.relative_to(run)) for p in run.rglob("*.tmp"))
    assert not tmps, f"*.tmp leftovers in the run directory: {tmps}"

    # --- the bank: one unit-norm row per example, each updated exactly as often as without kills
    states = _final_rank_states(run)
    for r, st in enumerate(states):
        assert st["rank"] == r and st["world_size"] == WORLD
        assert bool((st["bank"]["ids"] % WORLD == r).all()), f"rank {r}'s bank shard holds ids it does not own"
    ids, rows, updates = _bank_by_id(states)
    assert torch.equal(ids, torch.arange(N)), (
        f"bank ids are not 0..{N - 1} exactly once: {ids.numel()} rows, "
        f"{int(torch.unique(ids).numel())} distinct, missing {sorted(set(range(N)) - set(ids.tolist()))[:20]}")
    norms = rows.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4), f"bank rows not unit norm: {norms.min()}..{norms.max()}"
    expected, finals = _expected_positive_counts()
    bad = (updates != expected).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} of {N} examples have a momentum-update count different from an uninterrupted run's "
        f"(more = a repeated step, fewer = a lost step); total {int(updates.sum())} vs {int(expected.sum())}; "
        f"first ones (id: got/expected): "
        + ", ".join(f"{i}: {int(updates[i])}/{int(expected[i])}" for i in bad[:20].tolist()))
    for r, st in enumerate(states):
        got = (int(st["sampler"]["epoch"]), int(st["sampler"]["position"]))
        assert got == finals[r], f"rank {r}'s sampler ended at (epoch, position) {got}, expected {finals[r]}"

    if REFERENCE:
        _compare_with_uninterrupted(cfg, tmp_path / "reference", logs, run, states)


def _compare_with_uninterrupted(cfg: Path, ref: Path, logs: Path, run: Path, states: list[dict]) -> None:
    """Optional (CODIR_SOAK_REFERENCE=1): the same config without kills gives bit-identical weights and bank."""
    from safetensors.torch import load_file

    launches: list[Launch] = []
    print("reference run (same config, no kills):", flush=True)
    (logs / "reference").mkdir()
    _run_until_done(cfg, ref, logs / "reference", 0, 0, launches)
    ref_states = _final_rank_states(ref)
    _, rows, upd = _bank_by_id(states)
    _, ref_rows, ref_upd = _bank_by_id(ref_states)
    assert torch.equal(upd, ref_upd), "bank update counts differ from the uninterrupted run"
    assert torch.equal(rows, ref_rows), f"bank rows differ from the uninterrupted run (max |diff| " \
                                        f"{float((rows - ref_rows).abs().max()):.3g})"
    wa, wb = load_file(run / "export" / "model.safetensors"), load_file(ref / "export" / "model.safetensors")
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert wa.keys() == wb.keys() and not diff, f"exported weights differ from the uninterrupted run: {diff[:10]}"

"""codir-ds's per-rank checkpoint files hold plain data and load with ``torch.load(weights_only=True)``.

A ``codir_rank_*.pt`` planted in a run directory must not run code on a rank that resumes:
it is refused with one line naming the file and the fix, before anything is started, and is
never unpickled. Real files, written by a real (tiny) run, load and resume RNGs exactly.
"""
from __future__ import annotations

import pathlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# The damaged-checkpoint tests' helpers: a real stopped run (module-scoped), its copies, resume, tripwires.
from test_bad_inputs import _copy, _resume, guarded, refused, snapshot, stopped_run  # noqa: F401 (fixtures)
from codir_ds.engine.checkpointing import store

PLAIN = (torch.Tensor, bool, int, float, str, type(None))


# --------------------------------------------------------------------------- helpers

def leaves(obj, where="state"):
    """``(path, value)`` of every non-container value in ``obj``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{where}[{i}]")
    else:
        yield where, obj


class Planted:
    """What an attacker would plant: unpickling it calls a function (here a harmless ``Path.touch``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


# --------------------------------------------------------------------------- (a) real files

def test_a_real_rank_file_is_plain_data_and_loads_with_weights_only(stopped_run):
    tag_dir = stopped_run[2] / "checkpoints" / "step_00000004"
    assert store._unsafe_globals(store.rank_file(tag_dir, 0)) == []
    state = torch.load(store.rank_file(tag_dir, 0), map_location="cpu", weights_only=True)
    assert set(state) == {"world_size", "rank", "sampler", "rng", "bank", "extras"}
    odd = [(where, type(v).__name__) for where, v in leaves(state) if not isinstance(v, PLAIN)]
    assert not odd, odd
    kind, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    assert kind == "MT19937" and keys.dtype == torch.int64 and keys.shape == (624,)
    assert store.load_rank_states(tag_dir, 1)[0]["world_size"] == 1


def test_a_resume_restores_every_rng_exactly(stopped_run, tmp_path, single_process_env, monkeypatch):
    import codir_ds.engine.checkpointing.resume as resume_mod
    run = _copy(stopped_run, tmp_path)
    saved = torch.load(store.rank_file(run / "checkpoints" / "step_00000004", 0), weights_only=True)["rng"]
    seen = {}

    def spy(state):
        store.set_rng_state(state)
        seen.update(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state())

    monkeypatch.setattr(resume_mod, "set_rng_state", spy)
    assert _resume(stopped_run, run)()["steps"] == 6
    assert torch.equal(seen["torch"], saved["torch"])
    assert seen["python"] == tuple(saved["python"])
    kind, keys, pos, has_gauss, cached = seen["numpy"]
    assert (kind, pos, has_gauss, cached) == (saved["numpy"][0], *saved["numpy"][2:])
    assert keys.dtype == np.uint32 and np.array_equal(keys, saved["numpy"][1].numpy())
    # the resumed run's own checkpoint is plain data too
    assert torch.load(store.rank_file(run / "checkpoints" / "step_00000006", 0), weights_only=True)["rank"] == 0


# --------------------------------------------------------------------------- (b) planted files

def test_b_planted_payload_is_live_when_fully_unpickled(tmp_path):
    """The control: the payload the next tests plant does run when unpickled without weights_only."""
    marker = tmp_path / "ran"
    torch.save(Planted(marker), tmp_path / "planted.pt")
    torch.load(tmp_path / "planted.pt", weights_only=False)
    assert marker.exists()


def test_b_planted_rank_file_is_refused_before_the_engine(stopped_run, tmp_path, guarded):
    run = _copy(stopped_run, tmp_path)
    tag = run / "checkpoints" / "step_00000004"
    target = store.rank_file(tag, 0)
    marker = tmp_path / "code_ran"
    torch.save({"world_size": 1, "rank": 0, "sampler": Planted(marker)}, target)
    before = snapshot(run)
    refused(_resume(stopped_run, run), str(target), "other than a codir-ds checkpoint's plain data",
            "could run code", "trusted codir-ds run", f"delete '{tag}'", "step_00000002")
    assert not marker.exists(), "the planted file was unpickled"
    assert snapshot(run) == before


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "torch_without_scan"])
def test_b_load_rank_states_refuses_a_planted_file(tmp_path, monkeypatch, scan):
    """At load too (weights_only=True), also where torch cannot scan a checkpoint's globals."""
    if not scan:
        monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint")
    tag = tmp_path / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    torch.save(Planted(marker), store.rank_file(tag, 0))
    refused(lambda: store.load_rank_states(tag, 1), str(store.rank_file(tag, 0)), "plain data", "could run code",
            "no earlier checkpoint is left", "--overwrite")
    assert not marker.exists()


def test_b_checkpoint_of_an_earlier_version_is_refused_with_its_fix(tmp_path):
    """Earlier versions pickled the NumPy RNG state (an ndarray): refused, never unpickled, with a fix."""
    tag = tmp_path / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    old = {"world_size": 1, "rank": 0, "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                               "numpy": np.random.get_state(), "cuda": None}}
    torch.save(old, store.rank_file(tag, 0))
    for call in (lambda: store.check_rank_files(tag), lambda: store.load_rank_states(tag, 1)):
        refused(call, str(store.rank_file(tag, 0)), "NumPy", "weights_only=True", "earlier codir-ds version",
                "--overwrite")


def test_b_truncated_file_keeps_its_own_message(tmp_path):
    tag = tmp_path / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    torch.save({"world_size": 1, "rank": 0}, store.rank_file(tag, 0))
    data = store.rank_file(tag, 0).read_bytes()
    store.rank_file(tag, 0).write_bytes(data[: len(data) // 2])
    refused(lambda: store.load_rank_states(tag, 1), "truncated or corrupted")


# --------------------------------------------------------------------------- (c) units

def test_c_rng_state_round_trips_through_weights_only(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.standard_normal()  # a cached Gaussian in the NumPy state
    state = store.rng_state()
    expected = (torch.rand(3), random.random(), np.random.standard_normal(2), np.random.randint(0, 1 << 30, 4))
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", map_location="cpu", weights_only=True)
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    store.set_rng_state(loaded)
    again = (torch.rand(3), random.random(), np.random.standard_normal(2), np.random.randint(0, 1 << 30, 4))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    assert np.array_equal(expected[2], again[2]) and np.array_equal(expected[3], again[3])


def test_c_plain_data_converts_numpy_and_refuses_objects(tmp_path):
    state = store.plain_data({"n": np.int64(3), "x": np.float32(0.5), "a": np.arange(4, dtype=np.uint32),
                              "t": (torch.ones(2), [np.bool_(True)]), np.int64(1): "key"})
    assert state["n"] == 3 and type(state["n"]) is int and type(state["x"]) is float
    assert torch.equal(state["a"], torch.arange(4)) and state["t"][1] == [True] and state[1] == "key"
    torch.save(state, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["n"] == 3
    with pytest.raises(TypeError, match=r"rank state\['extras'\]\['ema'\] is a .*Planted"):
        store.plain_data({"extras": {"ema": Planted(tmp_path / "x")}})

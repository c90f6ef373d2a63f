"""bench/parity.py's comparison: exact, nested, volatile fields aside."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import REPO

_spec = importlib.util.spec_from_file_location("bench_parity", REPO / "bench" / "parity.py")
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)


def test_differences_are_exact_and_nested():
    a = {"final": {"accuracy": 0.5}, "bank": torch.tensor([1.0, float("nan")]), "h": [1, 2], "sampler": {"epoch": 1}}
    assert parity.differences(a, {**a, "bank": a["bank"].clone()}) == []          # NaN equals NaN
    b = {**a, "final": {"accuracy": 0.5 + 1e-12}, "bank": torch.tensor([1.0, 2.0]), "h": [1, 2, 3], "x": 1}
    assert parity.differences(a, b) == ["x", "bank", "final.accuracy", "h (length 2 vs 3)"]
    assert parity.differences(torch.tensor([1, 2]), torch.tensor([1, 2], dtype=torch.int32)) == ["<value>"]


def test_clean_drops_timings_and_the_run_directory():
    results = {"train_seconds_this_session": 3.2, "samples_per_second": 9.0, "export_dir": "/w/after/run/export",
               "final": {"accuracy": 0.7}, "note": "saved in /w/after/run/checkpoints"}
    assert parity.clean(results, "/w/after/run") == {"final": {"accuracy": 0.7},
                                                     "note": "saved in <run>/checkpoints"}


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parity.parse_args(["--before", str(tmp_path), "--teacher", str(tmp_path)])
    assert "is not a codir-ds checkout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parity.parse_args(["--before", str(REPO), "--teacher", str(tmp_path), "--runs", "fine_codir,nope"])
    assert "holds no model" in capsys.readouterr().err

"""bench/crd_gradients.py: the probe records both terms' gradients at every hidden state and leaves the
training it watches unchanged (same final metrics as the plain run)."""
from __future__ import annotations

import importlib.util
import json

from conftest import REPO

from codir_ds.config import load_config

_spec = importlib.util.spec_from_file_location("bench_crd_gradients", REPO / "bench" / "crd_gradients.py")
crd_gradients = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crd_gradients)

DS = str(REPO / "ds_configs" / "zero2.json")


def test_probe_records_gradients_and_does_not_change_the_run(tmp_path, tiny_config, single_process_env):
    from codir_ds.recipes import run_finetune
    sets = ["training.checkpoint_every=0"]
    plain = run_finetune(load_config(str(tiny_config), sets), DS, str(tmp_path / "plain"))
    out = tmp_path / "probe.json"
    code = crd_gradients.main(["--config", str(tiny_config), "--set", sets[0], "--every", "2",
                               "--deepspeed_config", DS, "--output_dir", str(tmp_path / "probed"), "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["final"] == plain["final"]
    assert [r["step"] for r in data["probe"]] == list(range(0, plain["steps"], 2))
    n_layers = load_config(str(tiny_config)).model.student_layers
    for r in data["probe"]:
        assert len(r["layers"]) == n_layers + 1  # the embedding output and every layer's output
        assert all(x["supervised_grad_norm"] > 0 and x["crd_grad_norm"] > 0 for x in r["layers"])
        assert all(-1.0 <= x["cosine"] <= 1.0 for x in r["layers"])
        assert r["student_norm"] > 0


def test_probe_refuses_a_method_without_crd(tmp_path, tiny_config):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "crd_gradients.py"), "--config", str(tiny_config),
                           "--set", "method.name=kd", "--output_dir", str(tmp_path / "run"), "--out",
                           str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: method.name is kd: the probe measures codir's CRD term"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run").exists()


def test_until_stops_after_the_probed_step_with_the_whole_runs_schedule(tmp_path, tiny_config, single_process_env):
    """--until N probes the first steps as the whole run has them and ends the run there; the records are the
    full probe's first ones (same schedule, so same gradients), and the JSON says where it stopped."""
    sets = ["training.checkpoint_every=0", "training.max_steps=6"]
    full, part = tmp_path / "full.json", tmp_path / "part.json"
    common = ["--config", str(tiny_config), "--set", sets[0], "--set", sets[1], "--every", "1", "--deepspeed_config",
              DS]
    assert crd_gradients.main([*common, "--output_dir", str(tmp_path / "a"), "--out", str(full)]) == 0
    assert crd_gradients.main([*common, "--until", "2", "--output_dir", str(tmp_path / "b"), "--out",
                               str(part)]) == 0
    f, p = json.loads(full.read_text()), json.loads(part.read_text())
    assert [r["step"] for r in p["probe"]] == [0, 1, 2] and p["stopped_after_step"] == 2 and p["final"] is None
    assert p["total_steps"] == f["total_steps"] == 6
    for a, b in zip(p["probe"], f["probe"][:3]):
        assert a["layers"] == b["layers"] and a["student_norm"] == b["student_norm"]

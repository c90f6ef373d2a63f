"""CTCD (co-training and co-distillation): the loss terms, detached soft targets, both engines training,
the finetune and pretrain launchers on 2 CPU ranks, resume (same and another number of ranks), export of
both models, and the one-way variant with a frozen teacher."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_TRAINING_YAML, deepspeed_launch

DS = str(REPO / "ds_configs" / "zero2.json")

CTCD_YAML = """
name: tiny_ctcd
model:
  tokenizer: all-MiniLM-L6-v2
  student_layers: 1
  student_hidden: 32
  student_heads: 2
  student_intermediate: 64
  dropout: 0.0
data:
  task: movie_snippets
  max_train_examples: 64
  max_eval_examples: 24
  max_length: 24
method:
  name: ctcd
  ctcd_large_layers: 2
  ctcd_large_hidden: 48
  ctcd_large_heads: 2
  alpha_small_to_large: 0.5
  alpha_large_to_small: 0.7
""" + TINY_TRAINING_YAML

PRE_CTCD_YAML = """
name: tiny_pre_ctcd
model:
  tokenizer: all-MiniLM-L6-v2
  student_layers: 1
  student_hidden: 32
  student_heads: 2
  student_intermediate: 64
  dropout: 0.0
corpus:
  sources: [{corpus}]
  block_size: 32
  validation_blocks: 16
  cache_dir: {cache}
method:
  name: ctcd
  ctcd_large_layers: 2
  ctcd_large_hidden: 48
  ctcd_large_heads: 2
""" + TINY_TRAINING_YAML

# Resume / world-size runs: world-size-invariant sampling, every step logged, a checkpoint mid-run.
EXACT = ["--set", "training.deterministic=true", "--set", "logging.log_every=1", "--set", "training.checkpoint_every=3"]


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


def _scalars(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    return {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}


def _final_weights(run: Path) -> tuple[dict, dict]:
    """Both models' fp32 weights in the run's newest checkpoint (ZeRO partitions merged)."""
    from codir_ds.engine import checkpointing as ckpt
    from codir_ds.engine.export_checkpoint import read_student_state
    root = run / "checkpoints"
    tag = ckpt.latest_tag(root)
    return read_student_state(root, tag), read_student_state(root / tag, "large")


def _tiny_model(seed: int, hidden: int, num_labels: int, masked_lm: bool = False):
    from codir_ds.assets import minilm_dir
    from codir_ds.models.loading import build_student, load_tokenizer
    torch.manual_seed(seed)
    cfg = SimpleNamespace(init_from=None, student_init=None, student_init_layers=None, student_layers=1,
                          student_hidden=hidden, student_heads=2, student_intermediate=2 * hidden, dropout=0.0)
    return build_student(cfg, num_labels=num_labels, is_regression=num_labels == 1,
                         tokenizer=load_tokenizer(minilm_dir()), masked_lm=masked_lm)


def _method(**kw):
    from codir_ds.config import MethodConfig
    return MethodConfig(name="ctcd", **kw)


def _ctcd(stage: str, **kw):
    """The ctcd method for ``stage`` with method options ``kw``."""
    from codir_ds.distill.methods import get_method
    return get_method("ctcd")(_method(**kw), stage)


def _batch(labels, stage: str = "finetune", is_regression: bool = False, token_scale=None):
    from codir_ds.distill.methods import LossInputs
    return LossInputs(labels, pretraining=stage == "pretrain", is_regression=is_regression, token_scale=token_scale)


# ------------------------------------------------------------------------------------------- unit tests

def test_mutual_kd_terms_equal_hand_computed_values():
    large = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    small = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    labels = torch.tensor([0, 2])
    T = 2.0

    def log_softmax(row, t):
        z = [v / t for v in row]
        lse = math.log(sum(math.exp(v) for v in z))
        return [v - lse for v in z]

    def kl(target_rows, rows):  # mean over rows of KL(softmax(target/T) || softmax(rows/T)), times T^2
        total = 0.0
        for zt, zs in zip(target_rows, rows):
            lt, ls = log_softmax(zt, T), log_softmax(zs, T)
            total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
        return T * T * total / len(rows)

    def ce(rows):
        return -sum(log_softmax(r, 1.0)[y] for r, y in zip(rows, labels.tolist())) / len(rows)

    L, S = large.tolist(), small.tolist()
    co = _ctcd("finetune", alpha_small_to_large=0.3, alpha_large_to_small=0.8, kd_temperature=T)
    loss_large, loss_small, terms = co.co_loss(large, small, _batch(labels))
    assert terms["loss/large_kd"].item() == pytest.approx(kl(S, L), rel=1e-5)   # small -> large
    assert terms["loss/small_kd"].item() == pytest.approx(kl(L, S), rel=1e-5)   # large -> small
    assert terms["loss/large_task"].item() == pytest.approx(ce(L), rel=1e-5)
    assert loss_large.item() == pytest.approx(ce(L) + 0.3 * kl(S, L), rel=1e-5)
    assert loss_small.item() == pytest.approx(ce(S) + 0.8 * kl(L, S), rel=1e-5)
    assert terms["loss/total"].item() == pytest.approx(loss_large.item() + loss_small.item(), rel=1e-6)

    # Without the rho^2 factor; and regression: the MSE between the two predictions.
    co = _ctcd("finetune", kd_temperature=T, kd_t2_scale=False)
    assert co.co_loss(large, small, _batch(labels))[2]["loss/small_kd"].item() == \
        pytest.approx(kl(L, S) / (T * T), rel=1e-5)
    co = _ctcd("finetune", alpha_small_to_large=1.0, alpha_large_to_small=1.0)
    pred_l, pred_s, target = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]]), torch.tensor([0.0, 2.0])
    l_large, l_small, terms = co.co_loss(pred_l, pred_s, _batch(target, is_regression=True))
    assert terms["loss/small_kd"].item() == pytest.approx((1.0 + 4.0) / 2)
    assert l_large.item() == pytest.approx((1.0 + 1.0) / 2 + (1.0 + 4.0) / 2)
    # Pre-training: masked-position vocabulary logits; the global-batch token scale multiplies task and KD.
    co = _ctcd("pretrain", alpha_small_to_large=0.3, alpha_large_to_small=0.8, kd_temperature=T)
    _, l_small, terms = co.co_loss(large, small, _batch(labels, "pretrain", token_scale=torch.tensor(1.5)))
    assert l_small.item() == pytest.approx(1.5 * (ce(S) + 0.8 * kl(L, S)), rel=1e-5)


def test_one_way_teacher_distils_into_both_with_alpha_kd():
    """ctcd_one_way: both models distil from the teacher's logits with alpha_kd each, not from each other."""
    from codir_ds.distill.losses import kd_loss
    from codir_ds.errors import CodirError

    large = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    small = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    teacher = torch.tensor([[1.0, 1.0, -2.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 2])
    co = _ctcd("finetune", ctcd_one_way=True, alpha_kd=0.4, alpha_small_to_large=0.9, alpha_large_to_small=0.9,
               kd_temperature=2.0)
    assert co.teacher.logits and co.second_model.one_way
    assert (co.alpha_large, co.alpha_small) == (0.4, 0.4)
    loss_large, loss_small, terms = co.co_loss(large, small, _batch(labels), teacher_logits=teacher)
    kd_l, kd_s = 4.0 * kd_loss(large, teacher, 2.0), 4.0 * kd_loss(small, teacher, 2.0)
    torch.testing.assert_close(terms["loss/large_kd"], kd_l)
    torch.testing.assert_close(terms["loss/small_kd"], kd_s)
    torch.testing.assert_close(loss_large, torch.nn.functional.cross_entropy(large, labels) + 0.4 * kd_l)
    torch.testing.assert_close(loss_small, torch.nn.functional.cross_entropy(small, labels) + 0.4 * kd_s)
    # One-way with alpha_kd = 0: the teacher is required by the config but never loaded: no KD term.
    co = _ctcd("finetune", ctcd_one_way=True, alpha_kd=0.0)
    assert co.teacher is not None and not co.teacher.logits
    loss_large, _, terms = co.co_loss(large, small, _batch(labels), teacher_logits=None)
    assert terms["loss/large_kd"].item() == 0.0 and terms["loss/small_kd"].item() == 0.0
    torch.testing.assert_close(loss_large, torch.nn.functional.cross_entropy(large, labels))
    # Mutual (default): no teacher at all; the single-model loss() is refused.
    co = _ctcd("finetune")
    assert co.teacher is None and co.second_model is not None
    with pytest.raises(CodirError, match="co_loss"):
        co.loss(None, None, _batch(labels))


@pytest.mark.parametrize("kind", ["classification", "regression", "mlm"])
def test_soft_targets_are_detached(kind):
    """L_small gives no gradient to the larger model's parameters, and L_large none to the smaller's."""
    from codir_ds.models.mlm import gather_rows, mlm_parts

    mlm = kind == "mlm"
    labels_n = 1 if kind == "regression" else 2
    large = _tiny_model(0, 48, labels_n, masked_lm=mlm)
    small = _tiny_model(1, 32, labels_n, masked_lm=mlm)
    ids = torch.randint(1000, 2000, (3, 10))
    mask = torch.ones_like(ids)
    if mlm:
        rows = torch.tensor([1, 4, 12, 25])
        logits = []
        for m in (large, small):
            body, head = mlm_parts(m)
            logits.append(head(gather_rows(body(input_ids=ids, attention_mask=mask).last_hidden_state, rows)))
        labels = torch.randint(1000, 2000, (4,))
    else:
        logits = [m(input_ids=ids, attention_mask=mask).logits for m in (large, small)]
        labels = torch.tensor([0.5, -1.0, 2.0]) if kind == "regression" else torch.tensor([0, 1, 1])
    stage = "pretrain" if mlm else "finetune"
    co = _ctcd(stage, alpha_small_to_large=0.5, alpha_large_to_small=0.5)
    loss_large, loss_small, terms = co.co_loss(logits[0], logits[1],
                                               _batch(labels, stage, is_regression=kind == "regression"))
    assert terms["loss/large_kd"] > 0 and terms["loss/small_kd"] > 0
    for loss, own, other in ((loss_small, small, large), (loss_large, large, small)):
        to_other = torch.autograd.grad(loss, list(other.parameters()), retain_graph=True, allow_unused=True)
        assert all(g is None for g in to_other)
        to_own = torch.autograd.grad(loss, list(own.parameters()), retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in to_own)


def test_one_cotraining_step_updates_both_models_in_their_own_engines(tmp_path, single_process_env):
    from codir_ds.config import load_config
    from codir_ds.recipes import CoTrainRecipe

    cfg_path = tmp_path / "ctcd.yaml"
    cfg_path.write_text(CTCD_YAML)
    recipe = CoTrainRecipe(load_config(str(cfg_path), ["training.max_steps=1"]), DS, str(tmp_path / "run"), "finetune")
    recipe.setup()
    small, large = recipe.module, recipe.module_large
    small_ptrs = {p.data_ptr() for p in small.parameters()}
    assert not any(p.data_ptr() in small_ptrs for p in large.parameters())
    assert recipe.engine is not recipe.engine_large
    assert recipe.optimizer is not recipe.optimizer_large

    def weights():
        return ({k: v.detach().clone() for k, v in small.student.state_dict().items()},
                {k: v.detach().clone() for k, v in large.student.state_dict().items()})

    before_all = weights()
    results = recipe.train()
    assert results["steps"] == 1
    for before, after in zip(before_all, weights()):
        moved = [k for k in before if not torch.equal(before[k], after[k])]
        assert "classifier.weight" in moved and any("encoder.layer.0" in k for k in moved)
        assert len(moved) > len(before) // 2
    terms = _scalars(tmp_path / "run")
    for tag in ("loss/large_task", "loss/small_task", "loss/large_kd", "loss/small_kd", "loss/total",
                "eval/accuracy", "eval/large_accuracy"):
        assert tag in terms, tag


def test_one_way_variant_teacher_distils_into_both_and_stays_frozen(tmp_path, tiny_teacher, single_process_env):
    from codir_ds.config import load_config
    from codir_ds.recipes import CoTrainRecipe

    cfg_path = tmp_path / "ctcd.yaml"
    cfg_path.write_text(CTCD_YAML)

    def check_frozen(teacher):
        assert teacher is not None and not teacher.training
        assert all(not p.requires_grad for p in teacher.parameters())
        teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
        for opt in (recipe.optimizer, recipe.optimizer_large):
            optimized = [p for g in opt.optimizer.param_groups for p in g["params"]]
            optimized += [p for g in getattr(opt, "bit16_groups", []) for p in g]
            assert optimized and not any(p.data_ptr() in teacher_ptrs for p in optimized)
        return {k: v.clone() for k, v in teacher.state_dict().items()}

    cfg = load_config(str(cfg_path), ["method.ctcd_one_way=true", f"model.teacher={tiny_teacher}",
                                      "method.alpha_kd=0.5", "training.max_steps=2"])
    recipe = CoTrainRecipe(cfg, DS, str(tmp_path / "run"), "finetune")
    recipe.setup()
    before = check_frozen(recipe.teacher)
    results = recipe.train()
    after = check_frozen(recipe.teacher)
    assert results["steps"] == 2 and results["ctcd"]["one_way"]
    for k in before:
        assert torch.equal(before[k], after[k]), k
    terms = _scalars(tmp_path / "run")
    assert terms["loss/large_kd"][2] > 0 and terms["loss/small_kd"][2] > 0
    assert (tmp_path / "run" / "export_large" / "config.json").is_file()


# ------------------------------------------------------------------------------ end to end, 2 CPU ranks

@pytest.fixture(scope="module")
def ctcd_runs(tmp_path_factory):
    """An uninterrupted 6-step run and one stopped after step 3 (plus a copy of it), on 2 ranks, fp32, deterministic."""
    root = tmp_path_factory.mktemp("ctcd")
    cfg = root / "ctcd.yaml"
    cfg.write_text(CTCD_YAML)
    args = ["--deepspeed_config", DS, "--config", str(cfg), *EXACT]
    full, stopped = root / "full", root / "stopped"
    _ok(deepspeed_launch("launchers/finetune.py", 2, args + ["--output_dir", str(full)]))
    proc = deepspeed_launch("launchers/finetune.py", 2, args + ["--output_dir", str(stopped),
                                                                "--set", "training.stop_at_step=3"])
    _ok(proc)
    assert "stopped at step 3" in proc.stdout and not (stopped / "results.json").exists()
    shutil.copytree(stopped, root / "stopped_copy")
    return SimpleNamespace(cfg=cfg, args=args, full=full, stopped=stopped, stopped_copy=root / "stopped_copy")


def test_ctcd_finetune_two_ranks_results_and_both_exports(ctcd_runs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from codir_ds.engine.export_checkpoint import export_from_checkpoint

    full = ctcd_runs.full
    results = json.loads((full / "results.json").read_text())
    assert results["method"] == "ctcd" and results["world_size"] == 2 and results["steps"] == 6
    for key in ("task", "seed", "final", "best", "history", "main_metric", "export_dir", "samples_per_second"):
        assert key in results, key
    assert set(results["final"]) == {"accuracy", "f1"} and set(results["large"]["final"]) == {"accuracy", "f1"}
    assert results["large"]["best"] in [{"step": h["step"], **{k: v for k, v in h.items() if k != "step"}}
                                        for h in results["large"]["history"]]
    assert results["large"]["num_parameters"] > results["num_parameters"]

    tok = AutoTokenizer.from_pretrained(full / "export")
    inputs = tok(["a fine film"], return_tensors="pt")
    small = AutoModelForSequenceClassification.from_pretrained(full / "export")
    large = AutoModelForSequenceClassification.from_pretrained(full / "export_large")
    assert small.config.num_hidden_layers == 1 and large.config.num_hidden_layers == 2
    assert small(**inputs).logits.shape == large(**inputs).logits.shape == (1, 2)
    for d, role in ((full / "export", "small"), (full / "export_large", "large")):
        manifest = json.loads((d / "codir_export.json").read_text())
        assert manifest["method"] == "ctcd" and manifest["ctcd_model"] == role and len(manifest["sha256"]) == 64

    # One checkpoint folder holds both engines; launchers/export.py exports either model from it.
    tag_dir = full / "checkpoints" / "step_00000006"
    assert (tag_dir / "COMPLETE").is_file() and (tag_dir / "large" / "mp_rank_00_model_states.pt").is_file()
    assert len(list(tag_dir.glob("codir_rank_*.pt"))) == 2
    small_w, large_w = _final_weights(full)
    out = export_from_checkpoint(full, large=True)
    assert out.name == "export_step_00000006_large"
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == large_w.keys() and all(torch.equal(exported[k], large_w[k]) for k in exported)
    assert AutoModelForSequenceClassification.from_pretrained(out).config.hidden_size == 48
    assert export_from_checkpoint(full).name == "export_step_00000006"

    tags = _scalars(full)
    for tag in ("loss/large_task", "loss/small_task", "loss/large_kd", "loss/small_kd", "loss/total", "train/lr",
                "eval/accuracy", "eval/large_accuracy"):
        assert tag in tags, tag
    total = tags["loss/total"]
    assert sorted(total) == list(range(1, 7))
    for s in total:
        parts = (tags["loss/large_task"][s] + 0.5 * tags["loss/large_kd"][s] + tags["loss/small_task"][s]
                 + 0.7 * tags["loss/small_kd"][s])
        assert total[s] == pytest.approx(parts, rel=1e-5)


def test_ctcd_resume_equals_uninterrupted_run(ctcd_runs):
    """Stopped after step 3 and resumed on 2 ranks: both models bit-identical to the uninterrupted run."""
    full, stopped = ctcd_runs.full, ctcd_runs.stopped
    proc = deepspeed_launch("launchers/finetune.py", 2, ctcd_runs.args + ["--output_dir", str(stopped), "--resume"])
    _ok(proc)
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    (a_small, a_large), (b_small, b_large) = _final_weights(full), _final_weights(stopped)
    for a, b in ((a_small, b_small), (a_large, b_large)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, stopped))
    assert ra["final"] == rb["final"] and ra["large"]["final"] == rb["large"]["final"]
    assert ra["history"] == rb["history"] and ra["large"]["history"] == rb["large"]["history"]
    assert _scalars(full)["loss/total"] == _scalars(stopped)["loss/total"]


def test_ctcd_resume_on_another_number_of_ranks_converts_both_engines(ctcd_runs, single_process_env, capsys):
    """The 2-rank checkpoint resumed on 1 rank: both engines through DeepSpeed's universal checkpoint."""
    from codir_ds.config import load_config
    from codir_ds.recipes import run_finetune

    run = ctcd_runs.stopped_copy
    cfg = load_config(str(ctcd_runs.cfg), [a for a in EXACT if a != "--set"])
    results = run_finetune(cfg, DS, str(run), resume=True)
    out = capsys.readouterr().out
    assert "universal format" in out and "re-sharded to 1" in out and results["steps"] == 6
    assert (run / "checkpoints" / "step_00000003_universal" / "large_universal" / "COMPLETE").is_file()
    (a_small, a_large), (c_small, c_large) = _final_weights(ctcd_runs.full), _final_weights(run)
    for a, c in ((a_small, c_small), (a_large, c_large)):
        assert a.keys() == c.keys()
        for k in a:
            assert torch.allclose(a[k], c[k], atol=1e-5, rtol=1e-4), k
    sa, sc = _scalars(ctcd_runs.full)["loss/total"], _scalars(run)["loss/total"]
    assert sorted(sc) == list(range(1, 7)) and all(sc[s] == pytest.approx(sa[s], rel=1e-4) for s in sa)


def test_ctcd_pretrain_two_ranks_exports_both_masked_lms(tmp_path, corpus_file):
    from transformers import AutoModelForMaskedLM

    cfg = tmp_path / "pre.yaml"
    cfg.write_text(PRE_CTCD_YAML.format(corpus=corpus_file, cache=tmp_path / "cache"))
    run = tmp_path / "run"
    _ok(deepspeed_launch("launchers/pretrain.py", 2, ["--deepspeed_config", DS, "--config", str(cfg),
                                                      "--output_dir", str(run), "--set", "training.max_steps=3",
                                                      "--set", "logging.log_every=1"]))
    results = json.loads((run / "results.json").read_text())
    assert results["stage"] == "pretrain" and results["method"] == "ctcd" and results["steps"] == 3
    for r in (results["final"], results["large"]["final"]):
        assert set(r) >= {"mlm_loss", "mlm_accuracy", "perplexity"} and r["masked_tokens"] > 0
    assert results["final"]["masked_tokens"] == results["large"]["final"]["masked_tokens"]
    small = AutoModelForMaskedLM.from_pretrained(run / "export")
    large = AutoModelForMaskedLM.from_pretrained(run / "export_large")
    assert type(small).__name__ == type(large).__name__ == "BertForMaskedLM"
    assert (small.config.hidden_size, large.config.hidden_size) == (32, 48)
    tags = _scalars(run)
    for tag in ("loss/large_task", "loss/small_task", "loss/large_kd", "loss/small_kd", "loss/total",
                "eval/mlm_loss", "eval/large_mlm_loss"):
        assert tag in tags, tag
    assert all(v > 0 for v in tags["loss/small_kd"].values())

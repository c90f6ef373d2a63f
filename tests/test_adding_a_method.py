"""docs/adding_a_method.md's worked examples, run as written: one new module is a whole new method."""
from __future__ import annotations

import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO

DS = str(REPO / "ds_configs" / "zero2.json")
DOC = REPO / "docs" / "adding_a_method.md"
EXAMPLES = ("logit_mse", "last_hidden_mse", "inbatch_crd")


def example(name: str) -> str:
    """The python block after ``<!-- example: name -->`` in the doc."""
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/adding_a_method.md has no example {name!r}"
    return match.group(1)


@pytest.fixture()
def registered(monkeypatch):
    """Load the doc's examples as modules of their own (as a new file would be), rebuild the method
    config section from the registry, and unregister them afterwards."""
    import codir_ds.config as config
    from codir_ds.distill.methods import method_config_class, registry

    before = dict(registry._METHODS)
    for name in EXAMPLES:
        module = types.ModuleType(f"codir_ds.distill.methods.{name}")
        monkeypatch.setitem(sys.modules, module.__name__, module)
        exec(compile(example(name), str(DOC), "exec"), module.__dict__)
    monkeypatch.setattr(config, "MethodConfig", method_config_class())
    yield config
    registry._METHODS.clear()
    registry._METHODS.update(before)


def test_new_method_is_registered_configured_and_validated(registered):
    from codir_ds.distill.methods import build_method, method_names
    from codir_ds.errors import CodirError
    assert "logit_mse" in method_names("finetune") and "logit_mse" not in method_names("pretrain")
    m = registered.MethodConfig(name="logit_mse", alpha_mse=0.5)
    field = {f.name: f for f in __import__("dataclasses").fields(registered.MethodConfig)}["alpha_mse"]
    assert field.metadata["methods"] == ("logit_mse",) and "logit" in field.metadata["help"]
    method = build_method(m, "finetune")
    assert method.teacher.logits and method.bank is None
    with pytest.raises(CodirError, match="method.alpha_mse"):
        registered.load_config(None, ["method.name=logit_mse", "method.alpha_mse=-1", "model.teacher=x"])
    with pytest.raises(CodirError, match="not a pre-training objective"):
        build_method(m, "pretrain")


def test_examples_are_listed_with_their_summary_in_help(registered):
    """Each example sets a one-line summary, and a launcher's --help lists the method with it."""
    from codir_ds.cli import base_parser
    text = base_parser("finetune", stage="finetune").format_help()  # what launchers/finetune.py --help prints
    for name in EXAMPLES:
        summary = re.search(r'^    summary = "([^"]+)"$', example(name), re.M)
        assert summary, f"the {name} example sets no summary"
        rows = [line.split(None, 1) for line in text.splitlines() if line.startswith(f"  {name} ")]
        assert rows == [[name, summary.group(1)]], text


def test_new_method_loss_against_hand_computation(registered):
    from codir_ds.distill.methods import LossInputs, StudentOutput, TeacherOutput, build_method
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 1])
    m = registered.MethodConfig(name="logit_mse", alpha_kd=0.3, kd_temperature=2.0, alpha_mse=0.5)
    total, terms = build_method(m, "finetune").loss(StudentOutput(z_s), TeacherOutput(z_t), LossInputs(labels))
    ce = F.cross_entropy(z_s, labels)
    p_t = F.softmax(z_t / 2, -1)
    kd = (p_t * (p_t.log() - F.log_softmax(z_s / 2, -1))).sum(-1).mean() * 4
    mse = ((z_s - z_t) ** 2).mean()
    assert torch.allclose(total, ce + 0.3 * kd + 0.5 * mse, atol=1e-6)
    assert torch.allclose(terms["loss/logit_mse"], mse) and torch.allclose(terms["loss/total"], total)
    assert set(terms) <= set(type(build_method(m, "finetune")).declared_tags())  # every tag it writes is declared


def test_feature_example_reads_the_last_layer_pair(registered):
    from codir_ds.distill.methods import LayerFeatures, LossInputs, StudentOutput, TeacherOutput, build_method
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    method = build_method(registered.MethodConfig(name="last_hidden_mse", alpha_kd=0.0, alpha_hidden=2.0), "finetune")
    assert method.layers.kind == "hidden" and method.layer_pairs(3, 6) == [(3, 6)]
    logits = torch.zeros(2, 2)
    total, terms = method.loss(StudentOutput(logits, layers=LayerFeatures(mask, hidden=[s])),
                               TeacherOutput(logits, layers=LayerFeatures(mask, hidden=[t])),
                               LossInputs(torch.tensor([0, 1])))
    w = mask.float() / mask.sum()
    expected = ((s - t) ** 2).mean(-1).mul(w).sum()
    assert torch.allclose(terms["loss/last_hidden_mse"], expected)
    assert torch.allclose(total, F.cross_entropy(logits, torch.tensor([0, 1])) + 2.0 * expected)


def test_new_method_trains_through_the_finetuning_recipe(registered, tmp_path, tiny_config, single_process_env):
    from codir_ds.recipes import recipe_for
    cfg = registered.load_config(str(tiny_config), ["method.name=logit_mse", "method.alpha_mse=0.5",
                                                    "training.max_steps=2"])
    recipe = recipe_for(cfg, "finetune", DS, str(tmp_path / "run"))
    results = recipe.run()
    assert results["method"] == "logit_mse" and results["steps"] == 2
    assert (tmp_path / "run" / "export" / "config.json").is_file()


# ----------------------------------------------------------------------------- the in-batch contrastive example

def test_inbatch_example_owns_its_options_and_heads(registered):
    from codir_ds.distill.methods import ContrastSpec, build_method
    from codir_ds.errors import CodirError
    method = build_method(registered.MethodConfig(name="inbatch_crd", inbatch_dim=32), "finetune")
    assert method.contrast == ContrastSpec("last", "last", "mean", 32) and method.bank is None
    assert method.teacher.cacheable and method.encoder_delay == 0
    cfg = registered.load_config(None, ["method.name=inbatch_crd", "model.teacher=x"])
    assert (cfg.method.alpha_inbatch, cfg.method.inbatch_temperature, cfg.method.inbatch_dim) == (0.1, 0.1, 64)
    assert set(cfg.to_dict()["method"]) == {"name", "alpha_kd", "kd_temperature", "kd_t2_scale", "alpha_inbatch",
                                            "inbatch_temperature", "inbatch_dim"}
    with pytest.raises(CodirError, match=r"^method\.num_negatives is an option of codir, not of "
                                         r"method\.name=inbatch_crd .*or set method\.name=codir$"):
        registered.load_config(None, ["method.name=inbatch_crd", "model.teacher=x", "method.num_negatives=5"])
    with pytest.raises(CodirError, match=r"^method\.alpha_inbatch is an option of inbatch_crd, not of "
                                         r"method\.name=codir"):
        registered.load_config(None, ["model.teacher=x", "method.alpha_inbatch=0.5"])


def test_inbatch_loss_against_hand_computation(registered):
    import math
    from codir_ds.distill.methods import LossInputs, StudentOutput, TeacherOutput, build_method
    h_s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    h_t = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    logits, t_logits = torch.zeros(3, 2), torch.zeros(3, 2)
    labels = torch.tensor([0, 1, 1])
    method = build_method(registered.MethodConfig(name="inbatch_crd", alpha_kd=0.0, alpha_inbatch=0.5,
                                                  inbatch_temperature=0.5), "finetune")
    total, terms = method.loss(StudentOutput(logits, h_s=h_s, h_t=h_t), TeacherOutput(t_logits), LossInputs(labels))
    # unit rows: s = (1,0), (0,1), (.6,.8); t = (1,0), (r,r), (0,-1) with r = 1/sqrt 2; scores = s.t / 0.5
    r = 1 / math.sqrt(2)
    cos = [[1.0, r, 0.0], [0.0, r, -1.0], [0.6, 1.4 * r, -0.8]]
    nce = sum(-cos[i][i] / 0.5 + math.log(sum(math.exp(c / 0.5) for c in cos[i])) for i in range(3)) / 3
    assert terms["loss/inbatch_nce"].item() == pytest.approx(nce, rel=1e-5)
    assert total.item() == pytest.approx(math.log(2) + 0.5 * nce, rel=1e-5)   # CE of zero logits is log 2
    assert set(terms) <= set(type(method).declared_tags())


def test_inbatch_example_trains_through_the_finetuning_recipe(registered, tmp_path, tiny_config,
                                                              single_process_env):
    """Two steps with the teacher cache: phi_s / phi_t on the last layers, no bank, its term logged."""
    from codir_ds.models.loading import num_layers
    from codir_ds.recipes import recipe_for
    cfg = registered.load_config(str(tiny_config), ["method.name=inbatch_crd", "method.inbatch_dim=16",
                                                    "training.max_steps=2", "training.teacher_cache=true"],
                                 stage="finetune")
    recipe = recipe_for(cfg, "finetune", DS, str(tmp_path / "run"))
    results = recipe.run()
    assert results["method"] == "inbatch_crd" and results["steps"] == 2 and recipe.bank is None
    student = recipe.engine.module.student
    assert recipe.teacher_layers == [num_layers(recipe.teacher)]
    assert recipe.engine.module.proj_s.linear.in_features == student.config.hidden_size
    assert recipe.engine.module.proj_s.linear.out_features == 16
    assert "loss/inbatch_nce" in recipe.last_scalars
    assert (tmp_path / "run" / "teacher_cache").is_dir()

"""method.crd_encoder_delay: for its first N optimizer steps the CRD gradient trains the projection
heads only and stops before the student body."""
from __future__ import annotations

import pytest
import torch

from codir_ds.config import load_config
from codir_ds.errors import CodirError

DS = "ds_configs/zero2.json"


def _module():
    from transformers import BertConfig, BertForSequenceClassification
    from codir_ds.distill.heads import DistillationModule
    torch.manual_seed(0)
    student = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=32, num_labels=2))
    return DistillationModule(student, [1, 2], "mean", teacher_dim=24, projection_dim=8)


@pytest.mark.parametrize("hold", [True, False])
def test_hold_encoder_stops_the_contrastive_gradient_at_the_heads(hold):
    module = _module()
    ids = torch.randint(0, 50, (4, 7))
    out = module(ids, torch.ones_like(ids), teacher_features=torch.randn(4, 24), hold_encoder=hold)
    (out["h_s"] * out["h_t"]).sum().backward()  # a loss on the contrastive features alone
    body = [p.grad for p in module.student.bert.parameters()]
    assert module.proj_s.linear.weight.grad.abs().sum() > 0 and module.proj_t.linear.weight.grad.abs().sum() > 0
    if hold:
        assert all(g is None or g.abs().sum() == 0 for g in body)
    else:
        assert sum(float(g.abs().sum()) for g in body if g is not None) > 0
    # the supervised path is never held: the logits still train the body
    module.zero_grad()
    out = module(ids, torch.ones_like(ids), teacher_features=torch.randn(4, 24), hold_encoder=True)
    out["logits"].sum().backward()
    assert module.student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_the_recipe_holds_the_encoder_for_exactly_the_first_steps(tmp_path, tiny_config, single_process_env):
    from codir_ds.recipes import recipe_for
    cfg = load_config(str(tiny_config), ["method.crd_encoder_delay=2", "training.checkpoint_every=0"])
    recipe = recipe_for(cfg, "finetune", DS, str(tmp_path / "run"))
    recipe.setup()
    seen = []  # (optimizer step, does the projection's input carry the body's graph?)
    proj = recipe.engine.module.proj_s
    proj.register_forward_pre_hook(lambda mod, args: seen.append((recipe.progress.step, args[0].requires_grad)))
    recipe.train()
    steps = sorted({s for s, _ in seen})
    assert len(steps) >= 4
    assert all(grad == (s >= 2) for s, grad in seen), seen


def test_a_negative_delay_is_a_one_line_config_error(tiny_config):
    with pytest.raises(CodirError, match="method.crd_encoder_delay") as err:
        load_config(str(tiny_config), ["method.crd_encoder_delay=-1"])
    assert "\n" not in str(err.value)

"""How hard does the CRD term pull on the student, and in which direction? A probe of a real codir run.

    python bench/crd_gradients.py --config configs/fine_movie_snippets_cpu.yaml \
        --set data.task=trec6 --set model.teacher=runs/fidelity_cpu/trec6/teacher/export \
        --output_dir /tmp/crd_gradients --out bench/results/cpu_xeon/crd_gradients_trec6.json

Runs ``launchers/finetune.py``'s recipe unchanged (one process) with the method's loss wrapped: at
every ``--every``-th optimizer step, before the engine's backward, the gradients of the supervised
part (``L_task + alpha_1 L_KD``) and of the contrastive part (``alpha_2 L_CRD``) with respect to the
student encoder's hidden states (the embedding output and every layer's output, captured by forward
hooks) are taken separately (``torch.autograd.grad`` on those activations; DeepSpeed's parameter
hooks and the engine's own gradients are untouched) and their norms, ratio and cosine are recorded
per layer, together with the projected student feature's norm (the CRD gradient through the cosine
scales as 1 / (tau * ||h_s||)). The training itself, and its results.json, are those of the plain run.

``--until STEP`` ends the run at that optimizer step, after its probe, and writes the records so far: the
schedule (warm-up, decay) is still the whole run's, so the early steps are probed as the full run has them,
at a fraction of its cost; the JSON then has no final metrics and says where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from codir_ds.cli import DefaultsHelpFormatter, run_main  # noqa: E402


def hidden_state_hooks(student, captured: list) -> None:
    """Forward hooks that append the embedding output and every encoder layer's output to ``captured``."""
    def keep(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    body = getattr(student, student.base_model_prefix, student)  # e.g. BertForSequenceClassification.bert
    def first(module, inputs, output):  # a new forward starts at the embeddings
        captured.clear()
        keep(module, inputs, output)

    body.embeddings.register_forward_hook(first)
    for layer in body.encoder.layer:
        layer.register_forward_hook(keep)


def gradient_record(step: int, sup, crd, captured: list, student, batch) -> dict:
    """Norms, ratio and cosine of the two terms' gradients at every captured hidden state."""
    import torch

    g_sup = torch.autograd.grad(sup, captured, retain_graph=True, allow_unused=True)
    g_crd = torch.autograd.grad(crd, captured, retain_graph=True, allow_unused=True)
    layers = []
    for a, b in zip(g_sup, g_crd):
        a = a.flatten() if a is not None else torch.zeros(1)
        b = b.flatten() if b is not None else torch.zeros(1)
        layers.append({"supervised_grad_norm": a.norm().item(), "crd_grad_norm": b.norm().item(),
                       "ratio_crd_to_supervised": (b.norm() / a.norm().clamp_min(1e-30)).item(),
                       "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item()})
    h_norm = student.h_s.detach().float().norm(dim=1).mean().item()
    return {"step": step, "layers": layers, "student_norm": h_norm, "crd_loss_over_log_k1":
            crd.item() / math.log(batch.negatives.per_anchor + 1)}


class ProbeDone(Exception):
    """Raised at ``--until``: the probe has what it was asked for."""


def probe(recipe, every: int, records: list, until: Optional[int] = None) -> None:
    """Wrap ``recipe.method.loss`` so that every ``every``-th optimizer step records the two gradients
    (and, with ``until``, stop the run by raising ProbeDone at the first micro-batch past that step).

    The gradients are taken on a copy of the trained module (same weights, same micro-batch, same teacher
    features): a backward through the engine's own outputs would run DeepSpeed's gradient hooks."""
    import copy as copy_module

    import torch

    from codir_ds.distill.methods.base import StudentOutput

    method, original, micro_batches = recipe.method, recipe.method.loss, recipe.data.micro_batches
    alpha, tau = recipe.cfg.method.alpha_crd, recipe.cfg.method.crd_temperature
    last: dict = {}
    seen = set()

    def keep_batches(batches, stage="train"):
        for mb in micro_batches(batches, stage):  # the recipe's micro-batches, the last one kept
            last["batch"] = mb
            yield mb

    def loss(student, teacher, batch):
        step = recipe.progress.step
        if until is not None and step > until:
            raise ProbeDone(step)
        if step % every == 0 and step not in seen and batch.negatives is not None:
            seen.add(step)
            rng = torch.get_rng_state()  # the copy's dropout must not shift the real run's random stream
            module = copy_module.deepcopy(recipe.engine.module).train()
            captured: list = []
            hidden_state_hooks(module.student, captured)
            b = last["batch"]
            out = StudentOutput.from_module(module(**b.inputs, teacher_features=teacher.features, ild=False,
                                                   mix=None, clean_model=None))
            sup = method.supervised(out, teacher, batch, {})
            crd, _, _ = batch.negatives.loss(out.h_t, out.h_s, tau)
            records.append(gradient_record(step, sup, alpha * crd, list(captured), out, batch))
            torch.set_rng_state(rng)
            r = records[-1]
            cells = "  ".join(f"L{i}: ratio {x['ratio_crd_to_supervised']:.2f} cos {x['cosine']:+.2f}"
                              for i, x in enumerate(r["layers"]))
            print(f"probe step {step}: |h_s| {r['student_norm']:.2f}  {cells}", flush=True)
        return original(student, teacher, batch)

    recipe.data.micro_batches = keep_batches
    method.loss = loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    ap.add_argument("--output_dir", required=True, help="the run directory (must not hold a run)")
    ap.add_argument("--every", type=int, default=10, help="probe every N optimizer steps")
    ap.add_argument("--out", required=True, help="JSON with the probe's records and the run's results")
    ap.add_argument("--until", type=int, default=None, metavar="STEP",
                    help="end the run after probing optimizer step STEP (the schedule stays the whole run's)")
    args = ap.parse_args(argv)
    from codir_ds.cli import quiet_environment
    from codir_ds.config import load_config
    from codir_ds.errors import CodirError
    if args.every < 1 or (args.until is not None and args.until < 0):
        raise CodirError(f"--every must be >= 1 and --until >= 0, got --every {args.every} --until {args.until}")
    from codir_ds.recipes import recipe_for

    quiet_environment()
    cfg = load_config(args.config, args.overrides, stage="finetune")  # bad input: one line (run_main)
    if cfg.method.name != "codir":
        raise CodirError(f"method.name is {cfg.method.name}: the probe measures codir's CRD term "
                         f"(--set method.name=codir)")
    recipe = recipe_for(cfg, "finetune", args.deepspeed_config, args.output_dir)
    records: list = []
    recipe.setup()
    probe(recipe, args.every, records, args.until)
    try:
        results = recipe.train()
    except ProbeDone:
        results = {"stopped_after_step": args.until}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(["python", "bench/crd_gradients.py", *sys.argv[1:]]),
                                          "probe": records, "final": results.get("final"),
                                          "diagnostics": results.get("diagnostics"),
                                          "stopped_after_step": results.get("stopped_after_step"),
                                          "total_steps": recipe.total_steps}, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)

"""Where a finetuning step's time goes: codir-ds's trained module in its DeepSpeed engine against a plain loop.

    python bench/step_probe.py --layers 6 --hidden 768 --heads 12 --seq_len 128 --micro_batch 16 --repeats 6

One process, one random-weight BERT classifier, fp32. Alternated, ``--repeats`` times after one untimed round:

- ``plain``: the Hugging Face model's forward, cross-entropy plus logit KD (to fixed teacher logits), backward;
- ``codir_ds``: the same weights inside ``DistillationModule`` (the module the finetuning recipe trains) in a
  DeepSpeed engine (``--zero_stage``), the forward with the recipe's keyword inputs, the ``kd`` method's own
  ``loss`` on ``StudentOutput`` / ``TeacherOutput`` / ``LossInputs``, and ``engine.backward``;
- ``codir_ds_step``: ``engine.step()`` after it (AdamW, and at stage 2 ZeRO's partition bookkeeping).

Prints one JSON object (and writes it to ``--output``): each part's seconds per repeat and median. The teacher is not run (its logits are fixed):
this isolates the student side of ``bench/throughput.py``'s ``student_forward_backward`` and ``optimizer_step``.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cli import ArgumentError, Parser, emit_report  # noqa: E402
from codir_ds.cli import DefaultsHelpFormatter  # noqa: E402


def parse_args(argv=None):
    ap = Parser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter,
                script="bench/step_probe.py")
    for name, default in (("layers", 2), ("hidden", 64), ("heads", 2), ("seq_len", 32), ("micro_batch", 8),
                          ("repeats", 5), ("zero_stage", 0), ("num_classes", 6)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--output", default=None, help="also write the JSON report to this file")

    def check(args):
        for name in ("layers", "hidden", "heads", "seq_len", "micro_batch", "repeats", "num_classes"):
            if getattr(args, name) < 1:
                raise ArgumentError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.hidden % args.heads:
            raise ArgumentError(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
        if args.zero_stage not in (0, 1, 2):
            raise ArgumentError(f"--zero_stage must be 0, 1 or 2, got {args.zero_stage}")
    return ap.parse_checked(argv, check)


def build(args):
    """``(plain model, DeepSpeed engine around a DistillationModule of the same weights, kd method)``."""
    import deepspeed
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from codir_ds.config import MethodConfig
    from codir_ds.distill.heads import DistillationModule
    from codir_ds.distill.methods import build_method
    from codir_ds.engine.distributed import init_distributed
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                        intermediate_size=4 * args.hidden, num_labels=args.num_classes,
                        max_position_embeddings=max(512, args.seq_len))
    plain = BertForSequenceClassification(config).train()
    module = DistillationModule(copy.deepcopy(plain), list(range(args.layers + 1)))
    init_distributed()
    ds = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": args.zero_stage}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-4),
                                      config=ds)
    return plain, engine, build_method(MethodConfig(name="kd"), "finetune")


def probe(args) -> dict:
    import torch
    import torch.nn.functional as F

    from codir_ds.distill.methods import LossInputs, StudentOutput, TeacherOutput
    plain, engine, method = build(args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (args.micro_batch, args.seq_len), generator=g)
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    labels = torch.randint(0, args.num_classes, (args.micro_batch,), generator=g)
    t_logits = torch.randn(args.micro_batch, args.num_classes, generator=g)
    rho, alpha = method.cfg.kd_temperature, method.cfg.alpha_kd

    def plain_step():
        s = plain(input_ids=ids, attention_mask=mask).logits.float()
        kd = F.kl_div(F.log_softmax(s / rho, -1), F.softmax(t_logits / rho, -1), reduction="batchmean")
        (F.cross_entropy(s, labels) + alpha * kd * rho ** 2).backward()
        plain.zero_grad(set_to_none=True)

    def codir_ds_step():
        out = engine(input_ids=ids, attention_mask=mask, token_type_ids=types, teacher_features=None, ild=False,
                     mix=None, hold_encoder=False)
        total, _ = method.loss(StudentOutput.from_module(out), TeacherOutput(t_logits), LossInputs(labels))
        engine.backward(total)

    times: dict = {"plain": [], "codir_ds": [], "codir_ds_step": []}
    for i in range(args.repeats + 1):
        for name, fn in (("plain", plain_step), ("codir_ds", codir_ds_step), ("codir_ds_step", engine.step)):
            t = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    return {"config": vars(args), "seconds": times,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "codir_ds_over_plain": statistics.median(times["codir_ds"]) / statistics.median(times["plain"])}


def main(argv=None) -> int:
    args = parse_args(argv)
    from codir_ds.cli import quiet_environment
    quiet_environment()
    report = probe(args)
    emit_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

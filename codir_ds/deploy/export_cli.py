"""``launchers/export.py``'s argument rules and its ``--onnx`` path: which model, which task, where to."""
from __future__ import annotations

import argparse
from pathlib import Path

from codir_ds.errors import CodirError

ONNX_ONLY = ("model", "quantize", "config")


def check_arguments(args: argparse.Namespace) -> None:
    """Combinations that cannot work, as one line each, before anything is read."""
    if not args.onnx:
        given = [f"--{k}" for k in ONNX_ONLY if getattr(args, k)] + (["--set"] if args.overrides else [])
        if given:
            raise CodirError(f"{', '.join(given)} only apply to an ONNX export: add --onnx, or drop them")
        if not args.run_dir:
            raise CodirError("pass --run_dir RUN (a DeepSpeed checkpoint export) or --onnx --model DIR (an ONNX "
                             "export of a classifier)")
        return
    if bool(args.model) == bool(args.run_dir):
        raise CodirError("--onnx exports one classifier: pass either --model DIR (e.g. runs/my_codir/export) or "
                         "--run_dir RUN (its export/, or --tag TAG's checkpoint), not both or neither")
    if args.model and (args.tag or args.large):
        raise CodirError("--tag and --large choose a checkpoint of --run_dir: with --model DIR, drop them")


def _source(args: argparse.Namespace) -> Path:
    """The classifier directory to export: --model, the run's export/ (export_large/ with --large), or (--tag)
    that checkpoint's export directory (which :func:`export_onnx_command` writes first)."""
    if args.model:
        return Path(args.model)
    run = Path(args.run_dir)
    if args.tag:
        return run / f"export_{args.tag}{'_large' if args.large else ''}"
    source = run / ("export_large" if args.large else "export")
    if not (source / "config.json").is_file():
        raise CodirError(f"run '{run}' has no exported model in '{source}' (it exports at its first evaluation): "
                         f"pass --tag TAG to export one of its checkpoints, or --model DIR")
    return source


def _config_path(args: argparse.Namespace) -> str:
    """--config, else the config.yaml of the run the model belongs to."""
    if args.config:
        return args.config
    candidates = [Path(args.run_dir) / "config.yaml"] if args.run_dir else [Path(args.model).parent / "config.yaml"]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise CodirError(f"--onnx checks the export on the task's validation examples, and '{args.model}' is not inside "
                     f"a run directory with a config.yaml: pass --config YAML naming its task (e.g. "
                     f"configs/fine_movie_snippets_cpu.yaml)")


def export_onnx_command(args: argparse.Namespace) -> list[Path]:
    """Check everything (runtime installed, config, task, the model against the task), then export."""
    from codir_ds.config import load_config
    from codir_ds.data.tasks import load_task
    from codir_ds.deploy.onnx_export import check_output_dir, export_onnx, int8_dir
    from codir_ds.deploy.served import check_model_dir, is_onnx_dir, require

    for module in ("onnx", "onnxscript", "onnxruntime") + (("onnxruntime.quantization",) if args.quantize else ()):
        require(module, "--onnx")
    cfg = load_config(_config_path(args), args.overrides, evaluation=True)
    task = load_task(cfg.data)
    source = _source(args)
    out = Path(args.output_dir) if args.output_dir else source.with_name(source.name + "_onnx")
    for o in [out] + ([int8_dir(out)] if args.quantize else []):
        check_output_dir(o, source, args.overwrite)
    if args.tag:  # the checkpoint becomes a classifier directory first (its own checks come before any writing)
        from codir_ds.engine.export_checkpoint import export_from_checkpoint
        export_from_checkpoint(args.run_dir, tag=args.tag, output_dir=source, overwrite=args.overwrite,
                               large=args.large)
    if is_onnx_dir(source):
        raise CodirError(f"'{source}' is already an ONNX directory: --onnx exports from the PyTorch classifier it "
                         f"came from (its codir_onnx.json names it under 'source')")
    check_model_dir(str(source), task, cfg.data.max_length)
    return export_onnx(source, out, task, cfg.data.max_length, args.quantize, args.overwrite)

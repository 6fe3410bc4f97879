"""Tokenised datasets on disk: per split, memory-mapped token shards plus document offsets.

Layout of a prepared dataset directory::

    meta.json            key, corpus manifest, tokenizer, dtype, per-split counts
    tokenizer/           the tokenizer (``AutoTokenizer.from_pretrained`` loads it)
    train/shard-00000.bin  raw token ids (uint16 if the vocabulary fits, else uint32)
    train/docs.npy       (K, 3) int64: shard, start, length of each document
    train/names.json     document names
    val/...

Each document's tokens end with the EOS id. The key is a hash of the corpus checksum and
the tokenizer, so the same corpus and tokenizer are never tokenised twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from filelock import FileLock

from fastweights._progress import progress_bar
from fastweights.data.corpus import Corpus
from fastweights.data.tokenizer import SAMPLE_VERSION, load_tokenizer, text_prefix
from fastweights.errors import FastWeightsError, is_int

__all__ = ["Dataset", "TokenStore", "dataset_dir", "dataset_key", "tokenize_corpus"]



class TokenStore:
    """The tokens of one split: ``doc(i)`` is a read-only (L_i,) array of document i."""

    def __init__(self, path: str | os.PathLike, dtype: str):
        self.path = Path(path)
        self.index = np.load(self.path / "docs.npy", allow_pickle=False)
        self.names = json.loads((self.path / "names.json").read_text())
        self.dtype = np.dtype(dtype)
        self._shards: dict[int, np.memmap] = {}
        for shard in np.unique(self.index[:, 0]) if len(self.index) else ():  # a cut shard fails here, by name
            rows = self.index[self.index[:, 0] == shard]
            need = int((rows[:, 1] + rows[:, 2]).max()) * self.dtype.itemsize
            f = self.path / f"shard-{int(shard):05d}.bin"
            size = f.stat().st_size if f.exists() else None
            if size is None or size < need:
                raise FastWeightsError(f"{f} is {'missing' if size is None else f'{size} bytes'}, its documents "
                                       f"need {need}: the dataset is damaged; prepare it again into a new --out")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> np.ndarray:
        return self.index[:, 2]

    @property
    def total_tokens(self) -> int:
        return int(self.lengths.sum())

    def __iter__(self):
        """The documents in order, as :meth:`doc` gives them (so a split serves wherever documents do,
        e.g. ``dynamic_eval(model, dataset.split("val"))``)."""
        return (self.doc(i) for i in range(len(self)))

    def doc(self, i: int) -> np.ndarray:
        shard, start, length = (int(v) for v in self.index[i])
        if shard not in self._shards:
            self._shards[shard] = np.memmap(self.path / f"shard-{shard:05d}.bin", dtype=self.dtype, mode="r")
        return self._shards[shard][start : start + length]


class Dataset:
    """A prepared dataset directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FastWeightsError(f"dataset directory not found: {self.path}")
        if not (self.path / "meta.json").exists():
            raise FastWeightsError(f"not a prepared dataset (no meta.json): {self.path}; run `fastweights prepare`")
        self.meta = _read_meta(self.path, "prepare the dataset again")

    def split(self, name: str) -> TokenStore:
        if name not in self.meta["splits"]:
            raise FastWeightsError(f"dataset {self.path} has no split {name!r} (has {sorted(self.meta['splits'])})")
        return TokenStore(self.path / name, self.meta["dtype"])

    def tokenizer(self):
        return load_tokenizer(self.path / "tokenizer")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])


def _read_meta(path: Path, advice: str) -> dict:
    """``path/meta.json``, checked to have a prepared dataset's fields; an error names the file and ``advice``."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except ValueError as err:  # not JSON, or not UTF-8
        raise FastWeightsError(f"{path / 'meta.json'} is not JSON ({err}): {advice}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("key"), str) and isinstance(meta.get("splits"), dict)
            and isinstance(meta.get("dtype"), str) and isinstance(meta.get("tokenizer"), dict)
            and is_int(meta["tokenizer"].get("vocab_size"))):
        raise FastWeightsError(f"{path / 'meta.json'} lacks the fields of a prepared dataset (key, splits, dtype, "
                               f"tokenizer.vocab_size): {advice}")
    return meta


def _tokenizer_hash(tokenizer) -> str:
    """SHA-256 of a tokenizer: its Rust backend's JSON, or for one without a backend (a Python
    tokenizer, such as ByT5's) the files ``save_pretrained`` writes for it, names and contents."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode()).hexdigest()
    digest = hashlib.sha256(b"saved files\0")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for f in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            digest.update(f.relative_to(tmp).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


# how documents become tokens; a change here makes earlier datasets rebuild (2: a literal EOS
# string inside a document is text, not the EOS id; 3: documents are tokenised whole, not in
# pieces of 64k characters, whose starts changed the tokens; 4: a document starts with the ids
# the tokenizer puts before a text, e.g. Llama's BOS)
ENCODING = 4


def _earlier_key(corpus: Corpus, tokenizer) -> str:
    """``<corpus sha256[:16]>-<tokenizer sha256[:16]>``: the whole key before ENCODING 2."""
    return f"{corpus.manifest['sha256'][:16]}-{_tokenizer_hash(tokenizer)[:16]}"


def same_documents(key: str, other: str) -> bool:
    """Whether two dataset keys differ at most in their encoding (``-e<N>``, the last part): the
    same documents, tokenizer and split."""
    return str(key).rsplit("-e", 1)[0] == str(other).rsplit("-e", 1)[0]


def _same_corpus_and_split(key: str, other: str) -> bool:
    """Whether two dataset keys name the same corpus and split (their tokenizers may differ); a
    key from before the split joined it (``<corpus>-<tokenizer>``) names the corpus only."""
    def parts(k):
        corpus, _, rest = str(k).partition("-")
        return corpus, rest.partition("-")[2].rsplit("-e", 1)[0]

    (corpus, split), (corpus2, split2) = parts(key), parts(other)
    return corpus == corpus2 and (split == split2 or not split.startswith("val"))


def dataset_key(corpus: Corpus, tokenizer, earlier: str | None = None) -> str:
    """``<corpus sha256[:16]>-<tokenizer sha256[:16]>-val<val_fraction>-e<ENCODING>``: what the
    documents are, how they split and how they are encoded (``earlier``: the first two parts,
    if already at hand)."""
    return f"{earlier or _earlier_key(corpus, tokenizer)}-val{corpus.val_fraction:g}-e{ENCODING}"


def _tokenized(docs, tokenizer, dtype, batch_chars: int = 4 << 20):
    """Yield ``(doc, ids)`` for each of ``docs`` in order, ids (L,) in ``dtype`` without the EOS:
    exactly ``tokenizer(doc.text)``, its BOS included where it adds one (:func:`text_prefix`; an EOS
    it would append is the caller's). Whole documents are tokenised in batches of about
    ``batch_chars`` characters (a longer document alone): cutting a document into pieces changes
    its tokens where a piece starts (a SentencePiece tokenizer adds a word-start "▁"; a
    byte-level one splits a newline from the indentation after it)."""
    batch: list = []
    size = 0
    prefix = text_prefix(tokenizer)

    def run():
        # split_special_tokens: a document's own "<|endoftext|>" is text; only the EOS appended
        # by the caller ends a document. A document longer than the model's context is stored
        # whole (rows are cut later): transformers' warning about model_max_length does not apply.
        limit = tokenizer.model_max_length
        tokenizer.model_max_length = int(1e30)
        try:
            encoded = tokenizer([d.text for d in batch], add_special_tokens=False,
                                split_special_tokens=True)["input_ids"]
        finally:
            tokenizer.model_max_length = limit
        for doc, ids in zip(batch, encoded, strict=True):
            yield doc, np.asarray(prefix + ids, dtype=dtype)
        batch.clear()

    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= batch_chars:
            yield from run()
            size = 0
    if batch:
        yield from run()


def _write_split(docs, tokenizer, dtype, out: Path, shard_tokens: int, bar) -> dict:
    out.mkdir(parents=True)
    eos = np.asarray([tokenizer.eos_token_id], dtype=dtype)
    index, names, shard, pos, total = [], [], 0, 0, 0
    fh = open(out / f"shard-{shard:05d}.bin", "wb")
    try:
        for doc, ids in _tokenized(docs, tokenizer, dtype):
            arr = np.concatenate([ids, eos])
            if pos and pos + len(arr) > shard_tokens:
                fh.close()
                shard, pos = shard + 1, 0
                fh = open(out / f"shard-{shard:05d}.bin", "wb")
            fh.write(arr.tobytes())
            index.append((shard, pos, len(arr)))
            names.append(doc.name)
            pos += len(arr)
            total += len(arr)
            bar.update(len(doc.text.encode()))
    finally:
        fh.close()
    np.save(out / "docs.npy", np.asarray(index, dtype=np.int64).reshape(-1, 3), allow_pickle=False)
    (out / "names.json").write_text(json.dumps(names))
    return {"documents": len(index), "tokens": total, "shards": shard + 1}


def dataset_dir(out: str | os.PathLike) -> Path:
    """``out`` checked as the directory to prepare a dataset into, before any work: ``.`` or a
    path ending in ``..`` made absolute (the lock and temporary directory beside it are named
    after it), the file system's root refused, and a file or a directory that is neither empty
    nor a dataset refused (a dataset there is checked once its key is known)."""
    out = Path(out)
    if out.name in ("", ".."):
        out = Path(os.path.abspath(out))
    if not out.name:
        raise FastWeightsError(f"cannot prepare a dataset into {out}: it needs a directory with a name (its lock and "
                               f"temporary directory are <name>.lock and <name>.tmp beside it); pick one below {out}")
    if not (out / "meta.json").exists():
        _refuse_foreign(out)
    return out


def _refuse_foreign(out: Path) -> None:
    """Raise unless ``out`` is new or an empty directory (it holds no dataset)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FastWeightsError(f"{out} exists and is not a dataset directory: pick another --out (an empty or new "
                               f"directory)")


def tokenize_corpus(corpus: Corpus, tokenizer, out: str | os.PathLike, shard_tokens: int = 1 << 28,
                    progress: bool = True, trained: bool = False) -> Dataset:
    """Tokenise ``corpus`` into the dataset directory ``out`` and return it. If ``out``
    already holds this corpus tokenised with this tokenizer, nothing is redone. ``trained``: the
    tokenizer was trained on this corpus by ``prepare`` (recorded in the dataset's meta), so a dataset
    of the same corpus, split and vocabulary size whose BPE an earlier fastweights trained
    otherwise (its meta records an older sample, or none) is rebuilt, not refused. The
    directory is built under a temporary name and renamed into place when complete; runs
    preparing the same ``out`` at once take turns (a lock file ``<out>.lock``), so the later
    one finds the dataset done."""
    out = dataset_dir(out)
    earlier = _earlier_key(corpus, tokenizer)  # hashes the tokenizer once for both keys
    key = dataset_key(corpus, tokenizer, earlier)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out.with_name(out.name + ".lock")):
        return _tokenize_locked(corpus, tokenizer, out, shard_tokens, progress, key, earlier, trained)


def _tokenize_locked(corpus: Corpus, tokenizer, out: Path, shard_tokens: int, progress: bool, key: str,
                     earlier: str, trained: bool = False) -> Dataset:
    if (out / "meta.json").exists():
        _read_meta(out, f"{out} holds no dataset this prepare can check; remove it or pick another --out")
        ds = Dataset(out)
        if ds.meta.get("key") == key:
            return ds
        older_bpe = (trained and ds.meta["tokenizer"].get("bpe_sample", 1) < SAMPLE_VERSION
                     and _same_corpus_and_split(ds.meta.get("key"), key) and ds.vocab_size == len(tokenizer))
        if ds.meta.get("key") != earlier and not same_documents(ds.meta.get("key"), key) and not older_bpe:
            raise FastWeightsError(
                f"{out} holds another dataset (key {ds.meta.get('key')}, want {key}); pick another --out"
            )
        # the same documents and tokenizer, prepared by an earlier fastweights (its split may
        # have had another val_fraction, its encoding an EOS inside a document or documents cut
        # into pieces; or, with a tokenizer prepare trained, an earlier way of training it): built anew
        print(f"rebuilding {out}: prepared by an earlier fastweights (key {ds.meta['key']}); training runs that read "
              f"it cannot resume on the rebuilt one", file=sys.stderr)
        shutil.rmtree(out)
    else:  # again under the lock: another process may have written there since dataset_dir
        _refuse_foreign(out)
    vocab = len(tokenizer)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    splits = {}
    with progress_bar(total=corpus.manifest["bytes"], desc="tokenising", unit="B", unit_scale=True,
                      disable=not progress) as bar:
        for name in ("train", "val"):
            splits[name] = _write_split(corpus.split(name), tokenizer, dtype, tmp / name, shard_tokens, bar)
    meta = {
        "key": key,
        "manifest": corpus.manifest,
        "tokenizer": {"name": tokenizer.name_or_path, "vocab_size": vocab, "eos_token_id": tokenizer.eos_token_id,
                      **({"bpe_sample": SAMPLE_VERSION} if trained else {})},
        "dtype": dtype,
        "splits": splits,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    (tmp / "manifest.json").write_text(json.dumps(corpus.manifest, indent=2))
    os.replace(tmp, out)
    return Dataset(out)

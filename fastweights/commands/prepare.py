"""``fastweights prepare``: build a corpus, get a tokenizer, tokenise once into a dataset dir."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from fastweights.config import option, parse
from fastweights.data.corpus import build_corpus
from fastweights.data.store import Dataset, dataset_dir, dataset_key, tokenize_corpus
from fastweights.data.tokenizer import cache_dir, load_tokenizer, train_bpe
from fastweights.errors import check_at_least, warn


@dataclass
class PrepareConfig:
    corpus: str = option("'python' (the interpreter's stdlib + site-packages) or a directory of "
                         ".txt/.jsonl/.parquet files (any case; in subdirectories too, symlinked ones "
                         "followed; hidden files and directories skipped)", "python")
    out: str = option("dataset directory (default: <cache>/datasets/<key>, the key being <corpus sha256[:16]>-"
                      "<tokenizer sha256[:16]>-val<val fraction>-e<encoding>)", "")
    tokenizer: str = option("'bpe' (train a byte-level BPE) or a local Hugging Face model/tokenizer directory", "bpe")
    vocab_size: int = option("BPE vocabulary size (with --tokenizer DIR, the vocabulary is that tokenizer's)", 4096)
    tokenizer_sample_mb: int = option("MB (bytes of UTF-8) of train-split text the BPE learns from, from documents "
                                      "in the order of a hash of their names (as --max-mb samples)", 8)
    val_fraction: float = option("fraction of documents (by name hash) in the validation split", 0.05)
    max_doc_kb: int = option("cap each default-corpus document at this many KB (0: no cap)", 0)
    max_mb: int = option("keep a deterministic sample of whole documents until this many MB are reached (the "
                         "last one may cross it; 0: all)", 0)
    text_field: str = option("JSONL field / parquet column holding the text", "text")
    shard_tokens: int = option("tokens per shard file", 1 << 28)
    progress: bool = option("show progress bars", True)


def prepare(cfg: PrepareConfig) -> Dataset:
    """Build, tokenise (unless already done) and return the dataset."""
    for name, low in (("max_mb", 0), ("max_doc_kb", 0), ("tokenizer_sample_mb", 1), ("shard_tokens", 1)):
        check_at_least(name, getattr(cfg, name), low)
    if cfg.max_doc_kb and cfg.corpus != "python":
        warn(f"--max-doc-kb caps the default corpus's documents (Python packages) only; "
             f"ignored for {cfg.corpus}")
    if cfg.tokenizer != "bpe":
        default = PrepareConfig()
        given = [f"--{name.replace('_', '-')} {getattr(cfg, name)}" for name in ("vocab_size", "tokenizer_sample_mb")
                 if getattr(cfg, name) != getattr(default, name)]
        if given:
            warn(f"{' and '.join(given)} set the BPE that prepare trains; ignored with --tokenizer {cfg.tokenizer} "
                 f"(the dataset's vocabulary is that tokenizer's)")
    # a bad --tokenizer or --out fails before the corpus is read
    out = dataset_dir(cfg.out) if cfg.out else None
    tok = None if cfg.tokenizer == "bpe" else load_tokenizer(cfg.tokenizer)
    corpus = build_corpus(cfg.corpus, cfg.val_fraction, max_doc_bytes=cfg.max_doc_kb << 10,
                          max_bytes=cfg.max_mb << 20, text_field=cfg.text_field, progress=cfg.progress)
    m = corpus.manifest
    if m["not_utf8_files"]:
        warn(f"{m['not_utf8_files']} .txt files are not valid UTF-8 and were read with U+FFFD for their "
             f"bad bytes, e.g. {m['not_utf8'][0]} (the manifest lists up to 20)")
    if m["duplicates_dropped"]:
        print(f"note: dropped {m['duplicates_dropped']} documents that repeat an earlier document's text "
              f"(a copy could otherwise land in the other split)", file=sys.stderr)
    for split, n in (("validation", m["val_documents"]), ("training", m["train_documents"])):
        if n == 0 and m["documents"] == 1:
            warn(f"the {split} split is empty: the corpus is one document, and the split is by document (one is "
                 f"never divided between the splits), so no --val-fraction can help; give the corpus several "
                 f"documents (files, or JSONL lines), e.g. its text cut into files")
        elif n == 0:
            warn(f"the {split} split is empty: {m['documents']} documents with --val-fraction "
                 f"{cfg.val_fraction} (documents go by a hash of their name); add documents or change "
                 f"--val-fraction")
    if tok is None:
        tok = train_bpe(corpus, cfg.vocab_size, sample_bytes=cfg.tokenizer_sample_mb << 20, progress=cfg.progress)
    out = out or cache_dir() / "datasets" / dataset_key(corpus, tok)
    return tokenize_corpus(corpus, tok, out, shard_tokens=cfg.shard_tokens, progress=cfg.progress,
                           trained=cfg.tokenizer == "bpe")


def main(argv: list[str]) -> int:
    cfg = parse(PrepareConfig, argv, "fastweights prepare", __doc__)
    if cfg.corpus == "python" and Path("python").is_dir():  # (main, which has no --corpus, does not say it)
        print("note: --corpus python is the built-in corpus (this interpreter's sources), not the directory "
              "./python; pass --corpus ./python for that", file=sys.stderr)
    ds = prepare(cfg)
    m = ds.meta
    print(f"dataset: {ds.path}")
    info = {"manifest": m["manifest"], "vocab_size": m["tokenizer"]["vocab_size"], "splits": m["splits"]}
    print(json.dumps(info, indent=2))
    return 0

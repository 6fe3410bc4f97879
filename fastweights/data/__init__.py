"""Corpora, tokenizers and packing."""

from fastweights.data.corpus import Corpus, Document, build_corpus
from fastweights.data.packing import IGNORE, PackedRows, long_rows, row_fields
from fastweights.data.store import Dataset, TokenStore, tokenize_corpus
from fastweights.data.tokenizer import cache_dir, load_tokenizer, train_bpe

__all__ = [
    "IGNORE",
    "Corpus",
    "Dataset",
    "Document",
    "PackedRows",
    "TokenStore",
    "build_corpus",
    "cache_dir",
    "load_tokenizer",
    "long_rows",
    "row_fields",
    "tokenize_corpus",
    "train_bpe",
]

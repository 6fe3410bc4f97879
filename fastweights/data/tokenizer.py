"""Tokenizers: a byte-level BPE trained with the ``tokenizers`` library (cached by corpus
checksum and vocabulary size), or the tokenizer of a local Hugging Face model directory."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from fastweights.data.corpus import Corpus, hash_order
from fastweights.errors import FastWeightsError

__all__ = ["EOS", "cache_dir", "load_tokenizer", "text_prefix", "train_bpe"]

EOS = "<|endoftext|>"


def cache_dir() -> Path:
    """The fastweights cache: ``$FASTWEIGHTS_CACHE``, else ``~/.cache/fastweights``."""
    return Path(os.environ.get("FASTWEIGHTS_CACHE", Path.home() / ".cache" / "fastweights"))


# runs of this many non-space characters are cut apart for the BPE's training: its time grows
# with the square of a word's length (a 1 MB line of base64 took minutes)
_LONG_WORD = re.compile(r"(\S{1024})")


def _sample(corpus: Corpus, sample_bytes: int):
    """Training text for the BPE: train documents in the order of a hash of their names (as
    ``--max-mb`` samples them, so the text comes from across the corpus, not from its first
    directories), cut into pieces of up to 1M characters (and words of 1024 characters or more
    into pieces of 1024), until ``sample_bytes`` bytes of UTF-8 (the last piece is cut short)."""
    total = 0
    for doc in hash_order(corpus.split("train")):
        for i in range(0, len(doc.text), 1 << 20):
            piece = doc.text[i : i + (1 << 20)]
            size = len(piece.encode())
            if total + size > sample_bytes:  # up to the byte budget, not past it (nor into a character)
                piece = piece.encode()[: sample_bytes - total].decode(errors="ignore")
                size = sample_bytes
            yield from (p for p in _LONG_WORD.split(piece) if p)  # the piece itself when no word is long
            total += size
            if total >= sample_bytes:
                return


# what the BPE learns from; a change makes cached tokenizers train anew (2: documents in the
# order of a hash of their names, counted in bytes; before, the first in corpus order, in characters)
SAMPLE_VERSION = 2


def train_bpe(corpus: Corpus, vocab_size: int, sample_bytes: int = 8 << 20, progress: bool = True):
    """A byte-level BPE tokenizer for ``corpus`` with ``vocab_size`` entries (``EOS``
    included), trained on up to ``sample_bytes`` bytes of its train split (see :func:`_sample`).
    Cached under ``cache_dir()/tokenizers/<corpus sha256[:16]>-v<vocab>-s<sample>-val<fraction>
    -w1024-t<SAMPLE_VERSION>``: the same corpus, split and sizes load the cached one. Returns a
    ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise FastWeightsError(f"vocab_size must be >= 258 (256 bytes + EOS + 1 merge), got {vocab_size}")
    # the split decides the training text, and the long-word cut (w1024) and the sample (t) changed it
    key = (f"{corpus.manifest['sha256'][:16]}-v{vocab_size}-s{sample_bytes}-val{corpus.val_fraction:g}-w1024"
           f"-t{SAMPLE_VERSION}")
    path = cache_dir() / "tokenizers" / key
    if not (path / "tokenizer.json").exists():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        tok.train_from_iterator(_sample(corpus, sample_bytes), trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=key + ".tmp"))
        fast.save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a local directory (a model or a prepared dataset)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FastWeightsError(f"tokenizer directory not found: {path}")
    if path.is_file():
        raise FastWeightsError(f"a tokenizer is read from its directory (tokenizer.json, tokenizer_config.json), "
                               f"got the file {path}: pass {path.parent}")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise FastWeightsError(f"no tokenizer files (tokenizer.json, tokenizer_config.json) in {path}")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tok.eos_token_id is None:
        raise FastWeightsError(f"the tokenizer in {path} has no EOS token")
    return tok


def text_prefix(tokenizer) -> list[int]:
    """The ids ``tokenizer`` puts before a text: Llama's and Mistral's BOS, none for Qwen or GPT-2
    (``tokenizer("")`` without an EOS it may append). Documents, passkey prompts and generation
    prompts start with them, as the model saw its texts in pretraining."""
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def check_dataset_tokenizer(model_dir: str | os.PathLike, dataset) -> None:
    """Refuse a prepared ``dataset`` (:class:`fastweights.data.store.Dataset`) whose tokenizer
    maps tokens to other ids than the tokenizer saved with the model in ``model_dir`` (none saved:
    nothing to compare). Training or scoring on it would read every id as another token."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        return
    try:
        mine = load_tokenizer(model_dir).get_vocab()
    except FastWeightsError:
        return  # a tokenizer this library cannot use: nothing it would compare against
    theirs = dataset.tokenizer().get_vocab()
    if mine == theirs:
        return
    moved = sorted((t for t in theirs if mine.get(t) != theirs[t]), key=theirs.get)
    if not moved:  # the model's tokenizer extends the data's (added tokens): every data id is the same token
        return
    example = next((t for t in moved if t in mine), moved[0])
    where = f"{mine[example]} for the model" if example in mine else "not in the model's vocabulary"
    raise FastWeightsError(
        f"{dataset.path} was tokenised with another tokenizer than the one saved with {model_dir}: {len(moved)} of "
        f"{len(theirs)} tokens have other ids (e.g. {example!r}: {theirs[example]} in the data, {where}); prepare "
        f"the data with --tokenizer {model_dir}")

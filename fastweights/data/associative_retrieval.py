"""Associative retrieval (Ba et al. 2016, SPEC §4).

A sequence is K key–value pairs, keys distinct letters a–z, values digits 0–9 drawn with
replacement, then ``??``, then one of the K keys; the answer is that key's digit. Example:
``c9k8j3f1??c`` → 9 (K = 4). Vocabulary: ``a``–``z`` (ids 0–25), ``0``–``9`` (ids 26–35),
``?`` (id 36). Everything is deterministic given the seed.
"""

from __future__ import annotations

import string

import numpy as np
import torch

__all__ = ["SPLIT_SIZES", "VOCAB", "associative_retrieval", "associative_retrieval_splits", "decode"]

VOCAB = list(string.ascii_lowercase) + list(string.digits) + ["?"]
QUERY_ID = VOCAB.index("?")
DIGIT0 = VOCAB.index("0")
SPLIT_SIZES = {"train": 100_000, "valid": 10_000, "test": 20_000}


def associative_retrieval(n: int, num_pairs: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` sequences of ``num_pairs`` pairs.

    Returns tokens (n, 2K+3) int64 (ids into :data:`VOCAB`) and answers (n,) int64 in 0..9
    (the digit value of the queried key).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(num_pairs, int) or not 1 <= num_pairs <= 26:
        raise ValueError(f"num_pairs must be an integer in 1..26, got {num_pairs!r}")
    rng = np.random.default_rng(seed)
    K = num_pairs
    keys = np.argsort(rng.random((n, 26)), axis=1)[:, :K]  # K distinct letters per row
    values = rng.integers(0, 10, size=(n, K))
    which = rng.integers(0, K, size=n)
    tokens = np.empty((n, 2 * K + 3), dtype=np.int64)
    tokens[:, 0 : 2 * K : 2] = keys
    tokens[:, 1 : 2 * K : 2] = DIGIT0 + values
    tokens[:, 2 * K] = QUERY_ID
    tokens[:, 2 * K + 1] = QUERY_ID
    tokens[:, 2 * K + 2] = keys[np.arange(n), which]
    answers = values[np.arange(n), which]
    return torch.from_numpy(tokens), torch.from_numpy(answers.astype(np.int64))


def associative_retrieval_splits(
    seed: int = 0, num_pairs: int = 4, sizes: dict[str, int] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The train/valid/test splits (100k/10k/20k by default), each from its own child seed
    of ``seed`` (numpy ``SeedSequence.spawn``), so changing one size leaves the others alone."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    if set(sizes) != set(SPLIT_SIZES):
        raise ValueError(f"sizes must have keys {sorted(SPLIT_SIZES)}, got {sorted(sizes)}")
    children = np.random.SeedSequence(seed).spawn(len(SPLIT_SIZES))
    return {
        name: associative_retrieval(sizes[name], num_pairs, int(child.generate_state(1)[0]))
        for name, child in zip(SPLIT_SIZES, children, strict=True)
    }


def decode(tokens: torch.Tensor) -> str:
    """One sequence of ids (L,) back to its string, e.g. ``"c9k8j3f1??c"``."""
    return "".join(VOCAB[int(i)] for i in tokens)

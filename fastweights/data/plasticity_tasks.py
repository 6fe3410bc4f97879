"""Sequence tasks of the plastic-Transformer study (Chaudhary 2025, SPEC §5).

Each generator returns a :class:`TaskBatch` of ``n`` episodes, deterministic given ``seed``:
inputs (n, T, F) float32, targets (n, T) (int64 class ids, or float32 values for regression)
and a bool ``mask`` (n, T) that marks the scored steps.

* :func:`copy_task`: 5 tokens from {1..8}, 20 blanks, a delimiter, 5 recall steps (T = 31).
  Inputs are one-hot over {blank=0, 1..8, delimiter=9}; the recall steps read blanks and must
  output the 5 tokens in order (class = token − 1).
* :func:`regression_task`: per episode ``w ~ N(0, I_3)``, ``x ~ N(0, I_3)``, ``y = wᵀx``. Ten
  support steps read ``[x, y, 0]``, ten query steps read ``[x, 0, 1]`` and must output y.
* :func:`digits_few_shot`: 5-way 1-shot classification on scikit-learn's 8×8 digits (CIFAR-FS
  and Omniglot cannot be downloaded here). Each episode draws 5 of the 10 classes and gives
  them labels 0..4 in random order; 5 support steps read ``[image, one-hot label, 0]``, then 5
  query steps (one unseen image per class, shuffled) read ``[image, 0, 1]`` and must output
  the label. Images are split once (fixed permutation): 70% feed the ``train`` episodes,
  30% the ``test`` episodes; the classes are shared, the images are not.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from fastweights.errors import FastWeightsError, check_positive_int, is_int

__all__ = ["TaskBatch", "copy_task", "digits_few_shot", "regression_task", "DELIMITER", "BLANK"]

BLANK, DELIMITER = 0, 9


class TaskBatch(NamedTuple):
    inputs: torch.Tensor  # (n, T, F) float32
    targets: torch.Tensor  # (n, T) int64 classes or float32 values; unscored steps hold 0
    mask: torch.Tensor  # (n, T) bool, True on scored steps


def _check_n(n) -> None:
    check_positive_int("n", n)


def copy_task(
    n: int, seed: int = 0, num_tokens: int = 5, num_symbols: int = 8, blanks: int = 20
) -> TaskBatch:
    """Copy episodes. Returns inputs (n, T, num_symbols+2), targets in 0..num_symbols−1.

    ``num_tokens`` (tokens to recall) and ``num_symbols`` (the token alphabet) are integers >= 1,
    ``blanks`` an integer >= 0; T = 2·num_tokens + blanks + 1."""
    _check_n(n)
    check_positive_int("num_tokens", num_tokens)  # 0: no scored step
    check_positive_int("num_symbols", num_symbols)  # 0: no token to draw
    if not is_int(blanks) or blanks < 0:  # negative: the delimiter overwrote a token
        raise ValueError(f"blanks must be an integer >= 0, got {blanks!r}")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, num_symbols + 1, size=(n, num_tokens))
    T = 2 * num_tokens + blanks + 1
    seq = np.full((n, T), BLANK, dtype=np.int64)
    seq[:, :num_tokens] = tokens
    seq[:, num_tokens + blanks] = num_symbols + 1  # the delimiter
    targets = np.zeros((n, T), dtype=np.int64)
    targets[:, T - num_tokens :] = tokens - 1
    mask = np.zeros((n, T), dtype=bool)
    mask[:, T - num_tokens :] = True
    inputs = torch.nn.functional.one_hot(torch.from_numpy(seq), num_symbols + 2).float()
    return TaskBatch(inputs, torch.from_numpy(targets), torch.from_numpy(mask))


def regression_task(n: int, seed: int = 0, dim: int = 3, support: int = 10, query: int = 10) -> TaskBatch:
    """In-context linear regression. Returns inputs (n, support+query, dim+2), float targets.

    ``dim``, ``support`` and ``query`` are integers >= 1."""
    _check_n(n)
    check_positive_int("dim", dim)  # 0: w and x empty, every target 0
    check_positive_int("support", support)  # 0: nothing to infer w from
    check_positive_int("query", query)  # 0: no scored step
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, dim))
    x = rng.standard_normal((n, support + query, dim))
    y = np.einsum("nd,ntd->nt", w, x)
    inputs = np.zeros((n, support + query, dim + 2), dtype=np.float32)
    inputs[:, :, :dim] = x
    inputs[:, :support, dim] = y[:, :support]
    inputs[:, support:, dim + 1] = 1.0
    mask = np.zeros((n, support + query), dtype=bool)
    mask[:, support:] = True
    return TaskBatch(torch.from_numpy(inputs), torch.from_numpy(y.astype(np.float32)), torch.from_numpy(mask))


def _digits_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise FastWeightsError("the digits task needs scikit-learn: pip install 'fastweights[experiments]'") from err

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = load_digits()
    images = (data.data / 16.0).astype(np.float32)  # (1797, 64) in [0, 1]
    perm = np.random.default_rng(12345).permutation(len(images))
    cut = int(0.7 * len(images))
    idx = perm[:cut] if split == "train" else perm[cut:]
    return images[idx], data.target[idx]


def digits_few_shot(n: int, seed: int = 0, split: str = "train", ways: int = 5) -> TaskBatch:
    """5-way 1-shot episodes on sklearn digits. Returns inputs (n, 2·ways, 64+ways+1)."""
    _check_n(n)
    if not isinstance(ways, int) or not 2 <= ways <= 10:
        raise ValueError(f"ways must be an integer in 2..10, got {ways!r}")
    images, classes = _digits_pool(split)
    by_class = [np.flatnonzero(classes == c) for c in range(10)]
    rng = np.random.default_rng(seed)
    T, F = 2 * ways, 64 + ways + 1
    inputs = np.zeros((n, T, F), dtype=np.float32)
    targets = np.zeros((n, T), dtype=np.int64)
    for e in range(n):
        chosen = rng.choice(10, size=ways, replace=False)  # chosen[j] gets label j
        order = rng.permutation(ways)
        for j, c in enumerate(chosen):
            s, q = rng.choice(by_class[c], size=2, replace=False)
            inputs[e, j, :64] = images[s]
            inputs[e, j, 64 + j] = 1.0
            slot = ways + order[j]
            inputs[e, slot, :64] = images[q]
            inputs[e, slot, F - 1] = 1.0
            targets[e, slot] = j
    mask = np.zeros((n, T), dtype=bool)
    mask[:, ways:] = True
    return TaskBatch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(mask))

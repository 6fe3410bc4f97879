"""Rows for training and evaluation, built from a :class:`~fastweights.data.store.TokenStore`.

Packed rows: the documents of a split, in a seeded order per epoch, concatenated into one
endless token stream and cut into rows of ``seq_len`` tokens. Row ``r`` is tokens
``[r·L, (r+1)·L)`` of the stream, so a data position is just a row count. Each row carries:

* ``input_ids`` (L,) int64;
* ``position_ids`` (L,) int64, restarting at 0 at each document start and at the row
  start. Attention (transformers' packed-sequence masks) and fast weights reset there;
* ``targets`` (L,) int64, the next token, or -100 where the next token belongs to another
  document: no loss crosses a document boundary. (``targets`` is already shifted: position
  t predicts ``targets[t]``.)

Unpacked long rows (:func:`long_rows`): one document per row, cut to a length, for
long-context evaluation.
"""

from __future__ import annotations

import numpy as np
import torch

from fastweights.data.store import TokenStore

__all__ = ["IGNORE", "PackedRows", "long_rows", "row_fields"]

IGNORE = -100


def row_fields(tokens: np.ndarray, doc_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Fields of one row from ``L+1`` stream tokens and the document id of each.

    Args:
        tokens: (L+1,) token ids; the last one only serves as a target.
        doc_ids: (L+1,) an id per token; a change marks a document start.
    Returns:
        ``input_ids``, ``position_ids``, ``targets``, each (L,) int64.
    """
    L = len(tokens) - 1
    ids = doc_ids[:L]
    start = np.ones(L, dtype=bool)
    start[1:] = ids[1:] != ids[:-1]
    seg_start = np.maximum.accumulate(np.where(start, np.arange(L), 0))
    targets = tokens[1:].astype(np.int64)
    targets = np.where(doc_ids[1:] == ids, targets, IGNORE)
    return {
        "input_ids": tokens[:L].astype(np.int64),
        "position_ids": np.arange(L, dtype=np.int64) - seg_start,
        "targets": targets,
    }


class PackedRows:
    """Deterministic packed rows of ``seq_len`` tokens over ``store``; epoch ``e`` orders the
    documents by ``numpy.random.default_rng([seed, e]).permutation`` (``shuffle=False`` keeps
    corpus order)."""

    def __init__(self, store: TokenStore, seq_len: int, seed: int = 0, shuffle: bool = True):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if store.total_tokens < seq_len + 1:
            raise ValueError(f"the split has {store.total_tokens} tokens, fewer than one row of seq_len + 1 = "
                             f"{seq_len + 1}: lower seq_len or add documents")
        self.store, self.seq_len, self.seed, self.shuffle = store, seq_len, seed, shuffle
        self.epoch_tokens = store.total_tokens
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        """Rows in one epoch."""
        return (self.epoch_tokens - 1) // self.seq_len

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            n = len(self.store)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            ends = np.cumsum(self.store.lengths[order])
            self._epoch = (epoch, order, ends)
        return self._epoch[1], self._epoch[2]

    def _span(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Stream tokens [start, stop) and a document id per token (unique across epochs)."""
        toks, ids = [], []
        pos = start
        while pos < stop:
            epoch, off = divmod(pos, self.epoch_tokens)
            order, ends = self._order(epoch)
            k = int(np.searchsorted(ends, off, side="right"))
            doc_start = int(ends[k - 1]) if k else 0
            take = min(stop - pos, int(ends[k]) - off)
            d = self.store.doc(int(order[k]))
            toks.append(d[off - doc_start : off - doc_start + take])
            ids.append(np.full(take, epoch * len(self.store) + k, dtype=np.int64))
            pos += take
        return np.concatenate(toks), np.concatenate(ids)

    def row(self, r: int) -> dict[str, np.ndarray]:
        """Row ``r`` (any r >= 0; the stream repeats with a new order each epoch)."""
        toks, ids = self._span(r * self.seq_len, (r + 1) * self.seq_len + 1)
        return row_fields(toks, ids)

    def tail(self) -> dict[str, torch.Tensor] | None:
        """The tokens of one epoch after its last full row, as a (1, r) batch with r < seq_len
        (None when the rows use them all): with the rows, it covers every target of the split."""
        start = len(self) * self.seq_len
        if self.epoch_tokens - 1 <= start:
            return None
        fields = row_fields(*self._span(start, self.epoch_tokens))
        return {k: torch.from_numpy(v)[None] for k, v in fields.items()}

    def batch(self, first_row: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Rows ``first_row .. first_row + batch_size - 1`` stacked into (B, L) tensors."""
        rows = [self.row(first_row + i) for i in range(batch_size)]
        return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}


def long_rows(store: TokenStore, length: int, min_length: int | None = None, max_docs: int | None = None):
    """Unpacked rows: each document with at least ``min_length`` tokens (default ``length``),
    cut to its first ``length`` tokens, one per row, in store order. Yields
    ``(name, fields)`` with (1, L) tensors as in :func:`row_fields` (L <= ``length``)."""
    min_length = length if min_length is None else min_length
    count = 0
    for i in range(len(store)):
        if store.lengths[i] < max(min_length, 2):
            continue
        toks = np.asarray(store.doc(i)[: length + 1])
        ids = np.zeros(len(toks), dtype=np.int64)
        if len(toks) < length + 1:  # the whole document: its last token has no target
            toks = np.append(toks, 0)
            ids = np.append(ids, 1)
        fields = row_fields(toks, ids)
        yield store.names[i], {k: torch.from_numpy(v)[None] for k, v in fields.items()}
        count += 1
        if max_docs is not None and count >= max_docs:
            return

"""Language-model evaluation: perplexity over packed validation rows and the mean
next-token loss by position over long documents."""

from __future__ import annotations

import math
from contextlib import contextmanager
from numbers import Integral

import torch

from fastweights._progress import progress_bar
from fastweights.data.packing import PackedRows, long_rows
from fastweights.data.store import TokenStore
from fastweights.errors import FastWeightsError

__all__ = ["long_docs_error", "loss_by_position", "perplexity", "position_edges", "token_losses"]


@torch.no_grad()
def token_losses(model, fields: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token next-token loss (B, L) of a causal LM on a row (see ``row_fields``),
    0 where the target is ignored. Documents reset at ``position_ids == 0``."""
    from fastweights.train.trainer import causal_lm_loss

    device = next(model.parameters()).device
    f = {k: v.to(device) for k, v in fields.items()}
    on_gpu = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)
    with autocast:
        logits = model(input_ids=f["input_ids"], position_ids=f["position_ids"], use_cache=False).logits
    return causal_lm_loss(logits, f["targets"], reduction="none")


@contextmanager
def evaluating(model):
    """``model`` in eval mode inside the block; after it, every submodule in the mode it had."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def perplexity(model, store: TokenStore, seq_len: int, batch_size: int = 8, max_rows: int | None = None,
               progress: bool = True) -> dict:
    """Mean loss and perplexity over packed rows of ``store`` in corpus order (no shuffle);
    ``max_rows`` None (or more rows than the split has): the whole split, its last partial
    row included (every target once); else an integer >= 1.

    Returns ``{"loss", "perplexity", "tokens", "rows"}``. The model is evaluated in eval mode and
    left in its own mode."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, Integral) or max_rows < 1):
        raise ValueError(f"max_rows must be None (the whole split) or an integer >= 1, got {max_rows!r}")
    with evaluating(model):
        return _perplexity(model, store, seq_len, int(batch_size), max_rows, progress)


def _perplexity(model, store, seq_len, batch_size, max_rows, progress) -> dict:
    rows = PackedRows(store, seq_len, shuffle=False)
    n = len(rows) if max_rows is None else min(len(rows), max_rows)
    if n == 0:
        raise FastWeightsError(f"the split has fewer than {seq_len + 1} tokens: lower --seq-len")
    total, count = 0.0, 0
    for start in progress_bar(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = rows.batch(start, min(batch_size, n - start))
        losses = token_losses(model, batch)
        valid = batch["targets"] != -100
        total += losses.sum().item()
        count += int(valid.sum())
    tail = rows.tail() if max_rows is None or max_rows > len(rows) else None  # asked for more: the whole split
    if tail is not None:
        total += token_losses(model, tail).sum().item()
        count += int((tail["targets"] != -100).sum())
        n += 1
    loss = total / count
    return {"loss": loss, "perplexity": exp_loss(loss), "tokens": count, "rows": n}


def exp_loss(loss: float) -> float:
    """The perplexity ``exp(loss)``: inf where it overflows a float (math.exp raises), NaN for NaN."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def position_edges(length: int, first: int = 1024) -> list[int]:
    """Bucket edges ``[0, first, 2·first, 4·first, ...]`` up to ``length`` (the last edge)."""
    if not isinstance(first, int) or not isinstance(length, int) or first < 1 or length < 2:
        raise ValueError(f"need integers first >= 1 and length >= 2, got first={first!r}, length={length!r}")
    edges = [0]
    e = first
    while e < length:
        edges.append(e)
        e *= 2
    edges.append(length)
    return edges


def long_docs_error(store: TokenStore, length: int) -> str | None:
    """The error when no document of ``store`` has ``length`` tokens (else None)."""
    longest = int(store.lengths.max()) if len(store) else 0
    if longest >= length:
        return None
    return (f"no validation document has {length} tokens (the longest has {longest}): lower --length or use a "
            "corpus with longer documents")


def loss_by_position(model, store: TokenStore, length: int, first_bucket: int = 1024,
                     max_docs: int | None = None, min_length: int | None = None, progress: bool = True) -> dict:
    """Mean next-token loss in position buckets over long documents, one unpacked document
    per row, cut to ``length`` tokens. Buckets are ``[0, first)``, ``[first, 2·first)``,
    ``[2·first, 4·first)``, ... (position = index of the predicting token).

    Returns ``{"length", "documents", "buckets": [{"start", "end", "loss", "tokens"}], "loss"}``.
    The model is evaluated in eval mode and left in its own mode."""
    with evaluating(model):
        return _loss_by_position(model, store, length, first_bucket, max_docs, min_length, progress)


def _loss_by_position(model, store, length, first_bucket, max_docs, min_length, progress) -> dict:
    edges = position_edges(length, first_bucket)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.float64)
    ndocs = 0
    docs = long_rows(store, length, min_length=min_length, max_docs=max_docs)
    for _, fields in progress_bar(docs, desc="loss by position", unit="doc", disable=not progress,
                                  total=max_docs):
        losses = token_losses(model, fields)[0].double().cpu()
        valid = (fields["targets"][0] != -100).double()
        for b in range(len(edges) - 1):
            sums[b] += losses[edges[b] : edges[b + 1]].sum()
            counts[b] += valid[edges[b] : edges[b + 1]].sum()
        ndocs += 1
    if ndocs == 0:
        n = min_length or length
        raise FastWeightsError(long_docs_error(store, n) or f"no validation document has {n} tokens")
    buckets = [
        {"start": edges[b], "end": edges[b + 1], "loss": (sums[b] / counts[b]).item() if counts[b] else None,
         "tokens": int(counts[b])}
        for b in range(len(edges) - 1)
    ]
    return {"length": length, "documents": ndocs, "buckets": buckets, "loss": (sums.sum() / counts.sum()).item()}

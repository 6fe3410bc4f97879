"""Passkey (needle) retrieval: a random number hidden at a chosen depth in haystack text
from the corpus, followed by a question. A trial is correct when greedy decoding would
produce the whole number (every answer token is the argmax under teacher forcing)."""

from __future__ import annotations

import numpy as np
import torch

from fastweights._progress import progress_bar
from fastweights.data.store import TokenStore
from fastweights.data.tokenizer import text_prefix
from fastweights.errors import warn
from fastweights.eval.lm import evaluating

__all__ = ["haystack", "passkey_eval", "passkey_prompts", "passkey_sample"]

NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"
# left contexts tried by :func:`encode_in_text`, in order: the first whose tokens stay whole
LEFT_CONTEXTS = ("x", ".", "0", "a b")


def encode_in_text(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` as it tokenises after preceding text: ``tokenizer(context + text)``
    without the tokens of a short fixed left context (:data:`LEFT_CONTEXTS`). Encoded alone, a
    SentencePiece-style (Metaspace) tokenizer starts ``text`` with a word-start "▁" that never
    occurs mid-text; a byte-level BPE gives the same ids either way. Where every context's tokens
    merge with ``text``, warns and returns ``text`` encoded alone."""
    def enc(s):
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    for ctx in LEFT_CONTEXTS:
        head, ids = enc(ctx), enc(ctx + text)
        if ids[: len(head)] == head and len(ids) > len(head):
            return ids[len(head) :]
    warn(f"the tokenizer merges every left context {LEFT_CONTEXTS} with the passkey text {text[:24]!r}...: "
         "it is encoded alone, as it may not read mid-text")
    return enc(text)


def question_answer(tokenizer, key: int) -> tuple[list[int], list[int]]:
    """``(question, answer)`` ids: QUESTION + ANSWER encoded together (:func:`encode_in_text`), the
    answer being the tokens after their longest common prefix with the question encoded alone. So
    the scored tokens are those of the prompt's own text; where the tokenizer joins the question's
    last characters to the key (a SentencePiece "is▁"), they are part of the answer."""
    both, alone = encode_in_text(tokenizer, QUESTION + ANSWER.format(key=key)), encode_in_text(tokenizer, QUESTION)
    k = 0
    while k < min(len(both), len(alone)) and both[k] == alone[k]:
        k += 1
    if k == len(both):
        raise ValueError(f"the tokenizer encodes the question with and without the answer {key} alike")
    return both[:k], both[k:]


def haystack(store: TokenStore, tokens: int, eos_id: int | None = None, sep: list[int] | tuple = (),
             prefix: list[int] | tuple = ()) -> np.ndarray:
    """``tokens`` haystack token ids: the split's documents in order (repeated, with a warning, if
    the split is shorter), each without its opening ``prefix`` (the BOS that :func:`text_prefix` gives) and its
    closing ``eos_id``, and followed by ``sep``. A model trained on packed documents never reads
    past an EOS or a BOS within one sequence, so the prompt holds none but its own first BOS."""
    parts, n, rounds = [], 0, 0
    sep = np.asarray(sep, dtype=np.int64)
    while n < tokens:
        rounds += 1
        for i in range(len(store)):
            doc = np.asarray(store.doc(i), dtype=np.int64)
            if len(prefix) and doc[:len(prefix)].tolist() == list(prefix):
                doc = doc[len(prefix):]
            if eos_id is not None and len(doc) and doc[-1] == eos_id:
                doc = doc[:-1]
            if not len(doc):
                continue
            parts += [doc, sep]
            n += len(doc) + len(sep)
            if n >= tokens:
                break
        if n == 0:
            raise ValueError("the haystack split has no tokens")
    if rounds > 1:
        warn(f"the haystack split holds fewer than the {tokens} tokens a passkey prompt needs: its documents repeat "
             "in the haystack, and a model can copy the repeated text (a larger validation split, or shorter "
             "--passkey-lengths, avoid it)")
    return np.concatenate(parts)[:tokens]


def passkey_sample(tokenizer, hay: np.ndarray, length: int, depth: float, rng: np.random.Generator) -> dict:
    """One retrieval prompt of exactly ``length`` tokens, answer included.

    The prompt starts with the tokenizer's BOS where it puts one before a text
    (:func:`~fastweights.data.tokenizer.text_prefix`, P tokens); the needle starts at token
    ``round(depth · H)`` of the ``H`` haystack tokens (depth 0 = start, 1 = just before the
    question), at ``needle_start = P + round(depth · H)`` of the prompt. Returns ``input_ids``
    (length,) int64, ``needle_start``, ``needle_len``, ``answer_start``, ``answer_ids``, ``key``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = int(rng.integers(10000, 100000))
    # each piece as it reads mid-text, the answer as the prompt's own text tokenises it
    needle = encode_in_text(tokenizer, NEEDLE.format(key=key))
    question, answer = question_answer(tokenizer, key)
    prefix = text_prefix(tokenizer)  # a BOS, for the tokenizers that start texts with one
    h = length - len(prefix) - len(needle) - len(question) - len(answer)
    if h < 1:
        raise ValueError(f"length {length} is too short for a passkey prompt (needs > {length - h})")
    if len(hay) < h:
        raise ValueError(f"haystack has {len(hay)} tokens, fewer than the {h} needed")
    start = int(rng.integers(0, len(hay) - h + 1))
    filler = [int(t) for t in hay[start : start + h]]
    pos = round(depth * h)
    ids = prefix + filler[:pos] + needle + filler[pos:] + question + answer
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "needle_start": len(prefix) + pos,
        "needle_len": len(needle),
        "answer_start": len(ids) - len(answer),
        "answer_ids": torch.tensor(answer, dtype=torch.long),
        "key": key,
    }


def check_passkey_settings(lengths, depths, trials: int = 1, seed: int = 0) -> None:
    """Raise a ValueError naming the first bad setting of :func:`passkey_eval` (so that a caller
    can check them before other work)."""
    if not lengths or not depths:
        raise ValueError(f"passkey evaluation needs at least one length and one depth, got {list(lengths)} and "
                         f"{list(depths)}")
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"passkey lengths must be integers >= 1, got {n!r}")
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1:
            raise ValueError(f"passkey depths must be in [0, 1], got {d!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def passkey_prompts(tokenizer, store: TokenStore, lengths: list[int], depths: list[float], trials: int = 5,
                    seed: int = 0) -> list[dict]:
    """Every prompt of :func:`passkey_eval` (:func:`passkey_sample`), length by length, depth by
    depth, trial by trial: the settings and the lengths' room for the needle are checked here,
    before any model runs. The haystack's documents are joined by a blank line."""
    check_passkey_settings(lengths, depths, trials, seed)
    rng = np.random.default_rng(seed)
    sep = encode_in_text(tokenizer, "\n\n")
    hay = haystack(store, max(lengths), tokenizer.eos_token_id, sep, text_prefix(tokenizer))
    return [passkey_sample(tokenizer, hay, length, depth, rng)
            for length in lengths for depth in depths for _ in range(trials)]


@torch.no_grad()
def passkey_eval(model, tokenizer, store: TokenStore, lengths: list[int], depths: list[float],
                 trials: int = 5, seed: int = 0, progress: bool = True, prompts: list[dict] | None = None) -> dict:
    """Retrieval accuracy for each (length, depth). Returns ``{"lengths", "depths",
    "trials", "accuracy"}`` with ``accuracy[i][j]`` for ``lengths[i]``, ``depths[j]``.
    ``prompts``: those :func:`passkey_prompts` made for these settings (None: made here)."""
    if prompts is None:
        prompts = passkey_prompts(tokenizer, store, lengths, depths, trials, seed)
    device = next(model.parameters()).device
    hits = []
    with evaluating(model):
        for s in progress_bar(prompts, desc="passkey", unit="trial", disable=not progress):
            # the whole prompt, answer included: a causal model's logits before the last token do
            # not see it, and one forward scores every answer token
            ids = s["input_ids"][None].to(device)
            pos = torch.arange(ids.shape[1], device=device)[None]
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
            a = s["answer_start"]
            pred = logits[a - 1 : a - 1 + len(s["answer_ids"])].argmax(-1).cpu()
            hits.append(bool((pred == s["answer_ids"]).all()))
    per = np.array(hits, dtype=np.float64).reshape(len(lengths), len(depths), trials)  # the prompts' order
    acc = per.mean(-1).tolist()
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "accuracy": acc}

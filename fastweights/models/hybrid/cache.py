"""The single generation cache of the hybrid model: per layer whatever its mixer and MLP need
to continue exactly where the last forward stopped.

Per layer ``states[i] = {"mixer": ..., "mlp": ...}``:
* ``attention``: (k, v) of all earlier tokens (B, Hkv, M, dh); ``swa``: of the newest
  ``window - 1`` only (``fastweights.layers.attention.keep_window``);
* ``lact``: (k, v, LaCTState): the SWA keys and values (the newest ``window - 1``) plus the fast weights W1..W3, the
  momentum and the partial-chunk buffer (``fastweights.ops.lact.LaCTState``);
* ``gla`` / ``deltanet``: ``{"recurrent": (B, ...), "conv": tuple of (B, D, W) or None}``, fla's
  state after each row's last token (``fla_mixer.FlaMixer``);
* ``inplace_ttt`` MLP: its :class:`~fastweights.ops.inplace_ttt_decode.InPlaceTTTState` (the
  fast weights of the completed chunks, factored or dense, plus the open chunk's buffer), so a
  decoding step costs O(1) in the length, as in the converted models' ``InPlaceTTTCache``.
Shared across layers: ``key_doc`` (B, M) document ids and ``key_valid`` (B, M) padding mask of
all earlier tokens, ``seen`` (M), and ``ttt_tokens`` (per row, real tokens of its open document,
for the In-Place TTT step plans).

A forward that raises leaves the cache as it was before the call (:meth:`HybridCache.save`),
so a retry is exact. A cache belongs to the model configuration that filled it (:data:`STATE_KEYS`); another model,
another batch size, and cropping (fast-weight updates cannot be undone, so assisted and
speculative decoding are unsupported) raise :class:`~fastweights.errors.FastWeightsError`.
"""

from __future__ import annotations

import torch

from fastweights.errors import FastWeightsError
from fastweights.models.compat import crop_length
from fastweights.models.hybrid.compat import Cache, empty_cache_base
from fastweights.ops.inplace_ttt_decode import InPlaceTTTState
from fastweights.ops.lact import LaCTState

__all__ = ["STATE_KEYS", "HybridCache"]

# The config keys that decide what a layer keeps in the cache and how it reads it.
STATE_KEYS = ("num_hidden_layers", "mixers", "mlps", "sliding_window", "hidden_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "lact_heads", "lact_chunk_size", "lact_update", "lact_order",
              "ttt_chunk", "ttt_target")


def state_layout(config) -> dict:
    """The values of :data:`STATE_KEYS` in ``config`` (lists as tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k in STATE_KEYS for v in [getattr(config, k)]}


def _select(obj, index):
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, index.to(obj.device))
    if isinstance(obj, LaCTState):
        return obj.select(index.to(obj.w1.device))
    if isinstance(obj, InPlaceTTTState):
        obj.select(index)
        return obj
    if isinstance(obj, dict):
        return {k: _select(v, index) for k, v in obj.items()}
    return type(obj)(_select(v, index) for v in obj)


class HybridCache(Cache):
    """Generation cache for :class:`HybridForCausalLM`; see the module docstring."""

    def __init__(self, config):
        """``config``: the :class:`~fastweights.models.hybrid.HybridConfig` of the model that fills it."""
        empty_cache_base(self)
        self.layout = state_layout(config)
        self.states: list[dict | None] = [None] * config.num_hidden_layers
        self.key_doc: torch.Tensor | None = None
        self.key_valid: torch.Tensor | None = None
        self.seen = 0
        self.ttt_tokens: list[int] | None = None

    def save(self) -> tuple:
        """The cache as it is now, for :meth:`restore`. References, not copies: the layers build new
        tensors and states, and In-Place TTT states write into no tensor they found (their save)."""
        ttt = [s["mlp"].save() if s and isinstance(s.get("mlp"), InPlaceTTTState) else None for s in self.states]
        tokens = None if self.ttt_tokens is None else list(self.ttt_tokens)
        return list(self.states), ttt, self.key_doc, self.key_valid, self.seen, tokens

    def restore(self, saved: tuple) -> None:
        """Go back to what :meth:`save` returned (a forward that raised: a retry is then exact)."""
        states, ttt, self.key_doc, self.key_valid, self.seen, self.ttt_tokens = saved
        for state, held in zip(states, ttt, strict=True):
            if held is not None:
                state["mlp"].restore(held)
        self.states = states

    def check(self, config, batch: int) -> None:
        """Raise unless a model of ``config`` may continue this cache with ``batch`` rows."""
        other = state_layout(config)
        diff = [f"{k} {self.layout[k]!r} (model: {other[k]!r})" for k in STATE_KEYS if self.layout[k] != other[k]]
        if diff:
            raise FastWeightsError(f"this HybridCache was filled by a model with another configuration: "
                                   f"{'; '.join(diff)}; start a new cache for this model")
        if self.key_doc is not None and self.key_doc.shape[0] != batch:
            raise FastWeightsError(f"batch size changed in the middle of a cache: it holds {self.key_doc.shape[0]} "
                                   f"sequences, the input has {batch}; start a new cache for a new batch")

    def crop(self, tokens_to_remove: int) -> None:
        """Only a no-op crop is possible: fast-weight updates and SWA's dropped keys cannot be undone."""
        keep = crop_length(self.seen, tokens_to_remove)
        if keep < self.seen:
            raise FastWeightsError(
                f"cannot crop a HybridCache from {self.seen} to {keep} tokens: its states cannot be rolled back "
                "(assisted or speculative decoding is not supported by fastweights_hybrid models)")

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        """No layer is a linear-attention cache alone (transformers reads ``all(is_linear)`` to decide
        whether a continued ``generate`` can skip the cached tokens: it can, ``seen`` counts them;
        with the base class's empty layer list, ``all([])`` made it re-run the whole prompt)."""
        return [False] * len(self.states)

    def __len__(self) -> int:
        return len(self.states)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep rows ``beam_idx`` (beam search)."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.states = [_select(s, indices) for s in self.states]
        self.key_doc, self.key_valid = _select(self.key_doc, indices), _select(self.key_valid, indices)
        if self.ttt_tokens is not None:
            self.ttt_tokens = [self.ttt_tokens[i] for i in indices.tolist()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.key_doc is not None:
            idx = torch.arange(self.key_doc.shape[0], device=self.key_doc.device).repeat_interleave(repeats)
            self.batch_select_indices(idx)

"""``InPlaceTTTCache``: a Hugging Face ``DynamicCache`` that also carries the fast weights.

Converted models create it by themselves, in ``generate()`` and in a plain forward with
``use_cache=True``; pass ``outputs.past_key_values`` back to continue a sequence (decoding, or
streaming a long document piece by piece). Next to the attention keys and values, it holds for each
In-Place TTT layer an :class:`~fastweights.ops.inplace_ttt_decode.InPlaceTTTState` (the completed
chunks of the open document, factored or dense, plus the open chunk's buffer) and, per row, the
number of real tokens of its open document. Beam search's ``reorder_cache`` and the batch
``select``/``repeat`` operations of transformers act on both, so they stay consistent.

A model call that raises leaves the cache as it was before the call (attention and fast weights
alike; :meth:`InPlaceTTTCache.ttt_end`), so that the call can be retried.

Misuse fails loudly: a plain cache (e.g. from an unconverted model) given to a converted model, this
cache given to an unconverted model, a batch-size change in the middle of a cache, and a rollback
(``crop``) that would have to undo fast-weight updates.
"""

from __future__ import annotations

import torch

from fastweights.errors import FastWeightsError
from fastweights.layers.inplace_ttt import normalize_target
from fastweights.models.compat import DynamicCache, DynamicLayer, crop_length
from fastweights.ops.inplace_ttt_decode import STATE_FORMS, InPlaceTTTState, StepPlan

__all__ = ["InPlaceTTTCache", "ttt_settings"]


def ttt_settings(config) -> dict:
    """The settings of a converted model's config that shape its fast-weight state (a cache made
    for one model is wrong for a model whose settings differ)."""
    target = getattr(config, "ttt_target", "hidden")
    return {"ttt_chunk": int(config.ttt_chunk), "ttt_lr": float(config.ttt_lr),
            "ttt_target": normalize_target(target), "ttt_proj": bool(getattr(config, "ttt_proj", True)),
            "ttt_max_update_norm": getattr(config, "ttt_max_update_norm", None)}


class InPlaceTTTCache(DynamicCache):
    """Attention KV cache plus the fast-weight state of every In-Place TTT layer.

    Args:
        config: the converted model's config (it names the TTT layers in ``ttt_layers``).
        state_form: ``"auto"`` (factored while smaller than dense, then dense), ``"dense"`` or
            ``"factored"``; all three give the same outputs.
        **kwargs: passed on to ``DynamicCache`` (e.g. ``offloading``).
    """

    def __init__(self, config, state_form: str = "auto", **kwargs):
        layers = getattr(config, "ttt_layers", None)
        if not layers:
            raise FastWeightsError(
                f"InPlaceTTTCache needs the config of an In-Place TTT model (with ttt_layers); got a "
                f"{getattr(config, 'model_type', type(config).__name__)!r} config without them"
            )
        if state_form not in STATE_FORMS:
            raise ValueError(f"state_form must be one of {STATE_FORMS}, got {state_form!r}")
        super().__init__(config=config, **kwargs)
        self.ttt_layers = tuple(int(i) for i in layers)
        self.ttt_settings = ttt_settings(config)
        self.state_form = state_form
        self.ttt_states: dict[int, InPlaceTTTState] = {}
        self.ttt_tokens: list[int] | None = None  # per row: real tokens of its open document
        self._ttt_expect: int | None = None
        self._ttt_saved: tuple | None = None  # the cache before the model call under way (ttt_end)
        self._ttt_done: tuple | None = None  # the same for the call that ended, until its caller returns

    # ------------------------------------------------------------------ use by the model
    def ttt_begin(self, batch: int, length: int, real: torch.Tensor | None, starts: torch.Tensor | None,
                  layers: tuple[int, ...], settings: dict | None = None) -> StepPlan:
        """Start one model call of ``length`` tokens per row; returns the plan shared by its TTT layers.

        ``real`` (B, N) is False on padding, ``starts`` (B, N) True where a document starts;
        ``settings``: the calling model's :func:`ttt_settings`, which must be the cache's.
        Until :meth:`ttt_end`, the cache keeps what it needs to undo the call.
        """
        if self._ttt_saved is not None:  # an earlier call was interrupted without reaching ttt_end
            self.ttt_end(ok=False)
        self._ttt_done = None
        if tuple(layers) != self.ttt_layers:
            raise FastWeightsError(
                f"this InPlaceTTTCache holds fast weights for layers {list(self.ttt_layers)}, "
                f"but the model's In-Place TTT layers are {list(layers)}"
            )
        if settings is not None and settings != self.ttt_settings:
            diff = ", ".join(f"{k} {self.ttt_settings[k]!r} (the model: {settings[k]!r})"
                             for k in self.ttt_settings if settings[k] != self.ttt_settings[k])
            raise FastWeightsError(f"this InPlaceTTTCache was made for another model's fast weights: {diff}; "
                                   "start a new cache for this model")
        if self.ttt_tokens is None:
            if self.get_seq_length() > 0:
                raise FastWeightsError("this InPlaceTTTCache holds attention states but no fast weights")
            before = [0] * batch
        else:
            if len(self.ttt_tokens) != batch:
                raise ValueError(
                    f"batch size changed in the middle of a cache: the cache holds {len(self.ttt_tokens)} "
                    f"sequences, the input has {batch}; start a new cache for a new batch"
                )
            before = self.ttt_tokens
            seen = self.get_seq_length()
            if max(before, default=0) > seen:
                raise FastWeightsError(
                    f"this InPlaceTTTCache is inconsistent: its fast weights have read {max(before)} tokens, its "
                    f"attention only {seen}; start a new cache")
        plan = StepPlan(before, length, real, starts)
        self._ttt_saved = self._save()
        self.ttt_tokens = plan.after
        return plan

    def ttt_end(self, ok: bool) -> None:
        """Finish the model call begun by :meth:`ttt_begin`: keep what it wrote, or (``ok`` False: it
        raised) put the cache back as it was before the call, so that a retry gives what it would have.
        What it wrote can still be undone by :meth:`ttt_abort` until :meth:`ttt_release`."""
        saved, self._ttt_saved = self._ttt_saved, None
        self._ttt_expect = None
        if saved is not None and not ok:
            self._restore(saved)
        self._ttt_done = saved if ok else None

    def ttt_abort(self) -> None:
        """The causal-LM call around the model raised (after the model, e.g. its loss; or anything,
        a KeyboardInterrupt included, which skips the model's own hooks): undo the model call."""
        saved = self._ttt_saved if self._ttt_saved is not None else self._ttt_done
        self._ttt_saved = self._ttt_done = None
        self._ttt_expect = None
        if saved is not None:
            self._restore(saved)

    def ttt_release(self) -> None:
        """The causal-LM call around the model returned: its changes stay."""
        self._ttt_done = None

    def _save(self) -> tuple:
        # references, not copies: dynamic layers replace their tensors when they grow (torch.cat), and
        # the fast-weight states never write into a tensor they found (InPlaceTTTState.save); a full
        # attention layer keeps only its length, since holding its old tensors would double its memory
        layers = [(layer.get_seq_length(), None) if type(layer) is DynamicLayer and layer.is_initialized
                  else (None, dict(layer.__dict__)) for layer in self.layers]
        states = {i: state.save() for i, state in self.ttt_states.items()}
        return self.ttt_tokens, states, layers

    def _restore(self, saved: tuple) -> None:
        tokens, states, layers = saved
        self.ttt_tokens = tokens
        self.ttt_states = {i: self.ttt_states[i] for i in states}
        for i, state in self.ttt_states.items():
            state.restore(states[i])
        del self.layers[len(layers):]
        for layer, (length, attrs) in zip(self.layers, layers, strict=True):
            if attrs is not None:
                layer.__dict__.clear()
                layer.__dict__.update(attrs)
            elif layer.get_seq_length() > length:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]

    def ttt_layer(self, layer_idx: int, chunk_size: int) -> InPlaceTTTState:
        """The state of TTT layer ``layer_idx``; arms the check in :meth:`update` for that layer."""
        state = self.ttt_states.get(layer_idx)
        if state is None:
            state = self.ttt_states[layer_idx] = InPlaceTTTState(chunk_size, self.state_form)
        self._ttt_expect = layer_idx
        return state

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Attention update; for a TTT layer, only a converted model (which armed it) may call it."""
        if layer_idx in self.ttt_layers:
            if self._ttt_expect != layer_idx:
                raise FastWeightsError(
                    f"an InPlaceTTTCache was used by a model whose layer {layer_idx} is not an In-Place TTT "
                    "layer (an unconverted model?); its fast weights would be silently dropped. Use a "
                    "plain DynamicCache with unconverted models"
                )
            self._ttt_expect = None
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # ------------------------------------------------------------------ transformers' batch ops
    def _ttt_select(self, index: torch.Tensor) -> None:
        index = index.to(torch.long).flatten()
        if self.ttt_tokens is not None:
            self.ttt_tokens = [self.ttt_tokens[i] for i in index.tolist()]
        for state in self.ttt_states.values():
            state.select(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._ttt_select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._ttt_select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.ttt_tokens is not None:
            self._ttt_select(torch.arange(len(self.ttt_tokens)).repeat_interleave(repeats))

    def reset(self) -> None:
        super().reset()
        self.ttt_states.clear()
        self.ttt_tokens = None
        self._ttt_saved = None

    def crop(self, tokens_to_remove: int) -> None:
        """Only a no-op crop is possible: fast-weight updates cannot be undone."""
        seen = self.get_seq_length()
        keep = crop_length(seen, tokens_to_remove)
        if keep < seen and self.ttt_tokens is not None:
            raise FastWeightsError(
                f"cannot crop an InPlaceTTTCache from {seen} to {keep} tokens: fast-weight updates cannot be "
                "rolled back (assisted or speculative decoding is not supported with In-Place TTT)"
            )
        super().crop(tokens_to_remove)

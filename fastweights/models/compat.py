"""The one place where fastweights meets transformers internals that differ between versions.

Supported: transformers 5.17 (the GPU machines) up to the newest 5.x (checked: 5.17, 5.23 and
5.24). 5.24 renamed the cache argument ``past_key_values`` to ``cache`` (:data:`CACHE_KWARG`,
:func:`take_cache`).
For the In-Place TTT cache, the two agree on everything used here: ``DynamicCache(config=...)``,
``Cache.update(key, value, layer_idx, *args, **kwargs)``, ``reorder_cache`` / ``crop`` /
``batch_repeat_interleave`` / ``batch_select_indices`` / ``reset``, and
``GenerationMixin._prepare_cache_for_generation(generation_config, model_kwargs, ...)``. Both
resolve ``use_cache`` inside the decorated ``forward`` (``merge_with_config_defaults``), i.e. after
forward pre-hooks run, so :func:`resolve_use_cache` repeats that rule. Should a later release
change any of this, adapt it here.

One difference matters: gradient checkpointing (``GradientCheckpointingLayer``) wraps a decoder
layer's ``__call__`` in 5.17, so its forward pre-hooks run again in the backward recomputation,
but only its ``forward`` in 5.23, so they do not. Each model call's TTT inputs therefore travel in
the decoder layers' kwargs (which both keep for the recomputation) to a pre-hook on the layer's
attention, inside the layer's forward; see ``fastweights.models.inplace_ttt._capture_model_inputs``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["CACHE_KWARG", "TRANSFORMERS_VERSION", "DynamicCache", "DynamicLayer", "cache_implementation",
           "check_dynamic_cache", "checkpointing_drops_cache", "crop_length", "enable_activation_checkpointing",
           "hf_progress_bars", "keep_positions", "own_config", "refuse_assisted_decoding",
           "refuse_continuous_batching", "resolve_use_cache", "take_cache"]

TRANSFORMERS_VERSION = Version(transformers.__version__)
if TRANSFORMERS_VERSION < Version("5.17"):
    raise ImportError(f"fastweights needs transformers >= 5.17, found {transformers.__version__}")

try:  # transformers >= 5.23
    from transformers.modeling_utils import slice_logits_to_keep as _slice_logits_to_keep
except ImportError:
    _slice_logits_to_keep = None


# 5.24 renamed the models' cache argument (and generate's model_kwargs key) from
# ``past_key_values`` to ``cache``, and the outputs' field likewise; the old names still work
# there, with a deprecation warning (also when reading ``output.past_key_values``, which every
# supported release still has). Read ``getattr(output, CACHE_KWARG)`` where no warning should show.
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= Version("5.24") else "past_key_values"
_OLD_CACHE_KWARG = "past_key_values"


def take_cache(kwargs: dict):
    """The cache that a model call (or generate's ``model_kwargs``) carries under either name,
    ``cache`` or ``past_key_values``, left under :data:`CACHE_KWARG` only (so a cache given under
    the other release's name is not silently ignored)."""
    given = [kwargs.pop(name) for name in ("cache", _OLD_CACHE_KWARG) if name in kwargs]
    caches = [c for c in given if c is not None]
    if len(caches) == 2 and caches[0] is not caches[1]:
        raise ValueError("give the cache once: both cache and past_key_values were passed")
    cache = caches[0] if caches else None
    if given:
        kwargs[CACHE_KWARG] = cache
    return cache


def own_config(model: nn.Module) -> None:
    """Give ``model`` a config of its own before converting it in place: a copy of its config,
    which every submodule that held the old object now holds instead. ``from_config(cfg)`` does
    not copy ``cfg``, so without this a conversion would also rewrite other models built from it
    (and ``cfg`` itself)."""
    old = model.config
    new = copy.deepcopy(old)
    for m in model.modules():
        if m.__dict__.get("config") is old:
            m.config = new


@functools.cache
def _checkpointing_keeps_cache_without_grad() -> bool:
    """Whether gradient checkpointing leaves the cache alone when gradients are off (generating
    from a model in training mode): transformers 5.24 checks ``torch.is_grad_enabled()`` in
    ``GradientCheckpointingLayer.__call__`` and ``merge_with_config_defaults``; 5.17 drops the
    cache in training mode whatever the grad mode."""
    from transformers import modeling_layers

    try:  # the class wraps __call__ in 5.17 and forward (through __init_subclass__) in 5.24: read the module
        return "is_grad_enabled" in inspect.getsource(modeling_layers)
    except (OSError, TypeError):  # no source (a frozen install): the older, stricter rule
        return False


def checkpointing_drops_cache(base_model: nn.Module) -> bool:
    """Whether transformers drops a cache in this call of ``base_model``: gradient checkpointing in
    training mode (with gradients on, in the releases that check them)."""
    return bool(base_model.training and getattr(base_model, "gradient_checkpointing", False)
                and (torch.is_grad_enabled() or not _checkpointing_keeps_cache_without_grad()))


def resolve_use_cache(base_model: nn.Module, kwargs: dict) -> bool:
    """The ``use_cache`` a base model's forward will use, as seen from a forward pre-hook.

    ``use_cache=None`` falls back to ``config.use_cache``; gradient checkpointing in training
    switches it off (transformers' ``merge_with_config_defaults``; :func:`checkpointing_drops_cache`).
    """
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(base_model.config, "use_cache", False)
    if use_cache and checkpointing_drops_cache(base_model):
        return False
    return bool(use_cache)


def cache_implementation(generation_config) -> str | None:
    """The cache kind ``generate`` was asked for (None: the default dynamic cache)."""
    return getattr(generation_config, "cache_implementation", None)


def check_dynamic_cache(generation_config, what: str) -> None:
    """Raise unless ``generate`` asks for the default (dynamic) cache, the only kind that a
    fast-weight model's cache (carrying ``what``) can stand in for, or for no cache at all
    (``use_cache=False``, with which transformers ignores ``cache_implementation``)."""
    from fastweights.errors import FastWeightsError

    if generation_config.use_cache is False:
        return
    impl = cache_implementation(generation_config)
    if impl not in (None, "dynamic"):
        raise FastWeightsError(f"cache_implementation={impl!r} cannot carry {what}; use the default (dynamic) cache")


def refuse_assisted_decoding(self, *args, **kwargs):
    """``GenerationMixin._assisted_decoding`` (assisted and prompt-lookup decoding, all 5.x
    releases) for a fast-weight model: refused by name before any forward pass. A rejected
    candidate token needs the cache cropped, which fast weights cannot be; without this the
    refusal came from ``crop`` partway through, and only when a candidate was rejected."""
    from fastweights.errors import FastWeightsError

    raise FastWeightsError(f"assisted or speculative decoding (assistant_model, prompt_lookup_num_tokens) is not "
                           f"supported by {type(self).__name__}: its fast weights cannot be rolled back when a "
                           "candidate token is rejected")


def refuse_continuous_batching(self, *args, **kwargs):
    """``ContinuousMixin.init_continuous_batching`` (all 5.x releases) for a fast-weight model: the
    entry of ``generate_batch``, ``continuous_batching_context_manager`` and
    ``generate(cache_implementation="paged")``, refused by name before its background thread starts.
    The paged cache has no room for fast weights; without this the model's refusal was only logged by
    that thread, ``generate`` returned the prompts alone and ``generate_batch`` failed requests."""
    from fastweights.errors import FastWeightsError

    raise FastWeightsError(f"continuous batching (generate_batch, init_continuous_batching, "
                           f"cache_implementation='paged') is not supported by {type(self).__name__}: its paged "
                           "cache cannot carry fast weights; use generate() with the default (dynamic) cache")


def crop_length(seen: int, tokens_to_remove: int) -> int:
    """The length that ``Cache.crop(tokens_to_remove)`` leaves of ``seen`` tokens: a negative value
    removes that many (0 removes none); a positive one is the length to keep (deprecated in 5.17,
    refused by later releases, whose own ``crop`` then raises)."""
    if tokens_to_remove <= 0:
        return max(seen + tokens_to_remove, 0)
    return min(tokens_to_remove, seen)


def keep_positions(x, keep):
    """Slice (B, N, d) as a causal LM's ``logits_to_keep`` does: an int keeps the last ``keep``
    positions (0: all), a 1-D tensor selects positions, a 2-D integer tensor (B, K) positions per
    row, a 2-D bool (B, N) mask the True positions (flattened to (count, d)). transformers >= 5.23
    has it as ``modeling_utils.slice_logits_to_keep``, used when there; 5.17 slices inline (used by
    the FWL head, which makes the model compute every position and slices afterwards, and by the
    hybrid model)."""
    if _slice_logits_to_keep is not None:
        return _slice_logits_to_keep(x, keep)
    if torch.is_tensor(keep) and keep.ndim == 2:
        return x[keep] if keep.dtype == torch.bool else torch.take_along_dim(x, keep[..., None], dim=1)
    if isinstance(keep, int):
        return x if keep == 0 else x[:, -keep:]
    return x[:, keep]


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Recompute each decoder layer's activations in the backward pass (Hugging Face's
    ``activation_checkpointing_enable``; ``gradient_checkpointing_enable`` before 5.23)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
    kw = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


@contextlib.contextmanager
def hf_progress_bars(enabled: bool):
    """transformers' own progress bars (loading and saving models) on or off inside the block,
    as they were afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()

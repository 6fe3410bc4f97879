"""Every difference between the transformers releases we support (5.17 … newest) is handled
here, so the rest of the package imports these names only.

* ``PreTrainedConfig``: the 5.x name (``PretrainedConfig`` is an alias).
* :func:`empty_cache_base`: ``Cache.__init__`` requires either ``layers`` or
  ``layer_class_to_replicate``; our cache keeps its own per-layer state and passes an empty
  layer list.
* ``Cache.is_compileable`` is a property in newer releases and read by
  ``prepare_inputs_for_generation``; :class:`HybridCache` overrides it the same way in all.
* ``GradientCheckpointingLayer`` (``transformers.modeling_layers``) wraps ``__call__`` in 5.17 and
  ``forward`` in newer releases; the hybrid blocks have no forward hooks, so both recompute the same.
* ``_supports_default_dynamic_cache`` (GenerationMixin, a classmethod in all 5.x releases)
  decides whether ``generate()`` builds a ``DynamicCache``; returning False lets our model
  create its own cache on the first forward.
* ``GenerationMixin._assisted_decoding`` (all 5.x releases) runs assisted and prompt-lookup
  decoding; :class:`HybridForCausalLM` overrides it to refuse them by name.
"""

from __future__ import annotations

import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

__all__ = [
    "TRANSFORMERS_VERSION",
    "BaseModelOutputWithPast",
    "Cache",
    "CausalLMOutputWithPast",
    "GenerationMixin",
    "GradientCheckpointingLayer",
    "PreTrainedConfig",
    "PreTrainedModel",
    "empty_cache_base",
]

TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2])


def empty_cache_base(cache: Cache) -> None:
    """Initialise the ``Cache`` base of a cache that keeps its own per-layer state."""
    Cache.__init__(cache, layers=[])

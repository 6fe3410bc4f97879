"""Fast Weight Layers for Hugging Face causal LMs: ``add_fwl``, generation cache, save and load.

``add_fwl(model)`` changes one model instance: its ``lm_head`` becomes :class:`FWLHead`
(the same unembedding ``weight``/``bias`` plus an :class:`FastWeightLayer` under
``lm_head.fwl``), one instance pre-hook hands the head the token ids (the next-token
targets), the attention mask, the position ids and the cache, and the instance's class and
its config's class become registered subclasses (``FWLQwen3ForCausalLM``, model_type
``fwl_qwen3``). No modeling file is copied and no class is patched. ``save_pretrained``
writes safetensors plus the config keys ``fwl_expansion``, ``fwl_step_size``, ``fwl_eps``,
``fwl_block_size``, ``fwl_residual``, ``fwl_grad_scale`` and ``fwl_tied``;
``AutoModelForCausalLM.from_pretrained`` loads it after ``import fastweights``.

**Generation.** The FWL state of a sequence is the summed per-token gradients of its
document so far (:class:`~fastweights.ops.fwl.FWLState`, one (out, in) matrix per dense
kernel) plus the body output of its last token, whose gradient needs the next token. It
lives in :class:`FWLCache`, a ``DynamicCache`` subclass that the pre-hook puts in place of an
empty cache, so ``generate()`` carries it without changes. Cached logits equal the full
forward's.

Differences between transformers releases (how ``logits_to_keep`` slices, how ``use_cache``
resolves) are handled in :mod:`fastweights.models.compat`.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache

from fastweights.errors import FastWeightsError
from fastweights.layers.fwl import DEFAULT_GRAD_SCALE, DEFAULT_STEP_SIZE, FastWeightLayer
from fastweights.models.compat import (
    CACHE_KWARG,
    DynamicCache,
    check_dynamic_cache,
    crop_length,
    keep_positions,
    own_config,
    refuse_assisted_decoding,
    refuse_continuous_batching,
    resolve_use_cache,
    take_cache,
)
from fastweights.ops.fwl import IGNORE, FWLState

__all__ = ["FWLCache", "FWLHead", "add_fwl", "fwl_layer", "has_fwl", "register_fwl_family"]

PREFIX = "fwl_"
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


# --------------------------------------------------------------------------- cache
class FWLCache(DynamicCache):
    """A ``DynamicCache`` that also carries the FWL state of each row.

    ``fwl_state``: :class:`FWLState` (B, ...) of the open documents; ``fwl_last``: body
    output (B, d) of the last token read, whose next-token gradient is added when the next
    token arrives; ``fwl_last_valid``: (B,) bool, whether that token was a real token.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fwl_state: FWLState | None = None
        self.fwl_last: torch.Tensor | None = None
        self.fwl_last_valid: torch.Tensor | None = None

    def _index_fwl(self, fn) -> None:
        if self.fwl_state is not None:
            self.fwl_state = FWLState(*(fn(t) for t in self.fwl_state))
            self.fwl_last, self.fwl_last_valid = fn(self.fwl_last), fn(self.fwl_last_valid)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._index_fwl(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._index_fwl(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._index_fwl(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Only a no-op crop is possible: the summed gradients cannot be undone."""
        seen = self.get_seq_length()
        keep = crop_length(seen, tokens_to_remove)
        if self.fwl_state is not None and keep < seen:
            raise FastWeightsError(f"cannot crop an FWLCache from {seen} to {keep} tokens: its summed gradients "
                                   "cannot be rolled back (assisted or speculative decoding is not supported with FWL)")
        super().crop(tokens_to_remove)


# --------------------------------------------------------------------------- head
class _Context:
    """What the model pre-hook hands the head for one forward."""

    def __init__(self, input_ids, attention_mask, position_ids, cache, keep):
        self.input_ids, self.attention_mask, self.position_ids = input_ids, attention_mask, position_ids
        self.cache, self.keep = cache, keep


class FWLHead(nn.Module):
    """``lm_head`` replacement: FWL block, then an unembedding.

    Keeps the unembedding's ``weight`` (V, s) and ``bias`` under their old names, so
    checkpoints of the base model still line up; the block is ``fwl``. With ``own_weight``
    the unembedding is a copy of ``lm_head``'s, no longer shared with the input embedding (as
    in the reference code, whose FWL block has its own unembedding); otherwise it is
    ``lm_head``'s own tensors, tied as they were.
    """

    def __init__(self, lm_head: nn.Linear, fwl: FastWeightLayer, own_weight: bool = False):
        super().__init__()
        copy = (lambda t: None if t is None else nn.Parameter(t.detach().clone())) if own_weight else (lambda t: t)
        self.weight = copy(lm_head.weight)
        self.bias = copy(lm_head.bias)
        self.fwl = fwl
        self.ctx: _Context | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, n, V) for body outputs ``hidden`` (B, n, d) of the current call."""
        ctx, self.ctx = self.ctx, None
        if ctx is None:
            raise FastWeightsError("the FWL head needs the model's inputs: call the model, not lm_head")
        ids = ctx.input_ids
        B, n = ids.shape
        if hidden.shape[:2] != (B, n):
            raise FastWeightsError(f"FWL head got hidden states {tuple(hidden.shape)} for input_ids {(B, n)}")
        mask = torch.ones_like(ids, dtype=torch.bool) if ctx.attention_mask is None else \
            ctx.attention_mask[:, -n:].bool()
        pos = ctx.position_ids
        if pos is not None:
            pos = pos.expand(B, n)
        cache = ctx.cache
        state = None if cache is None else cache.fwl_state
        targets = torch.full_like(ids, IGNORE)
        targets[:, :-1] = torch.where(mask[:, :-1] & mask[:, 1:], ids[:, 1:], IGNORE)
        if pos is not None:  # no target across a document boundary
            targets[:, :-1] = torch.where(pos[:, 1:] == 0, IGNORE, targets[:, :-1])
        if state is not None:  # prepend the last token read: its target is the first new token
            first = torch.where(cache.fwl_last_valid & mask[:, 0], ids[:, 0], IGNORE)
            if pos is not None:
                first = torch.where(pos[:, 0] == 0, IGNORE, first)
            hidden = torch.cat([cache.fwl_last.unsqueeze(1).to(hidden.dtype), hidden], 1)
            targets = torch.cat([first.unsqueeze(1), targets], 1)
            pos = torch.cat([ids.new_ones(B, 1), ids.new_ones(B, n) if pos is None else pos], 1)
        logits, new_state = self.fwl(hidden, targets, self.weight, self.bias, position_ids=pos, state=state)
        if state is not None:
            logits, hidden = logits[:, 1:], hidden[:, 1:]
        if cache is not None:
            cache.fwl_state = new_state
            cache.fwl_last, cache.fwl_last_valid = hidden[:, -1], mask[:, -1]
        return keep_positions(logits, ctx.keep)


def _positional_as_keywords(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``forward``'s positional arguments moved into ``kwargs`` by their names (``m(ids, mask)`` is
    ``m(input_ids=ids, attention_mask=mask)``), so that the hook reads them as the model does."""
    if not args:
        return args, kwargs
    params = list(inspect.signature(type(model).forward).parameters.values())[1:len(args) + 1]  # after self
    if len(params) < len(args) or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.name in kwargs
                                      for p in params):
        return args, kwargs  # forward reports the mistake itself
    return (), {**{p.name: a for p, a in zip(params, args, strict=True)}, **kwargs}


def _capture_inputs(model: PreTrainedModel, args, kwargs):
    """Causal-LM pre-hook: hand the FWL head its inputs; put an :class:`FWLCache` in place."""
    args, kwargs = _positional_as_keywords(model, args, kwargs)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        raise FastWeightsError("an FWL model needs input_ids (its fast weights learn from the next tokens), "
                               "not only inputs_embeds")
    cache = take_cache(kwargs)
    use_cache = resolve_use_cache(getattr(model, "model", model), kwargs)
    if isinstance(cache, Cache) and not isinstance(cache, FWLCache):
        if cache.get_seq_length() > 0:
            raise FastWeightsError(f"an FWL model needs an FWLCache, got a filled {type(cache).__name__}")
        cache = None
    if isinstance(cache, FWLCache) and cache.fwl_last is not None and cache.fwl_last.shape[0] != ids.shape[0]:
        raise FastWeightsError(f"batch size changed in the middle of a cache: it holds {cache.fwl_last.shape[0]} "
                               f"sequences, the input has {ids.shape[0]}; start a new cache for a new batch")
    if cache is None and use_cache:
        cache = FWLCache(config=model.config)
    if cache is not None:
        kwargs[CACHE_KWARG] = cache
    head: FWLHead = model.lm_head
    keep = kwargs.get("logits_to_keep", 0)
    if model._fwl_takes_keep:
        kwargs["logits_to_keep"] = 0
    head.ctx = _Context(ids, kwargs.get("attention_mask"), kwargs.get("position_ids"), cache, keep)
    return args, kwargs


# --------------------------------------------------------------------------- resizing
def _resized_head(model, base_model: type, head, *args, **kwargs):
    """transformers' ``_get_resized_lm_head`` for an :class:`FWLHead` (which needs an
    ``nn.Linear``): the unembedding resized as the ``nn.Linear`` it stands for (the old rows
    kept, new ones initialised by transformers), in the same head with the same block."""
    if not isinstance(head, FWLHead):
        return base_model._get_resized_lm_head(model, head, *args, **kwargs)
    V, s = head.weight.shape
    linear = nn.Linear(s, V, bias=head.bias is not None, device="meta")
    linear.weight, linear.bias = head.weight, head.bias
    new = base_model._get_resized_lm_head(model, linear, *args, **kwargs)
    if new is not linear:
        head.weight, head.bias = new.weight, new.bias
    return head


def _resize_token_embeddings(model, base_model: type, *args, **kwargs):
    """transformers' ``_resize_token_embeddings``, which sets the head's ``requires_grad`` to its
    weight's: the FWL block keeps its own."""
    block = [(p, p.requires_grad) for p in model.lm_head.fwl.parameters()] if has_fwl(model) else []
    out = base_model._resize_token_embeddings(model, *args, **kwargs)
    for p, grad in block:
        p.requires_grad_(grad)
    return out


# --------------------------------------------------------------------------- registry
_REGISTERED: dict[str, tuple[type, type]] = {}


def register_fwl_family(model_type: str) -> tuple[type, type]:
    """Create and register the ``fwl_<model_type>`` config and causal-LM subclasses."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if model_type.startswith(PREFIX):
        model_type = model_type[len(PREFIX):]
    if model_type in _REGISTERED:
        return _REGISTERED[model_type]
    try:
        base_cfg = CONFIG_MAPPING[model_type]
        base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_cfg]
    except KeyError as err:
        raise FastWeightsError(f"model type {model_type!r} has no causal-LM class in transformers") from err
    mod = sys.modules[__name__]
    cfg_cls = type("FWL" + base_cfg.__name__, (base_cfg,), {"model_type": PREFIX + model_type,
                                                           "__module__": __name__})

    def __init__(self, config, *args, **kwargs):
        base_model.__init__(self, config, *args, **kwargs)
        _install(self, _options_from_config(config))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        check_dynamic_cache(generation_config, "the FWL state")
        base_model._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)

    def _get_resized_lm_head(self, old_lm_head, *args, **kwargs):
        return _resized_head(self, base_model, old_lm_head, *args, **kwargs)

    def _resize_token_embeddings_fwl(self, *args, **kwargs):
        return _resize_token_embeddings(self, base_model, *args, **kwargs)

    model_cls = type("FWL" + base_model.__name__, (base_model,), {
        "config_class": cfg_cls, "__init__": __init__, "__module__": __name__,
        "_prepare_cache_for_generation": _prepare_cache_for_generation, "_assisted_decoding": refuse_assisted_decoding,
        "init_continuous_batching": refuse_continuous_batching,
        "_get_resized_lm_head": _get_resized_lm_head, "_resize_token_embeddings": _resize_token_embeddings_fwl,
        "__doc__": f"{base_model.__name__} with a Fast Weight Layer before the unembedding (see add_fwl).",
    })
    setattr(mod, cfg_cls.__name__, cfg_cls)
    setattr(mod, model_cls.__name__, model_cls)
    AutoConfig.register(PREFIX + model_type, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    _REGISTERED[model_type] = (cfg_cls, model_cls)
    return cfg_cls, model_cls


# --------------------------------------------------------------------------- convert
def _options_from_config(config) -> dict:
    if getattr(config, "fwl_expansion", None) is None:
        raise FastWeightsError(f"config of type {config.model_type!r} has no fwl_expansion: not an FWL model")
    return {"expansion": int(config.fwl_expansion), "step_size": float(config.fwl_step_size),
            "eps": float(config.fwl_eps), "block_size": int(config.fwl_block_size),
            "residual": bool(getattr(config, "fwl_residual", False)),
            # checkpoints written before fwl_tied existed read the model's (tied) unembedding
            "tied": bool(getattr(config, "fwl_tied", True)),
            # checkpoints written before fwl_grad_scale existed were trained with the plain sum (1.0)
            "grad_scale": float(getattr(config, "fwl_grad_scale", 1.0))}


def _install(model: PreTrainedModel, options: dict) -> None:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise FastWeightsError(f"model type {model.config.model_type!r} is not supported: add_fwl needs an "
                               f"nn.Linear lm_head, got {type(head).__name__}")
    options = dict(options)
    tied = options.pop("tied")
    d = head.in_features
    fwl = FastWeightLayer(d, d, **options).to(device=head.weight.device, dtype=head.weight.dtype)
    shared = head.weight is getattr(model.get_input_embeddings(), "weight", None)
    model.lm_head = FWLHead(head, fwl, own_weight=not tied and shared)
    if not tied:
        model.config.tie_word_embeddings = False
    model._fwl_takes_keep = "logits_to_keep" in inspect.signature(type(model).forward).parameters
    model.register_forward_pre_hook(_capture_inputs, with_kwargs=True)


def has_fwl(model: nn.Module) -> bool:
    """Whether the model's output head is an FWL head."""
    return isinstance(getattr(model, "lm_head", None), FWLHead)


def fwl_layer(model: nn.Module) -> FastWeightLayer:
    """The model's :class:`FastWeightLayer`."""
    if not has_fwl(model):
        raise FastWeightsError("model has no FWL head (use add_fwl)")
    return model.lm_head.fwl


def add_fwl(model: PreTrainedModel, *, expansion: int = 4, step_size: float = DEFAULT_STEP_SIZE,
            eps: float = 1e-5, block_size: int = 256, residual: bool = False,
            grad_scale: float = DEFAULT_GRAD_SCALE, tied: bool = False) -> PreTrainedModel:
    """Put a Fast Weight Layer between the body and ``lm_head`` of a causal LM, in place.

    Args:
        model: a transformers causal LM whose ``lm_head`` is an ``nn.Linear``.
        expansion: FWL hidden width = ``expansion`` × hidden size (4 in the paper).
        step_size: initial per-tensor step size (0.01 in the paper); learnable.
        eps: LayerNorm epsilon of the block.
        block_size: chunk length of the parallel form.
        residual: our variant (not in the paper): the unembedding reads ``h + block(h)`` and
            the block's LayerNorm gain starts at 0. With ``step_size=0`` too, the converted
            model equals the base model until trained; with steps > 0 the fast gain and bias
            move it by O(step size).
        grad_scale: constant factor on each token's loss before its inner gradient is taken
            (the reference code uses the batch-mean loss: 1/(tokens per batch)); see
            :class:`~fastweights.layers.fwl.FastWeightLayer`.
        tied: read the block's output with the model's own unembedding, tied to the input
            embedding if the model ties them. The default (False) follows the reference code:
            the block gets its own unembedding, initialised as a copy of ``lm_head``'s, and
            the config's ``tie_word_embeddings`` becomes False. A unembedding shared with the
            input embedding has to serve both the body's input and the block's output space;
            trained that way the SPEC block learned far more slowly (docs/fwl.md).

    Without ``residual`` the block is freshly initialised and is not an identity, so a
    pretrained model needs training after the conversion.
    """
    if not isinstance(model, PreTrainedModel):
        raise FastWeightsError(f"add_fwl needs a transformers PreTrainedModel, got {type(model).__name__}")
    if has_fwl(model):
        raise FastWeightsError("model already has an FWL head")
    from fastweights.models.inplace_ttt import PREFIX as TTT_PREFIX  # inplace_ttt imports this module
    from fastweights.models.inplace_ttt import is_converted

    if model.config.model_type == "fastweights_hybrid":
        raise FastWeightsError("a fastweights_hybrid model cannot take an FWL head: its HybridCache and the FWL's "
                               "cache (FWLCache) cannot be one; add LaCT or In-Place TTT layers through its config")
    if model.config.model_type.startswith(TTT_PREFIX) or is_converted(model):
        raise FastWeightsError("an In-Place TTT model cannot also take an FWL head: each needs its own generation "
                               "cache (InPlaceTTTCache, FWLCache)")
    options = {"expansion": expansion, "step_size": float(step_size), "eps": float(eps), "block_size": block_size,
               "residual": bool(residual), "grad_scale": float(grad_scale), "tied": bool(tied)}
    cfg_cls, model_cls = register_fwl_family(model.config.model_type)
    own_config(model)
    _install(model, options)
    model.config.__class__ = cfg_cls
    model.config.__dict__.pop("model_type", None)  # a loaded config's own copy would hide the new type
    for key, val in options.items():
        setattr(model.config, "fwl_" + key, val)
    model.__class__ = model_cls
    return model


for _family in SUPPORTED_FAMILIES:
    register_fwl_family(_family)

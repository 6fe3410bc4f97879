"""Drop-in In-Place TTT for Hugging Face causal LMs: ``convert``, save and load.

``convert(model, ...)`` changes one model instance: the chosen decoder layers' MLPs become
:class:`~fastweights.layers.inplace_ttt.InPlaceTTTMLP`, instance hooks feed them the token
embeddings and document boundaries, and the instance's class (and its config's class)
become registered subclasses, e.g. ``InPlaceTTTQwen3ForCausalLM`` with model_type
``inplace_ttt_qwen3``. No modeling file is copied and no class is patched.

``save_pretrained`` then writes safetensors plus the official config keys ``ttt_layers``,
``ttt_lr``, ``ttt_chunk``, ``ttt_proj``, ``ttt_target``; ``AutoModelForCausalLM`` loads it
after ``import fastweights``. :func:`load_pretrained` also reads checkpoints laid out like
the official release (a base model_type plus those keys).
"""

from __future__ import annotations

import functools
import inspect
import json
import operator
import sys
import warnings
from functools import partial, wraps
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init

from fastweights.errors import FastWeightsError, as_rate
from fastweights.layers.inplace_ttt import OFFICIAL_TARGET, InPlaceTTTMLP, TTTContext, normalize_target, ttt_init_value
from fastweights.models.cache import InPlaceTTTCache, ttt_settings
from fastweights.models.compat import (
    CACHE_KWARG,
    check_dynamic_cache,
    checkpointing_drops_cache,
    own_config,
    refuse_assisted_decoding,
    refuse_continuous_batching,
    resolve_use_cache,
    take_cache,
)
from fastweights.models.fwl import has_fwl
from fastweights.ops.inplace_ttt import check_max_update_norm, doc_starts
from fastweights.ops.inplace_ttt_decode import StepPlan

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_LR",
    "SUPPORTED_FAMILIES",
    "convert",
    "default_layers",
    "init_ttt_weights",
    "is_converted",
    "load_pretrained",
    "register_family",
    "set_max_update_norm",
    "ttt_modules",
    "ttt_parameters",
]

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Official recommended configs: lr 3, chunk 4096 (the paper's ablation finds 512–1024 best).
DEFAULT_LR = 3.0
DEFAULT_CHUNK = 4096
PREFIX = "inplace_ttt_"
HYBRID = "fastweights_hybrid"  # fastweights.models.hybrid: In-Place TTT MLPs chosen in its config


# --------------------------------------------------------------------------- registry
def _family_classes(model_type: str):
    """The transformers config and causal-LM classes of a base model_type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cfg_cls = CONFIG_MAPPING[model_type]
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[cfg_cls]
    except KeyError as err:
        raise FastWeightsError(f"model type {model_type!r} has no causal-LM class in transformers") from err
    return cfg_cls, model_cls


_REGISTERED: dict[str, tuple[type, type]] = {}


def register_family(model_type: str) -> tuple[type, type]:
    """Create and register ``inplace_ttt_<model_type>`` config and causal-LM subclasses."""
    if model_type.startswith(PREFIX):
        model_type = model_type[len(PREFIX):]
    if model_type in _REGISTERED:
        return _REGISTERED[model_type]
    base_cfg, base_model = _family_classes(model_type)
    mod = sys.modules[__name__]
    cfg_name = "InPlaceTTT" + base_cfg.__name__
    # ttt_max_update_norm: a class default, so that from_pretrained(path, ttt_max_update_norm=τ)
    # sets it on a checkpoint whose config.json lacks the key
    cfg_cls = type(cfg_name, (base_cfg,), {"model_type": PREFIX + model_type, "__module__": __name__,
                                           "ttt_max_update_norm": None})
    model_name = "InPlaceTTT" + base_model.__name__

    def __init__(self, config, *args, **kwargs):
        base_model.__init__(self, config, *args, **kwargs)
        _convert_from_config(self, config)

    @wraps(base_model.forward)  # its signature too: generate() reads it (logits_to_keep, ...)
    def forward(self, *args, **kwargs):
        return _undo_on_error(base_model.forward, self, args, kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if not _generation_cache(self, generation_config, model_kwargs):
            base_model._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)

    def initialize_weights(self):
        # the decoder inside is a PreTrainedModel of the base family, which transformers
        # initialises with that family's _init_weights: the TTT weights left unloaded are set
        # again here (the guarded init leaves loaded ones alone)
        base_model.initialize_weights(self)
        for module in self.modules():
            init_ttt_weights(module)

    model_cls = type(model_name, (base_model,), {
        "config_class": cfg_cls, "__init__": __init__, "__module__": __name__, "forward": forward,
        "_prepare_cache_for_generation": _prepare_cache_for_generation, "initialize_weights": initialize_weights,
        "_assisted_decoding": refuse_assisted_decoding, "init_continuous_batching": refuse_continuous_batching,
        "__doc__": f"{base_model.__name__} with In-Place TTT MLPs (created by fastweights.convert).",
    })
    setattr(mod, cfg_name, cfg_cls)
    setattr(mod, model_name, model_cls)
    AutoConfig.register(PREFIX + model_type, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    _REGISTERED[model_type] = (cfg_cls, model_cls)
    return cfg_cls, model_cls


def init_ttt_weights(module: nn.Module) -> bool:
    """``_init_weights`` for the weights an :class:`InPlaceTTTMLP` adds, as :func:`convert` leaves
    them (zero conv; P diagonal with N(0, 0.02²) entries), so that a checkpoint without them loads
    as its base model; weights the checkpoint holds are left alone (transformers' ``init``).
    Returns whether ``module`` was one of them (then the family's own init must not run on it)."""
    if getattr(module, "ttt_init", None) is None:
        return False
    init.copy_(module.weight, ttt_init_value(module))
    return True


def _generation_cache(model, generation_config, model_kwargs) -> bool:
    """For ``generate``: put an InPlaceTTTCache in ``model_kwargs`` where the default cache would go.

    Returns False when generate's own logic should run (a user's cache, or no cache at all).
    """
    check_dynamic_cache(generation_config, "In-Place TTT fast weights")
    if take_cache(model_kwargs) is not None or generation_config.use_cache is False:
        return False
    model_kwargs[CACHE_KWARG] = InPlaceTTTCache(config=model.config.get_text_config(decoder=True))
    return True


# --------------------------------------------------------------------------- hooks
# The keyword under which a model call's TTTContext travels from the base model, through each
# decoder layer's kwargs, to its attention's pre-hook (which takes it out again).
CALL_KEY = "_fastweights_ttt_call"


def _check_same_documents(cu_seqlens, position_ids, B: int, N: int) -> None:
    """Both kinds of document boundaries (transformers' flattening collator gives both): the TTT
    MLPs follow ``cu_seq_lens_q`` and attention and RoPE ``position_ids``, so they must agree."""
    by_cu = doc_starts(B, N, cu_seqlens=cu_seqlens, device=cu_seqlens.device)
    by_pos = doc_starts(B, N, position_ids=position_ids, device=cu_seqlens.device)
    if not torch.equal(by_cu, by_pos):
        raise FastWeightsError(
            f"cu_seq_lens_q {cu_seqlens.tolist()} and position_ids (documents starting at "
            f"{by_pos[0].nonzero().flatten().tolist()}) describe different documents: the fast weights would reset "
            "at the first and attention at the second; pass boundaries that agree, or only one of them")


def _capture_model_inputs(module: nn.Module, args, kwargs):
    """Base-model pre-hook: a new :class:`TTTContext` for this call (embeddings, document
    boundaries, padding, and the fast-weight cache), passed down in the decoder layers' kwargs.

    Each call gets its own context, and it travels in the kwargs that gradient checkpointing
    keeps for its recomputation, so a recomputed layer reads its own call's inputs even after
    later calls (several forwards before one backward). Without a cache and with ``use_cache``
    on, it creates the :class:`InPlaceTTTCache` that the base model would otherwise create as a
    plain ``DynamicCache`` (in training mode, or for packed rows given by ``cu_seq_lens_q``, only
    when ``use_cache=True`` is passed explicitly: the state would cost time and hold the graph,
    and packed rows cannot use one). A cache that is not an ``InPlaceTTTCache`` raises:
    it cannot hold the fast weights. A 2-D ``attention_mask`` marks padding, which the fast weights
    skip (with or without a cache).
    """
    ctx = module._ttt_ctx = TTTContext()
    if module._ttt_embed:
        _hook_embeddings(module)
    ctx.embeds = kwargs.get("inputs_embeds")
    ctx.position_ids = kwargs.get("position_ids")
    ctx.cu_seqlens = kwargs.get("cu_seq_lens_q")
    kwargs[CALL_KEY] = ctx
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None:
        return args, kwargs  # the model's own forward reports the missing input
    B, N = x.shape[:2]
    if ctx.cu_seqlens is not None and ctx.position_ids is not None:
        _check_same_documents(ctx.cu_seqlens, ctx.position_ids, B, N)
    cache = take_cache(kwargs)
    if cache is None and kwargs.get("use_cache") is None and (module.training or ctx.cu_seqlens is not None):
        # a training forward, or packed rows given by cu_seqlens (transformers' flattening
        # collator), carries no cache unless asked to: the packed rows could not use one
        kwargs["use_cache"] = False
    if cache is None and resolve_use_cache(module, kwargs):
        cache = kwargs[CACHE_KWARG] = InPlaceTTTCache(config=module.config)
    if cache is not None and checkpointing_drops_cache(module):
        raise FastWeightsError(
            "gradient checkpointing cannot be combined with a cache on an In-Place TTT model: the recomputation "
            "would update the fast weights twice (transformers drops the attention cache here instead)"
        )
    if cache is not None and not isinstance(cache, InPlaceTTTCache):
        raise FastWeightsError(
            f"an In-Place TTT model needs an InPlaceTTTCache to carry its fast weights, got {type(cache).__name__} "
            "(a cache from an unconverted model?). Pass past_key_values=None to have one created, or "
            "fastweights.models.InPlaceTTTCache(model.config)"
        )
    if module.training and torch.is_grad_enabled() and module._ttt_embed:
        _check_embed_checkpointing(module, kwargs.get("inputs_embeds"))
    mask = kwargs.get("attention_mask")
    real = mask[:, -N:] != 0 if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[0] == B else None
    pos = kwargs.get("position_ids")
    starts = pos == 0 if torch.is_tensor(pos) and pos.dim() == 2 and pos.shape[-1] == N else None
    if cache is not None:
        ctx.cache = cache
        ctx.plan = cache.ttt_begin(B, N, real, starts, module._ttt_layers, ttt_settings(module.config))
    elif real is not None and not bool(real.all()):
        ctx.plan = StepPlan([0] * B, N, real, starts)
    return args, kwargs


def _check_embed_checkpointing(base: nn.Module, inputs_embeds) -> None:
    """Reentrant checkpointing cannot give ``target="embed"`` its gradient: the embeddings reach
    the layers outside the checkpoint's inputs, and its inner backward would free their graph.
    Frozen embeddings (no gradient wanted) are fine."""
    wanted = base.get_input_embeddings().weight.requires_grad if inputs_embeds is None else inputs_embeds.requires_grad
    if not wanted:
        return
    for layer in base.layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if (getattr(layer, "gradient_checkpointing", False) and isinstance(func, partial)
                and func.keywords.get("use_reentrant") is True):
            raise FastWeightsError(
                "target='embed' cannot be trained with reentrant gradient checkpointing (use_reentrant=True): "
                "the embeddings are not an input of the checkpointed layers. Use use_reentrant=False (the default)"
            )


def _route_call(module: nn.Module, args, kwargs, *, mlp: nn.Module, layer_idx: int):
    """Attention pre-hook of a TTT decoder layer: hand this call's context to the layer's MLP.

    It runs inside the decoder layer's forward, so also when gradient checkpointing recomputes
    it, and it takes the context out of the kwargs before the attention sees them."""
    ctx = kwargs.pop(CALL_KEY, None)
    if ctx is None:  # the layer called on its own: its documents come from its own kwargs
        ctx = TTTContext()
        ctx.position_ids, ctx.cu_seqlens = kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q")
    mlp.ctx = ctx
    ctx.state = None if ctx.cache is None else ctx.cache.ttt_layer(layer_idx, mlp.chunk_size)
    return args, kwargs


def _forget_call(module: nn.Module, args, output):
    """MLP forward hook (always called): the context is only lent for the layer's own call."""
    module.ctx = None


def _undo_on_error(forward, model, args, kwargs):
    """The causal LM's ``forward`` with its cache put back as it was when the call raises anything,
    also after the decoder (the loss) and on a KeyboardInterrupt (which skips the decoder's
    always-called hook: the cache would hold the interrupted call's changes until its next use)."""
    cache = take_cache(kwargs)  # under either name
    if cache is None:  # or given by position
        index = _cache_position(forward)
        cache = args[index] if index is not None and len(args) > index else None
    own = cache if isinstance(cache, InPlaceTTTCache) else None
    if own is not None:
        own.ttt_release()  # an earlier decoder-only call's changes are not this call's to undo
    try:
        out = forward(model, *args, **kwargs)
    except BaseException:
        if own is not None:
            own.ttt_abort()
        raise
    if own is not None:
        own.ttt_release()
    return out


@functools.cache
def _cache_position(forward) -> int | None:
    """Where ``forward`` (unbound) takes its cache among the positional arguments after ``self``."""
    names = list(inspect.signature(forward).parameters)[1:]
    return next((names.index(n) for n in ("past_key_values", "cache") if n in names), None)


def _drop_call(module: nn.Module, args, kwargs):
    """Attention pre-hook of the other decoder layers: take the context out of their kwargs."""
    kwargs.pop(CALL_KEY, None)
    return args, kwargs


def _release_model_inputs(module: nn.Module, args, kwargs, output):
    """Base-model forward hook (always called): let go of this call's context and its cache (a
    checkpointed layer's recomputation gets the context back from its kwargs). After an error
    (torch then passes ``output=None``), the cache goes back to what it held before the call."""
    ctx = module._ttt_ctx
    if ctx is not None:
        ctx.state = None
        if ctx.cache is not None:
            ctx.cache.ttt_end(ok=output is not None)
            ctx.cache = ctx.plan = None
    module._ttt_ctx = None
    for mlp in module._ttt_mlps:  # also where an error stopped a layer between its attention and MLP
        mlp.ctx = None


def _hook_embeddings(base: nn.Module) -> None:
    """Put :func:`_capture_embeddings` on the decoder's current input embeddings, once: a module
    set later (``set_input_embeddings``, an adapter's wrapper) gets it on the next call."""
    emb = base.get_input_embeddings()
    if not any(getattr(h, "func", None) is _capture_embeddings and h.keywords.get("base") is base
               for h in emb._forward_hooks.values()):
        emb.register_forward_hook(partial(_capture_embeddings, base=base))


def _capture_embeddings(module: nn.Module, args, output, *, base: nn.Module):
    """Embedding forward hook: the token embeddings are the ``embed`` target source."""
    ctx = base._ttt_ctx
    if ctx is not None:
        ctx.embeds = output


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise FastWeightsError(
            f"model type {_model_type(model)!r} is not supported: no decoder `layers` ModuleList found "
            f"(In-Place TTT converts decoders with gated MLPs: {', '.join(SUPPORTED_FAMILIES)} and alike)"
        )
    return layers


def _model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


# --------------------------------------------------------------------------- convert
def default_layers(num_layers: int) -> list[int]:
    """Every 6th layer from 0, as in the official release."""
    return list(range(0, num_layers, 6))


def _layer_index(i) -> int:
    """A layer index as a Python int: ints and integer scalars (NumPy, 0-d tensors), not bools."""
    try:
        if isinstance(i, bool) or (isinstance(i, torch.Tensor) and i.dtype is torch.bool):
            raise TypeError
        return operator.index(i)
    except TypeError:
        raise ValueError(f"layer indices must be integers, got {i!r} ({type(i).__name__})") from None


def _validate(model, layers, chunk_size, lr, target, proj):
    if getattr(model, "_fw_context_parallel", None) is not None:
        raise FastWeightsError("this model runs context-parallel: call remove() on its apply_context_parallel handle, "
                               "convert, then apply it again (new TTT layers would step locally on each shard)")
    layers_list = _decoder_layers(model)
    n = len(layers_list)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    lr = as_rate("lr", lr)  # a bool or a string is not a rate; a 1-element tensor is
    target = normalize_target(target)
    if layers is not None and (isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__")):
        raise ValueError(f"layers must be a list of decoder layer indices (0..{n - 1}), got {layers!r}")
    chosen = default_layers(n) if layers is None else [_layer_index(i) for i in layers]
    if not chosen:
        raise ValueError(f"layers must name at least one decoder layer (0..{n - 1}), got []")
    for i in chosen:
        if not 0 <= i < n:
            raise ValueError(f"layer index {i!r} is out of range: the model has {n} layers (0..{n - 1})")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layer indices must be distinct, got {chosen}")
    no_attn = [i for i, layer in enumerate(layers_list) if not isinstance(getattr(layer, "self_attn", None), nn.Module)]
    if no_attn:
        raise FastWeightsError(
            f"model type {_model_type(model)!r} is not supported: decoder layer {no_attn[0]} has no `self_attn` module "
            "(In-Place TTT passes each call's inputs to the MLPs through it)"
        )
    for i in chosen:
        mlp = getattr(layers_list[i], "mlp", None)
        missing = [a for a in ("gate_proj", "up_proj", "down_proj") if not hasattr(mlp, a)]
        if mlp is None or missing:
            what = "an `mlp`" if mlp is None else "/".join(missing) + " in its MLP"
            raise FastWeightsError(
                f"model type {_model_type(model)!r} is not supported: decoder layer {i} lacks {what} "
                "(In-Place TTT needs a gated MLP with gate_proj/up_proj/down_proj)"
            )
    if not isinstance(proj, bool):
        raise ValueError(f"proj must be True or False, got {proj!r}")
    return sorted(chosen), chunk_size, lr, target


def _install(model: PreTrainedModel, layers: list[int], chunk_size: int, lr: float, target: str,
             proj: bool, max_update_norm: float | None = None) -> None:
    layers_list = _decoder_layers(model)
    for i, layer in enumerate(layers_list):
        if i in layers:
            layer.mlp = InPlaceTTTMLP(layer.mlp, chunk_size=chunk_size, lr=lr, target=target, proj=proj,
                                      max_update_norm=max_update_norm)
            hook = partial(_route_call, mlp=layer.mlp, layer_idx=i)
            layer.mlp.register_forward_hook(_forget_call, always_call=True)
        else:
            hook = _drop_call
        layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    base._ttt_ctx = None
    base._ttt_layers = tuple(layers)
    base._ttt_mlps = [layers_list[i].mlp for i in layers]
    base._ttt_embed = target == "embed"
    base.register_forward_pre_hook(_capture_model_inputs, with_kwargs=True)
    base.register_forward_hook(_release_model_inputs, with_kwargs=True, always_call=True)
    if target == "embed":
        _hook_embeddings(base)


def _write_config(config, layers, chunk_size, lr, target, proj, max_update_norm=None):
    config.ttt_max_update_norm = max_update_norm
    config.ttt_layers = list(layers)
    config.ttt_lr = lr
    config.ttt_chunk = chunk_size
    config.ttt_proj = bool(proj)
    config.ttt_target = OFFICIAL_TARGET[target]


def _convert_from_config(model: PreTrainedModel, config) -> None:
    """Install TTT MLPs as a checkpoint's config describes (used when loading)."""
    if getattr(config, "ttt_layers", None) is None:
        raise FastWeightsError(f"config of type {config.model_type!r} has no ttt_layers: not an In-Place TTT model")
    proj = bool(getattr(config, "ttt_proj", True))
    layers, chunk, lr, target = _validate(
        model, config.ttt_layers, int(config.ttt_chunk), config.ttt_lr, getattr(config, "ttt_target", "hidden"), proj
    )
    tau = check_max_update_norm(getattr(config, "ttt_max_update_norm", None), "ttt_max_update_norm")
    _install(model, layers, chunk, lr, target, proj, tau)


def set_max_update_norm(model: nn.Module, max_update_norm: float | None) -> None:
    """Clip each chunk's update of every In-Place TTT MLP of ``model`` (converted or hybrid) to
    Frobenius norm ``max_update_norm`` (None: no clipping), and record it in ``model.config``
    (``ttt_max_update_norm``, which ``save_pretrained`` keeps and a new cache checks)."""
    tau = check_max_update_norm(max_update_norm)
    mlps = ttt_modules(model)
    if not mlps:
        raise FastWeightsError(f"{type(model).__name__} has no In-Place TTT MLPs: max_update_norm applies to them")
    for m in mlps:
        m.max_update_norm = tau
    if getattr(model, "config", None) is not None:
        model.config.ttt_max_update_norm = tau


def is_converted(model: nn.Module) -> bool:
    """Whether the model holds In-Place TTT MLPs."""
    return any(isinstance(m, InPlaceTTTMLP) for m in model.modules())


def ttt_modules(model: nn.Module) -> list[InPlaceTTTMLP]:
    """The In-Place TTT MLPs of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, InPlaceTTTMLP)]


def ttt_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that In-Place TTT adds (``ttt_conv`` and ``ttt_proj`` weights)."""
    return [(n, p) for n, p in model.named_parameters() if ".ttt_conv." in n or ".ttt_proj." in n]


def convert(
    model: PreTrainedModel,
    layers: list[int] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    lr: float = DEFAULT_LR,
    target: str = "hidden",
    proj: bool = True,
    max_update_norm: float | None = None,
) -> PreTrainedModel:
    """Switch In-Place TTT on in a Hugging Face causal LM, in place, and return it.

    Args:
        model: a causal LM whose decoder layers have a gated MLP (``gate_proj``, ``up_proj``,
            ``down_proj``): Llama, Qwen2, Qwen3, Mistral and alike.
        layers: decoder layer indices to convert; default every 6th layer from 0.
        chunk_size: tokens per fast-weight update (official default 4096; the paper's
            ablation finds 512–1024 best).
        lr: inner learning rate η (official recommended configs: 3).
        target: ``"hidden"`` (the MLP input; for continual training of a pretrained model)
            or ``"embed"`` (the token embeddings; for pretraining from scratch).
        proj: learn the target projection P (official default True).
        max_update_norm: τ > 0 bounds each chunk's update ``η ΔW_i`` in Frobenius norm (SPEC §1:
            the paper's appendix clips at inference; the official code does not); None: no
            clipping. Stored as ``config.ttt_max_update_norm``; a saved model takes another with
            ``from_pretrained(path, ttt_max_update_norm=τ)``.

    The conv starts at zero, so the converted model's outputs equal the base model's.
    """
    if not isinstance(model, PreTrainedModel):
        raise FastWeightsError(f"convert needs a transformers PreTrainedModel, got {type(model).__name__}")
    if _model_type(model) == HYBRID:
        raise FastWeightsError("a fastweights_hybrid model picks In-Place TTT per layer in its config "
                               "(mlps='inplace_ttt', ttt_chunk, ttt_lr, ...); convert does not apply to it")
    if is_converted(model):
        raise FastWeightsError("model is already converted to In-Place TTT")
    if has_fwl(model):
        raise FastWeightsError("a model with an FWL head cannot also be converted to In-Place TTT: each needs its "
                               "own generation cache (FWLCache, InPlaceTTTCache)")
    layers, chunk_size, lr, target = _validate(model, layers, chunk_size, lr, target, proj)
    max_update_norm = check_max_update_norm(max_update_norm)
    causal_lm = _family_classes(model.config.model_type)[1]
    if not isinstance(model, causal_lm):
        raise FastWeightsError(f"convert needs the causal LM ({causal_lm.__name__}, e.g. from AutoModelForCausalLM), "
                               f"got {type(model).__name__}")
    cfg_cls, model_cls = register_family(model.config.model_type)
    if model.config.model_type not in SUPPORTED_FAMILIES:
        warnings.warn(
            f"model type {model.config.model_type!r} is not among the tested families {SUPPORTED_FAMILIES}; "
            f"`import fastweights` registers only those with the Auto classes, so load the saved model with "
            f"fastweights.load_pretrained (or call fastweights.models.register_family("
            f"{model.config.model_type!r}) before AutoModelForCausalLM.from_pretrained)", stacklevel=2)
    own_config(model)
    _install(model, layers, chunk_size, lr, target, proj, max_update_norm)
    model.config.__class__ = cfg_cls
    model.config.__dict__.pop("model_type", None)  # a loaded config's own copy would hide the new type
    _write_config(model.config, layers, chunk_size, lr, target, proj, max_update_norm)
    model.__class__ = model_cls
    return model


# --------------------------------------------------------------------------- load
def load_pretrained(path: str | Path, **kwargs) -> PreTrainedModel:
    """Load an In-Place TTT checkpoint from a local directory.

    Reads both our layout (model_type ``inplace_ttt_<family>``) and the official release's
    (a base model_type plus ``ttt_*`` config keys and ``mlp.ttt_conv``/``mlp.ttt_proj``
    weights). Only safetensors are read and no remote code runs. As with
    ``from_pretrained``, keywords that are config attributes (``ttt_max_update_norm=τ``,
    ``ttt_lr``, ...) update the config, and the model is built, and its settings checked, from it.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {str(path)!r}")
    raw = json.loads(cfg_file.read_text())
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise FastWeightsError(f"{cfg_file} has no model_type")
    if raw.get("ttt_layers") is None:
        raise FastWeightsError(f"{cfg_file} has no ttt_layers: not an In-Place TTT checkpoint")
    cfg_cls, model_cls = register_family(model_type)
    raw.pop("model_type", None)
    # from_pretrained(path, **kwargs) gives the config the keywords that are its attributes (from_dict);
    # given a config, it would pass them all to the model's __init__, which refuses them
    given = {k: v for k, v in kwargs.items() if k not in _LOADING_OPTIONS}
    config, unused = cfg_cls.from_dict(raw, return_unused_kwargs=True, **given)
    kwargs = {k: v for k, v in kwargs.items() if k not in given or k in unused or k in _CONFIG_AND_LOADING}
    kwargs.setdefault("use_safetensors", True)
    kwargs["trust_remote_code"] = False
    return model_cls.from_pretrained(path, config=config, **kwargs)


# from_pretrained's own keywords that are also config attributes: it takes them before reading the config
_LOADING_OPTIONS = ("dtype", "torch_dtype")
# keywords that from_pretrained applies to a given config as well (from_dict takes them too)
_CONFIG_AND_LOADING = ("attn_implementation", "experts_implementation")


def _register_supported() -> None:
    for family in SUPPORTED_FAMILIES:
        register_family(family)


_register_supported()

"""The hybrid model family: a Qwen3-style decoder whose layers pick their token mixer and MLP
(docs/hybrid.md). Blocks are ``x + mixer(RMSNorm(x))`` then ``x + mlp(RMSNorm(x))``.

Documents: ``position_ids`` (B, N) restart at 0 at each document start (packed training); a
document never sees another's tokens, in attention, LaCT or In-Place TTT. ``attention_mask``
(B, M) marks padding (left padding for generation).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from fastweights.errors import FastWeightsError, FastWeightsWarning
from fastweights.layers.attention import Attention, TokenLayout, rope_cos_sin
from fastweights.layers.inplace_ttt import InPlaceTTTMLP
from fastweights.layers.lact import LaCTLayer
from fastweights.models.compat import (
    CACHE_KWARG,
    check_dynamic_cache,
    keep_positions,
    refuse_assisted_decoding,
    refuse_continuous_batching,
    take_cache,
)
from fastweights.models.hybrid.cache import HybridCache
from fastweights.models.hybrid.compat import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    GenerationMixin,
    GradientCheckpointingLayer,
    PreTrainedModel,
)
from fastweights.models.hybrid.configuration import HybridConfig
from fastweights.models.hybrid.fla_mixer import FlaMixer
from fastweights.models.inplace_ttt import init_ttt_weights
from fastweights.ops.inplace_ttt_decode import InPlaceTTTState, StepPlan
from fastweights.ops.lact import COMPILE_ENV, _resolve_compile

__all__ = ["HybridForCausalLM", "HybridModel", "HybridPreTrainedModel"]


class SwiGLUMLP(nn.Module):
    """``down(SiLU(gate x) * up x)``, no bias (Qwen3)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class AttentionMixer(nn.Module):
    """Adapts :class:`Attention` (full or sliding window) to the block interface."""

    def __init__(self, config: HybridConfig, window: int | None):
        super().__init__()
        self.rope_base = config.rope_base
        self.attn = Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                              config.head_dim, window=window, eps=config.rms_norm_eps,
                              backend=config.attn_backend)

    def forward(self, x, layout, past=None, use_cache=False):
        cos, sin = rope_cos_sin(layout.position_ids, self.attn.head_dim, self.rope_base, x.dtype)
        y, kv = self.attn(x, cos, sin, layout, past)
        return y, (kv if use_cache else None)


def make_mixer(config: HybridConfig, kind: str) -> nn.Module:
    if kind == "attention":
        return AttentionMixer(config, None)
    if kind == "swa":
        return AttentionMixer(config, config.sliding_window)
    if kind == "lact":
        return LaCTLayer(config.hidden_size, config.num_attention_heads, fw_heads=config.lact_heads,
                         window=config.sliding_window, chunk_size=config.lact_chunk_size,
                         update=config.lact_update, order=config.lact_order, lr_init=config.lact_lr_init,
                         init_rank=config.lact_init_rank, rope_base=config.rope_base, eps=config.rms_norm_eps,
                         attn_backend=config.attn_backend, glue=config.lact_glue)
    return FlaMixer(config.hidden_size, config.num_attention_heads, kind)


class HybridBlock(GradientCheckpointingLayer):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.mixer_type, self.mlp_type = config.mixers[layer_idx], config.mlps[layer_idx]
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = make_mixer(config, self.mixer_type)
        mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)
        if self.mlp_type == "inplace_ttt":
            mlp = InPlaceTTTMLP(mlp, chunk_size=config.ttt_chunk, lr=config.ttt_lr, target=config.ttt_target,
                                proj=config.ttt_proj, max_update_norm=getattr(config, "ttt_max_update_norm", None))
        self.mlp = mlp

    def forward(self, x, layout, embeds, past=None, use_cache=False, ttt_plan: StepPlan | None = None):
        """x (B, N, d) → (x', state). With a cache, ``past`` is this layer's state from the cache
        and ``ttt_plan`` the call's In-Place TTT step plan (then the TTT MLP streams its state)."""
        past = past or {}
        y, mixer_state = self.mixer(self.input_layernorm(x), layout, past.get("mixer"), use_cache)
        x = x + y
        h = self.post_attention_layernorm(x)
        mlp_state = None
        if self.mlp_type == "inplace_ttt":
            s = embeds if self.mlp.target == "embed" else h
            if ttt_plan is not None:  # a cache's state, or (padding without a cache) this call's
                mlp_state = past.get("mlp") or InPlaceTTTState(self.mlp.chunk_size)
                y = self.mlp.step(h, mlp_state, ttt_plan, target_source=s)
            else:
                y = self.mlp(h, target_source=s, position_ids=layout.position_ids)
        else:
            y = self.mlp(h)
        state = {"mixer": mixer_state, "mlp": mlp_state} if use_cache else None
        return x + y, state


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # HybridBlock: compat.enable_activation_checkpointing(model)
    _no_split_modules = ["HybridBlock"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own HybridCache (compat.py)

    @torch.no_grad()
    def _init_weights(self, module):
        if init_ttt_weights(module):
            return
        super()._init_weights(module)
        if isinstance(module, LaCTLayer):
            for name, value in module.fast_init().items():
                obj = module
                *path, leaf = name.split(".")
                for p in path:
                    obj = getattr(obj, p)
                init.copy_(getattr(obj, leaf), value.to(getattr(obj, leaf).dtype))


def _layout(position_ids, attention_mask, cache: HybridCache | None, B, N, device) -> TokenLayout:
    past = 0 if cache is None else cache.seen
    valid_new = torch.ones(B, N, dtype=torch.bool, device=device)
    if attention_mask is not None:
        shape = tuple(attention_mask.shape)
        if attention_mask.dim() != 2 or shape[0] != B or shape[1] != past + N:
            missing = (f": no cache holds the {shape[1] - N} tokens of its first columns (pass the cache, or only "
                       "the mask's last N columns)" if attention_mask.dim() == 2 and shape[1] > N and not past else "")
            raise ValueError(f"attention_mask must be (B, M) = ({B}, {past + N}), M = {past} cached tokens + N={N} "
                             f"new ones, got {shape}{missing}")
        valid_new = attention_mask[:, -N:].bool()
    if position_ids is None:
        if attention_mask is not None:
            pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            position_ids = pos[:, -N:]
        else:
            position_ids = torch.arange(past, past + N, device=device).expand(B, N)
    if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != N or (
            position_ids.dim() == 2 and position_ids.shape[0] not in (1, B)):
        raise ValueError(f"position_ids must be (B, N) = ({B}, {N}), (1, N) or (N,), got {tuple(position_ids.shape)}")
    position_ids = position_ids.to(device).expand(B, N)
    if cache is None:
        return TokenLayout.from_positions(position_ids, valid_new)
    starts = position_ids == 0
    if cache.key_doc is None:
        starts = starts.clone()
        starts[:, 0] = True
        doc = torch.cumsum(starts.long(), 1) - 1
        key_doc, key_valid = doc, valid_new
    else:
        doc = cache.key_doc[:, -1:] + torch.cumsum(starts.long(), 1)
        key_doc = torch.cat([cache.key_doc, doc], 1)
        key_valid = torch.cat([cache.key_valid, valid_new], 1)
    index = torch.arange(past, past + N, device=device).expand(B, N)
    key_index = index if key_doc is doc and past == 0 else torch.arange(past + N, device=device).expand(B, past + N)
    return TokenLayout(position_ids=position_ids, doc=doc, index=index, key_doc=key_doc, key_index=key_index,
                       key_valid=key_valid)


def _return_dict(config, return_dict) -> bool:
    """``return_dict`` as transformers' ``can_return_tuple`` reads it: the argument, else the config's."""
    return getattr(config, "return_dict", True) if return_dict is None else bool(return_dict)


def _check_lact_padding(layout: TokenLayout, N: int, order: str) -> None:
    """LaCT reads every token of a document into its fast weights, masked or not: refuse masked
    tokens that a later token of the same document would read. Left padding (before a row's
    first token) and padding before a document start are fine; with apply-then-update, so is
    right padding (a chunk's update reaches only later chunks)."""
    if layout.single_doc:
        return
    valid = layout.key_valid  # (B, M): the cached prefix's tokens, then this call's N
    before = valid.long().cumsum(1)[:, -N:] - valid[:, -N:].long()  # valid tokens before each new one
    prev = F.pad(valid, (1, 0))[:, -N - 1:-1]  # is the token before each new one valid
    new = valid[:, -N:]
    gap = new & ~prev & (before > 0) & (layout.position_ids != 0)
    if order != "apply_update":  # the chunk's own update is read: masked tokens after any real one
        gap = gap | (~new & (before > 0))
    if bool(gap.any()):
        row, col = (int(i) for i in gap.nonzero()[0])
        where = ("after a masked token inside a document" if order == "apply_update"
                 else "after real tokens (lact_order='update_apply' reads a chunk with its own update)")
        raise FastWeightsError(
            f"attention_mask of a LaCT model masks tokens {where} (row {row}, token {col} of this call): LaCT "
            "would read them into its fast weights. Allowed: left padding, padding before a document start "
            "(position_ids 0)" + (", and right padding" if order == "apply_update" else "")
            + "; remove the masked tokens from the row instead")


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        config.check_keys()  # overrides given to from_pretrained skip the config's __init__
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HybridBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, output_hidden_states=None, return_dict=None,
                **kwargs) -> BaseModelOutputWithPast | tuple:
        """input_ids (B, N) or inputs_embeds (B, N, d); attention_mask (B, M) with M = cached + N;
        position_ids (B, N). Returns last_hidden_state (B, N, d) and, with use_cache, the cache
        (``use_cache`` defaults to ``config.use_cache`` in eval mode and to False in training).
        The cache comes as ``cache`` (the transformers >= 5.24 name) or ``past_key_values``.
        ``output_hidden_states`` (default ``config.output_hidden_states``): also ``hidden_states``,
        the embeddings and each block's output (the last one after the final norm), L + 1 of
        (B, N, d), as transformers' decoders give them. ``return_dict=False`` (default
        ``config.return_dict``): the output's ``to_tuple()``, None fields left out."""
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported by fastweights_hybrid models (LaCT and the "
                             "fla mixers have no attention weights to return)")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        past_key_values = take_cache({"past_key_values": past_key_values, "cache": cache})
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if past_key_values is not None and not isinstance(past_key_values, HybridCache):
            raise ValueError(f"past_key_values must be a HybridCache, got {type(past_key_values).__name__}")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, N, _ = x.shape
        if N == 0:
            hint = ("; generate() with a returned cache takes the whole sequence, or the new tokens with the full "
                    "attention_mask" if past_key_values is not None else "")
            raise ValueError(f"the input has no tokens: (B, N) = ({B}, 0); a fastweights_hybrid model needs N >= 1"
                             f"{hint}")
        if use_cache is None:  # no cache while training unless asked for
            use_cache = self.config.use_cache and not self.training
        use_cache = bool(use_cache) or past_key_values is not None
        cache = past_key_values
        if cache is None and use_cache:
            cache = HybridCache(self.config)
        elif cache is not None:
            cache.check(self.config, B)
        self._check_checkpointing(x.device, cache)
        layout = _layout(position_ids, attention_mask, cache if (cache is not None and cache.seen) else None,
                         B, N, x.device)
        if "lact" in self.config.mixers and attention_mask is not None:
            _check_lact_padding(layout, N, self.config.lact_order)
        saved = None if cache is None else cache.save()
        try:
            hidden, x = self._layers(x, layout, cache, use_cache, output_hidden_states, attention_mask)
        except BaseException:  # KeyboardInterrupt too: the cache goes back to what it held
            if saved is not None:
                cache.restore(saved)
            raise
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        out = BaseModelOutputWithPast(last_hidden_state=x, hidden_states=None if hidden is None else tuple(hidden),
                                      **{CACHE_KWARG: cache})
        return out if _return_dict(self.config, return_dict) else out.to_tuple()

    def _layers(self, x, layout: TokenLayout, cache: HybridCache | None, use_cache: bool, output_hidden_states,
                attention_mask):
        """The decoder layers over x (B, N, d), advancing ``cache``; returns (hidden states or None, x)."""
        B, N, _ = x.shape
        embeds = x
        plan = None
        real = layout.key_valid[:, -N:]
        if cache is not None and "inplace_ttt" in self.config.mlps:
            before = cache.ttt_tokens if cache.ttt_tokens is not None else [0] * B
            plan = StepPlan(before, N, real, layout.position_ids == 0)
            cache.ttt_tokens = plan.after
        elif ("inplace_ttt" in self.config.mlps and attention_mask is not None and not layout.single_doc
              and not bool(real.all())):  # single_doc: no padding, known on the host (no sync)
            # padding without a cache: the TTT MLPs stream a state of this call only, which skips
            # the masked tokens (the chunked op would read them into the fast weights)
            plan = StepPlan([0] * B, N, real, layout.position_ids == 0)
        hidden = [x] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            past = cache.states[i] if cache is not None else None
            x, state = layer(x, layout, embeds, past, use_cache, ttt_plan=plan)
            if cache is not None:
                cache.states[i] = state
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.key_doc, cache.key_valid, cache.seen = layout.key_doc, layout.key_valid, cache.seen + N
        return hidden, x

    def _check_checkpointing(self, device: torch.device, cache: HybridCache | None) -> None:
        """Refuse by name what fails inside activation checkpointing: CUDA-graph capture of LaCT's
        chunk loop (H100, torch 2.11), and a cache's In-Place TTT state, which the forward advances
        in place (the recomputation would start from the advanced state)."""
        if not (self.training and torch.is_grad_enabled()):
            return
        blocks = [b for b in self.layers if b.gradient_checkpointing]
        if blocks and "lact" in self.config.mixers and _resolve_compile(None, device) == "graphs":
            raise ValueError(f"{COMPILE_ENV}=graphs cannot be combined with activation checkpointing (CUDA-graph "
                             f"capture fails under torch.utils.checkpoint); unset it to use the compiled chunk loop")
        if cache is not None and any(b.mlp_type == "inplace_ttt" for b in blocks):
            raise FastWeightsError(
                "gradient checkpointing cannot be combined with a cache on a model with inplace_ttt MLPs: the "
                "forward advances the cache's fast weights in place, and the recomputation would start from the "
                "advanced state. Train without the cache (past_key_values=None, use_cache=False) or without "
                "gradient checkpointing")


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """``generate()``: a :class:`HybridCache` where transformers would put its default cache
        (chunked prefill needs one before the first forward); a user's cache is kept."""
        check_dynamic_cache(generation_config, "fastweights_hybrid states")
        if take_cache(model_kwargs) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_KWARG] = HybridCache(self.config)

    _assisted_decoding = refuse_assisted_decoding  # see HybridCache.crop
    init_continuous_batching = refuse_continuous_batching  # its paged cache has no room for the states

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0, cache=None,
                output_hidden_states=None, num_items_in_batch=None, return_dict=None,
                **kwargs) -> CausalLMOutputWithPast | tuple:
        """Logits (B, N, V) (an int ``logits_to_keep`` > 0: the last that many positions; a 1-D
        tensor: the positions it indexes); with ``labels``
        (B, N) the next-token cross-entropy (labels are shifted inside; -100 ignored): the mean,
        or the sum over ``num_items_in_batch`` when given (the Hugging Face Trainer passes it under
        gradient accumulation). ``return_dict=False`` (default ``config.return_dict``): the
        output's ``to_tuple()`` ``(loss, logits, cache, hidden_states)``, None fields left out.
        A model with LaCT layers in ``lact_order="update_apply"`` (``config.noncausal_layers``)
        computes that loss with logits that see later tokens of their chunk: it warns (a
        :class:`FastWeightsWarning`, once per model). A call that raises leaves a given cache as
        it was."""
        if labels is not None:  # before the cache moves on
            self._warn_noncausal_loss()
            given = input_ids if input_ids is not None else inputs_embeds
            if given is not None and tuple(labels.shape) != tuple(given.shape[:2]):
                raise ValueError(f"labels must be (B, N) = {tuple(given.shape[:2])}, as the input, got "
                                 f"{tuple(labels.shape)}")
            if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):  # positions cut or reordered
                raise ValueError("labels need the logits of every position, in order: pass logits_to_keep=0 (the "
                                 f"default) with labels, got {logits_to_keep!r}")
        held = next((c for c in (past_key_values, cache) if isinstance(c, HybridCache)), None)
        saved = None if held is None else held.save()
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, cache=cache, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_hidden_states=output_hidden_states, return_dict=True,
                             **kwargs)
            return self._head(out, labels, logits_to_keep, num_items_in_batch, return_dict)
        except BaseException:  # the loss, an interrupt: the cache goes back to what it held
            if saved is not None:
                held.restore(saved)
            raise

    def _head(self, out, labels, logits_to_keep, num_items_in_batch, return_dict):
        """Logits and loss from the decoder's output (see :meth:`forward`)."""
        h = out.last_hidden_state
        h = keep_positions(h, logits_to_keep)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            flat = logits[:, :-1].flatten(0, 1)
            flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
            targets = labels[:, 1:].flatten().to(logits.device)
            if num_items_in_batch is None:
                loss = F.cross_entropy(flat, targets, ignore_index=-100)
            else:
                loss = F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum")
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device).to(loss.dtype)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                     **{CACHE_KWARG: getattr(out, CACHE_KWARG)})
        return out if _return_dict(self.config, return_dict) else out.to_tuple()

    def _warn_noncausal_loss(self) -> None:
        """Warn, once per model, that a loss from labels leaks later tokens when LaCT layers read
        each chunk with their own update (``presets.check_causal`` refuses such models in train
        and eval)."""
        layers = self.config.noncausal_layers
        if not layers or self.__dict__.get("_warned_noncausal_loss"):
            return
        self._warned_noncausal_loss = True
        warnings.warn(
            f"this model's loss from labels is not a causal-LM loss: its LaCT layers {layers} use "
            f"lact_order='update_apply' and read each chunk of {self.config.lact_chunk_size} tokens with that chunk's "
            "own update, so the logits at a position see later tokens of its chunk, including the labels it is "
            "scored on; train and evaluate with lact_order='apply_update' (fastweights train and eval refuse "
            "this model)", FastWeightsWarning, stacklevel=2)

"""Configuration of the hybrid model family (docs/hybrid.md).

One config expresses every row of the fast-weight comparison: each layer picks a token mixer
(``attention`` | ``swa`` | ``lact`` | ``gla`` | ``deltanet``) and an MLP (``swiglu`` |
``inplace_ttt``). ``mixers`` and ``mlps`` are one name for all layers or a list of
``num_hidden_layers`` names.
"""

from __future__ import annotations

import warnings

from fastweights.errors import FastWeightsWarning, check_number, check_positive_int
from fastweights.layers.attention import BACKENDS
from fastweights.layers.inplace_ttt import TARGETS
from fastweights.models.hybrid.compat import PreTrainedConfig
from fastweights.models.inplace_ttt import HYBRID
from fastweights.ops.inplace_ttt import check_max_update_norm
from fastweights.ops.lact import ORDERS, UPDATES
from fastweights.ops.lact_glue import IMPLS as GLUE_IMPLS

__all__ = ["MIXERS", "MLPS", "HybridConfig"]

MIXERS = ("attention", "swa", "lact", "gla", "deltanet")
MLPS = ("swiglu", "inplace_ttt")


def _one_of(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def _per_layer(value, allowed, n, name):
    if not isinstance(value, (str, list, tuple)):
        raise ValueError(f"{name} must be one name or a list of {n} (num_hidden_layers), got {value!r}")
    names = [value] * n if isinstance(value, str) else list(value)
    if len(names) != n:
        raise ValueError(f"{name} must name one value or {n} (num_hidden_layers), got {len(names)}")
    bad = list(dict.fromkeys(v for v in names if v not in allowed))
    if bad:
        raise ValueError(f"{name} entries must be in {allowed}, got {bad}")
    return names


def _check(cfg: HybridConfig) -> None:
    """The numeric keys, named as in the config (the layers would name their own arguments)."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "lact_heads", "lact_chunk_size",
                "lact_init_rank", "ttt_chunk"):
        check_positive_int(key, getattr(cfg, key))
    if cfg.sliding_window is not None:
        check_positive_int("sliding_window", cfg.sliding_window)
    for key, low, strict in (("rms_norm_eps", 0, True), ("rope_base", 0, True), ("initializer_range", 0, False),
                             ("lact_lr_init", 0, True), ("ttt_lr", 0, False)):
        check_number(key, getattr(cfg, key), low, strict)
    check_max_update_norm(getattr(cfg, "ttt_max_update_norm", None), "ttt_max_update_norm")
    if not isinstance(cfg.ttt_proj, bool):
        raise ValueError(f"ttt_proj must be True or False, got {cfg.ttt_proj!r}")
    if any(m in ("attention", "swa") for m in cfg.mixers) and cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"num_attention_heads {cfg.num_attention_heads} must be a multiple of num_key_value_heads "
                         f"{cfg.num_key_value_heads}")
    if "lact" in cfg.mixers:
        if cfg.hidden_size % cfg.num_attention_heads or cfg.hidden_size % cfg.lact_heads:
            raise ValueError(f"LaCT layers need hidden_size {cfg.hidden_size} divisible by num_attention_heads "
                             f"{cfg.num_attention_heads} and lact_heads {cfg.lact_heads}")
        width = cfg.hidden_size // cfg.num_attention_heads
        if cfg.head_dim != width:
            raise ValueError(f"LaCT layers use heads of hidden_size / num_attention_heads = {width}; head_dim "
                             f"{cfg.head_dim} would apply to the other layers only: leave it unset or make it {width}")
        for key, w in (("num_attention_heads", width), ("lact_heads", cfg.hidden_size // cfg.lact_heads)):
            if w % 2:
                raise ValueError(f"RoPE needs even head widths: hidden_size {cfg.hidden_size} / {key} "
                                 f"{getattr(cfg, key)} = {w}")
    if cfg.head_dim % 2 and any(m in ("attention", "swa") for m in cfg.mixers):
        raise ValueError(f"RoPE needs even head widths: head_dim {cfg.head_dim}")


_OWN_KEYS = ("mixers", "mlps", "sliding_window", "lact_heads", "lact_chunk_size", "lact_update", "lact_order",
             "lact_lr_init", "lact_init_rank", "lact_glue", "ttt_chunk", "ttt_lr", "ttt_target", "ttt_proj",
             "ttt_max_update_norm", "attn_backend", "rope_base")
_DEFAULT_ROPE_BASE = 1e6
_RETIRED_KEYS = frozenset({"lact_overlap"})  # keys of earlier releases, dropped with a warning


def _unknown_keys(kwargs: dict, rope_base: float) -> float:
    """Refuse keys that look like this family's but are not (``PreTrainedConfig`` would keep them
    and the model would ignore them); read Qwen3's ``rope_theta`` as ``rope_base``. Returns the
    RoPE base."""
    for key in _RETIRED_KEYS.intersection(kwargs):  # configs saved while they existed still load
        warnings.warn(f"config key {key}={kwargs.pop(key)!r} no longer exists and is ignored", FastWeightsWarning,
                      stacklevel=4)
    unknown = [k for k in kwargs if k.startswith(("lact_", "ttt_")) or k in ("mixer", "mlp", "window")]
    if unknown:
        raise ValueError(f"unknown config keys {unknown}: this family's own keys are {list(_OWN_KEYS)}")
    if kwargs.get("rope_scaling") is not None:
        raise ValueError(f"rope_scaling is not supported by this family (plain RoPE of base rope_base), got "
                         f"{kwargs['rope_scaling']!r}")
    if "rope_theta" in kwargs:
        theta = kwargs.pop("rope_theta")
        if rope_base != _DEFAULT_ROPE_BASE and theta != rope_base:
            raise ValueError(f"rope_theta {theta!r} and rope_base {rope_base!r} disagree (rope_theta, Qwen3's "
                             f"name, is read as rope_base)")
        return theta
    return rope_base


class HybridConfig(PreTrainedConfig):
    """Qwen3-style decoder (RMSNorm, RoPE, GQA, SwiGLU) with per-layer mixers and MLPs.

    LaCT keys: ``lact_heads`` (n_h), ``lact_chunk_size`` (C), ``lact_update`` (gd | momentum |
    muon), ``lact_order``, ``lact_lr_init``, ``lact_init_rank``, ``lact_glue`` (auto | torch | triton:
    the layer's elementwise glue, fastweights.ops.lact_glue). ``sliding_window`` serves
    ``swa`` and LaCT's SWA. LaCT layers share one q/k/v projection between the SWA and the fast
    branch (SPEC §2), with ``num_attention_heads`` heads for k and v too: ``num_key_value_heads``
    (GQA) applies to the ``attention`` and ``swa`` mixers only. In-Place TTT keys (``inplace_ttt`` MLPs): ``ttt_chunk``,
    ``ttt_lr``, ``ttt_target`` (``embed`` | ``hidden``), ``ttt_proj``, ``ttt_max_update_norm`` (τ
    bounding each chunk's update in Frobenius norm; None: no clipping). ``rope_theta`` (Qwen3's
    name) is read as ``rope_base``; unknown ``lact_*``/``ttt_*`` keys are refused.
    """

    model_type = HYBRID
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the cache field's name before and from 5.24

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1536,
        intermediate_size: int = 4096,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 12,
        num_key_value_heads: int = 12,
        head_dim: int | None = None,
        rms_norm_eps: float = 1e-6,
        rope_base: float = _DEFAULT_ROPE_BASE,
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        mixers="lact",
        mlps="swiglu",
        sliding_window: int = 2048,
        lact_heads: int = 4,
        lact_chunk_size: int = 2048,
        lact_update: str = "muon",
        lact_order: str = "apply_update",
        lact_lr_init: float = 1e-3,
        lact_init_rank: int = 32,
        lact_glue: str = "auto",
        ttt_chunk: int = 1024,
        ttt_lr: float = 3.0,
        ttt_target: str = "embed",
        ttt_proj: bool = True,
        ttt_max_update_norm: float | None = None,
        attn_backend: str = "auto",
        use_cache: bool = True,
        **kwargs,
    ):
        for key, value in (("num_hidden_layers", num_hidden_layers), ("hidden_size", hidden_size),
                           ("num_attention_heads", num_attention_heads)):  # used below
            check_positive_int(key, value)
        rope_base = _unknown_keys(kwargs, rope_base)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_base = rope_base
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.mixers, self.mlps = mixers, mlps
        self.sliding_window = sliding_window
        self.lact_heads = lact_heads
        self.lact_chunk_size = lact_chunk_size
        self.lact_update = lact_update
        self.lact_order = lact_order
        self.lact_lr_init = lact_lr_init
        self.lact_init_rank = lact_init_rank
        self.lact_glue = lact_glue
        self.ttt_chunk = ttt_chunk
        self.ttt_lr = ttt_lr
        self.ttt_target = ttt_target
        self.ttt_proj = ttt_proj
        self.ttt_max_update_norm = ttt_max_update_norm
        self.attn_backend = attn_backend
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.check_keys()

    @property
    def noncausal_layers(self) -> list[int]:
        """LaCT layers that read each chunk with its own update (``lact_order="update_apply"``):
        their outputs see later tokens of the chunk, so the model is not a causal LM."""
        if self.lact_order != "update_apply":
            return []
        return [i for i, m in enumerate(self.mixers) if m == "lact"]

    def check_keys(self) -> None:
        """Normalise the per-layer keys and check every key, naming it: run when the config is made
        and again when a model is built from it (``from_pretrained(dir, key=value)`` sets
        overrides after ``__init__``)."""
        check_positive_int("num_hidden_layers", self.num_hidden_layers)
        self.mixers = _per_layer(self.mixers, MIXERS, self.num_hidden_layers, "mixers")
        self.mlps = _per_layer(self.mlps, MLPS, self.num_hidden_layers, "mlps")
        for key, allowed in (("lact_update", UPDATES), ("lact_order", ORDERS), ("lact_glue", GLUE_IMPLS),
                             ("ttt_target", TARGETS), ("attn_backend", BACKENDS)):
            _one_of(getattr(self, key), allowed, key)
        _check(self)

"""Model presets for pretraining from scratch (Qwen3 architecture) and loading local models.

Sizes (parameters with tied embeddings; ``tiny`` counted with a 2k vocabulary, the others
with 32k): ``tiny`` ≈ 1M (the CPU demo), ``20m``, ``60m``, ``150m``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path

import torch

from fastweights.errors import FastWeightsError, warn

__all__ = ["SIZES", "ModelSize", "build_model", "check_vocab", "load_model", "resolve_model"]


@dataclass(frozen=True)
class ModelSize:
    """A Qwen3 shape plus the In-Place TTT settings used when converting at init."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int
    ttt_layers: tuple[int, ...]
    ttt_chunk: int


SIZES = {
    "tiny": ModelSize(128, 4, 4, 2, 384, 32, ttt_layers=(0, 2), ttt_chunk=128),
    "20m": ModelSize(384, 8, 6, 2, 1024, 64, ttt_layers=(0, 3, 6), ttt_chunk=256),
    "60m": ModelSize(512, 12, 8, 4, 1536, 64, ttt_layers=(0, 6), ttt_chunk=512),
    "150m": ModelSize(768, 18, 12, 4, 2304, 64, ttt_layers=(0, 6, 12), ttt_chunk=1024),
}


def resolve_model(name: str) -> str:
    """``"preset"`` if ``name`` is a size in :data:`SIZES` (a directory of that name is then
    passed over with a warning: ``./tiny`` names it), ``"local"`` if it is a local model
    directory; otherwise a :class:`FastWeightsError` naming the sizes and close matches."""
    if name in SIZES:
        if (Path(name) / "config.json").is_file():
            warn(f"model {name!r} is the preset; the model directory ./{name} is not used (name it ./{name} to "
                 "use it)")
        return "preset"
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise FastWeightsError(f"no config.json in model directory {name}")
        return "local"
    close = get_close_matches(name, list(SIZES), n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise FastWeightsError(
        f"unknown model {name!r}{hint}: expected a size ({', '.join(SIZES)}) or a local Hugging Face model directory"
    )


def build_model(size: str, vocab_size: int, max_position_embeddings: int = 32768, seed: int = 0):
    """A freshly initialised ``Qwen3ForCausalLM`` of preset ``size`` (tied embeddings),
    initialised under ``torch.manual_seed(seed)``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    s = SIZES[size]
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        head_dim=s.head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def check_vocab(model, vocab_size: int, name) -> None:
    """Refuse a dataset whose tokenizer has more tokens than ``model``'s vocabulary (its ids
    would index past the embedding)."""
    if model.config.vocab_size < vocab_size:
        raise FastWeightsError(f"the dataset's tokenizer has {vocab_size} tokens but {name} has vocab_size "
                               f"{model.config.vocab_size}: prepare the data with --tokenizer {name} (if it has "
                               f"a tokenizer), or give the model a vocab_size of at least {vocab_size}")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "model-*.safetensors", "pytorch_model-*.bin")


def check_causal(model, name) -> None:
    """Refuse a model whose outputs see later tokens (a hybrid with ``lact_order="update_apply"``):
    its next-token losses, perplexity and passkey scores would read the answers."""
    layers = getattr(model.config, "noncausal_layers", None)
    if layers:
        raise FastWeightsError(f"{name} is not a causal LM: its LaCT layers {layers} read each chunk with their own "
                               "update (lact_order='update_apply'), so next-token losses would see later tokens; "
                               "train and evaluate with lact_order='apply_update'")


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, init_missing: bool = False):
    """A causal LM from a local Hugging Face directory, converted or not (``dtype="auto"``: the
    checkpoint's own). Never runs remote code. An unknown ``model_type`` raises a one-line :class:`FastWeightsError`.
    ``init_missing``: a directory with a ``config.json`` and no weights gives a model freshly
    initialised from that config (under the caller's RNG seed); otherwise it raises."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(path)
    if not path.is_dir():
        raise FastWeightsError(f"model directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        hint = f" (a training run? its model is {path / 'model'})" if (path / "model" / "config.json").exists() else ""
        raise FastWeightsError(f"no config.json in model directory {path}{hint}")
    raw = json.loads(cfg_file.read_text())
    converted = raw.get("ttt_layers") is not None
    weights = any(any(path.glob(f)) for f in WEIGHT_FILES)  # shards without their index: transformers says so
    if converted and weights:  # In-Place TTT: registers its inplace_ttt_<family> itself
        from fastweights.models import load_pretrained

        return load_pretrained(path, dtype=dtype, local_files_only=True)
    import fastweights.models.hybrid  # noqa: F401  (registers fastweights_hybrid)

    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type.startswith("fwl_") and model_type not in CONFIG_MAPPING:
        from fastweights.models.fwl import register_fwl_family  # families beyond those registered at import

        if model_type[4:] in CONFIG_MAPPING:
            register_fwl_family(model_type)
    if not converted and model_type not in CONFIG_MAPPING:
        close = get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise FastWeightsError(f"unknown model family {model_type!r} in {cfg_file}{hint}")
    if not weights:
        if not init_missing or converted or str(model_type).startswith("fwl_"):
            what = ("save the converted model with its weights" if converted else
                    "train it first (fastweights train --model DIR initialises a plain or hybrid config)")
            raise FastWeightsError(f"{path} holds a config.json but no weights ({WEIGHT_FILES[0]}): {what}")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        except (ValueError, KeyError) as err:
            raise FastWeightsError(f"cannot build a model from {cfg_file}: {err}") from None
        warn(f"{path} holds no weights: a model initialised from its config.json")
        model = AutoModelForCausalLM.from_config(config)
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, local_files_only=True)

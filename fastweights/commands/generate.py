"""``fastweights generate``: continue a prompt with a local model (converted or not)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from fastweights._globals import caller_globals
from fastweights.config import option, parse
from fastweights.data.tokenizer import load_tokenizer, text_prefix
from fastweights.errors import FastWeightsError, check_at_least, warn
from fastweights.models.compat import hf_progress_bars
from fastweights.models.inplace_ttt import set_max_update_norm
from fastweights.models.presets import load_model
from fastweights.ops.inplace_ttt import check_max_update_norm
from fastweights.train.trainer import pick_device


@dataclass
class GenerateConfig:
    model: str = option("local model directory holding a tokenizer too", "")
    prompt: str = option("text to continue", "def ")
    max_new_tokens: int = option("tokens to generate", 64)
    temperature: float = option("sampling temperature (0: greedy)", 0.0)
    top_k: int = option("sample from the k most likely tokens (0: all)", 0)
    top_p: float = option("sample from the smallest set of tokens whose probability reaches p (1: all)", 1.0)
    seed: int = option("sampling seed", 0)
    max_update_norm: float | None = option("In-Place TTT models: clip each chunk's fast-weight update to this "
                                           "Frobenius norm (default: the model's config, ttt_max_update_norm)", None)
    device: str = option("auto, cpu or cuda[:i]", "auto")
    progress: bool = option("show transformers' progress bar while the model loads", True)


def generate(cfg: GenerateConfig) -> str:
    """The generated continuation (prompt excluded). A converted model carries its fast weights
    in its cache (``InPlaceTTTCache``), so decoding is cached for every causal model (a hybrid
    with LaCT ``update_apply`` layers, not causal inside a chunk, decodes by full forwards). Decoding follows
    these options alone: the sampling settings saved with the model (e.g. Qwen3's top_p 0.95,
    top_k 20) are not applied; its end-of-text tokens are."""
    with caller_globals():  # the seed below is this call's; the caller's RNG state comes back
        return _generate(cfg)


def _generate(cfg: GenerateConfig) -> str:
    if not cfg.model:
        raise FastWeightsError("pass --model DIR")
    check_at_least("max_new_tokens", cfg.max_new_tokens, 1)
    check_at_least("top_k", cfg.top_k, 0)
    check_at_least("seed", cfg.seed, 0)
    if not math.isfinite(cfg.temperature) or cfg.temperature < 0:
        raise FastWeightsError(f"temperature must be >= 0 (0: greedy), got {cfg.temperature}")
    if not (0 < cfg.top_p <= 1):
        raise FastWeightsError(f"top_p must be in (0, 1] (1: all tokens), got {cfg.top_p}")
    check_max_update_norm(cfg.max_update_norm)
    with hf_progress_bars(cfg.progress):
        model = load_model(cfg.model).to(pick_device(cfg.device)).eval()
        if cfg.max_update_norm is not None:
            set_max_update_norm(model, cfg.max_update_norm)
    try:
        tok = load_tokenizer(cfg.model)
    except FastWeightsError as err:
        if (Path(cfg.model) / "state.json").is_file():  # a training checkpoint: its run's model has the tokenizer
            raise FastWeightsError(f"{err}: {cfg.model} is a training checkpoint, which holds no tokenizer; generate "
                                   f"from the run's model directory (<run>/model), or copy the tokenizer files of "
                                   f"the run's dataset (<data>/tokenizer) into it") from None
        raise
    text = tok(cfg.prompt, add_special_tokens=False)["input_ids"]
    if not text:
        raise FastWeightsError("the prompt is empty")
    # the BOS of tokenizers that start texts with one (Llama, Mistral), as training data starts
    ids = torch.tensor([text_prefix(tok) + text], device=model.device)
    torch.manual_seed(cfg.seed)
    saved = model.generation_config
    # a model that is not causal inside a chunk (LaCT update_apply) decodes by full forwards
    cached = not getattr(model.config, "noncausal_layers", None)
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.temperature > 0, use_cache=cached,
                           eos_token_id=saved.eos_token_id if saved.eos_token_id is not None else tok.eos_token_id,
                           bos_token_id=saved.bos_token_id, pad_token_id=tok.eos_token_id)
    if cfg.temperature > 0:
        gen.temperature, gen.top_k, gen.top_p = cfg.temperature, cfg.top_k, cfg.top_p
    elif cfg.top_k or cfg.top_p < 1:
        warn(f"--top-k {cfg.top_k} and --top-p {cfg.top_p:g} apply to sampling: with --temperature 0 decoding is "
             "greedy and ignores them (give a temperature > 0 to sample)")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    # the continuation as it reads after the prompt: decoded together with the prompt (a
    # SentencePiece tokenizer drops a word-start space when the new tokens are decoded alone)
    full = tok.decode(out[0], skip_special_tokens=True)
    prompt = tok.decode(out[0, :ids.shape[1]], skip_special_tokens=True)
    if full.startswith(prompt):
        return full[len(prompt):]
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str]) -> int:
    cfg = parse(GenerateConfig, argv, "fastweights generate", __doc__)
    with torch.inference_mode():
        text = generate(cfg)
    print(cfg.prompt + text)
    return 0

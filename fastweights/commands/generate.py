"""``fastweights generate``: continue a prompt with a local model (converted or not)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastweights.config import option, parse
from fastweights.data.tokenizer import load_tokenizer
from fastweights.errors import FastWeightsError, check_at_least
from fastweights.models.presets import load_model
from fastweights.train.trainer import pick_device


@dataclass
class GenerateConfig:
    model: str = option("local model directory holding a tokenizer too", "")
    prompt: str = option("text to continue", "def ")
    max_new_tokens: int = option("tokens to generate", 64)
    temperature: float = option("sampling temperature (0: greedy)", 0.0)
    top_k: int = option("sample from the k most likely tokens (0: all)", 0)
    seed: int = option("sampling seed", 0)
    device: str = option("auto, cpu or cuda[:i]", "auto")


def generate(cfg: GenerateConfig) -> str:
    """The generated continuation (prompt excluded). A converted model carries its fast weights
    in its cache (``InPlaceTTTCache``), so decoding is cached for every model."""
    if not cfg.model:
        raise FastWeightsError("pass --model DIR")
    check_at_least("max_new_tokens", cfg.max_new_tokens, 1)
    check_at_least("top_k", cfg.top_k, 0)
    if not math.isfinite(cfg.temperature) or cfg.temperature < 0:
        raise FastWeightsError(f"temperature must be >= 0 (0: greedy), got {cfg.temperature}")
    model = load_model(cfg.model).to(pick_device(cfg.device)).eval()
    tok = load_tokenizer(cfg.model)
    ids = tok(cfg.prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    if ids.shape[1] == 0:
        raise FastWeightsError("the prompt is empty")
    torch.manual_seed(cfg.seed)
    kwargs = {"do_sample": cfg.temperature > 0, "max_new_tokens": cfg.max_new_tokens, "pad_token_id": tok.eos_token_id}
    if cfg.temperature > 0:
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k or None)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, **kwargs)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str]) -> int:
    cfg = parse(GenerateConfig, argv, "fastweights generate", __doc__)
    with torch.inference_mode():
        text = generate(cfg)
    print(cfg.prompt + text)
    return 0

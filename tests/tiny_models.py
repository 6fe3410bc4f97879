"""Tiny randomly initialised causal LMs of every supported family, for tests."""

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
VOCAB = 97


def tiny_model(family: str, layers: int = 7, seed: int = 0, **overrides):
    """A float32 model with d = 24, f = 40 (not powers of two), in eval mode."""
    cfg_cls, model_cls = FAMILIES[family]
    kw = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=layers,
              num_attention_heads=2, num_key_value_heads=1, head_dim=12, max_position_embeddings=512,
              tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**kw)).eval()

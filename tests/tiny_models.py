"""Tiny randomly initialised causal LMs of every supported family, for tests, and loading a
saved model in a fresh interpreter."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
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


FRESH_LOAD = """
import sys, torch
from safetensors.torch import save_file
from fastweights.models.presets import load_model
model = load_model(sys.argv[1]).eval()
with torch.no_grad():
    save_file({"logits": model(torch.arange(12).view(1, 12) % 50).logits}, sys.argv[2])
print(type(model).__name__)
"""


def load_in_fresh_process(path, tmp_path):
    """(class name, logits of ids 0..11) of ``load_model(path)`` (what the CLI loads with) in a
    new interpreter, where nothing has been registered yet."""
    out = tmp_path / "fresh.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(path), str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1], load_file(out)["logits"]


def continuation_errors(model, ids, cut: int) -> dict[str, float]:
    """Per cache argument name (``cache``, ``past_key_values``): the largest logit difference
    between continuing ``ids[:, cut:]`` from the cache of ``ids[:, :cut]`` and one full forward."""
    errors = {}
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for name in ("cache", "past_key_values"):
            first = model(ids[:, :cut], use_cache=True)
            cache = getattr(first, "cache", None) or first.past_key_values
            out = model(ids[:, cut:], use_cache=True, **{name: cache})
            errors[name] = float((out.logits - full[:, cut:]).abs().max())
    return errors


class Adapter(torch.nn.Module):
    """What a peft LoRA layer looks like from outside: the linear as ``base_layer``, its weight
    proxied, and a forward that adds to it."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + 1.0

"""``fastweights main``: convert a small random Qwen3 model and show that it computes and learns.

(The full main job, data → train → eval → plot, replaces this demo.)"""

from __future__ import annotations

import argparse

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from fastweights.models import convert, ttt_parameters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastweights main", description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = Qwen3ForCausalLM(cfg)
    x = torch.randint(0, 256, (4, 128))
    with torch.no_grad():
        before = model(x, use_cache=False).logits
    convert(model, layers=[0, 2], chunk_size=32, lr=1.0)
    with torch.no_grad():
        after = model(x, use_cache=False).logits
    print(f"converted layers {model.config.ttt_layers}: max |logit change| = {(after - before).abs().max():.2e}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # a sequence that repeats itself: the fast weights can carry what earlier chunks saw
    seq = torch.randint(0, 256, (8, 32)).repeat(1, 4)
    for step in range(args.steps):
        loss = model(seq, labels=seq, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            conv = sum(p.abs().sum().item() for n, p in ttt_parameters(model) if "ttt_conv" in n)
            print(f"step {step:3d}  loss {loss.item():.4f}  |ttt_conv|_1 {conv:.3f}")
    return 0

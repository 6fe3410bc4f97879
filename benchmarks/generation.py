"""Generation speed: a converted Qwen3-style model against the same model unconverted (issue 4).

Measures, for both models in the same run:
* prefill tokens/s: one forward pass over the prompt through a new cache (what ``generate`` does first);
* decode tokens/s: greedy steps of one token per row through the cache, after the prompt.

The goal on an H100 is converted/base >= 0.9 for decode (batch 1 and 16, 8k-token prompt) and >= 0.8
for prefill. Before timing, the converted model's cached decoding is checked against one full forward
pass over the same tokens; the benchmark refuses to report speeds if that check fails.

    python benchmarks/generation.py                 # CUDA: ~0.6B Qwen3-style model, bf16, 8k prompt
    python benchmarks/generation.py --tiny          # CPU: tiny model, to check that the script works

Random weights; the TTT conv and P are set non-zero so the fast weights really change the outputs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from tqdm import tqdm
from transformers import Qwen3Config, Qwen3ForCausalLM

from fastweights.models import InPlaceTTTCache, convert, ttt_modules
from fastweights.models.compat import CACHE_KWARG

# Qwen3-0.6B shapes (about 0.6B parameters with tied embeddings).
FULL = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (a functional check, not a measurement)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 (float32 with --tiny)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens per row (default 8192; 256 with --tiny)")
    p.add_argument("--new-tokens", type=int, default=None, help="timed decode steps (default 128; 16 with --tiny)")
    p.add_argument("--batches", default=None, help="comma-separated decode batch sizes (default 1,16; 1,4 with --tiny)")
    p.add_argument("--chunk", type=int, default=None, help="TTT chunk (default 4096, the official default; 64 tiny)")
    p.add_argument("--lr", type=float, default=3.0, help="TTT inner learning rate")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps before timing")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tiny = args.tiny
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.dtype = DTYPES[args.dtype or ("float32" if tiny else "bfloat16")]
    args.prompt = args.prompt or (256 if tiny else 8192)
    args.new_tokens = args.new_tokens or (16 if tiny else 128)
    args.batches = [int(b) for b in (args.batches or ("1,4" if tiny else "1,16")).split(",")]
    args.chunk = args.chunk or (64 if tiny else 4096)
    if args.threads or tiny:
        torch.set_num_threads(args.threads or 1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("CUDA is not available: run with --tiny (CPU) or on a GPU machine")
    return args


def build_models(args):
    """(base, converted): the same random weights; converted has non-zero conv and P."""
    torch.manual_seed(args.seed)
    cfg = Qwen3Config(**(TINY if args.tiny else FULL), max_position_embeddings=max(32768, 2 * args.prompt))
    base = Qwen3ForCausalLM(cfg).to(device=args.device, dtype=args.dtype).eval()
    ttt = convert(copy.deepcopy(base), chunk_size=args.chunk, lr=args.lr)
    with torch.no_grad():
        for m in ttt_modules(ttt):
            m.ttt_conv.weight.normal_(0, 0.02)
    return base, ttt


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def check_exact(base, model, args) -> tuple[float, float]:
    """Cached decoding (prefill + 8 token steps, crossing chunk completions) against one full forward.

    Returns (relative error of the cached logits, relative change the fast weights make: the base
    model's logits against the converted model's); the first must be far below the second.
    """
    n = min(args.prompt, 2 * args.chunk + 8)
    ids = torch.randint(0, model.config.vocab_size, (2, n + 8), device=args.device)
    full = model(input_ids=ids, use_cache=False).logits
    plain = base(input_ids=ids, use_cache=False).logits
    out = model(input_ids=ids[:, :n], use_cache=True)
    steps = [out.logits]
    for t in range(n, n + 8):
        out = model(input_ids=ids[:, t:t + 1], **{CACHE_KWARG: getattr(out, CACHE_KWARG)}, use_cache=True)
        steps.append(out.logits)
    return rel(torch.cat(steps, 1), full), rel(plain, full)


@torch.no_grad()
def time_prefill(model, ids, args) -> float:
    """Seconds for one forward pass over ``ids`` through a new cache (median of 3 after a warm-up)."""
    times = []
    for _ in range(4):
        sync(args.device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[1]


@torch.no_grad()
def time_decode(model, ids, args, profile: bool = False) -> tuple[float, float, object]:
    """Greedy decode steps (one token per row) after prefilling ``ids``.

    Returns (wall seconds per step, GPU kernel seconds per step or nan, cache). The kernel time is
    the sum of the device kernels' own time under ``torch.profiler``: at this model size HF's eager
    decode is bound by kernel launches on the CPU, so both numbers are reported.
    """
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = getattr(out, CACHE_KWARG)
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(args.warmup):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    cuda = str(args.device).startswith("cuda")
    prof = None
    if profile and cuda:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        prof = torch_profile(activities=[ProfilerActivity.CUDA])
        prof.__enter__()
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.new_tokens):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    sync(args.device)
    wall = (time.perf_counter() - t0) / args.new_tokens
    kernel = float("nan")
    if prof is not None:
        prof.__exit__(None, None, None)
        kernel = sum(e.self_device_time_total for e in prof.key_averages()) * 1e-6 / args.new_tokens
    return wall, kernel, cache


def main(argv=None) -> int:
    args = parse_args(argv)
    base, ttt = build_models(args)
    cfg = ttt.config
    err, effect = check_exact(base, ttt, args)
    tol = 1e-4 if args.dtype == torch.float32 else 3e-2
    if not err < tol:
        print(f"cached decoding differs from the full forward pass: relative error {err:.2e} >= {tol:.0e} "
              f"(the fast weights change the logits by {effect:.2e}); not reporting speeds", file=sys.stderr)
        return 1

    rows = []
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    todo = [("prefill", b) for b in args.batches] + [("decode", b) for b in args.batches]
    for kind, batch in tqdm(todo, desc="benchmark", disable=not sys.stderr.isatty()):
        ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt), generator=gen).to(args.device)
        res, form = {}, ""
        models = (("base", base), ("converted", ttt))
        if kind == "prefill":
            for name, model in models:
                res[name] = batch * args.prompt / time_prefill(model, ids, args)
        else:
            # One untimed pass each first (cuDNN builds an attention plan per new key length, once per
            # process: whichever model ran first would pay for both), then alternate and take medians.
            walls = {name: [] for name, _ in models}
            for _, model in models:
                time_decode(model, ids, args)
            for _ in range(3):
                for name, model in models:
                    walls[name].append(time_decode(model, ids, args)[0])
            for name, model in models:
                _, kernel, cache = time_decode(model, ids, args, profile=True)
                res[name] = batch / sorted(walls[name])[1]
                res[name + "_kernel"] = kernel
                if name == "converted":
                    assert isinstance(cache, InPlaceTTTCache)
                    form = "dense" if all(s.dense is not None for s in cache.ttt_states.values()) else "factored"
        goal = 0.8 if kind == "prefill" else 0.9
        note = ""
        if kind == "decode":
            start = args.prompt + args.warmup
            done = (start + args.new_tokens) // args.chunk - start // args.chunk
            note = f"state {form}; {done} chunk update(s) in the timed steps"
            if res["base_kernel"] == res["base_kernel"]:  # not nan: measured on CUDA
                kb, kc = res["base_kernel"] * 1e3, res["converted_kernel"] * 1e3
                note += f"; GPU kernel ms/step base {kb:.2f}, converted {kc:.2f} (ratio {kb / kc:.3f})"
        rows.append((kind, batch, res["base"], res["converted"], res["converted"] / res["base"], goal, note))

    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    n_params = sum(p.numel() for p in base.parameters())
    print(f"\nIn-Place TTT generation benchmark ({'tiny functional check' if args.tiny else 'Qwen3-style'})")
    print(f"device: {device}; dtype: {str(args.dtype).replace('torch.', '')}; torch {torch.__version__}")
    print(f"model: {n_params / 1e6:.1f}M params, d={cfg.hidden_size}, f={cfg.intermediate_size}, "
          f"layers={cfg.num_hidden_layers}, heads={cfg.num_attention_heads}/{cfg.num_key_value_heads}x{cfg.head_dim}, "
          f"vocab={cfg.vocab_size}")
    print(f"TTT: layers {cfg.ttt_layers}, chunk {args.chunk}, lr {args.lr}; prompt {args.prompt} tokens/row, "
          f"{args.new_tokens} timed decode steps")
    print(f"check: cached vs full forward, rel. error {err:.1e} (fast weights change the logits by {effect:.1e})")
    print()
    head = (f"| {'phase':8} | {'batch':>5} | {'base tok/s':>11} | {'converted tok/s':>15} | {'ratio':>6} "
            f"| {'goal':>5} | note")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:]))
    for kind, batch, b, c, r, goal, note in rows:
        ok = "ok" if r >= goal else "BELOW"
        line = f"| {kind:8} | {batch:>5} | {num(b):>11} | {num(c):>15} | {r:>6.3f} | {goal:>5} | {ok}; {note}"
        print(line.rstrip("; "))
    return 0


if __name__ == "__main__":
    sys.exit(main())

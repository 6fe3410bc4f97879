"""Inference cost of FWL and In-Place TTT relative to the plain model, at a preset's shapes.

FLOPs (matmuls and attention, ``torch.utils.flop_counter``) and wall-clock do not depend on
the weights' values, so untrained models are measured, reading random documents one per
forward as the fwl-dynamic-eval experiment reads its test documents (bf16 autocast on GPU,
float32 on CPU). Wall-clock: interleaved repeats, minimum per model.

    PYTHONPATH=. python benchmarks/fwl_inference_cost.py [--size 20m] [--vocab 16384] [--length 2048]
"""

from __future__ import annotations

import argparse

import torch

from fastweights.experiments.fwl_dynamic_eval import _device_name, flops_per_token, read_seconds
from fastweights.models import add_fwl, convert
from fastweights.models.presets import SIZES, build_model
from fastweights.train.trainer import pick_device

NAMES = {"static": "static", "fwl": "FWL", "inplace_ttt": "In-Place TTT"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="20m", choices=list(SIZES))
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--length", type=int, default=2048, help="tokens per document")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    g = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(args.docs):
        ids = torch.randint(0, args.vocab, (1, args.length + 1), generator=g)
        docs.append({"input_ids": ids[:, :-1], "position_ids": torch.arange(args.length)[None], "targets": ids[:, 1:]})
    size = SIZES[args.size]
    models = {}
    for kind in ("static", "fwl", "inplace_ttt"):
        m = build_model(args.size, args.vocab, max_position_embeddings=max(4096, args.length))
        if kind == "fwl":
            add_fwl(m)
        elif kind == "inplace_ttt":
            convert(m, layers=list(size.ttt_layers), chunk_size=size.ttt_chunk, lr=3.0, target="embed")
        models[kind] = m.to(device).eval()
    flops = {k: flops_per_token(m, docs[0], device) for k, m in models.items()}
    secs = {k: [] for k in models}
    for _ in range(args.repeats):
        for k, m in models.items():
            secs[k].append(read_seconds(m, docs, device))
    dtype = "bf16 autocast" if device.type == "cuda" else "float32"
    print(f"{_device_name(device)}, torch {torch.__version__}, {dtype}; "
          f"{args.size} preset, vocabulary {args.vocab}, {args.docs} documents of {args.length} tokens")
    print(f"| model | parameters | FLOPs/token | FLOPs × static | seconds (min of {args.repeats}) | time × static |")
    print("|---|---|---|---|---|---|")
    for k, m in models.items():
        t = min(secs[k])
        print(f"| {NAMES[k]} | {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M | {flops[k] / 1e6:.1f} M | "
              f"{flops[k] / flops['static']:.2f} | {t:.3f} | {t / min(secs['static']):.2f} |")


if __name__ == "__main__":
    main()

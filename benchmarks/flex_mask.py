"""How long flex attention's block mask takes to build, per kind of token layout (SWA and LaCT
training on CUDA build one per forward pass; fastweights.layers.attention).

Rows, for B rows of N tokens and a sliding window:

* ``general``: the mask_mod that reads document ids, stream indices and validity of both sides
  (:func:`fastweights.layers.attention._mask_mod`), on packed rows: what every forward built
  before the seventeenth measurement (docs/benchmarks.md);
* ``packed, keys = queries``: :func:`_own_keys_mask_mod`, used when the layout has no cached
  prefix: one read of each query's document start and one of each key's validity;
* ``one document per row, first build`` and ``cached``: :func:`_one_document_block_mask`, index
  arithmetic alone, kept per (N, window, device).

Each packed mask is first checked block for block against the general one (the block counts and
indices, partial and full). Times are wall-clock medians of ``--iters`` builds after a warm-up
(the mask is built on the host's call, so no CUDA graph), with the ratio to ``general``.

    python benchmarks/flex_mask.py                 # CUDA: N 32768, window 2048
    python benchmarks/flex_mask.py --tiny          # CPU smoke test
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import torch
from lact_glue import timing_args  # benchmarks/, beside this script

from fastweights.layers import attention as A
from fastweights.models.hybrid.modeling import _layout


def _wall_ms(fn, dev, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _same_blocks(a, b) -> bool:
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in names)


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--seqlen", type=int, default=32768)
        p.add_argument("--window", type=int, default=2048)

    _, args = timing_args(__doc__, argv, extra)
    if args.tiny:
        dev, N, W, docs = torch.device("cpu"), 300, 64, (90, 70, 100)
    else:
        if not torch.cuda.is_available():
            print("flex_mask.py times flex attention's block masks on CUDA; --tiny runs a CPU smoke test",
                  file=sys.stderr)
            return 2
        dev, N, W = torch.device("cuda"), args.seqlen, args.window
        docs = (N * 9 // 32, N * 7 // 32, N * 12 // 32)
    docs = (*docs, N - sum(docs))
    build = A._block_mask_fn(dev.type == "cuda")
    packed = _layout(torch.cat([torch.arange(n) for n in docs]).unsqueeze(0).to(dev), None, None, 1, N, dev)
    copied = dataclasses.replace(packed, key_doc=packed.doc.clone(), key_index=packed.index.clone())
    assert packed.key_doc is packed.doc and packed.key_index is packed.index and not packed.single_doc

    def mask(mod):
        return build(mod, 1, None, N, N, device=dev)

    general = mask(A._mask_mod(copied, W))
    if not _same_blocks(mask(A._own_keys_mask_mod(packed, W)), general):
        raise SystemExit("the packed mask (keys = queries) differs from the general one")

    def first_build():
        A._one_document_block_mask.cache_clear()
        return A._one_document_block_mask(N, W, dev)

    rows = {
        "general (packed rows)": lambda: mask(A._mask_mod(copied, W)),
        "packed, keys = queries": lambda: mask(A._own_keys_mask_mod(packed, W)),
        "one document per row, first build": first_build,
        "one document per row, cached": lambda: A._one_document_block_mask(N, W, dev),
    }
    ms = {name: _wall_ms(fn, dev, args.warmup, args.iters) for name, fn in rows.items()}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, B 1, N {N}, window {W}, packed rows of {list(docs)} tokens; "
          f"median of {args.iters} builds\n")
    print("| layout | ms | × general |\n|---|---|---|")
    base = ms["general (packed rows)"]
    for row, t in ms.items():
        print(f"| {row} | {t:.3f} | {t / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

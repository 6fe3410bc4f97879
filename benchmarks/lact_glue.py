"""The LaCT layer's elementwise glue: torch (compiled, as the layer runs it on CUDA) against the
Triton kernels of fastweights.ops.lact_glue, forward + backward, per token-block configuration.

Each row times ``fast_inputs`` (q/k/v of the fast branch, η, β) or ``merge`` (the gated merge)
forward and backward at the benchmark's 760M shapes (B 1, N 32,768, 4 fast heads of 384, bf16),
median of ``--iters``, and gives its time over the compiled torch glue's time in the same run.
``ms`` replays one call from a CUDA graph (the GPU's time, as in a GPU-bound training step);
``eager ms`` times plain calls from CUDA events, host launch overhead included. Before timing,
each Triton configuration is checked against the torch glue (output and gradients, relative
error). ``--tiny`` runs small shapes on CPU (under
``TRITON_INTERPRET=1`` for the Triton rows; timings meaningless).

    python benchmarks/lact_glue.py            # H100
    TRITON_INTERPRET=1 python benchmarks/lact_glue.py --tiny
"""

from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:  # before triton is imported: its kernels run on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse

import torch
from lact_loop_profile import _timer  # benchmarks/, beside this script

from fastweights.ops import lact_glue as G
from fastweights.ops.lact import _compiled
from fastweights.ops.rope import rope_cos_sin

# (tokens per program, tokens per tile, warps) of the forward kernels (the backward at its default),
# then of the backward kernels (the forward at its default); (tokens per program, warps) for merge
INPUT_CONFIGS = [(16, 1, 4), (16, 2, 1), (16, 1, 1), (16, 1, 2), (32, 2, 1), (8, 2, 1), (64, 1, 4)]
BWD_CONFIGS = [(16, 1, 4), (16, 1, 2), (16, 1, 1), (16, 2, 1), (8, 1, 2), (32, 1, 2), (16, 2, 2)]
MERGE_CONFIGS = [(4, 4), (2, 2), (4, 2), (8, 2), (4, 1)]


def make(B, N, H, D, dev, dt, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    d = H * D

    def r(*s, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*s, device=dev, dtype=torch.float32, generator=g)).to(dt)

    t = dict(qkv=r(B, N, 3 * d), lr=r(B, N, 3 * H), beta=r(B, N, H), scale=r(2, d, scale=0.3, shift=1.0),
             shift=r(2, d, scale=0.3), a=r(B, N, d), gate=r(B, N, d), f=r(B, H, N, D),
             w=r(D, scale=0.2, shift=1.0))
    for v in t.values():
        v.requires_grad_()
    cos, sin = rope_cos_sin(torch.arange(N, device=dev)[None], D, 1e6, dt)
    grads = dict(inputs=[r(B, H, N, D) for _ in range(3)] + [r(B, H, N, 3), r(B, H, N)], merge=r(B, N, d))
    return t, cos, sin, grads


def inputs_step(fn, t, cos, sin, grads, H):
    q, k, v = t["qkv"].chunk(3, dim=-1)
    outs = fn(q, k, v, t["lr"], t["beta"], cos, sin, t["scale"], t["shift"], H)
    leaves = [t[k] for k in ("qkv", "lr", "beta", "scale", "shift")]
    # detached: a kept result must not keep the autograd graph (and the leaves' gradient
    # accumulators, made on the eager stream) alive into the CUDA-graph capture
    return [x.detach() for x in (*outs, *torch.autograd.grad(outs, leaves, grads["inputs"]))]


def merge_step(fn, t, grads):
    out = fn(t["a"], t["gate"], t["f"], t["w"], 1e-6)
    return [x.detach() for x in (out, *torch.autograd.grad(out, [t[k] for k in ("a", "gate", "f", "w")],
                                                            grads["merge"]))]


def worst_rel(got, want) -> float:
    return max(float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm().clamp_min(1e-30))
               for a, b in zip(got, want, strict=True))


def time_ms(fn, dev, warmup, iters) -> tuple[float, float]:
    """(graphed, eager): median ms of ``fn()`` after ``warmup`` calls. On CUDA, ``graphed`` replays
    one call captured in a CUDA graph: the GPU's time alone. ``eager`` times plain calls from CUDA
    events, which also counts the GPU waiting for the host's launches (the fourteenth measurement
    in docs/benchmarks.md found eager calls host-bound: 1.27 ms of kernels in 2.4 ms). On CPU both
    are the wall clock of plain calls."""
    for _ in range(warmup):
        fn()
    timer = _timer(dev)
    eager = timer(fn, iters)
    if dev.type != "cuda":
        return eager, eager
    side = torch.cuda.Stream()  # settle the allocator and libraries off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fn()
    return timer(graph.replay, iters), eager


def timing_args(doc: str, argv=None, extra=None):
    """(parser, args) of a kernel study: ``--tiny`` (CPU smoke test), ``--warmup``, ``--iters``,
    and the study's own arguments, added by ``extra(parser)``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU (smoke test)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    if extra is not None:
        extra(p)
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    p, args = timing_args(__doc__, argv)
    if args.tiny:
        dev, dt, (B, N, H, D) = torch.device("cpu"), torch.float32, (2, 37, 3, 10)
        inputs_cfg, bwd_cfg, merge_cfg = INPUT_CONFIGS[:1], BWD_CONFIGS[:1], MERGE_CONFIGS[:2]
        ref_in, ref_mg = G.fast_inputs_reference, G.merge_reference
    else:
        if not torch.cuda.is_available():
            p.error("needs CUDA (or --tiny)")
        dev, dt, (B, N, H, D) = torch.device("cuda"), torch.bfloat16, (1, 32768, 4, 384)
        inputs_cfg, bwd_cfg, merge_cfg = INPUT_CONFIGS, BWD_CONFIGS, MERGE_CONFIGS
        ref_in = _compiled(G.fast_inputs_reference, "bench-glue-inputs", "default")
        ref_mg = _compiled(G.merge_reference, "bench-glue-merge", "default")
    t, cos, sin, grads = make(B, N, H, D, dev, dt)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"{name}, {dt}, B {B}, N {N}, {H} fast heads of {D}; forward + backward, median of {args.iters}; "
          "ms: replayed from a CUDA graph (GPU time), eager ms: plain calls")
    print("| glue | tokens/program | tokens/tile | warps | rel. err. vs torch | ms | × torch | eager ms |")
    print("|---|---|---|---|---|---|---|---|")
    knob_names = ("BLOCK_N", "TILE_N", "WARPS", "BWD_BLOCK_N", "BWD_TILE_N", "BWD_WARPS", "MERGE_BLOCK_N",
                  "MERGE_WARPS")
    keep = {k: getattr(G, k) for k in knob_names}
    ref_inputs = lambda: inputs_step(ref_in, t, cos, sin, grads, H)  # noqa: E731
    tri_inputs = lambda: inputs_step(lambda *x: G.fast_inputs(*x, impl="triton"), t, cos, sin, grads, H)  # noqa: E731
    rows = [("fast_inputs, forward config", ref_inputs, tri_inputs, inputs_cfg, ("BLOCK_N", "TILE_N", "WARPS")),
            ("fast_inputs, backward config", ref_inputs, tri_inputs, bwd_cfg,
             ("BWD_BLOCK_N", "BWD_TILE_N", "BWD_WARPS")),
            ("merge", lambda: merge_step(ref_mg, t, grads),
             lambda: merge_step(lambda *x: G.merge(*x, impl="triton"), t, grads), merge_cfg,
             ("MERGE_BLOCK_N", "MERGE_WARPS"))]
    try:
        for glue, ref, tri, cfgs, knobs in rows:
            want = ref()
            base, base_eager = time_ms(ref, dev, args.warmup, args.iters)
            print(f"| {glue} | torch ({'compiled' if dev.type == 'cuda' else 'eager'}) | - | - | - | {base:.3f} | 1.00 "
                  f"| {base_eager:.3f} |")
            for cfg in cfgs:
                for knob, value in keep.items():  # the other kernels at their defaults
                    setattr(G, knob, value)
                for knob, value in zip(knobs, cfg, strict=True):
                    setattr(G, knob, value)
                err = worst_rel(tri(), want)
                ms, eager = time_ms(tri, dev, args.warmup, args.iters)
                tile = cfg[1] if len(cfg) == 3 else "-"
                print(f"| {glue} | {cfg[0]} | {tile} | {cfg[-1]} | {err:.1e} | {ms:.3f} | {ms / base:.2f} "
                      f"| {eager:.3f} |")
    finally:
        for knob, value in keep.items():
            setattr(G, knob, value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

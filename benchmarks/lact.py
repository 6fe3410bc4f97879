"""Training throughput of 760M-shaped blocks at 32k tokens (SPEC §2, issue 9).

Each variant is a stack of ``--layers`` blocks of the hybrid model
(``fastweights.models.hybrid``: RMSNorm → mixer → RMSNorm → MLP, d 1536, f 4096, 12 heads,
window = chunk = 2048), timed forward + backward in bf16 on ``--batch`` rows (default 1) of
``--seqlen`` tokens. Variants: LaCT GD / momentum / Muon, SWA alone, full attention, In-Place TTT on SWA
(SWA mixer, In-Place TTT MLP), and GLA and DeltaNet (flash-linear-attention's layers; by default
only on CUDA with ``flash-linear-attention`` installed). Ratios are against SWA and full attention of the same run.
The LaCT op's chunk loop is compiled whole with torch.compile on CUDA by default when gradients
are taken (``FASTWEIGHTS_LACT_COMPILE`` and ``FASTWEIGHTS_LACT_COMPILE_SCOPE``, see
fastweights.ops.lact); ``lact-muon-eager`` runs it eagerly, ``lact-muon-step`` compiles the
chunk step only (``FASTWEIGHTS_LACT_COMPILE_SCOPE=step``), and ``lact-muon-cudagraphs`` compiles
the step with ``mode="reduce-overhead"`` (CUDA graphs; each timed step starts with
``torch.compiler.cudagraph_mark_step_begin()``); ``lact-muon-graphs`` replays the compiled loop
from CUDA graphs captured per layer (``FASTWEIGHTS_LACT_COMPILE=graphs``,
fastweights.ops.lact.LoopGraphs); ``lact-muon-triton-glue`` / ``lact-muon-torch-glue`` run the layer's elementwise glue
from the Triton kernels of fastweights.ops.lact_glue (``glue="triton"``, the default's pick on
CUDA) / from its compiled torch references (``glue="torch"``); on CUDA only. Each
variant starts from a clean state, the last one's blocks freed and torch.compile's caches reset
(``torch._dynamo.reset()``), so that it is timed as in a process of its own: without the reset,
a LaCT variant timed after any other variant ran 2-3 ms slower than when timed first
(docs/benchmarks.md, eleventh measurement). A variant that fails is reported as failed and the
others still run.

Before timing, the LaCT training form (its contiguous fast path and its packed-document path)
is checked against its sequential reference (float64, CPU); the benchmark refuses to report
if the check fails. ``--profile`` also prints, for the variants named by
``--profile-variants`` (default lact-muon), a torch.profiler table of one step: the top 25
ops by GPU time (CPU time on CPU), plus the step's total CPU and GPU time and kernel count.

    python benchmarks/lact.py                     # H100: 760M shapes, 32k tokens
    python benchmarks/lact.py --shape 3b-width    # the same at a 3B-scale width (d 3072, f 8192)
    python benchmarks/lact.py --tiny              # CPU smoke test at a tiny size
    python benchmarks/lact.py --variants lact-muon,lact-muon-eager,swa --profile
    python benchmarks/lact.py --variants lact-muon,swa --doc-len 3000   # packed documents, as the trainer's rows
    python benchmarks/lact.py --variants lact-muon,swa --batch 2          # two rows per step
    python benchmarks/lact.py --output docs/results/lact_bench.md
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback

import torch

from fastweights.models.hybrid import HybridConfig
from fastweights.models.hybrid.modeling import HybridBlock, _layout
from fastweights.ops.lact import COMPILE_ENV, SCOPE_ENV, UPDATES, lact_chunked, lact_reference

VARIANTS = {
    "lact-gd": dict(mixers="lact", mlps="swiglu", lact_update="gd"),
    "lact-momentum": dict(mixers="lact", mlps="swiglu", lact_update="momentum"),
    "lact-muon": dict(mixers="lact", mlps="swiglu", lact_update="muon"),
    "lact-muon-eager": dict(mixers="lact", mlps="swiglu", lact_update="muon"),
    "lact-muon-cudagraphs": dict(mixers="lact", mlps="swiglu", lact_update="muon"),
    "lact-muon-step": dict(mixers="lact", mlps="swiglu", lact_update="muon"),
    "lact-muon-graphs": dict(mixers="lact", mlps="swiglu", lact_update="muon"),
    "lact-muon-triton-glue": dict(mixers="lact", mlps="swiglu", lact_update="muon"),
    "lact-muon-torch-glue": dict(mixers="lact", mlps="swiglu", lact_update="muon"),
    "swa": dict(mixers="swa", mlps="swiglu"),
    "attention": dict(mixers="attention", mlps="swiglu"),
    "inplace-ttt-swa": dict(mixers="swa", mlps="inplace_ttt"),
    "gla": dict(mixers="gla", mlps="swiglu"),
    "deltanet": dict(mixers="deltanet", mlps="swiglu"),
}
# flash-linear-attention's layers: in the default list only on CUDA with the package installed
FLA_VARIANTS = ("gla", "deltanet")
# how the LaCT op is compiled (fastweights.ops.lact.COMPILE_ENV); other variants: the default, auto
COMPILE = {"lact-muon-eager": "0", "lact-muon-cudagraphs": "reduce-overhead", "lact-muon-graphs": "graphs"}
# what is compiled (fastweights.ops.lact.SCOPE_ENV): by default (auto, training) the whole chunk
# loop; these variants compile the chunk step only (CUDA graphs: the loop with CUDA graphs fails in
# torch 2.11, the two layers' calls of one compiled graph overwrite each other's saved tensors)
SCOPE = {"lact-muon-step": "step", "lact-muon-cudagraphs": "step"}
# the LaCT layers' glue (HybridConfig.lact_glue; default auto: Triton on CUDA)
GLUE = {"lact-muon-triton-glue": "triton", "lact-muon-torch-glue": "torch"}
SHAPES = {
    "760m": dict(hidden_size=1536, intermediate_size=4096, num_attention_heads=12, num_key_value_heads=12,
                 sliding_window=2048, lact_heads=4, lact_chunk_size=2048, ttt_chunk=2048, seqlen=32768),
    # a 3B-scale width (the LaCT paper's throughput anchor is a 3B model; its exact config is not in
    # SPEC §2): d 3072, f 8192, 24 heads of 128, the default 4 fast-weight heads (each 768 wide)
    "3b-width": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=24,
                     sliding_window=2048, lact_heads=4, lact_chunk_size=2048, ttt_chunk=2048, seqlen=32768),
    "tiny": dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                 sliding_window=32, lact_heads=2, lact_chunk_size=32, ttt_chunk=32, seqlen=160),
}


def check_lact() -> float:
    """Largest relative error of the training form against the reference (fwd + grads)."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    packed = torch.tensor([list(range(20)) + list(range(17))])
    for update, pos in [(u, p) for u in UPDATES for p in (None, packed)]:
        B, H, N, D = 1, 2, 37, 8
        ins = [torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3)]
        ins.append(torch.rand(B, H, N, 3, generator=g, dtype=torch.float64) * 0.2)
        ins.append(torch.rand(B, H, N, generator=g, dtype=torch.float64))
        ins += [torch.randn(H, D, D, generator=g, dtype=torch.float64) / D**0.5 for _ in range(3)]
        ins = [t.requires_grad_(True) for t in ins]
        ref = lact_reference(*ins, chunk_size=8, update=update, position_ids=pos)
        out = lact_chunked(*ins, chunk_size=8, update=update, position_ids=pos, compile=False)
        go = torch.randn_like(ref)
        pairs = [(out.detach(), ref.detach())]
        pairs += zip(torch.autograd.grad(out, ins, go, allow_unused=True),
                     torch.autograd.grad(ref, ins, go, allow_unused=True), strict=True)
        for a, b in pairs:
            if a is not None and b is not None:
                worst = max(worst, float((a - b).norm() / (b.norm() + 1e-12)))
    return worst


def time_variant(name, shape, layers, dtype, device, warmup, iters, profile=False, doc_len=None, batch=1):
    """Median ms/step of forward + backward; the LaCT compile setting of the variant applies."""
    prev = {e: os.environ.get(e) for e in (COMPILE_ENV, SCOPE_ENV)}
    if device.type != "cuda":  # the CPU smoke test runs every variant eagerly
        os.environ[COMPILE_ENV] = "0"
    elif name in COMPILE:
        os.environ[COMPILE_ENV] = COMPILE[name]
    if name in SCOPE:
        os.environ[SCOPE_ENV] = SCOPE[name]
    try:
        return _time_variant(name, shape, layers, dtype, device, warmup, iters, profile, doc_len, batch)
    finally:
        for e, val in prev.items():
            if val is None:
                os.environ.pop(e, None)
            else:
                os.environ[e] = val


def profile_step(name, step, sync, device):
    """Print a torch.profiler table of one step: top 25 ops by GPU (else CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync()
    avgs = prof.key_averages()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"\n=== profile: {name}, one step (top 25 by {key}) ===")
    print(avgs.table(sort_by=key, row_limit=25, max_name_column_width=60))
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time_total for e in kernels) / 1e3  # us -> ms
    cpu_ops = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    print(f"{name}: {len(kernels)} GPU kernels taking {gpu_ms:.1f} ms in all, {cpu_ops} CPU events "
          f"(profiled step; GPU ms far below the step's ms means the host is the bottleneck)")
    rows = top_by_name(kernels, "device_time_total", 30)
    if rows:
        print(f"top {len(rows)} GPU kernels by total time: total ms | calls | mean us | name")
        print("\n".join(rows))


def top_by_name(events, attr: str, top: int) -> list[str]:
    """Rows ``total ms | calls | mean us | name`` of the ``top`` profiler event names with the
    largest summed ``attr`` (a time in us, e.g. ``device_time_total``)."""
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e.name, []).append(getattr(e, attr))
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return [f"{sum(ts) / 1e3:8.3f} | {len(ts):5d} | {sum(ts) / len(ts):8.1f} | {name[:100]}" for name, ts in ranked]


def build_step(name, shape, layers, dtype, device, doc_len=None, batch=1):
    """``(step, sync)`` for variant ``name``: one forward + backward of ``layers`` blocks on
    ``batch`` rows (each one document, or packed documents of ``doc_len`` tokens, the last one
    shorter), and a
    device synchronisation. Starts from a clean state: torch.compile's code for
    earlier variants is dropped (kept, it made LaCT variants timed after another variant 2-3 ms
    slower), and the last variant's blocks are freed (about 0.1 GiB per earlier variant stays
    allocated elsewhere and still counts in the peak-memory column)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cfg_kw = {k: v for k, v in shape.items() if k != "seqlen"}
    glue = GLUE.get(name, "auto") if device.type == "cuda" else "auto"  # Triton's glue needs CUDA
    cfg = HybridConfig(vocab_size=256, num_hidden_layers=layers, lact_glue=glue, **cfg_kw, **VARIANTS[name])
    blocks = torch.nn.ModuleList(HybridBlock(cfg, i) for i in range(layers)).to(device=device, dtype=dtype)
    N, d = shape["seqlen"], cfg.hidden_size
    x = torch.randn(batch, N, d, device=device, dtype=dtype, requires_grad=True)
    embeds = torch.randn(batch, N, d, device=device, dtype=dtype)
    pos = torch.arange(N, device=device).expand(batch, N)
    if doc_len:  # packed documents: positions restart at each document start
        pos = pos % doc_len

    def step():
        if device.type == "cuda":  # a training step starts: CUDA-graph trees may reuse the last step's memory
            torch.compiler.cudagraph_mark_step_begin()
        layout = _layout(pos, None, None, batch, N, device)
        h = x
        for blk in blocks:
            h, _ = blk(h, layout, embeds)
        h.float().square().mean().backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, sync


def _time_variant(name, shape, layers, dtype, device, warmup, iters, profile, doc_len=None, batch=1):
    N = shape["seqlen"] * batch  # tokens per step
    step, sync = build_step(name, shape, layers, dtype, device, doc_len, batch)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        mem = float("nan")
    times = []  # steps of 10s of ms or more: host timing around a synchronised step is accurate
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    if profile:
        profile_step(name, step, sync, device)
    return {"name": name, "ms": med * 1e3, "tok_s": N / med, "mem_gib": mem}


def default_variants(tiny: bool) -> list[str]:
    """Every variant, the fla ones only where they can run (CUDA, flash-linear-attention)."""
    try:
        import fla.layers  # noqa: F401
        fla_ok = torch.cuda.is_available() and not tiny
    except ImportError:
        fla_ok = False
    return [v for v in VARIANTS if fla_ok or v not in FLA_VARIANTS]


def _gib(x: float) -> str:
    """Peak memory for the table: "-" where none was measured (the CPU, a failed variant)."""
    return "-" if x != x else f"{x:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke test)")
    p.add_argument("--shape", choices=[k for k in SHAPES if k != "tiny"], default="760m",
                   help="layer shapes on CUDA (default 760m, the issue's; 3b-width: d 3072, f 8192, 24 heads)")
    p.add_argument("--layers", type=int, default=2, help="blocks per variant (default 2)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens (default 32768, tiny 160)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of " + ",".join(VARIANTS) + " (default: all that can run here)")
    p.add_argument("--doc-len", type=int, default=None,
                   help="pack documents of this many tokens into the sequence (default: one document)")
    p.add_argument("--batch", type=int, default=1, help="rows per step (default 1)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--output", default=None, help="also write the markdown table here")
    p.add_argument("--profile", action="store_true", help="print a profiler table for --profile-variants")
    p.add_argument("--profile-variants", default="lact-muon", help="comma-separated (default lact-muon)")
    args = p.parse_args(argv)
    names = [v for v in (args.variants or ",".join(default_variants(args.tiny))).split(",") if v]
    prof_names = set(v for v in args.profile_variants.split(",") if v) if args.profile else set()
    bad = [v for v in names + sorted(prof_names) if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    if args.doc_len is not None and args.doc_len < 1:
        p.error(f"--doc-len must be >= 1, got {args.doc_len}")
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    shape = dict(SHAPES["tiny" if args.tiny else args.shape])
    if args.seqlen:
        shape["seqlen"] = args.seqlen
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    if not args.tiny and device.type != "cuda":
        print(f"no CUDA device: the {args.shape} benchmark needs a GPU (use --tiny for a CPU smoke test)",
              file=sys.stderr)
        return 2

    err = check_lact()
    print(f"correctness: LaCT training form vs reference, max rel. error (fwd+grads, float64) = {err:.2e}")
    if err > 1e-8:
        print("correctness check failed: refusing to report throughput", file=sys.stderr)
        return 1

    torch.manual_seed(0)
    rows = []
    for n in names:
        try:
            rows.append(time_variant(n, shape, args.layers, dtype, device, args.warmup, args.iters, n in prof_names,
                                     args.doc_len, args.batch))
        except Exception:  # report the failure, time the other variants
            traceback.print_exc()
            print(f"variant {n} failed (traceback above)", file=sys.stderr)
            rows.append({"name": n, "ms": float("nan"), "tok_s": float("nan"), "mem_gib": float("nan")})
        r = rows[-1]  # each variant as it ends: a run cut short still reports what it timed
        print(f"{n}: {r['ms']:.1f} ms/step, {r['tok_s']:.0f} tokens/s, peak {_gib(r['mem_gib'])} GiB", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by = {r["name"]: r for r in rows if r["tok_s"] == r["tok_s"]}
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    head = (f"{gpu}, {dtype}, torch {torch.__version__}, {args.layers} blocks, d={shape['hidden_size']}, "
            f"f={shape['intermediate_size']}, heads={shape['num_attention_heads']}, "
            f"fw heads={shape['lact_heads']}, window=chunk={shape['lact_chunk_size']}, "
            f"N={shape['seqlen']}, batch {args.batch}, "
            f"{f'documents of {args.doc_len} tokens packed' if args.doc_len else 'one document'}, "
            f"forward+backward, median of {args.iters}; LaCT chunk loop: "
            + (f"{COMPILE_ENV}={os.environ.get(COMPILE_ENV, 'auto')} unless the variant sets its own"
               if device.type == "cuda" else "eager for every variant (a CPU smoke test: the CUDA-only "
               "variants run the same eager code, and the timings say nothing)"))
    lines = [head, "", "| variant | ms/step | tokens/s | × SWA | × full attn | peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        vs_swa = f"{r['tok_s'] / by['swa']['tok_s']:.2f}" if "swa" in by else "-"
        vs_att = f"{r['tok_s'] / by['attention']['tok_s']:.2f}" if "attention" in by else "-"
        lines.append(f"| {r['name']} | {r['ms']:.1f} | {r['tok_s']:.0f} | {vs_swa} | {vs_att} | {_gib(r['mem_gib'])} |")
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

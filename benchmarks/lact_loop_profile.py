"""Where the LaCT chunk loop's time goes (issue 9, docs/benchmarks.md "Fifth measurement").

Profiles one layer's contiguous fast path (``fastweights.ops.lact._lact_contiguous``, the chunk
loop compiled whole on CUDA as in training) at the 760M benchmark's shapes: B 1, 4 fast heads of
width 384, N 32,768, chunk 2048. It reports

* the loop's forward and backward time (CUDA events, median of ``--iters``; on CUDA replayed
  from CUDA graphs, ``LoopGraphs``, so that host launch time does not count; the forward
  includes copying the inputs into the graph's buffers) and, from one profiled pass each of
  the compiled loop, their kernel count and the kernels taking the most time;
* for Muon, the Newton-Schulz work inside the loop: the Muon loop's time minus the same loop
  with the momentum update (identical but for Newton-Schulz), per pass and per update (``G - 1``
  updates for G chunks: apply-then-update never applies the last chunk's).

    python benchmarks/lact_loop_profile.py            # H100: the benchmark's shapes
    python benchmarks/lact_loop_profile.py --tiny     # CPU smoke test (eager, CPU timings)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from lact import top_by_name  # benchmarks/lact.py, beside this script
from torch.profiler import ProfilerActivity, profile

from fastweights.ops.lact import UPDATES, LoopGraphs, _lact_contiguous, _resolve_compile


def _timer(device):
    """``measure(fn, iters) -> median ms`` of ``fn()``: CUDA events on CUDA, else wall clock."""

    def measure(fn, iters):
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return measure


def _kernels(fn, device, top: int, label: str) -> None:
    """Profile one call of ``fn``; print kernel (CPU op) count, total time and the top names."""
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == kind]
    attr = "device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) / 1e3
    what = "GPU kernels" if cuda else "CPU ops"
    print(f"\n{label}: {len(events)} {what}, {total:.2f} ms in all; top {top}: total ms | calls | mean us | name")
    print("\n".join(top_by_name(events, attr, top)))


def _inputs(B, H, N, D, update, dtype, device):
    """Random loop inputs (q, k, v, lr, beta, w1, w2, w3) needing gradients, and a cotangent."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype).requires_grad_()

    def unit(*shape):
        return F.normalize(torch.randn(*shape, device=device, generator=g), dim=-1).to(dtype).requires_grad_()

    q, k, v = unit(B, H, N, D), unit(B, H, N, D), rand(B, H, N, D)
    lr = (torch.rand(B, H, N, 3, device=device, generator=g) * 1e-2).to(dtype).requires_grad_()
    beta = None if update == "gd" else torch.rand(B, H, N, device=device, generator=g).to(dtype).requires_grad_()
    ws = [rand(H, D, D, scale=D**-0.5) for _ in range(3)]
    return (q, k, v, lr, beta, *ws), torch.randn(B, H, N, D, device=device, generator=g).to(dtype)


def _loop(update, C, device, B, H, N, D, dtype, iters):
    """Time one layer's loop: (forward ms, forward+backward ms, plain forward fn, fwd+bwd fn)."""
    args, cot = _inputs(B, H, N, D, update, dtype, device)
    ins = [t for t in args if t is not None]
    mode = _resolve_compile("auto", device)  # compiled whole on CUDA, as in training

    def forward():
        return _lact_contiguous(*args, C, update, "apply_update", mode, "loop")

    def fwd_bwd():
        torch.autograd.grad(forward(), ins, cot)

    for _ in range(3):  # compile and warm up
        fwd_bwd()
    timed_fwd, timed_step = forward, fwd_bwd
    if device.type == "cuda":
        graphs = LoopGraphs()

        def timed_fwd():
            return graphs(*args, C, update, "apply_update")

        def timed_step():
            torch.autograd.grad(timed_fwd(), ins, cot)

        timed_step()  # captures
    measure = _timer(device)
    return measure(timed_fwd, iters), measure(timed_step, iters), forward, (ins, cot)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke test)")
    p.add_argument("--update", choices=UPDATES, default="muon")
    p.add_argument("--iters", type=int, default=10, help="timed repetitions (median)")
    p.add_argument("--top", type=int, default=25, help="kernels listed per pass")
    args = p.parse_args(argv)
    if args.iters < 1 or args.top < 1:
        p.error(f"--iters and --top must be >= 1, got {args.iters} and {args.top}")
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        print("no CUDA device: the benchmark shapes need a GPU (use --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    B, H, N, D, C = (1, 2, 40, 12, 8) if args.tiny else (1, 4, 32768, 384, 2048)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = (B, H, N, D, dtype, args.iters)
    fwd_ms, step_ms, forward, (ins, cot) = _loop(args.update, C, device, *shape)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, {dtype}, torch {torch.__version__}, B={B} H={H} N={N} D={D} chunk={C}, update={args.update}, "
          f"loop {'compiled, timed from CUDA graphs' if device.type == 'cuda' else 'eager'}, median of {args.iters}")
    print(f"loop ({args.update}): forward {fwd_ms:.2f} ms, forward+backward {step_ms:.2f} ms "
          f"(backward {step_ms - fwd_ms:.2f} ms)")
    out = forward()
    _kernels(forward, device, args.top, "forward")
    _kernels(lambda: torch.autograd.grad(out, ins, cot), device, args.top, "backward")
    if args.update == "muon":  # the same loop without Newton-Schulz: momentum
        m_fwd, m_step, _, _ = _loop("momentum", C, device, *shape)
        G = -(-N // C)
        print(f"\nloop (momentum, the same without Newton-Schulz): forward {m_fwd:.2f} ms, forward+backward "
              f"{m_step:.2f} ms\nNewton-Schulz in the loop (muon - momentum): forward {fwd_ms - m_fwd:.2f} ms, "
              f"forward+backward {step_ms - m_step:.2f} ms = {100 * (step_ms - m_step) / step_ms:.0f}% of the muon "
              f"loop ({(step_ms - m_step) / (G - 1) * 1e3:.0f} us per update, {G - 1} updates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

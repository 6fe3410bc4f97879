"""Context-parallel training step of a converted ~0.5B Qwen3-shaped model (docs/distributed.md).

Run with torchrun; NCCL on CUDA, gloo on CPU::

    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --seq 65536 131072
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --seq 131072 --attention allgather split --profile
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --tiny     # CPU smoke run

For each sequence length it times, after warm-up, one training step (forward, backward and
the gradient all-reduce; no optimiser update, which costs the same per GPU with or without
context parallelism):

* on rank 0 alone, the plain converted model on the whole sequence (the 1-GPU baseline,
  SDPA attention, and by default the chunked In-Place TTT op, which is the CP path's local
  scan: ``--baseline-impl auto`` times issue 3's fast path instead); the other ranks wait;
* on all ranks, the same model under :func:`fastweights.distributed.apply_context_parallel`
  (exact cross-rank In-Place TTT prefix), once per ``--attention`` path (``allgather``: SDPA
  with a lower-right causal bias over the gathered K/V; ``split``: a local causal flash block
  plus a prefix flash block merged by log-sum-exp; ``ring``: PyTorch's ring attention),
  contiguous shards with lengths from :func:`~fastweights.distributed.balanced_split`: the
  step's cost is modelled as ``a·n + b·n²`` (``b``: causal attention), fitted from 1-GPU
  steps at N and N/2.

It prints which attention kernel each path gets (SDPA's own choice for the 1-GPU call,
``--sdpa-backend`` restricts it), and with ``--profile`` one more step of each path on rank 0
under ``torch.profiler``: the device time by kind of kernel (attention, matmul, collective,
other) and the top kernels.

It reports tokens/s per GPU, the speedup of W GPUs over one on the same sequence, the peak
memory per GPU, and the bytes each rank receives per step (from the shapes, see
:func:`comm_bytes`). The first step's losses of the two runs must agree, or no speedup is
reported. A baseline that runs out of memory is reported as OOM.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.checkpoint import checkpoint
from transformers import Qwen3Config, Qwen3ForCausalLM

from fastweights.distributed import (
    all_reduce_gradients,
    apply_context_parallel,
    balanced_split,
    carry_bytes,
    cp_batch,
    ring_attention_context,
)
from fastweights.distributed.data_parallel import init_distributed
from fastweights.models import convert, ttt_modules
from fastweights.ops.inplace_ttt import inplace_ttt

# Qwen3-0.6B's shape (0.6B parameters with tied embeddings, 0.44B without).
QWEN3_05B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


def build_model(shape: dict, seq: int, chunk: int, dtype, device) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(**shape, max_position_embeddings=seq, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(cfg).to(device=device, dtype=dtype)
    convert(model, chunk_size=chunk, lr=3.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero conv so that the fast weights act
        for m in ttt_modules(model):
            m.ttt_conv.weight.copy_((torch.randn(m.ttt_conv.weight.shape, generator=g) * 0.1).to(dtype))
    return model.train()


def loss_sum(model, input_ids, position_ids, targets, chunk: int = 8192):
    """Summed next-token loss, the logits made ``chunk`` tokens at a time and recomputed in
    backward (a 128k × 152k logit matrix does not fit)."""
    hidden = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    weight = model.lm_head.weight

    def ce(h, t):
        return F.cross_entropy(F.linear(h, weight).float().flatten(0, 1), t.flatten(), ignore_index=-100,
                               reduction="sum")

    return sum(checkpoint(ce, hidden[:, i:i + chunk], targets[:, i:i + chunk], use_reentrant=False)
               for i in range(0, hidden.shape[1], chunk))


def comm_bytes(cfg: Qwen3Config, n_params: int, n_ttt: int, batch: int, lengths: list[int], elem: int,
               recompute: bool) -> dict:
    """Bytes one rank receives per step (the largest shard pads the K/V all-gather).

    K/V: per layer and forward pass, an all-gather of K and V, ``2·B·(W−1)·n_max·H_kv·D``
    elements; the backward reduce-scatters their gradients (the same volume). With activation
    checkpointing the forward runs twice. TTT carries: :func:`carry_bytes` per TTT layer (the
    forward half reruns in the recomputation). Gradients: a ring all-reduce receives about
    ``2·(W−1)/W`` of the parameter bytes.
    """
    W, n_max = len(lengths), max(lengths)
    fwd = 2 if recompute else 1
    kv = 2 * batch * (W - 1) * n_max * cfg.num_key_value_heads * cfg.head_dim * elem * cfg.num_hidden_layers
    ttt = carry_bytes(batch, cfg.hidden_size, cfg.intermediate_size, W) * n_ttt * (fwd + 1) // 2
    grads = int(2 * (W - 1) / W * n_params * elem)
    return {"kv": kv * (fwd + 1), "ttt_carry": ttt, "grad_allreduce": grads, "total": kv * (fwd + 1) + ttt + grads}


def attention_share(cfg: Qwen3Config, n_params: int, seq: int) -> float:
    """Estimated share of causal attention in the step's FLOPs: ``2·N²·H·D`` per layer
    against ``2·N·params`` for the dense layers."""
    attn = 2 * seq**2 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return attn / (attn + 2 * seq * n_params)


BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
            "math": "MATH"}


@contextmanager
def sdpa_backend(name: str):
    """``torch.nn.attention.sdpa_kernel`` restricted to one backend, or SDPA's default choice."""
    if name == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, BACKENDS[name])):
        yield


def attention_kernels(cfg: Qwen3Config, dtype, device, backend: str) -> dict:
    """The kernel each attention path runs, asked of PyTorch on small tensors of the model's head
    shape: the 1-GPU call (HF: causal SDPA, grouped K/V heads), the ``allgather`` path (SDPA
    with a lower-right causal bias: flash if it can, else memory-efficient, else math) and the
    ``split`` path (cuDNN's or flash's aten op, or the ``allgather`` call if neither serves)."""
    if device.type != "cuda":
        return {"one_gpu": "cpu", "allgather": "cpu", "split": "cpu flash kernel"}
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
    from torch.nn.attention import SDPBackend

    from fastweights.distributed.context_parallel import _block_kernel

    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = torch.zeros(1, H, 512, D, dtype=dtype, device=device, requires_grad=True)  # a shard's queries
    q_all = torch.zeros(1, H, 1024, D, dtype=dtype, device=device, requires_grad=True)
    k = torch.zeros(1, Hkv, 1024, D, dtype=dtype, device=device, requires_grad=True)
    k_rep = torch.zeros(1, H, 1024, D, dtype=dtype, device=device, requires_grad=True)
    with sdpa_backend(backend):
        one = SDPBackend(torch._fused_sdp_choice(q_all, k, k, is_causal=True, enable_gqa=True)).name
        params = SDPAParams(q, k_rep, k_rep, None, 0.0, False, False)
        flash = can_use_flash_attention(params)
        lower_right = "flash" if flash else ("efficient" if can_use_efficient_attention(params) else "math")
        split = _block_kernel(q, k_rep, k_rep.shape[2] - q.shape[2])
    return {"one_gpu": one, "allgather": f"{lower_right} (lower-right causal bias)",
            "split": f"{split} (aten op, 2 blocks + LSE merge)" if split else f"{lower_right} (fallback)"}


def kernel_kind(name: str) -> str:
    n = name.lower()
    if any(t in n for t in ("flash", "fmha", "attention", "attn", "sdpa", "cudnn")):
        return "attention"
    if any(t in n for t in ("nccl", "c10d", "wait_tensor")):
        return "collective"
    if any(t in n for t in ("gemm", "cutlass", "xmma", "nvjet", "matmul", "aten::mm", "addmm", "bmm")):
        return "matmul"
    return "other"


def profile_step(fn, device, label: str, rows: int) -> tuple[dict, str]:
    """One call of ``fn`` under torch.profiler on this rank: the seconds of device time (CPU
    time on CPU) by kind of kernel, and a printable report with the top ``rows`` ops."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    avgs = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    kinds: dict[str, float] = {}
    for e in avgs:
        t = getattr(e, attr, 0) or 0
        if t and (not cuda or str(getattr(e, "device_type", "")).endswith("CUDA")):
            kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + t / 1e6
    total = sum(kinds.values())
    head = (f"\n--- profile: {label} ({'device' if cuda else 'CPU'} time {total:.3f} s) "
            + ", ".join(f"{k} {v:.3f} s ({v / max(total, 1e-12):.0%})" for k, v in sorted(kinds.items())))
    return kinds, head + "\n" + avgs.table(sort_by=attr, row_limit=rows, max_name_column_width=60)


def timed_steps(fn, steps: int, warmup: int, device, all_ranks: bool) -> tuple[float, float]:
    """Median seconds per call of ``fn`` (which returns a loss) and the first call's loss;
    ``all_ranks``: every rank runs it (barriers around each step)."""
    times, first = [], None
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        if all_ranks:
            dist.barrier()
        t0 = time.perf_counter()
        loss = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if all_ranks:
            dist.barrier()
        if i == 0:
            first = loss
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], first


def peak_mem(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure(N: int, shape: dict, chunk: int, dtype, device, recompute: bool, args) -> list[dict]:
    """Time the 1-GPU step and the context-parallel step of each attention path on one
    N-token sequence; rank 0 returns a row of results per path (the others nothing)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    model = build_model(shape, N, chunk, dtype, device)
    if recompute:
        # transformers >= 5.2x renamed gradient_checkpointing_enable (5.17 has only the old name)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, shape["vocab_size"], (1, N), generator=torch.Generator().manual_seed(N)).to(device)
    base = {"seq": N, "world": world, "device": name, "dtype": str(dtype).removeprefix("torch."),
            "params": sum(p.numel() for p in model.parameters()), "chunk": chunk,
            "baseline_impl": args.baseline_impl, "sdpa_backend": args.sdpa_backend}

    # 1 GPU: rank 0 alone, whole sequence
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    pos = torch.arange(N, device=device).unsqueeze(0)

    # the same local In-Place TTT algorithm as the CP path (its local scan is the chunked form),
    # unless --baseline-impl names another (e.g. auto: issue 3's fast path on CUDA)
    for m in ttt_modules(model):
        m.ttt_op = partial(inplace_ttt, impl=args.baseline_impl)

    def one_step(n=N):
        with sdpa_backend(args.sdpa_backend):
            loss = loss_sum(model, ids[:, :n], pos[:, :n], targets[:, :n]) / (n - 1)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    t1 = loss1 = mem1 = None
    n_params = sum(p.numel() for p in model.parameters())
    share = [attention_share(model.config, n_params, N) if args.attention_share is None else args.attention_share]
    if rank == 0:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            t1, loss1 = timed_steps(one_step, args.steps, args.warmup, device, all_ranks=False)
            mem1 = peak_mem(device)
            if args.attention_share is None:
                # measured cost model t(n) = a·n + b·n²: the quadratic share from t(N) and t(N/2)
                t_half, _ = timed_steps(lambda: one_step(N // 2), 1, 1, device, all_ranks=False)
                share[0] = min(1.0, max(0.0, 2 * (t1 - 2 * t_half) / t1))
            if args.profile:
                base["profile_1"], text = profile_step(one_step, device, f"1 GPU, {N} tokens", args.profile_rows)
                print(text, flush=True)
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            t1 = "OOM"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.broadcast_object_list(share, 0)  # the other ranks wait here for the baseline
    base["attention_share"] = share[0]
    for m in ttt_modules(model):
        m.ttt_op = None
    try:  # a report only: never stop the run for it
        kernels = attention_kernels(model.config, dtype, device, args.sdpa_backend)
    except (RuntimeError, TypeError, ValueError) as err:
        kernels = dict.fromkeys(("one_gpu", "allgather", "split"), f"unknown ({type(err).__name__}: {err})")
    base["attention_kernel_1"] = kernels["one_gpu"]
    rows = []
    for path in args.attention:
        row = {**base, "attention": path, "attention_kernel_w": kernels.get(path, "ring (PyTorch)")}
        row.update(measure_cp(model, path, N, ids, pos, targets, share[0], device, dtype, recompute, args))
        if rank == 0:
            ok = isinstance(t1, float) and isinstance(row["step_s_w"], float)
            agree = ok and abs(row["loss_w"] - loss1) <= (1e-5 if dtype == torch.float32 else 2e-2) * abs(loss1)
            tw = row["step_s_w"]
            row.update({
                "loss_1": loss1, "losses_agree": agree, "step_s_1": t1,
                "tok_s_per_gpu_1": N / t1 if isinstance(t1, float) else None,
                "tok_s_per_gpu_w": N / tw / world if isinstance(tw, float) else None,
                "speedup": t1 / tw if agree else None, "peak_gib_1": mem1,
            })
            print(json.dumps(row), flush=True)
            rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def measure_cp(model, path: str, N: int, ids, pos, targets, share: float, device, dtype, recompute: bool,
               args) -> dict:
    """Time the context-parallel step with attention ``path`` on all ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    handle = apply_context_parallel(model, attention=path)
    # torch's context_parallel shards evenly
    lengths = balanced_split(N, world, 0.0 if path == "ring" else share)
    batch = cp_batch(ids, labels=ids, lengths=lengths)
    mesh = init_device_mesh(device.type, (world,)) if path == "ring" else None

    def cp_step():
        if path != "ring":
            inputs, ctx = (batch.input_ids, batch.position_ids, batch.targets), nullcontext()
        else:  # torch shards these full buffers in place; forward and backward run inside
            inputs = [ids.clone(), pos.clone(), targets.clone()]
            ctx = ring_attention_context(mesh, inputs, [1, 1, 1])
        with ctx, sdpa_backend(args.sdpa_backend):
            local = loss_sum(model, *inputs)
            (local * world / (N - 1)).backward()  # mean over ranks = the whole sequence's loss
        all_reduce_gradients(model)
        model.zero_grad(set_to_none=True)
        total = local.detach().clone()
        dist.all_reduce(total)
        return total.item() / (N - 1)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {}
    try:
        tw, loss_w = timed_steps(cp_step, args.steps, args.warmup, device, all_ranks=True)
        mem_w = peak_mem(device)
        if args.profile:  # every rank profiles one more step; rank 0 prints them all
            label = f"CP {path}, rank {rank} of {world}, shards {lengths}"
            prof = [None] * world
            dist.all_gather_object(prof, profile_step(cp_step, device, label, args.profile_rows))
            out["profile_w"] = [kinds for kinds, _ in prof]
            if rank == 0:
                print("".join(text for _, text in prof), flush=True)
    except torch.OutOfMemoryError:
        tw, loss_w, mem_w = "OOM", None, None
    handle.remove()
    mems = [None] * world
    dist.all_gather_object(mems, mem_w)
    n_params = sum(p.numel() for p in model.parameters())
    comm = comm_bytes(model.config, n_params, len(ttt_modules(model)), 1, lengths, torch.finfo(dtype).bits // 8,
                      recompute)
    out.update({"shards": lengths, "loss_w": loss_w, "step_s_w": tw, "peak_gib_w": mems,
                "comm_mib_per_rank": {k: v / 2**20 for k, v in comm.items()}})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[65536, 131072], help="tokens per sequence")
    ap.add_argument("--tiny", action="store_true", help="tiny model and sequences (CPU/gloo smoke run)")
    ap.add_argument("--chunk", type=int, default=1024, help="TTT chunk length")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attention-share", type=float, default=None,
                    help="share of the step that grows with the square of the length (causal attention), "
                         "to balance the shard lengths (0: even; default: measured from 1-GPU steps at N and "
                         "N/2, or estimated from the FLOPs if N does not fit)")
    ap.add_argument("--attention", choices=["allgather", "split", "ring"], nargs="+", default=["allgather", "split"],
                    help="CP attention paths to time, each after the one 1-GPU baseline: all-gather K/V with "
                         "SDPA and a lower-right causal bias; all-gather K/V with two flash blocks merged by "
                         "log-sum-exp (split); PyTorch's ring attention (CUDA, even shards, no load balancing)")
    ap.add_argument("--sdpa-backend", choices=["default", *BACKENDS], default="default",
                    help="restrict SDPA (1-GPU baseline, allgather path) to one backend")
    ap.add_argument("--profile", action="store_true",
                    help="one more step of each path under torch.profiler on rank 0: time by kernel kind, top ops")
    ap.add_argument("--profile-rows", type=int, default=12, help="rows of the profile's top-ops table")
    ap.add_argument("--baseline-impl", choices=["chunked", "auto", "fast"], default="chunked",
                    help="In-Place TTT op of the 1-GPU baseline (chunked: the CP path's local algorithm)")
    ap.add_argument("--no-checkpoint", action="store_true", help="no activation checkpointing")
    ap.add_argument("--json", help="write the results to this JSON file (rank 0)")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        ap.error("run it under torchrun, e.g. torchrun --nproc-per-node 2 benchmarks/context_parallel.py "
                 "--tiny (CPU/gloo) or --seq 65536 (GPUs)")

    rank, world, device = init_distributed()
    torch.backends.cuda.matmul.allow_tf32 = True
    shape = TINY if args.tiny else QWEN3_05B
    seqs = [256, 512] if args.tiny else args.seq
    chunk = 32 if args.tiny else args.chunk
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    recompute = not args.no_checkpoint
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = []
    for N in seqs:
        results += measure(N, shape, chunk, dtype, device, recompute, args) or []
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        print(f"\n{name}, {dtype}, {world} ranks, activation checkpointing {'on' if recompute else 'off'}, "
              f"torch {torch.__version__}, SDPA backend {args.sdpa_backend}")
        for r in results:
            print(f"attention kernels at {r['seq']}: 1 GPU {r['attention_kernel_1']}; CP {r['attention']}: "
                  f"{r['attention_kernel_w']}")
        print("| tokens | CP attention | 1 GPU step s | 1 GPU tok/s | CP step s | CP tok/s/GPU | speedup "
              "| peak GiB 1 / CP | comm MiB/rank |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            def fmt(x, spec=".3g"):
                return x if isinstance(x, str) else ("-" if x is None else format(x, spec))
            peaks = "/".join(fmt(m, ".1f") for m in r["peak_gib_w"])
            speed = fmt(r["speedup"], ".2f") if r["losses_agree"] else "n/a (losses disagree or OOM)"
            print(f"| {r['seq']} | {r['attention']} | {fmt(r['step_s_1'])} | {fmt(r['tok_s_per_gpu_1'], '.0f')} "
                  f"| {fmt(r['step_s_w'])} "
                  f"| {fmt(r['tok_s_per_gpu_w'], '.0f')} | {speed} | {fmt(r['peak_gib_1'], '.1f')} / {peaks} "
                  f"| {r['comm_mib_per_rank']['total']:.0f} |")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1)
    dist.destroy_process_group()
    return 0 if all(r["losses_agree"] or r["step_s_1"] == "OOM" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

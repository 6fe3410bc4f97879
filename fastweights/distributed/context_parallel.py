"""Context parallelism for a converted Hugging Face causal LM (docs/distributed.md).

Applied to a plain model instance, torchtitan-style, without touching modeling code:

* each In-Place TTT MLP runs :func:`~fastweights.distributed.inplace_ttt_cp.inplace_ttt_cp`
  (the exact cross-rank fast-weight prefix) through the layer's ``ttt_op`` slot;
* attention goes through an attention function registered with transformers'
  ``AttentionInterface`` under :data:`ATTN_NAME` and selected on this instance only. It
  all-gathers K and V over the group (PyTorch functional collectives, whose backward
  reduce-scatters the key/value gradients to their owners) and runs SDPA over the keys up to
  the shard's end: a lower-right causal mask (``causal_lower_right``, not materialised) for
  one document per row, or an explicit (B, 1, n, ≤N) boolean causal-and-same-document mask for
  packed rows. Memory per rank and layer: the gathered K and V, ``2·B·N·H_kv·D`` elements
  (kept for backward), repeated to the query heads for grouped-query attention while SDPA
  runs; plus the packed-row mask (``B·n·N`` bytes, built once per forward and shared by all
  layers). With ``attention="split"`` a row of one document runs, per rank, two attention
  blocks instead of one masked call: its own keys (square, causal) and the earlier ranks' keys
  (no mask), merged by their log-sum-exp (:class:`_PrefixCausalAttention`), on cuDNN's kernel
  where it serves (the one SDPA picks for the one-GPU call on Hopper), else flash.
* shards are contiguous and may have different lengths (:func:`balanced_split` evens out the
  causal-attention work).

PyTorch's ring attention (``torch.distributed.tensor.experimental.context_parallel``) can
replace the all-gather for unpacked rows on CUDA: see :func:`ring_attention_context`.

A step on rank r::

    batch = cp_batch(input_ids, labels=input_ids, group=group)
    logits = model(batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    loss = cp_loss(logits, batch.targets, group)      # mean over ranks = the global mean loss
    loss.backward(); all_reduce_gradients(model, group)  # or DDP/FSDP over the group
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from numbers import Real

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from fastweights.distributed.inplace_ttt_cp import all_gather_autograd, inplace_ttt_cp
from fastweights.errors import check_positive_int
from fastweights.layers.inplace_ttt import InPlaceTTTMLP
from fastweights.models.compat import take_cache

__all__ = [
    "ATTN_NAME",
    "CPBatch",
    "RING_ATTN_NAME",
    "ContextParallel",
    "all_reduce_gradients",
    "apply_context_parallel",
    "balanced_split",
    "cp_batch",
    "context_parallel_of",
    "cp_loss",
    "prefix_causal_attention",
    "ring_attention_context",
]

ATTN_NAME = "fastweights_cp_allgather"
RING_ATTN_NAME = "fastweights_cp_ring"
ATTENTION = ("allgather", "split", "ring")
IGNORE = -100


# --------------------------------------------------------------------------- inputs and loss
def balanced_split(seqlen: int, world: int, attention_share: float = 0.5) -> list[int]:
    """Contiguous shard lengths whose estimated work is even: a fraction ``attention_share``
    of the single-process step is causal attention (work ∝ the square of the prefix), the
    rest is linear in tokens. ``attention_share=0`` gives even lengths."""
    check_positive_int("seqlen", seqlen)
    check_positive_int("world", world)
    if seqlen < 2 * world:
        raise ValueError(f"a sequence of {seqlen} tokens is too short for {world} shards of at least 2 tokens")
    if not (isinstance(attention_share, Real) and 0.0 <= attention_share <= 1.0):
        raise ValueError(f"attention_share must be a number in [0, 1], got {attention_share!r}")
    x = torch.linspace(0, 1, 4097, dtype=torch.float64)
    work = (1 - attention_share) * x + attention_share * x**2  # cumulative work of a prefix
    cuts = [0]
    for r in range(1, world):
        cuts.append(int(round(float(x[torch.searchsorted(work, torch.tensor(r / world, dtype=torch.float64))])
                              * seqlen)))
    cuts.append(seqlen)
    for r in range(1, world):  # at least 2 tokens per shard: move cuts the rounding put too close
        cuts[r] = max(cuts[r], cuts[r - 1] + 2)
    for r in range(world - 1, 0, -1):
        cuts[r] = min(cuts[r], cuts[r + 1] - 2)
    return [b - a for a, b in zip(cuts, cuts[1:])]


@dataclass
class CPBatch:
    """This rank's shard: ``input_ids`` (B, n), ``position_ids`` (B, n) in-document positions,
    ``targets`` (B, n) next-token labels (already shifted, -100 where ignored), and the
    shard's ``start`` in the full row."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor | None
    start: int


def cp_batch(
    input_ids: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    lengths: list[int] | None = None,
    group: dist.ProcessGroup | None = None,
) -> CPBatch:
    """Cut a full batch (every rank holds the same one) into this rank's contiguous shard.

    ``input_ids``/``labels`` (B, N); documents as ``position_ids`` (B, N) restarting at 0, or
    ``cu_seqlens`` (K+1,) for B = 1; default one document per row. ``labels`` are shifted
    here (as HF's loss does) so that the last token of a shard keeps its target on the next
    rank. ``lengths``: shard lengths (default :func:`balanced_split` with ``attention_share=0``).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, N), got {tuple(input_ids.shape)}")
    B, N = input_ids.shape
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels must be (B, N) = {(B, N)} like input_ids, got {tuple(labels.shape)}")
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[1] != N
                                     or position_ids.shape[0] not in (1, B)):
        raise ValueError(f"position_ids must be (B, N) = {(B, N)} or (1, N), got {tuple(position_ids.shape)}")
    if not dist.is_initialized():
        raise ValueError("cp_batch needs an initialised process group (torch.distributed.init_process_group)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if position_ids is not None and cu_seqlens is not None:
        raise ValueError("give documents as position_ids or cu_seqlens, not both")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1, got {B}")
        cu = cu_seqlens.long().flatten().tolist()
        if cu[0] != 0 or cu[-1] != N or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to N={N}, got {cu}")
        position_ids = torch.cat([torch.arange(b - a) for a, b in zip(cu, cu[1:])]).unsqueeze(0)
    if position_ids is None:
        position_ids = torch.arange(N).unsqueeze(0)
    position_ids = position_ids.to(input_ids.device).expand(B, N)
    lengths = balanced_split(N, world, 0.0) if lengths is None else list(lengths)
    if len(lengths) != world or sum(lengths) != N or min(lengths) < 2:
        raise ValueError(f"lengths must be {world} shard lengths >= 2 summing to N={N}, got {lengths}")
    lo = sum(lengths[:rank])
    hi = lo + lengths[rank]
    targets = None
    if labels is not None:
        targets = torch.full_like(labels, IGNORE)
        targets[:, :-1] = labels[:, 1:]
        targets = targets[:, lo:hi]
    return CPBatch(input_ids[:, lo:hi], position_ids[:, lo:hi].contiguous(), targets, lo)


def cp_loss(logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's share of the global mean next-token loss, scaled so that the mean over the
    group's ranks (what DDP/FSDP or :func:`all_reduce_gradients` average) is the loss of the
    whole sequence. ``logits`` (B, n, V), ``targets`` (B, n) from :func:`cp_batch`."""
    if targets is None:
        raise ValueError("cp_loss needs targets: pass labels to cp_batch")
    acc = torch.promote_types(logits.dtype, torch.float32)  # at least float32; float64 stays float64
    total = F.cross_entropy(logits.to(acc).flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    count = (targets != IGNORE).sum().to(torch.float64)
    dist.all_reduce(count, group=group)
    return total * dist.get_world_size(group) / count.clamp(min=1).to(total.dtype)


def all_reduce_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Average every parameter gradient over the group (context parallelism without a
    data-parallel wrapper)."""
    world = dist.get_world_size(group)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)  # SUM: gloo has no AVG
            p.grad.div_(world)


# --------------------------------------------------------------------------- attention
# The keyword under which one model call's shard layout travels from the base model's pre-hook,
# through each decoder layer's kwargs (which gradient checkpointing keeps for its recomputation),
# to the attention function.
LAYOUT_KEY = "_fastweights_cp_layout"


class _CPLayout:
    """One forward's layout of the shards, read by every attention layer of that call."""

    def __init__(self, group, split: bool, lengths: list[int], start: int, mask: torch.Tensor | None):
        self.group = group
        self.split = split  # one-document rows: local causal + prefix blocks (_PrefixCausalAttention)
        self.lengths = lengths
        self.start = start
        self.mask = mask  # (B, 1, n, start + n) bool for packed rows


def _gather_seq(x: torch.Tensor, lengths: list[int], upto: int, group) -> torch.Tensor:
    """All-gather ``x`` (B, H, n_r, D) along the sequence (shards may differ in length) and
    keep the first ``upto`` positions. Differentiable."""
    pad = max(lengths) - x.shape[2]
    parts = all_gather_autograd(F.pad(x, (0, 0, 0, pad)), group)
    full = torch.cat([p[:, :, :n] for p, n in zip(parts, lengths)], dim=2)
    return full[:, :, :upto]


def _block_kernel(q, k, start: int) -> str:
    """The kernel that runs the blocks of :class:`_PrefixCausalAttention`: ``"cudnn"`` (CUDA,
    where SDPA's cuDNN backend is enabled and serves these inputs: the kernel SDPA picks for
    one long causal sequence on Hopper), ``"flash"`` (CUDA's FA2), ``"cpu"`` (the CPU flash
    kernel, for the tests), or ``""`` where none serves. Honours ``torch.nn.attention.sdpa_kernel``."""
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type != "cuda":
        return ""
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention, can_use_flash_attention, cudnn_sdp_enabled

    k_loc, k_pre = k[:, :, start:], k[:, :, :start]  # the causal square block and the unmasked prefix block
    params = [SDPAParams(q, k_loc, k_loc, None, 0.0, True, False), SDPAParams(q, k_pre, k_pre, None, 0.0, False, False)]
    if cudnn_sdp_enabled() and all(can_use_cudnn_attention(p) for p in params):
        return "cudnn"
    return "flash" if all(can_use_flash_attention(p) for p in params) else ""


def _block_forward(kernel: str, q, k, v, causal: bool, scale: float):
    """One attention block: ``(out (B, H, n, D), lse (B, H, ≥n) float32, extras for the backward)``."""
    n = q.shape[2]
    if kernel == "cudnn":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)
        return out, lse.reshape(lse.shape[:2] + (n,)), (cum_q, cum_k, max_q, max_k, seed, offset)
    if kernel == "flash":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse, None


def _block_backward(kernel: str, grad, q, k, v, out, lse, extras, causal: bool, scale: float):
    """``(dq, dk, dv)`` of one block given the merged ``out`` and ``lse`` (B, H, ≥n) of all blocks."""
    if kernel == "cudnn":
        cum_q, cum_k, max_q, max_k, seed, offset = extras
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse.unsqueeze(-1).contiguous(), seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0,
            causal, scale=scale)
    if kernel == "flash":
        cum_q, cum_k, max_q, max_k, seed, offset = extras
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse,
                                                                              0.0, causal, scale=scale)


class _PrefixCausalAttention(torch.autograd.Function):
    """Causal attention of a shard's queries over all keys up to the shard's end, as two
    attention blocks merged by log-sum-exp (the ring-attention merge; PyTorch's own context
    parallelism does the same with these kernels), each on ``kernel`` (:func:`_block_kernel`):

    * local: ``q`` (B, H, n, D) against this shard's ``k_loc``/``v_loc`` (B, H, n, D), causal
      (square, so ``is_causal`` is the ordinary causal mask);
    * prefix: ``q`` against the earlier shards' ``k_pre``/``v_pre`` (B, H, start, D), no mask.

    ``out = Σ_b exp(lse_b − lse) out_b`` with ``lse = logaddexp(lse_loc, lse_pre)``. The
    backward runs each block's kernel backward with the merged ``out`` and ``lse`` (which
    makes each block's softmax the global one) and adds the query gradients. Every FLOP runs
    in a fused kernel (cuDNN's where it serves, the one SDPA picks for the one-GPU run on
    Hopper), unlike SDPA with a lower-right causal bias, which may fall back to the
    memory-efficient kernel.
    """

    @staticmethod
    def forward(ctx, q, k_pre, v_pre, k_loc, v_loc, scale, kernel):
        o_loc, l_loc, x_loc = _block_forward(kernel, q, k_loc, v_loc, True, scale)
        o_pre, l_pre, x_pre = _block_forward(kernel, q, k_pre, v_pre, False, scale)
        n = q.shape[2]
        lse = torch.logaddexp(l_loc, l_pre)
        w_loc = torch.exp(l_loc - lse)[..., :n, None]
        w_pre = torch.exp(l_pre - lse)[..., :n, None]
        acc = torch.promote_types(q.dtype, torch.float32)  # merge in float32 (bf16 inputs) or float64
        out = (o_loc.to(acc) * w_loc + o_pre.to(acc) * w_pre).to(q.dtype)
        ctx.save_for_backward(q, k_pre, v_pre, k_loc, v_loc, out, lse)
        ctx.extras, ctx.scale, ctx.kernel = (x_loc, x_pre), scale, kernel
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_pre, v_pre, k_loc, v_loc, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        kern = ctx.kernel
        dq_loc, dk_loc, dv_loc = _block_backward(kern, grad, q, k_loc, v_loc, out, lse, ctx.extras[0], True, ctx.scale)
        dq_pre, dk_pre, dv_pre = _block_backward(kern, grad, q, k_pre, v_pre, out, lse, ctx.extras[1], False, ctx.scale)
        return dq_loc + dq_pre, dk_pre, dv_pre, dk_loc, dv_loc, None, None


def prefix_causal_attention(q, k, v, start: int, scale: float | None = None) -> torch.Tensor:
    """Causal attention of the queries ``q`` (B, H, n, D) at positions ``start..start+n-1`` over
    the keys/values ``k``, ``v`` (B, H, start + n, D) at positions ``0..start+n-1`` (the lower-right
    causal mask), as a local causal block plus an unmasked block over the first ``start`` keys,
    merged by log-sum-exp (:class:`_PrefixCausalAttention`), on cuDNN's attention kernel, else
    flash (:func:`_block_kernel`). Where neither serves (CUDA: float32, odd head dims), SDPA with
    a lower-right causal bias. Differentiable."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n = q.shape[2]
    if k.shape[2] != start + n:
        raise ValueError(f"keys must cover positions 0..start+n-1 = {start + n}, got {k.shape[2]}")
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    kernel = _block_kernel(q, k, start)
    if not kernel:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, start + n), scale=scale)
    blocks = [k[:, :, :start], v[:, :, :start], k[:, :, start:], v[:, :, start:]]
    if kernel == "cudnn":  # cuDNN's kernels get dense K/V blocks (as PyTorch's ring attention gives them)
        blocks = [b.contiguous() for b in blocks]
    return _PrefixCausalAttention.apply(q, *blocks, scale, kernel)


def _allgather_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention function registered as :data:`ATTN_NAME`: ``query`` (B, H, n, D) of this
    shard, ``key``/``value`` (B, H_kv, n, D); returns (B, n, H, D) and no weights."""
    state: _CPLayout | None = kwargs.get(LAYOUT_KEY)
    if state is None:
        raise ValueError("context-parallel attention called without its shard layout: call the model "
                         "(apply_context_parallel hooks its base model), not a layer on its own")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise ValueError("context-parallel attention supports full causal attention only (no sliding window, "
                         "no softcap)")
    n = query.shape[2]
    upto = state.start + n
    k = _gather_seq(key, state.lengths, upto, state.group)
    v = _gather_seq(value, state.lengths, upto, state.group)
    rep = query.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    p = dropout if module.training else 0.0
    if state.split and state.mask is None and p == 0.0:
        return prefix_causal_attention(query, k, v, state.start, scaling).transpose(1, 2).contiguous(), None
    mask = causal_lower_right(n, upto) if state.mask is None else state.mask
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, dropout_p=dropout if module.training else 0.0,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# How many ring_attention_context blocks are open (a plain counter, not per thread: a checkpointed
# layer's recomputation runs on autograd's thread).
_RING_DEPTH = [0]


def _ring_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention function registered as :data:`RING_ATTN_NAME`: plain causal SDPA with the
    K/V heads repeated, which ``torch.distributed.tensor.experimental.context_parallel``
    replaces with ring attention inside :func:`ring_attention_context`; refused outside it."""
    if not _RING_DEPTH[0]:
        raise ValueError("attention='ring' runs inside ring_attention_context (PyTorch's ring attention); called "
                         "outside it, each rank would attend within its own shard only: run the forward and backward "
                         "inside ring_attention_context(mesh, buffers, seq_dims), or apply_context_parallel with "
                         "attention='split' or 'allgather'")
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    n = query.shape[2]
    if query.is_cuda and n % 32 and _sdpa_choice(query, key, value) == "EFFICIENT_ATTENTION":
        # the memory-efficient kernel pads its log-sum-exp to a multiple of 32 rows, which
        # PyTorch's ring merge does not slice off (torch 2.11: a shape error inside the merge)
        raise ValueError(f"ring attention on the memory-efficient SDPA kernel (here: {query.dtype}) needs a "
                         f"shard length that is a multiple of 32, got {n}; use bf16/fp16 (flash or cuDNN) or "
                         "attention='allgather'/'split'")
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True,
                                         dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _sdpa_choice(q, k, v) -> str:
    """The SDPA backend PyTorch picks for a causal call on these inputs (its name)."""
    from torch.nn.attention import SDPBackend

    return SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True)).name


def _no_mask(*args, **kwargs):
    """Mask function of our attention functions: they build their own."""
    return None


AttentionInterface.register(ATTN_NAME, _allgather_attention)
AttentionMaskInterface.register(ATTN_NAME, _no_mask)
AttentionInterface.register(RING_ATTN_NAME, _ring_attention)
AttentionMaskInterface.register(RING_ATTN_NAME, _no_mask)


def _no_cache(module, args, kwargs):
    """Base-model pre-hook (first of its hooks): a context-parallel call runs without a cache.
    A cache would make the TTT MLPs step a local state instead of the cross-rank op, and
    generation cannot be sharded: ``use_cache=True`` or a cache raise, and the default is off."""
    if take_cache(kwargs) is not None or kwargs.get("use_cache") is True:
        raise ValueError("context parallelism runs without a cache (no generation, no past_key_values, no "
                         "use_cache=True): call handle.remove() to generate with the plain model")
    kwargs["use_cache"] = False
    return args, kwargs


def _no_labels(where: int | None, module, args, kwargs):
    """Causal-LM pre-hook: ``labels=`` is refused. The model's own loss would shift the labels
    inside each shard (each shard's last target lives on the next rank) and average per shard.
    ``where``: the position of ``labels`` in the forward's arguments (None: keyword only)."""
    if kwargs.get("labels") is not None or (where is not None and len(args) > where and args[where] is not None):
        raise ValueError("context parallelism does not take labels=: the model's loss would shift them inside each "
                         "shard (losing each shard's last target, which is on the next rank) and average per shard; "
                         "cut the batch with cp_batch(input_ids, labels=...) and take the loss with "
                         "cp_loss(logits, batch.targets)")
    return args, kwargs


def _shard_layout(group, split: bool, module, args, kwargs):
    """Base-model pre-hook: learn the shard lengths and, for packed rows, build the mask; the
    layout travels to the attention layers in this call's kwargs (:data:`LAYOUT_KEY`)."""
    pos = kwargs.get("position_ids")
    if pos is None:
        raise ValueError("under context parallelism pass position_ids (see fastweights.distributed.cp_batch)")
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("context parallelism does not take padding masks: pack documents and mark them with "
                         "position_ids (cp_batch)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = pos.shape[-1]
    pos = pos if pos.dim() == 2 else pos.unsqueeze(0)
    gathered = [torch.zeros(1, dtype=torch.long, device=pos.device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([n], device=pos.device), group=group)
    lengths = [int(x) for x in gathered]
    start = sum(lengths[:rank])
    # gather the positions of all shards to find document boundaries
    pad = max(lengths) - n
    parts = [torch.zeros(pos.shape[0], max(lengths), dtype=torch.long, device=pos.device) for _ in range(world)]
    dist.all_gather(parts, F.pad(pos.long(), (0, pad), value=0).contiguous(), group=group)
    full = torch.cat([p[:, :m] for p, m in zip(parts, lengths)], dim=1)  # (B or 1, N)
    upto = start + n
    full = full[:, :upto]
    mask = None
    if bool((full[:, 1:] == 0).any()):
        doc = torch.cumsum((full == 0).long(), dim=1)  # (B, upto) document index
        q = torch.arange(start, upto, device=pos.device)
        k = torch.arange(upto, device=pos.device)
        causal = k.unsqueeze(0) <= q.unsqueeze(1)  # (n, upto)
        mask = (causal & (doc[:, start:upto].unsqueeze(2) == doc.unsqueeze(1))).unsqueeze(1)
    kwargs[LAYOUT_KEY] = _CPLayout(group, split, lengths, start, mask)
    return args, kwargs


# --------------------------------------------------------------------------- apply
def _ttt_op(group, z, s, w0, conv_weight, proj, lr, chunk_size, *, cu_seqlens=None, position_ids=None,
            max_update_norm=None):
    if max_update_norm is not None:  # a chunk may span ranks: its norm would need its own all-reduce
        raise ValueError(f"max_update_norm={max_update_norm!r} is not supported under context parallelism; set the "
                         "In-Place TTT layers' max_update_norm to None")
    if cu_seqlens is not None:
        raise ValueError("under context parallelism give documents as position_ids (cp_batch converts cu_seqlens)")
    return inplace_ttt_cp(z, s, w0, conv_weight, proj, lr, chunk_size, position_ids=position_ids, group=group)


class ContextParallel:
    """Handle returned by :func:`apply_context_parallel`; ``remove()`` restores the model (the
    attention implementation and each TTT MLP's ``ttt_op`` as they were). Removing twice is a
    no-op."""

    def __init__(self, model, group, attn_before, hooks, ops_before):
        self.model, self.group = model, group
        self._attn_before, self._hooks, self._ops_before = attn_before, hooks, ops_before

    def remove(self) -> None:
        if self.model is None:
            return
        for h in self._hooks:
            h.remove()
        for m, op in self._ops_before:
            m.ttt_op = op
        self.model.set_attn_implementation(self._attn_before)
        del self.model._fw_context_parallel
        self.model = None


def context_parallel_of(model: nn.Module) -> ContextParallel | None:
    """The :class:`ContextParallel` handle of ``model`` (also through a DDP or ``torch.compile``
    wrapper, e.g. the model that :func:`~fastweights.distributed.parallelize` returns), or None
    where context parallelism is not applied. Its ``remove()`` restores the plain model (to
    generate)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return getattr(model, "_fw_context_parallel", None)


def _check_supported(model: nn.Module):
    """The decoder of a model that context parallelism can run (raises naming what it cannot),
    checked before anything is changed."""
    from fastweights.layers.fwl import FastWeightLayer
    from fastweights.layers.lact import LaCTLayer

    if getattr(model, "_fw_context_parallel", None) is not None:
        raise ValueError("context parallelism is already applied to this model: call remove() on its handle "
                         "first")
    other = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (FastWeightLayer, LaCTLayer))})
    if other:
        raise ValueError(f"context parallelism carries the fast weights of In-Place TTT MLPs only; this model also "
                         f"has {', '.join(other)}, whose fast weights would stay local to each shard")
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"context parallelism needs a Hugging Face decoder whose layers have self_attn (Llama, "
                         f"Qwen2/3, Mistral, converted or not), got {type(model).__name__}")
    return base


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup | None = None,
                           attention: str = "split") -> ContextParallel:
    """Make a (converted) HF causal LM run context-parallel over ``group``, in place.

    Each rank then calls the model on its shard with ``position_ids`` (from :func:`cp_batch`)
    and ``use_cache=False``; ``labels=`` is refused (take the loss with :func:`cp_loss`).
    ``attention``: ``"split"`` (default: K/V all-gathered; rows of one document run
    :func:`prefix_causal_attention`, two cuDNN/flash blocks merged by log-sum-exp; packed rows
    and attention dropout use the ``"allgather"`` SDPA call), ``"allgather"`` (any device and
    backend, packed rows, uneven shards; SDPA with a lower-right causal bias) or ``"ring"``
    (causal SDPA that PyTorch's context parallelism turns into ring attention; call the model
    inside :func:`ring_attention_context`; CUDA only, one document per row, equal shard
    lengths).
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if not dist.is_initialized():
        raise ValueError("context parallelism needs an initialised torch.distributed process group")
    devices = sorted({p.device.type for p in model.parameters()})
    if attention == "ring" and devices != ["cuda"]:
        raise ValueError(f"attention='ring' needs a model on CUDA (PyTorch's ring attention runs CUDA SDPA kernels "
                         f"only); this model is on {', '.join(devices) or 'no device'}: move it to CUDA first, or "
                         "use attention='split' or 'allgather'")
    base = _check_supported(model)
    ops_before = []
    for m in model.modules():
        if isinstance(m, InPlaceTTTMLP):
            ops_before.append((m, m.ttt_op))
            m.ttt_op = partial(_ttt_op, group)
    attn_before = model.config._attn_implementation
    # first of the base model's pre-hooks: the converted model's own hook must not make a cache
    hooks = [base.register_forward_pre_hook(_no_cache, with_kwargs=True, prepend=True)]
    if model is not base:  # the causal LM: its loss from labels= would be wrong (_no_labels)
        params = [n for n, p in inspect.signature(model.forward).parameters.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        where = params.index("labels") if "labels" in params else None
        hooks.append(model.register_forward_pre_hook(partial(_no_labels, where), with_kwargs=True, prepend=True))
    if attention != "ring":
        hooks.append(base.register_forward_pre_hook(partial(_shard_layout, group, attention == "split"),
                                                    with_kwargs=True))
        model.set_attn_implementation(ATTN_NAME)
    else:
        model.set_attn_implementation(RING_ATTN_NAME)
    handle = model._fw_context_parallel = ContextParallel(model, group, attn_before, hooks, ops_before)
    return handle


@contextmanager
def ring_attention_context(mesh, buffers: list[torch.Tensor], seq_dims: list[int]):
    """PyTorch's context-parallel SDPA (ring attention) with contiguous shards.

    Wraps ``torch.distributed.tensor.experimental.context_parallel``: it shards ``buffers``
    (full-sequence tensors, e.g. input_ids, position_ids and targets) in place along
    ``seq_dims`` and replaces SDPA with ring attention inside the block. Its head-tail load
    balancer is switched off, because the In-Place TTT prefix needs each rank's tokens to be
    one contiguous piece in rank order; causal attention is then uneven across ranks (rank r
    does about (2r+1)/W² of it). CUDA SDPA kernels only; rows must be one document each.
    """
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options

    before = _cp_options.enable_load_balance
    _cp_options.enable_load_balance = False
    try:
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=seq_dims):
            _RING_DEPTH[0] += 1
            try:
                yield
            finally:
                _RING_DEPTH[0] -= 1
    finally:
        _cp_options.enable_load_balance = before

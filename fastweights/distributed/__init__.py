"""Parallelism applied to a plain (converted) model: context parallelism and data parallelism."""

from fastweights.distributed.context_parallel import (
    ContextParallel,
    all_reduce_gradients,
    apply_context_parallel,
    balanced_split,
    cp_batch,
    cp_loss,
    ring_attention_context,
)
from fastweights.distributed.inplace_ttt_cp import carry_bytes, inplace_ttt_cp

__all__ = [
    "ContextParallel",
    "all_reduce_gradients",
    "apply_context_parallel",
    "balanced_split",
    "carry_bytes",
    "cp_batch",
    "cp_loss",
    "inplace_ttt_cp",
    "ring_attention_context",
]

"""Parallelism applied to a plain (converted) model: context parallelism and data parallelism."""

from fastweights.distributed.context_parallel import (
    ContextParallel,
    all_reduce_gradients,
    apply_context_parallel,
    balanced_split,
    context_parallel_of,
    cp_batch,
    cp_loss,
    prefix_causal_attention,
    ring_attention_context,
)
from fastweights.distributed.data_parallel import (
    full_state_dict,
    init_distributed,
    load_checkpoint,
    load_full_state_dict,
    parallelize,
    save_checkpoint,
    wrap_model,
)
from fastweights.distributed.inplace_ttt_cp import carry_bytes, inplace_ttt_cp

__all__ = [
    "ContextParallel",
    "all_reduce_gradients",
    "apply_context_parallel",
    "balanced_split",
    "carry_bytes",
    "context_parallel_of",
    "cp_batch",
    "cp_loss",
    "full_state_dict",
    "init_distributed",
    "inplace_ttt_cp",
    "load_checkpoint",
    "load_full_state_dict",
    "parallelize",
    "prefix_causal_attention",
    "ring_attention_context",
    "save_checkpoint",
    "wrap_model",
]

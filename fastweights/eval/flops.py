"""Counting the FLOPs of a Hugging Face model's forward/backward with ``torch.utils.flop_counter``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

from torch.utils.flop_counter import FlopCounterMode

__all__ = ["flop_counter"]


@contextmanager
def flop_counter(model) -> Iterator[FlopCounterMode]:
    """``with flop_counter(model) as c: ...`` then ``c.get_total_flops()``.

    While counting, the model's attention runs in its ``"eager"`` form (the same two matmuls
    per head as SDPA, so the same count): torch's SDPA FLOP formula rejects grouped-query
    attention's fewer key/value heads in some versions (torch 2.11), and SDPA may dispatch to
    kernels the counter does not see. In-Place TTT layers run their chunked autograd form (the
    CUDA fast path writes into ``out=`` buffers, which the counter cannot follow). Everything is
    restored afterwards."""
    from fastweights.layers.inplace_ttt import InPlaceTTTMLP
    from fastweights.ops.inplace_ttt import inplace_ttt

    ttt = [m for m in model.modules() if isinstance(m, InPlaceTTTMLP) and m.ttt_op is None]
    for m in ttt:
        m.ttt_op = partial(inplace_ttt, impl="chunked")
    config = getattr(model, "config", None)
    prev = getattr(config, "_attn_implementation", None)
    switch = prev not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            yield counter
    finally:
        if switch:
            model.set_attn_implementation(prev)
        for m in ttt:
            m.ttt_op = None

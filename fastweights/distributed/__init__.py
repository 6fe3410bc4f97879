"""Parallelism applied to a plain (converted) model: context parallelism and data parallelism."""

from fastweights.distributed.inplace_ttt_cp import carry_bytes, inplace_ttt_cp

__all__ = ["carry_bytes", "inplace_ttt_cp"]

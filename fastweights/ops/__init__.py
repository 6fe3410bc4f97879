"""Functional math: each op has a plain reference and a fast path that must agree."""

from fastweights.ops.fwl import fwl_chunked, fwl_reference
from fastweights.ops.inplace_ttt import (
    chunk_ids,
    doc_starts,
    inplace_ttt,
    inplace_ttt_chunked,
    inplace_ttt_reference,
    ttt_target,
)

__all__ = [
    "chunk_ids",
    "doc_starts",
    "fwl_chunked",
    "fwl_reference",
    "inplace_ttt",
    "inplace_ttt_chunked",
    "inplace_ttt_reference",
    "ttt_target",
]

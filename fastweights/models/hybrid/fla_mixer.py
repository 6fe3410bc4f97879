"""GLA and DeltaNet mixers from flash-linear-attention (``pip install flash-linear-attention``),
adapted to the hybrid model's token layout and cache.

fla's layers take one row of several sequences (``cu_seqlens``) with one initial and one final
state per sequence. :class:`FlaMixer` maps any layout onto that: the valid tokens of every row
are laid end to end, cut at each document start and each row end, and each piece starts from
zero state, or, if it continues the document that the cache holds for its row, from that row's
cached state (recurrent state and, for DeltaNet, the short-convolution windows). So padding,
packed documents and cached decoding behave as with the other mixers; rows that are one
document each with no padding and no cache go to the fla layer as they are.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fastweights.layers.attention import TokenLayout
from fastweights.ops.inplace_ttt_triton import usable as triton_usable

__all__ = ["FlaMixer", "varlen_pieces"]

KINDS = ("gla", "deltanet")
RECURRENT_MAX = 64  # fla's layers use their recurrent kernels up to this many tokens per call, chunked above


def varlen_pieces(layout: TokenLayout, n: int):
    """Cut the n newest tokens of each row (B, n) into pieces: maximal runs of valid tokens of
    one document in one row. Returns ``flat`` (T,) indices of the valid tokens in (B·n) order,
    ``cu`` (P+1,) int32 piece boundaries in ``flat``, ``row`` (P,) the row of each piece and
    ``continues`` (P,) bool: the piece carries on the document of its row's last earlier token
    (only a row's first piece can, and only when that token is valid)."""
    valid = layout.key_valid[:, -n:]
    flat = valid.reshape(-1).nonzero().flatten()
    rows, docs = flat // n, layout.doc.reshape(-1)[flat]
    new = torch.ones_like(flat, dtype=torch.bool)
    new[1:] = (rows[1:] != rows[:-1]) | (docs[1:] != docs[:-1])
    starts = new.nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    row = rows[starts]
    continues = torch.zeros_like(row, dtype=torch.bool)
    m = layout.key_doc.shape[1]
    if m > n:
        first = torch.ones_like(row, dtype=torch.bool)
        first[1:] = row[1:] != row[:-1]
        prev = m - n - 1
        continues = first & (docs[starts] == layout.key_doc[row, prev]) & layout.key_valid[row, prev]
    return flat, cu, row, continues


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


class FlaMixer(nn.Module):
    """GLA or DeltaNet (fla's ``GatedLinearAttention`` / ``DeltaNet`` with their defaults) on
    x (B, N, d). Its cache entry is a dict ``{"recurrent": (B, ...), "conv": tuple of (B, D, W)
    or None}``: per row, the state after its last token (zeros before any)."""

    def __init__(self, hidden_size: int, num_heads: int, kind: str):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        try:
            from fla.layers import DeltaNet, GatedLinearAttention
        except ImportError as err:
            raise ValueError(f"mixer {kind!r} needs flash-linear-attention (its layers; fla-core alone has only "
                             f"the kernels): pip install 'fastweights[fla]' (or flash-linear-attention)") from err
        self.kind = kind
        cls = GatedLinearAttention if kind == "gla" else DeltaNet
        # layer_idx 0: each call hands the layer a one-layer fla cache holding this mixer's state
        self.layer = cls(hidden_size=hidden_size, num_heads=num_heads, layer_idx=0)

    def forward(self, x: torch.Tensor, layout: TokenLayout, past=None, use_cache: bool = False):
        """x (B, N, d) → (y (B, N, d), state or None); ``past``: this mixer's cache entry.
        Padding positions of y are zero."""
        if not triton_usable(x):
            raise ValueError(f"mixer {self.kind!r} (flash-linear-attention) needs CUDA tensors, got {x.device} "
                             "(the project's CPU tests run fla under TRITON_INTERPRET=1 with Triton's autotuner "
                             "timing patched out: tests/test_hybrid_fla.py)")
        if layout.single_doc and past is None and not use_cache:
            return self._layer(x), None
        from fla.models.utils import Cache

        B, N, d = x.shape
        flat, cu, row, continues = varlen_pieces(layout, N)
        if flat.numel() == 0:  # only padding
            return x.new_zeros(B, N, d), (past if use_cache else None)
        cache = Cache()
        if past is not None:  # each piece starts from its row's state, or from zero

            def init(s):
                return torch.where(_expand(continues, s), s[row], torch.zeros((), dtype=s.dtype, device=s.device))

            conv = None if past["conv"] is None else tuple(init(c) for c in past["conv"])
            cache.update(recurrent_state=init(past["recurrent"]), conv_state=conv, layer_idx=0, offset=0)
        y = self._layer(x.reshape(B * N, d)[flat].unsqueeze(0), past_key_values=cache, use_cache=use_cache,
                        cu_seqlens=cu)
        out = x.new_zeros(B * N, d).index_copy(0, flat, y.squeeze(0).to(x.dtype)).view(B, N, d)
        return out, (self._rows_state(cache[0], row, past, B) if use_cache else None)

    def _layer(self, x: torch.Tensor, **kw) -> torch.Tensor:
        """The fla layer's output for x (b, T, d). fla's chunked DeltaNet kernel (used above
        :data:`RECURRENT_MAX` tokens) has no float32 version: float32 calls run it in bfloat16
        autocast, with a warning, and return float32."""
        if self.kind == "deltanet" and x.dtype == torch.float32 and x.shape[1] > RECURRENT_MAX:
            warnings.warn("deltanet: fla's chunked delta-rule kernel has no float32 version; running the layer in "
                          "bfloat16 autocast for inputs of more than 64 tokens", stacklevel=3)
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.layer(x, **kw)[0].float()
        return self.layer(x, **kw)[0]

    @staticmethod
    def _rows_state(final: dict, row: torch.Tensor, past, B: int) -> dict:
        """Per row, the final state of its last piece; a row without pieces keeps ``past``'s (or zeros)."""
        is_last = torch.ones_like(row, dtype=torch.bool)
        is_last[:-1] = row[1:] != row[:-1]
        has = torch.zeros(B, dtype=torch.bool, device=row.device)
        has[row[is_last]] = True
        idx = torch.zeros(B, dtype=torch.long, device=row.device)
        idx[row[is_last]] = is_last.nonzero().flatten()

        def pick(new, old):
            return torch.where(_expand(has, new), new[idx], torch.zeros_like(new[idx]) if old is None else old)

        conv, old = final.get("conv_state"), past or {}
        old_conv = old.get("conv") or [None] * len(conv or ())
        return {"recurrent": pick(final["recurrent_state"], old.get("recurrent")),
                "conv": None if conv is None else tuple(pick(c, o) for c, o in zip(conv, old_conv, strict=True))}

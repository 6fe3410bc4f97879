"""Softmax attention (full or sliding-window) with Qwen3 conventions: GQA, per-head q/k RMSNorm,
RoPE. Packed documents and padding are handled through a :class:`TokenLayout`.

Mask of query i over key j: ``doc[j] == doc[i]`` and ``index[j] <= index[i]`` and
``index[i] - index[j] < window`` (when a window is set) and ``valid[j]``. ``index`` counts
tokens of a row in stream order (prefix plus new tokens), ``doc`` numbers documents.

Backends: ``sdpa`` (dense boolean masks, by blocks of queries with a window; CPU, decoding,
small sizes), ``causal`` (SDPA
``is_causal``, for one document per row without a window or padding), ``flex``
(``torch.nn.attention.flex_attention`` with a block mask; the CUDA training path).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fastweights.errors import check_positive_int
from fastweights.ops.rope import apply_rope, rope_cos_sin

BACKENDS = ("auto", "sdpa", "flex")


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")

__all__ = ["Attention", "TokenLayout", "apply_rope", "attend", "rope_cos_sin"]


@dataclass
class TokenLayout:
    """Where the tokens of one forward pass sit. Query side (B, N): ``position_ids`` (RoPE
    positions, restart at 0 per document), ``doc`` (document ids), ``index`` (stream index).
    Key side (B, M), prefix plus new tokens: ``key_doc``, ``key_index``, ``key_valid``.
    ``single_doc``: True when every row is one document with no padding (enables fast paths).
    ``starts_host`` (B, N) bool on the CPU: where documents start (column 0 always; None when
    the layout continues a cache), so that layers lay out packed documents without copying
    from the device. ``shared``: what the layers build from the layout once and share (flex
    block masks by window, :meth:`last_keys` views, LaCT's lanes).
    A document is a run of consecutive tokens of a row. Where the keys are the queries (no cached
    prefix), ``key_doc is doc`` and ``key_index is index`` (0..N-1): flex builds its mask faster."""

    position_ids: torch.Tensor
    doc: torch.Tensor
    index: torch.Tensor
    key_doc: torch.Tensor
    key_index: torch.Tensor
    key_valid: torch.Tensor
    single_doc: bool = False
    starts_host: torch.Tensor | None = None
    shared: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TokenLayout:
        """The layout of a forward pass without a cached prefix, for a layer called on its own
        (``LaCTLayer(...)(x, TokenLayout.from_positions(pos))``). ``position_ids`` (B, N)
        integer: RoPE positions, restarting at 0 at each document start (packed documents;
        column 0 always starts one); ``attention_mask`` (B, N), nonzero at real tokens, zero at
        padding (None: no padding). Copies the document starts to the host once."""
        if not torch.is_tensor(position_ids) or position_ids.dim() != 2 or position_ids.is_floating_point() \
                or position_ids.is_complex() or position_ids.dtype == torch.bool:
            got = (f"{tuple(position_ids.shape)} {position_ids.dtype}" if torch.is_tensor(position_ids)
                   else type(position_ids).__name__)
            raise ValueError(f"position_ids must be a (B, N) integer tensor, got {got}")
        B, N = position_ids.shape
        device = position_ids.device
        if attention_mask is None:
            valid = torch.ones(B, N, dtype=torch.bool, device=device)
        else:
            if not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != (B, N):
                got = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
                raise ValueError(f"attention_mask must be (B, N) = {(B, N)} as position_ids, got {got}")
            valid = attention_mask.to(device).bool()
        starts = (position_ids == 0).clone()
        starts[:, 0] = True
        doc = torch.cumsum(starts.long(), 1) - 1
        index = torch.arange(N, device=device).expand(B, N)
        host = torch.stack([starts, valid]).cpu()  # the forward pass's one copy to the host
        single = not bool(host[0, :, 1:].any()) and bool(host[1].all())
        return cls(position_ids=position_ids, doc=doc, index=index, key_doc=doc, key_index=index, key_valid=valid,
                   single_doc=single, starts_host=host[0])

    def last_keys(self, m: int) -> TokenLayout:
        """The same queries over only the newest ``m`` keys (a cache trimmed to a window)."""
        if m == self.key_doc.shape[1]:
            return self
        if m > self.key_doc.shape[1]:
            raise ValueError(f"the layout has {self.key_doc.shape[1]} keys, asked for the last {m}")
        key = ("last_keys", m)  # one view per length, shared by the layers (and its block masks)
        if key not in self.shared:
            self.shared[key] = TokenLayout(
                position_ids=self.position_ids, doc=self.doc, index=self.index, key_doc=self.key_doc[:, -m:],
                key_index=self.key_index[:, -m:], key_valid=self.key_valid[:, -m:], single_doc=False,
                starts_host=self.starts_host)
        return self.shared[key]

    def dense_mask(self, window: int | None, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """(B, 1, N, M) boolean mask; ``rows``/``cols``: of those queries and keys only. Built
        once per layout, window and shape (the layers of a forward pass share it)."""
        key = ("dense", window, self.key_doc.shape[1], rows.start, rows.stop, cols.start, cols.stop)
        if key not in self.shared:
            qi, ki = self.index[:, rows].unsqueeze(-1), self.key_index[:, cols].unsqueeze(-2)
            m = ((self.doc[:, rows].unsqueeze(-1) == self.key_doc[:, cols].unsqueeze(-2)) & (ki <= qi)
                 & self.key_valid[:, cols].unsqueeze(-2))
            if window is not None:
                m &= ki > qi - window  # i - j < window, with no (N, M) tensor of differences
            self.shared[key] = m.unsqueeze(1)
        return self.shared[key]


@functools.cache
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


@functools.cache
def _block_mask_fn(compiled: bool):
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask) if compiled else create_block_mask


def _causal_window_mod(window: int | None):
    """flex's mask_mod of positions alone: key j visible to query i when ``i - window < j <= i``."""

    def mask_mod(b, h, i, j):
        m = j <= i
        return m if window is None else m & (i - j < window)

    return mask_mod


@functools.lru_cache(maxsize=16)
def _one_document_block_mask(N: int, window: int | None, device: torch.device):
    """The block mask of rows that are each one whole document (``TokenLayout.single_doc``, keys
    = queries): causal, within ``window``. It depends on nothing but N and the window, so it is
    built from index arithmetic alone (no reads of the layout's tensors), with the batch
    broadcast, and kept for later calls. At N = 32,768 on an H100 the general mask took 3.6 ms
    to build each forward pass, this one 0.8 ms once (``benchmarks/flex_mask.py``)."""
    return _block_mask_fn(device.type == "cuda")(_causal_window_mod(window), None, None, N, N, device=device)


def _mask_mod(layout: TokenLayout, window: int | None):
    """flex's mask_mod of any layout: same document, causal in stream index, valid key, in window."""
    doc, kdoc, qidx, kidx, kval = layout.doc, layout.key_doc, layout.index, layout.key_index, layout.key_valid

    def mask_mod(b, h, i, j):
        m = (doc[b, i] == kdoc[b, j]) & (kidx[b, j] <= qidx[b, i]) & kval[b, j]
        return m if window is None else m & (qidx[b, i] - kidx[b, j] < window)

    return mask_mod


def _own_keys_mask_mod(layout: TokenLayout, window: int | None):
    """The same mask where the keys are the queries (no cached prefix: ``index`` 0..N-1, and a
    document is a run of a row): key j is visible to query i when ``first[i] <= j <= i`` (within
    the window) and valid, with ``first`` the position of i's document start. One read per
    query and one per key where :func:`_mask_mod` makes five: at N = 32,768 on an H100 its block
    mask took 1.3–2.2 against 3.6 ms in two runs (``benchmarks/flex_mask.py``; docs/benchmarks.md,
    seventeenth measurement)."""
    doc, kval = layout.doc, layout.key_valid
    pos = torch.arange(doc.shape[1], device=doc.device)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    first = torch.cummax(torch.where(starts, pos, 0), dim=1).values  # (B, N)
    causal_window = _causal_window_mod(window)

    def mask_mod(b, h, i, j):
        return causal_window(b, h, i, j) & (j >= first[b, i]) & kval[b, j]

    return mask_mod


def _flex(q, k, v, layout: TokenLayout, window: int | None):
    """flex_attention with the layout's mask; the block mask is built once per layout and window
    (all layers of a forward pass share it), compiled on CUDA; for one document per row, once per
    (N, window, device) (:func:`_one_document_block_mask`)."""
    B, _, N, _ = q.shape
    M = k.shape[2]
    key = (window, N, M)
    if layout.single_doc and N == M:
        layout.shared[key] = _one_document_block_mask(N, window, q.device)
    if key not in layout.shared:
        own_keys = layout.key_doc is layout.doc and layout.key_index is layout.index
        mask_mod = (_own_keys_mask_mod if own_keys else _mask_mod)(layout, window)
        layout.shared[key] = _block_mask_fn(q.is_cuda)(mask_mod, B, None, N, M, device=q.device)
    return _flex_fn(q.is_cuda)(q, k, v, block_mask=layout.shared[key], enable_gqa=k.shape[1] != q.shape[1])


def attend(q, k, v, layout: TokenLayout, window: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Masked softmax attention. q (B, Hq, N, dh), k, v (B, Hkv, M, dh); Hq % Hkv == 0; the keys
    are the layout's newest M (all of them, or a cache trimmed by :func:`keep_window`).
    Returns (B, Hq, N, dh). ``backend``: ``auto`` | ``sdpa`` | ``flex``."""
    check_backend(backend)
    N, M = q.shape[2], k.shape[2]
    layout = layout.last_keys(M)
    gqa = k.shape[1] != q.shape[1]
    if backend == "auto":
        if layout.single_doc and window is None and N == M:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        # flex's CUDA kernels need head dims of at least 16
        backend = "flex" if (q.is_cuda and N > 1 and q.shape[-1] >= 16 and v.shape[-1] >= 16) else "sdpa"
    if backend == "flex":
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("attn_backend='flex' cannot take gradients on CPU (torch's FlexAttention has no CPU "
                             "backward): on CPU use attn_backend 'auto' or 'sdpa' (or run without gradients)")
        return _flex(q, k, v, layout, window)
    if window is not None and N > max(window, _BAND_ROWS):
        return _banded(q, k, v, layout, window, gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask(window), enable_gqa=gqa)


_BAND_ROWS = 512  # queries per block of the dense path's sliding window


def _banded(q, k, v, layout: TokenLayout, window: int, gqa: bool) -> torch.Tensor:
    """Sliding-window attention through dense masks, one block of queries at a time, each over
    the keys its window can reach: memory and time linear in N (one (N, M) mask is quadratic).
    The layout's stream indices are consecutive, and the keys end with the N queries' own."""
    N, M = q.shape[2], k.shape[2]
    rows = max(window, _BAND_ROWS)
    out = []
    for s in range(0, N, rows):
        e = min(s + rows, N)
        lo, hi = max(0, M - N + s - window + 1), M - N + e
        mask = layout.dense_mask(window, slice(s, e), slice(lo, hi))
        out.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask,
                                                  enable_gqa=gqa))
    return torch.cat(out, dim=2)


def keep_window(k: torch.Tensor, v: torch.Tensor, window: int | None):
    """The cache entry of a sliding-window layer: of k, v (B, H, M, dh), only the newest
    ``window - 1`` keys, all that later queries can see; full attention (None) keeps all."""
    if window is None or k.shape[2] < window:
        return k, v
    return k[:, :, k.shape[2] - window + 1:], v[:, :, v.shape[2] - window + 1:]


class Attention(nn.Module):
    """Qwen3-style attention: q/k/v/o projections without bias, GQA, per-head RMSNorm on q and
    k, RoPE; full causal (``window=None``) or sliding-window.

    ``forward(x (B, N, d), cos, sin, layout, past=None) -> (y (B, N, d), (k, v))`` where
    ``past`` is the (k, v) (B, Hkv, M0, dh) of earlier tokens and the returned pair includes
    the new ones (with a window, only the newest ``window - 1``: :func:`keep_window`).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 window: int | None = None, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            check_positive_int(name, value)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if window is not None:
            check_positive_int("window", window)
        check_backend(backend)
        self.num_heads, self.num_kv_heads, self.head_dim, self.window = num_heads, num_kv_heads, head_dim, window
        self.backend = backend
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=eps)

    def forward(self, x, cos, sin, layout: TokenLayout, past=None):
        B, N, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        o = attend(q, k, v, layout, self.window, self.backend)
        o = o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)  # (no -1: B may be 0)
        return self.o_proj(o), keep_window(k, v, self.window)

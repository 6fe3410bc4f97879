"""The LaCT layer (SPEC §2, docs/lact.md): sliding-window attention plus a large-chunk
test-time-training branch, sharing one q/k/v projection.

    q, k, v = x W_qkv                                    (B, N, d) each
    a = SWA(RoPE(RMSNorm(q)), RoPE(RMSNorm(k)), v)       n_attn heads, window w
    q_f, k_f = scale * RoPE(L2norm(SiLU(q|k))) + shift   n_h fast heads of width D = d / n_h
    v_f = SiLU(v)
    η_t = softplus(W_η x_t + b)  (3 per head);  β_t = sigmoid(w_βᵀ x_t)  (per head)
    f = LaCT(q_f, k_f, v_f, η, β; W1, W2, W3)          fastweights.ops.lact
    o = o_proj( a + SiLU(W_s x) * RMSNorm_head(f) )

Initialisation (:meth:`LaCTLayer.reset_fast_parameters`): ``W1, W3 = L R + 0.5 I`` with
``L`` (D, r) ~ N(0, 1/D) and ``R`` (r, D) ~ N(0, 1/r), rank r = 32 (min(r, D)), so the
low-rank part has entries of variance 1/D; ``W2 ~ N(0, 1/D)`` (1/fan_in); the learning-rate
bias is softplus⁻¹(lr_init) with lr_init = 1e-3; scales 1, shifts 0.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastweights.errors import check_positive_int
from fastweights.layers._weights import weight_of
from fastweights.layers.attention import TokenLayout, apply_rope, attend, check_backend, keep_window, rope_cos_sin
from fastweights.ops.lact import (
    ORDERS,
    UPDATES,
    LoopGraphs,
    _compiled,
    _resolve_compile,
    lact_chunked,
    lact_lanes,
    lact_reference,
)
from fastweights.ops.lact_glue import IMPLS, fast_inputs, fast_inputs_reference, merge, merge_reference, pick_impl

__all__ = ["LaCTLayer"]


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


REFERENCES = {fast_inputs: fast_inputs_reference, merge: merge_reference}


def _glue(fn, name: str, x: torch.Tensor, training: bool, impl: str):
    """The glue ``fn`` (fastweights.ops.lact_glue) for ``impl``: its Triton kernels, or its
    torch reference, compiled (fused elementwise work, forward and backward) where the op
    compiles its chunk loop (CUDA, training, ``FASTWEIGHTS_LACT_COMPILE`` not off)."""
    if pick_impl(impl, x) == "triton":
        return functools.partial(fn, impl="triton")
    fn = REFERENCES[fn]
    mode = _resolve_compile(None, x.device) if training else None
    if mode == "graphs":  # the op's loop is graphed; the glue compiles as usual
        mode = "default"
    return fn if mode is None else _compiled(fn, name, mode)


class LaCTLayer(nn.Module):
    """SWA + LaCT fast-weight branch. ``forward(x (B, N, d), layout, past=None, use_cache=False)
    -> (y (B, N, d), present)``; ``past``/``present`` = (k, v, LaCTState) of earlier tokens.

    Args:
        hidden_size: d. num_heads: SWA heads (d % num_heads == 0). fw_heads: n_h (d % n_h == 0).
        window: SWA window, or None for full attention. The fast weights hold only earlier
            chunks, so with window >= chunk_size (SPEC §2) every earlier token of a token's own
            chunk is in its window; a smaller window warns. chunk_size: C.
        update: ``gd`` | ``momentum`` | ``muon``. order: ``apply_update`` | ``update_apply`` (not
            causal inside a chunk: its ``present`` holds no fast-weight state, and continuing
            from a ``past`` raises).
        lr_init: initial per-token learning rate. init_rank: rank r of W1, W3's init.
        rope_base: RoPE base for both paths. impl: ``chunked`` | ``reference`` (the op).
        glue: the elementwise work around the op (fastweights.ops.lact_glue): ``auto`` (the
            default: ``triton`` on CUDA in bf16 or float32, measured faster in a training step,
            else ``torch``), ``torch`` (compiled with torch.compile where the op's loop is) or
            ``triton`` (fused kernels with hand-written backwards).
    """

    # per-channel scales and shifts (SPEC §2), stored (2, d): not matrices, so not weight-decayed
    NO_WEIGHT_DECAY = ("qk_scale", "qk_shift")

    def __init__(self, hidden_size: int, num_heads: int, fw_heads: int = 4, window: int = 2048,
                 chunk_size: int = 2048, update: str = "muon", order: str = "apply_update",
                 lr_init: float = 1e-3, init_rank: int = 32, rope_base: float = 1e6, eps: float = 1e-6,
                 impl: str = "chunked", attn_backend: str = "auto", glue: str = "auto"):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("fw_heads", fw_heads),
                            ("init_rank", init_rank)):
            check_positive_int(name, value)
        if hidden_size % num_heads or hidden_size % fw_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads} "
                             f"and fw_heads {fw_heads}")
        if (hidden_size // num_heads) % 2 or (hidden_size // fw_heads) % 2:
            raise ValueError(f"RoPE needs even head widths: hidden_size {hidden_size} / num_heads {num_heads} = "
                             f"{hidden_size // num_heads}, / fw_heads {fw_heads} = {hidden_size // fw_heads}")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if impl not in ("chunked", "reference"):
            raise ValueError(f"impl must be 'chunked' or 'reference', got {impl!r}")
        if glue not in IMPLS:
            raise ValueError(f"glue must be one of {IMPLS}, got {glue!r}")
        check_backend(attn_backend)
        if not lr_init > 0:
            raise ValueError(f"lr_init must be > 0, got {lr_init}")
        check_positive_int("chunk_size", chunk_size)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
        if window is not None and window < chunk_size:
            warnings.warn(f"LaCT window {window} < chunk_size {chunk_size}: a token does not see the tokens of its own "
                          f"chunk more than {window} back (attention does not reach them, and the fast weights hold "
                          "only earlier chunks); SPEC §2 uses window >= chunk_size", stacklevel=2)
        d = hidden_size
        self.d, self.num_heads, self.head_dim = d, num_heads, d // num_heads
        self.fw_heads, self.fw_dim = fw_heads, d // fw_heads
        self.window, self.chunk_size, self.update, self.order = window, chunk_size, update, order
        self.lr_init, self.init_rank, self.rope_base, self.impl = lr_init, init_rank, rope_base, impl
        self.attn_backend, self.glue = attn_backend, glue
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.gate_proj = nn.Linear(d, d, bias=False)  # W_s
        self.lr_proj = nn.Linear(d, 3 * fw_heads, bias=True)
        self.beta_proj = nn.Linear(d, fw_heads, bias=False) if update != "gd" else None
        self.qk_scale = nn.Parameter(torch.ones(2, d))
        self.qk_shift = nn.Parameter(torch.zeros(2, d))
        self.fw_norm = nn.RMSNorm(self.fw_dim, eps=eps)
        D = self.fw_dim
        self.w1 = nn.Parameter(torch.empty(fw_heads, D, D))
        self.w2 = nn.Parameter(torch.empty(fw_heads, D, D))
        self.w3 = nn.Parameter(torch.empty(fw_heads, D, D))
        # used only with FASTWEIGHTS_LACT_COMPILE=graphs (CUDA training); the merge and the glue
        # consume the loop's output and gradients at once, so the graphs need not copy them out
        self.graphs = LoopGraphs(reuse_outputs=True)
        self.reset_fast_parameters()

    def extra_repr(self) -> str:
        return (f"fw_heads={self.fw_heads}, window={self.window}, chunk_size={self.chunk_size}, "
                f"update={self.update!r}, order={self.order!r}")

    def fast_init(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The documented initial values of the layer's own parameters (module docstring)."""
        H, D = self.fw_heads, self.fw_dim
        r = min(self.init_rank, D)
        dev = self.w1.device

        def lr_plus_half_i():
            left = torch.randn(H, D, r, generator=generator, device=dev) / math.sqrt(D)
            right = torch.randn(H, r, D, generator=generator, device=dev) / math.sqrt(r)
            return left @ right + 0.5 * torch.eye(D, device=dev)

        return {
            "w1": lr_plus_half_i(),
            "w3": lr_plus_half_i(),
            "w2": torch.randn(H, D, D, generator=generator, device=dev) / math.sqrt(D),
            "lr_proj.bias": torch.full((3 * H,), _inv_softplus(self.lr_init), device=dev),
            "qk_scale": torch.ones(2, self.d, device=dev),
            "qk_shift": torch.zeros(2, self.d, device=dev),
        }

    @torch.no_grad()
    def reset_fast_parameters(self) -> None:
        params = dict(self.named_parameters())
        for name, value in self.fast_init().items():
            params[name].copy_(value)

    def _gate_rates(self, x: torch.Tensor):
        """``W_s x`` (B, N, d), ``W_η x + b`` (B, N, 3H) and ``w_βᵀ x`` (B, N, H) or None, from one
        product with the three weights stacked: the η/β products alone have 12 and 4 output
        columns, which cuBLAS runs on slow unaligned kernels, and each adds its own ∂x to the
        gate's in the backward (docs/benchmarks.md, sixteenth measurement)."""
        named = (("gate_proj", self.gate_proj), ("lr_proj", self.lr_proj), ("beta_proj", self.beta_proj))
        ws = [weight_of(m, f"{name} of a LaCT layer") for name, m in named if m is not None]
        rows = [w.shape[0] for w in ws]
        pad = -sum(rows) % 8  # output rows of 16-byte multiples (bf16), else cuBLAS takes its slow path
        if pad:
            ws.append(ws[0].new_zeros(pad, ws[0].shape[1]))
            rows.append(pad)
        gate_raw, lr_raw, *rest = F.linear(x, torch.cat(ws)).split(rows, dim=-1)
        beta_raw = rest[0] if self.beta_proj is not None else None
        return gate_raw, lr_raw + self.lr_proj.bias, beta_raw

    def _documents(self, layout: TokenLayout) -> dict:
        """The documents of a whole pass, for :func:`lact_chunked`: nothing for rows of one
        document each; else the lanes, built once from the layout's host copy of the document
        starts and shared by the layers with this chunk size and order (none of them waits
        for the device); position_ids where the layout has no host copy."""
        if layout.single_doc:
            return {}
        if layout.starts_host is None:
            return {"position_ids": layout.position_ids}
        key = ("lact_lanes", self.chunk_size, self.order)
        if key not in layout.shared:
            layout.shared[key] = lact_lanes(layout.starts_host, self.chunk_size, self.order,
                                            device=layout.position_ids.device)
        lanes = layout.shared[key]
        return {} if lanes is None else {"lanes": lanes}

    def forward(self, x: torch.Tensor, layout: TokenLayout, past=None, use_cache: bool = False):
        """x (B, N, d) → (y (B, N, d), state). ``layout`` (:class:`TokenLayout`) says where the
        tokens sit (documents, padding, cached prefix); ``past`` is the state returned by the
        previous call of a cache, ``(k, v, LaCTState)`` with the SWA keys/values (B, H, ≤ window−1,
        dh) and the fast weights; ``state`` is that tuple for the next call when ``use_cache``,
        else None."""
        B, N, d = x.shape
        H, D = self.fw_heads, self.fw_dim
        if self.glue == "triton":
            try:
                pick_impl(self.glue, x)
            except ValueError as err:
                raise ValueError(f"LaCT glue='triton' (a hybrid config's lact_glue) cannot run here: {err}; use "
                                 f"'auto' or 'torch'") from err
        # three products from the one stored weight, as the SWA layer's three projections: q, k, v
        # come out contiguous (chunks of one product are strided views, which RMSNorm copies)
        q, k, v = (F.linear(x, w) for w in weight_of(self.qkv_proj, "qkv_proj of a LaCT layer").split(d))
        pos = layout.position_ids
        # the fast branch's inputs first: the glue passes q, k, v on to the attention path, so that
        # its Triton backward adds both branches' gradients of each in one pass
        training = torch.is_grad_enabled() and past is None and not use_cache
        cos_f, sin_f = rope_cos_sin(pos, D, self.rope_base, x.dtype)
        gate_raw, lr_raw, beta_raw = self._gate_rates(x)
        extra = {}
        if (training and self.impl == "chunked" and layout.single_doc and pick_impl(self.glue, x) == "triton"
                and _resolve_compile(None, x.device) == "graphs"):
            # the op will replay its graphed loop: the kernels write q_f, k_f, v_f into its buffers
            bufs = self.graphs.input_buffers((B, H, N, D), x.dtype, x.device)
            extra = {} if bufs is None else {"out": bufs}
        qf, kf, vf, lr, beta, q, k, v = _glue(fast_inputs, "layer-inputs", x, training, self.glue)(
            q, k, v, lr_raw, beta_raw, cos_f, sin_f, self.qk_scale, self.qk_shift, H, passthrough=True, **extra)
        # sliding-window attention path
        cos, sin = rope_cos_sin(pos, self.head_dim, self.rope_base, x.dtype)
        qa = apply_rope(self.q_norm(q.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2), cos, sin)
        ka = apply_rope(self.k_norm(k.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2), cos, sin)
        va = v.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if past is not None:
            ka, va = torch.cat([past[0], ka], dim=2), torch.cat([past[1], va], dim=2)
        a = attend(qa, ka, va, layout, self.window, self.attn_backend).transpose(1, 2).reshape(B, N, d)
        # fast-weight path
        args = (qf, kf, vf, lr, beta, self.w1, self.w2, self.w3)
        kw = dict(chunk_size=self.chunk_size, update=self.update, order=self.order)
        state = None
        if past is not None and self.order != "apply_update":
            raise ValueError(
                f"a LaCT layer with order={self.order!r} reads each chunk with the chunk's own update (not "
                "causal inside a chunk), so it cannot continue from a cache: pass use_cache=False (generate "
                "then recomputes the prefix each step) or use order='apply_update'")
        # with update-then-apply a cache holds the window's keys and values but no fast-weight state
        if past is not None or (use_cache and self.order == "apply_update"):
            if self.impl != "chunked":
                raise ValueError("cached decoding needs impl='chunked'")
            f, state = lact_chunked(*args, **kw, position_ids=pos, state=None if past is None else past[2],
                                    output_final_state=True)
        elif self.impl == "chunked":
            f = lact_chunked(*args, **kw, **self._documents(layout), graphs=self.graphs)
        else:
            f = lact_reference(*args, **kw, position_ids=pos)
        merge_fn = _glue(merge, "layer-merge", x, training, self.glue)
        merged = merge_fn(a, gate_raw, f, self.fw_norm.weight, self.fw_norm.eps)
        return self.o_proj(merged), ((*keep_window(ka, va, self.window), state) if use_cache else None)


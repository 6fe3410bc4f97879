"""Fast In-Place TTT: a chunk scan over GEMMs with a hand-written backward (DESIGN-inplace-ttt.md).

For one document with chunks ``i = 0..T-1`` (``z_i`` (C, f), target ``v_i`` (C, d)):

    forward    S_0 = 0,  S_{i+1} = S_i + v_iᵀ z_i          (d, f) float32 state
               o_i = z_i W_iᵀ,  W_i = W0 + η S_i            (one GEMM per chunk)
    backward   U_T = 0,  U_i = U_{i+1} + g_iᵀ z_i           (d, f) float32, G_i = η U_i
               ∂z_i = g_i W_i + η v_i U_{i+1}
               ∂v_i = η z_i U_{i+1}ᵀ                             (= z_i G_{i+1}ᵀ)
               ∂W0  = U_0 (summed over documents and rows)
               ∂η   = Σ_i ⟨S_i, g_iᵀ z_i⟩ = Σ_i ⟨v_i, z_i U_{i+1}ᵀ⟩

The float32 state kept is ``W0 + η S_i`` itself, so each chunk's low-precision weights are
one cast of it. The backward pass is one reverse scan; it recovers ``W0 + η S_i`` by stepping
back, ``− η v_iᵀ z_i``, from the last chunk's state: the forward pass saves it for the last
document of each row (``save_state=True``) or the backward recomputes it with one GEMM.
No per-chunk weight tensor is ever built: the only (d, f) buffers are the float32 states and
one low-precision copy of ``W_i`` (and ``G``) for the tensor cores. The backward walks the f
axis in tiles of ``tile_f`` columns, so its float32 states are (d, tile_f).

**Blocks (two-level form).** At small C the per-chunk (d, f) state traffic dominates. With
``block = K > 1`` the scan runs over blocks of ``L = K·C`` tokens (K consecutive chunks of one
document, starting at its first token) and materialises the state once per block; inside a
block the chunk-causal part is the attention form

    o_B += η · M ∘ (Z_B Z_Bᵀ) V_B,      M[i, j] = 1 iff chunk(j) < chunk(i) within the block

computed as one rectangle ``Z[C:] Z[:L-C]ᵀ`` per block (chunk 0 has no earlier chunk, the
last chunk is no one's past), masked. It does not involve the state, so its backward is a
separate pass after the reverse scan (recomputing the (L−C)² products, never storing them):

    P = M ∘ (Z[C:] Z[:m]ᵀ),  dA = η M ∘ (g[C:] V[:m]ᵀ)
    ∂z[C:] += dA Z[:m],  ∂z[:m] += dAᵀ Z[C:],  ∂v[:m] += η Pᵀ g[C:]

and ∂η = ⟨v, ∂v⟩/η still holds (o depends on η and v only through η·v). The state form costs
≈ 16·d·f bytes of float32 traffic per state step, the attention 2·C·(K−1)²/K·(d+f) FLOPs per
token forward; :func:`default_block` picks K from that trade-off.

The target ``v = Conv_K(s) @ P`` is its own Function (:class:`ChunkConvProj`): a few fused
passes over (N, d) and one GEMM; it saves only its inputs.
The Function itself runs on any device; CUDA GEMMs accumulate low-precision products straight
into the float32 state (``out_dtype``), other devices upcast the operands.
"""

from __future__ import annotations

import functools
import math

import torch

from fastweights.errors import check_positive_int
from fastweights.ops import inplace_ttt_triton
from fastweights.ops.inplace_ttt import (
    _check_chunk,
    _check_inputs,
    check_max_update_norm,
    chunk_ids,
    clip_targets,
    doc_starts,
)

__all__ = [
    "ChunkConvProj",
    "InplaceTTTScan",
    "chunk_layout",
    "conv_plan",
    "default_block",
    "inplace_ttt_fast",
]

Layout = tuple[tuple[tuple[int, int], ...], ...]  # per row: documents (start, end)


def chunk_layout(
    batch: int,
    seqlen: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> Layout:
    """Documents of each row as ``(start, end)`` token ranges, on the host.

    Without boundaries every row is one document and nothing is read from the device;
    with boundaries the start mask is copied to the host once.
    """
    if cu_seqlens is None and position_ids is None:
        return tuple(((0, seqlen),) for _ in range(batch)) if seqlen else tuple(() for _ in range(batch))
    starts = doc_starts(batch, seqlen, cu_seqlens=cu_seqlens, position_ids=position_ids, device="cpu")
    rows = []
    for b in range(batch):
        idx = starts[b].nonzero().flatten().tolist() + [seqlen]
        rows.append(tuple((idx[k], idx[k + 1]) for k in range(len(idx) - 1) if idx[k] < idx[k + 1]))
    return tuple(rows)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _addmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float = 1.0):
    """``out = beta·out + alpha·(a @ b)`` in place; out may be wider (float32) than a and b."""
    if a.dtype == out.dtype:
        torch.addmm(out, a, b, beta=beta, alpha=alpha, out=out)
    elif a.is_cuda:
        torch.addmm(out, a, b, beta=beta, alpha=alpha, out_dtype=out.dtype, out=out)
    else:
        torch.addmm(out, a.to(out.dtype), b.to(out.dtype), beta=beta, alpha=alpha, out=out)


def _use_triton(x: torch.Tensor) -> bool:
    """Triton kernels for the elementwise passes: CUDA (or the interpreter), not float64."""
    return inplace_ttt_triton.usable(x) and x.dtype != torch.float64


def _weights(fused: bool, s, out_w, u=None, sigma: float = 1.0, out_u=None) -> None:
    """out_w = s (and out_u = σ·u) in low precision, from float32 states."""
    if fused and u is not None:
        inplace_ttt_triton.build_weights(s, out_w, u, sigma, out_u)
        return
    out_w.copy_(s)
    if u is not None:
        torch.mul(u, sigma, out=out_u)


def _chunks(start: int, end: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk_size, end)) for a in range(start, end, chunk_size)]


def _tiles(f: int, tile_f: int) -> list[tuple[int, int]]:
    return [(a, min(a + tile_f, f)) for a in range(0, f, tile_f)]


def default_tile_f(n_tokens: int, d: int, f: int) -> int:
    """Columns of the backward's float32 state tiles (measured on an H100, docs/benchmarks.md).

    Full width is fastest. Only for short inputs (fewer than 4·d tokens), where the MLP's own
    activations are small next to the (d, f) states, the f axis is cut into 2048-column
    tiles, which keeps the peak memory near the plain MLP's at some cost in time.
    """
    return f if n_tokens >= 4 * d else min(f, 2048)


BLOCK_SCALE = 40.0  # fitted on an H100 (docs/benchmarks.md): K = 6 at C = 256, 2 at C = 1024, 1 at 4096


def default_block(chunk_size: int, d: int, f: int, dtype: torch.dtype | None = None) -> int:
    """Chunks per block K (measured on an H100, docs/benchmarks.md); 1 for float16, whose range
    the attention scores z·zᵀ (not bounded by the weights' scale, unlike the state form's
    W0 + ηS) could overflow.

    Per token, the state form moves ≈ 16·d·f/L bytes (L = K·C) and the in-block attention
    costs ≈ 2·L·(d+f) FLOPs (for K ≫ 1); their sum is smallest near a block length that does
    not depend on C, ``L* ∝ sqrt(d·f/(d+f))`` tokens. The constant BLOCK_SCALE was measured:
    ``L* = BLOCK_SCALE · sqrt(d·f/(d+f))``, K = round(L*/C), at least 1.
    """
    if dtype == torch.float16:
        return 1
    target = BLOCK_SCALE * (d * f / max(d + f, 1)) ** 0.5
    return max(1, round(target / chunk_size))


def _att_mask(n: int, C: int, cache: dict) -> torch.Tensor | None:
    """Boolean (n−C, m) mask of the pairs to drop in a block of n tokens: token C+r may only see
    tokens of strictly earlier chunks, j < ((C+r)//C)·C; None when nothing is dropped (K = 2)."""
    key = (n, C)
    if key not in cache:
        m = (-(-n // C) - 1) * C
        if m == C:
            cache[key] = None
        else:
            lim = (torch.arange(C, n, device=cache["device"]) // C) * C
            cache[key] = torch.arange(m, device=cache["device"])[None, :] >= lim[:, None]
    return cache[key]


def _att_forward(o: torch.Tensor, z: torch.Tensor, v: torch.Tensor, C: int, eta: float, cache: dict):
    """o (n, d) += η M∘(z zᵀ) v for one block of n tokens (z (n, f), v (n, d))."""
    n = z.shape[0]
    if n <= C or eta == 0.0:
        return
    m = (-(-n // C) - 1) * C
    p = z[C:] @ z[:m].t()
    drop = _att_mask(n, C, cache)
    if drop is not None:
        p.masked_fill_(drop, 0)
    o[C:].addmm_(p, v[:m], alpha=eta)


def _att_backward(dz, w, z, v, g, C: int, eta: float, sigma: float, cache: dict):
    """The in-block attention's gradients for one block: dz (n, f) += ∂z, w (n, d) += σ ∂v/η."""
    n = z.shape[0]
    if n <= C:
        return
    m = (-(-n // C) - 1) * C
    drop = _att_mask(n, C, cache)
    zr, zc, gr = z[C:], z[:m], g[C:]
    p = zr @ zc.t()
    if drop is not None:
        p.masked_fill_(drop, 0)
    w[:m].addmm_(p.t(), gr, alpha=sigma)
    del p
    if eta == 0.0:
        return
    da = gr @ v[:m].t()
    if drop is not None:
        da.masked_fill_(drop, 0)
    dz[C:].addmm_(da, zc, alpha=eta)
    dz[:m].addmm_(da.t(), zr, alpha=eta)


def _chunk_starts(layout: Layout, chunk_size: int) -> list[list[int]]:
    return [[a for ds, de in docs for a in range(ds, de, chunk_size)] for docs in layout]


def _cross_pairs(layout: Layout, chunk_size: int, seqlen: int, device) -> dict[int, tuple]:
    """For each conv offset, the (row, token) pairs whose neighbour ``token + off`` lies in
    another chunk (or outside the row): the conv must not read across them. Built on the host
    from the chunk starts; only tokens within 2 of a chunk start qualify."""
    out = {}
    for off in (-2, -1, 1, 2):
        rows, toks = [], []
        for b, starts in enumerate(_chunk_starts(layout, chunk_size)):
            bounds = starts + [seqlen]
            for j, a in enumerate(starts):
                e = bounds[j + 1]
                # tokens of chunk [a, e) whose neighbour n + off falls outside [a, e) but inside the row
                cand = range(max(a, e - off), e) if off > 0 else range(a, min(e, a - off))
                for n in cand:
                    if 0 <= n + off < seqlen:
                        rows.append(b)
                        toks.append(n)
        if rows:
            out[off] = (torch.tensor(rows, device=device), torch.tensor(toks, device=device))
    return out


def _conv_apply(x: torch.Tensor, w: torch.Tensor, pairs: dict, transpose: bool) -> torch.Tensor:
    """Chunk-local depthwise conv of x (B, N, d) with w (d, 5): out[n] = Σ_off w[off] x[n+off]
    (``transpose``: out[n+off] += w[off] x[n], the adjoint), never across a chunk edge."""
    N = x.shape[1]
    out = x * w[:, 2]
    for off in (-2, -1, 1, 2):
        if abs(off) >= N:
            continue
        sgn = -off if transpose else off
        wk = w[:, off + 2]
        if sgn > 0:
            out[:, : N - sgn].addcmul_(x[:, sgn:], wk)
        else:
            out[:, -sgn:].addcmul_(x[:, : N + sgn], wk)
        if off in pairs:  # take back the terms that crossed a chunk edge
            rb, n = pairs[off]
            if transpose:
                out.index_put_((rb, n + off), -x[rb, n] * wk, accumulate=True)
            else:
                out.index_put_((rb, n), -x[rb, n + off] * wk, accumulate=True)
    return out


def _first_order_only() -> None:
    """The hand-written backwards are first order: with ``create_graph`` (grad mode on inside a
    backward) refuse by name, where torch would fail on an ``out=`` matmul or, worse, return
    no second derivative."""
    if torch.is_grad_enabled():
        raise RuntimeError("the fast In-Place TTT path differentiates once (no create_graph / double backward); "
                           "use impl='chunked' for higher-order gradients")


def _autocast_off(fn):
    """Run an autograd.Function's forward or backward with autocast off on its tensors' device:
    the body mixes ``out=`` buffers and saved tensors whose dtypes autocast would change (its
    matmuls came out bf16 next to float32 buffers). :func:`inplace_ttt_fast` casts the inputs
    to the autocast dtype instead."""
    @functools.wraps(fn)
    def run(ctx, *args):
        t = next(a for a in args if torch.is_tensor(a))
        with torch.autocast(t.device.type, enabled=False):
            return fn(ctx, *args)

    return run


class ChunkConvProj(torch.autograd.Function):
    """``v = ChunkConvProj.apply(s, w, proj, plan)``: v = Conv_K(s) @ P (B, N, d).

    The same function as :func:`fastweights.ops.inplace_ttt.ttt_target`, in a few fused passes
    (one Triton pass each way where :func:`inplace_ttt_triton.usable`); it saves only s, w and
    P and recomputes the conv output in the backward pass. ``plan`` is ``("triton", g)`` with
    the chunk ids g (B, N), or ``("torch", pairs)`` with :func:`_cross_pairs`'s answer.
    ``proj`` may be None (identity).
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, s, w, proj, plan):
        t = _conv(s, w, plan)
        ctx.save_for_backward(s, w, proj)
        ctx.plan = plan
        return t if proj is None else t @ proj

    @staticmethod
    @_autocast_off
    def backward(ctx, dv):
        _first_order_only()
        s, w, proj = ctx.saved_tensors
        plan = ctx.plan
        dproj = None
        if proj is not None:
            if ctx.needs_input_grad[2]:
                t = _conv(s, w, plan)
                dproj = t.reshape(-1, t.shape[-1]).t() @ dv.reshape(-1, dv.shape[-1])
                del t
            dt = dv @ proj.t()
        else:
            dt = dv
        need_ds, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if plan[0] == "triton":
            ds, dw = inplace_ttt_triton.chunk_conv_backward(dt, s, w, plan[1], need_dw)
            return ds, (dw.to(w.dtype) if need_dw else None), dproj, None
        pairs = plan[1]
        ds = _conv_apply(dt, w, pairs, transpose=True) if need_ds else None
        dw = None
        if need_dw:
            N = s.shape[1]
            acc = _acc_dtype(s.dtype)
            cols = []
            for off in (-2, -1, 0, 1, 2):
                if abs(off) >= N:
                    cols.append(torch.zeros(s.shape[2], dtype=acc, device=s.device))
                    continue
                a, b = (dt[:, : N - off], s[:, off:]) if off >= 0 else (dt[:, -off:], s[:, : N + off])
                col = (a * b).sum(dim=(0, 1), dtype=acc)
                if off in pairs:
                    rb, n = pairs[off]
                    col = col - (dt[rb, n] * s[rb, n + off]).sum(dim=0, dtype=acc)
                cols.append(col)
            dw = torch.stack(cols, dim=1).to(w.dtype)
        return ds, dw, dproj, None


def _conv(s, w, plan):
    if plan[0] == "triton":
        return inplace_ttt_triton.chunk_conv(s, w, plan[1])
    return _conv_apply(s, w, plan[1], transpose=False)


def conv_plan(s: torch.Tensor, layout: Layout, chunk_size: int, *, cu_seqlens=None, position_ids=None,
              use_triton=None):
    """How :class:`ChunkConvProj` handles chunk edges: Triton kernels reading the chunk ids,
    or PyTorch passes corrected at the (host-known) edge tokens."""
    if use_triton is None:  # float64 stays in PyTorch: the kernels accumulate in float32
        use_triton = _use_triton(s)
    if not use_triton:
        return ("torch", _cross_pairs(layout, chunk_size, s.shape[1], s.device))
    B, N = s.shape[:2]
    if cu_seqlens is None and position_ids is None:
        return ("triton", (torch.arange(N, device=s.device) // chunk_size).expand(B, N))
    starts = doc_starts(B, N, cu_seqlens=cu_seqlens, position_ids=position_ids, device=s.device)
    return ("triton", chunk_ids(starts, chunk_size)[0])


class InplaceTTTScan(torch.autograd.Function):
    """``o = InplaceTTTScan.apply(z, v, w0, lr, chunk_size, layout, tile_f, save_state, block)``.

    z (B, N, f), v (B, N, d), w0 (d, f), lr a float or 0-d tensor; returns o (B, N, d) in
    z's dtype. ``layout`` is :func:`chunk_layout`'s answer; chunks are aligned to each
    document's start. ``block`` K: the state is stepped once per K chunks, with the in-block
    attention form in between (module docstring). Gradients flow to z, v, w0 and (if it is a
    tensor) lr.
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, z, v, w0, lr, chunk_size, layout, tile_f, save_state, block=1):
        inner = chunk_size
        chunk_size = chunk_size * block  # the state scan's step: one block
        att = {"device": z.device}
        B, N, f = z.shape
        d = v.shape[2]
        eta = float(lr)  # (the rate's one host read: a GPU tensor rate is checked here)
        if not math.isfinite(eta):
            raise ValueError(f"lr must be finite: a real number or a 1-element tensor, got {lr!r}")
        acc = _acc_dtype(z.dtype)
        w0c = w0.to(z.dtype)
        v_dtype, v_given = v.dtype, v  # a float32 v (learned rate) is saved as it is: see backward
        v = v.to(z.dtype)
        o = torch.empty(B, N, d, dtype=z.dtype, device=z.device)
        state = torch.empty(d, f, dtype=acc, device=z.device)  # W0 + η S_i
        w_eff = torch.empty(d, f, dtype=z.dtype, device=z.device)
        last_states = torch.empty(B if save_state else 0, d, f, dtype=acc, device=z.device)
        for b in range(B):
            for k, (ds, de) in enumerate(layout[b]):
                chunks = _chunks(ds, de, chunk_size)
                for i, (a, e) in enumerate(chunks):
                    zi = z[b, a:e]
                    if i == 0:
                        torch.mm(zi, w0c.t(), out=o[b, a:e])
                    else:
                        w_eff.copy_(state)
                        torch.mm(zi, w_eff.t(), out=o[b, a:e])
                    if block > 1:
                        _att_forward(o[b, a:e], zi, v[b, a:e], inner, eta, att)
                    if i + 1 < len(chunks):  # the last chunk's update is never read
                        if i == 0:
                            state.copy_(w0c)
                        _addmm_into(state, v[b, a:e].t(), zi, beta=1.0, alpha=eta)
                if save_state and k == len(layout[b]) - 1 and len(chunks) > 1:
                    last_states[b].copy_(state)
        ctx.save_for_backward(z, v_given if v_given.dtype == _acc_dtype(z.dtype) else v, w0c, last_states)
        ctx.eta, ctx.chunk_size, ctx.layout, ctx.tile_f = eta, chunk_size, layout, tile_f
        ctx.inner = inner
        ctx.lr_is_tensor = torch.is_tensor(lr)
        ctx.lr_shape = lr.shape if torch.is_tensor(lr) else ()
        ctx.w0_dtype, ctx.v_dtype = w0.dtype, v_dtype
        return o

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_o):
        _first_order_only()
        z, v, w0c, last_states = ctx.saved_tensors
        eta, C, layout = ctx.eta, ctx.chunk_size, ctx.layout
        B, N, f = z.shape
        d = v.shape[2]
        acc = _acc_dtype(z.dtype)
        dev = z.device
        z_dtype = z.dtype
        if ctx.lr_is_tensor and ctx.needs_input_grad[3] and z.dtype != acc:
            # dL/dη = ⟨v, w⟩ cancels heavily (Σ|terms| ~ 1e3 × |sum|): w in bf16/fp16 gave 2-4 %
            # errors, so a learned rate takes this backward in float32 (rates given as numbers,
            # as the layers give them, keep the low-precision path)
            z, v, w0c = z.to(acc), v.to(acc), w0c.to(acc)
        g = grad_o.to(z.dtype)
        tile_f = min(f, ctx.tile_f) if f else 1
        saved = last_states.shape[0] > 0
        fused = _use_triton(z)
        # The low-precision copy of U holds σ·U with σ = η (that is G = ∂L/∂S, whose size is that of
        # the weight change, so half precision does not overflow); σ = 1 only when η = 0.
        sigma = eta if eta != 0.0 else 1.0

        dz = torch.empty_like(z)
        w = torch.empty(B, N, d, dtype=z.dtype, device=dev)  # σ z_i U_{i+1}ᵀ, summed over tiles
        n_docs = sum(len(docs) for docs in layout)
        dw0 = (torch.zeros if n_docs == 0 else torch.empty)(d, f, dtype=w0c.dtype, device=dev)
        S = torch.empty(d, tile_f, dtype=acc, device=dev)
        U = torch.empty(d, tile_f, dtype=acc, device=dev)
        dw0_acc = torch.empty(d, tile_f if n_docs > 1 else 0, dtype=acc, device=dev)  # Σ over documents
        w_low = torch.empty(d, tile_f, dtype=z.dtype, device=dev)
        u_low = torch.empty(d, tile_f, dtype=z.dtype, device=dev)

        for t0, t1 in _tiles(f, tile_f):
            ft = t1 - t0
            St, Ut, Dt, Wl, Ul = S[:, :ft], U[:, :ft], dw0_acc[:, :ft], w_low[:, :ft], u_low[:, :ft]
            w0t = w0c[:, t0:t1]
            if n_docs > 1:
                Dt.zero_()
            for b in range(B):
                docs = layout[b]
                for k in range(len(docs) - 1, -1, -1):
                    chunks = _chunks(docs[k][0], docs[k][1], C)
                    T = len(chunks)
                    ls = chunks[-1][0]  # start of the last chunk
                    if T > 1:  # W0 + η S_{T-1}: saved, or one GEMM over the chunks before the last
                        if saved and k == len(docs) - 1:
                            St.copy_(last_states[b, :, t0:t1])
                        else:
                            St.copy_(w0t)
                            _addmm_into(St, v[b, docs[k][0] : ls].t(), z[b, docs[k][0] : ls, t0:t1], 1.0, eta)
                    for i in range(T - 1, -1, -1):
                        a, e = chunks[i]
                        zi, gi, vi = z[b, a:e, t0:t1], g[b, a:e], v[b, a:e]
                        has_u = i < T - 1  # U holds U_{i+1}
                        if i == 0:
                            Wi = w0t
                            if has_u:
                                torch.mul(Ut, sigma, out=Ul)
                        else:
                            _weights(fused, St, Wl, *((Ut, sigma, Ul) if has_u else ()))
                            Wi = Wl
                        torch.mm(gi, Wi, out=dz[b, a:e, t0:t1])
                        if has_u:
                            if eta != 0.0:
                                dz[b, a:e, t0:t1].addmm_(vi, Ul, alpha=eta / sigma)
                            if t0 == 0:
                                torch.mm(zi, Ul.t(), out=w[b, a:e])
                            else:
                                w[b, a:e].addmm_(zi, Ul.t())
                        elif t0 == 0:  # G_T = 0: the last chunk's target gets no gradient
                            w[b, a:e].zero_()
                        _addmm_into(Ut, gi.t(), zi, beta=0.0 if i == T - 1 else 1.0)
                        if i >= 2:  # step back to W0 + η S_{i-1}
                            ap, ep = chunks[i - 1]
                            _addmm_into(St, v[b, ap:ep].t(), z[b, ap:ep, t0:t1], beta=1.0, alpha=-eta)
                    if n_docs > 1:
                        Dt.add_(Ut)
                    else:
                        dw0[:, t0:t1].copy_(Ut)
            if n_docs > 1:
                dw0[:, t0:t1].copy_(Dt)

        if ctx.inner < C:  # the in-block attention's share, independent of the state
            att = {"device": dev}
            for b in range(B):
                for ds, de in layout[b]:
                    for a, e in _chunks(ds, de, C):
                        _att_backward(dz[b, a:e], w[b, a:e], z[b, a:e], v[b, a:e], g[b, a:e],
                                      ctx.inner, eta, sigma, att)

        dlr = None
        if ctx.lr_is_tensor and ctx.needs_input_grad[3]:
            dlr = torch.zeros((), dtype=acc, device=dev)
            for a in range(0, N, max(C, 1)):  # ⟨v, w⟩ / σ in float32, a chunk of rows at a time
                dlr += (v[:, a : a + C].to(acc) * w[:, a : a + C].to(acc)).sum()
            dlr = (dlr / sigma).reshape(ctx.lr_shape)
        dv = w if eta == sigma else w.mul_(eta / sigma)
        dv = dv.to(ctx.v_dtype)
        return dz.to(z_dtype), dv, dw0.to(ctx.w0_dtype), dlr, None, None, None, None, None


def inplace_ttt_fast(
    z: torch.Tensor,
    s: torch.Tensor,
    w0: torch.Tensor,
    conv_weight: torch.Tensor,
    proj: torch.Tensor | None,
    lr,
    chunk_size: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    tile_f: int | None = None,
    save_state: bool = True,
    block: int | None = None,
    max_update_norm: float | None = None,
) -> torch.Tensor:
    """In-Place TTT with the scan :class:`InplaceTTTScan`; same arguments and result (B, N, d)
    as :func:`fastweights.ops.inplace_ttt.inplace_ttt`.

    ``tile_f``: columns of the backward's float32 state tiles (default
    :func:`default_tile_f`). ``save_state``: keep the last chunk's float32 state (B, d, f)
    from the forward pass instead of recomputing it in the backward (one extra GEMM pass).
    ``block``: chunks per block K of the two-level form (default :func:`default_block`;
    1 = a state step per chunk; float16 defaults to 1). ``max_update_norm``: the targets are
    scaled by :func:`~fastweights.ops.inplace_ttt.clip_targets` before the scan.
    """
    chunk_size = _check_chunk(chunk_size)
    tau = check_max_update_norm(max_update_norm)
    B, N, d, f, w = _check_inputs(z, s, w0, conv_weight, proj, lr)
    kind = z.device.type
    if torch.is_autocast_enabled(kind) and z.dtype == torch.float32:  # as autocast would cast a matmul's inputs
        z, s = z.to(torch.get_autocast_dtype(kind)), s.to(torch.get_autocast_dtype(kind))
    if tile_f is not None:
        check_positive_int("tile_f", tile_f)
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be an integer >= 1 (chunks per block), got {block!r}")
    layout = chunk_layout(B, N, cu_seqlens=cu_seqlens, position_ids=position_ids)
    plan = conv_plan(s, layout, chunk_size, cu_seqlens=cu_seqlens, position_ids=position_ids)
    grads = torch.is_grad_enabled() and any(
        torch.is_tensor(x) and x.requires_grad for x in (z, s, w, proj, w0, lr)
    )
    # a learned rate's gradient cancels heavily: its target v is formed and kept in float32
    vd = _acc_dtype(z.dtype) if grads and torch.is_tensor(lr) and lr.requires_grad else z.dtype
    v = ChunkConvProj.apply(s.to(vd), w.to(vd), None if proj is None else proj.to(vd), plan)
    if tau is not None:
        starts = doc_starts(B, N, cu_seqlens=cu_seqlens, position_ids=position_ids, device=z.device)
        v = clip_targets(v, z, chunk_ids(starts, chunk_size)[0], lr, tau)
    tile = default_tile_f(B * N, d, f) if tile_f is None else tile_f
    K = default_block(chunk_size, d, f, z.dtype) if block is None else block
    return InplaceTTTScan.apply(z, v, w0, lr, chunk_size, layout, tile, save_state and grads, K)

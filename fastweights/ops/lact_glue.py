"""The LaCT layer's elementwise work around the chunk loop (fastweights.layers.lact), as
reference functions and as fused Triton kernels with hand-written backwards.

* :func:`fast_inputs`: the fast branch's inputs from the shared q/k/v projections,
  ``q_f, k_f = scale * RoPE(L2norm(SiLU(q|k))) + shift`` and ``v_f = SiLU(v)``, per fast head,
  plus the per-token learning rates ``η = softplus(·)`` and momentum ``β = sigmoid(·)``.
* :func:`merge`: ``a + SiLU(gate) * RMSNorm_head(f)``, back to the token layout.

The references are plain PyTorch (any device and dtype; the layer compiles them with
torch.compile on CUDA). The Triton path (``impl="triton"``) runs each of them in one pass over
the tensors, forward and backward, in float32 arithmetic on half-precision storage; the
backward recomputes what it needs from the inputs instead of saving intermediates, and the
scale/shift and norm-weight gradients come from per-program partial sums. Under
``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (that is how the tests check them
without a GPU).

Status (docs/benchmarks.md, fifteenth and sixteenth measurements): on an H100 (bf16, 760M
shapes, N 32,768) the Triton path passes the GPU checks (``pytest -m gpu
tests/test_lact_glue.py``) and, timed from CUDA graphs, takes 0.63× the compiled references'
time for ``fast_inputs`` and 0.61× for ``merge``; the training step was 1.4–1.8 ms faster with
it at the fifteenth measurement's kernel settings. So ``impl="auto"`` (the layer's
default) picks ``triton`` for CUDA tensors in bf16 or float32, outside an enclosing
torch.compile (which fuses the references itself), and ``torch`` elsewhere. Timing:
``benchmarks/lact_glue.py`` (the glue alone) and ``benchmarks/lact.py --variants
lact-muon,lact-muon-torch-glue`` (the step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastweights.ops.inplace_ttt_triton import HAVE_TRITON, IMPLS, on_device
from fastweights.ops.inplace_ttt_triton import pick_impl as _pick_impl
from fastweights.ops.rope import apply_rope

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["IMPLS", "fast_inputs", "merge", "pick_impl"]

NORM_EPS = 1e-12  # F.normalize's default
# fast_inputs: tokens per program, per tile (a power of two dividing the tokens per program) and
# warps, for the forward and for the backward kernels; merge: tokens per program and warps
# (benchmarks/lact_glue.py sweeps them; the defaults are the fastest of the sixteenth measurement's
# sweeps whose sm_90 build does not spill registers)
BLOCK_N, TILE_N, WARPS = 16, 2, 1
BWD_BLOCK_N, BWD_TILE_N, BWD_WARPS = 16, 1, 2
MERGE_BLOCK_N, MERGE_WARPS = 4, 2
AUTO_DTYPES = (torch.bfloat16, torch.float32)  # the dtypes checked on a GPU (the kernels compute in float32)


def pick_impl(impl: str, x: torch.Tensor) -> str:
    """``torch`` or ``triton`` for ``impl`` in :data:`IMPLS` and a tensor on the target device;
    ``auto``: Triton where it is measured faster (module docstring), for :data:`AUTO_DTYPES`."""
    return _pick_impl(impl, x, AUTO_DTYPES)


# --------------------------------------------------------------------------- references
def fast_inputs_reference(q, k, v, lr_raw, beta_raw, cos, sin, scale, shift, heads: int, passthrough: bool = False):
    """The fast branch's inputs from q, k, v (B, N, d), ``lr_raw`` (B, N, 3H), ``beta_raw``
    (B, N, H) or None, RoPE ``cos``/``sin`` (B, N, D) and the scale/shift (2, d). Returns
    q_f, k_f, v_f (B, H, N, D), η (B, H, N, 3) and β (B, H, N) or None, in the input dtype
    (then q, k, v as given, with ``passthrough``: :func:`fast_inputs`)."""
    B, N, d = q.shape
    D = d // heads

    def qk(x, which):  # float32 cos/sin or scale/shift (autocast) must not promote: back to x's dtype
        x = F.normalize(F.silu(x).view(B, N, heads, D), dim=-1).transpose(1, 2)
        x = apply_rope(x, cos, sin)
        return (x * scale[which].view(heads, 1, D) + shift[which].view(heads, 1, D)).to(q.dtype)

    vf = F.silu(v).view(B, N, heads, D).transpose(1, 2)
    lr, beta = _rates(lr_raw, beta_raw, heads, q.dtype)
    outs = (qk(q, 0), qk(k, 1), vf, lr, beta)
    return (*outs, q, k, v) if passthrough else outs


def _rates(lr_raw, beta_raw, heads: int, dtype):
    B, N, _ = lr_raw.shape
    acc = torch.promote_types(lr_raw.dtype, torch.float32)  # at least float32; float64 stays float64
    lr = F.softplus(lr_raw.to(acc)).view(B, N, heads, 3).transpose(1, 2).to(dtype)
    beta = None if beta_raw is None else torch.sigmoid(beta_raw.to(acc)).transpose(1, 2).to(dtype)
    return lr, beta


def merge_reference(a, gate_raw, f, norm_weight, eps: float):
    """``a + SiLU(gate_raw) * RMSNorm_head(f)``: a, gate_raw (B, N, d), f (B, H, N, D) -> (B, N, d)."""
    B, H, N, D = f.shape
    f = F.rms_norm(f, (D,), norm_weight, eps).transpose(1, 2).reshape(B, N, H * D)
    return a + F.silu(gate_raw) * f


# --------------------------------------------------------------------------- dispatch
def fast_inputs(q, k, v, lr_raw, beta_raw, cos, sin, scale, shift, heads: int, impl: str = "torch",
                passthrough: bool = False, out=None):
    """:func:`fast_inputs_reference` (``impl="torch"``) or the same from Triton kernels
    (``impl="triton"``: q_f, k_f, v_f come out contiguous (B, H, N, D)).

    ``passthrough``: also return q, k, v themselves, for the layer's other branch to read. With
    the Triton kernels their gradients are then added inside the backward kernels, which write
    ∂q = ∂q(other branch) + ∂q(fast branch) in one pass (autograd would add the two in a separate
    pass over (B, N, d)); with torch they are q, k, v as given. ``out``: three contiguous
    (B, H, N, D) tensors that the Triton kernels write q_f, k_f, v_f into (and return), such as
    the input buffers of the chunk loop's CUDA graphs (``LoopGraphs.input_buffers``: the loop
    then copies nothing in); the torch form ignores it."""
    if pick_impl(impl, q) == "torch":
        return fast_inputs_reference(q, k, v, lr_raw, beta_raw, cos, sin, scale, shift, heads, passthrough)
    B, N, d = q.shape
    if d % heads or (d // heads) % 2:
        raise ValueError(f"d {d} must split into {heads} heads of an even width")
    if out is not None and not all(o.shape == (B, heads, N, d // heads) and o.dtype == q.dtype and o.device == q.device
                                   and o.is_contiguous() for o in out):
        raise ValueError(f"out must be three contiguous {(B, heads, N, d // heads)} {q.dtype} tensors on {q.device}")
    qo, ko, vo = (None, None, None) if out is None else out
    qf, kf, q2, k2 = _QKInputs.apply(q, k, cos, sin, scale, shift, heads, qo, ko)
    vf, v2 = _VInput.apply(v, heads, vo)
    lr, beta = _rates(lr_raw, beta_raw, heads, q.dtype)
    return (qf, kf, vf, lr, beta, q2, k2, v2) if passthrough else (qf, kf, vf, lr, beta)


def merge(a, gate_raw, f, norm_weight, eps: float, impl: str = "torch"):
    """:func:`merge_reference` (``impl="torch"``) or the same from Triton kernels (``impl="triton"``)."""
    if pick_impl(impl, f) == "torch":
        return merge_reference(a, gate_raw, f, norm_weight, eps)
    return _Merge.apply(a, gate_raw, f, norm_weight, eps)


# --------------------------------------------------------------------------- Triton
if HAVE_TRITON:

    @triton.jit
    def _token_block(BN: tl.constexpr):
        """Grid (token blocks, heads, rows): this program's block index, head h, row b, the head
        count H, and its BN token indices (64-bit offsets: B·N·d may pass 2**31)."""
        pid_n = tl.program_id(0).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        return pid_n, tl.program_id(1), b, tl.num_programs(1), pid_n * BN + tl.arange(0, BN)

    @triton.jit
    def _inputs_kernel(x_ptr, cos_ptr, sin_ptr, scale_ptr, shift_ptr, dy_ptr, y_ptr, dsc_ptr, dsh_ptr, acc_ptr,
                       N, H, D, HALF, sxb, sxn, scb, scn, ssb, ssn, sdb, sdh, sdn, sab, san, n_blocks, eps,
                       QK: tl.constexpr, BACKWARD: tl.constexpr, BN: tl.constexpr, TB: tl.constexpr,
                       BH: tl.constexpr, ACC: tl.constexpr):
        """Grid (H · token blocks, rows), heads fastest: the heads of one token block share its
        cos/sin rows, read once from HBM (one axis allows 2**31 - 1 programs). One program: BN
        tokens of fast head h of row b, TB at a time, each token as two halves of HALF.
        x (B, N, d) with strides (sxb, sxn, 1); cos/sin (B, N, D) with (scb, scn, 1) and
        (ssb, ssn, 1). Forward (QK): y (B, H, N, D) contiguous = scale * RoPE(L2norm(SiLU(x))) +
        shift; without QK, y = SiLU(x). Backward: dy (B, H, N, D) with strides (sdb, sdh, sdn, 1)
        -> y = ∂x (B, N, d) contiguous, plus ``acc`` (B, N, d) with strides (sab, san, 1) when ACC
        (the gradient of x from elsewhere); with QK, this program's ∂scale / ∂shift sums to row
        (b, block) of dsc/dsh (B·n_blocks, d)."""
        pid = tl.program_id(0)
        h = pid % H
        pid_n = (pid // H).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        j = tl.arange(0, BH)
        mj = j < HALF
        if QK:
            g1 = tl.load(scale_ptr + h * D + j, mask=mj, other=0.0).to(tl.float32)[None, :]
            g2 = tl.load(scale_ptr + h * D + HALF + j, mask=mj, other=0.0).to(tl.float32)[None, :]
            if BACKWARD:
                acc_sc1 = tl.zeros((BH,), dtype=tl.float32)
                acc_sc2 = tl.zeros((BH,), dtype=tl.float32)
                acc_sh1 = tl.zeros((BH,), dtype=tl.float32)
                acc_sh2 = tl.zeros((BH,), dtype=tl.float32)
            else:
                t1 = tl.load(shift_ptr + h * D + j, mask=mj, other=0.0).to(tl.float32)[None, :]
                t2 = tl.load(shift_ptr + h * D + HALF + j, mask=mj, other=0.0).to(tl.float32)[None, :]
        col = h * D + j[None, :]
        for t0 in range(0, BN, TB):
            n = pid_n * BN + t0 + tl.arange(0, TB)
            m = (n < N)[:, None] & mj[None, :]
            xp = x_ptr + b * sxb + n[:, None] * sxn + col
            x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
            s1 = tl.sigmoid(x1)
            s2 = tl.sigmoid(x2)
            u1 = x1 * s1
            u2 = x2 * s2
            if QK:
                nrm = tl.sqrt(tl.sum(u1 * u1 + u2 * u2, axis=1))
                inv = 1.0 / tl.maximum(nrm, eps)
                xn1 = u1 * inv[:, None]
                xn2 = u2 * inv[:, None]
                cp = cos_ptr + b * scb + n[:, None] * scn + j[None, :]
                sp = sin_ptr + b * ssb + n[:, None] * ssn + j[None, :]
                c1 = tl.load(cp, mask=m, other=0.0).to(tl.float32)
                c2 = tl.load(cp + HALF, mask=m, other=0.0).to(tl.float32)
                n1 = tl.load(sp, mask=m, other=0.0).to(tl.float32)
                n2 = tl.load(sp + HALF, mask=m, other=0.0).to(tl.float32)
                r1 = xn1 * c1 - xn2 * n1
                r2 = xn2 * c2 + xn1 * n2
            if not BACKWARD:
                yp = y_ptr + ((b * H + h) * N + n[:, None]) * D + j[None, :]
                if QK:
                    y1 = r1 * g1 + t1
                    y2 = r2 * g2 + t2
                else:
                    y1 = u1
                    y2 = u2
                tl.store(yp, y1.to(y_ptr.dtype.element_ty), mask=m)
                tl.store(yp + HALF, y2.to(y_ptr.dtype.element_ty), mask=m)
            else:
                dp = dy_ptr + b * sdb + h * sdh + n[:, None] * sdn + j[None, :]
                d1 = tl.load(dp, mask=m, other=0.0).to(tl.float32)
                d2 = tl.load(dp + HALF, mask=m, other=0.0).to(tl.float32)
                if QK:
                    acc_sc1 += tl.sum(d1 * r1, axis=0)
                    acc_sc2 += tl.sum(d2 * r2, axis=0)
                    acc_sh1 += tl.sum(d1, axis=0)
                    acc_sh2 += tl.sum(d2, axis=0)
                    d1 = d1 * g1
                    d2 = d2 * g2
                    e1 = d1 * c1 + d2 * n2  # through RoPE
                    e2 = d2 * c2 - d1 * n1
                    dot = tl.sum(xn1 * e1 + xn2 * e2, axis=1)
                    proj = tl.where(nrm > eps, dot, 0.0)[:, None]  # the norm's own gradient, where it is not clamped
                    d1 = (e1 - xn1 * proj) * inv[:, None]
                    d2 = (e2 - xn2 * proj) * inv[:, None]
                d1 = d1 * (s1 * (1.0 + x1 * (1.0 - s1)))  # through SiLU
                d2 = d2 * (s2 * (1.0 + x2 * (1.0 - s2)))
                if ACC:
                    ap = acc_ptr + b * sab + n[:, None] * san + col
                    d1 += tl.load(ap, mask=m, other=0.0).to(tl.float32)
                    d2 += tl.load(ap + HALF, mask=m, other=0.0).to(tl.float32)
                op = y_ptr + (b * N + n[:, None]) * (H * D) + col
                tl.store(op, d1.to(y_ptr.dtype.element_ty), mask=m)
                tl.store(op + HALF, d2.to(y_ptr.dtype.element_ty), mask=m)
        if BACKWARD and QK:
            row = (b * n_blocks + pid_n) * H * D + h * D + j
            tl.store(dsc_ptr + row, acc_sc1, mask=mj)
            tl.store(dsc_ptr + row + HALF, acc_sc2, mask=mj)
            tl.store(dsh_ptr + row, acc_sh1, mask=mj)
            tl.store(dsh_ptr + row + HALF, acc_sh2, mask=mj)

    @triton.jit
    def _merge_kernel(a_ptr, g_ptr, f_ptr, w_ptr, do_ptr, out_ptr, df_ptr, dw_ptr,
                      N, D, sab, san, sgb, sgn, sfb, sfh, sfn, sob, son, n_blocks, eps,
                      BACKWARD: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """One program: BN tokens of head h of row b. a, g, do (B, N, d) with strides (·b, ·n, 1);
        f (B, H, N, D) with (sfb, sfh, sfn, 1); w (D,). Forward: out (B, N, d) contiguous =
        a + SiLU(g) * RMSNorm(f) w. Backward (do = ∂out): out = ∂g (B, N, d), df = ∂f (B, H, N, D),
        both contiguous; partial ∂w rows to dw (B·n_blocks·H, D)."""
        pid_n, h, b, H, n = _token_block(BN)
        j = tl.arange(0, BD)
        mj = j < D
        m = (n < N)[:, None] & mj[None, :]
        col = h * D + j[None, :]
        f = tl.load(f_ptr + b * sfb + h * sfh + n[:, None] * sfn + j[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + j, mask=mj, other=0.0).to(tl.float32)[None, :]
        g = tl.load(g_ptr + b * sgb + n[:, None] * sgn + col, mask=m, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(f * f, axis=1) / D + eps)[:, None]
        sg = tl.sigmoid(g)
        fn = f * r
        op = out_ptr + (b * N + n[:, None]) * (H * D) + col
        if not BACKWARD:
            a = tl.load(a_ptr + b * sab + n[:, None] * san + col, mask=m, other=0.0).to(tl.float32)
            tl.store(op, (a + g * sg * fn * w).to(out_ptr.dtype.element_ty), mask=m)
        else:
            do = tl.load(do_ptr + b * sob + n[:, None] * son + col, mask=m, other=0.0).to(tl.float32)
            dg = do * fn * w * (sg * (1.0 + g * (1.0 - sg)))
            tl.store(op, dg.to(out_ptr.dtype.element_ty), mask=m)
            dn = do * g * sg  # ∂(RMSNorm(f) w)
            tl.store(dw_ptr + ((b * n_blocks + pid_n) * H + h) * D + j, tl.sum(dn * fn, axis=0), mask=mj)
            t = dn * w
            df = r * (t - fn * (tl.sum(t * fn, axis=1) / D)[:, None])
            tl.store(df_ptr + ((b * H + h) * N + n[:, None]) * D + j[None, :], df.to(df_ptr.dtype.element_ty),
                     mask=m)


def _half_block(D: int) -> int:
    return triton.next_power_of_2(max(D // 2, 1))


def _inputs_launch(x, cos, sin, scale, shift, dy, heads: int, qk: bool, backward: bool, acc=None, out=None):
    """Run :func:`_inputs_kernel`; returns y (forward) or (∂x, ∂scale row, ∂shift row) (backward),
    with ``acc`` (B, N, d) or None added to ∂x."""
    B, N, d = x.shape
    D = d // heads
    bn, tb, warps = (BWD_BLOCK_N, BWD_TILE_N, BWD_WARPS) if backward else (BLOCK_N, TILE_N, WARPS)
    if bn % tb:
        raise ValueError(f"tokens per program {bn} must be a multiple of tokens per tile {tb}")
    n_blocks = triton.cdiv(N, bn)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if qk:
        cos, sin = cos.expand(B, N, D), sin.expand(B, N, D)
        if cos.stride(-1) != 1 or sin.stride(-1) != 1:
            cos, sin = cos.contiguous(), sin.contiguous()
    else:  # SiLU only: the RoPE and scale/shift pointers are not read
        cos = sin = scale = shift = x
    if backward:
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        y = torch.empty(B, N, d, device=x.device, dtype=x.dtype)
        if qk:
            dsc, dsh = torch.empty(2, B * n_blocks, d, device=x.device, dtype=torch.float32).unbind(0)
        else:  # not written
            dsc = dsh = y
        dstr = dy.stride()[:3]
        if acc is not None and acc.stride(-1) != 1:
            acc = acc.contiguous()
    else:
        y = torch.empty(B, heads, N, D, device=x.device, dtype=x.dtype) if out is None else out
        dsc = dsh = dy = y  # unused
        dstr = (0, 0, 0)
        acc = None
    astr = (0, 0) if acc is None else acc.stride()[:2]
    grid = (heads * n_blocks, B)
    with on_device(x):
        _inputs_kernel[grid](x, cos, sin, scale, shift, dy, y, dsc, dsh, y if acc is None else acc,
                             N, heads, D, D // 2, x.stride(0), x.stride(1), cos.stride(0), cos.stride(1),
                             sin.stride(0), sin.stride(1), *dstr, *astr, n_blocks, NORM_EPS,
                             QK=qk, BACKWARD=backward, BN=bn, TB=tb, BH=_half_block(D),
                             ACC=acc is not None, num_warps=warps)
    if backward and qk:
        return y, dsc.sum(0), dsh.sum(0)
    return y


class _QKInputs(torch.autograd.Function):
    """(q_f, k_f, q, k): the fast inputs and q, k passed through (:func:`fast_inputs`)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, scale, shift, heads: int, q_out=None, k_out=None):
        ctx.save_for_backward(q, k, cos, sin, scale)
        ctx.heads = heads
        ctx.set_materialize_grads(False)
        s, t = scale.detach(), shift.detach()
        return (_inputs_launch(q, cos, sin, s[0], t[0], None, heads, True, False, out=q_out),
                _inputs_launch(k, cos, sin, s[1], t[1], None, heads, True, False, out=k_out), q, k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq, gk, gq2, gk2):
        q, k, cos, sin, scale = ctx.saved_tensors
        dsc = torch.zeros(2, scale.shape[-1], device=scale.device, dtype=torch.float32)
        dsh = torch.zeros_like(dsc)
        grads = []
        for i, (x, g, g2) in enumerate(((q, gq, gq2), (k, gk, gk2))):
            if g is None:
                grads.append(g2)
                continue
            s = scale[i].detach()  # the backward reads no shift
            dx, dsc[i], dsh[i] = _inputs_launch(x, cos, sin, s, s, g, ctx.heads, True, True, acc=g2)
            grads.append(dx)
        return grads[0], grads[1], None, None, dsc.to(scale.dtype), dsh.to(scale.dtype), None, None, None


class _VInput(torch.autograd.Function):
    """(v_f, v): the fast input and v passed through (:func:`fast_inputs`)."""

    @staticmethod
    def forward(ctx, v, heads: int, v_out=None):
        ctx.save_for_backward(v)
        ctx.heads = heads
        ctx.set_materialize_grads(False)
        return _inputs_launch(v, None, None, None, None, None, heads, False, False, out=v_out), v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, g2):
        (v,) = ctx.saved_tensors
        if g is None:
            return g2, None, None
        return _inputs_launch(v, None, None, None, None, g, ctx.heads, False, True, acc=g2), None, None


def _merge_launch(a, g, f, w, do, eps: float, backward: bool):
    B, H, N, D = f.shape
    n_blocks = triton.cdiv(N, MERGE_BLOCK_N)
    if f.stride(-1) != 1:
        f = f.contiguous()
    a, g = (t if t.stride(-1) == 1 else t.contiguous() for t in (a, g))
    out = torch.empty(B, N, H * D, device=f.device, dtype=g.dtype)
    if backward:
        if do.stride(-1) != 1:
            do = do.contiguous()
        df = torch.empty(B, H, N, D, device=f.device, dtype=f.dtype)
        dw = torch.empty(B * n_blocks * H, D, device=f.device, dtype=torch.float32)
        ostr = do.stride()[:2]
    else:
        do = df = dw = out  # unused
        ostr = (0, 0)
    with on_device(f):
        _merge_kernel[(n_blocks, H, B)](a, g, f, w, do, out, df, dw, N, D, a.stride(0), a.stride(1),
                                        g.stride(0), g.stride(1), f.stride(0), f.stride(1), f.stride(2), *ostr,
                                        n_blocks, eps, BACKWARD=backward, BN=MERGE_BLOCK_N,
                                        BD=triton.next_power_of_2(D), num_warps=MERGE_WARPS)
    return (out, df, dw.sum(0)) if backward else out


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, gate_raw, f, norm_weight, eps: float):
        ctx.save_for_backward(gate_raw, f, norm_weight)
        ctx.eps = eps
        return _merge_launch(a, gate_raw, f, norm_weight.detach(), None, eps, False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        gate_raw, f, w = ctx.saved_tensors
        dg, df, dw = _merge_launch(go, gate_raw, f, w.detach(), go, ctx.eps, True)
        return go, dg, df, dw.to(w.dtype), None

"""The fast In-Place TTT path (custom autograd.Function) against the reference and chunked forms.

CPU tests run the Function itself in float64 (and bfloat16) on small odd sizes; the tests
marked ``gpu`` run the same checks at full size in bf16/fp16/fp32 and skip without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from fastweights.ops import inplace_ttt_fast as fast
from fastweights.ops.inplace_ttt import (
    chunk_ids,
    doc_starts,
    inplace_ttt,
    inplace_ttt_chunked,
    inplace_ttt_reference,
    ttt_target,
)
from fastweights.ops.inplace_ttt_fast import ChunkConvProj, _cross_pairs, chunk_layout, inplace_ttt_fast

NAMES = ["o", "dz", "ds", "dw0", "dconv", "dproj", "dlr"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def make_inputs(B, N, d, f, gen, device="cpu"):
    return {
        "z": torch.randn(B, N, f, generator=gen, device=device, dtype=torch.float64),
        "s": torch.randn(B, N, d, generator=gen, device=device, dtype=torch.float64),
        "w0": torch.randn(d, f, generator=gen, device=device, dtype=torch.float64) * f**-0.5,
        "conv": torch.randn(d, 5, generator=gen, device=device, dtype=torch.float64) * 0.3,
        "proj": torch.randn(d, d, generator=gen, device=device, dtype=torch.float64) * d**-0.5,
        "lr": torch.tensor(0.5 / (N * f) ** 0.5, dtype=torch.float64, device=device),
    }


def grad_out(x, C, kw, gen, ref=inplace_ttt_chunked):
    """∂L/∂o: noise plus the fast-weight part of o, so ∂L/∂η is not a sum that cancels."""
    with torch.no_grad():
        args = [x[k] for k in ("z", "s", "w0", "conv", "proj")]
        u = ref(*args, x["lr"], C, **kw) - ref(*args, 0.0, C, **kw)
        go = torch.randn(u.shape, generator=gen, device=u.device, dtype=u.dtype)
        return go + u * (go.norm() / u.norm().clamp_min(1e-30))


def run(fn, x, C, go, dtype, kw, **extra):
    """Output and gradients of (z, s, w0, conv, proj, lr); η stays float32 or float64."""
    lr_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xs = [x[k].to(dtype).requires_grad_() for k in ("z", "s", "w0", "conv", "proj")]
    xs.append(x["lr"].to(lr_dtype).requires_grad_())
    o = fn(*xs, C, **kw, **extra)
    return [o, *torch.autograd.grad(o, xs, go.to(o.dtype), allow_unused=True, materialize_grads=True)]


def docs_kw(case, B, N, device="cpu"):
    if case == "cu":
        cut = sorted({0, N, max(1, N // 3), max(1, N // 3) + 1, (2 * N) // 3})
        return {"cu_seqlens": torch.tensor(cut, device=device)}
    if case == "pos":
        cut = [N // (b + 2) for b in range(B)]
        pos = torch.stack([torch.cat([torch.arange(c), torch.arange(N - c)]) for c in cut])
        return {"position_ids": pos.to(device)}
    return {}


@pytest.fixture
def poison(monkeypatch):
    """Every fresh torch.empty / empty_like is filled with NaN: an unwritten element shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*a, **k):
        t = empty_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


# --------------------------------------------------------------------------- CPU, float64
@pytest.mark.parametrize(
    "B,N,d,f,C,docs,tile_f,save",
    [
        (1, 23, 5, 11, 4, None, None, True),  # N % C != 0
        (2, 19, 3, 7, 5, None, 3, False),  # batch, tiles over f, recomputed state
        (1, 29, 4, 9, 6, "cu", 4, True),  # packed documents
        (2, 17, 3, 6, 4, "pos", 5, True),  # position_ids, B > 1
        (1, 6, 3, 5, 9, None, None, True),  # C > N
        (1, 7, 2, 3, 1, "cu", 2, False),  # C = 1
    ],
)
def test_fast_matches_reference_float64(B, N, d, f, C, docs, tile_f, save, poison):
    gen = torch.Generator().manual_seed(N * 31 + f)
    x = make_inputs(B, N, d, f, gen)
    kw = docs_kw(docs, B, N)
    go = grad_out(x, C, kw, gen, ref=inplace_ttt_reference)
    ref = run(inplace_ttt_reference, x, C, go, torch.float64, kw)
    out = run(inplace_ttt_fast, x, C, go, torch.float64, kw, tile_f=tile_f, save_state=save)
    for name, a, b in zip(NAMES, out, ref, strict=True):
        assert not a.isnan().any(), name
        assert rel(a, b) < 1e-10, (name, rel(a, b))


@pytest.mark.parametrize(
    "B,N,d,f,C,docs,tile_f,save,block,lr0",
    [
        (1, 23, 5, 11, 4, None, None, True, 2, False),  # N % C != 0, unmasked rectangles (K = 2)
        (2, 31, 3, 7, 3, None, 3, False, 4, False),  # batch, f tiles, recomputed state, masked
        (1, 41, 4, 9, 3, "cu", 4, True, 3, False),  # packed documents: blocks restart per document
        (2, 26, 3, 6, 2, "pos", 5, True, 5, False),  # position_ids, a partial last block
        (1, 9, 3, 5, 4, None, None, True, 8, False),  # the whole input is one block
        (1, 13, 2, 3, 1, "cu", 2, False, 3, False),  # C = 1
        (1, 22, 4, 7, 3, "cu", None, True, 3, True),  # η = 0: ∂η comes from the attention too
    ],
)
def test_blocks_match_reference_float64(B, N, d, f, C, docs, tile_f, save, block, lr0, poison):
    """The two-level form (state once per K chunks, attention inside) against the sequential
    reference: forward and every gradient."""
    gen = torch.Generator().manual_seed(N * 17 + f + block)
    x = make_inputs(B, N, d, f, gen)
    if lr0:
        x["lr"] = torch.zeros((), dtype=torch.float64)
    kw = docs_kw(docs, B, N)
    go = grad_out(x, C, kw, gen, ref=inplace_ttt_reference)
    ref = run(inplace_ttt_reference, x, C, go, torch.float64, kw)
    out = run(inplace_ttt_fast, x, C, go, torch.float64, kw, tile_f=tile_f, save_state=save, block=block)
    for name, a, b in zip(NAMES, out, ref, strict=True):
        assert not a.isnan().any(), name
        assert rel(a, b) < 1e-10, (name, rel(a, b))


def test_default_block_follows_the_cost_model():
    """K = 1 at large C, more chunks per block as C shrinks, never below 1."""
    assert fast.default_block(4096, 4096, 12288) == 1
    assert fast.default_block(1024, 2560, 9728) >= 2
    assert fast.default_block(256, 2048, 8192) > fast.default_block(1024, 2048, 8192)
    assert fast.default_block(10**6, 8, 8) == 1
    assert fast.default_block(256, 2048, 8192, torch.float16) == 1  # scores could overflow float16


@pytest.mark.parametrize("tile_f", [None, 16, 7])
def test_fast_matches_chunked_larger_odd_sizes(tile_f, poison):
    gen = torch.Generator().manual_seed(5)
    B, N, d, f, C = 2, 203, 13, 37, 32
    x = make_inputs(B, N, d, f, gen)
    kw = docs_kw("pos", B, N)
    go = grad_out(x, C, kw, gen)
    ref = run(inplace_ttt_chunked, x, C, go, torch.float64, kw)
    out = run(inplace_ttt_fast, x, C, go, torch.float64, kw, tile_f=tile_f)
    for name, a, b in zip(NAMES, out, ref, strict=True):
        assert rel(a, b) < 1e-10, (name, rel(a, b))


def test_fast_bfloat16_within_rounding():
    gen = torch.Generator().manual_seed(7)
    B, N, d, f, C = 1, 150, 24, 53, 16
    x = make_inputs(B, N, d, f, gen)
    kw = docs_kw("cu", B, N)
    go = grad_out(x, C, kw, gen)
    ref = run(inplace_ttt_chunked, x, C, go, torch.float64, kw)
    for block in (1, 3):
        out = run(inplace_ttt_fast, x, C, go, torch.bfloat16, kw, tile_f=20, block=block)
        for name, a, b in zip(NAMES, out, ref, strict=True):
            assert rel(a, b) < 2e-2, (block, name, rel(a, b))


def test_packed_rows_equal_separate_documents():
    gen = torch.Generator().manual_seed(11)
    d, f, C, lens = 4, 9, 4, [7, 1, 10]
    N = sum(lens)
    x = make_inputs(1, N, d, f, gen)
    cu = torch.tensor([0, 7, 8, 18])
    packed = inplace_ttt_fast(x["z"], x["s"], x["w0"], x["conv"], x["proj"], x["lr"], C, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        alone = inplace_ttt_fast(x["z"][:, a:b], x["s"][:, a:b], x["w0"], x["conv"], x["proj"], x["lr"], C)
        assert rel(packed[:, a:b], alone) < 1e-12


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    x = make_inputs(1, 11, 3, 5, gen)
    args = [x[k].clone().requires_grad_() for k in ("z", "s", "w0", "conv", "proj", "lr")]

    for block in (1, 2):

        def fn(z, s, w0, conv, proj, lr, block=block):
            return inplace_ttt_fast(z, s, w0, conv, proj, lr, 3, cu_seqlens=torch.tensor([0, 8, 11]), tile_f=2,
                                    block=block)

        assert torch.autograd.gradcheck(fn, args)


def test_conv_proj_matches_ttt_target(poison):
    gen = torch.Generator().manual_seed(2)
    B, N, d, C = 2, 21, 6, 4
    s = torch.randn(B, N, d, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    P = torch.randn(d, d, generator=gen, dtype=torch.float64, requires_grad=True)
    pos = torch.cat([torch.arange(9), torch.arange(12)]).expand(B, N)
    layout = chunk_layout(B, N, position_ids=pos)
    g, _ = chunk_ids(doc_starts(B, N, position_ids=pos), C)
    gv = torch.randn(B, N, d, generator=gen, dtype=torch.float64)
    for proj in (P, None):
        ref = ttt_target(s, w, proj, g)
        out = ChunkConvProj.apply(s, w, proj, ("torch", _cross_pairs(layout, C, N, "cpu")))
        assert rel(out, ref) < 1e-12
        wrt = [s, w] + ([P] if proj is not None else [])
        for a, b in zip(torch.autograd.grad(out, wrt, gv), torch.autograd.grad(ref, wrt, gv), strict=True):
            assert rel(a, b) < 1e-12


def test_dispatch_cpu_uses_chunked_and_fast_runs_on_cpu(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    x = make_inputs(1, 10, 3, 4, gen)
    args = [x[k] for k in ("z", "s", "w0", "conv", "proj", "lr")]

    def boom(*a, **k):
        raise AssertionError("the fast path ran on CPU under impl='auto'")

    monkeypatch.setattr(fast.InplaceTTTScan, "apply", boom)
    auto = inplace_ttt(*args, 4)
    assert rel(auto, inplace_ttt_chunked(*args, 4)) < 1e-12
    monkeypatch.undo()
    assert rel(inplace_ttt(*args, 4, impl="fast"), inplace_ttt_reference(*args, 4)) < 1e-10


def test_bad_arguments():
    gen = torch.Generator().manual_seed(4)
    x = make_inputs(1, 10, 3, 4, gen)
    args = [x[k] for k in ("z", "s", "w0", "conv", "proj", "lr")]
    with pytest.raises(ValueError, match="tile_f"):
        inplace_ttt_fast(*args, 4, tile_f=0)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="block"):
            inplace_ttt_fast(*args, 4, block=bad)
    with pytest.raises(ValueError, match="impl"):
        inplace_ttt(*args, 4, impl="fastest")
    with pytest.raises(ValueError, match="chunk_size"):
        inplace_ttt_fast(*args, 0)


# --------------------------------------------------------------------------- GPU, full size
GPU_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "B,N,d,f,C,docs",
    [(1, 8192, 2560, 9728, 1024, None), (2, 3001, 1024, 2731, 256, "pos"), (1, 5000, 768, 2050, 700, "cu")],
)
def test_gpu_fast_matches_chunked(dtype, B, N, d, f, C, docs, poison):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(N + f)
    x = {k: v.float() for k, v in make_inputs(B, N, d, f, gen, device=dev).items()}
    kw = docs_kw(docs, B, N, device=dev)
    go = grad_out(x, C, kw, gen)
    ref = run(inplace_ttt_chunked, x, C, go, torch.float32, kw)
    out = run(inplace_ttt, x, C, go, dtype, kw)  # impl="auto": the fast path on CUDA
    for name, a, b in zip(NAMES, out, ref, strict=True):
        assert not a.isnan().any(), name
        assert rel(a, b) < GPU_TOL[dtype], (name, rel(a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "B,N,d,f,C,docs,block",
    [(1, 16384, 2048, 8192, 256, None, 6), (2, 3001, 1024, 2731, 256, "pos", 5), (1, 5000, 768, 2050, 700, "cu", 3)],
)
def test_gpu_blocks_match_chunked(dtype, B, N, d, f, C, docs, block, poison):
    """The two-level form at full size, explicit K, against the float32 chunked form."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(N + f + block)
    x = {k: v.float() for k, v in make_inputs(B, N, d, f, gen, device=dev).items()}
    kw = docs_kw(docs, B, N, device=dev)
    go = grad_out(x, C, kw, gen)
    ref = run(inplace_ttt_chunked, x, C, go, torch.float32, kw)
    out = run(inplace_ttt_fast, x, C, go, dtype, kw, block=block)
    for name, a, b in zip(NAMES, out, ref, strict=True):
        assert not a.isnan().any(), name
        assert rel(a, b) < GPU_TOL[dtype], (name, rel(a, b))


# --------------------------------------------------------------------------- Triton, interpreted
TRITON_CHECK = r"""
import torch
from fastweights.ops import inplace_ttt_triton
from fastweights.ops.inplace_ttt import chunk_ids, doc_starts, ttt_target
from fastweights.ops.inplace_ttt_fast import ChunkConvProj, chunk_layout, conv_plan

assert inplace_ttt_triton.usable(torch.zeros(1))
gen = torch.Generator().manual_seed(0)
B, N, d, C = 2, 45, 130, 4  # several token and channel blocks (forward), ragged edges
s = torch.randn(B, N, d, generator=gen, requires_grad=True)
w = torch.randn(d, 5, generator=gen, requires_grad=True)
P = torch.randn(d, d, generator=gen, requires_grad=True)
pos = torch.cat([torch.arange(9), torch.arange(36)]).expand(B, N)
starts, layout = doc_starts(B, N, position_ids=pos), chunk_layout(B, N, position_ids=pos)
g, _ = chunk_ids(starts, C)
gv = torch.randn(B, N, d, generator=gen)
plan = conv_plan(s, layout, C, position_ids=pos)
assert plan[0] == "triton"
plain_plan = conv_plan(s, chunk_layout(B, N), C)  # no documents: ids by arithmetic
assert torch.equal(plain_plan[1], chunk_ids(doc_starts(B, N), C)[0])
empty = torch.empty_like
torch.empty_like = lambda *a, **k: empty(*a, **k).fill_(float("nan"))  # unwritten -> NaN
out = ChunkConvProj.apply(s, w, P, plan)
got = torch.autograd.grad(out, [s, w, P], gv)
torch.empty_like = empty
ref = ttt_target(s.double(), w.double(), P.double(), g)
want = torch.autograd.grad(ref, [s, w, P], gv.double())
for a, b in zip([out, *got], [ref, *want], strict=True):
    err = ((a.double() - b).norm() / b.norm()).item()
    assert err < 1e-5, err

# the whole fast path in float32, so the scan's weight kernel runs too (tiles: strided views)
from fastweights.ops.inplace_ttt import inplace_ttt_chunked
from fastweights.ops.inplace_ttt_fast import inplace_ttt_fast

z = torch.randn(1, 50, 300, generator=gen)
w0 = torch.randn(d, 300, generator=gen) * 0.05
lr = torch.tensor(0.01, requires_grad=True)
s2 = torch.randn(1, 50, d, generator=gen)
xs = [t.clone().requires_grad_() for t in (z, s2, w0, w.detach(), P.detach())]
cu = torch.tensor([0, 23, 50])
go = torch.randn(1, 50, d, generator=gen)
torch.empty_like = lambda *a, **k: empty(*a, **k).fill_(float("nan"))
out = inplace_ttt_fast(*xs, lr, 8, cu_seqlens=cu, tile_f=257, block=2)  # 2 blocks per document
got = torch.autograd.grad(out, [*xs, lr], go)
torch.empty_like = empty
xd = [t.detach().double().requires_grad_() for t in (*xs, lr)]
ref = inplace_ttt_chunked(*xd[:5], xd[5], 8, cu_seqlens=cu)
want = torch.autograd.grad(ref, xd, go.double())
for a, b in zip([out, *got], [ref, *want], strict=True):
    err = ((a.double() - b).norm() / b.norm()).item()
    assert err < 1e-4, err
print("ok")
"""


def test_triton_conv_kernels_interpreted():
    """The Triton conv kernels on CPU under TRITON_INTERPRET=1 (set before triton is imported,
    hence a fresh interpreter), forward and both gradients against ttt_target in float64."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_double_backward_is_refused_by_name():
    """create_graph through the hand-written backward failed in an out= matmul (or could return no
    second derivative); the chunked form differentiates twice."""
    gen = torch.Generator().manual_seed(3)
    x = make_inputs(1, 7, 3, 4, gen)
    xs = [x[k].requires_grad_() for k in ("z", "s", "w0", "conv", "proj")]
    o = inplace_ttt_fast(*xs, 0.3, 4)
    with pytest.raises(RuntimeError, match="differentiates once .* use impl='chunked'"):
        torch.autograd.grad(o.square().sum(), xs, create_graph=True)
    o = inplace_ttt_chunked(*xs, 0.3, 4)
    gs = torch.autograd.grad(o.square().sum(), xs, create_graph=True)
    assert all(g is not None for g in torch.autograd.grad(sum(g.square().sum() for g in gs), xs))


def _lr_case(gen, B=2, N=257, d=64, f=96):
    """bf16-exact inputs and a plain random ∂L/∂o, for which ∂L/∂η cancels heavily."""
    x = make_inputs(B, N, d, f, gen)
    x = {k: v.to(torch.bfloat16).double() for k, v in x.items()}
    go = torch.randn(B, N, d, generator=gen, dtype=torch.float64).to(torch.bfloat16).double()
    return x, go


def _dlr(fn, x, go, C, dtype, lr_shape=()):
    xs = [x[k].to(dtype) for k in ("z", "s", "w0", "conv", "proj")]
    lr = x["lr"].float().reshape(lr_shape).requires_grad_()
    o = fn(*xs, lr, C)
    (g,) = torch.autograd.grad(o, lr, go.to(o.dtype))
    return g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_learned_rate_gradient_in_low_precision_matches_float64(dtype):
    """With a plain ∂L/∂o, ∂L/∂η = ⟨v, w⟩ cancels (Σ|terms| ~ 1e3 × |sum|): the fast path formed
    w in bf16/fp16 and was 1.6e-2 off (bf16; the chunked path 9e-7)."""
    gen = torch.Generator().manual_seed(11)
    x, go = _lr_case(gen)
    lr = x["lr"].clone().requires_grad_()
    o = inplace_ttt_chunked(*(x[k] for k in ("z", "s", "w0", "conv", "proj")), lr, 7)
    (want,) = torch.autograd.grad(o, lr, go)
    got = _dlr(inplace_ttt_fast, x, go, 7, dtype)
    assert abs(got.double().item() - want.item()) / abs(want.item()) < 1e-5, (got.item(), want.item())


def test_a_one_element_rate_gets_a_gradient_of_its_shape():
    """lr of shape (1,) (accepted as a 1-element tensor) failed in the fast backward: 'got []
    but expected shape compatible with [1]'; the reference promoted float32 to float64 with a
    float64 (1,) rate."""
    gen = torch.Generator().manual_seed(12)
    x, go = _lr_case(gen, B=1, N=23, d=6, f=10)
    for fn in (inplace_ttt_fast, inplace_ttt_chunked, inplace_ttt_reference):
        g = _dlr(fn, x, go, 4, torch.float32, lr_shape=(1,))
        assert g.shape == (1,) and torch.isfinite(g).all(), fn.__name__
    xs = [x[k].float() for k in ("z", "s", "w0", "conv", "proj")]
    o64 = inplace_ttt_reference(*xs, x["lr"].reshape(1), 4)  # a float64 (1,) rate
    assert o64.dtype == torch.float32
    assert rel(o64, inplace_ttt_reference(*xs, float(x["lr"]), 4)) < 1e-6


def test_fast_path_runs_under_autocast_with_float32_inputs():
    """Called directly under autocast with float32 inputs, the fast path mixed bf16 matmul
    outputs with float32 buffers (a dtype error in forward, or in backward with block 1)."""
    gen = torch.Generator().manual_seed(13)
    x = make_inputs(1, 29, 6, 10, gen)
    args = [x[k].float().requires_grad_() for k in ("z", "s", "w0", "conv", "proj")]
    lr = x["lr"].float()
    want = inplace_ttt_chunked(*(a.double() for a in args), lr.double(), 4)
    for block in (1, 2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = inplace_ttt_fast(*args, lr, 4, block=block)
            grads = torch.autograd.grad(o.float().sum(), args)
        assert o.dtype == torch.bfloat16 and rel(o, want) < 3e-2, block
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_the_scan_refuses_a_rate_that_is_not_finite_where_it_reads_it():
    """The scan reads the rate on the host anyway: a GPU tensor rate (which the op's input check
    leaves unread, to cost no device sync) is checked there (called directly here, on CPU)."""
    gen = torch.Generator().manual_seed(5)
    x = make_inputs(1, 10, 3, 4, gen)
    z, v, w0 = x["z"], x["s"], x["w0"]
    with pytest.raises(ValueError, match=r"lr must be finite: .* got tensor\(nan"):
        fast.InplaceTTTScan.apply(z, v, w0, torch.tensor(float("nan")), 4, chunk_layout(1, 10), 4, False, 1)

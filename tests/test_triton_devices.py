"""Kernels launch on their tensors' GPU, not on the current one (a model spread over several
GPUs, as with ``device_map``): each Triton kernel's results on the last GPU, with GPU 0 current,
equal its results with that GPU current, and LaCT's CUDA-graphed loop captures and replays
there. Needs two GPUs; skips otherwise."""

import pytest
import torch

from fastweights.ops import inplace_ttt_triton as T
from fastweights.ops import lact_glue as G
from fastweights.ops import rows as R
from fastweights.ops.inplace_ttt import chunk_ids
from fastweights.ops.rope import rope_cos_sin
from tests.test_rows import random_map


def _each_kernel(dev: torch.device) -> list[torch.Tensor]:
    """Every Triton launch site's outputs for fixed random inputs on ``dev`` (bf16)."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=gen)).to(dev, torch.bfloat16)

    B, N, d, H = 2, 75, 96, 2
    D = d // H
    x, w = r(B, N, d), r(d, 5)
    starts = torch.zeros(B, N, dtype=torch.bool)
    starts[:, 0] = starts[1, 40] = True  # two documents in row 1
    g = chunk_ids(starts, 16)[0].to(dev)
    outs = [T.chunk_conv(x, w, g), *T.chunk_conv_backward(r(B, N, d), x, w, g, need_dw=True)]
    s, u = torch.randn(40, 300, generator=gen).to(dev), torch.randn(40, 300, generator=gen).to(dev)
    out_w, out_u = torch.empty_like(s, dtype=torch.bfloat16), torch.empty_like(u, dtype=torch.bfloat16)
    T.build_weights(s, out_w, u, 0.5, out_u)
    outs += [out_w, out_u]
    leaves = [r(B, N, 3 * d), r(B, N, 3 * H), r(B, N, H), r(2, d, scale=0.3, shift=1.0), r(2, d, scale=0.3),
              r(B, N, d), r(B, N, d), r(D, scale=0.2, shift=1.0)]
    leaves = [t.requires_grad_() for t in leaves]
    cos, sin = rope_cos_sin(torch.arange(N, device=dev)[None], D, 1e6, torch.bfloat16)
    q, k, v = leaves[0].chunk(3, dim=-1)
    fast = list(G.fast_inputs(q, k, v, leaves[1], leaves[2], cos, sin, leaves[3], leaves[4], H, impl="triton"))
    fast.append(G.merge(leaves[5], leaves[6], fast[2], leaves[7], 1e-6, impl="triton"))
    loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(fast))
    outs += fast + list(torch.autograd.grad(loss, leaves))
    # a row move from two sources, and its backward
    srcs = [r(1, H, 30, D).requires_grad_(), r(2, H, 7, D).requires_grad_()]
    index, inv_a, inv_b = (m.to(dev) for m in random_map(2 * 20, 30, 14, gen))
    moved = R.move_rows(srcs[0], index, inv_a, (2, 20), srcs[1], inv_b, impl="triton")
    outs += [moved, *torch.autograd.grad((moved.float() * 3).sum(), srcs)]
    return [o.detach().cpu() for o in outs]


@pytest.mark.gpu
def test_triton_kernels_run_on_their_tensors_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    with torch.cuda.device(last):
        want = _each_kernel(last)
    assert torch.cuda.current_device() == 0
    got = _each_kernel(last)  # GPU 0 current, tensors on the last GPU
    assert len(got) == len(want) == 22
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), i
        assert a.abs().sum() > 0, i  # each kernel wrote something


@pytest.mark.gpu
def test_lact_loop_graphs_on_a_gpu_that_is_not_current():
    """LaCT's CUDA-graphed loop on the last GPU with GPU 0 current: captured and replayed there,
    output and every gradient as the float64 CPU reference."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from fastweights.ops.lact import LoopGraphs, lact_chunked, lact_reference
    from tests.test_lact_op import make, rel

    torch.backends.cuda.matmul.allow_tf32 = False
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    kw = dict(chunk_size=16, update="muon")
    inputs = make(B=1, H=2, N=70, D=16, Dh=16, D2=16, dtype=torch.float64, seed=3)
    ref = lact_reference(*inputs, **kw)
    go = torch.randn_like(ref)
    want = torch.autograd.grad(ref, inputs, go)
    dev = [t.detach().float().to(last).requires_grad_(True) for t in inputs]
    out = lact_chunked(*dev, **kw, compile="graphs", graphs=LoopGraphs())
    got = torch.autograd.grad(out, dev, go.float().to(last))
    assert torch.cuda.current_device() == 0 and out.device == last
    assert rel(out.double().cpu(), ref) < 1e-4
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel(a.double().cpu(), b) < 1e-3, i

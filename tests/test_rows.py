"""Row moves (fastweights.ops.rows): the torch reference against a plain loop, the Triton kernel
(under TRITON_INTERPRET=1 on the CPU, and on a GPU) against the reference, forward and every
gradient, with odd sizes, strided sources and two sources; LaCT's lanes on the kernel against the
lanes on torch indexing; clear errors."""

import os
import subprocess
import sys

import pytest
import torch

from fastweights.ops import rows
from fastweights.ops.inplace_ttt_triton import HAVE_TRITON


def random_map(n_out, n_a, n_b, gen):
    """A random one-to-one map (module docstring of fastweights.ops.rows) with its inverses."""
    index = torch.full((n_out,), -1, dtype=torch.int64)
    inv_a = torch.full((n_a,), -1, dtype=torch.int64)
    inv_b = torch.full((n_b,), -1, dtype=torch.int64)
    dest = torch.randperm(n_out, generator=gen)
    used_a = torch.randperm(n_a, generator=gen)[: min(n_a, n_out * 2 // 3)]
    used_b = torch.randperm(n_b, generator=gen)[: min(n_b, n_out - len(used_a) - 1)]
    for src, inv, code in ((used_a, inv_a, lambda i: i), (used_b, inv_b, lambda i: -2 - i)):
        d, dest = dest[: len(src)], dest[len(src):]
        index[d], inv[src] = code(src), d
    return index, inv_a, inv_b


def loop_move(a, b, index, Bo, No):
    """The move written out row by row."""
    H, F = a.shape[1], a.shape[-1]
    out = torch.zeros(Bo, H, No, F, dtype=a.dtype)
    for r, i in enumerate(index.tolist()):
        if i >= 0:
            out[r // No, :, r % No] = a[i // a.shape[2], :, i % a.shape[2]]
        elif i <= -2:
            j = -2 - i
            out[r // No, :, r % No] = b[j // b.shape[2], :, j % b.shape[2]]
    return out


@pytest.mark.parametrize("two", [False, True])
def test_reference_is_the_move_and_its_backward_the_inverse_move(two):
    gen = torch.Generator().manual_seed(1)
    Ba, Na, Bb, Nb, Bo, No, H, F = 2, 7, 1, 5, 3, 6, 3, 5
    index, inv_a, inv_b = random_map(Bo * No, Ba * Na, Bb * Nb if two else 0, gen)
    a = torch.randn(Ba, H, Na, F, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(Bb, H, Nb, F, generator=gen, dtype=torch.float64, requires_grad=True) if two else None
    out = rows.move_rows(a, index, inv_a, (Bo, No), b, inv_b if two else None, impl="torch")
    assert torch.equal(out, loop_move(a.detach(), None if b is None else b.detach(), index, Bo, No))
    assert (index == -1).any() and (out == 0).all(-1).any()  # empty rows are zeros
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, [a] + ([b] if two else []), g)
    back = rows.move_rows_reference(g, inv_a, (Ba, Na))
    assert torch.equal(grads[0], back) and (inv_a == -1).any()
    if two:
        assert torch.equal(grads[1], rows.move_rows_reference(g, inv_b, (Bb, Nb)))
    # out=: written into and returned, with the same gradients
    buf = torch.full(out.shape, float("nan"), dtype=torch.float64)
    into = rows.move_rows(a, index, inv_a, (Bo, No), b, inv_b if two else None, impl="torch", out=buf)
    assert into.data_ptr() == buf.data_ptr() and torch.equal(into, out)
    for x, y in zip(torch.autograd.grad(into, [a] + ([b] if two else []), g), grads, strict=True):
        assert torch.equal(x, y)


def test_errors():
    a = torch.zeros(2, 3, 4, 5)
    idx = torch.full((6,), -1, dtype=torch.int64)
    inv = torch.full((8,), -1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"impl must be one of .*'fast'"):
        rows.move_rows(a, idx, inv, (2, 3), impl="fast")
    with pytest.raises(ValueError, match=r"a must be \(B, H, N, F\), got shape \(3, 4, 5\)"):
        rows.move_rows(a[0], idx, inv, (2, 3))
    with pytest.raises(ValueError, match=r"index must be int32 or int64 of shape \(6,\) for rows \(2, 3\), got "
                                         r"\(6,\) torch.int16"):
        rows.move_rows(a, idx.short(), inv, (2, 3))
    with pytest.raises(ValueError, match=r"index must be int32 or int64 of shape \(4,\)"):
        rows.move_rows(a, idx, inv, (2, 2))
    with pytest.raises(ValueError, match="b must be .* with a's H, F, dtype and device"):
        rows.move_rows(a, idx, inv, (2, 3), torch.zeros(1, 3, 4, 6), inv)
    with pytest.raises(ValueError, match="give b and inverse_b together"):
        rows.move_rows(a, idx, inv, (2, 3), a)
    with pytest.raises(ValueError, match=r"inverse_a must have one entry per row of its source, 8, got shape \(7,\)"):
        rows.move_rows(a, idx, inv[:7], (2, 3))
    with pytest.raises(ValueError, match=r"out must be a contiguous \(2, 3, 3, 5\) torch.float32 tensor on cpu, "
                                         r"got \(2, 3, 3, 5\) torch.float64 on cpu"):
        rows.move_rows(a, idx, inv, (2, 3), out=torch.zeros(2, 3, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous=False"):
        rows.move_rows(a, idx, inv, (2, 3), out=torch.zeros(2, 3, 5, 3).mT)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs a CUDA tensor" if HAVE_TRITON else "pip install"):
            rows.move_rows(a, idx, inv, (2, 3), impl="triton")
    assert rows.pick_impl("auto", a) == "torch"  # CPU


ROWS_CHECK = r"""
import torch
from fastweights.ops import lact as L, rows
from tests.test_rows import random_map
from tests.test_lact_fast import NAMES, make, packed_positions

gen = torch.Generator().manual_seed(0)
empty = torch.empty
# F: 1, odd, above one tile and not a multiple of it; output rows not a multiple of the block
assert rows.BLOCK_F < 130 and (7 * 5) % rows.BLOCK_R
for F in (1, 5, 130):
    for two in (False, True):
        for dtype in (torch.float64, torch.float32):
            Ba, Na, Bb, Nb, Bo, No, H = 2, 9, 1, 6, 7, 5, 3
            index, inv_a, inv_b = random_map(Bo * No, Ba * Na, Bb * Nb if two else 0, gen)
            # a strided source: (B, N, H, F) transposed, every other channel
            a = torch.randn(Ba, Na, H, 2 * F, generator=gen, dtype=dtype)[..., ::2].transpose(1, 2).requires_grad_()
            b = torch.randn(Bb, H, Nb, F, generator=gen, dtype=dtype).requires_grad_() if two else None
            leaves = [a] + ([b] if two else [])
            g = torch.randn(Bo, H, No, F, generator=gen, dtype=dtype)
            res = []
            for impl in ("torch", "triton"):
                torch.empty = (lambda *x, **k: empty(*x, **k).fill_(float("nan"))) if impl == "triton" else empty
                out = rows.move_rows(a, index, inv_a, (Bo, No), b, inv_b if two else None, impl=impl)
                res.append([out, *torch.autograd.grad(out, leaves, g)])
                torch.empty = empty
            for i, (x, y) in enumerate(zip(*res, strict=True)):
                assert torch.equal(x, y), (F, two, dtype, i)
            buf = torch.full((Bo, H, No, F), float("nan"), dtype=dtype)  # out=: written into, returned
            into = rows.move_rows(a, index, inv_a, (Bo, No), b, inv_b if two else None, impl="triton", out=buf)
            assert into.data_ptr() == buf.data_ptr() and torch.equal(into, res[0][0])
            for x, y in zip(torch.autograd.grad(into, leaves, g), res[0][1:], strict=True):
                assert torch.equal(x, y)

# the lanes on the kernel against the lanes on torch indexing: output and every gradient
inputs = make(B=3, H=2, N=29, D=5, Dh=5, D2=5, seed=21)
pos = packed_positions()
for order in ("apply_update", "update_apply"):
    res = []
    for impl in ("torch", "triton"):
        lanes = L.LaCTLanes(pos == 0, 6, order, impl=impl)
        out = L.lact_chunked(*inputs, chunk_size=6, update="muon", order=order, lanes=lanes, compile=False)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
        res.append([out, *torch.autograd.grad(out, inputs, go, allow_unused=True)])
    for name, x, y in zip(["out", *NAMES], *res, strict=True):
        assert (x is None) == (y is None), name
        assert x is None or torch.equal(x, y), (order, name)
print("ok")
"""


def test_triton_moves_interpreted():
    """The kernel on CPU under TRITON_INTERPRET=1 (a fresh interpreter: it is read when triton
    is imported) against the reference, forward and every gradient, bitwise (a move only copies),
    with unwritten output elements poisoned; then LaCT's packed lanes on it."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", ROWS_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("two", [False, True])
def test_triton_moves_on_cuda(two):
    """The compiled kernel at the benchmark's head width (384, bf16) against the CPU reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(2)
    Ba, Na, Bb, Nb, Bo, No, H, F = 1, 3001, 1, 1003, 2, 2050, 4, 384
    index, inv_a, inv_b = random_map(Bo * No, Ba * Na, Bb * Nb if two else 0, gen)
    host = [torch.randn(Ba, H, Na, F, generator=gen).bfloat16()]
    if two:
        host.append(torch.randn(Bb, H, Nb, F, generator=gen).bfloat16())
    g = torch.randn(Bo, H, No, F, generator=gen).bfloat16()
    res = []
    for dev in ("cpu", "cuda"):
        leaves = [t.to(dev).requires_grad_() for t in host]
        maps = [m.to(dev) for m in (index, inv_a, inv_b)]
        out = rows.move_rows(leaves[0], maps[0], maps[1], (Bo, No), *(leaves[1:] + maps[2:] if two else []),
                             impl="torch" if dev == "cpu" else "auto")
        res.append([t.cpu() for t in (out, *torch.autograd.grad(out, leaves, g.to(dev)))])
    for x, y in zip(*res, strict=True):
        assert torch.equal(x, y)

"""RoPE (fastweights.ops.rope): the rotation against pairwise rotations by angle, and the
compiled path of CUDA training against eager, forward and gradient."""

from __future__ import annotations

import pytest
import torch

from fastweights.ops import rope


def _rotated_pairs(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Reference: dims (i, i + D/2) of x (B, H, N, D) rotated by pos · base^(-2i/D), in float64."""
    D = x.shape[-1]
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(D // 2):
        ang = pos.double() * base ** (-2 * i / D)  # (B, N)
        c, s = ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)
        a, b = x[..., i].double(), x[..., i + D // 2].double()
        out[..., i], out[..., i + D // 2] = a * c - b * s, b * c + a * s
    return out


def _inputs(device="cpu", dtype=torch.float64):
    """Odd sizes, packed positions, and x a transposed view as in the attention layers."""
    g = torch.Generator().manual_seed(0)
    B, N, H, D = 2, 7, 3, 10
    x = torch.randn(B, N, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [5, 6, 7, 8, 9, 10, 11]])
    return x.to(device, dtype), pos.to(device)


def test_rope_rotates_each_pair_by_its_angle():
    x, pos = _inputs()
    ang = pos.double().unsqueeze(-1) * 1e4 ** (-2 * torch.arange(5, dtype=torch.float64) / 10)
    ang = torch.cat([ang, ang], -1)  # (B, N, D): the half-split layout's angles in float64
    out = rope.apply_rope(x, ang.cos(), ang.sin())
    want = _rotated_pairs(x, pos, 1e4)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)
    # rope_cos_sin forms the angles in float64 for a float64 model (float32 angles were off by
    # ~1e-4 at position 30k), in float32 otherwise (as Qwen3)
    far = pos + 30000
    cos, sin = rope.rope_cos_sin(far, 10, 1e4, torch.float64)
    # (a 3e4-radian angle carries ~3e-12 of float64 rounding)
    torch.testing.assert_close(rope.apply_rope(x, cos, sin), _rotated_pairs(x, far, 1e4), rtol=0, atol=1e-10)
    cos, sin = rope.rope_cos_sin(pos, 10, 1e4, torch.float32)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(rope.apply_rope(x.float(), cos, sin).double(), want, rtol=1e-5, atol=1e-5)


def _grads(x, pos):
    x = x.clone().requires_grad_(True)
    cos, sin = rope.rope_cos_sin(pos, x.shape[-1], 1e4, x.dtype)
    out = rope.apply_rope(x, cos, sin)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    (gx,) = torch.autograd.grad(out, x, cot)
    return out, gx


def test_compiled_rope_equals_eager(monkeypatch):
    """The compiled path traces as one graph (aot_eager here: what inductor fuses on CUDA) and
    gives the eager output and gradient."""
    x, pos = _inputs()
    want = _grads(x, pos)
    calls = []
    compiled = torch.compile(rope._rope, backend="aot_eager", fullgraph=True)

    def counted(*args):
        calls.append(1)
        return compiled(*args)

    monkeypatch.setattr(rope, "_use_compiled", lambda x: True)
    monkeypatch.setattr(rope, "_compiled_rope", lambda: counted)
    got = _grads(x, pos)
    assert calls
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rope_compiles_only_in_cuda_training():
    x, _ = _inputs()
    assert not rope._use_compiled(x)
    if torch.cuda.is_available():
        xc = x.cuda()
        assert rope._use_compiled(xc)
        with torch.no_grad():
            assert not rope._use_compiled(xc)


@pytest.mark.gpu
def test_rope_on_cuda_matches_cpu_float64():
    """Compiled on CUDA (float32, training) against the float64 CPU rotation."""
    x, pos = _inputs()
    want = _grads(x, pos)
    xc, posc = x.cuda().float(), pos.cuda()
    assert rope._use_compiled(xc)
    got = _grads(xc, posc)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-5, atol=1e-5)

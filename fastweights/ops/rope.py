"""Rotary position embedding (RoPE), half-split layout as in Qwen3."""

from __future__ import annotations

import functools

import torch

__all__ = ["apply_rope", "rope_cos_sin"]


def rope_cos_sin(position_ids: torch.Tensor, dim: int, base: float, dtype: torch.dtype):
    """cos, sin (B, N, dim) for positions (B, N) (half-split layout, as Qwen3); dim even. The
    angles are computed in float32, or in float64 for a float64 ``dtype`` (float32 angles are
    off by up to 1e-3 at position 30k)."""
    if dim % 2 or dim < 2:
        raise ValueError(f"RoPE needs an even width >= 2, got dim {dim}")
    acc = torch.promote_types(dtype, torch.float32)
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=acc) / dim))
    ang = position_ids.to(acc).unsqueeze(-1) * inv
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, dim) rotated with cos, sin (B, 1, N, dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@functools.cache
def _compiled_rope():
    return torch.compile(_rope, fullgraph=True)


def _use_compiled(x: torch.Tensor) -> bool:
    """Compile the rotation in CUDA training (grad enabled), outside another compiled region."""
    return x.is_cuda and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, N, dim) with cos, sin (B, N, dim). In CUDA training the rotation runs
    compiled: one fused kernel forward and one backward, where eager runs six on the
    attention's transposed q and k (docs/benchmarks.md, seventeenth measurement).
    ``TORCH_COMPILE_DISABLE=1`` keeps it eager."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (_compiled_rope() if _use_compiled(x) else _rope)(x, cos, sin)

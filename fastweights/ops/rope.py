"""Rotary position embedding (RoPE), half-split layout as in Qwen3."""

from __future__ import annotations

import torch

__all__ = ["apply_rope", "rope_cos_sin"]


def rope_cos_sin(position_ids: torch.Tensor, dim: int, base: float, dtype: torch.dtype):
    """cos, sin (B, N, dim) for positions (B, N) (half-split layout, as Qwen3)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim))
    ang = position_ids.float().unsqueeze(-1) * inv
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, N, dim) with cos, sin (B, N, dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)

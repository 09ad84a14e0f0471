"""Re-rotating keys that were stored already rotated (RoPE, rotate-half convention).

A key rotated at position p, rotated again by d, equals the key rotated at p + d: RoPE is a
rotation by angle ``pos * inv_freq`` in each 2-D plane, and rotations compose. So moving a stored
key to a virtual position needs only the delta, never the unrotated key. This holds for every
rope type that is a pure rotation (default, linear, llama3, ...); scaled variants keep their
scale, which the stored key already carries.
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate(k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate keys ``k[..., n, D]`` by ``delta[..., n]`` positions (fp32 angles)."""
    ang = delta.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # [..., n, D/2]
    cos = torch.cat((ang.cos(), ang.cos()), dim=-1)
    sin = torch.cat((ang.sin(), ang.sin()), dim=-1)
    kf = k.to(torch.float32)
    return (kf * cos + rotate_half(kf) * sin).to(k.dtype)

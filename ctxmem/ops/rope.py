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


def rerotate_blocks_(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """In place: rotate ``x[..., u, n, D]`` (u groups of n keys) by ``delta[u]`` positions, one per group.

    The same arithmetic as ``rerotate`` (fp32 angles and products), but cos/sin are computed once
    per group instead of once per key, and no temporary concatenations are made.
    """
    half = x.shape[-1] // 2
    ang = delta.to(torch.float32)[:, None] * inv_freq.to(torch.float32)  # [u, D/2]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]  # [u, 1, D/2]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    lo = x1 * c - x2 * s
    hi = x2 * c + x1 * s
    x[..., :half] = lo.to(x.dtype)
    x[..., half:] = hi.to(x.dtype)

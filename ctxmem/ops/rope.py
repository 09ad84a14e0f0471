"""Re-rotating keys that were stored already rotated (RoPE, rotate-half convention).

A key rotated at position p, rotated again by d, equals the key rotated at p + d: RoPE is a
rotation by angle ``pos * inv_freq`` in each 2-D plane, and rotations compose. So moving a stored
key to a virtual position needs only the delta, never the unrotated key. This holds for every
rope type that is a pure rotation (default, linear, llama3, yarn, ...); scaled variants keep their
scale (yarn's attention factor multiplies cos and sin), which the stored key already carries.

Partial rotary (phi3 with ``partial_rotary_factor < 1``, ...): ``inv_freq`` has ``R/2`` entries for
``R < D`` rotated dimensions; the model rotates ``k[..., :R]`` (rotate-half within those ``R``) and
passes ``k[..., R:]`` through. Re-rotation does the same: the rotated width is always
``2 * len(inv_freq)``, read from ``inv_freq`` itself, so no backend needs another parameter.
"""
from __future__ import annotations

import torch


def rotary_dim(inv_freq: torch.Tensor, head_dim: int) -> int:
    """How many leading dimensions of a head are rotated (``2 * len(inv_freq)``), checked against ``head_dim``."""
    r = 2 * int(inv_freq.shape[-1])
    if r > head_dim or r == 0:
        raise ValueError(f"ctxmem: inv_freq has {inv_freq.shape[-1]} frequencies, which rotate {r} dimensions; "
                         f"a head has {head_dim} (need 0 < 2 * len(inv_freq) <= head_dim)")
    return r


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate(k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate keys ``k[..., n, D]`` by ``delta[..., n]`` positions (fp32 angles); only the first
    ``2 * len(inv_freq)`` dimensions turn (partial rotary), the rest are returned unchanged."""
    D = k.shape[-1]
    r = rotary_dim(inv_freq, D)
    ang = delta.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # [..., n, r/2]
    cos = torch.cat((ang.cos(), ang.cos()), dim=-1)
    sin = torch.cat((ang.sin(), ang.sin()), dim=-1)
    kf = k.to(torch.float32)
    if r == D:
        return (kf * cos + rotate_half(kf) * sin).to(k.dtype)
    kr = kf[..., :r]
    return torch.cat(((kr * cos + rotate_half(kr) * sin), kf[..., r:]), dim=-1).to(k.dtype)


def rerotate_blocks_(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """In place: rotate ``x[..., u, n, D]`` (u groups of n keys) by ``delta[u]`` positions, one per group.

    The same arithmetic as ``rerotate`` (fp32 angles and products), but cos/sin are computed once
    per group instead of once per key, and no temporary concatenations are made. Partial rotary:
    only ``x[..., :2 * len(inv_freq)]`` changes.
    """
    half = rotary_dim(inv_freq, x.shape[-1]) // 2
    ang = delta.to(torch.float32)[:, None] * inv_freq.to(torch.float32)  # [u, r/2]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]  # [u, 1, r/2]
    xf = x[..., : 2 * half].float()
    x1, x2 = xf[..., :half], xf[..., half:]
    lo = x1 * c - x2 * s
    hi = x2 * c + x1 * s
    x[..., :half] = lo.to(x.dtype)
    x[..., half: 2 * half] = hi.to(x.dtype)

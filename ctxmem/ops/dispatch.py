"""Backend registry for the fused retrieval-attention op (xformers-style dispatch).

Each backend says whether it can run a given call and, if not, why. ``auto`` walks the
priority list and takes the first that can; an explicit name either runs or raises with the
backend's reason.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .reference import retrieval_attention_ref


@dataclass
class Backend:
    name: str
    fn: Callable
    # returns None when the backend can run on these tensors, else a human-readable reason
    unsupported: Callable[[torch.Tensor], str | None]


def _torch_unsupported(q: torch.Tensor) -> str | None:
    return None


_BACKENDS: dict[str, Backend] = {"torch": Backend("torch", retrieval_attention_ref, _torch_unsupported)}
# auto tries these in order; "torch" last, always able.
_PRIORITY = ["cuda", "numba", "torch"]


def register_backend(name: str, fn: Callable, unsupported: Callable[[torch.Tensor], str | None]) -> None:
    _BACKENDS[name] = Backend(name, fn, unsupported)


def available_backends() -> list[str]:
    return [n for n in _PRIORITY if n in _BACKENDS] + [n for n in _BACKENDS if n not in _PRIORITY]


_warned_grad: set[str] = set()


def _needs_grad(q: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and q.requires_grad


def pick_backend(name: str, q: torch.Tensor) -> Backend:
    # Only the reference has a backward (the kernels write their output through numpy / a raw
    # pointer, so autograd would see a constant): under autograd every name runs the reference.
    if _needs_grad(q):
        if name not in ("auto", "torch") and name not in _warned_grad:
            _warned_grad.add(name)
            warnings.warn(f"ctxmem backend {name!r} has no backward: under autograd the op runs the torch "
                          "reference (wrap the call in torch.no_grad() to use the kernel)", stacklevel=2)
        return _BACKENDS["torch"]
    if name == "auto":
        for cand in _PRIORITY:
            be = _BACKENDS.get(cand)
            if be is not None and be.unsupported(q) is None:
                return be
        raise RuntimeError("no retrieval-attention backend can run on these tensors")  # unreachable: torch
    be = _BACKENDS.get(name)
    if be is None:
        raise ValueError(f"unknown ctxmem backend {name!r}; available: {available_backends()}")
    why = be.unsupported(q)
    if why is not None:
        raise RuntimeError(f"ctxmem backend {name!r} cannot run here: {why}")
    return be


def retrieval_attention(q, k, v, reps, lengths, n_new, params, inv_freq, bias=None, backend: str = "auto"):
    """The fused op: see ``reference.py`` for the contract every backend implements."""
    return pick_backend(backend, q).fn(q, k, v, reps, lengths, n_new, params, inv_freq, bias)

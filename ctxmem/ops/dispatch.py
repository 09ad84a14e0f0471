"""Backend registry for the fused retrieval-attention op (xformers-style dispatch).

Each backend states, for a whole call (``OpCall``: every tensor and parameter), every reason it
cannot run it. ``auto`` walks the priority list and takes the first with no reason; an explicit name
either runs or raises with all of its reasons (unless the backend allows a fallback, e.g. the CUDA
backend with ``CTXMEM_CUDA_FALLBACK=1``: then ``auto``'s choice runs, with a one-time warning). A
backend may hand prefill chunks (``C > 1``) to another (``prefill=``): the CUDA kernels are
decode-only and give prefill chunks to ``batched``. Every decision is the dispatcher's, and
``retrieval_attention(..., report=True)`` says which backend ran.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .reference import retrieval_attention_ref


@dataclass
class OpCall:
    """One call of the op (see ``reference.py`` for the contract)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    reps: torch.Tensor
    lengths: torch.Tensor
    n_new: torch.Tensor
    params: object
    inv_freq: torch.Tensor
    bias: torch.Tensor | None = None

    def args(self):
        return (self.q, self.k, self.v, self.reps, self.lengths, self.n_new, self.params, self.inv_freq, self.bias)


def _no_reasons(call: OpCall) -> list[str]:
    return []


def rotary_width(call: OpCall) -> int | None:
    """Rotated dimensions per head (``2 * len(inv_freq)``), or None when the call does not say."""
    inv = call.inv_freq
    if not isinstance(inv, torch.Tensor) or inv.dim() != 1:
        return None
    return 2 * int(inv.shape[0])


def option_reasons(call: OpCall, backend: str, *, softcap: bool = False, window: bool = False,
                   partial_rotary: bool = False) -> list[str]:
    """The per-layer options (``layout.OpParams``, partial rotary) that ``backend`` does not implement
    for ``call``: one reason each, naming the option and who can run it. The keyword arguments say
    which options the backend does implement."""
    p = call.params
    why = []
    if p is None:  # a call known only by its queries (``Backend.unsupported``)
        return why
    others = "the 'batched' and 'torch' backends do"
    if getattr(p, "softcap", None) is not None and not softcap:
        why.append(f"the {backend} backend has no attention logit soft-capping (softcap={p.softcap}, gemma2); {others}")
    if getattr(p, "window", None) is not None and not window:
        why.append(f"the {backend} backend has no sliding-window layers (window={p.window}, gemma2/gemma3/mistral "
                   f"sliding layers); {others}")
    r = rotary_width(call)
    if r is not None and r < call.q.shape[-1] and not partial_rotary:
        why.append(f"the {backend} backend re-rotates whole heads; this model rotates {r} of {call.q.shape[-1]} "
                   f"dims (partial rotary, phi3); {others}")
    return why


@dataclass
class Backend:
    name: str
    fn: Callable
    # every reason this backend cannot run the call (empty: it can)
    reasons: Callable[[OpCall], list[str]] = _no_reasons
    prefill: str | None = None  # the backend that runs this one's prefill chunks (C > 1), if another
    fallback_ok: Callable[[], bool] = lambda: False  # an explicit name may fall back to auto when unable

    def unsupported(self, q: torch.Tensor) -> str | None:
        """The first reason for a call with these queries (shape, dtype and device only)."""
        r = self.reasons(OpCall(q, q, q, q, q, q, None, q))
        return r[0] if r else None


_BACKENDS: dict[str, Backend] = {"torch": Backend("torch", retrieval_attention_ref)}
# auto tries these in order; "torch" last, always able.
_PRIORITY = ["cuda", "numba", "batched", "torch"]


def register_backend(name: str, fn: Callable, reasons: Callable[[OpCall], list[str]] | None = None, *,
                     prefill: str | None = None, fallback_ok: Callable[[], bool] | None = None) -> None:
    """Add a backend: ``fn`` implements the contract, ``reasons(call)`` lists why it cannot run a call."""
    _BACKENDS[name] = Backend(name, fn, reasons or _no_reasons, prefill, fallback_ok or (lambda: False))


def available_backends() -> list[str]:
    return [n for n in _PRIORITY if n in _BACKENDS] + [n for n in _BACKENDS if n not in _PRIORITY]


_warned: set = set()


def _warn_once(key, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=4)


def _needs_grad(q: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and q.requires_grad


def explain(call: OpCall) -> dict[str, list[str]]:
    """Every registered backend's reasons for not running ``call`` (empty list: it can)."""
    return {name: _BACKENDS[name].reasons(call) for name in available_backends()}


def _auto(call: OpCall) -> Backend:
    for cand in _PRIORITY:
        be = _BACKENDS.get(cand)
        if be is not None and not be.reasons(call):
            return be
    raise RuntimeError("no retrieval-attention backend can run on these tensors")  # unreachable: torch


def choose(name: str, call: OpCall) -> Backend:
    """The backend that runs ``call`` when ``name`` ("auto" or a backend) is asked for."""
    # Only the reference has a backward (the kernels write their output through numpy / a raw
    # pointer, so autograd would see a constant): under autograd every name runs the reference.
    if _needs_grad(call.q):
        if name not in ("auto", "torch"):
            _warn_once(("grad", name), f"ctxmem backend {name!r} has no backward: under autograd the op runs the "
                       "torch reference (wrap the call in torch.no_grad() to use the kernel)")
        return _BACKENDS["torch"]
    if name == "auto":
        be = _auto(call)
    else:
        be = _BACKENDS.get(name)
        if be is None:
            raise ValueError(f"unknown ctxmem backend {name!r}; available: {available_backends()}")
        why = be.reasons(call)
        if why:
            if not be.fallback_ok():
                raise RuntimeError(f"ctxmem backend {name!r} cannot run here: {'; '.join(why)}")
            be = _auto(call)
            _warn_once(("fallback", name, tuple(why)),
                       f"ctxmem backend {name!r} cannot run here ({'; '.join(why)}); running {be.name!r} instead")
    if call.q.shape[2] > 1 and be.prefill is not None:
        be = _BACKENDS[be.prefill]
    return be


def pick_backend(name: str, q: torch.Tensor) -> Backend:
    """``choose`` for a call known only by its queries (shape, dtype, device)."""
    return choose(name, OpCall(q, q, q, q, q, q, None, q))


def retrieval_attention(q, k, v, reps, lengths, n_new, params, inv_freq, bias=None, backend: str = "auto",
                        report: bool = False):
    """The fused op: see ``reference.py`` for the contract every backend implements.

    ``report=True`` also returns the name of the backend that ran: ``(out, selected, name)``.
    """
    call = OpCall(q, k, v, reps, lengths, n_new, params, inv_freq, bias)
    be = choose(backend, call)
    out, selected = be.fn(*call.args())
    return (out, selected, be.name) if report else (out, selected)

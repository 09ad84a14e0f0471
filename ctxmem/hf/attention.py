"""The "ctxmem" attention implementation registered with transformers.

The modeling code computes q/k/v and RoPE as usual, hands k/v to the cache (our
``MemoryCache`` stores them) and then calls the registered attention function, a thin adapter
(like transformers' own ``sdpa_attention.py``): ``MemoryCache.attend`` runs the fused
retrieval-attention op over the layer's store. Outside a ctxmem forward (no active memory) both
the attention and the mask functions fall back to stock sdpa, so a wrapped model is never wrong.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


NAME = "ctxmem"
_ACTIVE: ContextVar = ContextVar("ctxmem_active_memory", default=None)


@contextmanager
def active_memory(cache):
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def ctxmem_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    cache = _ACTIVE.get()
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return cache.attend(module.layer_idx, query, scaling), None


def ctxmem_mask(*args, **kwargs):
    # Inside a ctxmem forward the op does its own causal masking from the stored lengths: no
    # O(chunk x context) mask is ever built.
    if _ACTIVE.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    AttentionInterface.register(NAME, ctxmem_attention)
    AttentionMaskInterface.register(NAME, ctxmem_mask)

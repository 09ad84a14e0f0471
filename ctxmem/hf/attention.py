"""The "ctxmem" attention implementation registered with transformers.

The modeling code computes q/k/v and RoPE as usual, hands k/v to the cache (our
``MemoryCache`` stores them) and then calls the registered attention function, a thin adapter
(like transformers' own ``sdpa_attention.py``): ``MemoryCache.attend`` runs the fused
retrieval-attention op over the layer's store. What the module passes beside q/k/v is honoured, not
dropped: ``scaling`` (granite's attention multiplier, gemma's query_pre_attn_scalar), ``softcap``
(gemma2's logit soft-capping) and ``sliding_window`` (a sliding layer: exact window attention, no
retrieval; gemma2/gemma3, mistral and qwen2/qwen3 sliding layers). Outside a ctxmem forward (no active memory) both
the attention and the mask functions fall back to stock sdpa, so a wrapped model is never wrong.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
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


def _softcap_attention(module, query, key, value, attention_mask, dropout, scaling, softcap):
    """Eager attention with logit soft-capping, for calls outside a ctxmem forward (the mask is what
    ``sdpa_mask`` gives: boolean, or None where plain causal masking of a square block suffices)."""
    g = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, g), repeat_kv(value, g)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    w = torch.tanh(w / softcap) * softcap
    mask = attention_mask
    if mask is None and query.shape[2] > 1:
        mask = torch.ones(query.shape[2], k.shape[2], dtype=torch.bool, device=query.device).tril()
    if mask is not None:
        mask = mask[..., : k.shape[2]]
        # the dtype's min, not -inf: a fully masked (padding) row stays finite, as in the eager path
        w = w.masked_fill(~mask, torch.finfo(w.dtype).min) if mask.dtype == torch.bool else w + mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


# Layers whose keys carry no RoPE (NoPE), by family: moving such a key is the identity, so the op gets
# zero frequencies for them. Everything else is rotated (what ctxmem.wrap checks per family).
NOPE_LAYER = {
    "smollm3": lambda m: not m.use_rope,  # config.no_rope_layers
    "exaone4": lambda m: m.sliding_window is not None and not m.is_sliding,  # global layers of a hybrid model
}


def layer_rotates_keys(module) -> bool:
    """False for a NoPE attention layer (see ``NOPE_LAYER``)."""
    rule = NOPE_LAYER.get(getattr(getattr(module, "config", None), "model_type", None))
    return rule is None or not rule(module)


def ctxmem_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     sliding_window=None, softcap=None, **kwargs):
    cache = _ACTIVE.get()
    if cache is None:
        if softcap is not None:  # sdpa has no soft-capping: the eager softmax (gemma2's own default)
            return _softcap_attention(module, query, key, value, attention_mask, dropout, scaling, softcap)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return cache.attend(module.layer_idx, query, scaling, window=sliding_window, softcap=softcap,
                        rope=layer_rotates_keys(module)), None


def ctxmem_mask(*args, **kwargs):
    # Inside a ctxmem forward the op does its own causal masking from the stored lengths: no
    # O(chunk x context) mask is ever built.
    if _ACTIVE.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    AttentionInterface.register(NAME, ctxmem_attention)
    AttentionMaskInterface.register(NAME, ctxmem_mask)

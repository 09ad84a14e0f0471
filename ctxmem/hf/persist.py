"""Save a wrapped model's working memory and load it back: read once, answer many times.

The on-disk format and its checks live in ``ctxmem.memory.persist`` (storage only); this module
adds the model: its fingerprint (what a memory must have been made by) and its wrap state (the
config, the last memory read).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..memory.persist import load_store, save_store
from .cache import MemoryCache


def model_fingerprint(model) -> dict:
    """Shapes plus a digest of the embedding matrix and the last layer's key projection: two
    checkpoints of one architecture differ here, so a fine-tuned model cannot read another's memory."""
    mc = model.config
    h = hashlib.sha256()
    attn = model.model.layers[-1].self_attn
    kproj = attn.k_proj if hasattr(attn, "k_proj") else getattr(attn, "qkv_proj", None)  # phi3: fused q/k/v
    kw = kproj.weight if kproj is not None else next(attn.parameters())
    for w in (model.get_input_embeddings().weight, kw):
        h.update(w.detach().float().cpu().contiguous().numpy().astype("<f4", copy=False).data)
    return {"model_type": mc.model_type, "num_layers": int(mc.num_hidden_layers),
            "kv_heads": int(mc.num_key_value_heads), "head_dim": int(getattr(mc, "head_dim", None) or
                                                                    mc.hidden_size // mc.num_attention_heads),
            "vocab_size": int(mc.vocab_size), "weights_sha256": h.hexdigest()}


def _state(model, what: str):
    state = getattr(model, "_ctxmem", None)
    if state is None:
        raise ValueError(f"ctxmem.{what}: the model is not wrapped (ctxmem.wrap(model) first)")
    return state


def save_memory(model, path: str | os.PathLike, memory: MemoryCache | None = None, *, meta: dict | None = None) -> Path:
    """Write ``memory`` (default: the last memory the wrapped ``model`` read) to folder ``path``.

    ``meta``: small msgpack-able facts to keep beside it (``ctxmem ask`` stores its source's hash).
    """
    state = _state(model, "save_memory")
    memory = memory if memory is not None else state.last_memory
    if memory is None:
        raise ValueError("ctxmem.save_memory: nothing to save (the model has not read anything yet)")
    return save_store(memory, path, model_fingerprint(model), meta=meta)


def load_memory(model, path: str | os.PathLike) -> MemoryCache:
    """Read a memory folder into a fresh ``MemoryCache`` for the wrapped ``model``.

    Pass it to ``generate(all_ids, cache=memory)`` with the saved tokens followed by new
    ones. The model must be the one that made the memory, and its ``MemoryConfig`` must share the
    block layout (``LAYOUT_FIELDS``); topk, selector, backend and the RAM budget may differ.
    """
    from .state import new_cache

    state = _state(model, "load_memory")
    memory = load_store(new_cache(model), path, model_fingerprint(model))
    state.last_memory = memory
    return memory

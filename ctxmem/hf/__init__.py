"""Hugging Face face of ctxmem: adapts transformers models to the storage tier (``ctxmem.memory``).

``wrap``/``unwrap`` (``wrap.py``), the wrapped forward (``forward.py``), the working memory as a
transformers ``Cache`` that owns the op call (``cache.py``), the attention function registered with
transformers (``attention.py``), and saving/loading a model's memory (``persist.py``).
"""
from .cache import MemoryCache
from .persist import load_memory, model_fingerprint, save_memory
from .state import new_cache
from .wrap import SUPPORTED_FAMILIES, read_context, read_knowledge, read_memory, unwrap, wrap

__all__ = ["wrap", "unwrap", "new_cache", "read_memory", "read_knowledge", "read_context", "SUPPORTED_FAMILIES",
           "MemoryCache", "save_memory", "load_memory", "model_fingerprint"]

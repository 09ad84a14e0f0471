"""ctxmem: a context-compression memory layer for Hugging Face causal LMs.

    model, tok = ctxmem.load_model("smollm2")
    model = ctxmem.wrap(model, ctxmem.MemoryConfig())
    out = model.generate(input_ids, max_new_tokens=32)   # any context length
    ctxmem.unwrap(model)
"""
from .config import MemoryConfig
from .hf import new_cache, unwrap, wrap
from .models import load_embedder, load_model

__version__ = "0.1.0"

__all__ = ["MemoryConfig", "wrap", "unwrap", "new_cache", "load_model", "load_embedder", "__version__"]

"""ctxmem: a context-compression memory layer for Hugging Face causal LMs.

    model, tok = ctxmem.load_model("smollm2")
    model = ctxmem.wrap(model, ctxmem.MemoryConfig())
    out = model.generate(input_ids, max_new_tokens=32)   # any context length
    ctxmem.unwrap(model)

    kb = ctxmem.KnowledgeIndex.build(["docs/"], "kb/")
    hits = ctxmem.KnowledgeIndex.open("kb/").search("a question", k=5)

Names are imported on first use, so `ctxmem index info` does not pay for torch + transformers.
"""
from importlib import import_module

from .config import MemoryConfig

__version__ = "0.1.0"

_LAZY = {
    "wrap": ".hf", "unwrap": ".hf", "new_cache": ".hf",
    "load_model": ".models", "load_embedder": ".models",
    "KnowledgeIndex": ".index", "Hit": ".index",
    "save_memory": ".hf", "load_memory": ".hf",
    "read_memory": ".hf", "read_knowledge": ".hf", "read_context": ".hf",
    "Compressor": ".compress",
    "memory": ".memory", "ops": ".ops", "index": ".index", "hf": ".hf",
}

__all__ = ["MemoryConfig", "__version__", *_LAZY]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ctxmem' has no attribute {name!r}")
    module = import_module(mod, __name__)
    value = module if name in ("memory", "ops", "index", "hf") else getattr(module, name)
    globals()[name] = value
    return value

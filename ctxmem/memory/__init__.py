"""Working memory's storage: KV blocks per layer, the cold tier, the block-text index, save/load.

Plain torch, numpy and the on-disk format: nothing here imports transformers or knows a model
(``ctxmem.hf`` adapts models to it: ``MemoryCache``, ``save_memory``, ``load_memory``).
"""
from .block_store import BlockStoreLayer
from .persist import MemoryFormatError, MemoryMismatchError, load_store, read_manifest, save_store
from .store import BlockStore
from .text_index import BlockTextIndex
from .tiered import TieredStoreLayer

__all__ = ["BlockStore", "BlockStoreLayer", "TieredStoreLayer", "BlockTextIndex", "save_store", "load_store",
           "read_manifest", "MemoryFormatError", "MemoryMismatchError"]

"""Working memory: the block store (a transformers Cache) and its text-embedding index."""
from .block_store import BlockMemoryLayer, MemoryCache
from .text_index import BlockTextIndex

__all__ = ["MemoryCache", "BlockMemoryLayer", "BlockTextIndex"]

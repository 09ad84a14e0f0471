"""Working memory: the block store (a transformers Cache), its cold tier, its text index, save/load."""
from .block_store import BlockMemoryLayer, MemoryCache
from .persist import MemoryFormatError, MemoryMismatchError, load_memory, save_memory
from .text_index import BlockTextIndex

__all__ = ["MemoryCache", "BlockMemoryLayer", "BlockTextIndex", "save_memory", "load_memory",
           "MemoryFormatError", "MemoryMismatchError"]

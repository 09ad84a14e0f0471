"""Hugging Face integration: attention registration, wrap/unwrap."""
from .wrap import SUPPORTED_FAMILIES, new_cache, read_context, read_knowledge, read_memory, unwrap, wrap

__all__ = ["wrap", "unwrap", "new_cache", "read_memory", "read_knowledge", "read_context", "SUPPORTED_FAMILIES"]

"""Hugging Face integration: attention registration, wrap/unwrap."""
from .wrap import SUPPORTED_FAMILIES, new_cache, unwrap, wrap

__all__ = ["wrap", "unwrap", "new_cache", "SUPPORTED_FAMILIES"]

"""What ``wrap`` keeps on a model (``model._ctxmem``), and a fresh working memory for it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import MemoryConfig
from .cache import MemoryCache, rope_inv_freq, sliding_layers


@dataclass
class WrapState:
    cfg: MemoryConfig
    orig_attn: str
    tokenizer: Any = None
    embedder: Any = None
    knowledge: Any = None
    knowledge_budget: int = 1024
    progress: bool = False
    last_memory: Any = None  # the MemoryCache of the latest forward (what save_memory saves by default)
    compressor: Any = None  # a ctxmem.Compressor: knowledge hits are read as its summary tokens
    owns_compressor: bool = False  # loaded by wrap from a name: its adapter is removed at unwrap
    forward: Any = None  # the ChunkedForward that replaced model.forward
    reader: Any = None  # a ctxmem Reader: its adapter is on for question chunks and decode steps only
    owns_reader: bool = False


def new_cache(model) -> MemoryCache:
    """A fresh working memory for a wrapped model (``generate`` makes one by itself)."""
    state = model._ctxmem
    return MemoryCache(model.config.num_hidden_layers, state.cfg, rope_inv_freq(model),
                       tokenizer=state.tokenizer, embedder=state.embedder, window_layers=sliding_layers(model.config))

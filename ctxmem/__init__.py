"""ctxmem: a context-compression memory layer for Hugging Face causal LMs."""
from .models import load_embedder, load_model

__version__ = "0.1.0"

__all__ = ["load_model", "load_embedder", "__version__"]

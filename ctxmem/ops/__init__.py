"""The fused retrieval-attention op: score blocks, pick top-k per KV head, attend in one softmax.

``reference.py`` is the plain-torch ground truth; ``dispatch.py`` picks a backend.
"""
from .dispatch import OpCall, available_backends, explain, register_backend, retrieval_attention
from .layout import OpParams, middle_blocks, row_layout
from .reference import block_scores_ref, retrieval_attention_ref, select_topk

__all__ = [
    "OpParams", "row_layout", "middle_blocks", "retrieval_attention", "retrieval_attention_ref",
    "block_scores_ref", "select_topk", "register_backend", "available_backends", "OpCall", "explain",
    "retrieval_attention_batched",
]

# "batched": the reference's contract vectorised over rows and heads (any device; the CUDA backend's
# prefill path). Explicit only: on the CPU the numba kernel is faster, on a GPU "cuda" uses it.
from .batched import retrieval_attention_batched  # noqa: E402

register_backend("batched", retrieval_attention_batched)

# Fast backends register themselves with the dispatcher on import; each is optional.
try:
    from . import numba_kernels  # noqa: F401  (backend "numba", CPU)
except ImportError:  # numba missing: "auto" falls back to the reference on CPU
    pass
try:
    from . import cuda  # noqa: F401  (backend "cuda"; the extension itself loads lazily)
except ImportError:
    pass

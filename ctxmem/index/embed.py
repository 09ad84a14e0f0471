"""Embedders for the knowledge index.

``embedder=`` accepts

* a name or path: ``"minilm"`` (the bundled all-MiniLM-L6-v2, the default), any
  sentence-transformers id or local folder (loaded through :func:`ctxmem.load_embedder`, on
  the GPU when torch sees one), or ``"hash"`` / ``"hash:DIM"`` for :class:`HashingEmbedder`;
* an object (the public hook): anything with ``.encode(list[str]) -> array (n, dim)`` and a
  string ``.ctxmem_name`` (recorded in the KB so that it can be loaded again by that name).
  Optional: ``.tokenizer`` (a Hugging Face fast tokenizer; chunking then counts its tokens,
  otherwise words and punctuation), ``.max_seq_length`` (chunks must fit). A
  ``SentenceTransformer`` from :func:`ctxmem.load_embedder` qualifies.

Vectors are L2-normalised by ctxmem, so inner product is cosine similarity. The KB records the
embedder's name, dimension and its vector for a fixed probe sentence; a different embedder
(other dimension, or a probe vector with cosine < 0.99) is refused with
:class:`EmbedderMismatchError`.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import weakref
import zlib
from contextlib import contextmanager

import numpy as np

from .errors import BadInputError, EmbedderMismatchError, KnowledgeIndexError

PROBE_TEXT = "ctxmem embedder probe: the quick brown fox jumps over the lazy dog, 1234."
PROBE_MIN_COSINE = 0.99
_HASH_RE = re.compile(r"^hash(?::(\d+))?$")
_WORDS = re.compile(r"\w+")


class HashingEmbedder:
    """A tiny deterministic lexical embedder (feature hashing of words and word pairs).

    No model, no weights, microseconds per text: for tests, smoke runs and machines without
    any sentence-transformers model. Its "semantics" are word overlap only.
    """

    def __init__(self, dim: int = 256):
        if dim < 2:
            raise BadInputError("HashingEmbedder needs dim >= 2")
        self.dim = int(dim)
        self.ctxmem_name = f"hash:{self.dim}"

    def encode(self, texts, **_) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            words = _WORDS.findall(t.lower())
            feats = words + [a + " " + b for a, b in zip(words, words[1:])]
            for f in feats:
                h = zlib.crc32(f.encode("utf-8"))
                out[i, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


def _is_sentence_transformer(obj) -> bool:
    st = sys.modules.get("sentence_transformers")
    return st is not None and isinstance(obj, st.SentenceTransformer)


def load(spec):
    """Resolve ``embedder=`` (name, path or object) to an embedder object."""
    if spec is None:
        spec = "minilm"
    if not isinstance(spec, str):
        if not callable(getattr(spec, "encode", None)):
            raise BadInputError("an embedder object needs an .encode(list[str]) method")
        if not isinstance(getattr(spec, "ctxmem_name", None), str):
            raise BadInputError("an embedder object needs a string .ctxmem_name (the name recorded in the KB); "
                                "or pass the embedder by name")
        return spec
    m = _HASH_RE.match(spec)
    if m:
        return HashingEmbedder(int(m.group(1) or 256))
    from ..models import load_embedder

    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        device = "cpu"
    try:
        return load_embedder(spec, device=device)
    except Exception as e:
        raise KnowledgeIndexError(f"cannot load embedder {spec!r}: {type(e).__name__}: {e}") from None


def name_of(emb) -> str:
    return str(getattr(emb, "ctxmem_name", None) or "unknown")


def tokenizer_of(emb):
    return getattr(emb, "tokenizer", None)


def max_tokens(emb) -> int | None:
    n = getattr(emb, "max_seq_length", None)
    if isinstance(n, int) and n > 0:
        return n - 2 if tokenizer_of(emb) is not None else n
    return None


_torch_threads_lock = threading.Lock()


def query_threads() -> int:
    """torch threads for embedding a few short texts (env ``CTXMEM_QUERY_THREADS``, default 1; 0 =
    leave torch's setting). A query's matrices are tiny: more threads add synchronisation, and
    on a busy machine each parallel op can wait a whole scheduler slice for a descheduled
    worker (measured on 2 shared cores: 13 ms on one thread, 480 ms on two)."""
    try:
        return max(0, int(os.environ.get("CTXMEM_QUERY_THREADS", "1")))
    except ValueError:
        return 1


@contextmanager
def torch_threads(n: int | None):
    torch = sys.modules.get("torch")
    if not n or torch is None:
        yield
        return
    with _torch_threads_lock:
        old = torch.get_num_threads()
        if old == n:
            yield
            return
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(old)


def encode(emb, texts: list[str], batch_size: int = 32, threads: int | None = None) -> np.ndarray:
    """Normalised float32 embeddings, shape (len(texts), dim); ``threads``: torch threads to use."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    if _is_sentence_transformer(emb):
        with torch_threads(threads):
            v = emb.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=False)
    else:
        v = emb.encode(list(texts))
    v = np.asarray(v, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] != len(texts):
        raise KnowledgeIndexError(f"embedder {name_of(emb)!r} returned shape {v.shape} for {len(texts)} texts")
    if not np.isfinite(v).all():
        raise KnowledgeIndexError(f"embedder {name_of(emb)!r} returned non-finite values")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    np.divide(v, norms, out=v, where=norms > 0)
    return v


_PROBES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def probe(emb) -> np.ndarray:
    """The embedder's vector for :data:`PROBE_TEXT` (computed once per embedder object)."""
    try:
        cached = _PROBES.get(emb)
    except TypeError:  # not weak-referenceable / not hashable
        cached = None
    if cached is not None:
        return cached
    p = encode(emb, [PROBE_TEXT], threads=query_threads())[0]
    try:
        _PROBES[emb] = p
    except TypeError:
        pass
    return p


def describe(emb) -> dict:
    p = probe(emb)
    return {"name": name_of(emb), "dim": int(p.shape[0]), "probe": p.astype("<f4").tobytes(),
            "max_tokens": max_tokens(emb)}


def check_same(emb, recorded: dict, where: str) -> None:
    """Raise :class:`EmbedderMismatchError` unless ``emb`` is the recorded embedder."""
    p = probe(emb)
    want = np.frombuffer(recorded["probe"], dtype="<f4")
    if p.shape != want.shape:
        raise EmbedderMismatchError(
            f"{where} was built with embedder {recorded['name']!r} (dim {want.shape[0]}); "
            f"{name_of(emb)!r} gives dim {p.shape[0]}")
    cos = float(np.dot(p, want) / max(1e-12, float(np.linalg.norm(p) * np.linalg.norm(want))))
    if cos < PROBE_MIN_COSINE:
        raise EmbedderMismatchError(
            f"{where} was built with embedder {recorded['name']!r}; {name_of(emb)!r} embeds "
            f"differently (probe cosine {cos:.3f} < {PROBE_MIN_COSINE})")

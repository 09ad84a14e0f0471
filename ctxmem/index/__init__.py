"""The knowledge index: a persistent, resumable FAISS + BM25 index over chunks of a corpus.

Public API::

    KnowledgeIndex.build(sources, out_dir, embedder="minilm", index="auto", chunk_tokens=128,
                         overlap=16, include=None, exclude=None, progress=True) -> KnowledgeIndex
    KnowledgeIndex.open(path, embedder=None)
    kb.search(text, k=5, mode="hybrid") -> list[Hit]   # Hit(text, score, source, start, end)
                                               # mode: hybrid (dense + BM25, rank fusion) | dense | lexical
    kb.add(sources) -> summary dict;  kb.remove(source) -> chunks removed
    KnowledgeIndex.upgrade(path)               # adds the BM25 index to a KB from an older ctxmem
    kb.info() -> dict;  kb.verify() -> report (raises IndexCorruptError naming the file)
    knowledge_context(kb, query, tokenizer, budget_tokens=1024, k=8) -> str

Command line: ``ctxmem index build|query|info|verify|add|remove|upgrade`` (see :mod:`ctxmem.index.cli`).
"""
from .augment import knowledge_context
from .chunking import Chunk, Chunker, WordTokenizer
from .embed import HashingEmbedder
from .errors import (BadInputError, EmbedderMismatchError, IndexCorruptError, IndexIncompleteError,
                     IndexVersionError, KnowledgeIndexError)
from .knowledge import Hit, KnowledgeIndex, kb_info, verify_kb
from .sources import read_source_text

__all__ = [
    "KnowledgeIndex", "Hit", "knowledge_context", "kb_info", "verify_kb", "read_source_text",
    "Chunker", "Chunk", "WordTokenizer", "HashingEmbedder",
    "KnowledgeIndexError", "IndexCorruptError", "IndexVersionError", "EmbedderMismatchError",
    "IndexIncompleteError", "BadInputError",
]

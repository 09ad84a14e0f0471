"""Errors raised by the knowledge index.

Every error a user can meet is a subclass of :class:`KnowledgeIndexError`; the ones about a
file on disk carry that file in ``.path`` and name it in the message.

=========================  ==========================================================
error                      raised when
=========================  ==========================================================
``IndexCorruptError``      a KB file is missing, truncated, or fails its checksum or
                           structure check (``ValueError``)
``IndexVersionError``      the manifest was written by another on-disk format version
                           (``IndexCorruptError``, so one ``except`` catches both)
``EmbedderMismatchError``  a query or an ``add`` uses an embedder other than the one
                           the KB was built with (``ValueError``)
``IndexIncompleteError``   a build or add into the KB was interrupted; running the
                           same command again resumes it (``RuntimeError``)
``BadInputError``          the arguments or sources cannot be indexed: nothing
                           readable, bad chunk sizes, a folder that is not a KB
                           (``ValueError``)
=========================  ==========================================================
"""
from __future__ import annotations

import os


class KnowledgeIndexError(Exception):
    """Base class of every knowledge-index error."""


class IndexCorruptError(KnowledgeIndexError, ValueError):
    """A file of a KB is missing, truncated or corrupt. ``.path`` names it."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class IndexVersionError(IndexCorruptError):
    """The manifest's format version is not one this ctxmem reads."""


class EmbedderMismatchError(KnowledgeIndexError, ValueError):
    """The embedder offered for queries or additions is not the KB's embedder."""


class IndexIncompleteError(KnowledgeIndexError, RuntimeError):
    """The KB's last build/add was interrupted; rerunning it resumes without duplicates."""


class BadInputError(KnowledgeIndexError, ValueError):
    """The sources or arguments cannot be indexed."""

"""The KB manifest: one msgpack file, versioned and checksummed, written last.

File ``manifest.msgpack`` holds a msgpack map::

    {"format": "ctxmem-kb", "version": 1, "sha256": <hex of body>, "body": <bytes>}

(the envelope every ctxmem manifest shares, ``ctxmem/_envelope.py``).

``body`` is itself msgpack: the KB's settings (embedder, chunking, index), its sources with
their content hashes and chunk ranges, its segments, and ``files``: the size and sha256 of
every other file of the KB. The manifest is the commit point: a write session creates new
files under fresh names, renames the new manifest over the old one (temp file, fsync,
rename), and only then deletes files the new manifest no longer names. A reader therefore
always sees one consistent set of files.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .._envelope import EnvelopeError, read_envelope, write_envelope
from .errors import IndexCorruptError, IndexVersionError

FORMAT = "ctxmem-kb"
VERSION = 1
MANIFEST = "manifest.msgpack"


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(bufsize)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def write_manifest(kb_dir: str | os.PathLike, body: dict) -> None:
    write_envelope(Path(kb_dir) / MANIFEST, FORMAT, VERSION, body)


def read_manifest(kb_dir: str | os.PathLike) -> dict:
    """Read and check the manifest; raises :class:`IndexCorruptError` naming the file."""
    path = Path(kb_dir) / MANIFEST
    try:
        version, body = read_envelope(path, FORMAT)
    except EnvelopeError as e:
        if e.kind == "missing":
            raise IndexCorruptError(path, "missing: not a ctxmem KB, or its first build was interrupted "
                                          "before its first commit (run the build again)") from None
        if e.kind == "format":
            raise IndexCorruptError(path, f"not a ctxmem KB manifest (expected format {FORMAT!r})") from None
        raise IndexCorruptError(path, str(e)) from None
    if version != VERSION:
        raise IndexVersionError(path, f"manifest format version {version!r}; this ctxmem reads version "
                                      f"{VERSION} (rebuild the KB with this ctxmem, or use the ctxmem that wrote it)")
    required = ("state", "embedder", "chunking", "sources", "segments", "files", "seq", "next_id")
    if not isinstance(body, dict) or any(k not in body for k in required):
        raise IndexCorruptError(path, "manifest body lacks required fields")
    return body

"""The KB manifest: one msgpack file, versioned and checksummed, written last.

File ``manifest.msgpack`` holds a msgpack map::

    {"format": "ctxmem-kb", "version": 1, "sha256": <hex of body>, "body": <bytes>}

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

import msgpack

from .._atomic import atomic_write_bytes
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


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def write_manifest(kb_dir: str | os.PathLike, body: dict) -> None:
    raw = pack(body)
    atomic_write_bytes(Path(kb_dir) / MANIFEST,
                       pack({"format": FORMAT, "version": VERSION, "sha256": sha256_bytes(raw), "body": raw}))


def read_manifest(kb_dir: str | os.PathLike) -> dict:
    """Read and check the manifest; raises :class:`IndexCorruptError` naming the file."""
    path = Path(kb_dir) / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IndexCorruptError(path, "missing: not a ctxmem KB, or its first build was interrupted "
                                      "before its first commit (run the build again)") from None
    except OSError as e:
        raise IndexCorruptError(path, f"unreadable: {e.strerror or e}") from None
    try:
        outer = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several types on garbage
        raise IndexCorruptError(path, f"not a valid msgpack manifest ({type(e).__name__}: {e})") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise IndexCorruptError(path, f"not a ctxmem KB manifest (expected format {FORMAT!r})")
    version = outer.get("version")
    if version != VERSION:
        raise IndexVersionError(path, f"manifest format version {version!r}; this ctxmem reads version "
                                      f"{VERSION} (rebuild the KB with this ctxmem, or use the ctxmem that wrote it)")
    raw = outer.get("body")
    if not isinstance(raw, bytes) or outer.get("sha256") != sha256_bytes(raw):
        raise IndexCorruptError(path, "checksum mismatch: the manifest is corrupt")
    try:
        body = msgpack.unpackb(raw, raw=False)
    except Exception as e:
        raise IndexCorruptError(path, f"corrupt manifest body ({type(e).__name__})") from None
    required = ("state", "embedder", "chunking", "sources", "segments", "files", "seq", "next_id")
    if not isinstance(body, dict) or any(k not in body for k in required):
        raise IndexCorruptError(path, "manifest body lacks required fields")
    return body

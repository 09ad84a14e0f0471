"""One checksummed envelope for every ctxmem manifest (knowledge-index and memory folders).

A manifest file is a msgpack map ``{"format": str, "version": int, "sha256": hex, "body": bytes}``
whose ``body`` is itself msgpack and whose ``sha256`` is the digest of those bytes. It is written
atomically (temp file, fsync, rename; ``_atomic.py``). ``read_envelope`` checks everything but the
version, which each format judges itself, and raises ``EnvelopeError`` with a ``kind`` so that each
caller can raise its own error naming the file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgpack

from ._atomic import atomic_write_bytes


class EnvelopeError(ValueError):
    """kind: "missing", "unreadable", "garbage" (not msgpack), "format", "checksum" or "body"."""

    def __init__(self, kind: str, msg: str):
        self.kind = kind
        super().__init__(msg)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def write_envelope(path: str | os.PathLike, fmt: str, version: int, body: dict) -> None:
    raw = pack(body)
    atomic_write_bytes(path, pack({"format": fmt, "version": version, "sha256": hashlib.sha256(raw).hexdigest(),
                                   "body": raw}))


def read_outer(path: str | os.PathLike) -> dict:
    """The envelope's outer map, unchecked beyond being a msgpack map."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise EnvelopeError("missing", "missing") from None
    except OSError as e:
        raise EnvelopeError("unreadable", f"unreadable: {e.strerror or e}") from None
    try:
        outer = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several types on garbage
        raise EnvelopeError("garbage", f"not a valid msgpack manifest ({type(e).__name__}: {e})") from None
    if not isinstance(outer, dict):
        raise EnvelopeError("garbage", "not a msgpack map")
    return outer


def unpack_body(raw) -> dict:
    try:
        body = msgpack.unpackb(raw, raw=False)
    except Exception as e:
        raise EnvelopeError("body", f"corrupt manifest body ({type(e).__name__})") from None
    if not isinstance(body, dict):
        raise EnvelopeError("body", "corrupt manifest body (not a map)")
    return body


def read_envelope(path: str | os.PathLike, fmt: str, outer: dict | None = None) -> tuple[int, dict]:
    """``(version, body)`` of the manifest at ``path`` (or of its already read ``outer`` map)."""
    outer = read_outer(path) if outer is None else outer
    if outer.get("format") != fmt:
        raise EnvelopeError("format", f"not a {fmt} manifest")
    raw = outer.get("body")
    if not isinstance(raw, bytes) or outer.get("sha256") != hashlib.sha256(raw).hexdigest():
        raise EnvelopeError("checksum", "checksum mismatch: the manifest is corrupt")
    return outer.get("version"), unpack_body(raw)

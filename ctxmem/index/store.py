"""The chunk store: one file per segment of msgpack records with an offset table.

Layout (little-endian)::

    b"CTXCHNK1"                         8-byte magic
    record 0 .. record n-1              msgpack maps {"source", "start", "end", "text"}
    offsets   uint64[n + 1]             file offset of each record, then of the table
    crc32     uint32[n]                 zlib.crc32 of each record's bytes
    ids       int64[n]                  the chunk id of each record
    footer    uint64 n, uint64 table_pos, uint64 version (1), b"CTXCEND1"

A reader maps the file and reads the footer and tables only; a record is unpacked when it is
asked for, after its crc32 is checked, so a flipped byte is an error that names the file,
never a wrong text. The file as a whole is also checksummed in the manifest.
"""
from __future__ import annotations

import mmap
import os
import struct
import zlib

import msgpack
import numpy as np

from .errors import IndexCorruptError

MAGIC = b"CTXCHNK1"
END_MAGIC = b"CTXCEND1"
_FOOTER = struct.Struct("<QQQ8s")
STORE_VERSION = 1


def encode_store(records: list[dict], ids) -> bytes:
    """The bytes of a chunk store holding ``records`` (dicts) with chunk ``ids``."""
    ids = np.asarray(ids, dtype="<i8")
    if len(ids) != len(records):
        raise ValueError("one id per record")
    packer = msgpack.Packer(use_bin_type=True)
    parts = [MAGIC]
    offsets = np.empty(len(records) + 1, dtype="<u8")
    crcs = np.empty(len(records), dtype="<u4")
    pos = len(MAGIC)
    for i, r in enumerate(records):
        b = packer.pack({"source": r["source"], "start": int(r["start"]), "end": int(r["end"]), "text": r["text"]})
        offsets[i] = pos
        crcs[i] = zlib.crc32(b)
        parts.append(b)
        pos += len(b)
    offsets[-1] = pos
    footer = _FOOTER.pack(len(records), pos, STORE_VERSION, END_MAGIC)
    parts += [offsets.tobytes(), crcs.tobytes(), ids.tobytes(), footer]
    return b"".join(parts)


class ChunkStoreReader:
    """Random access to one chunk store file without loading it whole."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < len(MAGIC) + _FOOTER.size:
                    raise IndexCorruptError(self.path, f"truncated chunk store ({size} bytes)")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise IndexCorruptError(self.path, "missing chunk store") from None
        except OSError as e:
            raise IndexCorruptError(self.path, f"unreadable chunk store: {e.strerror or e}") from None
        mm = self._mm
        n, table_pos, version, end = _FOOTER.unpack(mm[size - _FOOTER.size:])
        if mm[:len(MAGIC)] != MAGIC or end != END_MAGIC:
            raise IndexCorruptError(self.path, "bad chunk store magic (not a chunk store, or truncated)")
        if version != STORE_VERSION:
            raise IndexCorruptError(self.path, f"chunk store version {version}; this ctxmem reads {STORE_VERSION}")
        if n > size or table_pos + 8 * (n + 1) + 12 * n + _FOOTER.size != size:
            raise IndexCorruptError(self.path, "chunk store tables do not match the file size")
        t = table_pos
        self._offsets = np.frombuffer(mm, dtype="<u8", count=n + 1, offset=t).copy()
        self._crcs = np.frombuffer(mm, dtype="<u4", count=n, offset=t + 8 * (n + 1)).copy()
        self.ids = np.frombuffer(mm, dtype="<i8", count=n, offset=t + 8 * (n + 1) + 4 * n).copy()
        if n and (self._offsets[0] != len(MAGIC) or self._offsets[-1] != table_pos
                  or np.any(np.diff(self._offsets.astype(np.int64)) <= 0)):
            raise IndexCorruptError(self.path, "chunk store offset table is corrupt")
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def record(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexCorruptError(self.path, f"record {i} out of range (store has {self.n})")
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        raw = self._mm[a:b]
        if zlib.crc32(raw) != int(self._crcs[i]):
            raise IndexCorruptError(self.path, f"record {i} fails its crc32 check")
        try:
            r = msgpack.unpackb(raw, raw=False)
        except Exception:
            raise IndexCorruptError(self.path, f"record {i} is not valid msgpack") from None
        if not (isinstance(r, dict) and isinstance(r.get("text"), str) and isinstance(r.get("source"), str)
                and isinstance(r.get("start"), int) and isinstance(r.get("end"), int)):
            raise IndexCorruptError(self.path, f"record {i} lacks its fields")
        return r

    def records(self):
        for i in range(self.n):
            yield self.record(i)

    def close(self) -> None:
        # numpy views into the map must go first
        self._offsets = self._crcs = self.ids = None
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass

"""Cold tier of working memory: KV blocks on disk, a RAM cache of the hot ones.

A block (keys and values of ``S`` tokens for every KV head of one layer and row) leaves the
live tail once it can only ever be reached by retrieval. It is *encoded* once, in the cold
dtype, and from then on every reader sees ``decode(encode(block))`` whether it comes from RAM
or from disk, so answers never depend on what happened to be cached.

    fp32  the values as they are (exact)
    fp16  half precision (relative error ~5e-4)
    int8  per-block, per-head, per-channel absmax scale (keys have outlier channels, so one scale
          per channel, not per block), |error| <= scale / 2

The RAM cache is an LRU of decoded blocks sized in bytes (``MemoryConfig.ram_budget``). It is
write-back: a block is written to the file only when it is evicted, so a context that fits the
budget never touches the disk. Its blocks live in one preallocated slab of equal slots (decoded
k/v plus the encoding until it is written), not in a tensor per block: blocks come and go by the
thousand during a long read, and as separate heap allocations they interleaved with the model's
own temporaries and fragmented glibc's heap (with a 4 MiB mmap threshold a 128K read grew to
3.2 GB RSS; see ``_malloc.py``). The file is opened then unlinked at once: it needs no cleanup,
even after a crash. Reads and writes use ``pread``/``pwrite`` rather than a memory map, because
mapped pages count in the process's resident set and would make the RAM bound a fiction.
"""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict

import numpy as np
import torch

from ..config import COLD_DTYPES

_NP = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "int8": np.dtype("i1")}


def encoded_nbytes(cold_dtype: str, H: int, S: int, D: int) -> int:
    """Bytes of one encoded block (keys + values, and int8's fp32 scales)."""
    n = 2 * H * S * D * _NP[cold_dtype].itemsize
    return n + (2 * H * D * 4 if cold_dtype == "int8" else 0)


def encode_block(k: torch.Tensor, v: torch.Tensor, cold_dtype: str) -> bytes:
    """k, v [H, S, D] -> little-endian bytes: k payload, v payload, then (int8) k scales, v scales."""
    parts, scales = [], []
    for x in (k, v):
        x = x.detach().float().cpu()
        if cold_dtype == "int8":
            scale = x.abs().amax(dim=1, keepdim=True) / 127.0  # [H, 1, D]
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
            parts.append(q.numpy().tobytes())
            scales.append(scale.numpy().astype("<f4").tobytes())
        else:
            if cold_dtype == "fp16" and bool((x.abs() > 65504).any()):  # would silently become inf
                raise ValueError("ctxmem cold store: a KV value exceeds the fp16 range (65504); "
                                 "use MemoryConfig(cold_dtype='int8' or 'fp32')")
            parts.append(x.numpy().astype(_NP[cold_dtype]).tobytes())
    return b"".join(parts + scales)


def decode_block(buf, cold_dtype: str, H: int, S: int, D: int, dtype: torch.dtype):
    """Inverse of ``encode_block``: bytes -> (k, v) [H, S, D] in ``dtype``."""
    dt = _NP[cold_dtype]
    n = H * S * D
    flat = np.frombuffer(buf, dtype=dt, count=2 * n)
    k = torch.from_numpy(flat[:n].astype(np.float32).reshape(H, S, D))
    v = torch.from_numpy(flat[n:].astype(np.float32).reshape(H, S, D))
    if cold_dtype == "int8":
        sc = np.frombuffer(buf, dtype="<f4", count=2 * H * D, offset=2 * n * dt.itemsize)
        k = k * torch.from_numpy(sc[: H * D].reshape(H, 1, D).copy())
        v = v * torch.from_numpy(sc[H * D:].reshape(H, 1, D).copy())
    return k.to(dtype), v.to(dtype)


class ColdBlockStore:
    """All layers' and rows' cold blocks of one ``MemoryCache``: a file plus an LRU in RAM.

    Blocks are keyed by (layer, row, block index) and are immutable once put. The LRU holds
    ``max(1, budget // slot_bytes)`` blocks, each in a slot of a slab allocated on first use
    (its pages become resident as slots fill); ``slot_bytes`` = the decoded block + its encoding.
    """

    def __init__(self, H: int, S: int, D: int, dtype: torch.dtype, cold_dtype: str, budget_bytes: int,
                 directory: str | None = None):
        if cold_dtype not in COLD_DTYPES:
            raise ValueError(f"cold_dtype must be one of {COLD_DTYPES}, got {cold_dtype!r}")
        self.H, self.S, self.D, self.dtype, self.cold_dtype = H, S, D, dtype, cold_dtype
        self.budget = int(budget_bytes)
        self.rec_bytes = encoded_nbytes(cold_dtype, H, S, D)
        self.block_ram = 2 * H * S * D * torch.empty((), dtype=dtype).element_size()
        self.slot_bytes = self.block_ram + self.rec_bytes
        self.capacity = max(1, self.budget // self.slot_bytes)  # one block always fits (see get)
        self.directory = directory
        self._fd: int | None = None
        self._slots: dict[tuple, int] = {}  # key -> record index in the file
        self._lru: OrderedDict[tuple, list] = OrderedDict()  # key -> [slab slot, encoding not yet written]
        self._kv: torch.Tensor | None = None  # [capacity, 2, H, S, D] decoded blocks
        self._enc: np.ndarray | None = None   # [capacity, rec_bytes] encodings of unwritten blocks
        self._free: list[int] = []
        self.stats = {"hits": 0, "disk_reads": 0, "disk_writes": 0}

    # -- file ------------------------------------------------------------------------------
    def _file(self) -> int:
        if self._fd is None:
            d = self.directory or tempfile.gettempdir()
            os.makedirs(d, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="ctxmem-cold-", suffix=".kv", dir=d)
            os.unlink(path)  # the space is freed when the fd closes, even after kill -9
            self._fd = fd
        return self._fd

    def _write(self, key: tuple, data) -> None:
        slot = self._slots.setdefault(key, len(self._slots))
        fd, off = self._file(), slot * self.rec_bytes
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(fd, view, off)
            view, off = view[n:], off + n
        self.stats["disk_writes"] += 1

    def _read(self, key: tuple) -> bytes:
        off = self._slots[key] * self.rec_bytes
        data = os.pread(self._fd, self.rec_bytes, off)
        if len(data) != self.rec_bytes:
            raise OSError(f"ctxmem cold store: short read of block {key} ({len(data)} of {self.rec_bytes} bytes)")
        self.stats["disk_reads"] += 1
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- blocks ----------------------------------------------------------------------------
    def __contains__(self, key: tuple) -> bool:
        return key in self._lru or key in self._slots

    def __len__(self) -> int:
        return len(set(self._lru) | set(self._slots))

    @property
    def ram_bytes(self) -> int:
        """Bytes of the slab's slots in use (decoded blocks and room for their encodings)."""
        return len(self._lru) * self.slot_bytes

    def _take_slot(self) -> int:
        """A free slab slot, evicting the least recently used block if none is free."""
        if self._kv is None:
            self._kv = torch.empty(self.capacity, 2, self.H, self.S, self.D, dtype=self.dtype)
            self._enc = np.empty((self.capacity, self.rec_bytes), dtype=np.uint8)
            self._free = list(range(self.capacity - 1, -1, -1))
        while not self._free:
            key = next(iter(self._lru))
            slot, dirty = self._lru.pop(key)
            if dirty:
                self._write(key, self._enc[slot])
            self._free.append(slot)
        return self._free.pop()

    def _decode_into(self, slot: int, data) -> None:
        k, v = decode_block(data, self.cold_dtype, self.H, self.S, self.D, self.dtype)
        self._kv[slot, 0].copy_(k)
        self._kv[slot, 1].copy_(v)

    def put(self, key: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a block [H, S, D] (encoded once; RAM keeps the decoded form)."""
        self.put_encoded(key, encode_block(k, v, self.cold_dtype))

    def put_encoded(self, key: tuple, data: bytes) -> None:
        if key in self:
            raise KeyError(f"ctxmem cold store: block {key} is already stored (blocks are immutable)")
        if len(data) != self.rec_bytes:
            raise ValueError(f"ctxmem cold store: block {key} has {len(data)} bytes, expected {self.rec_bytes}")
        slot = self._take_slot()
        self._enc[slot] = np.frombuffer(data, dtype=np.uint8)
        self._decode_into(slot, data)
        self._lru[key] = [slot, True]

    def get(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded block (k, v) [H, S, D]; from RAM when cached, else from the file.

        The tensors are views of the cache's slab: copy them before the next ``get`` or ``put``,
        which may hand their slot to another block."""
        e = self._lru.get(key)
        if e is not None:
            self._lru.move_to_end(key)
            self.stats["hits"] += 1
            slot = e[0]
        else:
            if key not in self._slots:
                raise KeyError(f"ctxmem cold store: no block {key}")
            data = self._read(key)
            slot = self._take_slot()
            self._decode_into(slot, data)
            self._lru[key] = [slot, False]
        return self._kv[slot, 0], self._kv[slot, 1]

    def encoded(self, key: tuple) -> bytes:
        """The block's encoded bytes (what ``save_memory`` writes)."""
        e = self._lru.get(key)
        if e is not None and e[1]:
            return self._enc[e[0]].tobytes()
        return self._read(key)

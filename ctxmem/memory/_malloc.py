"""Keep freed KV memory returnable to the OS (glibc only; a no-op elsewhere).

glibc raises its mmap threshold each time a large block is freed, after which tensors of that
size come from the heap, which fragments and is not given back: a 128K-token read with a 512 MB
block budget peaked at 3,588 MB RSS that way, and at 2,046 MB with the thresholds pinned
(MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072; benchmarks/results/memory.json).
Setting them explicitly with mallopt turns the dynamic adjustment off for the whole process.

Pinned at 4 MiB, not 128 KiB: below the threshold every tensor is a fresh mmap, so each of the
many sub-MB temporaries of a forward or a decode step (a 128-token chunk's MLP activations are
786 KB) paid page faults and zeroing on every call: with 128 KiB the memory layer's decode step
at 128K tokens took 167 ms (30 layers, one thread), with 4 MiB 68 ms. What fragmented the heap
were the cold store's thousands of per-block tensors interleaved with those temporaries (with
4 MiB and per-block tensors a 128K read grew to 3.2 GB); the cold store now keeps its blocks in
one slab (``cold_store.py``), and buffers that grow and are freed are larger than 4 MiB at the
lengths where it matters, so they still go back to the OS.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def _glibc(name: str):
    """The C library's function ``name`` (glibc), or None where it has none (macOS, Windows, ...)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def pin_malloc_thresholds(nbytes: int = 4 * 2**20) -> bool:
    """Pin glibc's mmap and trim thresholds (once per process). Returns True when it took effect."""
    global _done
    if _done:
        return True
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, nbytes)) and bool(mallopt(_M_TRIM_THRESHOLD, nbytes))
    _done = ok
    return ok


def release_free_memory() -> bool:
    """Collect garbage and hand glibc's free heap pages back to the OS (``malloc_trim(0)``), so the
    RSS measured next is what is live now, not the high-water mark of earlier work. Returns True
    when glibc did it (a no-op elsewhere)."""
    import gc

    gc.collect()
    trim = _glibc("malloc_trim")
    return trim is not None and bool(trim(0))

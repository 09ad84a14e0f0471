"""Helpers for tests and benchmarks of the knowledge index (small synthetic corpora)."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np

from .embed import HashingEmbedder

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega river mountain castle engine garden violin copper harbor lantern "
         "meadow orbit quartz saddle thunder velvet willow yarrow zephyr anchor bridge candle desert").split()


def write_corpus(root, n_files: int = 10, words_per_file: int = 200, seed: int = 0, subdirs: int = 2) -> list[str]:
    """Write ``n_files`` text files of random words under ``root`` (some in sub-folders)."""
    rng = random.Random(seed)
    root = Path(root)
    paths = []
    for i in range(n_files):
        sub = root / f"d{i % subdirs}" if subdirs else root
        sub.mkdir(parents=True, exist_ok=True)
        lines, words = [], []
        for _ in range(words_per_file):
            words.append(rng.choice(WORDS))
            if rng.random() < 0.08:
                lines.append(" ".join(words) + rng.choice([".", ",", "!", "?"]))
                words = []
        lines.append(" ".join(words))
        p = sub / f"doc{i:03d}.txt"
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(str(p))
    return paths


def chunk_set(kb) -> set:
    """The KB's chunks as a set of ``(source, start, end, text)``."""
    return {(h.source, h.start, h.end, h.text) for _, h in kb.iter_chunks()}


def chunk_list(kb) -> list:
    return sorted((h.source, h.start, h.end, h.text) for _, h in kb.iter_chunks())


class SlowHashingEmbedder(HashingEmbedder):
    """:class:`HashingEmbedder` that sleeps ``delay`` seconds per call (to interrupt builds)."""

    def __init__(self, dim: int = 64, delay: float = 0.05):
        super().__init__(dim)
        self.delay = delay

    def encode(self, texts, **kw):
        if len(texts) > 1 or os.environ.get("CTXMEM_SLOW_PROBE"):
            time.sleep(self.delay)
        return super().encode(texts, **kw)


def synthetic_vectors(n: int, dim: int = 384, seed: int = 0, clusters: int = 2048, rank: int = 24,
                      spread: float = 0.7, noise: float = 0.35) -> np.ndarray:
    """Unit vectors shaped like sentence embeddings: topics, each varying in a low-rank subspace.

    Each vector is ``center + spread * (z @ basis) + isotropic noise`` for one of ``clusters``
    random unit centers, with its own random ``rank``-dimensional basis per topic, then
    normalised. Real embeddings have a low intrinsic dimension; isotropic Gaussians (the
    worst case for any ANN index) do not.
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.sort(rng.integers(0, clusters, n))
    bounds = np.searchsorted(labels, np.arange(clusters + 1))
    out = np.empty((n, dim), np.float32)
    for j in range(clusters):
        a, b = bounds[j], bounds[j + 1]
        if a == b:
            continue
        basis = rng.standard_normal((rank, dim), dtype=np.float32)
        basis /= np.linalg.norm(basis, axis=1, keepdims=True)
        z = rng.standard_normal((b - a, rank), dtype=np.float32) * (spread / np.sqrt(rank))
        out[a:b] = centers[j] + z @ basis + rng.standard_normal((b - a, dim), dtype=np.float32) * (noise / np.sqrt(dim))
    out = out[rng.permutation(n)]
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


class KillOnceEmbedder(HashingEmbedder):
    """:class:`HashingEmbedder` whose process dies (``os._exit``) the first time it is asked to
    embed a text containing ``trigger``; ``marker`` (a file) records that it happened, with the
    pid that died, so the retry embeds normally. For testing the Ray engine's fault tolerance:
    it behaves as a worker killed by the OOM killer or a lost node."""

    def __init__(self, dim: int, trigger: str, marker: str):
        super().__init__(dim)
        self.trigger, self.marker = trigger, str(marker)

    def encode(self, texts, **kw):
        if any(self.trigger in t for t in texts) and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        return super().encode(texts, **kw)

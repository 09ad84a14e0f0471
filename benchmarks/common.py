"""Shared pieces of the benchmarks: haystacks, needles, prompts, timing, memory."""
from __future__ import annotations

import json
import os
import platform
import random
import resource
import time
from pathlib import Path

import torch

from ctxmem._atomic import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "results"

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def real_text() -> str:
    """Real prose no one here wrote: the Python reference manual's topics, shipped with CPython."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def haystack_ids(tok, kind: str, n_tokens: int, seed: int = 0) -> list[int]:
    if kind == "filler":
        unit = tok(FILLER, add_special_tokens=False)["input_ids"]
        reps = n_tokens // len(unit) + 1
        return (unit * reps)[:n_tokens]
    if kind == "real":
        ids = tok(real_text(), add_special_tokens=False)["input_ids"]
        if n_tokens > len(ids):
            raise ValueError(f"real haystack has only {len(ids)} tokens, asked for {n_tokens}")
        start = random.Random(seed).randrange(0, len(ids) - n_tokens + 1)
        return ids[start:start + n_tokens]
    raise ValueError(f"unknown haystack {kind!r}")


_HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
_TAIL = "\n\nWhat is the pass key?"
_ANSWER = "The pass key is"  # the assistant's answer starts here: the small model then says the number


PASSKEY_QUESTION = _TAIL.strip()


def passkey_needle(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_body(tok, kind: str, context_tokens: int, depth: float, key: str, seed: int = 0) -> str:
    """The haystack text with the needle at ``depth`` (0..1), sized so the prompt is about ``context_tokens``."""
    needle = tok(passkey_needle(key), add_special_tokens=False)["input_ids"]
    overhead = len(tok.apply_chat_template([{"role": "user", "content": _HEAD + _TAIL}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"])
    hay = haystack_ids(tok, kind, max(16, context_tokens - overhead - len(needle)), seed)
    cut = int(len(hay) * depth)
    return tok.decode(hay[:cut]) + tok.decode(needle) + tok.decode(hay[cut:])


def passkey_prompt_from_body(tok, body: str) -> torch.Tensor:
    """The passkey chat prompt around any body text (the whole haystack, or what RAG picked from it)."""
    enc = tok.apply_chat_template([{"role": "user", "content": _HEAD + body + _TAIL}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    enc = list(enc) + tok(_ANSWER, add_special_tokens=False)["input_ids"]
    return torch.tensor([enc])


def passkey_prompt(tok, kind: str, context_tokens: int, depth: float, key: str, seed: int = 0) -> torch.Tensor:
    """Chat prompt of about ``context_tokens`` tokens with the needle at ``depth`` (0..1) of the haystack."""
    return passkey_prompt_from_body(tok, passkey_body(tok, kind, context_tokens, depth, key, seed))


def passkey_key(seed: int) -> str:
    return str(random.Random(seed).randrange(10000, 99999))


def found(answer: str, key: str) -> bool:
    return key in answer.replace(" ", "")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}


def set_threads(n: int) -> None:
    """torch threads, and numba's too: the numba decode kernel restores numba's thread count after
    each step, and with the OpenMP threading layer that count is the one torch reads, so setting
    torch alone did not hold (observed 2026-12-04: --threads 1 ran 2 torch threads after the first
    ctxmem answer)."""
    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_bytes(path, json.dumps(data, indent=2).encode())
    return path


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class PeakRSS:
    """Peak resident memory *during* a block (a sampling thread, every ``interval`` s).

    ``ru_maxrss`` only ever grows over a process's life, so it cannot tell one call's peak from
    an earlier, bigger one; this can (``.peak_mb``; ``.start_mb`` is the RSS on entry)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval

    def __enter__(self):
        import threading

        self.start_mb = self.peak_mb = current_rss_mb()
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(self.interval):
                self.peak_mb = max(self.peak_mb, current_rss_mb())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_variant(spec: str) -> tuple[str, dict]:
    """``--variant NAME:KEY=VALUE,...`` -> (NAME, MemoryConfig overrides); ``NAME:`` or ``NAME`` has none."""
    from ctxmem.cli import _parse_overrides

    name, _, sets = spec.partition(":")
    return name, _parse_overrides(sets.split(",") if sets else [])


# ---------------------------------------------------------------------------------------------
# plain RAG: the peer a user tries first (the same embedder as ctxmem's block selector)

RAG_CHUNK_TOKENS = 128   # chunk size in the embedder's own tokens (MiniLM's window is 256)
RAG_OVERLAP = 64         # consecutive chunks share half their tokens
RAG_TOP_K = 3            # chunks read by the stock model, in document order


class RagPick:
    """What plain RAG hands the stock model: the top-k chunks of a document for a query.

    ``text``: the picked chunks in document order, overlapping or touching ones merged into one
    span, separate spans joined by a blank line; ``spans``: those merged character spans;
    ``ranked``: the top-k chunks best first as (start, end, cosine); ``chunks``: every chunk's
    (start, end) (they cover the document); ``seconds``: chunking + embedding + ranking."""

    def __init__(self, text, spans, ranked, chunks, seconds):
        self.text, self.spans, self.ranked, self.chunks, self.seconds = text, spans, ranked, chunks, seconds

    def describe(self) -> dict:
        return dict(rag_spans=self.spans, rag_ranked=[(a, b, round(s, 4)) for a, b, s in self.ranked],
                    rag_chunks=len(self.chunks), rag_seconds=round(self.seconds, 2))


def rag_retrieve(document: str, query: str, embedder, k: int = RAG_TOP_K, chunk_tokens: int = RAG_CHUNK_TOKENS,
                 overlap: int = RAG_OVERLAP, threads: int | None = None) -> RagPick:
    """Plain RAG over one document: cut it with ctxmem.index's chunker (``chunk_tokens`` tokens of
    the embedder's tokenizer, ``overlap`` shared), embed the chunks and the query with ``embedder``
    (normalised: inner product = cosine), keep the ``k`` best, return them in document order."""
    import numpy as np

    from ctxmem.index import embed as _embed
    from ctxmem.index.chunking import Chunker

    t0 = time.perf_counter()
    chunks = Chunker(_embed.tokenizer_of(embedder), chunk_tokens=chunk_tokens, overlap=overlap).chunk(document)
    if not chunks:
        return RagPick("", [], [], [], time.perf_counter() - t0)
    vecs = _embed.encode(embedder, [document[c.start:c.end] for c in chunks], threads=threads)
    q = _embed.encode(embedder, [query], threads=threads)[0]
    sims = vecs @ q
    order = np.argsort(-sims, kind="stable")[:k]
    ranked = [(chunks[i].start, chunks[i].end, float(sims[i])) for i in order]
    spans: list[list[int]] = []
    for a, b, _ in sorted(ranked):
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    text = "\n\n".join(document[a:b].strip() for a, b in spans)
    return RagPick(text, [tuple(s) for s in spans], ranked, [(c.start, c.end) for c in chunks],
                   time.perf_counter() - t0)

"""Token-window chunking with character provenance.

A text is cut into windows of at most ``chunk_tokens`` tokens of the *embedder's own
tokenizer*, consecutive windows sharing about ``overlap`` tokens. Each chunk is a character
span ``[start, end)`` of the text, so ``text[start:end]`` is exactly the chunk's text and a hit
can be shown in place.

Guarantees (checked by property tests):

* chunk 0 starts at 0 and the last chunk ends at ``len(text)``; starts strictly increase;
* chunk ``i + 1`` starts at or before the end of chunk ``i`` (no gap), so the "cores"
  ``[start_i, start_{i+1})`` partition the text: every character is covered exactly once,
  apart from the overlaps ``[start_{i+1}, end_i)``, which hold the shared tokens;
* every window holds at most ``chunk_tokens`` tokens, whose starts lie within ``max_chars``
  characters (default ``max(256, 16 * chunk_tokens)``), so a chunk spans at most
  ``max_chars + max_chars // 4`` characters: a run without any token (a huge word the
  tokenizer turns into one ``[UNK]``, a megabyte of spaces) is cut every ``max_chars // 4``
  characters and each piece counts as one token;
* the chunks of a text without any token (empty, only whitespace or characters the
  tokenizer drops) are ``[]``.

Boundaries: a chunk's span runs from the start of its first token to the start of the token
after its last one (so trailing whitespace belongs to the chunk it follows). Window ends are
moved back to a word start when one lies in the second half of the window, and the next
window's start forward to a word start inside the overlap, so chunks rarely split a word.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import BadInputError

# Tokenize in pieces of at most this many characters (cut at a newline, else at whitespace).
_PIECE_CHARS = 16384
_WORD_RE = re.compile(r"\w+|[^\w\s]")
_SPACE_RE = re.compile(r"\s")


class WordTokenizer:
    """Fallback tokenizer for embedders without a Hugging Face tokenizer: words and punctuation."""

    name = "ctxmem-words"

    def boundaries(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        starts = np.fromiter((m.start() for m in _WORD_RE.finditer(text)), dtype=np.int64)
        return starts, np.ones(len(starts), dtype=bool)


class HFTokenizer:
    """Adapter over a Hugging Face *fast* tokenizer: token start offsets and word starts."""

    def __init__(self, hf_tokenizer):
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise BadInputError(
                f"the embedder's tokenizer {type(hf_tokenizer).__name__} is not a fast (Rust) "
                "tokenizer; ctxmem needs character offsets to keep provenance"
            )
        from tokenizers import Tokenizer

        # A private copy: the shared tokenizer may carry truncation/padding settings.
        self._tok = Tokenizer.from_str(backend.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self.name = str(getattr(hf_tokenizer, "name_or_path", "") or type(hf_tokenizer).__name__)

    def boundaries(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        pieces = list(_pieces(text, _PIECE_CHARS))
        encs = self._tok.encode_batch([text[a:b] for a, b in pieces], add_special_tokens=False)
        starts_l, ws_l = [], []
        for (a, _b), enc in zip(pieces, encs):
            if not enc.offsets:
                continue
            offs = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(enc.offsets))
            wid = enc.word_ids
            ws = np.ones(len(offs), dtype=bool)
            for i in range(1, len(wid)):
                if wid[i] is not None and wid[i] == wid[i - 1]:
                    ws[i] = False
            starts_l.append(offs + a)
            ws_l.append(ws)
        if not starts_l:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        return np.concatenate(starts_l), np.concatenate(ws_l)


def _pieces(text: str, size: int):
    """Yield ``(start, end)`` pieces of at most ``size`` chars, cut at a newline or whitespace."""
    n, pos = len(text), 0
    while pos < n:
        end = pos + size
        if end >= n:
            yield pos, n
            return
        half = pos + size // 2
        cut = text.rfind("\n", half, end)
        if cut < 0:
            # last whitespace in the second half of the window
            m = None
            for m in _SPACE_RE.finditer(text, half, end):
                pass
            cut = m.start() if m is not None else end - 1
        yield pos, cut + 1
        pos = cut + 1


@dataclass(frozen=True)
class Chunk:
    start: int
    end: int
    n_tokens: int


class Chunker:
    """Cut texts into overlapping token windows; see the module docstring for the contract.

    ``tokenizer`` is a Hugging Face fast tokenizer, a :class:`WordTokenizer`, or None (words).
    """

    def __init__(self, tokenizer=None, chunk_tokens: int = 128, overlap: int = 16,
                 max_chars: int | None = None):
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise BadInputError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
        if not isinstance(overlap, int) or not 0 <= overlap < chunk_tokens:
            raise BadInputError(f"overlap must be an integer in [0, chunk_tokens), got {overlap!r}")
        if tokenizer is None or isinstance(tokenizer, WordTokenizer):
            self._tok = tokenizer or WordTokenizer()
        elif hasattr(tokenizer, "boundaries"):
            self._tok = tokenizer
        else:
            self._tok = HFTokenizer(tokenizer)
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap
        self.max_chars = int(max_chars) if max_chars else max(256, 16 * chunk_tokens)
        if self.max_chars < 4:
            raise BadInputError(f"max_chars must be at least 4, got {max_chars!r}")

    @property
    def tokenizer_name(self) -> str:
        return self._tok.name

    def boundaries(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token starts (strictly increasing) and word-start flags, with long gaps cut."""
        starts, ws = self._tok.boundaries(text)
        if len(starts):
            # strictly increasing: byte-level tokenizers may give several tokens one offset
            keep = np.ones(len(starts), dtype=bool)
            keep[1:] = starts[1:] > np.maximum.accumulate(starts)[:-1]
            if not keep.all():
                # a dropped token's word-start flag moves to the token kept before it
                new_ws = np.zeros(int(keep.sum()), dtype=bool)
                np.logical_or.at(new_ws, np.cumsum(keep) - 1, ws)
                starts, ws = starts[keep], new_ws
        n = len(text)
        gap = max(1, self.max_chars // 4)
        if n == 0 or len(starts) == 0:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        # pseudo-tokens in any token-less stretch longer than `gap` (also before the first
        # and after the last token), so no window spans an unbounded number of characters
        edges = np.concatenate([[0], starts, [n]])
        gaps = np.diff(edges)
        if (gaps > gap).any():
            extra = []
            for i in np.nonzero(gaps > gap)[0]:
                a, b = int(edges[i]), int(edges[i + 1])
                first = a if i == 0 else a + gap  # chunk 0 starts at 0 anyway
                extra.append(np.arange(first, b, gap, dtype=np.int64))
            extra = np.concatenate(extra) if extra else np.zeros(0, np.int64)
            extra = extra[~np.isin(extra, starts)]
            all_starts = np.concatenate([starts, extra])
            all_ws = np.concatenate([ws, np.zeros(len(extra), bool)])
            order = np.argsort(all_starts, kind="stable")
            starts, ws = all_starts[order], all_ws[order]
        return starts, ws

    def chunk(self, text: str) -> list[Chunk]:
        """Chunks of ``text`` as character spans; ``[]`` when the text has no token."""
        starts, ws = self.boundaries(text)
        T, n = len(starts), len(text)
        if T == 0:
            return []
        idx = np.arange(T)
        prev_ws = np.maximum.accumulate(np.where(ws, idx, -1))  # last word start <= j
        nxt = np.where(ws, idx, T)
        next_ws = np.minimum.accumulate(nxt[::-1])[::-1]  # first word start >= j
        out: list[Chunk] = []
        s = 0
        ct, ov, mc = self.chunk_tokens, self.overlap, self.max_chars
        while True:
            e = min(T, s + ct)
            # characters: tokens s..e_cap-1 start within max_chars of token s; a window that
            # is not the last runs to starts[e], so needs e <= e_cap - 1
            e_cap = int(np.searchsorted(starts, starts[s] + mc, side="right"))
            if not (e == T and e_cap >= T):
                e = max(s + 1, min(e, e_cap - 1))
            if e < T:
                j = int(prev_ws[e])
                if j > s + (e - s) // 2:
                    e = j
            a = 0 if s == 0 else int(starts[s])
            b = n if e >= T else int(starts[e])
            out.append(Chunk(a, b, e - s))
            if e >= T:
                return out
            ns = max(e - ov, s + 1)
            j = int(next_ws[ns])
            if j <= e:
                ns = j
            s = ns

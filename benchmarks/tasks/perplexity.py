"""Perplexity on long real text as the context grows past the model's trained window.

Two corpora no one here wrote, on every machine with Python: ``code`` (the standard library's
top-level modules, concatenated in a seeded order) and ``docs`` (the Python reference manual's
topics that ship with CPython, about 113K SmolLM2 tokens). A window of ``length`` tokens is cut
at a seeded offset; the score is the perplexity of its last ``target`` tokens given everything
before them. The same windows go to every method, so a method's curve over ``length`` shows
what more context does for it: flat or falling is good, rising means the context hurts.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass


@dataclass
class PplWindow:
    corpus: str
    length: int
    target: int
    seed: int
    ids: list[int]          # ``length`` tokens; the last ``target`` are scored

    def describe(self) -> dict:
        return dict(corpus=self.corpus, length=self.length, target=self.target, seed=self.seed)


def corpus_text(corpus: str, seed: int = 0) -> str:
    if corpus == "docs":
        from benchmarks.common import real_text
        return real_text()
    if corpus == "code":
        from .codeqa import _header, module_sources
        mods = list(module_sources())
        random.Random(f"ppl-code/{seed}").shuffle(mods)
        return "".join(_header(m) + module_sources()[m] for m in mods)
    raise ValueError(f"unknown corpus {corpus!r}; use 'code' or 'docs'")


_IDS: dict[tuple[int, str], list[int]] = {}


_CODE_CHARS = 1_200_000  # about 350K tokens of code: room for 128K windows at many offsets


def corpus_ids(tok, corpus: str) -> list[int]:
    key = (id(tok), corpus)
    if key not in _IDS:
        text = corpus_text(corpus)
        if corpus == "code":
            text = text[:_CODE_CHARS]
        _IDS[key] = tok(text, add_special_tokens=False)["input_ids"]
    return _IDS[key]


def window(tok, corpus: str, length: int, seed: int = 0, target: int = 256, max_length: int | None = None) -> PplWindow:
    """A ``length``-token window of the corpus. Windows of one seed share their end, so a longer
    context only adds text before the same scored tokens (the curve compares like with like)."""
    if target >= length:
        raise ValueError(f"target ({target}) must be shorter than the window ({length})")
    longest = max(length, max_length or length)
    ids = corpus_ids(tok, corpus)
    if len(ids) < longest:
        raise ValueError(f"corpus {corpus!r} has only {len(ids)} tokens, a {longest}-token window was asked for")
    end = random.Random(f"ppl/{corpus}/{seed}").randrange(longest, len(ids) + 1)
    return PplWindow(corpus, length, target, seed, list(ids[end - length:end]))

"""Feeding knowledge-index hits to a model as text.

:func:`knowledge_context` turns the hits for a prompt into a block of text to put before the
user's prompt. The contract:

* **Retrieve**: the top ``k`` chunks of the KB's default search (``mode="hybrid"``: the query's
  embedding and its words, rankings fused; :meth:`KnowledgeIndex.search`).
* **Deduplicate**: hits from the same source whose character spans overlap or touch (adjacent
  chunks share their overlap tokens) are merged into one passage, scored by the best of them;
  then passages with the same text (whitespace-normalised) from different sources are kept
  once, at the best-scored one.
* **Budget**: passages are admitted best score first while the *whole returned string*
  (header and labels included) stays within ``budget_tokens`` tokens of ``tokenizer`` (the
  model's tokenizer). The first passage that does not fit is cut at a character boundary to
  fill the rest when at least 32 tokens remain (``" [...]"`` marks the cut), and admission
  stops there.
* **Order**: the admitted passages are printed grouped by source - sources in order of their
  best score, best first - and by position (character start) within a source, each labelled
  ``[n] SOURCE (chars START-END)``, SOURCE relative to the deepest folder that holds every file
  source of the KB (one file: its name), so the prompt depends on the KB and the query only,
  not on where the KB was built or the process's working folder.

Returns ``""`` when nothing is retrieved or the budget cannot hold the header.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

HEADER = "Relevant excerpts from the knowledge base:\n"
_WS = re.compile(r"\s+")
_MIN_CUT_TOKENS = 32


@dataclass
class _Passage:
    source: str
    start: int
    end: int
    text: str
    score: float


def _count(tokenizer, text: str) -> int:
    if tokenizer is None:
        return (len(text) + 3) // 4
    if hasattr(tokenizer, "encode"):
        try:
            return len(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return len(tokenizer.encode(text))
    return len(tokenizer(text)["input_ids"])


def _split_line(source: str) -> tuple[str, str]:
    """``"/a/b.jsonl#L12"`` -> ``("/a/b.jsonl", "#L12")``; other sources -> ``(source, "")``."""
    path, sep, line = source.rpartition("#L")
    return (path, sep + line) if sep and line.isdigit() else (source, "")


def source_root(sources) -> str | None:
    """The deepest folder holding every absolute file source (``None`` when there is none)."""
    dirs = {os.path.dirname(_split_line(s)[0]) for s in sources if os.path.isabs(_split_line(s)[0])}
    if not dirs:
        return None
    try:
        return os.path.commonpath(sorted(dirs))
    except ValueError:  # different drives (Windows)
        return None


def _label(source: str, root: str | None) -> str:
    base, suffix = _split_line(source)
    if root is not None and os.path.isabs(base):
        try:
            rel = os.path.relpath(base, root)
            if not rel.startswith(".."):
                base = rel
        except ValueError:
            pass
    return base + suffix


def merge_hits(hits) -> list[_Passage]:
    """Merge overlapping/touching hits of one source; drop repeated texts (see module doc)."""
    by_source: dict[str, list] = {}
    for h in hits:
        by_source.setdefault(h.source, []).append(h)
    passages: list[_Passage] = []
    for source, hs in by_source.items():
        hs = sorted(hs, key=lambda h: (h.start, h.end))
        cur = None
        for h in hs:
            if cur is not None and h.start <= cur.end:
                if h.end > cur.end:
                    cur.text += h.text[cur.end - h.start:]
                    cur.end = h.end
                cur.score = max(cur.score, h.score)
            else:
                cur = _Passage(source, h.start, h.end, h.text, h.score)
                passages.append(cur)
    passages.sort(key=lambda p: -p.score)
    seen, out = set(), []
    for p in passages:
        key = _WS.sub(" ", p.text).strip()
        if not key or key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out


def _render(chosen: list[_Passage], root: str | None) -> str:
    best: dict[str, float] = {}
    for p in chosen:
        best[p.source] = max(best.get(p.source, float("-inf")), p.score)
    ordered = sorted(chosen, key=lambda p: (-best[p.source], p.source, p.start))
    parts = [HEADER]
    for i, p in enumerate(ordered, 1):
        parts.append(f"[{i}] {_label(p.source, root)} (chars {p.start}-{p.end})\n{p.text.strip()}\n\n")
    return "".join(parts)


def knowledge_context(kb, query: str, tokenizer, budget_tokens: int = 1024, k: int = 8) -> str:
    """Text of the top-``k`` hits for ``query`` to put before the prompt, within ``budget_tokens``.

    ``kb`` is a :class:`KnowledgeIndex` (or a KB path); ``tokenizer`` the model's tokenizer (a
    Hugging Face tokenizer; ``None`` counts 4 characters per token). Deduplication, the budget
    rule and the order (by source, best source first, then by position) are documented in the
    module docstring.
    """
    if budget_tokens <= 0 or k <= 0 or not query or not query.strip():
        return ""
    if isinstance(kb, (str, os.PathLike)):
        from .knowledge import KnowledgeIndex

        kb = KnowledgeIndex.open(kb)
    passages = merge_hits(kb.search(query, k=k))
    if not passages or _count(tokenizer, HEADER) > budget_tokens:
        return ""
    # a KB-like object without ``sources`` (a remote index): the root of what it returned
    root = source_root(kb.sources if hasattr(kb, "sources") else [p.source for p in passages])
    chosen: list[_Passage] = []
    for p in passages:
        if _count(tokenizer, _render(chosen + [p], root)) <= budget_tokens:
            chosen.append(p)
            continue
        remaining = budget_tokens - _count(tokenizer, _render(chosen, root))
        if remaining >= _MIN_CUT_TOKENS:
            text = p.text.lstrip()
            lead = len(p.text) - len(text)
            lo, hi, best = 0, len(text), None
            while lo < hi:  # longest prefix that fits
                mid = (lo + hi + 1) // 2
                cut = _Passage(p.source, p.start, p.start + lead + mid, text[:mid].rstrip() + " [...]", p.score)
                if _count(tokenizer, _render(chosen + [cut], root)) <= budget_tokens:
                    lo, best = mid, cut
                else:
                    hi = mid - 1
            if best is not None:
                chosen.append(best)
        break
    return _render(chosen, root) if chosen else ""

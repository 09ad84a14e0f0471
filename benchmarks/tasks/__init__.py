"""Task generators of the evaluation suite (``python -m benchmarks.suite``).

Every generator is a pure function of (tokenizer, context length, depth, seed): the same seed
gives the same prompt token for token, on any machine with the same Python (the code tasks read
the standard library of the running interpreter; its version is recorded with the results).

A generated :class:`Sample` holds the whole chat prompt as token ids, **exactly** ``length``
tokens long (chat frame + instruction + haystack + question + the start of the answer), so
"context length" means the same thing for every task and method. The haystack is assembled from
token ids, never by decoding and re-encoding text, so nothing shifts when pieces are joined.

Modules: :mod:`.ruler` (RULER-style synthetic tasks), :mod:`.codeqa` (questions about the
standard library's source, answers derived from its AST), :mod:`.perplexity` (long real text).
"""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field


@dataclass
class Sample:
    task: str
    length: int                  # tokens in ``ids`` (exact)
    depth: float | None          # where the (first) answer sits in the haystack, 0..1; None if spread
    seed: int
    ids: list[int]               # the full prompt, ending with the start of the answer
    answers: list[str]           # every one must appear in the model's output (RULER string_match_all)
    question: str
    context: str                 # the haystack as text (what a knowledge index is built from)
    max_new_tokens: int = 24
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # token spans in ``ids``
    haystack_span: tuple[int, int] = (0, 0)  # where the haystack (needles included) sits in ``ids``
    meta: dict = field(default_factory=dict)

    def describe(self) -> dict:
        d = asdict(self)
        for k in ("ids", "context"):
            d.pop(k)
        return d


def score(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all: the fraction of reference strings found in the prediction
    (case-insensitive substring)."""
    p = prediction.lower()
    return sum(a.lower() in p for a in answers) / len(answers)


def strict_score(prediction: str, answers: list[str], distractors: list[str]) -> float:
    """``score``, but 0 when the prediction also names a distractor's value: string_match_all
    credits "2918805 and 529226" when only the first is asked for."""
    p = prediction.lower()
    return 0.0 if any(d.lower() in p for d in distractors) else score(prediction, answers)


class ChatFrame:
    """The model's chat template split around the user message, as token ids.

    prompt = pre + head + haystack + tail + post + answer_prefix, every piece tokenized on its
    own; ``overhead`` tells a generator how many tokens its haystack may have.
    """

    _MARK = "\x00"

    def __init__(self, tok):
        self.tok = tok
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": self._MARK}], add_generation_prompt=True,
                                           tokenize=False)
            pre, post = text.split(self._MARK)
        else:
            pre, post = "", "\nAnswer:"
        self.pre = self.encode(pre)
        self.post = self.encode(post)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def overhead(self, head: str, tail: str, answer_prefix: str) -> int:
        return len(self.pre) + len(self.encode(head)) + len(self.encode(tail)) + len(self.post) + \
            len(self.encode(answer_prefix))

    def assemble(self, head: str, hay: list[int], tail: str, answer_prefix: str) -> tuple[list[int], int]:
        """The prompt's ids and the offset of the haystack inside them."""
        start = len(self.pre) + len(self.encode(head))
        ids = self.pre + self.encode(head) + list(hay) + self.encode(tail) + self.post + self.encode(answer_prefix)
        return ids, start


def boundaries(tok, ids: list[int]) -> list[int]:
    """Positions in ``ids`` right after a sentence or line end (where a needle may go)."""
    toks = tok.convert_ids_to_tokens(list(ids))
    out = [0]
    for i, t in enumerate(toks):
        t = t or ""
        if t.endswith(".") or t.endswith("Ċ") or t.endswith("\n") or t.endswith(".Ġ"):
            out.append(i + 1)
    return out


def nearest(bounds: list[int], pos: int) -> int:
    j = bisect.bisect_left(bounds, pos)
    cands = [bounds[k] for k in (j - 1, j) if 0 <= k < len(bounds)]
    return min(cands, key=lambda b: abs(b - pos))


def insert_needles(tok, filler: list[int], needles: list[tuple[float, list[int]]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Insert token-id needles into ``filler`` at fractional depths (snapped to the nearest sentence
    or line boundary). ``filler`` must already be shortened by the needles' total length, so the
    result has ``len(filler) + sum(len(n))`` tokens. Returns the haystack and each needle's span
    (in input order)."""
    bounds = boundaries(tok, filler)
    placed = sorted(((nearest(bounds, int(round(d * len(filler)))), i, n) for i, (d, n) in enumerate(needles)))
    hay, spans, prev, shift = [], [None] * len(needles), 0, 0
    for pos, i, n in placed:
        hay.extend(filler[prev:pos])
        spans[i] = (pos + shift, pos + shift + len(n))
        hay.extend(n)
        shift += len(n)
        prev = pos
    hay.extend(filler[prev:])
    return hay, spans


def repeat_to(ids: list[int], n: int, offset: int = 0) -> list[int]:
    """``n`` tokens of ``ids`` read cyclically from ``offset``."""
    if not ids:
        raise ValueError("empty filler")
    out = []
    i = offset % len(ids)
    while len(out) < n:
        take = ids[i:i + n - len(out)]
        out.extend(take)
        i = 0
    return out

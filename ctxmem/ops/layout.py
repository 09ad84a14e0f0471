"""Where each key sits for a chunk of queries: sinks, middle blocks, local window.

All backends share this arithmetic, so it lives in one place.

For a row whose first new (real) query sits at position ``t`` (= number of tokens stored before
the chunk), the stored positions ``[0, t)`` split into

    sinks   [0, s_end)                     s_end = min(sink, t)
    middle  [s_end, local_start)           nmid whole blocks of S tokens, candidates for retrieval
    local   [local_start, L)               always attended, causally (includes the chunk itself)

with ``nmid = max(0, (t - local - s_end) // S)`` and ``local_start = s_end + nmid * S``. So every
query sees at least ``local`` (and fewer than ``local + S``) tokens of true local context, the
middle holds only complete blocks, and block ``j`` always covers positions
``[sink + j*S, sink + (j+1)*S)`` (the middle is non-empty only once ``t > sink``).

Positions (the scheme the op implements, InfLLM-style): local keys keep their true positions.
The ``nsel`` selected blocks are re-rotated to sit back to back, in their original order, just
before ``local_start``; the sinks sit just before them. So the farthest key a query can see is
``sink + topk*S + local + S + chunk`` tokens away, inside the model's trained window, whatever
the context length. When every middle block is selected the virtual positions equal the true
ones and the op is exactly full causal attention.

Per-layer options (gemma2/gemma3, mistral/qwen2 sliding layers):
  * ``window``: a sliding-window layer. It keeps its own window exactly: a query at position p sees
    the stored keys at positions (p - window, p], at their true positions, with no sinks, no
    retrieval and no re-rotation (the other fields are not read); ``selected`` is all -1.
  * ``softcap``: attention logits are soft-capped, ``softcap * tanh(scaling * q.k / softcap)``, before
    the softmax (gemma2). Block scores are not capped (tanh is monotone: the ranking is the same
    without an embedder bias, and the bias is added to the uncapped score).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpParams:
    """Static parameters of the fused retrieval-attention op."""

    block_size: int
    topk: int
    sink: int
    local: int
    scaling: float
    window: int | None = None  # a sliding-window layer: exact window attention (see the module docstring)
    softcap: float | None = None  # attention logit soft-capping

    def __post_init__(self):
        if self.window is not None and (isinstance(self.window, bool) or int(self.window) < 1):
            raise ValueError(f"OpParams.window must be None or an int >= 1, got {self.window!r}")
        if self.softcap is not None and not float(self.softcap) > 0:
            raise ValueError(f"OpParams.softcap must be None or > 0, got {self.softcap!r}")

    def span(self, chunk: int) -> int:
        """Largest query-key distance the op can produce for a chunk of ``chunk`` queries."""
        return self.sink + self.topk * self.block_size + self.local + self.block_size + chunk


@dataclass(frozen=True)
class RowLayout:
    s_end: int
    nmid: int
    local_start: int
    nsel: int


def row_layout(t: int, p: OpParams) -> RowLayout:
    s_end = min(p.sink, t)
    nmid = max(0, (t - p.local - s_end) // p.block_size)
    local_start = s_end + nmid * p.block_size
    return RowLayout(s_end, nmid, local_start, min(p.topk, nmid))


def middle_blocks(t: int, p: OpParams) -> int:
    """Number of complete middle blocks eligible for retrieval for a chunk starting at ``t``."""
    return row_layout(t, p).nmid

"""The block store as an embedding index of its blocks' text.

Choosing blocks by the model's own keys works poorly on small models (see README: the probe
measurements); choosing them by a sentence embedder — the block's decoded text against the text
of the last few tokens — works. Blocks are embedded lazily, once, the first time a question
needs them, so reading a long input costs no embedding until it is asked about.
"""
from __future__ import annotations

import torch

_FORCED = 1.0e4
# Embedding this many blocks at once (a first question over ~64K+ tokens) takes long enough to
# deserve a progress bar (shown on a terminal only).
_BAR_BLOCKS = 1024


class BlockTextIndex:
    def __init__(self, tokenizer, embedder, batch_size: int = 64):
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.batch_size = batch_size
        self.rows: dict[int, torch.Tensor] = {}  # row -> [n_blocks, dim] unit vectors

    def text(self, ids: list[int]) -> str:
        """The text of stored ids. Negative ids are placeholders without text (-1: a row fed as
        inputs_embeds, ``SUMMARY_ID``: a compressor's summary token) and decode to nothing."""
        return self.tokenizer.decode([i for i in ids if i >= 0])

    def _encode(self, texts: list[str]) -> torch.Tensor:
        from ..index.embed import encode

        # One short query per decode step runs on one thread: waking a second costs more than it
        # saves (and much more on a loaded machine); block batches use all threads.
        threads = 1 if len(texts) == 1 else None
        return torch.from_numpy(encode(self.embedder, texts, batch_size=self.batch_size, threads=threads))

    def ensure(self, row: int, ids: list[int], nblocks: int, sink: int, S: int) -> torch.Tensor:
        have = self.rows.get(row)
        n0 = 0 if have is None else have.shape[0]
        if nblocks > n0:
            texts = [self.text(ids[sink + j * S: sink + (j + 1) * S]) for j in range(n0, nblocks)]
            if len(texts) < _BAR_BLOCKS:
                new = self._encode(texts)
            else:
                from tqdm.auto import tqdm

                parts, step = [], 8 * self.batch_size
                with tqdm(total=len(texts), unit="block", desc="ctxmem: embedding blocks", leave=False,
                          disable=None) as bar:
                    for i in range(0, len(texts), step):
                        parts.append(self._encode(texts[i:i + step]))
                        bar.update(len(parts[-1]))
                new = torch.cat(parts)
            have = new if have is None else torch.cat([have, new])
            self.rows[row] = have
        return have[:nblocks]

    def similarities(self, row: int, ids: list[int], nblocks: int, sink: int, S: int, query: str) -> torch.Tensor:
        """Cosine similarity [nblocks] of the row's first ``nblocks`` blocks to ``query``'s text."""
        emb = self.ensure(row, ids, nblocks, sink, S)
        return emb @ self._encode([query])[0]

    def vote(self, row: int, ids: list[int], nmid: int, sink: int, S: int, *, query_tokens: int,
             hits: int, neighbors: int, margin: float | None = None) -> tuple[torch.Tensor, int]:
        """(bias [nmid], blocks voted): +1e4 + similarity on the top ``hits`` blocks and their
        neighbours, 0 elsewhere. With ``margin``, a hit whose similarity trails the best one by
        more than ``margin`` is dropped (the best one always stays)."""
        emb = self.ensure(row, ids, nmid, sink, S)
        query = self.text(ids[-query_tokens:])
        sims = emb @ self._encode([query])[0]
        bias = torch.zeros(nmid)
        order = torch.argsort(sims, descending=True)[:hits].tolist()
        if margin is not None and order:
            floor = float(sims[order[0]]) - margin
            order = [j for j in order if float(sims[j]) >= floor]
        for j in order:
            for n in range(max(0, j - neighbors), min(nmid, j + neighbors + 1)):
                bias[n] = max(float(bias[n]), _FORCED + float(sims[n]))
        return bias, int((bias > 0).sum())


def excerpt_spans(sims: torch.Tensor, budget_blocks: int, neighbors: int) -> list[tuple[int, int]]:
    """The blocks to read again, as spans ``[a, e)`` of block indices in document order.

    Blocks are taken in order of similarity, each with ``neighbors`` blocks on either side (cut at
    the ends); a candidate whose new blocks would exceed ``budget_blocks`` is skipped (a later one
    overlapping what is chosen may still fit), except that the best block alone always fits a
    budget of one. Adjacent or overlapping choices merge into one span.
    """
    n = int(sims.shape[0])
    if n == 0 or budget_blocks <= 0:
        return []
    chosen: set[int] = set()
    for j in torch.argsort(sims, descending=True, stable=True).tolist():
        new = set(range(max(0, j - neighbors), min(n, j + neighbors + 1))) - chosen
        if not chosen and len(new) > budget_blocks:
            new = {j}  # the best block fits even when its neighbours do not
        if len(chosen) + len(new) <= budget_blocks:
            chosen |= new
        if len(chosen) >= budget_blocks:
            break
    spans: list[tuple[int, int]] = []
    for j in sorted(chosen):
        if spans and spans[-1][1] == j:
            spans[-1] = (spans[-1][0], j + 1)
        else:
            spans.append((j, j + 1))
    return spans

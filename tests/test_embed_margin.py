"""The embed selector's margin: which blocks a question attends when ``embed_margin`` is set."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ctxmem
from ctxmem.memory.text_index import BlockTextIndex


class FixedIndex(BlockTextIndex):
    """Block embeddings and the query embedding given directly: similarity j = sims[j]."""

    def __init__(self, sims):
        super().__init__(tokenizer=None, embedder=None)
        n = len(sims)
        self.rows[0] = torch.eye(n + 1)[:n]  # block j = e_j
        self.query = torch.tensor(list(sims) + [0.0])  # <e_j, q> = sims[j]

    def text(self, ids):
        return ""

    def _encode(self, texts):
        return self.query[None]


def expected(sims, hits, neighbors, margin):
    """Plainly: hits = the top `hits` similarities within `margin` of the best; their neighbourhoods."""
    order = sorted(range(len(sims)), key=lambda j: -sims[j])[:hits]
    if margin is not None and order:
        order = [j for j in order if sims[j] >= sims[order[0]] - margin]
    chosen = set()
    for j in order:
        chosen.update(range(max(0, j - neighbors), min(len(sims), j + neighbors + 1)))
    return chosen


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=40, unique=True),
       st.integers(0, 5), st.integers(0, 3), st.one_of(st.none(), st.integers(0, 2000)))
def test_vote_keeps_hits_within_margin_and_counts_them(raw, hits, neighbors, margin):
    sims = [x / 1024 for x in raw]  # distinct (no ties) and exact in fp32, as is every difference
    m = None if margin is None else margin / 1024
    idx = FixedIndex(sims)
    bias, n = idx.vote(0, [0] * 8, len(sims), 0, 4, query_tokens=8, hits=hits, neighbors=neighbors, margin=m)
    want = expected(sims, hits, neighbors, m)
    assert {j for j in range(len(sims)) if bias[j] > 0} == want
    assert n == len(want)
    if hits:  # the best block always stays, whatever the margin
        assert int(torch.tensor(sims).argmax()) in want
    # an infinite margin is the plain top-`hits` rule
    assert torch.equal(idx.vote(0, [0] * 8, len(sims), 0, 4, query_tokens=8, hits=hits, neighbors=neighbors,
                                margin=math.inf)[0],
                       idx.vote(0, [0] * 8, len(sims), 0, 4, query_tokens=8, hits=hits, neighbors=neighbors)[0])


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.1", True])
def test_bad_margin_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="embed_margin"):
        ctxmem.MemoryConfig(embed_margin=bad)


def test_cli_set_parses_a_float_margin():
    from ctxmem.cli import _parse_overrides

    assert _parse_overrides(["embed_margin=0.1", "topk_blocks=3", "ram_budget=1e3"]) == \
        dict(embed_margin=0.1, topk_blocks=3, ram_budget="1e3")

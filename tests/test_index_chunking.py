"""Chunker properties: coverage exactly once modulo overlap, provenance, bounded windows."""
import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxmem.index import BadInputError, Chunker, WordTokenizer

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from ctxmem.models import embedder_path

    return AutoTokenizer.from_pretrained(embedder_path("minilm"))


def check_chunks(chunker: Chunker, text: str):
    chunks = chunker.chunk(text)
    starts, _ = chunker.boundaries(text)
    if len(starts) == 0:
        assert chunks == []
        return chunks
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    cores = []
    for i, c in enumerate(chunks):
        assert 0 <= c.start < c.end <= len(text)
        assert 1 <= c.n_tokens <= chunker.chunk_tokens
        # tokens inside the chunk's span: exactly its n_tokens (the span runs to the next token)
        inside = np.count_nonzero((starts >= c.start) & (starts < c.end))
        assert inside == c.n_tokens
        if i:
            p = chunks[i - 1]
            assert p.start < c.start <= p.end, "starts increase and no gap"
            shared = np.count_nonzero((starts >= c.start) & (starts < p.end))
            assert shared <= chunker.overlap, "consecutive chunks share at most `overlap` tokens"
        nxt = chunks[i + 1].start if i + 1 < len(chunks) else len(text)
        cores.append(text[c.start:nxt])
    # the cores partition the text: every character exactly once, modulo overlaps
    assert "".join(cores) == text
    return chunks


words = st.sampled_from(["the", "cat", "sat", "on", "mat", "naïve", "café", "x", "日本語", "😀", "a-b", "don't",
                         "supercalifragilisticexpialidocious", "1234", "##", "\u200b", "\x00"])
seps = st.sampled_from([" ", "  ", "\n", "\n\n", "\t", ", ", ". ", ""])
texty = st.lists(st.tuples(words, seps), max_size=300).map(lambda xs: "".join(a + b for a, b in xs))
any_text = st.one_of(texty, st.text(max_size=400))
params = st.tuples(st.integers(1, 40), st.integers(0, 39)).filter(lambda t: t[1] < t[0])


@SETTINGS
@given(text=any_text, p=params)
def test_word_chunker_covers_text_exactly_once(text, p):
    check_chunks(Chunker(WordTokenizer(), chunk_tokens=p[0], overlap=p[1]), text)


@SETTINGS
@given(text=any_text, p=params)
def test_minilm_chunker_covers_text_exactly_once(text, p):
    check_chunks(Chunker(minilm_tokenizer(), chunk_tokens=p[0], overlap=p[1]), text)


@SETTINGS
@given(text=any_text, p=params, max_chars=st.integers(8, 64))
def test_windows_are_bounded_in_characters(text, p, max_chars):
    chunker = Chunker(minilm_tokenizer(), chunk_tokens=p[0], overlap=p[1], max_chars=max_chars)
    starts, _ = chunker.boundaries(text)
    for c in check_chunks(chunker, text):
        # from the chunk's first token to its last token's start: within max_chars
        inside = starts[(starts >= c.start) & (starts < c.end)]
        assert inside[-1] - inside[0] <= max_chars


def test_enormous_line_and_whitespace_are_cut():
    tok = minilm_tokenizer()
    chunker = Chunker(tok, chunk_tokens=64, overlap=8)
    text = "start " + "y" * 200_000 + " " * 50_000 + "end"
    chunks = check_chunks(chunker, text)
    assert max(c.end - c.start for c in chunks) <= chunker.max_chars + chunker.max_chars // 4 + 1


def test_word_boundaries_are_preferred():
    chunker = Chunker(minilm_tokenizer(), chunk_tokens=16, overlap=4)
    text = "tokenization internationalization unbelievably " * 20
    for c in chunker.chunk(text)[1:]:
        assert text[c.start - 1] == " ", "a chunk after the first starts at a word"


@pytest.mark.parametrize("ct,ov", [(0, 0), (4, 4), (4, -1), (3.5, 0)])
def test_bad_sizes_are_refused(ct, ov):
    with pytest.raises(BadInputError):
        Chunker(None, chunk_tokens=ct, overlap=ov)

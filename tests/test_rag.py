"""Plain RAG, the benchmarks' peer method (benchmarks.common.rag_retrieve, benchmarks.suite.rag_ids):
the chunk holding the needle ranks first and is in the prompt the model reads; chunks cover the
document. A deterministic hashing embedder (no model), so this runs in well under a second."""
import random

from benchmarks.common import passkey_needle, rag_retrieve
from ctxmem.index.embed import HashingEmbedder

WORDS = ("river stone lamp window garden copper violet harbor meadow lantern candle orchard "
         "thunder pebble silver market bridge forest").split()


def _document(seed=0, n_words=3000, needle_at=0.6):
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    cut = int(n_words * needle_at)
    needle = passkey_needle("48213").strip()
    return " ".join(words[:cut]) + " " + needle + " " + " ".join(words[cut:]), needle


def test_needle_chunk_ranks_first_and_is_read():
    doc, needle = _document()
    emb = HashingEmbedder(512)
    pick = rag_retrieve(doc, "What is the pass key?", emb, k=3, chunk_tokens=120, overlap=60)
    a, b, best = pick.ranked[0]
    assert "48213" in doc[a:b]  # the best-ranked chunk holds the needle
    assert all(best > s for _, _, s in pick.ranked[1:]) or len(pick.ranked) == 1
    # ... and the text handed to the model holds the needle, whole
    assert needle in pick.text
    # the model reads less than the document: at most k chunks
    assert len(pick.text) < len(doc) / 5
    assert len(pick.ranked) == 3 and len(pick.spans) <= 3


def test_chunks_cover_the_document_in_order():
    doc, _ = _document(seed=1, n_words=2000)
    pick = rag_retrieve(doc, "pass key", HashingEmbedder(256), k=2, chunk_tokens=100, overlap=50)
    ch = pick.chunks
    assert ch[0][0] == 0 and ch[-1][1] == len(doc)
    for (a0, b0), (a1, b1) in zip(ch, ch[1:]):
        assert a0 < a1 <= b0  # no gap, starts increase
    # about half of each chunk is shared with the next (50% overlap)
    shared = [b0 - a1 for (a0, b0), (a1, _) in zip(ch, ch[1:])]
    sizes = [b - a for a, b in ch[:-1]]
    assert 0.3 < sum(shared) / sum(sizes) < 0.7
    # the picked text is the picked spans of the document, in document order
    spans = pick.spans
    assert spans == sorted(spans)
    assert pick.text == "\n\n".join(doc[a:b].strip() for a, b in spans)


def test_suite_rag_prompt_keeps_the_template(monkeypatch):
    """rag_ids replaces only the haystack: the chat frame, question and answer opening are the sample's."""
    from benchmarks.suite import rag_ids
    from benchmarks.tasks import Sample

    class Tok:  # words as token ids, enough for this check
        vocab: dict = {}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}

        def decode(self, ids):
            inv = {v: k for k, v in self.vocab.items()}
            return " ".join(inv[i] for i in ids)

    tok = Tok()
    doc, needle = _document(seed=2, n_words=1500)
    pre, hay, post = tok("<user> Find it."), tok(doc)["input_ids"], tok("What is the pass key? <assistant> The")
    ids = pre["input_ids"] + hay + post["input_ids"]
    s0 = len(pre["input_ids"])
    nid = tok(needle)["input_ids"]
    j = next(i for i in range(len(ids)) if ids[i:i + len(nid)] == nid)
    smp = Sample(task="t", length=len(ids), depth=0.5, seed=0, ids=ids, answers=["48213"],
                 question="What is the pass key?", context=doc, haystack_span=(s0, s0 + len(hay)),
                 needle_spans=[(j, j + len(nid))])
    out, info = rag_ids(tok, smp, HashingEmbedder(512), k=3)
    assert out[:s0] == ids[:s0] and out[-len(post["input_ids"]):] == post["input_ids"]
    assert info["rag_hit"] is True and "48213" in tok.decode(out)
    assert len(out) < len(ids) / 3

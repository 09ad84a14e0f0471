"""The real bundled embedder (all-MiniLM-L6-v2): semantic retrieval, persistence, context."""
import numpy as np
import pytest

import ctxmem
from ctxmem.index import KnowledgeIndex, knowledge_context, read_source_text

pytestmark = pytest.mark.slow

DOCS = {
    "cooking.txt": "To bake bread, mix flour, water, salt and yeast. Knead the dough for ten minutes, let it rise "
                   "for an hour, then bake it in a hot oven until the crust is golden brown.",
    "astronomy.txt": "Jupiter is the largest planet in the solar system. It is a gas giant with a great red spot, a "
                     "storm larger than the Earth that has lasted for centuries.",
    "networking.txt": "TCP provides reliable, ordered delivery of a stream of bytes between applications. It uses "
                      "acknowledgements and retransmission to recover lost packets.",
    "gardening.txt": "Tomatoes need full sun and regular watering. Stake the plants so the stems do not break under "
                     "the weight of the fruit, and pinch off the side shoots.",
}


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    for name, text in DOCS.items():
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs" / name).write_text(text)
    return KnowledgeIndex.build([root / "docs"], root / "kb", chunk_tokens=32, overlap=8, progress=False), root


def test_semantic_search_finds_the_right_document(kb):
    kb, root = kb
    info = kb.info()
    assert info["embedder"] == "minilm" and info["dim"] == 384 and info["index_type"] == "flat"
    cases = {"how do I make a loaf of bread": "cooking.txt", "biggest planet storm": "astronomy.txt",
             "how are dropped packets recovered": "networking.txt", "growing tomato plants": "gardening.txt"}
    for q, want in cases.items():
        hits = kb.search(q, k=3)
        assert hits[0].source.endswith(want), (q, hits[0])
        assert read_source_text(hits[0].source)[hits[0].start:hits[0].end] == hits[0].text
    # dense scores are cosines of the real embedder, in the index and in numpy alike
    emb = ctxmem.load_embedder("minilm")
    q = emb.encode(["biggest planet storm"], normalize_embeddings=True)
    ids, vecs = kb.vectors()
    best = float(np.max(vecs @ q[0]))
    assert abs(kb.search("biggest planet storm", 1, mode="dense")[0].score - best) < 1e-4


def test_reopen_equals_and_refuses_another_embedder(kb):
    kb, root = kb
    again = KnowledgeIndex.open(root / "kb")
    assert again.search("tomatoes", 4) == kb.search("tomatoes", 4)
    with pytest.raises(ctxmem.index.EmbedderMismatchError):
        KnowledgeIndex.open(root / "kb", embedder="hash:384").search("x")


def test_knowledge_context_with_the_real_kb(kb):
    kb, _ = kb
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ctxmem.models.embedder_path("minilm"))
    ctx = knowledge_context(kb, "What storm is on Jupiter?", tok, budget_tokens=80, k=4)
    assert "great red spot" in ctx and len(tok.encode(ctx, add_special_tokens=False)) <= 80
    first = ctx.splitlines()[1]
    assert first.startswith("[1] ") and "astronomy.txt" in first  # the best source comes first

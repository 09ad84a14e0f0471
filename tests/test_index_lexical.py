"""The lexical (BM25) side of a KB and the hybrid search: scores equal bm25s's own index, the fusion
equals a plain reference RRF, a copied phrase finds its chunk, old KBs still open and upgrade, and a
damaged lexical file is named."""
import io
import json
import random
import re
import shutil
import warnings
from contextlib import redirect_stdout

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxmem._envelope import write_envelope
from ctxmem.index import BadInputError, IndexCorruptError, KnowledgeIndex, lexical, verify_kb
from ctxmem.index.cli import main as index_cli
from ctxmem.index.manifest import FORMAT, MANIFEST, VERSION, read_manifest
from ctxmem.index.testing import WORDS, chunk_list, write_corpus

KW = dict(embedder="hash:64", chunk_tokens=12, overlap=3, progress=False, commit_every=20)
QUERIES = ["alpha beta gamma", "river mountain castle", "omega thunder velvet willow", "copper harbor"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("lex")
    write_corpus(root / "docs", n_files=6, words_per_file=150, seed=8)
    kb = KnowledgeIndex.build([root / "docs"], root / "kb", **KW)
    return root, kb


# ----------------------------------------------------------------------------- against references

texts_st = st.lists(st.lists(st.sampled_from(WORDS[:30] + ["the", "and", "x"]), min_size=1, max_size=30)
                    .map(" ".join), min_size=2, max_size=40)


@settings(max_examples=25, deadline=None)
@given(texts=texts_st, split=st.integers(1, 5), query=st.lists(st.sampled_from(WORDS[:30]), min_size=1, max_size=4))
def test_bm25_scores_equal_bm25s_own_index(texts, split, query):
    """Our vectorised build from per-segment term counts (segments split anywhere, rows given out of
    id order) scores every chunk as bm25s's own ``BM25.index`` does."""
    import bm25s

    toks = bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)
    if any(not t for t in toks):  # bm25s gives token-less documents a placeholder token; we do not
        return
    bounds = np.linspace(0, len(texts), min(split, len(texts)) + 1).astype(int)
    pieces = [(lexical.count_terms(texts[a:b]), np.arange(b - a), np.arange(a, b) * 5 + 3)
              for a, b in zip(bounds[:-1], bounds[1:]) if b > a][::-1]
    ours = lexical.LexicalSearcher(lexical.build_arrays(pieces))
    ref = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    ref.index(toks, show_progress=False)
    q = " ".join(query)
    qt = [t for t in lexical.query_terms(q) if t in ours.vocab]
    got = ours.bm25.get_scores([ours.vocab[t] for t in qt]) if qt else np.zeros(len(texts), np.float32)
    want = ref.get_scores(qt) if qt else np.zeros(len(texts), np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    ids, scores = ours.search(q, 5)
    order = sorted(range(len(texts)), key=lambda i: (-want[i], i))
    expect = [i * 5 + 3 for i in order if want[i] > 0][:5]
    assert ids.tolist() == expect


def rrf_reference(rankings, k, k0=60):
    score = {}
    for ranking in rankings:
        for pos, doc in enumerate(ranking):
            score[doc] = score.get(doc, 0.0) + 1.0 / (k0 + pos + 1)
    return sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


@settings(max_examples=60, deadline=None)
@given(a=st.lists(st.integers(0, 40), unique=True, max_size=25), b=st.lists(st.integers(0, 40), unique=True,
                                                                            max_size=25), k=st.integers(1, 30))
def test_rrf_equals_a_plain_reference(a, b, k):
    ids, scores = lexical.rrf([np.array(a, np.int64), np.array(b, np.int64)], k)
    want = rrf_reference([a, b], k)
    assert ids.tolist() == [d for d, _ in want]
    np.testing.assert_allclose(scores, [s for _, s in want], rtol=1e-12)


def fuse_reference(dense, lex, k, query, text_of):
    """RRF, then +1 for chunks among the BM25 top 10 holding the query's words in order."""
    score = dict(rrf_reference([dense, lex], 10**9))
    words = re.findall(r"\w+", query.lower())
    if len(words) >= 2 or (len(words) == 1 and len(words[0]) >= 6 and re.search(r"_|[a-z][A-Z]|[A-Za-z]\d", query)):
        pattern = r"(?<!\w)" + r"\W+".join(map(re.escape, words)) + r"(?!\w)"
        for c in lex[:10]:
            if re.search(pattern, text_of(c).lower()):
                score[c] += 1.0
    return sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


@settings(max_examples=60, deadline=None)
@given(a=st.lists(st.integers(0, 30), unique=True, max_size=20), b=st.lists(st.integers(0, 30), unique=True,
                                                                            max_size=20), k=st.integers(1, 25),
       query=st.sampled_from(["alpha beta", "beta", "read_source_text", "getLogger", "Alpha, BETA!", "x y"]))
def test_fuse_equals_a_plain_reference(a, b, k, query):
    docs = {i: " ".join(random.Random(i).choice(["alpha", "beta", "gamma", "read_source_text", "getlogger",
                                                  "x", "y", "\n"]) for _ in range(6)) for i in range(31)}
    ids, scores = lexical.fuse(a, b, k, query, docs.__getitem__)
    want = fuse_reference(a, b, k, query, docs.__getitem__)
    assert ids.tolist() == [d for d, _ in want]
    np.testing.assert_allclose(scores, [s for _, s in want], rtol=1e-12)


# ----------------------------------------------------------------------------- through the KB

def test_copied_phrase_finds_its_chunk(built):
    root, kb = built
    chunks = [h for _, h in kb.iter_chunks()]
    texts = [h.text for h in chunks]
    rng = random.Random(0)
    tried = 0
    for h in rng.sample(chunks, len(chunks)):
        words = h.text.split()
        if len(words) < 7:
            continue
        phrase = " ".join(words[1:7])
        holders = {(c.source, c.start) for c in chunks if phrase in c.text}
        if len(holders) != 1:  # only phrases that stand in one chunk
            continue
        tried += 1
        lex = kb.search(phrase, k=1, mode="lexical")
        assert (lex[0].source, lex[0].start) in holders, phrase
        hyb = kb.search(phrase, k=1)  # exact words first
        assert (hyb[0].source, hyb[0].start) in holders, phrase
        if tried == 15:
            break
    assert tried >= 10 and len(texts) > 30


def test_modes_and_scores(built):
    _, kb = built
    for q in QUERIES:
        dense = kb.search(q, k=8, mode="dense")
        lex = kb.search(q, k=8, mode="lexical")
        hyb = kb.search(q, k=8)
        assert hyb == kb.search(q, k=8, mode="hybrid") and len(hyb) == 8
        assert [h.score for h in lex] == sorted((h.score for h in lex), reverse=True) and lex[0].score > 0
        # the fused scores: RRF over the two rankings cut at depth 50, then exact words first
        d50 = kb.rank_many([q], 50, mode="dense")[0][0].tolist()
        l50 = kb.rank_many([q], 50, mode="lexical")[0][0].tolist()
        want = fuse_reference(d50, l50, 8, q, lambda c: kb.get(c).text)
        assert [s for _, s in want] == pytest.approx([h.score for h in hyb], rel=1e-12)
        assert [kb.get(d).start for d, _ in want] == [h.start for h in hyb]
    assert kb.search("zzzz qqqq", k=5, mode="lexical") == []  # no query term in the vocabulary
    with pytest.raises(BadInputError, match="mode"):
        kb.search("x", mode="fuzzy")


def _strip_lexical(kb_dir):
    """Make a KB look written before the lexical index: no lexical entry, no .lex files."""
    m = read_manifest(kb_dir)
    m.pop("lexical")
    for f in [f for f in m["files"] if f.endswith((".lex", ".bm25"))]:
        del m["files"][f]
        (kb_dir / f).unlink()
    write_envelope(kb_dir / MANIFEST, FORMAT, VERSION, m)


def test_old_kb_opens_dense_only_then_upgrades_without_embedding(built, tmp_path, monkeypatch):
    root, kb = built
    old = tmp_path / "old"
    shutil.copytree(root / "kb", old)
    _strip_lexical(old)
    verify_kb(old)
    okb = KnowledgeIndex.open(old)
    assert not okb.has_lexical and okb.info()["lexical"] is None
    with pytest.warns(UserWarning, match="no lexical index"):
        hyb = okb.search(QUERIES[0], k=5)
    assert hyb == kb.search(QUERIES[0], k=5, mode="dense")
    with pytest.raises(BadInputError, match="ctxmem index upgrade"):
        okb.search(QUERIES[0], mode="lexical")
    # upgrading embeds nothing
    monkeypatch.setattr("ctxmem.index.embed.encode", lambda *a, **k: pytest.fail("upgrade embedded"))
    out = io.StringIO()
    with redirect_stdout(out):
        assert index_cli(["index", "upgrade", str(old), "--json"]) == 0
    rep = json.loads(out.getvalue())
    assert rep["changed"] and rep["lexical"]["count"] == len(kb)
    monkeypatch.undo()
    verify_kb(old)
    new = KnowledgeIndex.open(old)
    assert new.has_lexical and chunk_list(new) == chunk_list(kb)
    for q in QUERIES:
        assert new.search(q, k=6) == kb.search(q, k=6)
        assert new.search(q, k=6, mode="lexical") == kb.search(q, k=6, mode="lexical")
    assert not KnowledgeIndex.upgrade(old)["changed"]  # idempotent


def test_add_to_an_old_kb_adds_the_lexical_index(built, tmp_path):
    root, _ = built
    old = tmp_path / "old"
    shutil.copytree(root / "kb", old)
    _strip_lexical(old)
    extra = write_corpus(tmp_path / "extra", n_files=2, words_per_file=60, seed=9, subdirs=0)
    kb = KnowledgeIndex.add_to(old, extra)
    assert kb.has_lexical
    ref = KnowledgeIndex.build([root / "docs", *extra], tmp_path / "ref", **KW)
    for q in QUERIES:
        assert [(h.source, h.start) for h in kb.search(q, k=5, mode="lexical")] == \
               [(h.source, h.start) for h in ref.search(q, k=5, mode="lexical")]
    verify_kb(old)


def test_query_cli_modes_print_clean_json(built):
    root, kb = built
    for mode in ("hybrid", "dense", "lexical"):
        out = io.StringIO()
        with redirect_stdout(out):
            assert index_cli(["index", "query", str(root / "kb"), "copper harbor", "-k", "3", "--mode", mode,
                              "--json"]) == 0
        doc = json.loads(out.getvalue())
        assert doc["mode"] == mode and len(doc["hits"]) == 3
        assert [h["start"] for h in doc["hits"]] == [h.start for h in kb.search("copper harbor", 3, mode=mode)]


def test_lexical_index_that_disagrees_with_the_manifest_is_named(built, tmp_path):
    """A well-formed, correctly checksummed BM25 file over other chunks: caught by the ids digest."""
    root, kb = built
    work = tmp_path / "kb"
    shutil.copytree(root / "kb", work)
    m = read_manifest(work)
    fname = m["lexical"]["file"]
    a = lexical.decode_index((work / fname).read_bytes(), fname)
    a.ids = a.ids + 1
    data = lexical.encode_index(a)
    (work / fname).write_bytes(data)
    from ctxmem.index.manifest import sha256_bytes
    m["files"][fname] = {"sha256": sha256_bytes(data), "size": len(data)}
    write_envelope(work / MANIFEST, FORMAT, VERSION, m)
    with pytest.raises(IndexCorruptError) as ei:
        verify_kb(work)
    assert ei.value.path == str(work / fname)
    with pytest.raises(IndexCorruptError) as ei:
        KnowledgeIndex.open(work).search("copper harbor", mode="lexical")
    assert ei.value.path == str(work / fname)


def test_every_kb_file_kind_is_present(built):
    root, _ = built
    files = read_manifest(root / "kb")["files"]
    assert sum(f.endswith(".lex") for f in files) == sum(f.endswith(".chunks") for f in files) >= 2
    assert sum(f.endswith(".bm25") for f in files) == 1


def test_damaged_term_counts_are_named_when_the_bm25_index_is_rebuilt(built, tmp_path):
    root, kb = built
    work = tmp_path / "kb"
    shutil.copytree(root / "kb", work)
    lex = sorted(f for f in read_manifest(work)["files"] if f.endswith(".lex"))[0]
    b = bytearray((work / lex).read_bytes())
    b[len(b) // 2] ^= 0xFF
    (work / lex).write_bytes(bytes(b))
    assert KnowledgeIndex.open(work).search("copper harbor", k=3) == kb.search("copper harbor", k=3)  # not read
    extra = write_corpus(tmp_path / "extra", n_files=1, words_per_file=40, seed=10, subdirs=0)
    with pytest.raises(IndexCorruptError) as ei:
        KnowledgeIndex.add_to(work, extra)
    assert ei.value.path == str(work / lex)


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(st.text(alphabet="ab c_\n.é", max_size=40), min_size=0, max_size=12))
def test_save_load_is_the_identity(texts):
    st_ = lexical.count_terms(texts)
    back = lexical.decode_segment(lexical.encode_segment(st_), "seg.lex", len(texts))
    assert back.terms == st_.terms and back.n == len(texts)
    for f in ("doc_len", "indptr", "term", "tf"):
        np.testing.assert_array_equal(getattr(back, f), getattr(st_, f))
    # every chunk's counts are its tokens' counts
    _, ids = lexical.tokenize(texts) if texts else ([], [])
    for i, toks in enumerate(ids):
        a, b = st_.indptr[i], st_.indptr[i + 1]
        assert dict(zip(st_.term[a:b].tolist(), st_.tf[a:b].tolist())) == \
            {t: toks.count(t) for t in set(toks)} and st_.doc_len[i] == len(toks)
    arr = lexical.build_arrays([(st_, np.arange(len(texts)), np.arange(len(texts)))])
    again = lexical.decode_index(lexical.encode_index(arr), "x.bm25")
    assert again.vocab == arr.vocab and again.avgdl == arr.avgdl
    for f in ("ids", "data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(again, f), getattr(arr, f))


def test_query_cli_on_an_old_kb_notes_dense_only_on_stderr(built, tmp_path, capsys):
    root, kb = built
    old = tmp_path / "old"
    shutil.copytree(root / "kb", old)
    _strip_lexical(old)
    assert index_cli(["index", "query", str(old), "copper harbor", "-k", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["mode"] == "dense" and "no lexical index" in err and "ctxmem index upgrade" in err
    assert index_cli(["index", "query", str(old), "copper harbor", "--mode", "lexical", "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["kind"] == "BadInputError"

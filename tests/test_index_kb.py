"""KnowledgeIndex end to end, with the deterministic HashingEmbedder (the public embedder hook)."""
import io
import os
import shutil
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxmem.index import (BadInputError, EmbedderMismatchError, HashingEmbedder, IndexCorruptError,
                          IndexVersionError, KnowledgeIndex, read_source_text)
from ctxmem.index import ann
from ctxmem._envelope import pack
from ctxmem.index.manifest import MANIFEST, VERSION
from ctxmem.index.testing import WORDS, chunk_set, write_corpus

EMB = "hash:64"
KW = dict(embedder=EMB, chunk_tokens=12, overlap=3, progress=False)
QUERIES = ["alpha beta gamma", "river mountain castle", "omega thunder velvet willow", "copper harbor"]


@pytest.fixture()
def corpus(tmp_path):
    write_corpus(tmp_path / "docs", n_files=8, words_per_file=120, seed=3)
    return tmp_path


def brute_force(kb, text, k):
    ids, vecs = kb.vectors()
    q = HashingEmbedder(64).encode([text])[0]
    s = vecs @ q
    order = np.argsort(-s, kind="stable")[:k]
    return s[order], ids[order]


def test_build_search_is_exact_and_provenance_maps_back(corpus):
    kb = KnowledgeIndex.build([corpus / "docs"], corpus / "kb", **KW)
    info = kb.info()
    assert info["index_type"] == "flat" and info["sources"] == 8 and info["dim"] == 64
    assert info["embedder"] == EMB and info["chunks"] == len(kb) > 8
    for q in QUERIES:
        hits = kb.search(q, k=7, mode="dense")
        scores, _ = brute_force(kb, q, 7)
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
    # every chunk's text is exactly its span of the decoded source
    for _, h in kb.iter_chunks():
        assert read_source_text(h.source)[h.start:h.end] == h.text
    # the chunks of one source, in order, cover it exactly once modulo overlap
    by_src = {}
    for _, h in kb.iter_chunks():
        by_src.setdefault(h.source, []).append(h)
    for src, hs in by_src.items():
        text = read_source_text(src)
        hs.sort(key=lambda h: h.start)
        cores = [text[h.start:(hs[i + 1].start if i + 1 < len(hs) else len(text))] for i, h in enumerate(hs)]
        assert "".join(cores) == text


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_open_search_equals_search_before_saving(tmp_path, kind):
    write_corpus(tmp_path / "docs", n_files=6, words_per_file=700 if kind == "ivfpq" else 150, seed=4)
    kb = KnowledgeIndex.build([tmp_path / "docs"], tmp_path / "kb", index=kind, embedder=EMB, chunk_tokens=4,
                              overlap=1, progress=False)
    assert kb.info()["index_type"] == kind
    before = [kb.search(q, k=10) for q in QUERIES]
    again = KnowledgeIndex.open(tmp_path / "kb")
    assert [again.search(q, k=10) for q in QUERIES] == before
    # the copy of the folder elsewhere is the same KB
    shutil.copytree(tmp_path / "kb", tmp_path / "kb2")
    assert [KnowledgeIndex.open(tmp_path / "kb2").search(q, k=10) for q in QUERIES] == before


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_extra=st.integers(1, 3), seed=st.integers(0, 1000), k=st.integers(1, 12))
def test_add_then_remove_restores_search_results(tmp_path_factory, n_extra, seed, k):
    root = tmp_path_factory.mktemp("addrm")
    write_corpus(root / "docs", n_files=5, words_per_file=100, seed=seed)
    extra = write_corpus(root / "extra", n_files=n_extra, words_per_file=100, seed=seed + 1, subdirs=0)
    kb = KnowledgeIndex.build([root / "docs"], root / "kb", **KW)
    before = [kb.search(q, k=k) for q in QUERIES]
    chunks_before = chunk_set(kb)
    kb.add(extra)
    assert len(kb.sources) == 5 + n_extra
    for p in extra:
        kb.remove(p)
    assert chunk_set(kb) == chunks_before
    assert [kb.search(q, k=k) for q in QUERIES] == before
    assert [KnowledgeIndex.open(root / "kb").search(q, k=k) for q in QUERIES] == before
    kb.verify()


def test_remove_folder_and_unknown_source(corpus):
    kb = KnowledgeIndex.build([corpus / "docs"], corpus / "kb", **KW)
    n = kb.remove(corpus / "docs" / "d0")
    assert n > 0 and all("/d0/" not in s for s in kb.sources) and len(kb.sources) == 4
    kb.verify()
    with pytest.raises(BadInputError, match="no source"):
        kb.remove(corpus / "nope.txt")


def test_rerun_does_no_work_and_changed_file_is_reembedded(corpus, monkeypatch):
    docs = corpus / "docs"
    kb = KnowledgeIndex.build([docs], corpus / "kb", **KW)
    manifest_before = (corpus / "kb" / MANIFEST).read_bytes()
    calls = []
    orig = HashingEmbedder.encode
    monkeypatch.setattr(HashingEmbedder, "encode",
                        lambda self, texts, **kw: calls.append(len(texts)) or orig(self, texts))
    kb2 = KnowledgeIndex.build([docs], corpus / "kb", **KW)
    assert kb2.last_summary["chunks_embedded"] == 0 and kb2.last_summary["sources_reused"] == 8
    assert sum(calls) == 1  # only the embedder probe
    assert (corpus / "kb" / MANIFEST).read_bytes() == manifest_before, "an unchanged rerun writes nothing"
    # change one file, delete another
    victim = sorted(docs.rglob("*.txt"))[0]
    victim.write_text("copper harbor lantern meadow " * 10)
    gone = sorted(docs.rglob("*.txt"))[1]
    gone.unlink()
    kb3 = KnowledgeIndex.build([docs], corpus / "kb", **KW)
    s = kb3.last_summary
    assert s["sources_indexed"] == 1 and s["sources_reused"] == 6 and s["sources_removed"] == 1
    clean = KnowledgeIndex.build([docs], corpus / "clean", **KW)
    assert chunk_set(kb3) == chunk_set(clean)
    assert [h.source for h in kb3.search("copper harbor", 3)][0] == str(victim)
    kb3.verify()


def test_include_exclude_jsonl_and_stdin(tmp_path, monkeypatch):
    d = tmp_path / "src"
    (d / "a").mkdir(parents=True)
    (d / "a" / "keep.md").write_text("river mountain castle engine")
    (d / "a" / "skip.txt").write_text("garden violin copper")
    (d / "a" / "build").mkdir()
    (d / "a" / "build" / "gen.md").write_text("generated text")
    (d / ".hidden").mkdir()
    (d / ".hidden" / "x.md").write_text("hidden text")
    (d / "r.jsonl").write_text('{"text": "alpha beta"}\n{"id": 3}\nnot json\n\n{"text": "gamma delta epsilon"}\n')
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"stdin thunder velvet")))
    kb = KnowledgeIndex.build([d, "-"], tmp_path / "kb", include=["*.md", "*.jsonl"], exclude=["build"], **KW)
    srcs = {h.source for _, h in kb.iter_chunks()}
    assert srcs == {str(d / "a" / "keep.md"), f"{d / 'r.jsonl'}#L1", f"{d / 'r.jsonl'}#L5", "<stdin>"}
    assert read_source_text(f"{d / 'r.jsonl'}#L5") == "gamma delta epsilon"
    notes = kb.last_summary["notes"]
    assert any("2 JSONL line(s) skipped" in n["note"] for n in notes)
    assert kb.search("velvet thunder", 1)[0].source == "<stdin>"


def test_bad_inputs_are_skipped_and_reported(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "good.txt").write_text("alpha beta gamma delta " * 20)
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_bytes(b" \n\t \n")
    (d / "bin.dat").write_bytes(bytes(range(256)) * 8)
    (d / "latin1.txt").write_bytes("café crème brûlée ".encode("latin-1") * 5)
    (d / "garbage.txt").write_bytes(bytes(range(128, 256)) * 20)
    (d / "bom16.txt").write_bytes("utf sixteen text here".encode("utf-16"))
    (d / "long.txt").write_text("w" * 300_000 + "\nshort line\n")
    os.symlink(d / "missing-target", d / "dangling.txt")
    kb = KnowledgeIndex.build([d, tmp_path / "does-not-exist"], tmp_path / "kb", **KW)
    s = kb.last_summary
    reasons = {os.path.basename(x["source"]): x["reason"] for x in s["skipped"]}
    assert reasons["empty.txt"] == "empty" and reasons["blank.txt"] == "empty"
    assert reasons["bin.dat"].startswith("binary") and reasons["garbage.txt"].startswith("binary")
    assert reasons["dangling.txt"].startswith("unreadable") and reasons["does-not-exist"].startswith("unreadable")
    notes = {os.path.basename(x["source"]): x["note"] for x in s["notes"]}
    assert "U+FFFD" in notes["latin1.txt"] and "longest line 300000" in notes["long.txt"]
    assert set(map(os.path.basename, kb.sources)) == {"good.txt", "latin1.txt", "bom16.txt", "long.txt"}
    assert read_source_text(str(d / "bom16.txt")) == "utf sixteen text here"
    for _, h in kb.iter_chunks():  # the enormous line is cut into bounded chunks
        assert len(h.text) <= max(256, 16 * 12) * 1.25 + 1
        assert read_source_text(h.source)[h.start:h.end] == h.text
    with pytest.raises(BadInputError, match="nothing to index"):
        KnowledgeIndex.build([d / "empty.txt", d / "bin.dat"], tmp_path / "kb-empty", **KW)
    assert not (tmp_path / "kb-empty").exists(), "a failed first build leaves nothing behind"


def test_other_embedder_is_refused(corpus):
    kb = KnowledgeIndex.build([corpus / "docs"], corpus / "kb", **KW)
    with pytest.raises(EmbedderMismatchError, match="dim"):
        KnowledgeIndex.open(corpus / "kb", embedder="hash:32")

    class Shuffled(HashingEmbedder):  # same name and dim, different vectors
        def encode(self, texts, **kw):
            return super().encode(texts)[:, ::-1].copy()

    with pytest.raises(EmbedderMismatchError, match="embeds differently"):
        KnowledgeIndex.open(corpus / "kb", embedder=Shuffled(64)).search("x")
    with pytest.raises(EmbedderMismatchError):
        KnowledgeIndex.build([corpus / "docs"], corpus / "kb", **{**KW, "embedder": "hash:32"})
    with pytest.raises(EmbedderMismatchError):
        kb.search_vectors(np.ones((1, 32), np.float32))
    with pytest.raises(BadInputError, match="chunk_tokens"):
        KnowledgeIndex.build([corpus / "docs"], corpus / "kb", **{**KW, "chunk_tokens": 20})


def test_wrong_manifest_version_is_refused(corpus):
    KnowledgeIndex.build([corpus / "docs"], corpus / "kb", **KW)
    path = corpus / "kb" / MANIFEST
    outer = msgpack.unpackb(path.read_bytes(), raw=False)
    outer["version"] = VERSION + 1
    path.write_bytes(pack(outer))
    with pytest.raises(IndexVersionError, match=f"{MANIFEST}.*version {VERSION + 1}"):
        KnowledgeIndex.open(corpus / "kb")
    with pytest.raises(IndexCorruptError):  # IndexVersionError is an IndexCorruptError
        KnowledgeIndex.build([corpus / "docs"], corpus / "kb", **KW)


def test_bad_folders_and_arguments(tmp_path, corpus):
    (tmp_path / "notkb").mkdir()
    (tmp_path / "notkb" / "precious.txt").write_text("x")
    with pytest.raises(BadInputError, match="not a ctxmem KB"):
        KnowledgeIndex.build([corpus / "docs"], tmp_path / "notkb", **KW)
    assert (tmp_path / "notkb" / "precious.txt").read_text() == "x"
    with pytest.raises(BadInputError):
        KnowledgeIndex.open(tmp_path / "nothing-here")
    with pytest.raises(IndexCorruptError, match="missing"):
        KnowledgeIndex.open(tmp_path / "notkb")
    with pytest.raises(BadInputError, match="unknown index type"):
        KnowledgeIndex.build([corpus / "docs"], tmp_path / "kb", index="lsh", **KW)

    class Limited(HashingEmbedder):
        max_seq_length = 10

    with pytest.raises(BadInputError, match="chunk_tokens=12"):
        KnowledgeIndex.build([corpus / "docs"], tmp_path / "kb", **{**KW, "embedder": Limited(64)})


def test_kb_folder_inside_a_source_folder_is_not_indexed(corpus):
    kb = KnowledgeIndex.build([corpus / "docs"], corpus / "docs" / "kb", **KW)
    kb2 = KnowledgeIndex.build([corpus / "docs"], corpus / "docs" / "kb", **KW)
    assert kb2.last_summary["chunks_embedded"] == 0
    assert all("/kb/" not in s for s in kb.sources)


def test_auto_switches_index_type_as_the_kb_grows(corpus, monkeypatch):
    monkeypatch.setattr(ann, "AUTO_FLAT_MAX", 60)
    files = sorted(map(str, (corpus / "docs").rglob("*.txt")))
    kb = KnowledgeIndex.build(files[:1], corpus / "kb", **KW)
    assert kb.info()["index_type"] == "flat" and len(kb) <= 60
    kb.add(files[1:])
    assert kb.info()["index_type"] == "hnsw" and len(kb) > 60
    kb.verify()
    assert kb.search(" ".join(WORDS[:3]), 3)

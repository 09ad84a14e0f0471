"""Corrupt every file of a KB (truncate, flip bytes, delete): the error names the file, and a
search never returns a wrong answer silently."""
import os
import shutil

import pytest

from ctxmem.index import IndexCorruptError, KnowledgeIndex, verify_kb
from ctxmem.index.manifest import MANIFEST, read_manifest
from ctxmem.index.testing import chunk_list, write_corpus

QUERIES = ["alpha beta gamma", "river mountain castle", "omega thunder velvet willow", "copper harbor"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    write_corpus(root / "docs", n_files=6, words_per_file=80, seed=5)
    kb = KnowledgeIndex.build([root / "docs"], root / "kb", embedder="hash:64", chunk_tokens=10, overlap=2,
                              progress=False, commit_every=15)
    files = [MANIFEST] + sorted(read_manifest(root / "kb")["files"])
    assert any(f.endswith(".chunks") for f in files) and any(f.endswith(".npy") for f in files)
    assert any(f.endswith(".faiss") for f in files) and len(files) >= 6
    assert any(f.endswith(".lex") for f in files) and any(f.endswith(".bm25") for f in files)
    ref = {q: kb.search(q, k=len(kb)) for q in QUERIES}
    ref.update({("lexical", q): kb.search(q, k=len(kb), mode="lexical") for q in QUERIES})
    return root / "kb", files, ref, chunk_list(kb)


def _corruptions(size):
    yield "truncate-half", lambda b: b[: len(b) // 2]
    yield "truncate-1", lambda b: b[:-1]
    yield "empty", lambda b: b""
    yield "append", lambda b: b + b"\x00"
    for pos in sorted({0, 9, size // 3, size // 2, (2 * size) // 3, size - 40, size - 1}):
        if 0 <= pos < size:
            yield f"flip@{pos}", (lambda p: lambda b: b[:p] + bytes([b[p] ^ 0x5A]) + b[p + 1:])(pos)


def _cases(files, kb_dir):
    for f in files:
        size = (kb_dir / f).stat().st_size
        for name, fn in _corruptions(size):
            yield f, name, fn
        yield f, "delete", None


def test_every_file_every_corruption(template, tmp_path):
    kb_dir, files, ref, chunks = template
    n = 0
    for fname, how, fn in _cases(files, kb_dir):
        work = tmp_path / f"case{n}"
        n += 1
        shutil.copytree(kb_dir, work)
        target = work / fname
        if fn is None:
            target.unlink()
        else:
            target.write_bytes(fn(target.read_bytes()))
        # verify names the file
        with pytest.raises(IndexCorruptError) as ei:
            verify_kb(work)
        assert ei.value.path == str(target), (fname, how, str(ei.value))
        assert str(target) in str(ei.value)
        # opening and searching: a clear error naming the file, or exactly the right answer
        try:
            kb = KnowledgeIndex.open(work)
            got = {q: kb.search(q, k=len(ref[q])) for q in QUERIES}
            got.update({("lexical", q): kb.search(q, k=len(kb), mode="lexical") for q in QUERIES})
            all_chunks = chunk_list(kb)
            kb.close()
        except IndexCorruptError as e:
            assert e.path == str(target), (fname, how, str(e))
        else:
            assert got == ref, (fname, how)
            assert all_chunks == chunks, (fname, how)
    assert n >= 6 * 10


def test_leftovers_of_a_kill_are_ignored_then_cleaned(template, tmp_path):
    kb_dir, files, ref, _ = template
    work = tmp_path / "kb"
    shutil.copytree(kb_dir, work)
    (work / ".manifest.msgpack.abc123.tmp").write_bytes(b"half a manifest")
    (work / "seg-999999.chunks").write_bytes(b"orphan segment")
    (work / "index-999999.faiss").write_bytes(b"orphan index")
    (work / "lexical-999999.bm25").write_bytes(b"orphan lexical index")
    (work / "seg-999999.lex").write_bytes(b"orphan term counts")
    verify_kb(work)
    kb = KnowledgeIndex.open(work)
    assert {q: kb.search(q, k=len(ref[q])) for q in QUERIES} == {q: ref[q] for q in QUERIES}
    kb.remove(sorted(kb.sources)[0])  # any write cleans up what no manifest names
    left = set(os.listdir(work)) - {".lock"}
    assert left == {MANIFEST} | set(read_manifest(work)["files"])


def test_damaged_segment_is_named_when_a_rebuild_needs_it(template, tmp_path):
    kb_dir, files, _, _ = template
    work = tmp_path / "kb"
    shutil.copytree(kb_dir, work)
    npy = next(f for f in files if f.endswith(".npy"))
    b = bytearray((work / npy).read_bytes())
    b[-5] ^= 0xFF
    (work / npy).write_bytes(bytes(b))
    kb = KnowledgeIndex.open(work)  # the flat index holds its own vectors: searching still works
    m = read_manifest(work)
    seg = npy[:-4]
    victim = next(k for k, e in m["sources"].items() if any(p[0] == seg for p in e["parts"]))
    others_in_seg = [k for k, e in m["sources"].items() if k != victim and any(p[0] == seg for p in e["parts"])]
    if others_in_seg:  # removing a source rewrites its segment, which reads the damaged embeddings
        with pytest.raises(IndexCorruptError, match=npy):
            kb.remove(victim)

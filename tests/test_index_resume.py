"""Resume: a build interrupted at any write (or killed with SIGKILL) and run again ends with
exactly the chunks of a clean build - nothing duplicated, nothing lost."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxmem.index.builder as builder_mod
import ctxmem._envelope as envelope_mod
from ctxmem.index import IndexCorruptError, IndexIncompleteError, KnowledgeIndex, verify_kb
from ctxmem.index.manifest import MANIFEST, read_manifest
from ctxmem.index.testing import chunk_list, write_corpus

KW = dict(embedder="hash:64", chunk_tokens=8, overlap=2, progress=False, commit_every=9)
QUERIES = ["alpha beta gamma", "river mountain castle", "omega thunder velvet willow"]


class Crash(Exception):
    pass


def canon(kb):
    """All search results of every mode (hybrid, dense, lexical), order-independent among ties:
    sorted (score, source, start)."""
    return {(q, mode): sorted((round(-h.score, 5), h.source, h.start, h.end)
                              for h in kb.search(q, k=len(kb), mode=mode))
            for q in QUERIES for mode in ("hybrid", "dense", "lexical")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_corpus(root / "docs", n_files=7, words_per_file=50, seed=11)
    clean = KnowledgeIndex.build([root / "docs"], root / "clean", **KW)
    return root, chunk_list(clean), canon(clean)


def _inject(monkeypatch, crash_at):
    """Make the crash_at-th atomic write die half-way, leaving a partial temp file (as kill -9 would)."""
    calls = {"n": 0}
    real = builder_mod.atomic_write_bytes

    def writer(path, data):
        calls["n"] += 1
        if calls["n"] == crash_at:
            path = os.fspath(path)
            d, name = os.path.split(path)
            with open(os.path.join(d, f".{name}.killed.tmp"), "wb") as f:
                f.write(data[: len(data) // 2])
            raise Crash(path)
        real(path, data)

    monkeypatch.setattr(builder_mod, "atomic_write_bytes", writer)
    monkeypatch.setattr(envelope_mod, "atomic_write_bytes", writer)  # the manifest commit
    return calls


def test_crash_at_every_write_then_rerun_equals_clean_build(corpus, tmp_path, monkeypatch):
    root, clean_chunks, clean_results = corpus
    with monkeypatch.context() as mp:
        calls = _inject(mp, crash_at=10**9)
        KnowledgeIndex.build([root / "docs"], tmp_path / "count", **KW)
    n_writes = calls["n"]
    assert n_writes > 10  # several commits
    for crash_at in range(1, n_writes + 1):
        out = tmp_path / f"kb{crash_at}"
        with monkeypatch.context() as mp:
            _inject(mp, crash_at)
            with pytest.raises(Crash):
                KnowledgeIndex.build([root / "docs"], out, **KW)
        if (out / MANIFEST).exists():
            with pytest.raises(IndexIncompleteError):
                KnowledgeIndex.open(out)
        kb = KnowledgeIndex.build([root / "docs"], out, **KW)
        assert chunk_list(kb) == clean_chunks, f"crash at write {crash_at}"
        assert canon(kb) == clean_results
        verify_kb(out)
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.integers(1, 40), second=st.integers(1, 40))
def test_two_crashes_in_a_row(corpus, tmp_path_factory, monkeypatch, first, second):
    root, clean_chunks, clean_results = corpus
    out = tmp_path_factory.mktemp("twice") / "kb"
    for crash_at in (first, second):
        with monkeypatch.context() as mp:
            _inject(mp, crash_at)
            try:
                KnowledgeIndex.build([root / "docs"], out, **KW)
            except Crash:
                pass
    kb = KnowledgeIndex.build([root / "docs"], out, **KW)
    assert chunk_list(kb) == clean_chunks
    assert canon(kb) == clean_results


SCRIPT = textwrap.dedent("""
    import sys
    from ctxmem.index import KnowledgeIndex
    from ctxmem.index.testing import SlowHashingEmbedder
    print("START", flush=True)
    KnowledgeIndex.build([sys.argv[1]], sys.argv[2], embedder=SlowHashingEmbedder(64, delay=0.04),
                         chunk_tokens=8, overlap=2, progress=False, commit_every=9)
    print("DONE", flush=True)
""")


def _committed(kb_dir):
    try:
        m = read_manifest(kb_dir)
    except IndexCorruptError:
        return -1
    return sum(p[2] for e in m["sources"].values() for p in e["parts"])


def test_kill_9_then_rerun_equals_clean_build(tmp_path):
    write_corpus(tmp_path / "docs", n_files=40, words_per_file=40, seed=21)
    clean = KnowledgeIndex.build([tmp_path / "docs"], tmp_path / "clean", **KW)
    total = len(clean)
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)
    kb_dir = tmp_path / "kb"
    kills = []
    # kill points: once some chunks are committed, about half way, and shortly after start-up
    for when in ("first-commit", "half", "early"):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "docs"), str(kb_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "START"
        t0 = time.monotonic()
        start_count = _committed(kb_dir)
        while proc.poll() is None and time.monotonic() - t0 < 60:
            c = _committed(kb_dir)
            if when == "first-commit" and c > max(0, start_count):
                break
            if when == "half" and c >= total // 2:
                break
            if when == "early" and time.monotonic() - t0 > 0.15:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the build finished before the '{when}' kill: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        kills.append((when, _committed(kb_dir)))
        with pytest.raises(IndexIncompleteError):
            KnowledgeIndex.open(kb_dir)
    assert 0 < kills[0][1] < total and kills[1][1] >= total // 2, kills
    kb = KnowledgeIndex.build([tmp_path / "docs"], kb_dir, **KW)
    assert kb.last_summary["chunks_embedded"] < total  # committed work was reused
    assert chunk_list(kb) == chunk_list(clean)
    assert canon(kb) == canon(clean)
    verify_kb(kb_dir)


def test_interrupted_add_is_resumed_by_add_to(corpus, tmp_path, monkeypatch):
    root, _, _ = corpus
    extra = write_corpus(tmp_path / "extra", n_files=3, words_per_file=50, seed=12, subdirs=0)
    ref = KnowledgeIndex.build([root / "docs", *extra], tmp_path / "ref", **KW)
    base = KnowledgeIndex.build([root / "docs"], tmp_path / "kb", **KW)
    with monkeypatch.context() as mp:
        _inject(mp, crash_at=5)  # after the add's first commit
        with pytest.raises(Crash):
            base.add(extra, commit_every=5)
    with pytest.raises(IndexIncompleteError, match="last add"):
        KnowledgeIndex.open(tmp_path / "kb")
    with pytest.raises(IndexIncompleteError):
        base.remove(extra[0])
    kb = KnowledgeIndex.add_to(tmp_path / "kb", extra, commit_every=5)
    assert kb.last_summary["chunks_embedded"] < sum(1 for _, h in ref.iter_chunks() if h.source in extra)
    assert chunk_list(kb) == chunk_list(ref)
    assert canon(kb) == canon(ref)
    verify_kb(tmp_path / "kb")


def test_atomic_write_gives_the_mode_a_plain_write_would(tmp_path):
    import os

    from ctxmem._atomic import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "new.json", b"{}")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
        (tmp_path / "kept.json").write_bytes(b"1")
        os.chmod(tmp_path / "kept.json", 0o640)
        atomic_write_bytes(tmp_path / "kept.json", b"2")
        assert (tmp_path / "kept.json").stat().st_mode & 0o777 == 0o640 and (tmp_path / "kept.json").read_bytes() == b"2"
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

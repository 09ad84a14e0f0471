"""The Ray engine of the index builder: the same KB as the local engine, and fault tolerance.

One local Ray cluster (2 CPUs, so 2 embedder workers) serves the whole module.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ray = pytest.importorskip("ray")

from ctxmem.index import KnowledgeIndex, KnowledgeIndexError, ann, verify_kb  # noqa: E402
from ctxmem.index import ray_engine  # noqa: E402
from ctxmem.index.manifest import MANIFEST, read_manifest  # noqa: E402
from ctxmem.index.testing import KillOnceEmbedder, chunk_list, write_corpus  # noqa: E402

KW = dict(embedder="hash:64", chunk_tokens=16, overlap=4, progress=False, index="flat")
QUERIES = ["alpha beta gamma", "river mountain castle", "omega thunder velvet willow", "copper harbor"]
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Text files, a JSONL file, and sources the builder must skip (empty, binary)."""
    root = tmp_path_factory.mktemp("raycorpus")
    write_corpus(root / "docs", n_files=10, words_per_file=240, seed=5)
    (root / "docs" / "recs.jsonl").write_text(
        "\n".join(json.dumps({"text": f"record {i} about the copper harbor and the violin"}) for i in range(6))
        + "\nnot json\n", encoding="utf-8")
    (root / "docs" / "empty.txt").write_text("  \n", encoding="utf-8")
    (root / "docs" / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    local = KnowledgeIndex.build([root / "docs"], root / "kb-local", **KW)
    return root, local


def top_k(kb, k=8):
    """Exact top-k of each query: chunk ids and scores (a flat index is exact)."""
    ids, out = list(kb.iter_chunks()), {}
    by_pos = {(h.source, h.start): cid for cid, h in ids}
    for q in QUERIES:
        out[q] = [(by_pos[(h.source, h.start)], round(h.score, 6)) for h in kb.search(q, k)]
    return out


def test_ray_kb_equals_local_kb(cluster, corpus, tmp_path):
    root, local = corpus
    kb = KnowledgeIndex.build([root / "docs"], tmp_path / "kb", engine="ray", workers=2, **KW)
    s = kb.last_summary
    assert s["engine"] == "ray" and s["ray"]["workers"] == 2
    # same chunks, same provenance, same ids, same top-k
    assert [(c, h) for c, h in kb.iter_chunks()] == [(c, h) for c, h in local.iter_chunks()]
    assert top_k(kb) == top_k(local)
    assert sorted(s["skipped"], key=str) == sorted(local.last_summary["skipped"], key=str)
    assert s["notes"] == local.last_summary["notes"]
    info, linfo = kb.info(), local.info()
    for key in ("chunks", "sources", "dim", "embedder", "index_type", "chunk_tokens", "overlap", "source_list"):
        assert info[key] == linfo[key], key
    assert verify_kb(tmp_path / "kb")["chunks"] == len(local)
    # a rerun on the unchanged corpus embeds nothing
    again = KnowledgeIndex.build([root / "docs"], tmp_path / "kb", engine="ray", workers=2, **KW)
    assert again.last_summary["chunks_embedded"] == 0 and again.last_summary["sources_reused"] == 11
    # add / remove work on the Ray-built KB as on any KB
    extra = root / "extra.txt"
    extra.write_text("a brand new lantern meadow document about quartz", encoding="utf-8")
    kb = KnowledgeIndex.open(tmp_path / "kb")
    kb.add([extra])
    assert kb.search("lantern meadow quartz", 1)[0].source == str(extra)
    assert kb.remove(extra) == 1
    assert chunk_list(kb) == chunk_list(local)
    kb.close()


def test_killed_worker_is_retried_and_every_chunk_is_kept_once(cluster, corpus, tmp_path):
    root, local = corpus
    chunks = [h for _, h in local.iter_chunks()]
    trigger = chunks[len(chunks) // 2].text  # a chunk in the middle of the build
    marker = tmp_path / "killed"
    emb = KillOnceEmbedder(64, trigger, marker)
    kb = KnowledgeIndex.build([root / "docs"], tmp_path / "kb", engine="ray", workers=2,
                              **{**KW, "embedder": emb})
    assert marker.exists(), "the worker was not killed"
    assert int(marker.read_text()) != os.getpid()  # an actor process died, not this one
    assert [(c, h) for c, h in kb.iter_chunks()] == [(c, h) for c, h in local.iter_chunks()]
    assert top_k(kb) == top_k(local)
    verify_kb(tmp_path / "kb")  # ids unique, stores and index agree


DRIVER = textwrap.dedent("""
    import sys
    from ctxmem.index import KnowledgeIndex, ray_engine
    ray_engine.ACTOR_BATCH_ROWS = 16  # many small batches, so that there is a middle to kill in
    from ctxmem.index.testing import SlowHashingEmbedder
    KnowledgeIndex.build([sys.argv[1]], sys.argv[2], embedder=SlowHashingEmbedder(64, delay=0.3), chunk_tokens=16,
                         overlap=4, progress=False, index="flat", commit_every=8, engine="ray",
                         address=sys.argv[3], workers=1)
""")


def test_killed_driver_resumes(cluster, corpus, tmp_path):
    """A driver joined to a cluster (--address) is SIGKILLed after its first commits; the
    rerun resumes from the manifest and ends with exactly the local engine's KB."""
    root, local = corpus
    out = tmp_path / "kb"
    p = subprocess.Popen([sys.executable, "-c", DRIVER, str(root / "docs"), str(out), cluster],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed, deadline = 0, time.time() + 90
    try:
        while time.time() < deadline and p.poll() is None:
            if (out / MANIFEST).exists():
                try:
                    m = read_manifest(out)
                except Exception:
                    m = None
                if m is not None:
                    committed = sum(p_[2] for e in m["sources"].values() for p_ in e["parts"])
                    if committed >= 16:
                        break
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate()
    assert committed >= 16, f"the driver committed nothing before the deadline: {err.decode()[-2000:]}"
    assert committed < len(local), "the build finished before it could be killed"
    assert read_manifest(out)["state"] == "building"
    kb = KnowledgeIndex.build([root / "docs"], out, engine="ray", workers=2, **KW)
    assert kb.last_summary["chunks_embedded"] <= len(local) - committed  # resumed, not redone
    assert [(c, h) for c, h in kb.iter_chunks()] == [(c, h) for c, h in local.iter_chunks()]
    assert top_k(kb) == top_k(local)
    verify_kb(out)


def test_ivf_shards_merge_into_the_local_index(cluster, tmp_path, monkeypatch):
    """IVF-PQ filled as 2 shards on 2 workers and merged is byte for byte the local index."""
    write_corpus(tmp_path / "docs", n_files=6, words_per_file=1500, seed=9)
    kw = {**KW, "index": "ivfpq", "chunk_tokens": 8, "overlap": 2}
    local = KnowledgeIndex.build([tmp_path / "docs"], tmp_path / "kb-local", **kw)
    assert local.info()["index_type"] == "ivfpq"
    monkeypatch.setattr(ray_engine, "SHARD_MIN_VECTORS", 400)
    kb = KnowledgeIndex.build([tmp_path / "docs"], tmp_path / "kb", engine="ray", workers=2, **kw)
    assert kb.last_summary["ray"]["index_shards"] == 2
    assert ann.serialize(kb._index) == ann.serialize(local._index)
    verify_kb(tmp_path / "kb")


def test_cli_engine_ray(cluster, corpus, tmp_path, capsys):
    from ctxmem.index.cli import main

    root, local = corpus
    rc = main(["index", "build", str(root / "docs"), "-o", str(tmp_path / "kb"), "--embedder", "hash:64",
               "--chunk-tokens", "16", "--overlap", "4", "--index", "flat", "--engine", "ray", "--workers", "2",
               "--no-progress", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["engine"] == "ray" and summary["chunks"] == len(local)
    assert main(["index", "verify", str(tmp_path / "kb")]) == 0


def test_missing_ray_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(KnowledgeIndexError, match=r"pip install 'ctxmem\[distributed\]'"):
        KnowledgeIndex.build([tmp_path], tmp_path / "kb", engine="ray", **KW)
    assert not (tmp_path / "kb").exists()


def test_bad_engine_options(tmp_path):
    from ctxmem.index import BadInputError

    with pytest.raises(BadInputError, match="unknown engine"):
        KnowledgeIndex.build([tmp_path], tmp_path / "kb", engine="spark", **KW)
    with pytest.raises(BadInputError, match="engine='ray'"):
        KnowledgeIndex.build([tmp_path], tmp_path / "kb", workers=2, **KW)

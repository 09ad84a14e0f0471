"""`ctxmem index ...` through a local argparse (as ctxmem.cli wires it) and `python -m`."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from ctxmem.index import KnowledgeIndex
from ctxmem.index.cli import add_index_parser
from ctxmem.index.manifest import read_manifest
from ctxmem.index.testing import chunk_set, write_corpus

COMMON = ["--embedder", "hash:64", "--chunk-tokens", "12", "--overlap", "3", "--no-progress"]


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="ctxmem")
    sub = parser.add_subparsers(dest="command")
    add_index_parser(sub)
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def kb(tmp_path, capsys):
    write_corpus(tmp_path / "docs", n_files=5, words_per_file=100, seed=8)
    code, out, err = run(["index", "build", str(tmp_path / "docs"), "-o", str(tmp_path / "kb"), "--json", *COMMON],
                         capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["chunks"] > 0 and summary["sources"] == 5 and summary["index_type"] == "flat"
    return tmp_path


def test_query_info_verify_match_the_python_api(kb, capsys):
    api = KnowledgeIndex.open(kb / "kb")
    code, out, _ = run(["index", "query", str(kb / "kb"), "river mountain", "-k", "4", "--json"], capsys)
    assert code == 0
    hits = json.loads(out)["hits"]
    assert hits == [h.to_dict() for h in api.search("river mountain", k=4)]
    assert set(hits[0]) == {"text", "score", "source", "start", "end"}
    code, out, _ = run(["index", "query", str(kb / "kb"), "river mountain", "-k", "2"], capsys)
    assert code == 0 and out.startswith("1. ") and hits[0]["source"] in out
    code, out, _ = run(["index", "info", str(kb / "kb"), "--json"], capsys)
    info = json.loads(out)
    for key in ("chunks", "sources", "dim", "index_type", "embedder"):
        assert info[key] == api.info()[key]
    assert info["embedder"] == "hash:64" and info["dim"] == 64
    code, out, _ = run(["index", "info", str(kb / "kb")], capsys)
    assert code == 0 and "index_type" in out
    code, out, _ = run(["index", "verify", str(kb / "kb")], capsys)
    assert code == 0 and out.startswith("ok:")


def test_add_remove_and_rebuild(kb, capsys):
    extra = write_corpus(kb / "extra", n_files=2, words_per_file=60, seed=9, subdirs=0)
    before = chunk_set(KnowledgeIndex.open(kb / "kb"))
    code, out, err = run(["index", "add", str(kb / "kb"), *extra, "--no-progress", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["sources"] == 7
    code, out, _ = run(["index", "remove", str(kb / "kb"), "--source", extra[0], "--source", extra[1], "--json"],
                       capsys)
    assert code == 0 and json.loads(out)["sources"] == 5
    assert chunk_set(KnowledgeIndex.open(kb / "kb")) == before
    code, out, err = run(["index", "build", str(kb / "docs"), "-o", str(kb / "kb"), *COMMON], capsys)
    assert code == 0 and "0 embedded" in out and "5 unchanged" in out


def test_errors_are_one_line_and_nonzero(kb, capsys):
    # corruption: verify names the file
    m = read_manifest(kb / "kb")
    seg = next(f for f in m["files"] if f.endswith(".chunks"))
    p = kb / "kb" / seg
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 1
    p.write_bytes(bytes(b))
    code, out, err = run(["index", "verify", str(kb / "kb")], capsys)
    assert code == 1 and str(p) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, out, err = run(["index", "verify", str(kb / "kb"), "--json"], capsys)
    assert code == 1 and json.loads(out)["ok"] is False
    # no KB, wrong embedder, unknown source, nothing to index
    code, _, err = run(["index", "query", str(kb / "nope"), "x"], capsys)
    assert code == 1 and err.startswith("ctxmem index query: error:")
    code, _, err = run(["index", "query", str(kb / "kb"), "x", "--embedder", "hash:32"], capsys)
    assert code == 1 and "dim" in err
    code, _, err = run(["index", "remove", str(kb / "kb"), "--source", "/no/such/file"], capsys)
    assert code == 1 and "no source" in err
    (kb / "empty.txt").write_text("")
    code, _, err = run(["index", "build", str(kb / "empty.txt"), "-o", str(kb / "kb2"), *COMMON], capsys)
    assert code == 1 and "nothing to index" in err and "empty" in err


def test_python_m_with_stdin_and_progress(tmp_path):
    kb = tmp_path / "kb"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "ctxmem.index.cli", "index", "build", "-", "-o", str(kb),
                        "--embedder", "hash:64", "--json"], input=b"velvet thunder over the copper harbor " * 50,
                       capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    summary = json.loads(r.stdout)
    assert summary["sources"] == 1 and summary["chunks"] >= 1
    assert b"chunk/s" in r.stderr  # the progress bar shows the rate
    hits = KnowledgeIndex.open(kb).search("copper harbor", 1)
    assert hits[0].source == "<stdin>"

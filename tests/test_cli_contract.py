"""The CLI as a newcomer meets it: every ``--json`` command on a machine with nothing cached.

Each command runs in its own process (``python -m ctxmem.cli``) with HOME and the caches (converted
model, CUDA build, Hugging Face, torch, XDG) pointed at one empty folder, so the first command that
loads the model converts it right there, as on a first run. The numba kernels are compiled into the
test run's own numba cache (``.ci/run`` starts that one empty too): compiling them a second time
here would cost a minute and test nothing the run does not. The contract checked for every command:

* exit 0 on success and stdout is exactly one JSON document;
* exit 1 on a handled error, one line on stderr naming the problem, and with ``--json`` one JSON
  object ``{"error": ..., "kind": ...}`` on stdout; exit 2 on bad usage (argparse);
* Ctrl-C during a long read: exit 130, no traceback, and what was saved before is intact.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ctxmem.index.testing import write_corpus

pytestmark = pytest.mark.slow

CACHE_VARS = ("CTXMEM_CACHE", "CTXMEM_CUDA_CACHE", "HF_HOME", "TORCH_HOME", "TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME")
FACT = "The lighthouse keeper's cat is called Marmalade."
QUESTION = "What is the lighthouse keeper's cat called?"
FILLER = "Waves broke on the rocks all night, and the gulls slept on the harbour wall. "


def cold_env(root: Path) -> dict:
    env = dict(os.environ, HOME=str(root / "home"), PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    for var in CACHE_VARS:
        env[var] = str(root / "cache" / var.lower())
    return env


def ctxmem(env, *argv, timeout=600):
    """Run ``python -m ctxmem.cli ARGV``; return (exit code, stdout, stderr)."""
    r = subprocess.run([sys.executable, "-m", "ctxmem.cli", *argv], env=env, capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def ok_json(env, *argv) -> tuple[dict, str]:
    code, out, err = ctxmem(env, *argv)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return json.loads(out), err  # the whole of stdout is one JSON document


def handled_error(env, *argv) -> tuple[dict, str]:
    """A handled error: exit 1, one line on stderr naming it (the last; progress bars of a model
    load may come before it), no traceback, and one JSON object on stdout."""
    code, out, err = ctxmem(env, *argv)
    assert code == 1, (code, out, err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert errors == lines[-1:] and "Traceback" not in err, err[-3000:]
    doc = json.loads(out)
    assert doc["ok"] is False and isinstance(doc["kind"], str) and doc["kind"]
    assert doc["error"] == errors[0].split(": error: ", 1)[1]  # the same message on both streams
    return doc, errors[0]


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    root = tmp_path_factory.mktemp("cold")
    env = cold_env(root)
    for var in CACHE_VARS:
        assert not Path(env[var]).exists()
    doc = root / "doc.txt"
    doc.write_text(FILLER * 12 + FACT + " " + FILLER * 12)
    # the first command to load the model meets the empty cache
    first, err = ok_json(env, "ask", QUESTION, "--context", str(doc), "--memory", str(root / "doc.mem"),
                         "--max-new-tokens", "10", "--json")
    assert "converting the bundled" in err  # it was the cold path (the message is on stderr, not stdout)
    return dict(root=root, env=env, doc=doc, first=first)


def test_ask_json_on_a_cold_cache(cold):
    first = cold["first"]
    assert first["mode"] == "ctxmem" and first["memory"]["action"] == "read and saved"
    assert first["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert first["context_tokens"] > first["memory"]["tokens"] > 0
    assert "Marmalade" in first["answer"]
    # the fused op's backend that ran, per layer call: the numba kernels on a CPU float32 model
    assert set(first["backends"]) == {"numba"} and first["backends"]["numba"] > 0


def test_ask_errors_follow_the_contract(cold):
    env, root = cold["env"], cold["root"]
    doc, line = handled_error(env, "ask", "q", "--context", str(root / "missing.txt"), "--json")
    assert "missing.txt" in doc["error"] and line.startswith("ctxmem ask: error:")
    doc, _ = handled_error(env, "ask", "q", "--memory", str(root / "none.mem"), "--json")
    assert "no memory at" in doc["error"] and "none.mem" in doc["error"] and doc["kind"] == "ValueError"
    if not torch.cuda.is_available():
        doc, _ = handled_error(env, "ask", "q", "--context", str(cold["doc"]), "--device", "cuda", "--json")
        assert "--device cuda" in doc["error"] and doc["kind"] == "RuntimeError"
    code, out, err = ctxmem(env, "ask", "q", "--device", "tpu", "--json")  # bad usage: argparse's exit 2
    assert code == 2 and out == "" and "invalid choice" in err


def test_index_commands_json(cold, tmp_path):
    env = cold["env"]
    docs = write_corpus(tmp_path / "docs", n_files=4, words_per_file=120, seed=3, subdirs=0)
    extra = write_corpus(tmp_path / "extra", n_files=2, words_per_file=80, seed=4, subdirs=0)
    kb = str(tmp_path / "kb")
    built, _ = ok_json(env, "index", "build", *docs, "-o", kb, "--embedder", "hash:64", "--no-progress", "--json")
    assert built["sources"] == 4 and built["chunks"] > 0
    info, _ = ok_json(env, "index", "info", kb, "--json")
    assert (info["chunks"], info["sources"]) == (built["chunks"], built["sources"])
    hits, _ = ok_json(env, "index", "query", kb, "river mountain", "-k", "3", "--json")
    assert len(hits["hits"]) == 3 and {h["source"] for h in hits["hits"]} <= set(docs)
    verified, _ = ok_json(env, "index", "verify", kb, "--json")
    assert verified["chunks"] == built["chunks"]
    added, _ = ok_json(env, "index", "add", kb, *extra, "--no-progress", "--json")
    assert added["sources"] == 6 and added["chunks"] > built["chunks"]
    removed, _ = ok_json(env, "index", "remove", kb, "--source", extra[0], "--source", extra[1], "--json")
    assert (removed["chunks"], removed["sources"]) == (built["chunks"], built["sources"])
    doc, _ = handled_error(env, "index", "query", str(tmp_path / "nope"), "x", "--json")
    assert "nope" in doc["error"]
    (tmp_path / "bad.bin").write_bytes(b"\x00\x01\x02binary")
    doc, _ = handled_error(env, "index", "add", kb, str(tmp_path / "bad.bin"), "--no-progress", "--json")
    assert doc["error"] == "no source could be read" and doc["skipped"]
    code, out, err = ctxmem(env, "index", "query", kb)  # bad usage
    assert code == 2 and out == ""


def test_compressor_commands_json(cold, tmp_path):
    env = cold["env"]
    data = Path(__file__).parent / "test_compress.py"
    run = str(tmp_path / "run")
    trained, err = ok_json(env, "compressor", "train", "--ratio", "8", "--segment-tokens", "32", "--cont-tokens", "16",
                           "--steps", "1", "--batch-size", "1", "--data", str(data), "--out", run, "--no-progress",
                           "--threads", "2", "--json")
    assert trained["ok"] is True and trained["steps"] == 1 and trained["finished"]
    evaluated, _ = ok_json(env, "compressor", "eval", "--ratio", "8", "--checkpoint", run, "--data", str(data),
                           "--max-windows", "2", "--cont-tokens", "16", "--batch-size", "2", "--no-llmlingua",
                           "--no-progress", "--threads", "2", "--json")
    assert evaluated["windows"] == 2 and [Path(f).name for f in evaluated["files"]] == [data.name]
    doc, _ = handled_error(env, "compressor", "eval", "--ratio", "8", "--checkpoint", str(tmp_path / "none"),
                           "--data", str(data), "--no-llmlingua", "--json")
    assert str(tmp_path / "none") in doc["error"] and doc["kind"] == "CompressorError"
    code, out, _ = ctxmem(env, "compressor", "train", "--steps", "many")  # bad usage
    assert code == 2 and out == ""


def _interrupt_once_reading(env, argv, marker: bytes, timeout=300):
    """Start ``ctxmem ARGV``, send SIGINT once ``marker`` shows on its stderr; return (code, out, err)."""
    # SIGINT as a terminal delivers it, even when this test runs in a background job (where it is ignored)
    proc = subprocess.Popen([sys.executable, "-m", "ctxmem.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = bytearray()
    out = bytearray()
    seen = threading.Event()

    def pump(stream, buf, watch):
        while chunk := stream.read1(4096):
            buf.extend(chunk)
            if watch and marker in buf:
                seen.set()

    threads = [threading.Thread(target=pump, args=(proc.stderr, err, True), daemon=True),
               threading.Thread(target=pump, args=(proc.stdout, out, False), daemon=True)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while not seen.wait(0.05):
        assert proc.poll() is None, f"ended before {marker!r}: {bytes(err)[-3000:]!r}"
        assert time.monotonic() < deadline, bytes(err)[-3000:]
    time.sleep(0.3)  # inside the read
    assert proc.poll() is None, "the read ended before the interrupt: make the input longer"
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    for t in threads:
        t.join(timeout=10)
    return code, out.decode(), err.decode()


def test_ctrl_c_during_a_long_read_exits_130_and_keeps_what_was_saved(cold, tmp_path):
    env, mem = cold["env"], cold["root"] / "doc.mem"
    before = {p.relative_to(mem): p.read_bytes() for p in mem.rglob("*") if p.is_file()}
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(FILLER * 900 + "The lighthouse keeper's cat is called Biscuit.")  # another document
    # the memory folder belongs to the first document: this read would replace it when it finishes
    code, out, err = _interrupt_once_reading(env, ["ask", QUESTION, "--context", str(long_doc), "--memory", str(mem)],
                                             b"ctxmem: reading")
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "ctxmem ask: interrupted" in err, err[-3000:]
    assert out == ""
    after = {p.relative_to(mem): p.read_bytes() for p in mem.rglob("*") if p.is_file()}
    assert after == before  # the saved memory is untouched, byte for byte
    # and it still answers as it did, without the document
    again, err = ok_json(env, "ask", QUESTION, "--memory", str(mem), "--max-new-tokens", "10", "--json")
    assert "converting" not in err  # converted once per cache, not once per process
    assert again["memory"]["action"] == "loaded" and again["answer"] == cold["first"]["answer"]


def test_ctrl_c_during_an_index_add_exits_130_and_the_kb_still_verifies(cold, tmp_path):
    env = cold["env"]
    kb = str(tmp_path / "kb")
    docs = write_corpus(tmp_path / "docs", n_files=2, words_per_file=80, seed=5, subdirs=0)
    built, _ = ok_json(env, "index", "build", *docs, "-o", kb, "--embedder", "hash:64", "--no-progress", "--json")
    big = write_corpus(tmp_path / "big", n_files=1, words_per_file=1_000_000, seed=6, subdirs=0)
    hits, _ = ok_json(env, "index", "query", kb, "river mountain", "-k", "4", "--json")
    code, out, err = _interrupt_once_reading(env, ["index", "add", kb, *big, "--commit-seconds", "1000"],
                                             b"ctxmem index")
    assert code == 130 and "Traceback" not in err and "ctxmem index add: interrupted" in err, err[-3000:]
    # what was saved is served as it was
    again, _ = ok_json(env, "index", "query", kb, "river mountain", "-k", "4", "--json")
    assert again == hits
    # and verifies: as built when the add had written nothing yet, else intact with the add to resume
    code, out, err = ctxmem(env, "index", "verify", kb, "--json")
    report = json.loads(out)
    if code == 0:
        assert (report["chunks"], report["sources"]) == (built["chunks"], built["sources"])
    else:
        assert code == 1 and "files intact, but the last add did not finish" in report["error"], err


def test_a_closed_pipe_is_left_to_main_and_not_reported_as_an_error(capsys):
    """``ctxmem ... | head``: BrokenPipeError is an OSError, yet not a handled error (main silences stdout)."""
    import argparse

    from ctxmem._cli import handled

    @handled("ctxmem x")
    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    @handled("ctxmem x")
    def unreadable(args):
        raise PermissionError(13, "Permission denied", "/some/file")

    with pytest.raises(BrokenPipeError):
        closed(argparse.Namespace(json=True))
    assert capsys.readouterr() == ("", "")
    assert unreadable(argparse.Namespace(json=True)) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["kind"] == "PermissionError" and err.startswith("ctxmem x: error: ")

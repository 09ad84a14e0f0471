"""save_memory / load_memory: identity, refusals, fuzzed loaders, kill -9 mid-save, portability."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxmem
from ctxmem import MemoryConfig
from ctxmem.hf import load_memory, save_memory
from ctxmem.memory import MemoryFormatError, MemoryMismatchError
from ctxmem.memory.persist import MANIFEST, read_manifest
from conftest import tiny_model

BASE = dict(block_size=16, topk_blocks=3, sink_tokens=8, local_tokens=32, prefill_chunk=48, selector="keys")
TIERED = dict(ram_budget="12KB", cold_dtype="int8")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _answer(model, full, memory):
    return model.generate(full, cache=memory, max_new_tokens=10, do_sample=False, pad_token_id=0)[:, full.shape[1]:]


@pytest.mark.parametrize("src,dst", [({}, {}), (TIERED, TIERED), (TIERED, {}), ({}, {"ram_budget": 0, "cold_dtype": "fp32"})],
                         ids=["ram-ram", "tiered-tiered", "tiered-ram", "ram-tiered"])
def test_answers_after_save_and_load_are_identical(tmp_path, src, dst):
    model = tiny_model("llama", seed=2)
    g = torch.Generator().manual_seed(2)
    ids, question = torch.randint(1, 97, (1, 700), generator=g), torch.randint(1, 97, (1, 20), generator=g)
    full = torch.cat([ids, question], 1)
    ctxmem.wrap(model, MemoryConfig(**BASE, **src))
    memory = ctxmem.read_memory(model, ids)
    save_memory(model, tmp_path / "mem")
    before = _answer(model, full, memory)
    ctxmem.unwrap(model)
    ctxmem.wrap(model, MemoryConfig(**BASE, **dst))
    loaded = load_memory(model, tmp_path / "mem")
    assert loaded.seen == 700 and loaded.token_ids[0] == ids[0].tolist()
    assert torch.equal(_answer(model, full, loaded), before)
    ctxmem.unwrap(model)


@given(length=st.integers(1, 300), pad=st.integers(0, 20), tiered=st.booleans(), seed=st.integers(0, 99))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_save_load_is_the_identity_on_the_store(tmp_path, length, pad, tiered, seed):
    model = tiny_model("qwen2", seed=seed)
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, : min(pad, length - 1)] = 0
    ctxmem.wrap(model, MemoryConfig(**BASE, **(TIERED if tiered else {})))
    try:
        mem = ctxmem.read_memory(model, ids, attention_mask=mask)
        save_memory(model, tmp_path / "m")
        back = load_memory(model, tmp_path / "m")
    finally:
        ctxmem.unwrap(model)
    assert back.token_ids == mem.token_ids and back.seen == mem.seen
    for a, b in zip(mem.layers, back.layers):
        assert torch.equal(a.lengths, b.lengths)
        for r in range(2):
            n = int(a.lengths[r])
            nb = max(0, (n - 8) // 16)
            assert torch.equal(a.reps[r, :, :nb], b.reps[r, :, :nb])
            if tiered:
                assert torch.equal(a.spilled, b.spilled)
                h = a.hot_len(r)
                assert torch.equal(a.k[r, :, :h], b.k[r, :, :h]) and torch.equal(a.v[r, :, :h], b.v[r, :, :h])
                for j in range(int(a.spilled[r])):
                    ka, va = mem.cold.get((a.layer_idx, r, j))
                    kb, vb = back.cold.get((b.layer_idx, r, j))
                    assert torch.equal(ka, kb) and torch.equal(va, vb)
            else:
                assert torch.equal(a.k[r, :, :n], b.k[r, :, :n]) and torch.equal(a.v[r, :, :n], b.v[r, :, :n])


def test_other_model_or_layout_is_refused(tmp_path):
    model = tiny_model("llama", seed=0)
    ctxmem.wrap(model, MemoryConfig(**BASE))
    ctxmem.read_memory(model, torch.randint(0, 97, (1, 200)))
    save_memory(model, tmp_path / "m")
    ctxmem.unwrap(model)
    other = tiny_model("llama", seed=1)  # same shapes, other weights
    ctxmem.wrap(other, MemoryConfig(**BASE))
    with pytest.raises(MemoryMismatchError, match="different model.*weights_sha256"):
        load_memory(other, tmp_path / "m")
    ctxmem.unwrap(other)
    ctxmem.wrap(model, MemoryConfig(**{**BASE, "block_size": 8}))
    with pytest.raises(MemoryMismatchError, match="block_size=16"):
        load_memory(model, tmp_path / "m")
    ctxmem.unwrap(model)
    ctxmem.wrap(model, MemoryConfig(**{**BASE, "topk_blocks": 1}))  # retrieval settings may differ
    load_memory(model, tmp_path / "m")
    ctxmem.unwrap(model)
    with pytest.raises(ValueError, match="not wrapped"):
        load_memory(model, tmp_path / "m")
    ctxmem.wrap(model, MemoryConfig(**BASE))
    with pytest.raises(ValueError, match="nothing to save"):
        save_memory(model, tmp_path / "empty")
    with pytest.raises(MemoryFormatError, match="manifest missing"):
        load_memory(model, tmp_path / "nowhere")
    ctxmem.unwrap(model)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiered memory (cold int8 blocks, embeddings absent) and the model that made it."""
    root = tmp_path_factory.mktemp("saved")
    model = tiny_model("llama", seed=4)
    ctxmem.wrap(model, MemoryConfig(**BASE, **TIERED))
    ctxmem.read_memory(model, torch.randint(0, 97, (2, 260), generator=torch.Generator().manual_seed(4)))
    save_memory(model, root / "m")
    ctxmem.unwrap(model)
    data = next(p.name for p in (root / "m").iterdir() if p.name.startswith("data-"))
    return model, root / "m", data


def _try_load(model, folder):
    ctxmem.wrap(model, MemoryConfig(**BASE, **TIERED))
    try:
        return load_memory(model, folder)
    finally:
        ctxmem.unwrap(model)


MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("random"), st.binary(max_size=300)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=20)),
)


def _mutate(data: bytes, m) -> bytes:
    if m[0] == "truncate":
        return data[: int(m[1] * len(data))]
    if m[0] == "flip":
        i = int(m[1] * len(data))
        return data[:i] + bytes([data[i] ^ m[2]]) + data[i + 1:]
    if m[0] == "random":
        return m[1]
    return data + m[1]


FUZZ_COUNT = {"memory": 0, "index": 0}


@given(which=st.sampled_from(["manifest", "data"]), m=MUTATIONS)
@FUZZ
def test_fuzzed_memory_files_give_only_the_documented_error(saved, tmp_path_factory, which, m):
    model, folder, data_name = saved
    work = tmp_path_factory.mktemp("fz") / "m"
    shutil.copytree(folder, work)
    target = work / (MANIFEST if which == "manifest" else data_name)
    new = _mutate(target.read_bytes(), m)
    if new == target.read_bytes():
        return
    target.write_bytes(new)
    FUZZ_COUNT["memory"] += 1
    with pytest.raises(MemoryFormatError) as ei:
        _try_load(model, work)
    assert ei.value.path == str(target)


def test_wrong_version_is_named(saved, tmp_path):
    import msgpack
    import zlib

    model, folder, _ = saved
    work = tmp_path / "m"
    shutil.copytree(folder, work)
    body = read_manifest(work)
    body["version"] = 99
    raw = msgpack.packb(body, use_bin_type=True)
    (work / MANIFEST).write_bytes(msgpack.packb({"crc32": zlib.crc32(raw), "body": raw}, use_bin_type=True))
    with pytest.raises(MemoryFormatError, match="version 99"):
        _try_load(model, work)


@pytest.fixture(scope="module")
def kb_template(tmp_path_factory):
    from ctxmem.index import KnowledgeIndex
    from ctxmem.index.manifest import read_manifest as kb_manifest
    from ctxmem.index.testing import write_corpus

    root = tmp_path_factory.mktemp("kbfuzz")
    write_corpus(root / "docs", n_files=4, words_per_file=60, seed=1)
    kb = KnowledgeIndex.build([root / "docs"], root / "kb", embedder="hash:32", chunk_tokens=10, overlap=2,
                              progress=False)
    ref = kb.search("alpha river", k=5)
    kb.close()
    return root / "kb", ["manifest.msgpack"] + sorted(kb_manifest(root / "kb")["files"]), ref


@given(i=st.integers(0, 10**6), m=MUTATIONS)
@FUZZ
def test_fuzzed_index_files_give_only_the_documented_error_or_the_right_answer(kb_template, tmp_path_factory, i, m):
    from ctxmem.index import IndexCorruptError, KnowledgeIndex

    folder, files, ref = kb_template
    work = tmp_path_factory.mktemp("kfz") / "kb"
    shutil.copytree(folder, work)
    target = work / files[i % len(files)]
    new = _mutate(target.read_bytes(), m)
    if new == target.read_bytes():
        return
    target.write_bytes(new)
    FUZZ_COUNT["index"] += 1
    try:
        kb = KnowledgeIndex.open(work)
        got = kb.search("alpha river", k=5)
        kb.close()
    except IndexCorruptError as e:
        assert e.path == str(target)
    else:
        assert got == ref  # damage the loader did not need to read must not change an answer


def test_fuzz_case_counts():
    """Runs after the fuzz tests (file order): they really exercised the loaders."""
    print(f"fuzzed loads: memory {FUZZ_COUNT['memory']}, index {FUZZ_COUNT['index']}")
    assert FUZZ_COUNT["memory"] >= 100 and FUZZ_COUNT["index"] >= 100, FUZZ_COUNT


def test_memory_folder_moves_to_another_place(saved, tmp_path):
    model, folder, _ = saved
    body = read_manifest(folder)
    assert "/" not in body["data"]["name"] and str(folder) not in repr(body)
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(folder, moved)
    shutil.rmtree(folder.parent / "gone", ignore_errors=True)
    assert _try_load(model, moved).token_ids == _try_load(model, folder).token_ids


_SAVER = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from conftest import tiny_model
import ctxmem
model = tiny_model("llama", seed=4)
ctxmem.wrap(model, ctxmem.MemoryConfig(block_size=16, topk_blocks=3, sink_tokens=8, local_tokens=32,
                                       prefill_chunk=256, selector="keys"))
mem = ctxmem.read_memory(model, torch.randint(0, 97, (2, 1500), generator=torch.Generator().manual_seed(0)))
print("ready", flush=True)
gen = 0
while True:
    gen += 1
    ctxmem.save_memory(model, sys.argv[1], meta={"gen": gen})
"""


def test_kill_during_save_leaves_old_or_new(tmp_path):
    folder = tmp_path / "m"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    tests_dir = str(Path(__file__).parent)
    seen = set()
    for delay in (0.02, 0.11, 0.3):
        p = subprocess.Popen([sys.executable, str(script), str(folder), tests_dir], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        if not (folder / MANIFEST).exists():
            continue  # killed before the first save completed: no memory, and none claimed
        body = read_manifest(folder)  # never a half manifest
        seen.add(body["meta"]["gen"])
        model = tiny_model("llama", seed=4)
        mem = _try_load_with(model, folder)
        assert len(mem.token_ids) == 2 and all(len(t) == 1500 for t in mem.token_ids)
    assert seen, "no save completed in any run"


def _try_load_with(model, folder):
    ctxmem.wrap(model, MemoryConfig(**BASE))
    try:
        return load_memory(model, folder)
    finally:
        ctxmem.unwrap(model)


def test_version_1_manifest_still_loads(saved, tmp_path):
    """Folders saved before the shared envelope ({"crc32", "body"}, body version 1) still load."""
    import msgpack
    import zlib

    from ctxmem._envelope import read_outer

    model, folder, _ = saved
    work = tmp_path / "m"
    shutil.copytree(folder, work)
    outer = read_outer(work / MANIFEST)
    assert outer["format"] == "ctxmem-memory" and outer["version"] == 2  # what this ctxmem writes
    body = read_manifest(work)
    body["version"] = 1
    raw = msgpack.packb(body, use_bin_type=True)
    (work / MANIFEST).write_bytes(msgpack.packb({"crc32": zlib.crc32(raw), "body": raw}, use_bin_type=True))
    a, b = _try_load(model, folder), _try_load(model, work)
    assert a.token_ids == b.token_ids
    assert all(torch.equal(x.k, y.k) for x, y in zip(a.layers, b.layers))

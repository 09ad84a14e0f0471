"""Integration on the real bundled SmolLM2-135M-Instruct at short lengths."""
import json

import pytest
import torch

import ctxmem
from ctxmem.cli import main as cli_main

pytestmark = pytest.mark.slow


def test_wrapped_equals_stock_when_budget_covers_context(smollm2):
    model, tok = smollm2
    text = "The quick brown fox jumps over the lazy dog. " * 60  # ~600 tokens
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": text + "How many foxes?"}],
                                                add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]])
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    ref_logits = model(ids).logits[:, -1]
    # small blocks and a short local window so retrieval really runs, topk covering everything;
    # no reader (it changes the model on purpose for the question: test_bundled_reader_* covers it)
    ctxmem.wrap(model, ctxmem.MemoryConfig(block_size=32, topk_blocks=64, sink_tokens=16, local_tokens=128,
                                           prefill_chunk=128, reader=None), tokenizer=tok)
    try:
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        logits = model(ids).logits[:, -1]
    finally:
        ctxmem.unwrap(model)
    assert (logits - ref_logits).abs().max().item() <= 1e-3
    assert torch.equal(out, ref)


def _question_selection(smollm2, **cfg_kw):
    """Read a filler passage with one needle and a question; return (cache, config, the blocks
    that hold the needle). ``cache.last_selection`` is the question chunk's per-layer selection."""
    model, tok = smollm2
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    body = filler * 20 + "The pass key is 48213. Remember it. 48213 is the pass key. " + filler * 20
    ids = tok(body + "What is the pass key?", add_special_tokens=False)["input_ids"]
    cfg = ctxmem.MemoryConfig(block_size=32, sink_tokens=16, local_tokens=64, prefill_chunk=64, embed_neighbors=0,
                              query_tokens=12, **cfg_kw)
    ctxmem.wrap(model, cfg, tokenizer=tok)
    try:
        cache = ctxmem.new_cache(model)
        cache.record_selection = True
        model(torch.tensor([ids]), cache=cache)
    finally:
        ctxmem.unwrap(model)
    S, sink = cfg.block_size, cfg.sink_tokens
    holding = {j for j in range((len(ids) - sink) // S)
               if "48213" in tok.decode(ids[sink + j * S: sink + (j + 1) * S]).replace(" ", "")}
    assert holding
    return cache, cfg, holding


def test_embedder_votes_for_the_needle_block(smollm2):
    cache, _, holding = _question_selection(smollm2, topk_blocks=2, embed_hits=1, embed_margin=None)
    # every layer and head attends a block holding the needle during the question chunk
    for sel in cache.last_selection.values():
        for head in sel[0].tolist():
            assert holding & set(head), (holding, head)


def test_embed_margin_narrows_the_question_to_the_needle(smollm2):
    """With a margin, the question attends only the blocks the embedder singled out (here the
    needle's one or two blocks, whose similarity stands well clear of the filler's), not topk."""
    cache, cfg, holding = _question_selection(smollm2, topk_blocks=6, embed_hits=3, embed_margin=0.05)
    voted = {j for j, x in enumerate(cache.bias[0].tolist()) if x > 0}
    assert voted & holding and len(voted) < cfg.topk_blocks, (voted, holding)
    assert cache.topk == len(voted)  # no key-scored fill
    for sel in cache.last_selection.values():
        for head in sel[0].tolist():
            assert set(head) == voted, (voted, head)


def test_cli_ask_json(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("Paris is the capital of France. " * 40)
    rc = cli_main(["ask", "--context", str(doc), "What is the capital of France?", "--json",
                   "--max-new-tokens", "8"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert "Paris" in report["answer"]
    assert report["context_tokens"] > 300 and report["mode"] == "ctxmem"


@pytest.mark.parametrize("content, msg", [(b"", "is empty"), (b"\x00\x01binary", "looks binary")])
def test_cli_ask_bad_context(tmp_path, capsys, content, msg):
    doc = tmp_path / "doc.bin"
    doc.write_bytes(content)
    assert cli_main(["ask", "--context", str(doc), "q"]) == 1  # a handled error
    assert msg in capsys.readouterr().err
    assert cli_main(["ask", "--context", str(tmp_path / "missing.txt"), "q"]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_cli_ask_with_knowledge(tmp_path, capsys):
    from ctxmem.index import KnowledgeIndex

    (tmp_path / "notes.txt").write_text("The harbor lantern of Copperton is painted green. " * 5)
    (tmp_path / "other.txt").write_text("Violins are made of spruce and maple wood. " * 5)
    KnowledgeIndex.build([str(tmp_path / "notes.txt"), str(tmp_path / "other.txt")], str(tmp_path / "kb"),
                         embedder="hash:64", progress=False)
    rc = cli_main(["ask", "--knowledge", str(tmp_path / "kb"), "What colour is the harbor lantern of Copperton?",
                   "--json", "--max-new-tokens", "12"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert "green" in report["answer"].lower()


def test_cli_ask_memory_reads_once_then_loads(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse keeper's cat is called Marmalade. " + "Waves broke on the rocks all night. " * 120)
    mem = tmp_path / "doc.mem"
    args = ["ask", "What is the lighthouse keeper's cat called?", "--json", "--max-new-tokens", "10",
            "--memory", str(mem), "--ram-budget", "2MB"]
    assert cli_main(args + ["--context", str(doc)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["memory"]["action"] == "read and saved" and first["memory"]["tokens"] > 800
    assert cli_main(args) == 0  # no --context: the saved memory answers
    second = json.loads(capsys.readouterr().out)
    assert second["memory"]["action"] == "loaded"
    assert second["answer"] == first["answer"] and "Marmalade" in first["answer"]
    doc.write_text("The lighthouse keeper's cat is called Biscuit. " + "Waves broke on the rocks all night. " * 120)
    assert cli_main(args + ["--context", str(doc)]) == 0  # the document changed: read again
    third = json.loads(capsys.readouterr().out)
    assert third["memory"]["action"] == "read and saved" and "Biscuit" in third["answer"]
    assert cli_main(["ask", "q", "--memory", str(tmp_path / "none.mem")]) == 1
    assert "no memory at" in capsys.readouterr().err


def test_bundled_reader_loads_and_answers_a_held_out_task(smollm2):
    """The bundled reader: attached by load_model, loaded by wrap(reader="auto"), and answering a
    held-out task of benchmarks.reader (2K, sample 0: found with the reader in results/reader.json)."""
    from benchmarks.reader import SEED0, heldout_texts
    from ctxmem.reader.tasks import make_task
    from ctxmem.reader.train import prompt_ids

    model, tok = smollm2
    assert model.ctxmem_reader == "smollm2-reader"
    task = make_task(SEED0 + 1000 * 2048 + 0, heldout_texts(), int(2048 * 3.3))
    ids = torch.tensor([prompt_ids(tok, task.messages_user)])
    stock = model(ids[:, -64:]).logits
    ctxmem.wrap(model, ctxmem.MemoryConfig(reader="auto"), tokenizer=tok)
    try:
        assert model._ctxmem.reader.source.endswith("smollm2-reader")
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    finally:
        ctxmem.unwrap(model)
    assert task.value in tok.decode(out[0, ids.shape[1]:]), tok.decode(out[0, ids.shape[1]:])
    assert torch.equal(model(ids[:, -64:]).logits, stock)  # the adapter left with unwrap


def test_reader_training_examples_keep_the_bundled_readers_tasks(smollm2):
    """``--tasks facts`` (the default) must give exactly the examples the bundled reader was trained on;
    chain examples are checked over the answer's decode steps instead of the question alone."""
    import random

    from ctxmem.reader.tasks import make_chain_task, make_task
    from ctxmem.reader.train import prompt_ids, stdlib_texts, task_examples

    _, tok = smollm2
    texts = stdlib_texts(seed=0)
    plain, mixed = task_examples(tok, 0, 1024, 2048), task_examples(tok, 0, 1024, 2048, mix={"facts": 1, "chains": 1})
    families = set()
    for step in range(6):
        n_tok = random.Random(f"0:{step}").randint(1024, 2048)
        want = make_task(step, texts, n_chars=int(n_tok * 3.6))
        ex = plain(step)
        assert ex.prompt == prompt_ids(tok, want.messages_user) and ex.visible is not None and ex.visible_answer is None
        m = mixed(step)
        if m.prompt == ex.prompt:
            families.add("facts")
        else:
            chain = make_chain_task(step, texts, n_chars=int(n_tok * 3.6))
            assert m.prompt == prompt_ids(tok, chain.messages_user) and m.visible is None
            assert m.visible_answer("\n".join(chain.needed)) and not m.visible_answer(chain.needed[0])
            families.add("chains")
    assert families == {"facts", "chains"}

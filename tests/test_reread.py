"""Reread (``MemoryConfig.reread_tokens``): the best passages of a long input read again before the question."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ctxmem
from ctxmem.hf import forward as fwd
from ctxmem.memory.text_index import excerpt_spans


# -- which blocks: excerpt_spans ------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=40, unique=True),
       st.integers(0, 12), st.integers(0, 3))
def test_spans_are_merged_within_budget_and_hold_the_best_block(raw, budget, neighbors):
    sims = torch.tensor([x / 1024 for x in raw])
    n = len(raw)
    spans = excerpt_spans(sims, budget, neighbors)
    blocks = [j for a, e in spans for j in range(a, e)]
    assert all(0 <= a < e <= n for a, e in spans)
    assert all(e1 < a2 for (_, e1), (a2, _) in zip(spans, spans[1:]))  # sorted, disjoint, not adjacent
    assert len(blocks) <= budget
    if budget:
        assert int(sims.argmax()) in blocks
    if budget >= n:
        assert spans == [(0, n)]
    if neighbors == 0:  # then it is the plain top-`budget` rule
        top = sorted(range(n), key=lambda j: -raw[j])[:budget]
        assert sorted(blocks) == sorted(top)


def test_a_best_block_with_neighbours_comes_whole_when_it_fits():
    sims = torch.tensor([0.0, 0.1, 0.9, 0.2, 0.0, 0.0, 0.8, 0.0])
    assert excerpt_spans(sims, 6, 1) == [(1, 4), (5, 8)]
    # budget 4: 2's hood {1,2,3}; 6's hood (3 new) does not fit and is skipped; 3's hood adds {4}
    assert excerpt_spans(sims, 4, 1) == [(1, 5)]
    assert excerpt_spans(sims, 1, 1) == [(2, 3)]  # the best block alone when its hood does not fit


# -- where the question starts --------------------------------------------------------------------
@pytest.mark.slow
def test_question_tail_is_what_follows_the_last_blank_line(smollm2):
    model, tok = smollm2
    from ctxmem.reading import build_prompt

    cfg = ctxmem.MemoryConfig(reread_tokens=256)
    ctxmem.wrap(model, cfg, tokenizer=tok)
    try:
        f = model._ctxmem.forward
        ids = build_prompt(tok, "Some document text.\nIt ends here.", "Who wrote it?")
        t = f._tail_length(ids)
        tail = tok.decode(ids[-t:], skip_special_tokens=True)
        assert tail.startswith("Answer the question using the text above.\nQuestion: Who wrote it?"), tail
        no_blank = tok("one two three four five six seven eight nine ten", add_special_tokens=False)["input_ids"]
        assert f._tail_length(no_blank) == min(cfg.query_tokens, len(no_blank) - 1)
    finally:
        ctxmem.unwrap(model)


# -- the whole path on the real model --------------------------------------------------------------
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _prompt(tok, key="48213", reps=30):
    body = FILLER * reps + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * reps
    msgs = [{"role": "user", "content": body + "\n\nWhat is the pass key?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return torch.tensor([list(ids) + tok("The pass key is", add_special_tokens=False)["input_ids"]])


@pytest.mark.slow
def test_reread_passages_hold_the_needle_and_generate_counts_right(smollm2):
    model, tok = smollm2
    ids = _prompt(tok, reps=12)
    cfg = ctxmem.MemoryConfig(block_size=32, topk_blocks=2, sink_tokens=16, local_tokens=64, prefill_chunk=128,
                              reread_tokens=160, reader=None)
    ctxmem.wrap(model, cfg, tokenizer=tok)
    try:
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        mem = model._ctxmem.last_memory
        full = model(ids).logits  # every position's logits wanted: no reread, one logit per input token
    finally:
        ctxmem.unwrap(model)
    assert full.shape[1] == ids.shape[1]
    hidden = mem.hidden_prefix[0]
    assert 0 < hidden <= cfg.reread_tokens
    start = mem.reread_from[0]
    after = tok.decode(mem.token_ids[0][start + hidden:], skip_special_tokens=True)
    assert after.lstrip().startswith("What is the pass key?"), after  # the question follows the passages
    passages = tok.decode(mem.token_ids[0][start:start + hidden])
    assert passages.startswith(fwd.REREAD_HEADER) and "48213" in passages, passages
    # generate saw its own count: the prompt and 6 new tokens; the memory holds the passages on top
    assert out.shape[1] == ids.shape[1] + 6
    assert mem.seen == ids.shape[1] + 5 and len(mem.token_ids[0]) == mem.seen + hidden
    assert "48213" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_reread_equals_the_stock_model_reading_the_passages_as_text(smollm2, monkeypatch):
    """With a budget that covers everything, the wrapped model is exact; forcing reread on then must give
    what the stock model gives for [body, passages, question] written out, logits and greedy tokens."""
    model, tok = smollm2
    ids = _prompt(tok, reps=8)
    cfg = ctxmem.MemoryConfig(block_size=32, topk_blocks=64, sink_tokens=16, local_tokens=128, prefill_chunk=128,
                              reread_tokens=128, reader=None)
    real = fwd.middle_blocks
    monkeypatch.setattr(fwd, "middle_blocks", lambda t, p: real(t, p) + 10**6)  # "too long": reread runs
    ctxmem.wrap(model, cfg, tokenizer=tok)
    try:
        cache = ctxmem.new_cache(model)
        logits = model(ids, cache=cache, logits_to_keep=1).logits[:, -1]
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        mem = model._ctxmem.last_memory
    finally:
        ctxmem.unwrap(model)
    start, hidden = cache.reread_from[0], cache.hidden_prefix[0]
    assert hidden > 0
    written = cache.token_ids[0][:start + hidden] + ids[0, start:].tolist()
    assert written[:start] == ids[0, :start].tolist()
    ref = model(torch.tensor([written])).logits[:, -1]
    assert (logits - ref).abs().max().item() <= 1e-3
    ref_out = model.generate(torch.tensor([written]), max_new_tokens=8, do_sample=False)
    assert torch.equal(out[0, ids.shape[1]:], ref_out[0, len(written):])
    assert mem.hidden_prefix == cache.hidden_prefix


@pytest.mark.parametrize("bad", [-1, 1.5, "512"])
def test_bad_reread_budget_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="reread_tokens"):
        ctxmem.MemoryConfig(reread_tokens=bad)


@pytest.mark.slow
@pytest.mark.parametrize("ram", [None, "2MB"])
def test_cli_ask_rereads_from_the_document_and_from_a_saved_memory(tmp_path, capsys, ram):
    import json

    from ctxmem.cli import main as cli_main

    doc = tmp_path / "doc.txt"
    doc.write_text("Waves broke on the rocks all night. " * 25 + "The lighthouse keeper's cat is called Marmalade. "
                   + "Waves broke on the rocks all night. " * 25)
    small = ["block_size=32", "topk_blocks=2", "sink_tokens=16", "local_tokens=64", "reread_tokens=160"]
    args = ["ask", "What is the lighthouse keeper's cat called?", "--json", "--max-new-tokens", "14",
            "--memory", str(tmp_path / "doc.mem")] + [x for kv in small for x in ("--set", kv)] + \
        (["--ram-budget", ram] if ram else [])
    assert cli_main(args + ["--context", str(doc)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert cli_main(args) == 0  # the saved memory, and the question alone: it rereads from the memory
    second = json.loads(capsys.readouterr().out)
    assert second["memory"]["action"] == "loaded"
    for report in (first, second):
        assert 0 < report["reread"]["tokens"] <= 160 and "Marmalade" in report["reread"]["text"], report
        assert "Marmalade" in report["answer"], report


def test_reread_budget_fits_the_trained_window():
    cfg = ctxmem.MemoryConfig(reread_tokens=512)
    fixed = cfg.sink_tokens + cfg.topk_blocks * cfg.block_size + cfg.local_tokens + cfg.block_size + 1
    assert cfg.reread_budget(None) == 512 and cfg.reread_budget(8192) == 512
    room = fixed + cfg.reread_question_max + 300  # a window with room for 300 tokens of passages
    assert cfg.reread_budget(room) == 300
    assert cfg.reread_budget(fixed) == 0  # no room at all: no reread, and wrap still accepts the config
    assert ctxmem.MemoryConfig(reread_tokens=0).reread_budget(8192) == 0

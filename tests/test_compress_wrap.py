"""wrap(model, knowledge=KB, compressor=comp): the KB's hits are read as summary tokens before the prompt."""
import copy
import zlib

import pytest
import torch
from transformers import AutoTokenizer

import ctxmem
from conftest import tiny_model
from ctxmem.index import KnowledgeIndex, knowledge_context
from ctxmem.index.embed import HashingEmbedder
from ctxmem.models import resolve_lm_path

pytest.importorskip("peft")

from ctxmem.compress.model import Compressor, CompressorConfig, CompressorError  # noqa: E402
from ctxmem.hf.wrap import SUMMARY_ID  # noqa: E402

N, RATIO = 8, 4  # 8-token segments -> 2 summary tokens each
M = N // RATIO
EXACT = dict(block_size=8, topk_blocks=1000, sink_tokens=4, local_tokens=16, prefill_chunk=24, selector="keys")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_lm_path("smollm2"))


@pytest.fixture(scope="module")
def kb(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("kb")
    (d / "a.txt").write_text("The copper harbor lantern is green and it hangs by the old quartz bridge. " * 12)
    (d / "b.txt").write_text("Violins are made of spruce and maple, varnished in the willow meadow. " * 12)
    (d / "c.txt").write_text("The thunder engine of the castle runs on velvet saddle oil every orbit. " * 12)
    return KnowledgeIndex.build([str(d / "a.txt"), str(d / "b.txt"), str(d / "c.txt")], str(d / "kb"),
                                embedder="hash:64", progress=False)


def _model_and_comp(tok, seed=2):
    """A tiny llama with SmolLM2's vocabulary, a pristine copy of it, and a compressor on it whose
    adapter matters (LoRA B random, not zero)."""
    model = tiny_model("llama", vocab=len(tok), seed=seed)
    stock = copy.deepcopy(model)
    cfg = CompressorConfig(base_model="tiny", ratio=RATIO, segment_tokens=N, lora_r=4, lora_alpha=8,
                           bos_id=tok.convert_tokens_to_ids("<|endoftext|>"), anchor="last")
    comp = Compressor(model, tok, cfg, seed=seed).eval()
    with torch.no_grad():
        for k, p in comp.lora_parameters().items():
            if "lora_B" in k:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(zlib.crc32(k.encode())))
    return model, stock, comp


def _reference(stock, comp, tok, kb, prompt, budget):
    """What the wrapper must equal: the stock model fed [comp.prefix(summaries of the notes), prompt]."""
    n_text = (budget - 1) // M * N
    notes = knowledge_context(kb, tok.decode(prompt), tok, budget_tokens=n_text)
    ids = tok(notes, add_special_tokens=False)["input_ids"]
    assert ids and len(ids) <= n_text
    pre = comp.prefix(comp.compress(ids))
    x = torch.cat([pre, stock.get_input_embeddings()(torch.tensor([prompt]))], dim=1)
    return x, pre.shape[1], len(ids), notes


def test_summary_prefix_equals_stock_on_inputs_embeds(tok, kb):
    model, stock, comp = _model_and_comp(tok)
    prompt = tok("What colour is the copper harbor lantern by the bridge?", add_special_tokens=False)["input_ids"]
    budget = 41  # positions: BOS + 20 summary tokens = 160 tokens of notes
    x, P, T, notes = _reference(stock, comp, tok, kb, prompt, budget)
    assert "copper harbor lantern" in notes
    assert P <= budget and T > budget  # more text than positions: the notes really are compressed
    ref = stock(inputs_embeds=x).logits[0, P:]
    with comp.lora():  # the adapter changes the model (so the check below would see it left on)
        assert not torch.allclose(model(inputs_embeds=x).logits[0, P:], ref, atol=1e-3)

    ctxmem.wrap(model, ctxmem.MemoryConfig(**EXACT), tokenizer=tok, knowledge=kb, knowledge_budget=budget,
                compressor=comp)
    out = model(torch.tensor([prompt]))
    torch.testing.assert_close(out.logits[0], ref, rtol=0, atol=1e-4)
    mem = out.cache
    assert mem.hidden_prefix == [P] and mem.seen == len(prompt)
    assert mem.token_ids[0][:P] == [comp.config.bos_id] + [SUMMARY_ID] * (P - 1)
    assert mem.token_ids[0][P:] == prompt

    # generate: the same greedy tokens as the stock model on the same inputs_embeds
    gen = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape[1] == len(prompt) + 5  # generate never sees the hidden prefix
    ref_gen = stock.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                             max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen[0, -5:].tolist() == ref_gen[0, -5:].tolist()
    ctxmem.unwrap(model)
    # unwrapped (adapter still injected, off): the stock model again
    torch.testing.assert_close(model(inputs_embeds=x).logits, stock(inputs_embeds=x).logits, rtol=0, atol=0)


def test_batch_rows_with_left_padding(tok, kb):
    model, stock, comp = _model_and_comp(tok, seed=3)
    prompts = [tok("Tell me about the violins of spruce and maple wood.", add_special_tokens=False)["input_ids"],
               tok("Which oil does the thunder engine of the castle run on?", add_special_tokens=False)["input_ids"]]
    budget = 29
    refs, Ps = [], []
    for p in prompts:
        x, P, _, _ = _reference(stock, comp, tok, kb, p, budget)
        refs.append(stock(inputs_embeds=x).logits[0, P:])
        Ps.append(P)
    L = max(len(p) for p in prompts)
    ids = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p)
        mask[b, L - len(p):] = 1
    ctxmem.wrap(model, ctxmem.MemoryConfig(**EXACT), tokenizer=tok, knowledge=kb, knowledge_budget=budget,
                compressor=comp)
    out = model(ids, attention_mask=mask)
    assert out.cache.hidden_prefix == Ps and all(P <= budget for P in Ps)
    for b, p in enumerate(prompts):
        torch.testing.assert_close(out.logits[b, L - len(p):], refs[b], rtol=0, atol=1e-4)
    ctxmem.unwrap(model)


@pytest.mark.parametrize("budget", [1, 2, 3, 4, 7, 12, 33, 64, 200])
def test_budget_counts_decoder_positions(tok, kb, budget):
    model, _, comp = _model_and_comp(tok, seed=4)
    prompt = tok("copper harbor lantern quartz bridge", add_special_tokens=False)["input_ids"]
    ctxmem.wrap(model, ctxmem.MemoryConfig(**EXACT), tokenizer=tok, knowledge=kb, knowledge_budget=budget,
                compressor=comp)
    mem = model(torch.tensor([prompt])).cache
    P = (mem.hidden_prefix or [0])[0]
    assert P <= budget
    if budget < 1 + M:
        assert P == 0  # not even one summary token fits after BOS
    else:
        # the notes admitted fill the text budget floor((budget-1)/m)*n up to the last segment
        n_text = (budget - 1) // M * N
        notes = knowledge_context(kb, tok.decode(prompt), tok, budget_tokens=n_text)
        T = len(tok(notes, add_special_tokens=False)["input_ids"]) if notes else 0
        assert P == (1 + (-(-T // N)) * M if T else 0)
    assert len(mem.token_ids[0]) == P + len(prompt)
    ctxmem.unwrap(model)


def test_embed_selector_still_votes_after_a_summary_prefix(tok, kb):
    model, _, comp = _model_and_comp(tok, seed=5)
    filler = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
              "tau upsilon phi chi psi omega river mountain garden meadow anchor desert candle ")
    needle = "The secret password of the harbor lantern is marmalade. "
    text = filler * 3 + needle + filler * 3 + "Question: what is the secret password of the harbor lantern?"
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    cfg = ctxmem.MemoryConfig(block_size=8, topk_blocks=2, sink_tokens=4, local_tokens=8, prefill_chunk=24,
                              selector="embed", embed_hits=1, embed_neighbors=0, query_tokens=12)
    ctxmem.wrap(model, cfg, tokenizer=tok, embedder=HashingEmbedder(256), knowledge=kb, knowledge_budget=41,
                compressor=comp)
    mem = model(torch.tensor([prompt])).cache
    P = mem.hidden_prefix[0]
    assert P > cfg.sink_tokens + 2 * cfg.block_size  # the summaries fill whole middle blocks
    # summary positions have no text for the selector; the prompt's blocks keep theirs
    assert mem.text_index.text(mem.token_ids[0][1:P]) == ""
    assert mem.text_index.text(mem.token_ids[0][P:]) == tok.decode(prompt)
    # the question chunk got the embedder's votes (a row led by summaries is not "no text"),
    # and the top vote is the needle's block
    assert mem.bias is not None
    start = P + len(tok(filler * 3, add_special_tokens=False)["input_ids"])
    needle_len = len(tok(needle, add_special_tokens=False)["input_ids"])
    best = int(torch.argmax(mem.bias[0]))
    lo, hi = cfg.sink_tokens + best * cfg.block_size, cfg.sink_tokens + (best + 1) * cfg.block_size
    assert lo < start + needle_len and hi > start, (best, lo, hi, start)
    ctxmem.unwrap(model)


def test_compressor_by_path_is_loaded_on_the_model_and_removed_at_unwrap(tok, kb, tmp_path):
    model, stock, comp = _model_and_comp(tok, seed=6)
    comp.save_pretrained(tmp_path / "c")
    prompt = tok("What colour is the copper harbor lantern?", add_special_tokens=False)["input_ids"]
    ctxmem.wrap(model, ctxmem.MemoryConfig(**EXACT), tokenizer=tok, knowledge=kb, knowledge_budget=33,
                compressor=comp)
    a = model(torch.tensor([prompt])).logits
    ctxmem.unwrap(model)

    def adapters(m):
        layer = m.model.layers[0].self_attn.q_proj
        return sorted(layer._get_available_adapters())

    before = adapters(model)
    ctxmem.wrap(model, ctxmem.MemoryConfig(**EXACT), tokenizer=tok, knowledge=kb, knowledge_budget=33,
                compressor=str(tmp_path / "c"))
    assert len(adapters(model)) == len(before) + 1
    b = model(torch.tensor([prompt])).logits
    ctxmem.unwrap(model)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert adapters(model) == before
    x = torch.randint(0, len(tok), (1, 9))
    torch.testing.assert_close(model(x).logits, stock(x).logits, rtol=0, atol=0)


def test_bad_compressor_arguments(tok, kb, tmp_path):
    model, _, comp = _model_and_comp(tok, seed=7)
    cfg = ctxmem.MemoryConfig(**EXACT)
    with pytest.raises(TypeError, match="ctxmem.Compressor or a checkpoint"):
        ctxmem.wrap(model, cfg, tokenizer=tok, knowledge=kb, compressor=42)
    with pytest.raises(CompressorError, match="no compressor at"):
        ctxmem.wrap(model, cfg, tokenizer=tok, knowledge=kb, compressor="no-such-compressor")
    ctxmem.unwrap(ctxmem.wrap(model, cfg, tokenizer=tok, compressor=comp))  # without a KB: for read_context
    _, _, other_comp = _model_and_comp(tok, seed=8)  # same shapes, other weights
    with pytest.raises(ValueError, match="different base model"):
        ctxmem.wrap(model, cfg, tokenizer=tok, knowledge=kb, compressor=other_comp)
    path = comp.save_pretrained(tmp_path / "c")
    small = tiny_model("llama", vocab=len(tok), seed=1, head_dim=8)  # hidden 32; the compressor's is 64
    with pytest.raises(CompressorError, match="hidden size"):
        ctxmem.wrap(small, cfg, tokenizer=tok, knowledge=kb, compressor=path)
    for m in (model, small):
        assert getattr(m, "_ctxmem", None) is None  # a refused wrap leaves the model as it was


def test_read_knowledge_with_a_chosen_query_then_generate(tok, kb):
    model, stock, comp = _model_and_comp(tok, seed=9)
    question = "What is the violin made of?"
    prompt = tok("Please answer briefly: " + question, add_special_tokens=False)["input_ids"]
    ctxmem.wrap(model, ctxmem.MemoryConfig(**EXACT), tokenizer=tok, knowledge=kb, knowledge_budget=33,
                compressor=comp)
    mem = ctxmem.read_knowledge(model, question)
    P = mem.hidden_prefix[0]
    notes = knowledge_context(kb, question, tok, budget_tokens=(33 - 1) // M * N)
    pre = comp.prefix(comp.compress(tok(notes, add_special_tokens=False)["input_ids"]))
    assert pre.shape[1] == P
    x = torch.cat([pre, stock.get_input_embeddings()(torch.tensor([prompt]))], dim=1)
    ref = stock.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                         max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(torch.tensor([prompt]), cache=mem, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out[0, -4:].tolist() == ref[0, -4:].tolist()
    assert mem.hidden_prefix == [P]  # the forward did not read the knowledge a second time
    ctxmem.unwrap(model)


def test_cli_ask_compressor_needs_knowledge(capsys):
    from ctxmem.cli import main

    assert main(["ask", "q", "--context", __file__, "--compressor", "smollm2-r8"]) == 1
    assert "--knowledge" in capsys.readouterr().err


def test_a_memory_with_a_summary_prefix_saves_and_loads(tok, kb, tmp_path):
    model, stock, comp = _model_and_comp(tok, seed=10)
    question = "Which oil does the thunder engine use?"
    prompt = tok("Answer this: " + question + " It uses", add_special_tokens=False)["input_ids"]
    ctxmem.wrap(model, ctxmem.MemoryConfig(**EXACT), tokenizer=tok, knowledge=kb, knowledge_budget=25,
                compressor=comp)
    mem = ctxmem.read_knowledge(model, question)
    P = mem.hidden_prefix[0]
    ctxmem.read_memory(model, torch.tensor([prompt[:-3]]), memory=mem)
    ctxmem.save_memory(model, tmp_path / "m", mem)
    loaded = ctxmem.load_memory(model, tmp_path / "m")
    assert loaded.hidden_prefix == [P] and loaded.token_ids == mem.token_ids
    assert loaded.token_ids[0][1:P] == [SUMMARY_ID] * (P - 1)
    out = model.generate(torch.tensor([prompt]), cache=loaded, max_new_tokens=4, do_sample=False, pad_token_id=0)
    notes = knowledge_context(kb, question, tok, budget_tokens=(25 - 1) // M * N)
    pre = comp.prefix(comp.compress(tok(notes, add_special_tokens=False)["input_ids"]))
    x = torch.cat([pre, stock.get_input_embeddings()(torch.tensor([prompt]))], dim=1)
    ref = stock.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                         max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out[0, -4:].tolist() == ref[0, -4:].tolist()
    ctxmem.unwrap(model)


def _context_reference(stock, comp, ids, keep_recent, prompt):
    far, near = ids[:len(ids) - keep_recent], ids[len(ids) - keep_recent:]
    emb = stock.get_input_embeddings()
    parts = ([comp.prefix(comp.compress(far))] if far else []) + [emb(torch.tensor([near + prompt]))]
    return torch.cat(parts, dim=1), len(far)


@pytest.mark.parametrize("n_ctx,keep_recent", [(61, 13), (64, 0), (20, 20), (9, 40), (0, 5)])
def test_read_context_equals_stock_on_summaries_then_recent_tokens(tok, n_ctx, keep_recent):
    """read_context(model, ids, keep_recent): [BOS, summaries of the far part], the recent tokens, then
    the prompt read through the memory gives the stock model's logits on those inputs_embeds."""
    model, stock, comp = _model_and_comp(tok, seed=5)
    ids = torch.randint(5, len(tok), (n_ctx,), generator=torch.Generator().manual_seed(n_ctx)).tolist()
    prompt = tok("What was said above?", add_special_tokens=False)["input_ids"]
    keep = min(keep_recent, n_ctx)
    x, far = _context_reference(stock, comp, ids, keep, prompt)
    P = x.shape[1] - len(prompt)
    ref = stock(inputs_embeds=x).logits[0, P:]
    ctxmem.wrap(model, ctxmem.MemoryConfig(**EXACT), tokenizer=tok, compressor=comp)
    mem = ctxmem.read_context(model, ids, keep_recent=keep_recent)
    S = -(-far // N) * M
    assert mem.context_report == {"tokens": n_ctx, "compressed_tokens": far, "recent_tokens": n_ctx - far,
                                  "positions": (1 + S if far else 0) + n_ctx - far}
    assert mem.hidden_prefix == [mem.context_report["positions"]] == [P]
    assert (mem.token_ids or [[]])[0] == ([comp.config.bos_id] + [SUMMARY_ID] * S if far else []) + ids[far:]
    out = model(torch.tensor([prompt]), cache=mem)
    torch.testing.assert_close(out.logits[0], ref, rtol=0, atol=1e-4)
    gen = model.generate(torch.tensor([prompt]), cache=ctxmem.read_context(model, ids, keep_recent=keep_recent),
                         max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref_gen = stock.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                             max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen[0, -4:].tolist() == ref_gen[0, -4:].tolist()
    ctxmem.unwrap(model)


def test_read_context_text_and_bad_input(tok):
    model, _, comp = _model_and_comp(tok, seed=6)
    with pytest.raises(ValueError, match="not wrapped"):
        ctxmem.read_context(model, "text")
    ctxmem.wrap(model, ctxmem.MemoryConfig(**EXACT), tokenizer=tok)
    with pytest.raises(ValueError, match="without compressor"):
        ctxmem.read_context(model, "text")
    ctxmem.unwrap(model)
    ctxmem.wrap(model, ctxmem.MemoryConfig(**EXACT), tokenizer=tok, compressor=comp)
    text = "The copper harbor lantern is green. " * 6
    mem = ctxmem.read_context(model, text, keep_recent=10)
    assert mem.context_report["tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])
    for bad, match in ((-1, "keep_recent"), (2.5, "keep_recent"), (True, "keep_recent")):
        with pytest.raises(ValueError, match=match):
            ctxmem.read_context(model, text, keep_recent=bad)
    with pytest.raises(ValueError, match="1-D sequence of token ids"):
        ctxmem.read_context(model, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D sequence of token ids"):
        ctxmem.read_context(model, [0.5, 1.5])
    with pytest.raises(ValueError, match="not empty"):
        ctxmem.read_context(model, text, memory=mem)
    ctxmem.unwrap(model)

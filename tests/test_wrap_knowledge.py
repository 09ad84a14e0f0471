"""wrap(model, knowledge=KB): the KB's hits are read as a hidden prefix before the prompt."""
import torch
from transformers import AutoTokenizer

import ctxmem
from conftest import tiny_model
from ctxmem.index import KnowledgeIndex, knowledge_context
from ctxmem.models import resolve_lm_path


def test_knowledge_prefix_equals_stock_on_the_concatenation(tmp_path):
    tok = AutoTokenizer.from_pretrained(resolve_lm_path("smollm2"))
    (tmp_path / "a.txt").write_text("The copper harbor lantern is green. " * 20)
    (tmp_path / "b.txt").write_text("Violins are made of spruce and maple. " * 20)
    kb = KnowledgeIndex.build([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], str(tmp_path / "kb"),
                              embedder="hash:64", progress=False)
    prompt = tok("What colour is the copper harbor lantern?", add_special_tokens=False)["input_ids"]
    notes = knowledge_context(kb, tok.decode(prompt), tok, budget_tokens=120)
    assert "copper harbor lantern" in notes
    prefix = tok(notes + "\n\n", add_special_tokens=False)["input_ids"]

    model = tiny_model("llama", vocab=len(tok), seed=2)
    ref = model.generate(torch.tensor([prefix + prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    cfg = ctxmem.MemoryConfig(block_size=8, topk_blocks=1000, sink_tokens=4, local_tokens=16, prefill_chunk=24,
                              selector="keys")
    ctxmem.wrap(model, cfg, tokenizer=tok, knowledge=kb, knowledge_budget=120)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(prompt) + 6  # generate never sees the hidden prefix ...
    assert torch.equal(out[0, -6:], ref[0, -6:])  # ... but the model read it, exactly as if it were there

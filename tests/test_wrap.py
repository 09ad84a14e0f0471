"""wrap/unwrap against stock sdpa on tiny random llama / qwen2 / mistral models."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ctxmem
from conftest import padded_batch_and_rows, tiny_model

FAMILIES = ["llama", "qwen2", "mistral"]


def full_budget(**kw):
    # topk large enough that every middle block is always selected: ctxmem must equal full attention
    base = dict(block_size=8, topk_blocks=1000, sink_tokens=4, local_tokens=16, prefill_chunk=24, selector="keys")
    base.update(kw)
    return ctxmem.MemoryConfig(**base)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_equals_stock_logits(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    ctxmem.wrap(model, full_budget())
    out = model(ids).logits
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_generate_equals_stock(family):
    model = tiny_model(family, seed=3)
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    ctxmem.wrap(model, full_budget())
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_unwrap_restores_bit_identical(family):
    model = tiny_model(family, seed=5)
    ids = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(3))
    before = model(ids).logits
    ctxmem.wrap(model, ctxmem.MemoryConfig(block_size=8, topk_blocks=2, sink_tokens=4, local_tokens=16,
                                           prefill_chunk=24, selector="keys"))
    wrapped = model(ids).logits
    assert (wrapped - before).abs().max() > 1e-3  # a partial budget really changes attention ...
    ctxmem.unwrap(model)
    assert torch.equal(model(ids).logits, before)  # ... and unwrap gives the stock model back exactly
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in vars(model)


@settings(max_examples=12, deadline=None)
@given(chunk=st.integers(1, 70), length=st.integers(1, 140))
def test_full_budget_independent_of_prefill_chunk(chunk, length):
    model = tiny_model("llama", seed=7)
    ids = torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(length))
    ref = model(ids).logits
    ctxmem.wrap(model, full_budget(prefill_chunk=chunk))
    try:
        out = model(ids).logits
    finally:
        ctxmem.unwrap(model)
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_rows_alone(family):
    # Partial budget (real retrieval and re-rotation): each row must not feel the others' padding.
    model = tiny_model(family, seed=11)
    cfg = ctxmem.MemoryConfig(block_size=8, topk_blocks=2, sink_tokens=4, local_tokens=16, prefill_chunk=20,
                              selector="keys")
    ctxmem.wrap(model, cfg)
    out, alone_a, alone_b = padded_batch_and_rows(model)
    assert torch.equal(out[0, -10:], alone_a[0, -10:])
    assert torch.equal(out[1, -10:], alone_b[0, -10:])


def test_partial_budget_keeps_attention_span_inside_window():
    model = tiny_model("llama", window=64)
    with pytest.raises(ValueError, match="trained window"):
        ctxmem.wrap(model, ctxmem.MemoryConfig(block_size=8, topk_blocks=4, sink_tokens=4, local_tokens=16,
                                               prefill_chunk=24, selector="keys"))
    # 4 + 2*8 + 16 + 8 + 16 = 60 <= 64: accepted, and reads 10x the window
    ctxmem.wrap(model, ctxmem.MemoryConfig(block_size=8, topk_blocks=2, sink_tokens=4, local_tokens=16,
                                           prefill_chunk=16, selector="keys"))
    ids = torch.randint(0, 97, (1, 640), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 643)


def test_prefill_local_widens_only_the_body():
    """Body chunks read with prefill_topk blocks and a prefill_local window; the question chunk (the
    last prefill_chunk tokens) keeps topk_blocks and local_tokens. With a body window covering the
    whole input, every body token's logits equal the stock model's; the question's do not."""
    model = tiny_model("llama", seed=13)
    ids = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(6))
    ref = model(ids).logits
    kw = dict(block_size=8, topk_blocks=1, sink_tokens=4, local_tokens=16, prefill_chunk=24, selector="keys",
              prefill_topk=0)
    outs = {}
    for name, extra in [("wide", dict(prefill_local=200)), ("same", dict(prefill_local=16)), ("none", {})]:
        ctxmem.wrap(model, ctxmem.MemoryConfig(**kw, **extra))
        try:
            outs[name] = model(ids).logits
        finally:
            ctxmem.unwrap(model)
    body, question = slice(0, 150 - 24), slice(150 - 24, 150)
    assert (outs["wide"][:, body] - ref[:, body]).abs().max().item() <= 1e-4
    assert (outs["wide"][:, question] - ref[:, question]).abs().max().item() > 1e-3
    assert (outs["none"][:, body] - ref[:, body]).abs().max().item() > 1e-3  # the narrow window really differs
    assert torch.equal(outs["same"], outs["none"])  # prefill_local == local_tokens is the old behaviour


def test_prefill_local_counts_toward_the_window():
    model = tiny_model("llama", window=64)
    cfg = dict(block_size=8, topk_blocks=2, sink_tokens=4, local_tokens=16, prefill_chunk=16, selector="keys")
    ctxmem.wrap(model, ctxmem.MemoryConfig(**cfg, prefill_topk=0, prefill_local=32))  # 4 + 32 + 8 + 16 = 60
    ctxmem.unwrap(model)
    with pytest.raises(ValueError, match="prefill_local"):
        ctxmem.wrap(model, ctxmem.MemoryConfig(**cfg, prefill_topk=0, prefill_local=40))  # 68 > 64


def test_memory_cache_is_returned_and_reused():
    model = tiny_model("llama")
    ctxmem.wrap(model, full_budget())
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(9))
    whole = model(ids).logits
    first = model(ids[:, :45])
    assert isinstance(first.cache, ctxmem.hf.MemoryCache)
    rest = model(ids[:, 45:], cache=first.cache).logits
    assert (rest - whole[:, 45:]).abs().max().item() <= 1e-4


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(block_size=0), "block_size"),
    (dict(topk_blocks=-1), "topk_blocks"),
    (dict(sink_tokens=-4), "sink_tokens"),
    (dict(local_tokens=-1), "local_tokens"),
    (dict(prefill_chunk=0), "prefill_chunk"),
    (dict(block_size=64, reps_per_block=3), "reps_per_block"),
    (dict(backend="gpu"), "backend"),
    (dict(selector="magic"), "selector"),
    (dict(prefill_local=-1), "prefill_local"),
    (dict(prefill_local=True), "prefill_local"),
    (dict(prefill_local=256, ram_budget="1GB"), "prefill_local"),
    (dict(block_size=1.5), "block_size"),
])
def test_bad_config_names_the_problem(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ctxmem.MemoryConfig(**kw)


def test_unsupported_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match="family 'gpt2' is not supported"):
        ctxmem.wrap(model)


def test_bad_inputs_are_refused():
    model = tiny_model("llama")
    ctxmem.wrap(model, full_budget(max_context=100))
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="max_context"):
        model(torch.zeros(1, 101, dtype=torch.long))
    ids = torch.ones(2, 10, dtype=torch.long)
    right_pad = torch.ones(2, 10, dtype=torch.long)
    right_pad[0, -3:] = 0
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=right_pad)
    with pytest.raises(ValueError, match="cache_implementation"):  # generate's per-layer-type mask mapping
        model(ids, attention_mask={"full_attention": torch.ones(2, 10, dtype=torch.bool)})
    with pytest.raises(ValueError, match="already wrapped"):
        ctxmem.wrap(model)
    ctxmem.unwrap(model)
    with pytest.raises(ValueError, match="not wrapped"):
        ctxmem.unwrap(model)


def test_finished_memories_are_freed_without_the_cyclic_gc():
    """A cache must not sit in a reference cycle: GBs of KV would wait for the GC to notice."""
    import gc
    import weakref

    model = tiny_model("llama")
    ctxmem.wrap(model, ctxmem.MemoryConfig(block_size=16, topk_blocks=2, sink_tokens=8, local_tokens=16,
                                           prefill_chunk=32, selector="keys"))
    refs = []
    gc.disable()
    try:
        for _ in range(3):
            model.generate(torch.randint(1, 97, (1, 200)), max_new_tokens=2, do_sample=False, pad_token_id=0)
            refs.append(weakref.ref(model._ctxmem.last_memory))
        alive = [r() is not None for r in refs]
    finally:
        gc.enable()
        ctxmem.unwrap(model)
    assert alive == [False, False, True]  # only the latest, kept for save_memory


def test_kv_buffer_sized_by_the_read_not_doubled():
    """A chunked read makes room for its whole input (plus a block) at once; decode grows by 1.25x.
    (Doubling took a 16,384-token buffer for an 8,192-token prompt and one new token.)"""
    model = tiny_model("llama", seed=13)
    S = 8
    ctxmem.wrap(model, ctxmem.MemoryConfig(block_size=S, topk_blocks=2, sink_tokens=4, local_tokens=16,
                                           prefill_chunk=64, selector="keys"))
    ids = torch.randint(0, 97, (1, 3000), generator=torch.Generator().manual_seed(4))
    cache = ctxmem.new_cache(model)
    model(ids, cache=cache, logits_to_keep=1)
    caps = {layer.k.shape[2] for layer in cache.layers}
    assert caps == {3000 + S}
    for _ in range(S + 1):  # past the read's headroom: one 1.25x step
        model(ids[:, :1], cache=cache, logits_to_keep=1)
    assert {layer.k.shape[2] for layer in cache.layers} == {(3008 + 3008 // 4 + S - 1) // S * S}
    ctxmem.unwrap(model)

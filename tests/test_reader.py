"""The reader adapter: on only for question chunks and decode steps, trainable through the op, saved safely."""
import json
import warnings

import pytest
import torch

import ctxmem
from conftest import tiny_model
from ctxmem.reader import Reader, ReaderConfig, ReaderError
from ctxmem.reader.tasks import make_chain_task, make_task
from ctxmem.reader.train import Example, TrainSettings, example_loss, kl_loss, parse_mix, train


def small_cfg(**kw):
    base = dict(block_size=8, topk_blocks=2, sink_tokens=4, local_tokens=16, prefill_chunk=24, selector="keys")
    base.update(kw)
    return ctxmem.MemoryConfig(**base)


def randomized(reader: Reader, seed: int = 0, scale: float = 0.5) -> Reader:
    """LoRA B starts at zero (the adapter is then a no-op): give it weights so that it matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in reader.parameters().items():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return reader


def prompt(n=120, seed=1):
    return torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def test_adapter_is_on_for_the_question_chunk_only_and_unwrap_is_stock():
    model = tiny_model("llama", seed=0)
    ids = prompt()
    stock = model(ids).logits
    ctxmem.wrap(model, small_cfg())
    mem_plain = ctxmem.read_memory(model, ids)
    plain = model(ids).logits
    ctxmem.unwrap(model)
    reader = randomized(Reader(model, ReaderConfig(lora_r=4)))
    assert torch.equal(model(ids).logits, stock)  # injected but off: the stock model, bit for bit
    ctxmem.wrap(model, small_cfg(), reader=reader)
    mem_read = ctxmem.read_memory(model, ids)
    with_reader = model(ids).logits
    last = 120 - 24  # the question chunk is the last prefill_chunk tokens
    for a, b in zip(mem_plain.layers, mem_read.layers):
        assert torch.equal(a.k[:, :, :last], b.k[:, :, :last]) and torch.equal(a.v[:, :, :last], b.v[:, :, :last])
    assert (mem_plain.layers[1].k[:, :, last:120] - mem_read.layers[1].k[:, :, last:120]).abs().max() > 1e-3
    assert torch.equal(with_reader[:, :last], plain[:, :last])  # body chunks: adapter off
    assert (with_reader[:, last:] - plain[:, last:]).abs().max() > 1e-3  # question chunk: on
    ctxmem.unwrap(model)
    assert torch.equal(model(ids).logits, stock)


def test_decode_steps_use_the_reader():
    model = tiny_model("qwen2", seed=2)
    reader = randomized(Reader(model, ReaderConfig(lora_r=4)))
    ids = prompt(100, seed=4)
    ctxmem.wrap(model, small_cfg())
    plain = model.generate(ids, max_new_tokens=6, do_sample=False)
    ctxmem.unwrap(model)
    calls = []
    orig = reader.set
    reader.set = lambda on: (calls.append(on), orig(on))[1]
    ctxmem.wrap(model, small_cfg(), reader=reader)
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    # prefill: 5 chunks (4 body off, 1 question on), then 5 decode steps (on); each forward is followed by off
    on = [c for c in calls if c]
    assert len(on) == 1 + 5
    assert calls[-1] is False
    assert not torch.equal(out, plain)  # a random adapter changes what is generated


def test_save_load_roundtrip_and_errors(tmp_path):
    model = tiny_model("llama", seed=0)
    reader = randomized(Reader(model, ReaderConfig(lora_r=4)), seed=3)
    reader.save_pretrained(tmp_path / "r", meta={"note": "test"})
    other = tiny_model("llama", seed=0)
    loaded = Reader.from_pretrained(tmp_path / "r", other)
    a, b = reader.parameters(), loaded.parameters()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.meta == {"note": "test"}
    ids = prompt()
    ctxmem.wrap(model, small_cfg(), reader=reader)
    ctxmem.wrap(other, small_cfg(), reader=loaded)
    assert torch.equal(model(ids).logits, other(ids).logits)
    ctxmem.unwrap(model)
    ctxmem.unwrap(other)
    # errors name what is wrong
    with pytest.raises(ReaderError, match="no reader at"):
        Reader.from_pretrained(tmp_path / "missing", other)
    doc = json.loads((tmp_path / "r" / "reader.json").read_text())
    doc["config"]["lora_r"] = 2
    (tmp_path / "r" / "reader.json").write_text(json.dumps(doc))
    n_adapters = len(other.model.layers[0].self_attn.q_proj.lora_A)
    with pytest.raises(ReaderError, match="shape"):
        Reader.from_pretrained(tmp_path / "r", other)
    assert len(other.model.layers[0].self_attn.q_proj.lora_A) == n_adapters  # the failed load left nothing behind
    blob = bytearray((tmp_path / "r" / "reader.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "r" / "reader.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ReaderError, match="checksum"):
        Reader.from_pretrained(tmp_path / "r", other)
    with pytest.raises(TypeError, match="reader must be"):
        ctxmem.wrap(other, small_cfg(), reader=42)
    with pytest.raises(ValueError, match="another model"):
        ctxmem.wrap(other, small_cfg(), reader=reader)


def _copy_task(model):
    """A fixed example whose answer is a span of the prompt far behind the local window."""
    model.lm_head.weight.data.mul_(10)  # a random tiny model is near uniform; sharpen it so context can matter
    ids = prompt(120, seed=9)[0].tolist()
    return Example(ids, ids[30:34])


def test_training_through_working_memory_reduces_the_answer_loss(tmp_path):
    model = tiny_model("llama", seed=1)
    ex = _copy_task(model)
    reader = Reader(model, ReaderConfig(lora_r=4))
    ctxmem.wrap(model, small_cfg(), reader=reader)
    from ctxmem.hf.wrap import new_cache
    with torch.no_grad():
        before = example_loss(model, ex, new_cache).item()
    state = train(model, reader, lambda s: ex, tmp_path / "run", TrainSettings(steps=15, lr=1e-2, warmup=1, save_every=5),
                  progress=False, log=lambda *a: None)
    with torch.no_grad():
        after = example_loss(model, ex, new_cache).item()
    assert state["step"] == 15 and all(r["loss"] is not None for r in state["log"])
    assert after < 0.8 * before, (before, after)
    # the folder is a loadable reader that reproduces the trained one
    other = tiny_model("llama", seed=1)
    other.lm_head.weight.data.mul_(10)
    ctxmem.wrap(other, small_cfg(), reader=tmp_path / "run")
    with torch.no_grad():
        assert abs(example_loss(other, ex, new_cache).item() - after) < 1e-5


def test_resume_matches_uninterrupted_and_rejects_changed_settings(tmp_path):
    from ctxmem.hf.wrap import new_cache

    def run(out, steps, model=None):
        model = model or tiny_model("llama", seed=1)
        ex = _copy_task(model)
        reader = Reader(model, ReaderConfig(lora_r=4))
        ctxmem.wrap(model, small_cfg(), reader=reader)
        train(model, reader, lambda s: ex, out, TrainSettings(steps=steps, lr=5e-3, warmup=1, save_every=2),
              task={"t": 1}, progress=False, log=lambda *a: None)
        return model, reader, ex

    _, a, _ = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    _, b, _ = run(tmp_path / "b", 4)  # a fresh model: the weights and the optimizer come from the folder
    pa, pb = a.parameters(), b.parameters()
    assert all(torch.allclose(pa[k], pb[k], rtol=1e-5, atol=1e-7) for k in pa)
    assert [r["step"] for r in json.loads((tmp_path / "b" / "train_state.json").read_text())["log"]] == [0, 1, 2, 3]
    model = tiny_model("llama", seed=1)
    reader = Reader(model, ReaderConfig(lora_r=4))
    ctxmem.wrap(model, small_cfg(), reader=reader)
    with pytest.raises(ReaderError, match="same settings"):
        train(model, reader, lambda s: None, tmp_path / "b", TrainSettings(steps=6, lr=1e-3), task={"t": 1},
              progress=False, log=lambda *a: None)


def test_kl_loss_is_the_divergence_from_the_adapter_off_read():
    from ctxmem.hf.wrap import new_cache

    model = tiny_model("mistral", seed=3)
    ids = prompt(100, seed=5)
    ctxmem.wrap(model, small_cfg())
    off = model(ids, logits_to_keep=24).logits[0].float().log_softmax(-1)
    ctxmem.unwrap(model)
    reader = Reader(model, ReaderConfig(lora_r=4))
    ctxmem.wrap(model, small_cfg(), reader=reader)
    with torch.no_grad():
        assert kl_loss(model, ids[0].tolist(), new_cache, 24).item() == 0.0  # LoRA B = 0: the stock model
    randomized(reader, seed=1, scale=0.3)
    with torch.no_grad():
        got = kl_loss(model, ids[0].tolist(), new_cache, 24)
        on = model(ids, logits_to_keep=24).logits[0].float().log_softmax(-1)
    want = (off.exp() * (off - on)).sum(-1).mean()
    assert want > 1e-3 and abs(got.item() - want.item()) < 1e-5 * max(1.0, want.item())
    ctxmem.unwrap(model)


def test_kl_term_keeps_plain_reading_closer_to_the_stock_model(tmp_path):
    """The same answer training with and without the KL term: with it, plain windows drift less."""
    from ctxmem.hf.wrap import new_cache

    plain = prompt(100, seed=11)[0].tolist()
    drift = {}
    for w in (0.0, 5.0):
        model = tiny_model("llama", seed=1)
        ex = _copy_task(model)
        reader = Reader(model, ReaderConfig(lora_r=4))
        ctxmem.wrap(model, small_cfg(), reader=reader)
        state = train(model, reader, lambda s: ex, tmp_path / f"kl{w}", TrainSettings(steps=12, lr=1e-2, warmup=1,
                      save_every=12, kl_weight=w), make_plain=lambda s: plain, progress=False, log=lambda *a: None)
        with torch.no_grad():
            drift[w] = kl_loss(model, plain, new_cache, 24).item()
            assert example_loss(model, ex, new_cache).item() < state["log"][0]["loss"]  # still learns the task
        assert all(("kl" in r) == (w > 0) for r in state["log"])
    assert drift[5.0] < 0.5 * drift[0.0], drift
    with pytest.raises(ReaderError, match="make_plain"):
        train(model, reader, lambda s: ex, tmp_path / "x", TrainSettings(steps=1, kl_weight=1.0), progress=False)


@pytest.mark.parametrize("backend", ["numba", "auto"])
def test_kernels_under_autograd_run_the_reference(backend):
    """The kernels have no backward: under grad every backend name must give the reference's gradients."""
    from ctxmem.hf.wrap import new_cache
    from ctxmem.ops import dispatch

    grads = {}
    for be in ("torch", backend):
        model = tiny_model("llama", seed=1)
        ex = _copy_task(model)
        reader = randomized(Reader(model, ReaderConfig(lora_r=4)), scale=0.05)
        for p in reader.parameters().values():
            p.requires_grad_(True)
        ctxmem.wrap(model, small_cfg(backend=be), reader=reader)
        dispatch._warned.clear()
        with warnings.catch_warnings(record=True) as caught, torch.enable_grad():
            warnings.simplefilter("always")
            example_loss(model, ex, new_cache).backward()
        assert any("no backward" in str(w.message) for w in caught) == (be == "numba")
        grads[be] = {k: p.grad.clone() for k, p in reader.parameters().items()}
    # (the body chunks, read without grad, do run the kernel: its KV differs from the reference's in the last bits)
    for k in grads["torch"]:
        assert grads["torch"][k].abs().max() > 1e-4  # q/k/v adapters get gradients only through the op
        torch.testing.assert_close(grads[backend][k], grads["torch"][k], rtol=1e-4, atol=1e-6)


def test_tasks_are_seeded_and_avoid_the_benchmark_templates():
    texts = ["def f(x):\n    return x + 1\n" * 300]
    a, b = make_task(5, texts, 4000), make_task(5, texts, 4000)
    assert a == b and make_task(6, texts, 4000) != a
    for s in range(200):
        t = make_task(s, texts, 3000)
        assert t.value in t.messages_user and t.value in t.answer and 0 <= t.depth <= 1
        low = t.messages_user.lower()
        assert "pass key" not in low and "magic number" not in low and "the grass is green" not in low


def test_chain_tasks_list_the_names_in_order_and_avoid_rulers_wording():
    texts = ["def f(x):\n    return x + 1\n" * 300]
    assert make_chain_task(5, texts, 4000) == make_chain_task(5, texts, 4000) != make_chain_task(6, texts, 4000)
    hops = set()
    for s in range(200):
        t = make_chain_task(s, texts, 3000)
        user = t.messages_user
        hops.add(len(t.names))
        assert t.value in user and len(t.needed) == len(t.names) >= 2
        assert t.value in t.needed[0] and t.names[0] in t.needed[0]  # the first statement gives the value
        where = [user.index(st) for st in t.needed]
        assert where == sorted(where)  # each statement after the one it refers to
        for prev, name, st in zip(t.names, t.names[1:], t.needed[1:]):
            assert prev in st and name in st and t.value not in st
        ans = [t.answer.index(n) for n in t.names]
        assert ans == sorted(ans)  # the answer names the chain in order
        body = user[:user.rindex("\n\n")]
        for n in t.names:  # a name appears only in its own statements (the haystack never contains it)
            assert body.count(n) == sum(st.count(n) for st in t.needed), (n, t.needed)
        assert "VAR " not in user and "assigned the value" not in user
    assert hops == {2, 3, 4, 5}


def test_parse_mix_names_what_was_wrong():
    assert parse_mix("facts") == {"facts": 1.0}
    assert parse_mix("facts:1, chains:2") == {"facts": 1.0, "chains": 2.0}
    for bad, msg in (("fact", "unknown task family 'fact'"), ("chains:x", "must be a number"),
                     ("chains:0", "must be positive")):
        with pytest.raises(ReaderError, match=msg):
            parse_mix(bad)


class _IdsTokenizer:
    """Decodes ids as their numbers (what the attended-text check reads on a tiny model)."""

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_decode_style_answer_equals_the_one_chunk_answer_when_everything_is_attended():
    """The chain tasks' answer path (one forward per token, each choosing its blocks) must be the same
    computation as the one-chunk path when every block is attended, and train only on what it saw."""
    from ctxmem.hf.wrap import new_cache

    model = tiny_model("llama", seed=3)
    ex = _copy_task(model)
    reader = randomized(Reader(model, ReaderConfig(lora_r=4)), scale=0.05)
    ctxmem.wrap(model, small_cfg(topk_blocks=32), tokenizer=_IdsTokenizer(), reader=reader)
    seen = []
    stepwise = Example(ex.prompt, ex.answer, visible_answer=lambda text: seen.append(text) or True)
    with torch.no_grad():
        chunk = example_loss(model, ex, new_cache)
        step = example_loss(model, stepwise, new_cache)
    torch.testing.assert_close(step, chunk, rtol=1e-5, atol=1e-5)
    # it is shown what was attended: the sinks, then the blocks (pieces joined by a space), ...
    assert seen[0].startswith("".join(f"<{i}>" for i in ex.prompt[:4]) + " ")
    assert "".join(f"<{i}>" for i in ex.prompt[28:36]) in seen[0] and len(seen) == 1
    # sinks and local window only: no step attends the far span the answer copies, so the example is skipped
    span = "".join(f"<{i}>" for i in ex.prompt[30:34])
    blind = Example(ex.prompt, ex.answer, visible_answer=lambda text: span in text)
    with torch.no_grad():
        assert example_loss(model, blind, new_cache) is not None  # all attended: trains
        ctxmem.unwrap(model)
        ctxmem.wrap(model, small_cfg(topk_blocks=0), tokenizer=_IdsTokenizer(), reader=reader)
        assert example_loss(model, blind, new_cache) is None
    ctxmem.unwrap(model)
    ctxmem.wrap(model, small_cfg(topk_blocks=32), reader=reader)
    with pytest.raises(ReaderError, match="tokenizer"):
        example_loss(model, stepwise, new_cache)


def test_auto_is_the_default_and_takes_the_reader_load_model_attached(tmp_path):
    model = tiny_model("llama", seed=0)
    randomized(Reader(model, ReaderConfig(lora_r=4))).save_pretrained(tmp_path / "r")
    model = tiny_model("llama", seed=0)
    ids = prompt()
    assert ctxmem.MemoryConfig().reader == "auto"
    ctxmem.wrap(model, small_cfg())  # no reader attached: "auto" is none
    assert model._ctxmem.reader is None
    plain = model(ids).logits
    ctxmem.unwrap(model)
    model.ctxmem_reader = str(tmp_path / "r")  # what load_model does for a bundled model
    ctxmem.wrap(model, small_cfg())  # the default takes it
    assert model._ctxmem.reader is not None and model._ctxmem.owns_reader
    assert (model(ids).logits - plain).abs().max() > 1e-3
    ctxmem.unwrap(model)  # an adapter wrap loaded is taken out again
    assert not model.model.layers[0].self_attn.q_proj.lora_A
    ctxmem.wrap(model, small_cfg(reader=None))  # None: no reader, attached or not
    assert model._ctxmem.reader is None and torch.equal(model(ids).logits, plain)
    ctxmem.unwrap(model)
    for bad in (0, "", "  "):
        with pytest.raises(ValueError, match="reader must be"):
            small_cfg(reader=bad)

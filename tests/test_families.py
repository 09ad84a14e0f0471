"""wrap/unwrap on the families beyond llama/qwen2/mistral, each against its stock model (issue 27).

Every family runs through the same AttentionInterface + Cache path; each test compares with the stock
model's own output (sdpa, or eager for gemma2, whose soft-capping sdpa cannot do):
  * a full budget gives the stock logits (fp32, max abs diff <= 1e-4), whatever block / sink / local /
    chunk sizes (hypothesis);
  * a small budget really retrieves, generate runs, and unwrap gives the stock model back bit for bit;
  * re-rotating a stored key equals the model's own RoPE at the new position (partial rotary, yarn,
    gemma3's global frequencies), which is what makes a partial budget exact in position;
  * what stays refused is refused with its reason.
"""
import pytest
import torch
import transformers as T
from hypothesis import given, settings
from hypothesis import strategies as st

import ctxmem
from ctxmem.hf.cache import rope_inv_freq
from ctxmem.ops.rope import rerotate
from conftest import padded_batch_and_rows

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SLIDING = ["sliding_attention", "full_attention"]


def family_model(name: str, seed: int = 0, window: int = 100_000):
    """A tiny random model of family ``name`` (fp32, eval); a few names are variants of one family."""
    torch.manual_seed(seed)
    c = dict(COMMON, max_position_embeddings=window)
    impl = "sdpa"
    if name == "qwen3":
        cls, cfg = T.Qwen3ForCausalLM, T.Qwen3Config(**c, use_sliding_window=False)
    elif name == "qwen3-sliding":  # its upper layers slide
        cls, cfg = T.Qwen3ForCausalLM, T.Qwen3Config(**c, use_sliding_window=True, sliding_window=12,
                                                     max_window_layers=1)
    elif name == "qwen3-yarn":
        cls, cfg = T.Qwen3ForCausalLM, T.Qwen3Config(**c, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 25_000})
    elif name == "olmo2":
        cls, cfg = T.Olmo2ForCausalLM, T.Olmo2Config(**c)
    elif name == "granite":
        cls, cfg = T.GraniteForCausalLM, T.GraniteConfig(**c, attention_multiplier=0.3, embedding_multiplier=2.0,
                                                         residual_multiplier=0.5, logits_scaling=4.0)
    elif name == "phi3":  # partial rotary: 8 of 16 dims rotate
        c.pop("head_dim")
        cls, cfg = T.Phi3ForCausalLM, T.Phi3Config(**c, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    elif name == "mistral-sliding":  # every layer slides
        cls, cfg = T.MistralForCausalLM, T.MistralConfig(**c, sliding_window=12)
    elif name == "gemma2":
        cls, cfg = T.Gemma2ForCausalLM, T.Gemma2Config(**c, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                                       final_logit_softcapping=30.0, sliding_window=12,
                                                       layer_types=SLIDING)
        impl = "eager"  # sdpa has no soft-capping; eager is gemma2's own default
    elif name == "gemma3":
        cls, cfg = T.Gemma3ForCausalLM, T.Gemma3TextConfig(**c, query_pre_attn_scalar=24, sliding_window=12,
                                                           layer_types=SLIDING)
    elif name == "olmo3":
        cls, cfg = T.Olmo3ForCausalLM, T.Olmo3Config(**c, sliding_window=12, layer_types=SLIDING)
    elif name == "ministral":
        cls, cfg = T.MinistralForCausalLM, T.MinistralConfig(**c, sliding_window=12, layer_types=SLIDING)
    elif name == "starcoder2":
        cls, cfg = T.Starcoder2ForCausalLM, T.Starcoder2Config(**c, sliding_window=None)
    elif name == "seed_oss":
        cls, cfg = T.SeedOssForCausalLM, T.SeedOssConfig(**c)
    elif name == "arcee":
        cls, cfg = T.ArceeForCausalLM, T.ArceeConfig(**c)
    elif name == "apertus":
        cls, cfg = T.ApertusForCausalLM, T.ApertusConfig(**c)
    elif name == "stablelm":  # partial rotary (a quarter of each head) and per-head q/k layernorm
        c.pop("head_dim")
        cls, cfg = T.StableLmForCausalLM, T.StableLmConfig(**c, qk_layernorm=True, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    elif name == "smollm3":  # layer 1 carries no RoPE
        cls, cfg = T.SmolLM3ForCausalLM, T.SmolLM3Config(**c, no_rope_layers=[1, 0])
    elif name == "exaone4":  # hybrid: a sliding RoPE layer, then a global NoPE layer
        cls, cfg = T.Exaone4ForCausalLM, T.Exaone4Config(**c, sliding_window=12, layer_types=SLIDING)
    elif name == "mixtral":
        cls, cfg = T.MixtralForCausalLM, T.MixtralConfig(**c, num_local_experts=4, num_experts_per_tok=2)
    elif name == "qwen3_moe":
        cls, cfg = T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(**c, num_experts=4, num_experts_per_tok=2,
                                                           moe_intermediate_size=32)
    elif name == "qwen2_moe":
        cls, cfg = T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(**c, num_experts=4, num_experts_per_tok=2,
                                                           moe_intermediate_size=32, shared_expert_intermediate_size=32)
    elif name == "olmoe":
        cls, cfg = T.OlmoeForCausalLM, T.OlmoeConfig(**c, num_experts=4, num_experts_per_tok=2)
    elif name == "granitemoe":
        cls, cfg = T.GraniteMoeForCausalLM, T.GraniteMoeConfig(**c, num_local_experts=4, num_experts_per_tok=2,
                                                               attention_multiplier=0.3)
    elif name == "phi":  # phi-1.5 / phi-2: partial rotary, per-head q/k layernorm
        c.pop("head_dim")
        cls, cfg = T.PhiForCausalLM, T.PhiConfig(**c, qk_layernorm=True, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    elif name == "persimmon":  # fused query_key_value, partial rotary, q/k layernorm
        c.pop("head_dim")
        cls, cfg = T.PersimmonForCausalLM, T.PersimmonConfig(**c, qk_layernorm=True, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    else:
        raise ValueError(name)
    cfg._attn_implementation = impl
    return cls(cfg).eval()


FAMILIES = ["qwen3", "olmo2", "granite", "phi3", "gemma2", "gemma3"]
FURTHER = ["olmo3", "ministral", "starcoder2", "seed_oss", "arcee", "apertus", "stablelm", "smollm3", "exaone4", "phi",
           "persimmon"]
MOE = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "granitemoe"]  # the attention of a dense sibling
VARIANTS = ["qwen3-sliding", "qwen3-yarn", "mistral-sliding"]


def full_budget(**kw):
    base = dict(block_size=8, topk_blocks=1000, sink_tokens=4, local_tokens=16, prefill_chunk=24, selector="keys")
    base.update(kw)
    return ctxmem.MemoryConfig(**base)


SMALL = dict(block_size=8, topk_blocks=2, sink_tokens=4, local_tokens=16, prefill_chunk=24, selector="keys")


@pytest.mark.parametrize("name", FAMILIES + VARIANTS + FURTHER + MOE)
def test_full_budget_equals_stock_logits(name):
    model = family_model(name)
    ids = torch.randint(3, 97, (2, 150), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    ctxmem.wrap(model, full_budget())
    try:
        out = model(ids).logits
    finally:
        ctxmem.unwrap(model)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", FAMILIES + FURTHER + MOE)
def test_small_budget_generates_and_unwrap_is_bit_identical(name):
    model = family_model(name, seed=5)
    ids = torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(3))
    before = model(ids).logits
    gen_before = model.generate(ids, max_new_tokens=6, do_sample=False)
    impl = model.config._attn_implementation
    ctxmem.wrap(model, ctxmem.MemoryConfig(**SMALL))
    wrapped = model(ids).logits
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 126) and torch.equal(out[:, :120], ids)
    assert (wrapped - before).abs().max() > 1e-3  # a small budget really changes attention ...
    ctxmem.unwrap(model)
    assert torch.equal(model(ids).logits, before)  # ... and unwrap gives the stock model back exactly
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), gen_before)
    assert model.config._attn_implementation == impl
    assert "forward" not in vars(model)


@pytest.mark.parametrize("name", ["gemma2", "phi3"])
def test_full_budget_generate_equals_stock(name):
    model = family_model(name, seed=3)
    ids = torch.randint(3, 97, (1, 90), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    ctxmem.wrap(model, full_budget())
    try:
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    finally:
        ctxmem.unwrap(model)
    assert torch.equal(out, ref)


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(FAMILIES + FURTHER), block=st.sampled_from([4, 8, 16]), sink=st.integers(0, 8),
       local=st.integers(0, 40), chunk=st.integers(1, 70), length=st.integers(1, 140))
def test_full_budget_equals_stock_any_sizes(name, block, sink, local, chunk, length):
    model = family_model(name, seed=7)
    ids = torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(length))
    ref = model(ids).logits
    ctxmem.wrap(model, full_budget(block_size=block, sink_tokens=sink, local_tokens=local, prefill_chunk=chunk))
    try:
        out = model(ids).logits
    finally:
        ctxmem.unwrap(model)
    assert (out - ref).abs().max().item() <= 1e-4


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(FAMILIES + FURTHER), block=st.sampled_from([4, 8, 16]), topk=st.integers(0, 3),
       sink=st.integers(0, 8), local=st.integers(0, 24), chunk=st.integers(4, 32))
def test_any_budget_is_exact_until_the_first_block_leaves_the_window(name, block, topk, sink, local, chunk):
    """Whatever topk: a chunk starting before sink + local + block has no middle block to choose from, so it
    attends exactly as the stock model (window layers always do); later chunks may differ."""
    model = family_model(name, seed=9)
    ids = torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(block + topk))
    ref = model(ids).logits
    ctxmem.wrap(model, ctxmem.MemoryConfig(block_size=block, topk_blocks=topk, sink_tokens=sink, local_tokens=local,
                                           prefill_chunk=chunk, selector="keys"))
    try:
        out = model(ids).logits
    finally:
        ctxmem.unwrap(model)
    starts = [max(0, e - chunk) for e in range(120, 0, -chunk)]  # chunks are cut from the end
    exact_until = min([s for s in starts if s >= sink + local + block] + [120])
    assert (out[:, :exact_until] - ref[:, :exact_until]).abs().max().item() <= 1e-4


def _model_rope(model, k, pos):
    """``k`` [1, H, n, D] rotated by the model's own rotary embedding and apply_rotary_pos_emb at ``pos``
    (the global layers' embedding where it has one per layer type; the leading dims only where partial)."""
    rot = model.model.rotary_emb
    pid = torch.as_tensor(pos)[None]
    cos, sin = rot(k, pid, "full_attention") if hasattr(rot, "layer_types") else rot(k, pid)
    mod = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    r = cos.shape[-1]
    return torch.cat([mod.apply_rotary_pos_emb(k[..., :r], k[..., :r], cos, sin)[1], k[..., r:]], dim=-1)


@pytest.mark.parametrize("name", FAMILIES + FURTHER + MOE + ["qwen3-yarn"])
def test_rerotation_equals_the_models_rope(name):
    """A key stored rotated at p and re-rotated by d is the model's key at p + d (the op's premise):
    partial rotary (phi3: the unrotated dims untouched), yarn's scaled cos/sin, gemma3's global base."""
    model = family_model(name)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 5, 16, generator=g)
    pos = torch.tensor([3, 40, 41, 200, 7])
    delta = torch.tensor([5, -30, 100, -199, 0])
    stored = _model_rope(model, k, pos)
    moved = rerotate(stored, delta, rope_inv_freq(model))
    want = _model_rope(model, k, pos + delta)
    assert (moved - want).abs().max().item() <= 1e-5
    if name in ("phi3", "stablelm"):
        r = 2 * rope_inv_freq(model).shape[0]
        assert r < k.shape[-1] and torch.equal(moved[..., r:], k[..., r:])


@pytest.mark.parametrize("name, nope", [("smollm3", [1]), ("exaone4", [1]), ("qwen3", [])])
def test_nope_layers_are_moved_with_zero_frequencies(name, nope, monkeypatch):
    """A layer without RoPE (smollm3's no_rope_layers, exaone4's hybrid global layers) must not have its
    keys re-rotated: the op gets zero frequencies for it, the model's own for every other layer."""
    import ctxmem.hf.cache as cache_mod

    calls = []
    real = cache_mod.retrieval_attention

    def spy(q, k, v, reps, lengths, n_new, params, inv_freq, *a, **kw):
        calls.append(inv_freq.clone())
        return real(q, k, v, reps, lengths, n_new, params, inv_freq, *a, **kw)

    monkeypatch.setattr(cache_mod, "retrieval_attention", spy)
    model = family_model(name)
    ctxmem.wrap(model, ctxmem.MemoryConfig(**SMALL))
    try:
        model(torch.randint(3, 97, (1, 60)))
    finally:
        ctxmem.unwrap(model)
    inv = rope_inv_freq(model).float()
    assert len(calls) == 2 * 3  # two layers, called in turn for each of the three chunks
    for i, f in enumerate(calls):
        want = torch.zeros_like(inv) if i % 2 in nope else inv
        assert torch.equal(f.cpu(), want), (i, f)


@pytest.mark.parametrize("name", ["gemma2", "phi3"])
def test_saved_memory_continues_as_the_live_one(name, tmp_path):
    """save_memory / load_memory on a model with window layers (gemma2) and a fused qkv_proj (phi3)."""
    model = family_model(name, seed=1)
    ctxmem.wrap(model, ctxmem.MemoryConfig(**SMALL))
    try:
        ids = torch.randint(3, 97, (1, 100), generator=torch.Generator().manual_seed(0))
        more = torch.cat([ids, ids[:, :5]], 1)
        mem = ctxmem.read_memory(model, ids)
        ctxmem.save_memory(model, tmp_path / "m", memory=mem)
        live = model.generate(more, max_new_tokens=5, do_sample=False, cache=mem)
        loaded = model.generate(more, max_new_tokens=5, do_sample=False, cache=ctxmem.load_memory(model, tmp_path / "m"))
    finally:
        ctxmem.unwrap(model)
    assert torch.equal(live, loaded)


def test_window_layers_store_only_their_window(monkeypatch):
    """gemma3's sliding layer keeps about 2 x (window + chunk) keys whatever the context, at every step of
    the read (no read-ahead reservation); the global layer keeps all; both report the true length."""
    from ctxmem.hf.cache import MemoryLayer

    caps = []
    real = MemoryLayer.update

    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        if self.maybe_window:
            caps.append(self.k.shape[2])
        return out

    monkeypatch.setattr(MemoryLayer, "update", spy)
    model = family_model("gemma3")
    ctxmem.wrap(model, ctxmem.MemoryConfig(**SMALL))
    try:
        ids = torch.randint(3, 97, (1, 600), generator=torch.Generator().manual_seed(1))
        mem = ctxmem.read_memory(model, ids)
        for _ in range(40):  # decode steps: appends past the buffer shift the window to the front
            model(ids[:, :1], cache=mem, logits_to_keep=1)
    finally:
        ctxmem.unwrap(model)
    sliding, full = mem.layers
    assert len(caps) == 600 // 24 + 40 and max(caps) <= 2 * (12 + 24) and full.k.shape[2] >= 640
    assert int(sliding.lengths[0]) == int(full.lengths[0]) == 640
    assert int(sliding.start[0]) + int(sliding.kept[0]) == 640 and int(sliding.kept[0]) >= 11


@pytest.mark.parametrize("name", ["gemma2", "exaone4"])
def test_left_padded_batch_matches_rows_alone(name):
    """Window layers trim each row on its own; retrieval layers re-rotate per row: padding must not leak."""
    model = family_model(name, seed=11)
    ctxmem.wrap(model, ctxmem.MemoryConfig(**dict(SMALL, prefill_chunk=20)))
    try:
        out, alone_a, alone_b = padded_batch_and_rows(model)
    finally:
        ctxmem.unwrap(model)
    assert torch.equal(out[0, -10:], alone_a[0, -10:])
    assert torch.equal(out[1, -10:], alone_b[0, -10:])


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_outside_a_memory_the_wrapped_model_attends_as_stock(name):
    """The class forward of a wrapped model (no active memory: e.g. a compressor's own pass) falls back to
    stock attention, soft-capping and sliding windows included (sdpa has no soft-capping: eager)."""
    model = family_model(name, seed=4)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ref = model(ids, attention_mask=mask).logits
    ctxmem.wrap(model, ctxmem.MemoryConfig(**SMALL))
    try:
        out = type(model).forward(model, ids, attention_mask=mask).logits
    finally:
        ctxmem.unwrap(model)
    assert (out - ref)[0].abs().max().item() <= 1e-5
    assert (out - ref)[1, 7:].abs().max().item() <= 1e-5


def test_refusals_name_the_reason():
    model = family_model("phi3")
    model.config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                    "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                                    "original_max_position_embeddings": 64}
    with pytest.raises(ValueError, match="longrope.*switch with the forward's largest position"):
        ctxmem.wrap(model, ctxmem.MemoryConfig(**SMALL))
    model = family_model("gemma2")
    with pytest.raises(ValueError, match="ram_budget.*sliding-window layers"):
        ctxmem.wrap(model, ctxmem.MemoryConfig(**SMALL, ram_budget="1GB"))
    assert getattr(model, "_ctxmem", None) is None and "forward" not in vars(model)
    with pytest.raises(ValueError, match="ram_budget.*NoPE layers"):
        ctxmem.wrap(family_model("smollm3"), ctxmem.MemoryConfig(**SMALL, ram_budget="1GB"))
    helium = T.HeliumForCausalLM(T.HeliumConfig(**dict(COMMON, max_position_embeddings=4096)))
    with pytest.raises(ValueError, match="'helium' is not supported.*interleaved RoPE"):
        ctxmem.wrap(helium, ctxmem.MemoryConfig(**SMALL))


@pytest.mark.parametrize("backend", ["numba", "batched"])
def test_gemma2_and_phi3_on_each_cpu_backend(backend):
    """Soft-capping, window layers and partial rotary run on the named backend (no fallback) and agree
    with the reference backend under a small budget (real retrieval and re-rotation)."""
    ids = torch.randint(3, 97, (1, 130), generator=torch.Generator().manual_seed(8))
    for name in ("gemma2", "phi3"):
        model = family_model(name, seed=2)
        outs = {}
        for be in (backend, "torch"):
            ctxmem.wrap(model, ctxmem.MemoryConfig(**SMALL, backend=be))
            try:
                outs[be] = model(ids).logits
                ran = model._ctxmem.last_memory.backends_run
            finally:
                ctxmem.unwrap(model)
            assert set(ran) == {be}, ran
        assert (outs[backend] - outs["torch"]).abs().max().item() <= 1e-4

"""The bounded-RAM tier: cold-store encodings, the LRU bound, and tiered == all-in-RAM."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxmem
from ctxmem import MemoryConfig
from ctxmem.memory.cold_store import ColdBlockStore, decode_block, encode_block, encoded_nbytes
from conftest import tiny_model

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@given(H=st.integers(1, 4), S=st.sampled_from([4, 8, 16]), D=st.sampled_from([8, 16]),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_encodings_round_trip_within_their_bounds(H, S, D, scale, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(H, S, D, generator=g) * scale
    v = torch.randn(H, S, D, generator=g) * scale
    k[0, :, 0] *= 50  # an outlier channel, as real keys have
    for cold in ("fp32", "fp16", "int8"):
        if cold == "fp16" and float(max(k.abs().max(), v.abs().max())) > 65504:
            with pytest.raises(ValueError, match="fp16 range"):
                encode_block(k, v, cold)
            continue
        data = encode_block(k, v, cold)
        assert len(data) == encoded_nbytes(cold, H, S, D)
        k2, v2 = decode_block(data, cold, H, S, D, torch.float32)
        for x, y in ((k, k2), (v, v2)):
            if cold == "fp32":
                assert torch.equal(x, y)
            elif cold == "fp16":
                assert torch.allclose(x, y, rtol=1e-3, atol=6e-8)  # 6e-8: fp16 subnormal spacing
            else:  # per (head, channel) absmax scale: error at most half a step
                step = x.abs().amax(dim=1, keepdim=True) / 127
                assert bool(((x - y).abs() <= step / 2 + 1e-6 * step + 1e-30).all())
        # decoding is canonical: re-encoding the decoded block gives a block that decodes the same
        k3, v3 = decode_block(encode_block(k2, v2, cold), cold, H, S, D, torch.float32)
        assert torch.allclose(k3, k2, rtol=1e-6, atol=1e-6 * scale) and torch.allclose(v3, v2, rtol=1e-6, atol=1e-6 * scale)


@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 30)), min_size=1, max_size=80),
       budget_blocks=st.integers(0, 6), cold=st.sampled_from(["fp32", "fp16", "int8"]))
@settings(max_examples=40, deadline=None)
def test_lru_stays_in_budget_and_never_loses_a_block(ops, budget_blocks, cold, tmp_path_factory):
    H, S, D = 2, 4, 8
    probe = ColdBlockStore(H, S, D, torch.float32, cold, 0)
    per = probe.block_ram + probe.rec_bytes  # the most one block can hold in RAM
    store = ColdBlockStore(H, S, D, torch.float32, cold, budget_blocks * per,
                           directory=str(tmp_path_factory.mktemp("cold")))
    want = {}
    for is_put, j in ops:
        if is_put and j not in want:
            k = torch.randn(H, S, D)
            v = torch.randn(H, S, D)
            store.put((0, 0, j), k, v)
            want[j] = decode_block(encode_block(k, v, cold), cold, H, S, D, torch.float32)
        elif want:
            key = sorted(want)[j % len(want)]
            k, v = store.get((0, 0, key))
            assert torch.equal(k, want[key][0]) and torch.equal(v, want[key][1])
        # over budget only by the one block a get must hand back
        assert store.ram_bytes <= max(budget_blocks * per, per)
    for j, (k, v) in want.items():
        k2, v2 = store.get((0, 0, j))
        assert torch.equal(k2, k) and torch.equal(v2, v)
    assert len(store) == len(want)
    with pytest.raises(KeyError):
        store.put((0, 0, next(iter(want))), torch.zeros(H, S, D), torch.zeros(H, S, D)) if want else store.get((9, 9, 9))


def test_ram_cache_is_one_slab_and_get_hands_out_views_of_it(tmp_path):
    """Blocks live in slots of one preallocated slab (no tensor per block: thousands of them
    fragmented the heap); a get returns views of its slot, so evicting and reloading a block
    gives the same values, and the slab's storage never changes."""
    H, S, D = 2, 4, 8
    store = ColdBlockStore(H, S, D, torch.float32, "fp32", 0, directory=str(tmp_path))
    store = ColdBlockStore(H, S, D, torch.float32, "fp32", 3 * store.slot_bytes, directory=str(tmp_path))
    assert store.capacity == 3
    blocks = {j: (torch.randn(H, S, D), torch.randn(H, S, D)) for j in range(8)}
    for j, (k, v) in blocks.items():
        store.put((0, 0, j), k, v)
    ptr = store._kv.data_ptr()
    assert store.ram_bytes == 3 * store.slot_bytes and store.stats["disk_writes"] == 5
    for j in [0, 7, 3, 0, 5, 1, 2, 6, 4]:
        k, v = store.get((0, 0, j))
        assert k.data_ptr() != v.data_ptr() and store._kv.data_ptr() == ptr
        assert k.untyped_storage().data_ptr() == ptr  # a view of the slab, not a copy
        assert torch.equal(k, blocks[j][0]) and torch.equal(v, blocks[j][1])
        assert store.encoded((0, 0, j)) == encode_block(*blocks[j], "fp32")
    assert store.ram_bytes == 3 * store.slot_bytes


def _logits(model, ids, mask, cfg):
    ctxmem.wrap(model, cfg)
    try:
        out = model(ids, attention_mask=mask)
    finally:
        ctxmem.unwrap(model)
    return out.logits, out.cache


@given(family=st.sampled_from(["llama", "qwen2", "mistral"]), kv=st.sampled_from([1, 2, 4]),
       S=st.sampled_from([8, 16]), topk=st.integers(1, 4), local=st.integers(8, 40), chunk=st.integers(8, 64),
       length=st.integers(40, 400), pad=st.integers(0, 30), budget=st.sampled_from([0, 3000, 10**9]),
       seed=st.integers(0, 1000))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_tiered_equals_all_in_ram(family, kv, S, topk, local, chunk, length, pad, budget, seed):
    """With exact (fp32) cold blocks the bounded store gives the all-in-RAM logits, whatever the
    budget (0 = every retrieved block comes back from disk)."""
    model = tiny_model(family, seed=seed, kv_heads=kv)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    base = dict(block_size=S, topk_blocks=topk, sink_tokens=S, local_tokens=local, prefill_chunk=chunk,
                selector="keys", backend="torch")
    a, _ = _logits(model, ids, mask, MemoryConfig(**base))
    b, cache = _logits(model, ids, mask, MemoryConfig(**base, ram_budget=budget, cold_dtype="fp32"))
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=2e-5, rtol=1e-4), (a[real] - b[real]).abs().max()
    # the RAM tail is bounded by the layout, not by the context
    for layer in cache.layers:
        assert layer.k.shape[2] <= max(256, 2 * (S + local + S + chunk + S))
    assert cache.cold.ram_bytes <= max(budget, cache.cold.block_ram + cache.cold.rec_bytes)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_tiered_generate_matches_and_selections_map_back(backend):
    model = tiny_model("qwen2", seed=3)
    ids = torch.randint(1, 97, (2, 800), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :111] = 0
    base = dict(block_size=16, topk_blocks=3, sink_tokens=8, local_tokens=32, prefill_chunk=48, selector="keys",
                backend=backend)
    outs, sels = [], []
    for extra in ({}, {"ram_budget": "20KB", "cold_dtype": "fp32"}):
        ctxmem.wrap(model, MemoryConfig(**base, **extra))
        cache = ctxmem.new_cache(model)
        cache.record_selection = True
        outs.append(model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=12, do_sample=False,
                                   pad_token_id=0))
        sels.append({k: v.clone() for k, v in cache.last_selection.items()})
        ctxmem.unwrap(model)
    assert torch.equal(outs[0], outs[1])
    assert sels[0].keys() == sels[1].keys()
    for li in sels[0]:
        assert torch.equal(sels[0][li], sels[1][li]), li


def test_lossy_cold_dtypes_stay_close():
    """fp16 and int8 change the logits a little, never wildly (the real-model cost is in README)."""
    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, 97, (1, 900), generator=torch.Generator().manual_seed(1))
    base = dict(block_size=16, topk_blocks=3, sink_tokens=8, local_tokens=32, prefill_chunk=48, selector="keys")
    ref, _ = _logits(model, ids, None, MemoryConfig(**base))
    err = {}
    for cold in ("fp16", "int8"):
        got, _ = _logits(model, ids, None, MemoryConfig(**base, ram_budget=0, cold_dtype=cold))
        err[cold] = float((got - ref).abs().max() / ref.abs().max())
    assert err["fp16"] < 1e-3 and err["int8"] < 3e-2 and err["fp16"] <= err["int8"], err


def test_budget_strings_and_errors():
    assert MemoryConfig(ram_budget="1.5GiB").ram_budget_bytes == int(1.5 * 2**30)
    assert MemoryConfig(ram_budget=512).ram_budget_bytes == 512
    for bad in ("lots", "-1MB", 1.5, True):
        with pytest.raises(ValueError, match="ram_budget"):
            MemoryConfig(ram_budget=bad)
    with pytest.raises(ValueError, match="cold_dtype"):
        MemoryConfig(ram_budget=0, cold_dtype="fp8")
    assert np.dtype("<f2").itemsize == 2


@given(u=st.integers(1, 6), n=st.integers(1, 9), half=st.sampled_from([2, 8, 32]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 99))
@settings(max_examples=30, deadline=None)
def test_rerotate_blocks_equals_the_per_key_reference(u, n, half, dtype, seed):
    from ctxmem.ops.rope import rerotate, rerotate_blocks_

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, u, n, 2 * half, generator=g).to(dtype)
    delta = torch.randint(-5000, 5000, (u,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, 2 * half, 2).float() / (2 * half)))
    want = rerotate(x.reshape(3, u * n, 2 * half), delta.repeat_interleave(n), inv).reshape(x.shape)
    rerotate_blocks_(x, delta, inv)
    assert torch.equal(x, want)


@given(H=st.integers(1, 4), n=st.integers(1, 300), R=st.sampled_from([1, 4]), D=st.sampled_from([16, 64]),
       scale=st.sampled_from([0.1, 3.0, 30.0]), bias=st.booleans(), seed=st.integers(0, 99))
@settings(max_examples=40, deadline=None)
def test_half_precision_block_scores_match_the_reference(H, n, R, D, scale, bias, seed):
    from ctxmem.memory.tiered import block_scores_half
    from ctxmem.ops import block_scores_ref, select_topk

    g = torch.Generator().manual_seed(seed)
    reps = (torch.randn(H, n, R, D, generator=g) * scale).half()
    qbar = torch.randn(H, D, generator=g) * scale
    b = torch.randn(n, generator=g) * 10 if bias else None
    scaling = D ** -0.5
    want = block_scores_ref(qbar, reps, scaling, b)
    got = block_scores_half(qbar, reps, scaling, b)
    # the query is rounded to fp16 (2^-11 relative per element, so up to 2^-11 of sum |q_i r_i|),
    # products are accumulated in fp32, and each score is rounded once to fp16 (2^-11 relative)
    raw = want - (0 if b is None else b[None, :])
    absdot = torch.einsum("hd,hnrd->hnr", qbar.abs(), reps.float().abs()).amax(-1) * scaling
    tol = absdot * 2.0 ** -10 + raw.abs() * 2.0 ** -10 + 1e-3
    assert bool(((got - want).abs() <= tol).all()), float((got - want).abs().max())
    # the chosen blocks agree wherever the reference's k-th and (k+1)-th scores are further apart
    # than the rounding can move them
    k = min(5, n)
    srt = want.sort(dim=-1, descending=True).values
    if n > k:
        gap = srt[:, k - 1] - srt[:, k]
        clear = gap > 2 * tol.max(dim=-1).values
    else:
        clear = torch.ones(H, dtype=torch.bool)
    a, c = select_topk(want, k), select_topk(got, k)
    assert torch.equal(a[clear], c[clear])
    # fp32 reps take the reference path, bit for bit
    assert torch.equal(block_scores_half(qbar, reps.float(), scaling, b), block_scores_ref(qbar, reps.float(), scaling, b))


def test_block_text_index_embeds_large_batches_in_pieces_with_the_same_result(monkeypatch):
    """A first question over a long input embeds thousands of blocks (with a progress bar, in
    pieces); the embeddings must be exactly those of one call."""
    from ctxmem.index.embed import HashingEmbedder
    from ctxmem.memory import text_index

    class Tok:  # decode = the ids as words, so every block's text differs
        def decode(self, ids):
            return " ".join(f"w{i % 997}" for i in ids)

    ids = list(range(8 + 1100 * 4))
    pieces = text_index.BlockTextIndex(Tok(), HashingEmbedder(64), batch_size=16)
    got = pieces.ensure(0, ids, 1100, sink=8, S=4)
    monkeypatch.setattr(text_index, "_BAR_BLOCKS", 10**9)
    whole = text_index.BlockTextIndex(Tok(), HashingEmbedder(64), batch_size=16)
    want = whole.ensure(0, ids, 1100, sink=8, S=4)
    assert got.shape == (1100, 64) and torch.equal(got, want)
    # growing later embeds only the new blocks, in order
    assert torch.equal(pieces.ensure(0, ids + list(range(40)), 1110, sink=8, S=4)[:1100], want)

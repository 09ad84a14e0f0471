"""The batched torch path (the GPU prefill path) against the reference, on the CPU.

Same inputs as the other backends' tests (``_op_cases``): random shapes, GQA ratios, block sizes,
budgets above and below the context, left padding and empty rows, the embedder's bias. fp32 must
match the reference within 1e-5 and pick the same blocks (except on a near-tie draw); bf16 must stay
within twice the error of the reference's own bf16 path against fp32, flash-attention style.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from _op_cases import cases, dense_causal_attention, make_case, selection_margin
from conftest import tiny_model

import ctxmem

from ctxmem.ops import retrieval_attention_ref
from ctxmem.ops.batched import retrieval_attention_batched

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@given(cases())
@settings(max_examples=80, **SETTINGS)
def test_matches_reference_fp32(c):
    assume(selection_margin(c) > 1e-4)
    ref, ref_sel = retrieval_attention_ref(*c.args())
    out, sel = retrieval_attention_batched(*c.args())
    assert out.dtype == c.q.dtype and out.shape == c.q.shape
    torch.testing.assert_close(sel, ref_sel, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@given(cases(max_t=200), st.sampled_from([torch.bfloat16, torch.float16]))
@settings(max_examples=30, **SETTINGS)
def test_half_precision_within_naive_error(c32, dtype):
    c = c32.to(dtype)
    exact = c.to(torch.float32)
    assume(selection_margin(exact) > 1e-4)
    ref32, ref_sel = retrieval_attention_ref(*exact.args())
    naive, _ = retrieval_attention_ref(*c.args())
    out, sel = retrieval_attention_batched(*c.args())
    assert out.dtype == dtype
    torch.testing.assert_close(sel, ref_sel, rtol=0, atol=0)
    err = (out.float() - ref32).abs().max().item()
    naive_err = (naive.float() - ref32).abs().max().item()
    assert err <= 2 * naive_err + (1.6e-2 if dtype == torch.bfloat16 else 2e-3), (err, naive_err)


@given(st.integers(0, 2**31 - 1), st.integers(2, 40), st.sampled_from([1, 2, 4]))
@settings(max_examples=20, **SETTINGS)
def test_full_budget_is_dense_causal_attention(seed, C, G):
    c = make_case(B=2, Hkv=2, G=G, D=64, S=8, R=2, topk=1000, sink=4, local=8, C=C,
                  ts=[150, 90], ns=[C, max(1, C - 5)], seed=seed)
    out, _ = retrieval_attention_batched(*c.args())
    torch.testing.assert_close(out, dense_causal_attention(c), rtol=1e-5, atol=1e-5)


def test_ties_go_to_lower_index():
    c = make_case(B=2, Hkv=2, G=2, D=64, S=8, R=2, topk=3, sink=4, local=8, C=7, ts=[300, 250],
                  ns=[7, 4], seed=3, integer=True)
    c.reps = torch.ones_like(c.reps)  # every block scores the same: the lowest indices win
    _, sel = retrieval_attention_batched(*c.args())
    _, ref_sel = retrieval_attention_ref(*c.args())
    assert torch.equal(sel, ref_sel)
    assert sel[0, 0].tolist() == [0, 1, 2]


FAMILIES = ["llama", "qwen2", "mistral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapped_model_same_tokens_as_reference(family):
    """The whole wrapped model with the batched op (a partial budget, so selection matters, left
    padding in a batch of two) gives the reference's logits and greedy tokens."""
    model = tiny_model(family, seed=11)
    ids = torch.randint(0, 97, (2, 160), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    cfg = dict(block_size=8, topk_blocks=3, sink_tokens=4, local_tokens=16, prefill_chunk=40, selector="keys")
    outs = {}
    for backend in ("torch", "batched"):
        ctxmem.wrap(model, ctxmem.MemoryConfig(backend=backend, **cfg))
        logits = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        ctxmem.unwrap(model)
        outs[backend] = (logits, gen)
    torch.testing.assert_close(outs["batched"][0], outs["torch"][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(outs["batched"][1], outs["torch"][1])


def test_gpu_chunk_is_capped_by_the_window():
    cfg = ctxmem.MemoryConfig(block_size=64, topk_blocks=9, sink_tokens=64, local_tokens=128)
    assert cfg.chunk_for("cpu", 8192) == cfg.prefill_chunk == 512
    assert cfg.chunk_for("cuda", None) == 4096
    assert cfg.chunk_for("cuda", 8192) == 4096 and cfg.span(4096) <= 8192
    small = cfg.chunk_for("cuda", 2048)  # 4096 would overrun a 2K window: cut to what fits
    assert small % 64 == 0 and cfg.span(small) <= 2048 < cfg.span(small + 64)
    assert cfg.chunk_for("cuda", 1000) == 512  # never below prefill_chunk (wrap then refuses the span)
    assert ctxmem.MemoryConfig(gpu_prefill_chunk=None).chunk_for("cuda", 8192) == 512
    with pytest.raises(ValueError, match="gpu_prefill_chunk"):
        ctxmem.MemoryConfig(gpu_prefill_chunk=0)

"""The wrapped model on a GPU against stock sdpa and against the CPU reference (skipped without CUDA).

Run on a GPU machine by ``benchmarks/gpu_check.sh``. Tiny random llama / qwen2 / mistral models with
head dim 64 (a size the CUDA decode kernels are built for):
  * a budget that covers the whole context: the wrapped bf16 model's logits equal stock sdpa's
    within bf16 tolerance, prefill (batched path) and decode (CUDA kernel) alike;
  * a partial budget, fp32: greedy tokens on CUDA equal the torch reference's on the CPU.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from _op_cases import cases, selection_margin
from conftest import tiny_model

import ctxmem
from ctxmem.ops import retrieval_attention_ref
from ctxmem.ops import cuda as cuda_backend
from ctxmem.ops.batched import retrieval_attention_batched

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
FAMILIES = ["llama", "qwen2", "mistral"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _model(family, seed, dtype):
    return tiny_model(family, seed=seed, layers=2, heads=4, kv_heads=2, head_dim=64, vocab=97).to("cuda", dtype)


def test_extension_builds_on_first_use():
    assert cuda_backend.load_extension() is not None, cuda_backend.load_error()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_equals_stock_bf16(family):
    model = _model(family, 1, torch.bfloat16)
    ids = torch.randint(0, 97, (2, 300), generator=torch.Generator().manual_seed(1)).cuda()
    ref = model(ids).logits.float()
    ref_gen = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ctxmem.wrap(model, ctxmem.MemoryConfig(block_size=16, topk_blocks=1000, sink_tokens=4, local_tokens=32,
                                           prefill_chunk=128, selector="keys", backend="cuda", reader=None))
    out = model(ids).logits.float()
    gen = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ctxmem.unwrap(model)
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 2e-2 * max(scale, 1.0)
    # decode steps: the logits of each generated position, while the sequences agree
    for a, b in zip(gen.logits, ref_gen.logits):
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * max(b.float().abs().max().item(), 1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_cpu_reference_fp32(family):
    cfg = dict(block_size=16, topk_blocks=3, sink_tokens=4, local_tokens=32, prefill_chunk=96, selector="keys",
               reader=None, gpu_prefill_chunk=None)  # the same chunks on both devices
    # ids from 1: generate would read the pad id (0) inside the prompt as padding
    ids = torch.randint(1, 97, (1, 400), generator=torch.Generator().manual_seed(2))
    cpu = tiny_model(family, seed=2, head_dim=64)
    ctxmem.wrap(cpu, ctxmem.MemoryConfig(backend="torch", **cfg))
    ref = cpu.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    gpu = _model(family, 2, torch.float32)
    ctxmem.wrap(gpu, ctxmem.MemoryConfig(backend="cuda", **cfg))
    out = gpu.generate(ids.cuda(), max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(out.cpu(), ref)


@given(cases(decode=False, max_t=2000), st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
@settings(max_examples=40, **SETTINGS)
def test_batched_prefill_on_cuda_matches_reference(c32, dtype):
    c = c32.to(dtype, "cuda")
    exact = c.to(torch.float32)
    assume(selection_margin(exact.to(device="cpu")) > 1e-4)
    ref32, ref_sel = retrieval_attention_ref(*exact.args())
    naive, _ = retrieval_attention_ref(*c.args())
    out, sel = retrieval_attention_batched(*c.args())
    torch.testing.assert_close(sel, ref_sel, rtol=0, atol=0)
    err = (out.float() - ref32).abs().max().item()
    naive_err = (naive.float() - ref32).abs().max().item()
    floor = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert err <= max(2 * naive_err, floor), (err, naive_err)

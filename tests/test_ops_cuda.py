"""The CUDA backend: its guards everywhere, its kernels against the reference where a GPU is.

Kernel tests need a CUDA device and the built extension (``benchmarks/gpu_check.sh`` builds it
first); they are skipped otherwise. Tolerance, flash-attention style: the kernel's error against
an fp32 reference computed on the same (rounded) inputs must stay within twice the error of
the reference's own low-precision path, or within the dtype's floor (fp32 1e-4, fp16 2e-3,
bf16 1.6e-2), whichever is larger. ``selected`` must match exactly except on draws whose k-th and
(k+1)-th block scores are within 1e-4 (fp32 sums in a different order may flip them).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from _op_cases import Case, cases, make_case, selection_margin

from ctxmem.ops import cuda as cuda_backend
from ctxmem.ops import retrieval_attention, retrieval_attention_ref
from ctxmem.ops.dispatch import pick_backend

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FLOOR = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ---- guards (run everywhere) -----------------------------------------------------------------

def test_unsupported_reasons():
    assert "CUDA tensors" in cuda_backend._unsupported(torch.zeros(1, 1, 1, 64))
    meta = torch.zeros(1, 1, 1, 64, device="meta")
    assert "CUDA tensors" in cuda_backend._unsupported(meta)


def _small_case():
    return make_case(B=1, Hkv=1, G=2, D=64, S=8, R=2, topk=2, sink=2, local=8, C=1, ts=[60], ns=[1], seed=0)


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_ext", None)
    monkeypatch.setattr(cuda_backend, "load_extension", lambda *a, **k: None)
    monkeypatch.setattr(cuda_backend, "_load_error", cuda_backend.BUILD_HELP)
    monkeypatch.setattr(cuda_backend, "_fallback_allowed", False)
    with pytest.raises(RuntimeError, match=r"c\.build\(verbose=True\)"):
        cuda_backend.retrieval_attention_cuda(*_small_case().args())


def test_fallback_only_when_allowed(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_ext", None)
    monkeypatch.setattr(cuda_backend, "load_extension", lambda *a, **k: None)
    monkeypatch.setattr(cuda_backend, "_load_error", cuda_backend.BUILD_HELP)
    monkeypatch.setattr(cuda_backend, "_warned", False)
    cuda_backend.allow_fallback(True)
    try:
        c = _small_case()
        with pytest.warns(UserWarning, match="CUDA extension missing"):
            out, sel = cuda_backend.retrieval_attention_cuda(*c.args())
        ref, ref_sel = retrieval_attention_ref(*c.args())
        assert torch.equal(out, ref) and torch.equal(sel, ref_sel)
    finally:
        cuda_backend.allow_fallback(False)


def test_prefill_chunks_use_the_batched_path(monkeypatch):
    # no extension is needed for a prefill chunk: it never reaches the kernels
    monkeypatch.setattr(cuda_backend, "load_extension", lambda *a, **k: pytest.fail("prefill loaded the extension"))
    c = make_case(B=1, Hkv=1, G=2, D=64, S=8, R=2, topk=2, sink=2, local=8, C=5, ts=[60], ns=[5], seed=0)
    out, sel = cuda_backend.retrieval_attention_cuda(*c.args())
    ref, ref_sel = retrieval_attention_ref(*c.args())
    assert torch.equal(sel, ref_sel)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_build_names_missing_tools(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_missing_tools", lambda: ["ninja (pip install ninja)"])
    with pytest.raises(RuntimeError, match="missing ninja"):
        cuda_backend.build()


def test_no_automatic_build_without_a_gpu(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_ext", None)
    monkeypatch.setattr(cuda_backend, "_load_prebuilt", lambda: None)
    monkeypatch.setattr(cuda_backend, "build", lambda *a, **k: pytest.fail("built without a GPU"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CTXMEM_BUILD_CUDA", raising=False)
    assert cuda_backend.load_extension() is None
    assert "not built" in cuda_backend.load_error()


def test_sources_hash_and_cache_dir(monkeypatch, tmp_path):
    assert all(p.is_file() for p in cuda_backend.sources())
    assert len(cuda_backend._source_hash()) == 16
    monkeypatch.delenv("CTXMEM_CUDA_CACHE", raising=False)  # .ci/run sets it
    assert "ctxmem" in str(cuda_backend.cache_dir())
    monkeypatch.setenv("CTXMEM_CUDA_CACHE", str(tmp_path))
    assert cuda_backend.cache_dir() == tmp_path


# ---- kernels (GPU + built extension) ---------------------------------------------------------

def _gpu_ready() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if cuda_backend.load_extension() is None:
        return "ctxmem CUDA extension not built: " + (cuda_backend.load_error() or "")
    return None


gpu = pytest.mark.skipif(_gpu_ready() is not None, reason=str(_gpu_ready()))


def _check(c32: Case, dtype):
    dev = "cuda"
    c = c32.to(dtype, dev)
    exact = c.to(torch.float32)
    assume(selection_margin(exact.to(device="cpu")) > 1e-4)
    ref32, ref_sel = retrieval_attention_ref(*exact.args())
    naive, _ = retrieval_attention_ref(*c.args())
    out, sel = cuda_backend.retrieval_attention_cuda(*c.args())
    assert out.dtype == dtype and out.shape == c.q.shape and out.device.type == "cuda"
    torch.testing.assert_close(sel, ref_sel, rtol=0, atol=0)
    err = (out.float() - ref32).abs().max().item()
    naive_err = (naive.float() - ref32).abs().max().item()
    assert err <= max(2 * naive_err, FLOOR[dtype]), (err, naive_err)
    assert torch.isfinite(out.float()).all()


@gpu
@given(cases(decode=True, max_t=3000), st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
@settings(max_examples=150, **SETTINGS)
def test_decode_kernel_matches_reference(c, dtype):
    _check(c, dtype)


@gpu
@pytest.mark.parametrize("G", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_gqa_ratios(G, dtype, D):
    c = make_case(B=2, Hkv=2, G=G, D=D, S=64, R=4, topk=8, sink=64, local=256, C=1,
                  ts=[5000, 1200], ns=[1, 1], seed=G)
    _check(c, dtype)


@gpu
@pytest.mark.parametrize("topk", [0, 1, 32, 2000])
def test_long_context_selection(topk):
    """~100K tokens: thousands of blocks through the radix select."""
    c = make_case(B=1, Hkv=2, G=4, D=128, S=64, R=4, topk=topk, sink=64, local=1024, C=1,
                  ts=[100_000], ns=[1], seed=7)
    _check(c, torch.bfloat16)


@gpu
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.booleans())
@settings(max_examples=40, **SETTINGS)
def test_ties_go_to_lower_index(seed, topk, all_equal):
    c = make_case(B=2, Hkv=2, G=2, D=64, S=8, R=2, topk=topk, sink=4, local=8, C=1,
                  ts=[300, 250], ns=[1, 1], seed=seed, integer=True)
    base = torch.randint(-2, 3, (2, 2, 1, 64), generator=torch.Generator().manual_seed(seed)).float()
    c.q = base.repeat_interleave(2, dim=1).contiguous()
    if all_equal:
        c.reps.zero_()
    g = c.to(torch.float16, "cuda")
    _, ref_sel = retrieval_attention_ref(*g.args())
    _, sel = cuda_backend.retrieval_attention_cuda(*g.args())
    torch.testing.assert_close(sel, ref_sel, rtol=0, atol=0)


@gpu
def test_rows_without_queries_and_strided_views():
    c = make_case(B=3, Hkv=2, G=3, D=128, S=16, R=2, topk=4, sink=16, local=64, C=1,
                  ts=[900, 10, 400], ns=[1, 0, 1], seed=11).to(torch.bfloat16, "cuda")
    big = torch.randn(3, 2, c.k.shape[2] + 40, 128, device="cuda", dtype=torch.bfloat16)
    big[:, :, : c.k.shape[2]] = c.k
    c.k = big[:, :, : c.k.shape[2]]
    out, sel = cuda_backend.retrieval_attention_cuda(*c.args())
    ref, ref_sel = retrieval_attention_ref(*c.args())
    assert (out[1] == 0).all() and (sel[1] == -1).all()
    torch.testing.assert_close(sel, ref_sel, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@gpu
def test_auto_dispatch_picks_cuda():
    c = _small_case().to(torch.float16, "cuda")
    assert pick_backend("auto", c.q).name == "cuda"
    out, _ = retrieval_attention(*c.args())
    ref, _ = retrieval_attention_ref(*c.args())
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3)

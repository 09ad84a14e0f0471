"""The op's per-layer options (issue 27): soft-capping, sliding-window layers, partial rotary.

The reference is checked against an independent dense computation; the batched path and the numba
kernel against the reference; the CUDA decode kernel must refuse what it does not implement, naming it.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from _op_cases import Case, cases, make_case, selection_margin

from ctxmem.ops import OpCall, explain, retrieval_attention, retrieval_attention_ref
from ctxmem.ops.batched import retrieval_attention_batched
from ctxmem.ops.dispatch import option_reasons

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def with_options(c: Case, *, window=None, softcap=None, rotary=None) -> Case:
    """``c`` with OpParams options and, for ``rotary`` < D, the frequencies of the first ``rotary`` dims only."""
    inv = c.inv_freq if rotary is None else c.inv_freq[: rotary // 2].clone()
    return dataclasses.replace(c, params=dataclasses.replace(c.params, window=window, softcap=softcap), inv_freq=inv)


def dense(c: Case, window=None, softcap=None) -> torch.Tensor:
    """Causal (optionally windowed, soft-capped) attention over every stored key at true positions."""
    B, Hq, C, D = c.q.shape
    G = Hq // c.k.shape[1]
    out = torch.zeros(B, Hq, C, D)
    for b in range(B):
        n, L = int(c.n_new[b]), int(c.lengths[b])
        if n == 0:
            continue
        kk = c.k[b, :, :L].float().repeat_interleave(G, dim=0)
        vv = c.v[b, :, :L].float().repeat_interleave(G, dim=0)
        s = (c.q[b, :, C - n:].float() @ kk.transpose(-1, -2)) * c.params.scaling
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        qpos, kpos = torch.arange(L - n, L)[:, None], torch.arange(L)[None, :]
        hide = kpos > qpos
        if window is not None:
            hide |= kpos <= qpos - window
        out[b, :, C - n:] = s.masked_fill(hide, float("-inf")).softmax(-1) @ vv
    return out


options = st.fixed_dictionaries({
    "window": st.sampled_from([None, 1, 5, 33]),
    "softcap": st.sampled_from([None, 0.5, 20.0]),
    "rotary": st.sampled_from([None, 16, 32]),
})


@given(cases(dims=(64,), max_t=150), options)
@settings(max_examples=40, **SETTINGS)
def test_batched_matches_reference_with_options(c0, opt):
    c = with_options(c0, **opt)
    assume(selection_margin(c) > 1e-4)
    ref, ref_sel = retrieval_attention_ref(*c.args())
    out, sel = retrieval_attention_batched(*c.args())
    torch.testing.assert_close(sel, ref_sel, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if opt["window"] is not None:
        assert bool((sel == -1).all())  # a window layer never retrieves


@given(cases(dims=(64,), max_t=150), st.sampled_from([1, 4, 33, 1000]), st.sampled_from([None, 0.5, 20.0]))
@settings(max_examples=30, **SETTINGS)
def test_window_layer_is_exact_window_attention(c0, window, softcap):
    """Whatever the retrieval budget, a window layer is the stock sliding-window mask (p - window, p]."""
    c = with_options(c0, window=window, softcap=softcap)
    out, _ = retrieval_attention_ref(*c.args())
    torch.testing.assert_close(out, dense(c, window, softcap), rtol=1e-5, atol=1e-5)


@given(cases(dims=(64,), max_t=150), st.sampled_from([0.5, 3.0, 50.0]), st.sampled_from([None, 16]))
@settings(max_examples=30, **SETTINGS)
def test_softcap_full_budget_is_dense_softcapped_attention(c0, softcap, rotary):
    c = with_options(dataclasses.replace(c0, params=dataclasses.replace(c0.params, topk=10_000)),
                     softcap=softcap, rotary=rotary)
    out, _ = retrieval_attention_ref(*c.args())
    torch.testing.assert_close(out, dense(c, None, softcap), rtol=1e-5, atol=1e-5)


def test_partial_rotary_rerotates_only_the_rotated_dims():
    """A partial budget moves selected blocks: with rotary=16 of 64 dims, zeroing the query's rotated
    dims makes the result independent of where the blocks were moved (the pass-through dims are untouched)."""
    c = make_case(B=1, Hkv=1, G=2, D=64, S=8, R=2, topk=2, sink=4, local=8, C=1, ts=[120], ns=[1], seed=3)
    c = with_options(c, rotary=16)
    c.q[..., :16] = 0
    out, sel = retrieval_attention_ref(*c.args())
    full = dataclasses.replace(c, inv_freq=torch.zeros(8))  # no rotation at all: same answer
    out0, sel0 = retrieval_attention_ref(*full.args())
    assert torch.equal(sel, sel0) and bool((sel >= 0).all())
    torch.testing.assert_close(out, out0, rtol=1e-6, atol=1e-6)


numba_kernels = None
try:
    from ctxmem.ops import numba_kernels
except ImportError:  # pragma: no cover - numba is a dependency
    pass


@pytest.mark.skipif(numba_kernels is None, reason="numba not installed")
@given(cases(dims=(64,), max_t=150), options)
@settings(max_examples=40, **SETTINGS)
def test_numba_matches_reference_with_options(c0, opt):
    c = with_options(c0, **opt)
    assume(selection_margin(c) > 1e-4)
    ref, ref_sel = retrieval_attention_ref(*c.args())
    out, sel = numba_kernels.retrieval_attention_numba(*c.args())
    torch.testing.assert_close(sel, ref_sel, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(numba_kernels is None, reason="numba not installed")
@pytest.mark.parametrize("C", [1, 100])
def test_numba_bf16_with_options_within_naive_error(C):
    """bf16 with every option on: within twice the reference's own bf16 error (as test_ops_numba)."""
    c32 = with_options(make_case(B=2, Hkv=2, G=2, D=64, S=8, R=2, topk=2, sink=4, local=16, C=C, ts=[300, 90],
                                 ns=[C, C - 1 if C > 1 else 1], seed=5))
    for opt in (dict(softcap=3.0, rotary=32), dict(window=40, softcap=3.0)):
        c = with_options(c32, **opt).to(torch.bfloat16)
        exact = c.to(torch.float32)
        want, _ = retrieval_attention_ref(*exact.args())
        ref16, _ = retrieval_attention_ref(*c.args())
        out, _ = numba_kernels.retrieval_attention_numba(*c.args())
        tol = 2 * (ref16.float() - want).abs().max().item() + 1e-6
        assert (out.float() - want).abs().max().item() <= tol


@pytest.mark.parametrize("opt, word", [(dict(softcap=5.0), "soft-capping"), (dict(window=8), "sliding-window"),
                                       (dict(rotary=16), "partial rotary")])
def test_backends_run_or_say_why_not(opt, word):
    c = with_options(make_case(B=1, Hkv=1, G=1, D=64, S=8, R=1, topk=1, sink=0, local=8, C=1, ts=[40], ns=[1],
                               seed=0), **opt)
    call = OpCall(*c.args())
    why = explain(call)
    assert why["batched"] == [] and why["torch"] == [] and why.get("numba", []) == []
    # the CUDA decode kernel does not have them yet (prefill chunks run on 'batched', which does)
    assert any(word in r for r in option_reasons(call, "cuda decode"))
    out, _, ran = retrieval_attention(*c.args(), report=True)
    assert ran in ("numba", "batched", "torch")
    torch.testing.assert_close(out, retrieval_attention_ref(*c.args())[0], rtol=1e-5, atol=1e-5)


def test_bad_options_are_refused():
    from ctxmem.ops import OpParams

    with pytest.raises(ValueError, match="window"):
        OpParams(8, 1, 0, 8, 0.1, window=0)
    with pytest.raises(ValueError, match="softcap"):
        OpParams(8, 1, 0, 8, 0.1, softcap=-1.0)
    c = make_case(B=1, Hkv=1, G=1, D=16, S=8, R=1, topk=1, sink=0, local=8, C=1, ts=[40], ns=[1], seed=0)
    with pytest.raises(ValueError, match="inv_freq has 12 frequencies"):
        retrieval_attention_ref(*dataclasses.replace(c, inv_freq=torch.ones(12)).args())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opt", [dict(softcap=5.0), dict(window=20), dict(rotary=32), dict(window=7, softcap=2.0)])
def test_on_a_gpu_decode_with_options_runs_batched_and_matches(opt, dtype, monkeypatch):
    """On CUDA tensors the CUDA decode kernel refuses these options: auto runs 'batched' there, which must
    match the reference (fp32: 1e-4; bf16: within twice the reference's own bf16 error)."""
    c32 = with_options(make_case(B=2, Hkv=2, G=3, D=64, S=8, R=2, topk=2, sink=4, local=16, C=1, ts=[300, 90],
                                 ns=[1, 1], seed=1), **opt)
    c = c32.to(dtype, "cuda")
    out, _, ran = retrieval_attention(*c.args(), report=True)
    assert ran == "batched"
    exact = c.to(torch.float32, "cpu")
    want, _ = retrieval_attention_ref(*exact.args())
    tol = 1e-4 if dtype == torch.float32 else 2 * (retrieval_attention_ref(*c.to(device="cpu").args())[0].float()
                                                   - want).abs().max().item() + 1e-3
    assert (out.float().cpu() - want).abs().max().item() <= tol
    from ctxmem.ops import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "_fallback_allowed", False)
    with pytest.raises(RuntimeError, match="cuda decode"):
        retrieval_attention(*c.args(), backend="cuda")

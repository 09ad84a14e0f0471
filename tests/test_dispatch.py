"""The dispatcher: every reason per backend, its fallback decisions (warned once), what ran."""
from __future__ import annotations

import warnings

import pytest
import torch

from _op_cases import make_case
from conftest import tiny_model

import ctxmem
from ctxmem.ops import dispatch
from ctxmem.ops.dispatch import OpCall, choose, explain, register_backend, retrieval_attention


def _call(C=1, dtype=torch.float32):
    c = make_case(B=1, Hkv=1, G=2, D=64, S=8, R=2, topk=2, sink=2, local=8, C=C, ts=[60], ns=[C], seed=0)
    return OpCall(*c.to(dtype).args())


@pytest.fixture
def fake(monkeypatch):
    """Register throwaway backends; the registry is restored afterwards."""
    monkeypatch.setattr(dispatch, "_BACKENDS", dict(dispatch._BACKENDS))
    monkeypatch.setattr(dispatch, "_warned", set())
    return register_backend


def test_explain_lists_every_backend_and_its_reasons():
    why = explain(_call(dtype=torch.float16))
    assert why["torch"] == [] and why["batched"] == []
    assert any("CUDA tensors" in r for r in why["cuda"])
    assert any("float32 and bfloat16" in r for r in why.get("numba", ["float32 and bfloat16"]))


def test_report_names_what_ran_and_auto_skips_unable_backends():
    c = _call()
    out, sel, ran = retrieval_attention(*c.args(), report=True)
    assert ran == ("numba" if "numba" in dispatch._BACKENDS else "batched")
    c16 = _call(dtype=torch.float16)  # numba declines fp16: the next able backend runs, same contract
    out16, sel16, ran16 = retrieval_attention(*c16.args(), report=True)
    assert ran16 == "batched"
    ref, ref_sel = dispatch._BACKENDS["torch"].fn(*c16.args())
    assert torch.equal(sel16, ref_sel)
    torch.testing.assert_close(out16, ref, rtol=2e-3, atol=2e-3)


def test_explicit_name_raises_with_every_reason(fake):
    fake("picky", lambda *a: None, lambda call: ["first reason", "second reason"])
    with pytest.raises(RuntimeError, match="first reason; second reason"):
        choose("picky", _call())


def test_fallback_is_the_dispatchers_decision_warned_once(fake):
    fake("soft", lambda *a: None, lambda call: ["not built"], fallback_ok=lambda: True)
    with pytest.warns(UserWarning, match="'soft' cannot run here \\(not built\\)"):
        be = choose("soft", _call())
    assert be.name != "soft"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        choose("soft", _call())


def test_prefill_chunks_go_to_the_declared_backend(fake):
    fake("decoder", lambda *a: None, prefill="batched")
    assert choose("decoder", _call(C=1)).name == "decoder"
    assert choose("decoder", _call(C=5)).name == "batched"


def test_the_memory_records_which_backend_ran():
    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, 97, (1, 200), generator=torch.Generator().manual_seed(0))
    ctxmem.wrap(model, ctxmem.MemoryConfig(block_size=8, topk_blocks=2, sink_tokens=4, local_tokens=16,
                                           prefill_chunk=64, selector="keys", backend="batched"))
    try:
        out = model(ids, logits_to_keep=1)
    finally:
        ctxmem.unwrap(model)
    # 4 chunks x 2 layers, every one through the batched path
    assert out.cache.backends_run == {"batched": 8}

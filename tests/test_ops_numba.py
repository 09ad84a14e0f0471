"""The numba backend against the torch reference (the ground truth).

Outputs: fp32 within 1e-5 absolute; bf16 within twice the error of the reference's own bf16
path against an fp32 computation on the same (bf16-valued) inputs, flash-attention style.
``selected`` must match exactly, except on the rare random draw whose k-th and (k+1)-th block
scores are within 1e-4 (summation order may then flip the pick); ties are tested exactly with
integer-valued inputs.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

numba_kernels = pytest.importorskip("ctxmem.ops.numba_kernels")

from _op_cases import Case, cases, dense_causal_attention, make_case, selection_margin  # noqa: E402

from ctxmem.ops import OpParams, retrieval_attention, retrieval_attention_ref  # noqa: E402
from ctxmem.ops.dispatch import pick_backend  # noqa: E402

run = numba_kernels.retrieval_attention_numba
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def check_fp32(c: Case, atol=1e-5):
    ref_o, ref_s = retrieval_attention_ref(*c.args())
    out, sel = run(*c.args())
    assert out.dtype == c.q.dtype and out.shape == c.q.shape
    assert sel.dtype == torch.int64 and sel.shape == ref_s.shape
    torch.testing.assert_close(sel, ref_s, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_o, rtol=1e-5, atol=atol)


@given(cases(decode=True))
@settings(max_examples=50, **SETTINGS)
def test_decode_matches_reference(c):
    assume(selection_margin(c) > 1e-4)
    check_fp32(c)


@given(cases(decode=False))
@settings(max_examples=50, **SETTINGS)
def test_prefill_matches_reference(c):
    assume(selection_margin(c) > 1e-4)
    check_fp32(c)


@given(cases(max_t=200), st.sampled_from([torch.bfloat16]))
@settings(max_examples=30, **SETTINGS)
def test_bf16_matches_reference(c32, dtype):
    c = c32.to(dtype)
    exact = c.to(torch.float32)  # the bf16 values, computed in fp32
    assume(selection_margin(exact) > 1e-4)
    ref32, ref_s = retrieval_attention_ref(*exact.args())
    naive, _ = retrieval_attention_ref(*c.args())
    out, sel = run(*c.args())
    assert out.dtype == dtype
    torch.testing.assert_close(sel, ref_s, rtol=0, atol=0)
    err = (out.float() - ref32).abs().max().item()
    naive_err = (naive.float() - ref32).abs().max().item()
    assert err <= 2 * naive_err + 1e-3, (err, naive_err)


@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 7]), st.integers(1, 40), st.integers(0, 6))
@settings(max_examples=30, **SETTINGS)
def test_ties_go_to_lower_index(seed, C, topk, bias_kind):
    """Integer-valued queries and representatives: many exactly equal scores, exact arithmetic."""
    c = make_case(B=2, Hkv=2, G=2, D=64, S=8, R=2, topk=topk, sink=4, local=8, C=C,
                  ts=[300, 250], ns=[C, max(1, C - 3)], seed=seed, integer=True, bias=bias_kind == 0)
    # one integer query per group (repeated over the group's heads and positions): the mean is
    # exact, so every backend computes the very same scores and ties are real ties
    B, Hq, _, D = c.q.shape
    base = torch.randint(-2, 3, (B, 2, 1, D), generator=torch.Generator().manual_seed(seed)).float()
    c.q = base.repeat_interleave(2, dim=1).expand(B, Hq, C, D).contiguous()
    if bias_kind == 0:
        c.bias = torch.randint(-1, 2, c.bias.shape).float()
    if bias_kind == 1:  # all scores tie: the first blocks win
        c.reps.zero_()
    ref_o, ref_s = retrieval_attention_ref(*c.args())
    out, sel = run(*c.args())
    torch.testing.assert_close(sel, ref_s, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_o, rtol=1e-5, atol=1e-5)


EDGE = {
    # t < local: no middle blocks at all, the whole context is the local window
    "shorter_than_window": dict(S=16, topk=4, sink=4, local=64, C=1, ts=[30], ns=[1]),
    "first_chunk": dict(S=16, topk=4, sink=4, local=16, C=9, ts=[0], ns=[9]),
    "exactly_one_block": dict(S=16, topk=1, sink=4, local=16, C=1, ts=[4 + 16 + 16], ns=[1]),
    "one_block_topk0": dict(S=16, topk=0, sink=4, local=16, C=5, ts=[4 + 16 + 16], ns=[5]),
    "no_sink_no_local": dict(S=8, topk=2, sink=0, local=0, C=6, ts=[80], ns=[6]),
    "left_padding_and_empty_rows": dict(S=8, topk=3, sink=4, local=8, C=12, ts=[100, 60, 5], ns=[12, 0, 3]),
    "all_rows_empty": dict(S=8, topk=3, sink=4, local=8, C=4, ts=[100, 60], ns=[0, 0]),
    "budget_covers_context": dict(S=8, topk=64, sink=4, local=8, C=5, ts=[150], ns=[5]),
    "chunk_longer_than_tile": dict(S=64, topk=3, sink=64, local=100, C=130, ts=[700], ns=[130]),
    "decode_long": dict(S=64, topk=4, sink=64, local=128, C=1, ts=[3000], ns=[1]),
}


@pytest.mark.parametrize("name", sorted(EDGE))
@pytest.mark.parametrize("D", [64, 128])
def test_edge_cases(name, D):
    kw = EDGE[name]
    c = make_case(B=len(kw["ts"]), Hkv=2, G=3, D=D, R=2, seed=1, **kw)
    check_fp32(c)


@pytest.mark.parametrize("C", [1, 9])
@pytest.mark.parametrize("D", [8, 16, 32, 96])
def test_other_head_dims(C, D):
    """Tiny test models use head dim 16; any even head dim runs the same kernels."""
    c = make_case(B=2, Hkv=2, G=2, D=D, S=8, R=2, topk=3, sink=4, local=8, C=C,
                  ts=[120, 40], ns=[C, 1], seed=D)
    check_fp32(c)


@pytest.mark.parametrize("C", [1, 6])
def test_no_block_representatives_yet(C):
    """Early in a stream the store may hold no representatives at all (nb = 0)."""
    c = make_case(B=2, Hkv=1, G=2, D=64, S=16, R=2, topk=4, sink=4, local=64, C=C,
                  ts=[20, 3], ns=[C, C], seed=6)
    c.reps = c.reps[:, :, :0]
    check_fp32(c)


def test_budget_covering_context_is_dense_attention():
    c = make_case(B=2, Hkv=2, G=2, D=64, S=8, R=2, topk=100, sink=4, local=8, C=7,
                  ts=[120, 33], ns=[7, 4], seed=3)
    out, _ = run(*c.args())
    torch.testing.assert_close(out, dense_causal_attention(c), rtol=1e-5, atol=1e-5)


def test_strided_cache_views_read_in_place():
    """A cache buffer larger than the stored length (a view of it), and a [B, cap, H, D]
    layout transposed to [B, H, cap, D] (copied once), both give the reference's result."""
    c = make_case(B=2, Hkv=3, G=2, D=64, S=8, R=2, topk=3, sink=4, local=8, C=5,
                  ts=[90, 70], ns=[5, 5], seed=4)
    big_k = torch.randn(3, 3, c.k.shape[2] + 50, 64)
    big_v = torch.randn(3, 3, c.k.shape[2] + 50, 64)
    big_k[1:, :, : c.k.shape[2]] = c.k
    big_v[1:, :, : c.k.shape[2]] = c.v
    view = Case(c.q, big_k[1:, :, : c.k.shape[2]], big_v[1:, :, : c.k.shape[2]], c.reps, c.lengths,
                c.n_new, c.params, c.inv_freq, c.bias)
    assert not view.k.is_contiguous()
    check_fp32(view)
    bhsd = Case(c.q, c.k.transpose(1, 2).contiguous().transpose(1, 2),
                c.v.transpose(1, 2).contiguous().transpose(1, 2), c.reps, c.lengths.tolist(),
                c.n_new.tolist(), c.params, c.inv_freq, c.bias)
    check_fp32(bhsd)


def test_backend_registration_and_dispatch():
    q = torch.zeros(1, 2, 1, 64)
    assert "numba" in __import__("ctxmem.ops", fromlist=["x"]).available_backends()
    assert pick_backend("auto", q).name == "numba"
    assert pick_backend("numba", q).name == "numba"
    assert "float32 and bfloat16" in numba_kernels._unsupported(q.half())
    assert "CPU" in numba_kernels._unsupported(torch.zeros(1, 2, 1, 64, device="meta"))
    with pytest.raises(RuntimeError, match="cannot run here"):
        pick_backend("numba", q.half())
    c = make_case(B=1, Hkv=1, G=2, D=64, S=8, R=2, topk=2, sink=2, local=8, C=1, ts=[60], ns=[1], seed=5)
    out, sel = retrieval_attention(*c.args(), backend="numba")
    ref_o, ref_s = retrieval_attention_ref(*c.args())
    torch.testing.assert_close(out, ref_o, rtol=1e-5, atol=1e-5)


def test_memory_config_accepts_numba():
    from ctxmem import MemoryConfig

    assert MemoryConfig(backend="numba").backend == "numba"


def test_kernels_are_cached_on_disk():
    """cache=True: a second process loads the compiled kernels instead of compiling them."""
    numba_kernels.warmup()
    for fn in (numba_kernels._decode_kernel, numba_kernels._prefill_select, numba_kernels._prefill_attend):
        assert fn._cache.__class__.__name__ != "NullCache", fn
    code = textwrap.dedent("""
        import ctxmem.ops.numba_kernels as nk
        nk.warmup()
        fns = (nk._decode_kernel, nk._prefill_select, nk._prefill_attend)
        print(sum(sum(f.stats.cache_misses.values()) for f in fns),
              sum(sum(f.stats.cache_hits.values()) for f in fns))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    misses, hits = map(int, res.stdout.split()[-2:])
    assert misses == 0 and hits >= 4, res.stdout


def test_calls_from_several_threads_give_the_serial_results():
    """The kernels keep no state between calls (scratch is per task), so Python threads calling
    the op at once (it releases the GIL) must get exactly what serial calls get."""
    import threading

    cases = [make_case(B=2, Hkv=2, G=3, D=64, S=8, R=2, topk=3, sink=4, local=16, C=C,
                       ts=[300, 180], ns=[C, C], seed=s) for s, C in enumerate([1, 24, 1, 40])]
    want = [run(*c.args()) for c in cases]
    bad = []

    def work(i):
        for _ in range(20):
            j = i % len(cases)
            out, sel = run(*cases[j].args())
            if not (torch.equal(out, want[j][0]) and torch.equal(sel, want[j][1])):
                bad.append(j)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


@pytest.mark.parametrize("D", [64, 128])
def test_prefill_tiles_keep_blas_on_the_calling_thread(D, capfd):
    """Each prange task calls sgemm; tiles are capped so that OpenBLAS runs each call on the
    calling thread instead of waking threads of its own under ours (it then warns "Detect OpenMP
    Loop and this application may hang"). A 192-row tile at D=64 printed that warning."""
    c = make_case(B=1, Hkv=2, G=3, D=D, S=64, R=2, topk=3, sink=64, local=128, C=256,
                  ts=[1200], ns=[256], seed=4)
    numba_kernels.numba.set_num_threads(numba_kernels.numba.config.NUMBA_NUM_THREADS)
    check_fp32(c, atol=2e-5)
    assert "OpenBLAS Warning" not in capfd.readouterr().err

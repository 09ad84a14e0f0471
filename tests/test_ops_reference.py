"""Properties of the plain-torch reference itself (the ground truth of every backend)."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _op_cases import Case, cases, dense_causal_attention, inv_freq

from ctxmem.ops import OpParams, block_scores_ref, retrieval_attention_ref, row_layout
from ctxmem.ops.rope import rotate_half

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rope(x: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Rotate x[..., n, D] to positions pos[n] (rotate-half convention), in fp64."""
    ang = pos.double()[:, None] * inv.double()[None, :]
    cos = torch.cat((ang.cos(), ang.cos()), -1)
    sin = torch.cat((ang.sin(), ang.sin()), -1)
    x = x.double()
    return x * cos + rotate_half(x) * sin


@given(cases(), st.booleans())
@settings(max_examples=25, **SETTINGS)
def test_full_budget_is_dense_causal_attention_with_rope(c, rotate):
    """With a budget that covers every middle block, the op is full causal attention. With
    ``rotate`` the inputs are genuinely RoPE'd (raw q/k rotated at their true positions)."""
    c.params = OpParams(c.params.block_size, 10_000, c.params.sink, c.params.local, c.params.scaling)
    if rotate:
        L = c.k.shape[2]
        c.k = rope(c.k, torch.arange(L), c.inv_freq).float()
        B, Hq, C, D = c.q.shape
        for b in range(B):  # queries sit at positions [L_b - C, L_b) (padding rows included)
            pos = torch.arange(int(c.lengths[b]) - C, int(c.lengths[b]))
            c.q[b] = rope(c.q[b], pos, c.inv_freq).float()
    out, sel = retrieval_attention_ref(*c.args())
    torch.testing.assert_close(out, dense_causal_attention(c), rtol=1e-5, atol=1e-5)


@given(cases())
@settings(max_examples=30, **SETTINGS)
def test_selected_blocks_are_the_true_topk(c):
    """Ascending indices of the top min(topk, nmid) blocks under block_scores_ref (stable: ties
    to the lower index), -1 after them; all blocks when the budget covers the middle."""
    _, sel = retrieval_attention_ref(*c.args())
    B, Hq, C, D = c.q.shape
    Hkv = c.k.shape[1]
    G = Hq // Hkv
    for b in range(B):
        n, L = int(c.n_new[b]), int(c.lengths[b])
        if n == 0:
            assert (sel[b] == -1).all()
            continue
        lay = row_layout(L - n, c.params)
        assert (sel[b, :, lay.nsel:] == -1).all()
        if lay.nsel == lay.nmid:
            assert (sel[b, :, : lay.nsel] == torch.arange(lay.nsel)).all()
            continue
        qbar = c.q[b, :, C - n:].float().reshape(Hkv, G, n, D).mean(dim=(1, 2))
        s = block_scores_ref(qbar, c.reps[b, :, : lay.nmid], c.params.scaling,
                             None if c.bias is None else c.bias[b, : lay.nmid])
        for h in range(Hkv):
            vals = s[h].tolist()
            want = sorted(sorted(range(lay.nmid), key=lambda j: (-vals[j], j))[: lay.nsel])
            assert sel[b, h, : lay.nsel].tolist() == want


def _perturb_v(c: Case, b: int, pos: list[int]) -> Case:
    v = c.v.clone()
    v[b, :, pos] += 1.0e4
    return Case(c.q, c.k, v, c.reps, c.lengths, c.n_new, c.params, c.inv_freq, c.bias)


@given(cases(), st.data())
@settings(max_examples=30, **SETTINGS)
def test_sinks_and_local_always_attended_unselected_never(c, data):
    """Changing V at a sink or local-window position (visible to the query) changes every real
    query's output; changing V inside an unselected middle block changes nothing."""
    out, sel = retrieval_attention_ref(*c.args())
    B, Hq, C, D = c.q.shape
    for b in range(B):
        n, L = int(c.n_new[b]), int(c.lengths[b])
        if n == 0:
            continue
        t = L - n
        lay = row_layout(t, c.params)
        S = c.params.block_size
        always = list(range(lay.s_end)) + list(range(lay.local_start, t + 1))  # seen by every query
        p = data.draw(st.sampled_from(always))
        out2, _ = retrieval_attention_ref(*_perturb_v(c, b, [p]).args())
        assert ((out2[b, :, C - n:] - out[b, :, C - n:]).abs().amax(-1) > 0).all()
        chosen = set()
        for h in range(c.k.shape[1]):
            chosen |= set(sel[b, h, : lay.nsel].tolist())
        unselected = [j for j in range(lay.nmid) if j not in chosen]
        if unselected:
            j = data.draw(st.sampled_from(unselected))
            blk = list(range(lay.s_end + j * S, lay.s_end + (j + 1) * S))
            out3, _ = retrieval_attention_ref(*_perturb_v(c, b, blk).args())
            assert torch.equal(out3, out)


@given(cases(decode=False), st.data())
@settings(max_examples=30, **SETTINGS)
def test_no_query_sees_a_future_token(c, data):
    """Changing K/V at stored position p (or in the unused capacity past L) leaves every query
    at a position < p unchanged."""
    out, _ = retrieval_attention_ref(*c.args())
    B, Hq, C, D = c.q.shape
    b = data.draw(st.integers(0, B - 1))
    n, L = int(c.n_new[b]), int(c.lengths[b])
    if n == 0:
        return
    t = L - n
    p = data.draw(st.integers(t, c.k.shape[2] - 1))
    k, v = c.k.clone(), c.v.clone()
    k[b, :, p:] = torch.randn_like(k[b, :, p:]) * 10
    v[b, :, p:] += 100.0
    c2 = Case(c.q, k, v, c.reps, c.lengths, c.n_new, c.params, c.inv_freq, c.bias)
    out2, _ = retrieval_attention_ref(*c2.args())
    seen = C - n + (p - t)  # chunk index of the first query at position >= p
    torch.testing.assert_close(out2[b, :, :seen], out[b, :, :seen], rtol=0, atol=0)


@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 4]))
@settings(max_examples=25, **SETTINGS)
def test_selected_blocks_sit_at_their_virtual_positions(seed, C):
    """Re-rotation: a moved block attends exactly as if its raw keys had been rotated at its
    virtual position (blocks back to back before the local window, sinks just before them)."""
    g = torch.Generator().manual_seed(seed)
    D, S, sink, local, topk = 64, 8, 4, 16, 3
    t = 4 + 10 * S + 16 + 5
    L = t + C
    inv = inv_freq(D, base=50.0)  # fast rotations: a wrong position shows
    raw_k = torch.randn(1, 1, L, D, generator=g)
    v = torch.randn(1, 1, L, D, generator=g)
    q_raw = torch.randn(1, 2, C, D, generator=g)
    reps = torch.randn(1, 1, 12, 2, D, generator=g)
    params = OpParams(S, topk, sink, local, D ** -0.5)
    k = rope(raw_k[0, 0], torch.arange(L), inv).float()[None, None]
    q = torch.stack([rope(q_raw[0, h], torch.arange(t, L), inv) for h in range(2)]).float()[None]
    out, sel = retrieval_attention_ref(q, k, v, reps, torch.tensor([L]), torch.tensor([C]), params, inv)
    lay = row_layout(t, params)
    blocks = sel[0, 0, : lay.nsel].tolist()
    vstart = lay.local_start - lay.nsel * S
    idx = list(range(lay.s_end)) + [lay.s_end + j * S + i for j in blocks for i in range(S)] \
        + list(range(lay.local_start, L))
    vpos = list(range(vstart - lay.s_end, vstart)) + list(range(vstart, lay.local_start)) \
        + list(range(lay.local_start, L))
    kk = rope(raw_k[0, 0, idx], torch.tensor(vpos), inv)
    vv = v[0, 0, idx].double()
    att = (q[0].double() @ kk.T) * params.scaling
    mask = torch.tensor(idx)[None, :] > torch.arange(t, L)[:, None]
    want = att.masked_fill(mask[None], float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(out[0].double(), want, rtol=1e-4, atol=1e-4)

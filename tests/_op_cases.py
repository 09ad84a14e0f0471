"""Shared input generators for the fused-op tests (reference, numba, CUDA).

Inputs are drawn from a seeded torch generator (hypothesis draws the shapes and the seed), so
the data are continuous and near-ties in block scores are rare; ``selection_margin`` lets a test
recognise the rare near-tie and skip the exact comparison of ``selected`` for it. Tie tests use
integer-valued inputs, for which every backend computes the block scores exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from ctxmem.ops import OpParams, block_scores_ref, row_layout


def inv_freq(D: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    reps: torch.Tensor
    lengths: torch.Tensor
    n_new: torch.Tensor
    params: OpParams
    inv_freq: torch.Tensor
    bias: torch.Tensor | None

    def args(self):
        return (self.q, self.k, self.v, self.reps, self.lengths, self.n_new, self.params,
                self.inv_freq, self.bias)

    def to(self, dtype=None, device=None):
        def cv(x, floating=True):
            if x is None:
                return None
            if floating and dtype is not None:
                x = x.to(dtype)
            return x.to(device) if device is not None else x
        return Case(cv(self.q), cv(self.k), cv(self.v), cv(self.reps), cv(self.lengths, False),
                    cv(self.n_new, False), self.params, cv(self.inv_freq, False),
                    cv(self.bias, False))


def make_case(*, B, Hkv, G, D, S, R, topk, sink, local, C, ts, ns, seed, bias=False, extra_cap=3,
              integer=False, dtype=torch.float32, scale=1.0) -> Case:
    """Random op inputs. ``ts[b]`` tokens stored before the chunk, ``ns[b]`` real queries."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([t + n for t, n in zip(ts, ns)], dtype=torch.int64)
    cap = int(lengths.max()) + extra_cap
    nb = max(1, (cap - min(sink, cap)) // S + 1)
    Hq = Hkv * G

    def rnd(*shape):
        if integer:
            return torch.randint(-2, 3, shape, generator=g).to(torch.float32)
        return torch.randn(*shape, generator=g) * scale

    q = rnd(B, Hq, C, D)
    k = rnd(B, Hkv, cap, D)
    v = torch.randn(B, Hkv, cap, D, generator=g)
    reps = rnd(B, Hkv, nb, R, D)
    b = torch.randn(B, nb, generator=g) if bias else None
    params = OpParams(block_size=S, topk=topk, sink=sink, local=local, scaling=D ** -0.5)
    c = Case(q, k, v, reps, lengths, torch.tensor(ns, dtype=torch.int64), params, inv_freq(D), b)
    return c.to(dtype) if dtype != torch.float32 else c


@st.composite
def cases(draw, *, decode: bool | None = None, dims=(64, 128), max_t=300, bias=None):
    """Random shapes: batch, heads, GQA ratio, head dim, block size, budget above and below the
    context, left padding (n_new < C) and empty rows (n_new = 0)."""
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2, 3, 4]))
    D = draw(st.sampled_from(list(dims)))
    S = draw(st.sampled_from([4, 8, 16, 64]))
    R = draw(st.sampled_from([r for r in (1, 2, 4) if S % r == 0]))
    topk = draw(st.sampled_from([0, 1, 2, 5, 64]))
    sink = draw(st.sampled_from([0, 1, 4, 16]))
    local = draw(st.sampled_from([0, 3, 16, 40]))
    if decode is None:
        decode = draw(st.booleans())
    C = 1 if decode else draw(st.integers(2, 40))
    ns = [draw(st.integers(0, C)) for _ in range(B)]
    if all(n == 0 for n in ns) and draw(st.booleans()):
        ns[0] = C
    ts = [draw(st.integers(0, max_t)) for _ in range(B)]
    use_bias = draw(st.booleans()) if bias is None else bias
    seed = draw(st.integers(0, 2**31 - 1))
    return make_case(B=B, Hkv=Hkv, G=G, D=D, S=S, R=R, topk=topk, sink=sink, local=local, C=C,
                     ts=ts, ns=ns, seed=seed, bias=use_bias)


def selection_margin(c: Case) -> float:
    """Smallest relative gap, over rows and heads that score blocks, between the k-th and the
    (k+1)-th block score (inf when nothing is scored). Below ~1e-4 two implementations that sum
    in different orders may legitimately pick different blocks."""
    B, Hq, C, D = c.q.shape
    Hkv = c.k.shape[1]
    G = Hq // Hkv
    best = float("inf")
    for b in range(B):
        n, L = int(c.n_new[b]), int(c.lengths[b])
        if n == 0:
            continue
        lay = row_layout(L - n, c.params)
        if lay.nsel == lay.nmid or lay.nsel == 0:
            continue
        qbar = c.q[b, :, C - n:].float().reshape(Hkv, G, n, D).mean(dim=(1, 2))
        s = block_scores_ref(qbar, c.reps[b, :, : lay.nmid].float(), c.params.scaling,
                             None if c.bias is None else c.bias[b, : lay.nmid])
        top = torch.sort(s, dim=-1, descending=True).values
        gap = (top[:, lay.nsel - 1] - top[:, lay.nsel]).abs() / top[:, lay.nsel - 1: lay.nsel + 1].abs().amax(-1).clamp_min(1.0)
        best = min(best, float(gap.min()))
    return best


def dense_causal_attention(c: Case) -> torch.Tensor:
    """Full causal attention over every stored key (fp32), zeros at padded queries."""
    B, Hq, C, D = c.q.shape
    Hkv = c.k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, C, D)
    for b in range(B):
        n, L = int(c.n_new[b]), int(c.lengths[b])
        if n == 0:
            continue
        qb = c.q[b, :, C - n:].float()
        kk = c.k[b, :, :L].float().repeat_interleave(G, dim=0)
        vv = c.v[b, :, :L].float().repeat_interleave(G, dim=0)
        att = (qb @ kk.transpose(-1, -2)) * c.params.scaling
        qpos = torch.arange(L - n, L)[:, None]
        att = att.masked_fill(torch.arange(L)[None, :] > qpos, float("-inf"))
        out[b, :, C - n:] = att.softmax(-1) @ vv
    return out

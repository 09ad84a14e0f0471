"""The fused op vectorised over rows and heads: one gather and one SDPA call per layer.

The same contract as ``retrieval_attention_ref`` (see ``reference.py``), written for a GPU: the
reference loops over rows in Python and syncs on every row (``bool(moved.any())``), which is what
made a wrapped model prefill 3-24x slower than the stock one on an H200 (host-bound). Here every
step is a batched tensor op whose shapes depend only on host integers (``lengths`` and ``n_new``
live on the host in ``MemoryCache``), so a chunk costs a fixed number of kernel launches per layer
whatever its length, and large chunks (thousands of tokens) amortise them:

  0. plan (once per chunk, shared by all its layers): slot layout, virtual positions, causal mask;
  1. score: the group-mean query of each row and KV head against the block representatives, padded
     blocks masked to -inf, the embedder's bias added; top-k by a stable sort (ties to the lower
     index, as the reference);
  2. plan: for every (row, head, key slot) the stored position and the virtual position (sinks,
     selected blocks back to back, local window; ``layout.py``), padded slots masked;
  3. gather K/V once, re-rotate K by (virtual - true) position (zero for local keys: exact);
  4. one SDPA over [B, Hq, C, M] in the input dtype (no fp32 upcast of a bf16 model), with the
     causal mask of the local window; padded queries give zeros.

Used by the CUDA backend for prefill chunks (C > 1); it runs on any device, so the CPU tests
check it against the reference.

Per-layer options (``layout.py``): partial rotary needs nothing (``rerotate`` turns the first
``2 * len(inv_freq)`` dims); ``softcap`` replaces the SDPA call by an explicit fp32 softmax (SDPA has
no soft-capping); ``window`` (a sliding-window layer) is one gather of each row's last
``window - 1 + n`` keys and one masked attention call, no scoring, no re-rotation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import OpParams, row_layout
from .rope import rerotate


def _col(vals: list[int], device) -> torch.Tensor:
    """Per-row integers as a [B, 1, 1] int64 tensor (one small host->device copy)."""
    return torch.tensor(vals, dtype=torch.int64).to(device, non_blocking=True).view(-1, 1, 1)


def select_blocks(q, reps, plan: "_Plan", scaling: float, bias):
    """Top-``nsel[b]`` middle blocks per row and KV head: ``[B, Hkv, max(nsel)]`` ascending, -1 padded."""
    B, Hq, C, D = q.shape
    Hkv = reps.shape[1]
    G = Hq // Hkv
    K, NB = plan.K, max(plan.nmid)
    if K == 0:
        return torch.full((B, Hkv, 0), -1, dtype=torch.long, device=q.device)
    # the group-mean of each row's real queries (left padding: the last n of the chunk are real)
    qbar = torch.einsum("bhgcd,bc->bhd", q.view(B, Hkv, G, C, D).float(), plan.real_w) / plan.denom
    scores = torch.einsum("bhd,bhnrd->bhnr", qbar, reps[:, :, :NB].float()).amax(-1) * scaling
    if bias is not None:
        scores = scores + bias[:, None, :NB].float()
    scores = scores.masked_fill(plan.j[..., :NB] >= plan.nmid_col, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :K]
    big = torch.iinfo(torch.long).max
    order = order.masked_fill(plan.j[..., :K] >= plan.nsel_col, big)
    sel = torch.sort(order, dim=-1).values
    return sel.masked_fill(sel == big, -1)


@dataclass
class _Plan:
    """What a chunk's layers share: every tensor here depends on the lengths and the layout only, not
    on the layer's queries or keys, so it is built once per chunk and reused by all its layers."""

    ns: list
    nmid: list
    nsel: list
    K: int
    A: torch.Tensor  # [B, 1, 1] first block slot (= sinks kept)
    i: torch.Tensor  # [B, 1, M] slot index inside the selected blocks (clamped)
    in_blocks: torch.Tensor  # [B, 1, M]
    idx_fixed: torch.Tensor  # [B, 1, M] stored position of sink and local slots (0 where padded)
    vpos: torch.Tensor  # [B, 1, M] virtual position of every slot
    mask: torch.Tensor  # [B, 1, C, M] what each query may see
    real_q: torch.Tensor  # [B, 1, C, 1] real (not padding) queries
    real_w: torch.Tensor  # [B, C] 1.0 at real queries (the scoring mean's weights)
    denom: torch.Tensor  # [B, 1, 1] queries averaged per KV head (G * n)
    j: torch.Tensor  # [1, 1, max(nmid, K)] block / rank index
    nmid_col: torch.Tensor  # [B, 1, 1]
    nsel_col: torch.Tensor  # [B, 1, 1]


_plans: dict = {}


def _plan(Ls: list, ns: list, C: int, G: int, params: OpParams, device) -> _Plan | None:
    key = (str(device), tuple(Ls), tuple(ns), C, G, params)
    hit = _plans.get(key)
    if hit is not None:
        return hit
    if len(_plans) > 8:  # a chunk's layers share one plan; older chunks are not asked again
        _plans.clear()
    S = params.block_size
    dev = device
    ts = [L - n for L, n in zip(Ls, ns)]
    lays = [row_layout(t, params) for t in ts]
    live = [n > 0 for n in ns]
    if not any(live):
        return None
    nmid = [lay.nmid if ok else 0 for lay, ok in zip(lays, live)]
    nsel = [lay.nsel if ok else 0 for lay, ok in zip(lays, live)]
    K = max(nsel)
    # key slots: [0, a) sinks, [a, c) selected blocks, [c, e) local window (this chunk included)
    a = [lay.s_end if ok else 0 for lay, ok in zip(lays, live)]
    c = [a_ + s * S for a_, s in zip(a, nsel)]
    ls = [lay.local_start for lay in lays]
    e = [c_ + (L - l_ if ok else 0) for c_, L, l_, ok in zip(c, Ls, ls, live)]
    vstart = [l_ - s * S for l_, s in zip(ls, nsel)]
    M = max(e)
    m = torch.arange(M, device=dev).view(1, 1, M)
    A, Cc, E, LS, VS, T, N = (_col(x, dev) for x in (a, c, e, ls, vstart, ts, ns))
    in_blocks = (m >= A) & (m < Cc)
    i = (m - A).clamp(min=0, max=max(K * S - 1, 0))
    local_pos = LS + (m - Cc)
    valid = m < E  # [B, 1, M]
    idx_fixed = torch.where(valid, torch.where(m < A, m, local_pos), 0)
    vpos = torch.where(valid, torch.where(m < A, m + (VS - A), torch.where(in_blocks, VS + i, local_pos)), 0)
    # causal mask: sinks and blocks precede every query; a local key is visible up to its position
    qi = torch.arange(C, device=dev).view(1, C, 1)
    qpos = T + qi - (C - N)  # [B, C, 1]
    real_q = qi >= C - N
    visible = valid & ((m < Cc) | (local_pos <= qpos))  # [B, C, M]
    mask = torch.where(real_q, visible, True)  # padded queries: any finite row, zeroed at the end
    real_w = real_q[..., 0].float()  # [B, C]
    denom = (G * N.clamp(min=1)).float()
    j = torch.arange(max(max(nmid), K, 1), device=dev).view(1, 1, -1)
    plan = _Plan(ns, nmid, nsel, K, A, i, in_blocks, idx_fixed, vpos, mask[:, None], real_q[:, None],
                 real_w, denom, j, _col(nmid, dev), _col(nsel, dev))
    _plans[key] = plan
    return plan


def _attend(q, kk, vv, mask, scaling: float, softcap: float | None):
    """SDPA, or with ``softcap`` the same softmax written out (fp32 logits, capped, masked)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scaling)
    s = torch.matmul(q.float(), kk.float().transpose(-1, -2)) * scaling
    s = (torch.tanh(s / softcap) * softcap).masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), vv.float()).to(q.dtype)


def _window_batched(q, k, v, Ls: list, ns: list, params: OpParams, selected):
    """A sliding-window layer: query at position p sees stored keys (p - window, p], true positions."""
    B, Hq, C, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    W = int(params.window)
    dev = q.device
    ts = [L - n for L, n in zip(Ls, ns)]
    lo = [max(0, t - W + 1) if n else 0 for t, n in zip(ts, ns)]
    M = max([L - a for L, a, n in zip(Ls, lo, ns) if n] + [1])
    m = torch.arange(M, device=dev).view(1, 1, M)
    LO, LL, T, N = (_col(x, dev) for x in (lo, Ls, ts, ns))
    kpos = LO + m  # [B, 1, M]
    valid = kpos < LL
    idx = torch.where(valid, kpos, 0)
    gidx = idx[:, :, :, None].expand(B, Hkv, M, D)
    kk, vv = torch.gather(k, 2, gidx), torch.gather(v, 2, gidx)
    if G > 1:
        kk, vv = kk.repeat_interleave(G, dim=1), vv.repeat_interleave(G, dim=1)
    qi = torch.arange(C, device=dev).view(1, C, 1)
    qpos = T + qi - (C - N)  # [B, C, 1]
    real_q = qi >= C - N
    visible = valid & (kpos <= qpos) & (kpos > qpos - W)  # [B, C, M]
    mask = torch.where(real_q, visible, True)[:, None]  # padded queries: any finite row, zeroed below
    o = _attend(q, kk, vv, mask, params.scaling, params.softcap)
    return torch.where(real_q[:, None], o, 0).to(q.dtype), selected


def retrieval_attention_batched(q, k, v, reps, lengths, n_new, params: OpParams, inv_freq, bias=None):
    B, Hq, C, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    S = params.block_size
    dev = q.device
    Ls = [int(x) for x in torch.as_tensor(lengths).tolist()]
    ns = [int(x) for x in torch.as_tensor(n_new).tolist()]
    selected = torch.full((B, Hkv, params.topk), -1, dtype=torch.long, device=dev)
    if params.window is not None:
        if not any(ns):
            return torch.zeros_like(q), selected
        return _window_batched(q, k, v, Ls, ns, params, selected)
    plan = _plan(Ls, ns, C, G, params, dev)
    if plan is None:  # no row has a real query
        return torch.zeros_like(q), selected
    K = plan.K
    sel = select_blocks(q, reps, plan, params.scaling, bias)  # [B, Hkv, K]
    selected[..., :K] = sel
    M = plan.vpos.shape[-1]
    if K:  # the stored position of each block slot: this layer's selection
        blk = torch.gather(sel.clamp(min=0), 2, (plan.i // S).expand(B, Hkv, M))
        idx = torch.where(plan.in_blocks, plan.A + blk * S + plan.i % S, plan.idx_fixed)
    else:
        idx = plan.idx_fixed.expand(B, Hkv, M)
    gidx = idx[..., None].expand(B, Hkv, M, D)
    kk = torch.gather(k, 2, gidx)
    vv = torch.gather(v, 2, gidx)
    kk = rerotate(kk, plan.vpos - idx, inv_freq.to(dev))  # delta 0 (local keys) is exact
    if G > 1:
        kk, vv = kk.repeat_interleave(G, dim=1), vv.repeat_interleave(G, dim=1)
    o = _attend(q, kk, vv, plan.mask, params.scaling, params.softcap)
    return torch.where(plan.real_q, o, 0).to(q.dtype), selected

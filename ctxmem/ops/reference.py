"""Plain-torch reference of the fused retrieval-attention op: the ground truth in tests.

Contract (every backend implements exactly this; see ``layout.py`` for the regions):

    out, selected = retrieval_attention_ref(q, k, v, reps, lengths, n_new, params, inv_freq, bias)

    q        [B, Hq, C, D]      the chunk's queries, rotated at their true positions; in row b
                                the last ``n_new[b]`` are real (left padding), the rest ignored
    k, v     [B, Hkv, cap, D]   stored keys/values; row b holds positions [0, lengths[b]), the
                                chunk's own keys already appended (the last n_new[b] of them)
    reps     [B, Hkv, nb, R, D] representative keys of complete blocks (block j covers
                                positions [sink + j*S, sink + (j+1)*S)); only j < nmid is read
    lengths  [B] int            stored tokens per row, this chunk included
    n_new    [B] int            real queries per row in this chunk
    bias     [B, nb] or None    added to every head's block score (the embedder's votes)
    inv_freq [R/2]              the model's RoPE frequencies (for re-rotation); R = 2 * len(inv_freq)
                                <= D leading dimensions are rotated (R < D: partial rotary, phi3)

Block score for KV head h:  scaling * max_r <qbar_h, reps[h, j, r]> + bias[j], where qbar_h is
the mean of the group's real queries over the chunk. The top ``min(topk, nmid)`` blocks are
selected (ties go to the lower block index), then attended in ascending order, re-rotated as
described in ``layout.py``, together with the sinks and the local window, in one softmax.
Returns ``out [B, Hq, C, D]`` (zeros at padded queries) and ``selected [B, Hkv, topk]`` (block
indices ascending, -1 where fewer were selected).

``params.window`` (a sliding-window layer: exact window attention at true positions) and
``params.softcap`` (logits ``softcap * tanh(logit / softcap)`` before the softmax) are described in
``layout.py``; every backend either implements them or says why not (``dispatch.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import OpParams, row_layout
from .rope import rerotate


def block_scores_ref(qbar: torch.Tensor, reps: torch.Tensor, scaling: float, bias: torch.Tensor | None):
    """qbar [Hkv, D], reps [Hkv, n, R, D], bias [n] -> scores [Hkv, n] (fp32)."""
    s = torch.einsum("hd,hnrd->hnr", qbar.float(), reps.float()).amax(-1) * scaling
    if bias is not None:
        s = s + bias.float()[None, :]
    return s


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k per row of ``scores [H, n]``, ties to the lower index, returned in ascending order."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=-1).values


def gather_plan(t: int, L: int, sel: torch.Tensor, p: OpParams):
    """Key slots and virtual positions for one row: (idx [H, M], vpos [H, M]), true pos = idx."""
    lay = row_layout(t, p)
    H, S = sel.shape[0], p.block_size
    dev = sel.device
    nsel = sel.shape[1]
    sinks = torch.arange(lay.s_end, device=dev).expand(H, -1)
    blocks = (lay.s_end + sel[:, :, None] * S + torch.arange(S, device=dev)).reshape(H, nsel * S)
    local = torch.arange(lay.local_start, L, device=dev).expand(H, -1)
    idx = torch.cat([sinks, blocks, local], dim=1)
    vstart = lay.local_start - nsel * S
    v_sinks = sinks + (vstart - lay.s_end)
    v_blocks = torch.arange(vstart, lay.local_start, device=dev).expand(H, -1)
    vpos = torch.cat([v_sinks, v_blocks, local], dim=1)
    return idx, vpos


def attend_ref(q, k, v, mask, scaling: float, softcap: float | None):
    """softmax(scaling * q k^T, soft-capped, masked) v in fp32: q [H, Cq, D], k/v [H, M, D], mask [Cq, M]."""
    if softcap is None:
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[None], scale=scaling)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float())


def window_attention_ref(q, k, v, lengths, n_new, params: OpParams):
    """A sliding-window layer (``params.window``): each query at position p attends the stored keys at
    (p - window, p], true positions, no re-rotation; the contract's ``(out, selected)`` with no selection."""
    B, Hq, C, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    W = int(params.window)
    out = torch.zeros_like(q)
    selected = torch.full((B, Hkv, params.topk), -1, dtype=torch.long, device=q.device)
    for b in range(B):
        n, L = int(n_new[b]), int(lengths[b])
        if n == 0:
            continue
        t = L - n
        lo = max(0, t - W + 1)
        kpos = torch.arange(lo, L, device=q.device)
        qpos = torch.arange(t, L, device=q.device)
        mask = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - W)
        qb = q[b, :, C - n:, :].reshape(Hkv, G * n, D)
        o = attend_ref(qb, k[b, :, lo:L], v[b, :, lo:L], mask.repeat(G, 1), params.scaling, params.softcap)
        out[b, :, C - n:, :] = o.reshape(Hq, n, D).to(q.dtype)
    return out, selected


def retrieval_attention_ref(q, k, v, reps, lengths, n_new, params: OpParams, inv_freq, bias=None):
    if params.window is not None:
        return window_attention_ref(q, k, v, lengths, n_new, params)
    B, Hq, C, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.zeros_like(q)
    selected = torch.full((B, Hkv, params.topk), -1, dtype=torch.long, device=q.device)
    for b in range(B):
        n, L = int(n_new[b]), int(lengths[b])
        if n == 0:
            continue
        t = L - n
        lay = row_layout(t, params)
        qb = q[b, :, C - n:, :].reshape(Hkv, G, n, D)
        if lay.nsel == lay.nmid:  # budget covers the middle: take all (exact attention)
            sel = torch.arange(lay.nmid, device=q.device).expand(Hkv, -1)
        else:
            qbar = qb.float().mean(dim=(1, 2))
            scores = block_scores_ref(qbar, reps[b, :, : lay.nmid], params.scaling,
                                      None if bias is None else bias[b, : lay.nmid])
            sel = select_topk(scores, lay.nsel)
        selected[b, :, : lay.nsel] = sel
        idx, vpos = gather_plan(t, L, sel, params)
        # advanced indexing, not gather: its backward keeps only k's shape, so a training step may
        # append to the cache in place after this read (gather would save k itself)
        heads = torch.arange(Hkv, device=q.device)[:, None]
        kk, vv = k[b][heads, idx], v[b][heads, idx]
        moved = vpos != idx
        if bool(moved.any()):
            kk = torch.where(moved[..., None], rerotate(kk, vpos - idx, inv_freq), kk)
        qpos = torch.arange(t, L, device=q.device)
        visible = idx[0][None, :] <= qpos[:, None]  # [n, M]; sinks/blocks precede t, so always visible
        mask = visible.repeat(G, 1)  # query rows are (g, n) flattened
        o = attend_ref(qb.reshape(Hkv, G * n, D), kk, vv, mask, params.scaling, params.softcap)
        out[b, :, C - n:, :] = o.reshape(Hq, n, D).to(q.dtype)
    return out, selected

"""Bounded-RAM working memory: the live tail in RAM, retrieved blocks from the cold store.

``TieredStoreLayer`` replaces ``BlockStoreLayer`` when ``MemoryConfig.ram_budget`` is set.
Per row it keeps in RAM only the sinks and the *tail*: positions from the first block that can
still fall in a query's local window up to the newest token (at most local + 2 blocks + one
chunk). A block leaves the tail for the ``ColdBlockStore`` the moment it becomes a middle block
(``row_layout``'s ``nmid``), i.e. once only retrieval can reach it. Representative keys stay in
RAM, so scoring never touches the disk.

The fused op is unchanged. For each call we score the blocks against the chunk's queries (the
op's own rule: ``block_scores_ref`` + ``select_topk``), take the union ``U`` over KV heads of the
chosen blocks, and hand the op a *compact* store: sinks | the blocks of U | the tail. The op,
scoring only U, picks the same blocks per head. The compact store is ``delta = (nmid - |U|) * S``
slots shorter than the full one, so its keys are pre-rotated to keep every query-key distance
exactly what the full store would give (rotations compose; see ``ops/rope.py``):
sinks by +delta, block j placed at compact slot i by (i - j) * S + delta, the tail not at all
(its slots are shifted by delta, and so are the queries' positions).
"""
from __future__ import annotations

import torch

from ..ops import OpParams, block_scores_ref, row_layout, select_topk
from ..ops.rope import rerotate_blocks_
from .block_store import BlockStoreLayer, grown


def block_scores_half(qbar: torch.Tensor, reps: torch.Tensor, scaling: float, bias: torch.Tensor | None):
    """``block_scores_ref`` for half-precision representatives without converting them.

    Converting a layer's fp16 reps to fp32 on every call costs ~8x the dot products themselves
    (at 1M tokens: 0.55 s per chunk over 30 layers, vs 0.07 s this way). The query is scaled
    first so the products are attention logits (far inside fp16's range); products accumulate
    in fp32, so the result differs from the reference only by rounding the query and each score
    to fp16 (2^-11 relative, the reps' own precision; bounds tested in test_memory_tiers.py).
    fp32 reps go through the reference unchanged.
    """
    if reps.dtype == torch.float32:
        return block_scores_ref(qbar, reps, scaling, bias)
    s = torch.einsum("hd,hnrd->hnr", (qbar.float() * scaling).to(reps.dtype), reps).amax(-1).float()
    if bias is not None:
        s = s + bias.float()[None, :]
    return s


class TieredStoreLayer(BlockStoreLayer):
    def __init__(self, owner, layer_idx: int):
        super().__init__(owner)
        self.layer_idx = layer_idx
        self.spilled = torch.zeros(0, dtype=torch.long)  # blocks of each row now in the cold store

    def reset(self) -> None:
        self.__init__(self.owner, self.layer_idx)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.spilled = torch.zeros(key_states.shape[0], dtype=torch.long)
        self.reps = self.reps.to(self.owner.reps_dtype(key_states.dtype))
        self.owner.cold_store(key_states.shape[1], key_states.shape[3], key_states.dtype)

    # -- layout ------------------------------------------------------------------------------
    def _params(self) -> OpParams:
        c = self.owner.cfg
        return OpParams(c.block_size, c.topk_blocks, c.sink_tokens, c.local_tokens, 1.0)

    def hot_len(self, b: int) -> int:
        """Slots row b uses in RAM: positions [0, L) minus the spilled blocks."""
        return int(self.lengths[b]) - int(self.spilled[b]) * self.owner.cfg.block_size

    def hot_slot(self, b: int, pos: int) -> int:
        cfg = self.owner.cfg
        return pos if pos < cfg.sink_tokens else pos - int(self.spilled[b]) * cfg.block_size

    def reserve_hot(self, need: int) -> None:
        cap = self.k.shape[2]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 256)
        self.k, self.v = grown(self.k, 2, new_cap), grown(self.v, 2, new_cap)

    def reserve_reps(self, nblocks: int) -> None:
        have = self.reps.shape[2]
        if nblocks <= have:
            return
        self.reps = grown(self.reps, 2, max(nblocks, 2 * have, 16))

    def spill(self, b: int) -> None:
        """Move row b's blocks that became middle blocks (for a chunk starting now) to the cold store."""
        S, sink = self.owner.cfg.block_size, self.owner.cfg.sink_tokens
        L = int(self.lengths[b])
        nmid, done = row_layout(L, self._params()).nmid, int(self.spilled[b])
        if nmid <= done:
            return
        cold = self.owner.cold
        for j in range(done, nmid):
            s = sink + (j - done) * S
            cold.put((self.layer_idx, b, j), self.k[b, :, s:s + S], self.v[b, :, s:s + S])
        m, rest = (nmid - done) * S, L - sink - nmid * S
        for x in (self.k, self.v):  # shift the tail left over the spilled blocks (bounded copy)
            x[b, :, sink:sink + rest] = x[b, :, sink + m:sink + m + rest].clone()
        self.spilled[b] = nmid

    # -- rows in and out (save / load) -----------------------------------------------------------
    def export_row(self, b: int):
        h = self.hot_len(b)
        return self.k[b, :, :h], self.v[b, :, :h], int(self.spilled[b])

    def prepare_import(self, batch: int, heads: int, head_dim: int, dtype, rows: list[dict]) -> None:
        probe = torch.zeros(batch, heads, 1, head_dim, dtype=dtype)
        self.lazy_initialization(probe, probe)
        self.reserve_hot(max(r["hot"] for r in rows) + 1)
        self.reserve_reps(max(r["blocks"] for r in rows))

    def import_row(self, b: int, row: dict, hot_k, hot_v, reps) -> None:
        self.reps[b, :, : row["blocks"]] = reps.to(self.reps.dtype)
        self.lengths[b] = row["length"]
        self.k[b, :, : row["hot"]] = hot_k
        self.v[b, :, : row["hot"]] = hot_v
        self.spilled[b] = row["spilled"]
        # (a memory saved all-in-RAM and loaded tiered spills its middle at the next update)

    def import_cold_block(self, key, data: bytes, src_cold: str) -> None:
        cold = self.owner.cold
        if cold.cold_dtype == src_cold:  # same encoding: the bytes go in as they are
            cold.put_encoded(key, data)
            return
        from .cold_store import decode_block

        H, _, D = self.k.shape[1:]
        kb, vb = decode_block(data, src_cold, H, self.owner.cfg.block_size, D, self.k.dtype)
        cold.put(key, kb, vb)

    # -- appending a chunk ------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cfg = self.owner.cfg
        S, R, sink = cfg.block_size, cfg.reps_per_block, cfg.sink_tokens
        n_new = self.owner.n_new
        C = key_states.shape[2]
        for b in range(key_states.shape[0]):
            n = int(n_new[b])
            if n == 0:
                continue
            self.spill(b)
            L, h = int(self.lengths[b]), self.hot_len(b)
            j0 = max(0, (L - sink) // S)
            self.reserve_hot(h + n)
            self.k[b, :, h:h + n] = key_states[b, :, C - n:]
            self.v[b, :, h:h + n] = value_states[b, :, C - n:]
            L += n
            self.lengths[b] = L
            done = max(0, (L - sink) // S)
            if done > j0:
                self.reserve_reps(done)
                s0 = self.hot_slot(b, sink + j0 * S)
                blk = self.k[b, :, s0:s0 + (done - j0) * S]
                H, _, D = blk.shape
                self.reps[b, :, j0:done] = blk.reshape(H, done - j0, R, S // R, D).float().mean(3).to(self.reps.dtype)
        return key_states, value_states

    def op_inputs(self, query: torch.Tensor, params: OpParams, bias: torch.Tensor | None):
        """The compact store the op reads for this chunk (see the module docstring).

        Returns (k, v, reps, lengths, bias, blocks) where ``blocks[b]`` maps the compact store's
        block indices back to the row's true block indices.
        """
        n_new = self.owner.n_new
        B, Hq, C, D = query.shape
        H, S = self.k.shape[1], params.block_size
        G = Hq // H
        cold, inv_freq = self.owner.cold, self.owner.inv_freq_on(query.device)
        rows = []
        for b in range(B):
            n, L = int(n_new[b]), int(self.lengths[b])
            if n == 0:
                rows.append(None)
                continue
            lay = row_layout(L - n, params)
            assert int(self.spilled[b]) == lay.nmid, "tail and layout disagree (spill not run?)"
            if lay.nmid == 0:
                U = torch.zeros(0, dtype=torch.long)
            elif lay.nsel == lay.nmid:
                U = torch.arange(lay.nmid)
            else:
                qbar = query[b, :, C - n:].reshape(H, G, n, D).float().mean(dim=(1, 2))
                scores = block_scores_half(qbar, self.reps[b, :, : lay.nmid], params.scaling,
                                           None if bias is None else bias[b, : lay.nmid])
                U = torch.unique(select_topk(scores, lay.nsel).cpu())
            u = int(U.numel())
            delta = (lay.nmid - u) * S
            t0 = self.hot_slot(b, lay.local_start) if lay.nmid else lay.s_end
            t1 = self.hot_len(b)
            s_end, m = lay.s_end, lay.s_end + u * S
            kc = self.k.new_empty(H, m + t1 - t0, D)
            vc = self.v.new_empty(H, m + t1 - t0, D)
            kc[:, :s_end], vc[:, :s_end] = self.k[b, :, :s_end], self.v[b, :, :s_end]
            kc[:, m:], vc[:, m:] = self.k[b, :, t0:t1], self.v[b, :, t0:t1]
            kblocks = kc[:, s_end:m].view(H, u, S, D)
            vblocks = vc[:, s_end:m].view(H, u, S, D)
            for i, j in enumerate(U.tolist()):
                kblocks[:, i], vblocks[:, i] = cold.get((self.layer_idx, b, j))
            # sinks by +delta, block j at compact slot i by (i - j) * S + delta, the tail not at all
            if delta and s_end:
                rerotate_blocks_(kc[:, None, :s_end], torch.tensor([delta]), inv_freq)
            if u:
                shifts = (torch.arange(u) - U) * S + delta
                if bool((shifts != 0).any()):
                    rerotate_blocks_(kblocks, shifts, inv_freq)
            rows.append((kc, vc, U))
        if B == 1 and rows[0] is not None:  # the common case: no padding copy
            kc, vc, U = rows[0]
            reps = self.reps[:, :, U].to(kc.dtype) if U.numel() else self.k.new_zeros(1, H, 1, self.reps.shape[3], D)
            cbias = None if bias is None else (bias[:, U] if U.numel() else bias.new_zeros(1, 1))
            return kc[None], vc[None], reps, torch.tensor([kc.shape[1]]), cbias, [U]
        Lc = max([r[0].shape[1] for r in rows if r is not None] + [1])
        nu = max([int(r[2].numel()) for r in rows if r is not None] + [1])
        R = self.reps.shape[3]
        k = self.k.new_zeros(B, H, Lc, D)
        v = self.v.new_zeros(B, H, Lc, D)
        reps = self.k.new_zeros(B, H, nu, R, D)
        lengths = torch.zeros(B, dtype=torch.long)
        cbias = None if bias is None else bias.new_zeros(B, nu)
        blocks = []
        for b, r in enumerate(rows):
            if r is None:
                blocks.append(None)
                continue
            kc, vc, U = r
            k[b, :, : kc.shape[1]] = kc
            v[b, :, : vc.shape[1]] = vc
            lengths[b] = kc.shape[1]
            if U.numel():
                reps[b, :, : U.numel()] = self.reps[b][:, U].to(k.dtype)
                if cbias is not None:
                    cbias[b, : U.numel()] = bias[b, U]
            blocks.append(U)
        return k, v, reps, lengths, cbias, blocks

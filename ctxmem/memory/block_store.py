"""One decoder layer's KV store, cut into blocks: the storage half of working memory.

Plain torch: this module knows no model and no transformers (``ctxmem.hf.cache`` adapts it to a
transformers ``Cache`` layer). Each row of the batch is stored *compacted*: padding tokens are never stored, so stored slot i
of a row is the row's i-th real token and its RoPE position is i. Storage grows by doubling (no
O(N) copy per decode step). When a block of ``block_size`` tokens completes, its representative
keys (means of ``reps_per_block`` equal sub-blocks) are computed once, for key scoring.

The owner (``BlockStore``) counts every token fed, padding included (what ``generate`` slices its
inputs by); the op reads the compacted per-row lengths kept here.
"""
from __future__ import annotations

import weakref

import torch

from ..ops import OpParams


def grown(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """A zero-filled copy of ``x`` with dimension ``dim`` enlarged to ``size`` (the old values first)."""
    shape = list(x.shape)
    old, shape[dim] = shape[dim], size
    buf = x.new_zeros(shape)
    buf.narrow(dim, 0, old).copy_(x)
    return buf


class BlockStoreLayer:
    """One decoder layer's KV store: keys/values [B, Hkv, cap, D] plus block representatives."""

    def __init__(self, owner):
        super().__init__()  # (the transformers layer mixin, in ctxmem.hf.cache's subclass)
        self.is_initialized = False
        # A weak proxy, not a reference: cache -> layer -> cache would be a cycle, and a cycle
        # holding GBs of tensors is freed only when the cyclic GC happens to run.
        self.owner = owner if isinstance(owner, weakref.ProxyType) else weakref.proxy(owner)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.reps: torch.Tensor | None = None  # [B, Hkv, cap_blocks, R, D]
        self.lengths = torch.zeros(0, dtype=torch.long)

    def lazy_initialization(self, key_states, value_states) -> None:
        B, H, _, D = key_states.shape
        cfg = self.owner.cfg
        self.device = key_states.device
        self.k = key_states.new_zeros(B, H, 0, D)
        self.v = value_states.new_zeros(B, H, 0, D)
        self.reps = key_states.new_zeros(B, H, 0, cfg.reps_per_block, D)
        self.lengths = torch.zeros(B, dtype=torch.long)
        self.is_initialized = True

    def reserve(self, need: int) -> None:
        """Room for ``need`` tokens per row (growing in place; old values kept)."""
        cap = self.k.shape[2]
        if need <= cap:
            return
        S = self.owner.cfg.block_size
        # A chunked read says how many tokens it will still add (owner.pending): make room for all
        # of them (and a block of answer) at once. Past that, grow by 1.25x: doubling could leave
        # half of a long context's buffer unused (an 8,192-token prompt and one generated token
        # took a 16,384-token buffer, 370 MB of fp32 KV for SmolLM2).
        ahead = int(self.lengths.max()) + self.owner.pending + S if self.lengths.numel() else 0
        new_cap = max(need, ahead, cap + cap // 4, 1024)
        new_cap = -(-new_cap // S) * S
        self.k, self.v = grown(self.k, 2, new_cap), grown(self.v, 2, new_cap)
        self.reps = grown(self.reps, 2, new_cap // S)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = self.owner.n_new
        C = key_states.shape[2]
        self.reserve(int((self.lengths + n_new).max()))
        cfg = self.owner.cfg
        S, R, sink = cfg.block_size, cfg.reps_per_block, cfg.sink_tokens
        for b in range(key_states.shape[0]):
            n = int(n_new[b])
            if n == 0:
                continue
            L = int(self.lengths[b])
            j0 = max(0, (L - sink) // S)  # blocks already complete (and summarised) before this chunk
            # left padding: the row's real tokens are the last n of the chunk
            self.k[b, :, L:L + n] = key_states[b, :, C - n:]
            self.v[b, :, L:L + n] = value_states[b, :, C - n:]
            L += n
            self.lengths[b] = L
            done = max(0, (L - sink) // S)
            if done > j0:
                blk = self.k[b, :, sink + j0 * S: sink + done * S]  # [H, (done-j0)*S, D]
                H, _, D = blk.shape
                self.reps[b, :, j0:done] = blk.reshape(H, done - j0, R, S // R, D).float().mean(3).to(blk.dtype)
        # The attention function reads the store directly; what we return is not used by it.
        return key_states, value_states

    def op_inputs(self, query: torch.Tensor, params: OpParams, bias: torch.Tensor | None):
        """What the fused op reads: the whole store (see ``TieredMemoryLayer`` for the bounded one)."""
        return self.k, self.v, self.reps, self.lengths, bias, None

    def reset(self) -> None:
        self.__init__(self.owner)

    # -- rows in and out (save / load); the tiered layer overrides these ----------------------------
    def export_row(self, b: int):
        """Row ``b`` as ``(hot_k, hot_v, spilled)``: the keys/values kept in RAM ([H, hot, D]) and how
        many middle blocks after the sinks live in the cold store instead (none here)."""
        L = int(self.lengths[b])
        return self.k[b, :, :L], self.v[b, :, :L], 0

    def prepare_import(self, batch: int, heads: int, head_dim: int, dtype, rows: list[dict]) -> None:
        """Empty buffers sized for ``rows`` (the manifest's per-row length, hot, blocks, spilled)."""
        probe = torch.zeros(batch, heads, 1, head_dim, dtype=dtype)
        self.lazy_initialization(probe, probe)
        self.reserve(max(r["length"] for r in rows) + 1)

    def import_row(self, b: int, row: dict, hot_k, hot_v, reps) -> None:
        """Row ``b`` from what ``export_row`` gave (its cold blocks follow through ``import_cold_block``)."""
        S, sink = self.owner.cfg.block_size, self.owner.cfg.sink_tokens
        L = row["length"]
        self.reps[b, :, : row["blocks"]] = reps.to(self.reps.dtype)
        self.lengths[b] = L
        # hot = sinks + tail; the cold blocks go between them
        s0 = min(sink, L)
        self.k[b, :, :s0], self.v[b, :, :s0] = hot_k[:, :s0], hot_v[:, :s0]
        t0 = sink + row["spilled"] * S
        self.k[b, :, t0:L] = hot_k[:, s0:]
        self.v[b, :, t0:L] = hot_v[:, s0:]

    def import_cold_block(self, key, data: bytes, src_cold: str) -> None:
        """A block that was in the cold store when saved (``key`` = (layer, row, block)): decoded into place."""
        from .cold_store import decode_block

        _, b, j = key
        H, _, D = self.k.shape[1:]
        S = self.owner.cfg.block_size
        kb, vb = decode_block(data, src_cold, H, S, D, self.k.dtype)
        p = self.owner.cfg.sink_tokens + j * S
        self.k[b, :, p:p + S], self.v[b, :, p:p + S] = kb, vb

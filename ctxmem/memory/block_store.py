"""Working memory as a transformers ``Cache``: per-layer KV stores cut into blocks.

Each row of the batch is stored *compacted*: padding tokens are never stored, so stored slot i
of a row is the row's i-th real token and its RoPE position is i. Storage grows by doubling (no
O(N) copy per decode step). When a block of ``block_size`` tokens completes, its representative
keys (means of ``reps_per_block`` equal sub-blocks) are computed once, for key scoring.

The HF-facing length (``get_seq_length``) counts every token fed, padding included, because
that is what ``generate`` slices its inputs by; the op reads the compacted per-row lengths.
"""
from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..config import MemoryConfig
from ..ops import OpParams, middle_blocks
from .text_index import BlockTextIndex


def grown(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """A zero-filled copy of ``x`` with dimension ``dim`` enlarged to ``size`` (the old values first)."""
    shape = list(x.shape)
    old, shape[dim] = shape[dim], size
    buf = x.new_zeros(shape)
    buf.narrow(dim, 0, old).copy_(x)
    return buf


class BlockMemoryLayer(CacheLayerMixin):
    """One decoder layer's KV store: keys/values [B, Hkv, cap, D] plus block representatives."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: "MemoryCache"):
        super().__init__()
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

    def _grow(self, need: int) -> None:
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
        self._grow(int((self.lengths + n_new).max()))
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

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.owner)

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("ctxmem working memory does not support beam search yet")


class MemoryCache(Cache):
    """The working-memory cache ``wrap`` gives the model (one per ``generate`` call or context).

    Besides the per-layer stores it keeps each row's token ids (the block text the embedder reads)
    and the state of the chunk being processed (real-token counts, embedder bias, phase).
    """

    def __init__(self, num_layers: int, cfg: MemoryConfig, inv_freq: torch.Tensor,
                 tokenizer=None, embedder=None):
        if cfg.ram_budget is None:
            layers = [BlockMemoryLayer(self) for _ in range(num_layers)]
        else:
            from ._malloc import pin_malloc_thresholds
            from .tiered import TieredMemoryLayer
            pin_malloc_thresholds()  # a RAM bound asked for: keep freed blocks returnable to the OS
            layers = [TieredMemoryLayer(self, i) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.cfg = cfg
        self.cold = None  # ColdBlockStore, created with the first tiered layer
        self.inv_freq = inv_freq.detach().float().cpu()
        self.seen = 0  # tokens fed so far, padding included (the HF view)
        self.pending = 0  # tokens the read in progress has still to add (sizes the KV buffers)
        self.hidden_prefix: list[int] | None = None  # knowledge tokens read before the prompt, per row
        self.token_ids: list[list[int]] = []
        self.n_new = torch.zeros(0, dtype=torch.long)
        self.bias: torch.Tensor | None = None
        self.topk = cfg.topk_blocks
        self.local = cfg.local_tokens
        self.text_index = BlockTextIndex(tokenizer, embedder) if (tokenizer is not None and embedder is not None) else None
        self.last_selection: dict[int, torch.Tensor] = {}
        self.record_selection = False
        self._on_device: dict = {}  # (name, device) -> a copy made once (inv_freq) or once per chunk (bias)

    def _device_copy(self, name: str, x: torch.Tensor | None, device) -> torch.Tensor | None:
        """``x`` on ``device``, copied once and reused by every layer: a copy per layer from pageable
        host memory would synchronise the GPU stream 2 x layers times per decode step."""
        if x is None or x.device == torch.device(device):
            return x
        key = (name, str(device))
        hit = self._on_device.get(key)
        if hit is None:
            hit = self._on_device[key] = x.to(device)
        return hit

    def inv_freq_on(self, device) -> torch.Tensor:
        return self._device_copy("inv_freq", self.inv_freq, device)

    def bias_on(self, device) -> torch.Tensor | None:
        """This chunk's embedder bias on ``device`` (``begin_chunk`` sets a new one)."""
        return self._device_copy("bias", self.bias, device)

    # -- HF Cache interface -------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("ctxmem working memory does not support beam search yet")

    # -- the cold tier (ram_budget set) ------------------------------------------------------
    @property
    def tiered(self) -> bool:
        return self.cfg.ram_budget is not None

    def reps_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Representatives stay in RAM for every block: half precision unless blocks are exact."""
        return dtype if self.cfg.cold_dtype == "fp32" else torch.float16

    def cold_store(self, H: int, D: int, dtype: torch.dtype):
        if self.cold is None:
            from .cold_store import ColdBlockStore
            self.cold = ColdBlockStore(H, self.cfg.block_size, D, dtype, self.cfg.cold_dtype,
                                       self.cfg.ram_budget_bytes, self.cfg.offload_dir)
        return self.cold

    # -- chunk bookkeeping (called by the wrapped forward) --------------------------------
    @property
    def batch_size(self) -> int:
        return len(self.token_ids)

    def real_lengths(self) -> list[int]:
        return [len(r) for r in self.token_ids]

    def op_params(self, scaling: float) -> OpParams:
        c = self.cfg
        return OpParams(c.block_size, self.topk, c.sink_tokens, self.local, float(scaling))

    def begin_chunk(self, ids: torch.Tensor | None, valid: torch.Tensor, question: bool) -> None:
        """Record the chunk's real tokens and choose this chunk's retrieval mode.

        ``question`` chunks (the end of the prompt, and every decode step) retrieve with the full
        ``topk_blocks`` and, when the embed selector is on, the embedder's votes; body chunks use
        ``prefill_topk`` key-scored blocks and a local window of ``prefill_local`` tokens.
        """
        B, C = valid.shape
        if not self.token_ids:
            self.token_ids = [[] for _ in range(B)]
        elif B != self.batch_size:
            raise ValueError(f"batch size changed from {self.batch_size} to {B} within one ctxmem cache")
        self.n_new = valid.sum(1).to(torch.long).cpu()
        t_before = self.real_lengths()
        for b in range(B):
            n = int(self.n_new[b])
            if n:
                self.token_ids[b].extend(ids[b, C - n:].tolist() if ids is not None else [-1] * n)
        self.topk = self.cfg.topk_blocks if question else self.cfg.body_topk
        self.local = self.cfg.local_tokens if question else self.cfg.body_local
        self.bias = None
        self._on_device = {k: v for k, v in self._on_device.items() if k[0] != "bias"}
        if question and self.text_index is not None and self.topk > 0:
            self.bias, voted = self._embedder_bias(t_before)
            if self.cfg.embed_margin is not None and voted:
                # attend only the blocks the embedder chose (the widest row's count), no key-scored fill
                self.topk = min(self.topk, voted)

    def end_chunk(self, fed: int) -> None:
        self.seen += fed

    def _embedder_bias(self, t_before: list[int]) -> tuple[torch.Tensor | None, int]:
        """(bias [B, nb] or None, blocks voted in the widest row; 0 when some row got no vote)."""
        cfg = self.cfg
        probe = self.op_params(1.0)
        rows, voted = [], []
        for b, t in enumerate(t_before):
            nmid = middle_blocks(t, probe)
            if nmid <= self.topk or -1 in self.token_ids[b][:1]:
                rows.append(None)  # everything fits, or no text (inputs_embeds): nothing to vote on
                continue
            bias, n = self.text_index.vote(
                b, self.token_ids[b], nmid, cfg.sink_tokens, cfg.block_size, query_tokens=cfg.query_tokens,
                hits=cfg.embed_hits, neighbors=cfg.embed_neighbors, margin=cfg.embed_margin)
            rows.append(bias)
            voted.append(n)
        if all(r is None for r in rows):
            return None, 0
        nb = max(len(r) for r in rows if r is not None)
        bias = torch.zeros(len(rows), nb)
        for b, r in enumerate(rows):
            if r is not None:
                bias[b, : len(r)] = r
        # a row that did not vote keeps the full topk (it may need every block it has)
        return bias, (max(voted) if len(voted) == len(rows) else 0)

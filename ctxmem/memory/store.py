"""``BlockStore``: working memory's storage, every layer's KV blocks and the chunk being read.

Plain torch (no transformers, no model): ``ctxmem.hf.cache.MemoryCache`` makes it a transformers
``Cache`` and owns the op call. Save and load: ``persist.py``.
"""
from __future__ import annotations

import torch

from ..config import MemoryConfig
from ..ops import OpParams, middle_blocks
from ._malloc import pin_malloc_thresholds
from .block_store import BlockStoreLayer
from .text_index import BlockTextIndex
from .tiered import TieredStoreLayer


class BlockStore:
    """Working memory's storage: one ``BlockStoreLayer`` per decoder layer (``TieredStoreLayer`` with
    a RAM budget), each row's token ids (the block text the embedder reads) and the state of the chunk
    being read (real-token counts, embedder bias, phase). ``ctxmem.hf.MemoryCache`` is this store as a
    transformers ``Cache``; subclasses choose the layer classes through ``layer_cls`` / ``tiered_layer_cls``.
    """

    layer_cls = BlockStoreLayer
    tiered_layer_cls = TieredStoreLayer

    def __init__(self, num_layers: int, cfg: MemoryConfig, inv_freq: torch.Tensor,
                 tokenizer=None, embedder=None):
        if cfg.ram_budget is None:
            self.layers = [self.layer_cls(self) for _ in range(num_layers)]
        else:
            pin_malloc_thresholds()  # a RAM bound asked for: keep freed blocks returnable to the OS
            self.layers = [self.tiered_layer_cls(self, i) for i in range(num_layers)]
        self.cfg = cfg
        self.cold = None  # ColdBlockStore, created with the first tiered layer
        self.inv_freq = inv_freq.detach().float().cpu()
        self.seen = 0  # tokens fed so far, padding included (the HF view)
        self.pending = 0  # tokens the read in progress has still to add (sizes the KV buffers)
        # tokens read that the HF view does not count, per row: the knowledge prefix read before the
        # prompt, and passages read again before a question (``MemoryConfig.reread_tokens``)
        self.hidden_prefix: list[int] | None = None
        self.reread_from: list[int] | None = None  # where each row's reread passages start (token index)
        self.reread_width = 0  # passages + question of the widest row: decode's local window stretches over them
        self.reread_ids: list[list[int]] | None = None  # the latest question's reread passages, per row
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
        self.topk = self.cfg.topk_blocks if question else self.cfg.prefill_topk_blocks
        self.local = self.cfg.local_tokens if question else self.cfg.prefill_local_tokens
        if question and self.reread_from is not None and not self.tiered:
            # decode steps after a reread keep the passages and the question in their local window
            # (MemoryConfig.reread_budget keeps that inside the trained window); later it slides as usual.
            # (The bounded-RAM tier spills by one fixed window: there decode finds them by retrieval.)
            cap = self.cfg.local_tokens + self.reread_width
            since = max(t - r for t, r in zip(t_before, self.reread_from))
            self.local = max(self.local, min(since, cap))
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

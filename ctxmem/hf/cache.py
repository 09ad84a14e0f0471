"""``MemoryCache``: working memory's ``BlockStore`` as a transformers ``Cache``, and the op call.

The storage (``ctxmem.memory``) knows no model; this module adds what transformers asks of a cache
(lengths as ``generate`` counts them, no beam search) and ``attend``: the fused retrieval-attention
op over one layer's store, which the registered attention function (``attention.py``) calls.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..memory import BlockStore, BlockStoreLayer, TieredStoreLayer
from ..ops import retrieval_attention


def rope_inv_freq(model) -> torch.Tensor:
    """The RoPE frequencies of the layers that retrieve (global attention): ``rotary_emb.inv_freq``, or
    gemma3's ``full_attention_inv_freq`` (its sliding layers rotate with another base, but keep their
    window exactly and are never re-rotated). ``R/2`` entries for ``R`` rotated dims (partial rotary)."""
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    for name in ("inv_freq", "full_attention_inv_freq"):
        inv = getattr(rot, name, None)
        if isinstance(inv, torch.Tensor):
            return inv
    raise ValueError(f"ctxmem: {type(model).__name__} has no .model.rotary_emb.inv_freq (or full_attention_inv_freq); "
                     "ctxmem re-rotates stored keys and needs the model's RoPE frequencies")


class MemoryLayer(BlockStoreLayer, CacheLayerMixin):
    """A ``BlockStoreLayer`` that transformers accepts as a cache layer."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("ctxmem working memory does not support beam search yet")


class TieredMemoryLayer(TieredStoreLayer, MemoryLayer):
    """The bounded-RAM layer (``ram_budget``), as a transformers cache layer."""


class MemoryCache(BlockStore, Cache):
    """The working-memory cache ``wrap`` gives the model (one per ``generate`` call or context).

    The HF-facing length (``get_seq_length``) counts every token fed, padding included, because that
    is what ``generate`` slices its inputs by; the op reads the compacted per-row lengths.
    """

    layer_cls = MemoryLayer
    tiered_layer_cls = TieredMemoryLayer

    def __init__(self, num_layers: int, cfg, inv_freq: torch.Tensor, tokenizer=None, embedder=None):
        BlockStore.__init__(self, num_layers, cfg, inv_freq, tokenizer=tokenizer, embedder=embedder)
        Cache.__init__(self, layers=self.layers)
        self.backends_run: dict[str, int] = {}  # which op backend ran, and how many times (layer calls)
        self.nope_freq = torch.zeros_like(self.inv_freq)  # a NoPE layer's frequencies: moving is the identity

    # -- transformers' Cache interface ---------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("ctxmem working memory does not support beam search yet")

    # -- the op ------------------------------------------------------------------------------------
    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float, window: int | None = None,
               softcap: float | None = None, rope: bool = True) -> torch.Tensor:
        """Retrieval attention of ``query [B, Hq, C, D]`` over layer ``layer_idx``'s store (its keys for
        this chunk already appended); returns ``[B, C, Hq, D]`` as transformers' attention functions do.
        ``window``: a sliding-window layer (exact window attention, no retrieval); ``softcap``: logit
        soft-capping (see ``ctxmem.ops.layout``); ``rope=False``: a NoPE layer (its keys carry no rotation,
        so the op moves them with zero frequencies: the identity)."""
        layer = self.layers[layer_idx]
        params = self.op_params(scaling)
        if window is not None or softcap is not None:
            params = dataclasses.replace(params, window=None if window is None else int(window),
                                         softcap=None if softcap is None else float(softcap))
        k, v, reps, lengths, bias, blocks = layer.op_inputs(query, params, self.bias_on(query.device))
        out, selected, ran = retrieval_attention(
            query, k, v, reps, lengths, self.n_new, params,
            self.inv_freq_on(query.device) if rope else self._device_copy("nope", self.nope_freq, query.device), bias,
            backend=self.cfg.backend, report=True)
        self.backends_run[ran] = self.backends_run.get(ran, 0) + 1
        if self.record_selection:
            if blocks is not None:  # a compact store: map its block indices back to the row's
                for b, U in enumerate(blocks):
                    if U is not None and U.numel():
                        sel = selected[b]
                        selected[b] = torch.where(sel >= 0, U.to(sel.device)[sel.clamp(min=0)], sel)
            self.last_selection[layer_idx] = selected
        return out.transpose(1, 2).contiguous()

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
from ..memory.block_store import grown
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


def sliding_layers(mc) -> list[int]:
    """Layers the config calls sliding-window (they keep their window exactly and never retrieve)."""
    n = int(getattr(mc, "num_hidden_layers", 0))
    lt = getattr(mc, "layer_types", None)
    if lt:
        return [i for i, t in enumerate(lt) if t == "sliding_attention"]
    return list(range(n)) if getattr(mc, "sliding_window", None) else []


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

    # -- a sliding-window layer keeps only what its window reads ---------------------------------
    # ``MemoryCache.attend`` tells the layer its window (the module passes it with every call). From
    # the next update on, the layer stores each row's keys from ``start[b]`` on (``kept[b]`` of them,
    # contiguous true positions; at least the last window - 1 before a chunk), in a buffer of about
    # 2 * (window + chunk) slots: when an append would overflow it, the last window - 1 keys move to
    # the front (amortised O(1) per token). ``lengths`` stays the true length (what persistence and
    # the block layout count); the op gets ``kept`` (positions are relative: a window layer has no
    # re-rotation, and the query of row b sits right after its kept keys).
    window: int | None = None
    kept: torch.Tensor | None = None
    start: torch.Tensor | None = None
    # The config calls this layer sliding: until the module confirms its window (first attend), grow the
    # store as needed instead of reserving the whole read ahead (which the window would then discard).
    maybe_window: bool = False

    def reserve(self, need: int) -> None:
        if not (self.maybe_window and self.window is None):
            return super().reserve(need)
        cap = self.k.shape[2]
        if need <= cap:
            return
        S = self.owner.cfg.block_size
        new_cap = -(-max(need, cap + cap // 4, 64) // S) * S
        self.k, self.v = grown(self.k, 2, new_cap), grown(self.v, 2, new_cap)
        self.reps = grown(self.reps, 2, new_cap // S)

    def set_window(self, window: int) -> None:
        self.window = int(window)

    @property
    def reps(self):
        """Block representatives; a window layer has none to read (zeros, a view of one value, as many
        blocks as its true length holds: what persistence writes for every layer)."""
        if self.kept is None:
            return self._reps
        B, H, _, D = self.k.shape
        cfg = self.owner.cfg
        nb = max(0, (int(self.lengths.max()) - cfg.sink_tokens) // cfg.block_size) + 1
        return self._reps.new_zeros(()).expand(B, H, nb, self._reps.shape[3], D)

    @reps.setter
    def reps(self, value) -> None:
        self._reps = value

    def update(self, key_states, value_states, *args, **kwargs):
        if self.window is None or not self.is_initialized:
            return super().update(key_states, value_states, *args, **kwargs)
        if self.kept is None:  # the first chunk went to the full store: from now on keep the window only
            self.kept, self.start = self.lengths.clone(), torch.zeros_like(self.lengths)
            self._reps = self._reps[:, :, :0]  # never read by a window layer
            self._trim(key_states.shape[2], shrink=True)
        n_new = self.owner.n_new
        C = key_states.shape[2]
        if int((self.kept + n_new).max()) > self.k.shape[2]:
            self._trim(C)
        for b in range(key_states.shape[0]):
            n = int(n_new[b])
            if n == 0:
                continue
            kb = int(self.kept[b])
            self.k[b, :, kb:kb + n] = key_states[b, :, C - n:]
            self.v[b, :, kb:kb + n] = value_states[b, :, C - n:]
            self.kept[b] = kb + n
            self.lengths[b] += n
        return key_states, value_states

    def _trim(self, chunk: int, shrink: bool = False) -> None:
        """Keep each row's last window - 1 keys, at the front of a buffer with room for more chunks."""
        keep = self.window - 1
        B, H, cap, D = self.k.shape
        new_cap = max(2 * (keep + chunk), 64)
        for b in range(B):
            kb = int(self.kept[b])
            drop = max(0, kb - keep)
            if drop:
                self.k[b, :, : kb - drop] = self.k[b, :, drop:kb].clone()
                self.v[b, :, : kb - drop] = self.v[b, :, drop:kb].clone()
                self.kept[b] = kb - drop
                self.start[b] += drop
        if shrink or new_cap > cap:
            n = min(cap, new_cap)
            k, v = self.k.new_zeros(B, H, new_cap, D), self.v.new_zeros(B, H, new_cap, D)
            k[:, :, :n], v[:, :, :n] = self.k[:, :, :n], self.v[:, :, :n]
            self.k, self.v = k, v

    def op_inputs(self, query: torch.Tensor, params, bias: torch.Tensor | None):
        if self.kept is None:
            return super().op_inputs(query, params, bias)
        reps = self.k.new_zeros(self.k.shape[0], self.k.shape[1], 1, self.owner.cfg.reps_per_block, self.k.shape[3])
        return self.k, self.v, reps, self.kept.clone(), bias, None

    def export_row(self, b: int):
        """The row at its true positions (what persistence writes): keys before ``start`` are zeros, never
        read by the window layer that dropped them."""
        if self.kept is None:
            return super().export_row(b)
        L, s0, kb = int(self.lengths[b]), int(self.start[b]), int(self.kept[b])
        H, D = self.k.shape[1], self.k.shape[3]
        k, v = self.k.new_zeros(H, L, D), self.v.new_zeros(H, L, D)
        k[:, s0:], v[:, s0:] = self.k[b, :, :kb], self.v[b, :, :kb]
        return k, v, 0

    def reset(self) -> None:
        self.window = self.kept = self.start = None
        super().reset()


class TieredMemoryLayer(TieredStoreLayer, MemoryLayer):
    """The bounded-RAM layer (``ram_budget``), as a transformers cache layer."""


class MemoryCache(BlockStore, Cache):
    """The working-memory cache ``wrap`` gives the model (one per ``generate`` call or context).

    The HF-facing length (``get_seq_length``) counts every token fed, padding included, because that
    is what ``generate`` slices its inputs by; the op reads the compacted per-row lengths.
    """

    layer_cls = MemoryLayer
    tiered_layer_cls = TieredMemoryLayer

    def __init__(self, num_layers: int, cfg, inv_freq: torch.Tensor, tokenizer=None, embedder=None,
                 window_layers=()):
        BlockStore.__init__(self, num_layers, cfg, inv_freq, tokenizer=tokenizer, embedder=embedder)
        for i in window_layers:  # (see MemoryLayer.maybe_window)
            if isinstance(self.layers[i], MemoryLayer) and not isinstance(self.layers[i], TieredMemoryLayer):
                self.layers[i].maybe_window = True
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
        if isinstance(layer, TieredMemoryLayer) and (window is not None or not rope):
            raise ValueError(f"ctxmem: layer {layer_idx} is a {'sliding-window' if window is not None else 'NoPE'} layer, "
                             "which the bounded-RAM store (ram_budget) does not support yet; leave ram_budget unset")
        if window is not None and getattr(layer, "window", None) != window and hasattr(layer, "set_window"):
            layer.set_window(window)  # from its next update the layer stores only what the window reads
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

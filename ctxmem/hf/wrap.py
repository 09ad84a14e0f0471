"""``ctxmem.wrap(model)``: give a stock HF causal LM working memory, in place; ``unwrap`` undoes it.

What wrapping changes, and nothing else:
  * ``model.config._attn_implementation`` becomes "ctxmem" (registered through transformers'
    AttentionInterface and AttentionMaskInterface; no modeling file is forked);
  * ``model.forward`` (an instance attribute shadowing the class method) reads long inputs in
    chunks of ``prefill_chunk`` tokens through a ``MemoryCache``, so ``model(...)`` and
    ``model.generate(...)`` work unchanged at any context length.
``unwrap`` deletes the attribute and restores the attention implementation, so the stock model
is back bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import MemoryConfig
from ..memory import MemoryCache
from . import attention

# Families whose attention modules follow the llama pattern (RoPE'd q/k -> cache.update ->
# attention interface) and that the test suite checks against stock sdpa.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
# RoPE variants that are a pure rotation by position * inv_freq (re-rotation by a delta is exact).
PURE_ROTATION_ROPE = ("default", "linear", "llama3")


@dataclass
class WrapState:
    cfg: MemoryConfig
    orig_attn: str
    tokenizer: Any = None
    embedder: Any = None
    knowledge: Any = None
    knowledge_budget: int = 1024
    progress: bool = False
    last_memory: Any = None  # the MemoryCache of the latest forward (what save_memory saves by default)


def _rope_type(mc) -> str:
    params = getattr(mc, "rope_parameters", None) or getattr(mc, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def _check_model(model, cfg: MemoryConfig) -> None:
    mc = model.config
    family = getattr(mc, "model_type", type(model).__name__)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"ctxmem.wrap: model family {family!r} is not supported yet; supported: "
            f"{', '.join(SUPPORTED_FAMILIES)}. (Other families may store or rotate keys differently, "
            "and ctxmem refuses rather than answer wrongly.)")
    if getattr(model, "model", None) is None or getattr(model.model, "rotary_emb", None) is None:
        raise ValueError(f"ctxmem.wrap: expected a *ForCausalLM with .model.rotary_emb, got {type(model).__name__}")
    rt = _rope_type(mc)
    if rt not in PURE_ROTATION_ROPE:
        raise ValueError(f"ctxmem.wrap: rope_type {rt!r} is not a pure rotation; supported: {PURE_ROTATION_ROPE}")
    window = getattr(mc, "max_position_embeddings", None)
    if window is not None and cfg.span() > window:
        raise ValueError(
            f"ctxmem.wrap: this MemoryConfig lets a query see keys up to {cfg.span()} positions back "
            f"(sink + topk*block + local + block + chunk), past the model's trained window ({window}); "
            "lower topk_blocks, local_tokens or prefill_chunk")


def wrap(model, config: MemoryConfig | None = None, *, tokenizer=None, embedder=None,
         knowledge=None, knowledge_budget: int = 1024, progress: bool = False):
    """Give ``model`` ctxmem working memory in place and return it.

    tokenizer / embedder: used by the "embed" block selector (defaults: the tokenizer that
    ``ctxmem.load_model`` attached, and ``config.embedder``). knowledge: a KB folder or a
    ``KnowledgeIndex``; its hits for the prompt are read before the prompt (see README).
    progress: show a progress bar (tokens/s, ETA) while reading inputs longer than one chunk.
    """
    if getattr(model, "_ctxmem", None) is not None:
        raise ValueError("ctxmem.wrap: model is already wrapped; call ctxmem.unwrap(model) first")
    cfg = config if config is not None else MemoryConfig()
    cfg.validate()
    _check_model(model, cfg)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "ctxmem_tokenizer", None)
    selector = cfg.selector
    if selector == "auto":
        selector = "embed" if tokenizer is not None else "keys"
    if selector == "embed":
        if tokenizer is None:
            raise ValueError("ctxmem.wrap: selector='embed' needs the tokenizer (pass tokenizer=...)")
        if embedder is None:
            from ..models import load_embedder
            embedder = load_embedder(cfg.embedder)
    else:
        embedder = None
    if knowledge is not None and tokenizer is None:
        raise ValueError("ctxmem.wrap: knowledge=... needs the tokenizer (pass tokenizer=...)")
    if isinstance(knowledge, str) or hasattr(knowledge, "__fspath__"):
        from ..index import KnowledgeIndex
        knowledge = KnowledgeIndex.open(knowledge)

    attention.register()
    state = WrapState(cfg=cfg, orig_attn=model.config._attn_implementation, tokenizer=tokenizer,
                      embedder=embedder, knowledge=knowledge, knowledge_budget=knowledge_budget,
                      progress=progress)
    model.set_attn_implementation(attention.NAME)
    model.forward = _make_forward(model, state)
    model._ctxmem = state
    return model


def unwrap(model):
    """Restore the stock model (attention implementation and forward) and return it."""
    state = getattr(model, "_ctxmem", None)
    if state is None:
        raise ValueError("ctxmem.unwrap: model is not wrapped")
    del model.forward
    model.set_attn_implementation(state.orig_attn)
    del model._ctxmem
    return model


def new_cache(model) -> MemoryCache:
    """A fresh working memory for a wrapped model (``generate`` makes one by itself)."""
    state = model._ctxmem
    return MemoryCache(model.config.num_hidden_layers, state.cfg, model.model.rotary_emb.inv_freq,
                       tokenizer=state.tokenizer, embedder=state.embedder)


def read_memory(model, input_ids: torch.Tensor, memory: MemoryCache | None = None,
                attention_mask: torch.Tensor | None = None) -> MemoryCache:
    """Read tokens into working memory without generating; returns the memory.

    Continue from it with ``model.generate(all_ids, cache=memory)`` (``all_ids`` = the
    tokens read so far followed by the new ones), or keep it with ``ctxmem.save_memory``.
    """
    if getattr(model, "_ctxmem", None) is None:
        raise ValueError("ctxmem.read_memory: the model is not wrapped (ctxmem.wrap(model) first)")
    memory = memory if memory is not None else new_cache(model)
    if attention_mask is not None and memory.seen:
        raise ValueError("ctxmem.read_memory: pass attention_mask only for the first read into a memory")
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, cache=memory, logits_to_keep=1)
    return out.cache


def _chunk_bounds(L: int, chunk: int) -> list[tuple[int, int]]:
    """Split [0, L) into chunks, cut from the end so the last chunk (the question) is full."""
    bounds, e = [], L
    while e > 0:
        s = max(0, e - chunk)
        bounds.append((s, e))
        e = s
    return bounds[::-1]


def _check_padding(valid: torch.Tensor, had_tokens: list[int]) -> None:
    if valid.shape[1] > 1 and bool((valid[:, 1:].int() < valid[:, :-1].int()).any()):
        raise ValueError("ctxmem: attention_mask must be left padding only (a row has a pad after a real token)")
    for b, n in enumerate(had_tokens):
        if n and not bool(valid[b].all()):
            raise ValueError(f"ctxmem: row {b} has padding after real tokens (left padding only)")


def _positions(had: list[int], valid: torch.Tensor) -> torch.Tensor:
    """Each row's real tokens numbered from its own start (as generate does from the mask)."""
    return (torch.tensor(had)[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)


def _make_forward(model, state: WrapState):
    orig_forward = type(model).forward.__get__(model)
    cfg = state.cfg

    def read(cache, input_ids, inputs_embeds, valid, *, question: bool, counted: bool, keep_all: bool,
             keep: int, kwargs: dict, progress_desc: str | None = None):
        """Feed tokens chunk by chunk through the model into ``cache``; return the kept logits.

        ``question``: the last chunk retrieves as a question (full topk, embedder votes).
        ``counted``: the tokens count in the HF-visible length (False for the hidden knowledge prefix).
        """
        x = input_ids if input_ids is not None else inputs_embeds
        L = x.shape[1]
        pos = _positions(cache.real_lengths() if cache.token_ids else [0] * x.shape[0], valid).to(x.device)
        bounds = _chunk_bounds(L, cfg.prefill_chunk)
        bar = None
        if state.progress and len(bounds) > 1:
            from tqdm.auto import tqdm
            bar = tqdm(total=L, unit="tok", unit_scale=True, desc=progress_desc or "ctxmem: reading", leave=False)
        parts = []
        for i, (s, e) in enumerate(bounds):
            last = i == len(bounds) - 1
            cache.begin_chunk(None if input_ids is None else input_ids[:, s:e].cpu(), valid[:, s:e],
                              question=question and last)
            inputs = dict(input_ids=input_ids[:, s:e]) if input_ids is not None else dict(inputs_embeds=inputs_embeds[:, s:e])
            with attention.active_memory(cache):
                out = orig_forward(**inputs, attention_mask=None, position_ids=pos[:, s:e], cache=cache,
                                   use_cache=True, logits_to_keep=0 if keep_all else (keep if last else 1), **kwargs)
            cache.end_chunk(e - s if counted else 0)
            if bar is not None:
                bar.update(e - s)
            if keep_all or last:
                parts.append(out.logits)
        if bar is not None:
            bar.close()
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def read_knowledge(cache, input_ids, valid, kwargs):
        """Before the first prompt: retrieve the KB's hits for each row and read them as a hidden prefix."""
        from ..index.augment import knowledge_context

        tok = state.tokenizer
        rows = []
        for b in range(input_ids.shape[0]):
            real = input_ids[b][valid[b]].tolist()
            query = tok.decode(real[-256:], skip_special_tokens=True)
            text = knowledge_context(state.knowledge, query, tok, budget_tokens=state.knowledge_budget)
            rows.append(tok(text + "\n\n", add_special_tokens=False)["input_ids"] if text else [])
        P = max(len(r) for r in rows)
        if P == 0:
            return
        ids = torch.zeros(len(rows), P, dtype=torch.long)
        pvalid = torch.zeros(len(rows), P, dtype=torch.bool)
        for b, r in enumerate(rows):
            if r:
                ids[b, P - len(r):] = torch.tensor(r)
                pvalid[b, P - len(r):] = True
        read(cache, ids.to(input_ids.device), None, pvalid, question=False, counted=False, keep_all=False,
             keep=1, kwargs=kwargs, progress_desc="ctxmem: reading knowledge")
        cache.hidden_prefix = [len(r) for r in rows]

    def forward(input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        x = input_ids if input_ids is not None else inputs_embeds
        if x is None:
            raise ValueError("ctxmem: pass input_ids or inputs_embeds")
        B, L = x.shape[:2]
        if L == 0:
            raise ValueError("ctxmem: empty input (zero tokens)")
        if not isinstance(cache, MemoryCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(f"ctxmem: a wrapped model keeps its context in a MemoryCache, got a non-empty "
                                 f"{type(cache).__name__}")
            cache = new_cache(model)
        state.last_memory = cache
        past = cache.seen
        if attention_mask is None:
            valid = torch.ones(B, L, dtype=torch.bool)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape != (B, past + L):
                raise ValueError(f"ctxmem: attention_mask must be 2-D [batch, past + new] = [{B}, {past + L}], "
                                 f"got {tuple(attention_mask.shape)}")
            valid = attention_mask[:, -L:].bool().cpu()
        had = cache.real_lengths() if cache.token_ids else [0] * B
        _check_padding(valid, had)
        total = max(h + int(n) for h, n in zip(had, valid.sum(1)))
        if total > cfg.max_context:
            raise ValueError(f"ctxmem: context of {total} tokens exceeds MemoryConfig.max_context ({cfg.max_context})")
        if position_ids is not None:
            # what generate passes; it does not know about a hidden knowledge prefix
            offset = torch.tensor(cache.hidden_prefix or [0] * B)[:, None]
            pos = _positions([h - o for h, o in zip(had, offset[:, 0].tolist())], valid)
            if not bool((position_ids.expand(B, -1).cpu()[valid] == pos[valid]).all()):
                raise ValueError("ctxmem: position_ids must count each row's real tokens 0, 1, 2, ... "
                                 "(as generate does); leave them None and ctxmem numbers them")
        if state.knowledge is not None and not cache.token_ids and input_ids is not None:
            read_knowledge(cache, input_ids, valid, kwargs)
        keep = logits_to_keep
        keep_all = isinstance(keep, torch.Tensor) or labels is not None or keep == 0
        if not keep_all:
            s, e = _chunk_bounds(L, cfg.prefill_chunk)[-1]
            keep_all = keep > e - s  # asks for more than the last chunk holds
        logits = read(cache, input_ids, inputs_embeds, valid, question=True, counted=True, keep_all=keep_all,
                      keep=0 if keep_all else keep, kwargs=kwargs)
        loss = None
        if labels is not None:
            loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size)
        if isinstance(keep, torch.Tensor) or (keep_all and keep != 0):
            logits = logits[:, keep] if isinstance(keep, torch.Tensor) else logits[:, -keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache is not False else None)

    forward.__doc__ = f"ctxmem-wrapped forward of {type(model).__name__} (see ctxmem.hf.wrap)."
    return forward

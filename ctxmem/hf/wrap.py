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

import os
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
# What a summary token (compressed knowledge) stands for in a memory's token ids: it has no text of its
# own, so the block selector's text view decodes it to nothing. (-1 marks rows fed as inputs_embeds.)
SUMMARY_ID = -2


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
    compressor: Any = None  # a ctxmem.Compressor: knowledge hits are read as its summary tokens
    owns_compressor: bool = False  # loaded by wrap from a name: its adapter is removed at unwrap
    read_knowledge: Any = None  # (cache, queries, device, kwargs) -> None, set by _make_forward
    read_context: Any = None  # (cache, ids, keep_recent) -> far tokens compressed, set by _make_forward
    reader: Any = None  # a ctxmem Reader: its adapter is on for question chunks and decode steps only
    owns_reader: bool = False


def _rope_type(mc) -> str:
    params = getattr(mc, "rope_parameters", None) or getattr(mc, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def chunk_size(model, cfg: MemoryConfig) -> int:
    """Tokens per read chunk for this model: ``gpu_prefill_chunk`` on a CUDA model, else ``prefill_chunk``."""
    dev = model.get_input_embeddings().weight.device
    return cfg.chunk_for(dev.type, getattr(model.config, "max_position_embeddings", None))


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
    if window is not None and cfg.span(chunk_size(model, cfg)) > window:
        raise ValueError(
            f"ctxmem.wrap: this MemoryConfig lets a query see keys up to {cfg.span(chunk_size(model, cfg))} positions back "
            f"(sink + topk*block + local + block + chunk), past the model's trained window ({window}); "
            "lower topk_blocks, local_tokens, prefill_topk, prefill_local or prefill_chunk")


def _resolve_compressor(model, compressor, tokenizer):
    """``compressor=``: a ctxmem.Compressor on this model (or a copy of it), or a checkpoint name/folder."""
    from ..compress.model import Compressor

    owns = False
    if isinstance(compressor, (str, os.PathLike)):
        compressor = Compressor.from_pretrained(compressor, model=model, tokenizer=tokenizer)
        owns = True
    elif not isinstance(compressor, Compressor):
        raise TypeError(f"ctxmem.wrap: compressor must be a ctxmem.Compressor or a checkpoint name/folder "
                        f"(e.g. 'smollm2-r8'), got {type(compressor).__name__}")
    if compressor.model is not model:
        a, b = compressor.model.get_input_embeddings().weight, model.get_input_embeddings().weight
        if a.shape != b.shape or not torch.equal(a.detach().cpu(), b.detach().to("cpu", a.dtype)):
            raise ValueError("ctxmem.wrap: the compressor was built on a different base model than the one being "
                             "wrapped (its input embeddings differ); load it with "
                             "Compressor.from_pretrained(NAME, model=model, tokenizer=tok) or pass its name")
    return compressor, owns


def _resolve_reader(model, reader):
    """``reader=``: a ctxmem Reader injected into this model, or a checkpoint name/folder."""
    from ..reader.adapter import Reader

    if isinstance(reader, (str, os.PathLike)):
        return Reader.from_pretrained(reader, model), True
    if not isinstance(reader, Reader):
        raise TypeError(f"ctxmem.wrap: reader must be a ctxmem Reader or a checkpoint name/folder "
                        f"(e.g. 'smollm2-reader'), got {type(reader).__name__}")
    if reader.model is not model:
        raise ValueError("ctxmem.wrap: the reader's adapter lives in another model object; load it onto this one "
                         "with Reader.from_pretrained(NAME, model)")
    return reader, False


def wrap(model, config: MemoryConfig | None = None, *, tokenizer=None, embedder=None,
         knowledge=None, knowledge_budget: int = 1024, compressor=None, reader=None, progress: bool = False):
    """Give ``model`` ctxmem working memory in place and return it.

    tokenizer / embedder: used by the "embed" block selector (defaults: the tokenizer that
    ``ctxmem.load_model`` attached, and ``config.embedder``). knowledge: a KB folder or a
    ``KnowledgeIndex``; its hits for the prompt are read before the prompt (see README), as text
    (``knowledge_budget`` tokens) or, with ``compressor`` (a ``ctxmem.Compressor`` built on this
    model, or a checkpoint name/folder loaded onto it), as summary tokens ``[BOS, summaries]``
    (``knowledge_budget`` decoder positions, BOS included: about ``ratio`` times more text).
    The compressor also serves :func:`read_context` (a long context's far part as summary tokens).
    reader: a LoRA adapter (``ctxmem.reader``; a checkpoint name such as "smollm2-reader", a folder,
    or a ``Reader`` on this model) switched on for question chunks and decode steps only
    (default: ``config.reader``).
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
        if embedder is None:  # on the model's device: a GPU model embeds its blocks on the GPU too
            from ..models import load_embedder
            dev = model.get_input_embeddings().weight.device
            embedder = load_embedder(cfg.embedder, device=str(dev) if dev.type == "cuda" else "cpu")
    else:
        embedder = None
    if knowledge is not None and tokenizer is None:
        raise ValueError("ctxmem.wrap: knowledge=... needs the tokenizer (pass tokenizer=...)")
    if isinstance(knowledge, str) or hasattr(knowledge, "__fspath__"):
        from ..index import KnowledgeIndex
        knowledge = KnowledgeIndex.open(knowledge)
    owns = False
    if compressor is not None:
        compressor, owns = _resolve_compressor(model, compressor, tokenizer)
    owns_reader = False
    reader = reader if reader is not None else cfg.reader
    if reader == "auto":
        reader = getattr(model, "ctxmem_reader", None)
    if reader is not None:
        reader, owns_reader = _resolve_reader(model, reader)

    attention.register()
    state = WrapState(cfg=cfg, orig_attn=model.config._attn_implementation, tokenizer=tokenizer,
                      embedder=embedder, knowledge=knowledge, knowledge_budget=knowledge_budget,
                      progress=progress, compressor=compressor, owns_compressor=owns,
                      reader=reader, owns_reader=owns_reader)
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
    if state.owns_compressor:
        state.compressor.remove_adapter()
    if state.reader is not None:
        if state.owns_reader:
            state.reader.remove_adapter()
        else:
            state.reader.set(False)
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


def read_knowledge(model, queries: str | list[str], memory: MemoryCache | None = None) -> MemoryCache:
    """Read the knowledge index's hits for each row's query into a fresh memory, as its hidden prefix.

    What the wrapped forward does by itself before the first prompt (querying with the prompt's last
    256 tokens), with the query chosen by the caller, e.g. the question alone. Continue with
    ``model.generate(prompt_ids, cache=memory)``: the prompt is numbered from 0 as usual and reads
    after the prefix. Needs ``wrap(model, knowledge=...)`` (and ``compressor=`` for summary tokens).
    """
    state = getattr(model, "_ctxmem", None)
    if state is None:
        raise ValueError("ctxmem.read_knowledge: the model is not wrapped (ctxmem.wrap(model, knowledge=...) first)")
    if state.knowledge is None:
        raise ValueError("ctxmem.read_knowledge: the model was wrapped without knowledge=KB")
    queries = [queries] if isinstance(queries, str) else list(queries)
    memory = memory if memory is not None else new_cache(model)
    if memory.token_ids:
        raise ValueError("ctxmem.read_knowledge: the memory already holds tokens; the knowledge prefix comes first")
    with torch.no_grad():
        state.read_knowledge(memory, queries, model.get_input_embeddings().weight.device, {})
    if memory.hidden_prefix is None:  # no hits: an empty prefix (the forward will not look again)
        memory.hidden_prefix = [0] * len(queries)
    return memory


def read_context(model, context, keep_recent: int = 1024, memory: MemoryCache | None = None) -> MemoryCache:
    """Read a long context into a fresh memory with all but its last ``keep_recent`` tokens as summary tokens.

    The compressed memory tier for context that working memory should not hold in full: the far part
    (every token before the last ``keep_recent``) is read as the compressor's ``[BOS, summaries]``
    (``ceil(far / n) * m`` positions, about ``ratio`` times fewer than tokens), then the recent tokens as
    themselves; the whole is the memory's hidden prefix. Continue with ``model.generate(prompt_ids,
    cache=memory)``. ``context``: text (tokenized with the wrapper's tokenizer, no special tokens), a
    list of ids or a 1-D id tensor. Needs ``wrap(model, compressor=...)``. The memory's
    ``context_report`` says how many tokens became how many positions.
    """
    state = getattr(model, "_ctxmem", None)
    if state is None:
        raise ValueError("ctxmem.read_context: the model is not wrapped (ctxmem.wrap(model, compressor=...) first)")
    if state.compressor is None:
        raise ValueError("ctxmem.read_context: the model was wrapped without compressor= (e.g. 'smollm2-r8')")
    if isinstance(keep_recent, bool) or not isinstance(keep_recent, int) or keep_recent < 0:
        raise ValueError(f"ctxmem.read_context: keep_recent must be an int >= 0, got {keep_recent!r}")
    if isinstance(context, str):
        if state.tokenizer is None:
            raise ValueError("ctxmem.read_context: text needs the tokenizer (wrap(..., tokenizer=...))")
        ids = state.tokenizer(context, add_special_tokens=False)["input_ids"]
    else:
        empty = not isinstance(context, torch.Tensor) and len(context) == 0
        t = torch.zeros(0, dtype=torch.long) if empty else torch.as_tensor(context)
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ctxmem.read_context: context must be text or a 1-D sequence of token ids, "
                             f"got shape {tuple(t.shape)} {t.dtype}")
        ids = t.tolist()
    memory = memory if memory is not None else new_cache(model)
    if memory.token_ids or memory.hidden_prefix is not None:
        raise ValueError("ctxmem.read_context: the memory is not empty; the context comes first")
    with torch.no_grad():
        far = state.read_context(memory, ids, keep_recent)
    if memory.hidden_prefix is None:  # an empty context
        memory.hidden_prefix = [0]
    memory.context_report = {"tokens": len(ids), "compressed_tokens": far, "recent_tokens": len(ids) - far,
                             "positions": memory.hidden_prefix[0]}
    return memory


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
             keep: int, kwargs: dict, progress_desc: str | None = None, text_ids: torch.Tensor | None = None):
        """Feed tokens chunk by chunk through the model into ``cache``; return the kept logits.

        ``question``: the last chunk retrieves as a question (full topk, embedder votes).
        ``counted``: the tokens count in the HF-visible length (False for the hidden knowledge prefix).
        ``text_ids``: with ``inputs_embeds``, the ids the memory records for them (default -1: no text).
        """
        x = input_ids if input_ids is not None else inputs_embeds
        L = x.shape[1]
        pos = _positions(cache.real_lengths() if cache.token_ids else [0] * x.shape[0], valid).to(x.device)
        bounds = _chunk_bounds(L, chunk_size(model, cfg))
        bar = None
        if state.progress and len(bounds) > 1:
            from tqdm.auto import tqdm
            bar = tqdm(total=L, unit="tok", unit_scale=True, desc=progress_desc or "ctxmem: reading", leave=False)
        parts = []
        for i, (s, e) in enumerate(bounds):
            last = i == len(bounds) - 1
            ids = input_ids if input_ids is not None else text_ids
            cache.begin_chunk(None if ids is None else ids[:, s:e].cpu(), valid[:, s:e], question=question and last)
            inputs = dict(input_ids=input_ids[:, s:e]) if input_ids is not None else dict(inputs_embeds=inputs_embeds[:, s:e])
            cache.pending = L - s
            if state.reader is not None:
                state.reader.set(question and last)
            try:
                with attention.active_memory(cache):
                    out = orig_forward(**inputs, attention_mask=None, position_ids=pos[:, s:e], cache=cache,
                                       use_cache=True, logits_to_keep=0 if keep_all else (keep if last else 1), **kwargs)
            finally:
                cache.pending = 0
                if state.reader is not None:
                    state.reader.set(False)  # outside a question forward the model is the stock one
            cache.end_chunk(e - s if counted else 0)
            if bar is not None:
                bar.update(e - s)
            if keep_all or last:
                parts.append(out.logits)
        if bar is not None:
            bar.close()
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def read_knowledge(cache, queries: list[str], device, kwargs):
        """Before the first prompt: retrieve the KB's hits for each row's query and read them as a hidden prefix."""
        from ..index.augment import knowledge_context

        if state.compressor is not None:
            return read_knowledge_summaries(cache, queries, device, kwargs)
        tok = state.tokenizer
        rows = []
        for query in queries:
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
        read(cache, ids.to(device), None, pvalid, question=False, counted=False, keep_all=False,
             keep=1, kwargs=kwargs, progress_desc="ctxmem: reading knowledge")
        cache.hidden_prefix = [len(r) for r in rows]

    def read_knowledge_summaries(cache, queries: list[str], device, kwargs):
        """The hits as summary tokens: each row's prefix is ``comp.prefix(comp.compress(notes))`` =
        ``[BOS, summaries]``, where ``notes`` is ``knowledge_context``'s text (same retrieval, dedup,
        order and labels as the text path) within ``floor((budget - 1) / m) * n`` tokens, so the
        prefix holds at most ``knowledge_budget`` positions. The memory records BOS as its id and
        the summary positions as ``SUMMARY_ID`` (no text for the block selector)."""
        from ..index.augment import knowledge_context

        comp, tok = state.compressor, state.tokenizer
        n, m = comp.config.segment_tokens, comp.config.slots
        text_budget = max(0, (state.knowledge_budget - 1) // m) * n
        rows = []
        for query in queries:
            text = knowledge_context(state.knowledge, query, tok, budget_tokens=text_budget) if text_budget else ""
            ids = tok(text, add_special_tokens=False)["input_ids"] if text else []
            rows.append(summary_row(ids, []) if ids else None)
        read_embedded_prefix(cache, rows, "ctxmem: reading knowledge summaries", kwargs)

    def summary_row(far: list[int], near: list[int]):
        """``([BOS, summaries of far], embeddings of near)`` as one (P, d) tensor, and the ids the memory
        records for its positions: BOS, ``SUMMARY_ID`` per summary, then ``near``."""
        comp = state.compressor
        emb = model.get_input_embeddings()
        parts, ids = [], []
        if far:
            pre = comp.prefix(comp.compress(far, progress=state.progress))[0]
            parts.append(pre)
            ids += [comp.config.bos_id] + [SUMMARY_ID] * (pre.shape[0] - 1)
        if near:
            parts.append(emb(torch.tensor(near, device=emb.weight.device)))
            ids += list(near)
        x = torch.cat([t.to(emb.weight.device, emb.weight.dtype) for t in parts])
        return x, ids

    def read_embedded_prefix(cache, rows, desc: str, kwargs: dict):
        """Read rows of ``(embeddings, ids)`` (or None: nothing) left-padded, as the memory's hidden prefix."""
        P = max((r[0].shape[0] for r in rows if r is not None), default=0)
        if P == 0:
            return
        emb = model.get_input_embeddings().weight
        x = torch.zeros(len(rows), P, emb.shape[1], dtype=emb.dtype, device=emb.device)
        text_ids = torch.zeros(len(rows), P, dtype=torch.long)
        pvalid = torch.zeros(len(rows), P, dtype=torch.bool)
        for b, r in enumerate(rows):
            if r is not None:
                k = r[0].shape[0]
                x[b, P - k:] = r[0]
                text_ids[b, P - k:] = torch.tensor(r[1])
                pvalid[b, P - k:] = True
        read(cache, None, x, pvalid, question=False, counted=False, keep_all=False, keep=1,
             kwargs=kwargs, progress_desc=desc, text_ids=text_ids)
        cache.hidden_prefix = [0 if r is None else r[0].shape[0] for r in rows]

    def read_context(cache, ids: list[int], keep_recent: int):
        far, near = ids[:max(0, len(ids) - keep_recent)], ids[max(0, len(ids) - keep_recent):]
        read_embedded_prefix(cache, [summary_row(far, near) if ids else None], "ctxmem: reading context", {})
        return len(far)

    state.read_knowledge = read_knowledge
    state.read_context = read_context

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
        # a hidden knowledge prefix alone does not forbid left padding of the prompt after it
        _check_padding(valid, [h - o for h, o in zip(had, cache.hidden_prefix or [0] * B)])
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
        fresh = not cache.token_ids and cache.hidden_prefix is None  # (read_knowledge may have set an empty prefix)
        if state.knowledge is not None and fresh and input_ids is not None:
            tok = state.tokenizer
            queries = [tok.decode(input_ids[b][valid[b]].tolist()[-256:], skip_special_tokens=True) for b in range(B)]
            read_knowledge(cache, queries, input_ids.device, kwargs)
        keep = logits_to_keep
        keep_all = isinstance(keep, torch.Tensor) or labels is not None or keep == 0
        if not keep_all:
            s, e = _chunk_bounds(L, chunk_size(model, cfg))[-1]
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

"""``ChunkedForward``: what a wrapped model's ``forward`` is (see ``ctxmem.hf.wrap``)."""
from __future__ import annotations

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..memory.text_index import excerpt_spans
from ..ops import OpParams, middle_blocks
from . import attention
from .cache import MemoryCache
from .state import WrapState, new_cache

# What a summary token (compressed knowledge) stands for in a memory's token ids: it has no text of its
# own, so the block selector's text view decodes it to nothing. (-1 marks rows fed as inputs_embeds.)
SUMMARY_ID = -2

# The text around passages read again before a question (MemoryConfig.reread_tokens).
REREAD_HEADER = "Passages from the text above that may help:\n"
REREAD_SEPARATOR = "\n...\n"
REREAD_FOOTER = "\n\n"


def chunk_size(model, cfg) -> int:
    """Tokens per read chunk for this model: ``gpu_prefill_chunk`` on a CUDA model, else ``prefill_chunk``."""
    dev = model.get_input_embeddings().weight.device
    return cfg.chunk_for(dev.type, getattr(model.config, "max_position_embeddings", None))


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


class ChunkedForward:
    """The wrapped model's ``forward``: long inputs read in chunks through a ``MemoryCache``.

    ``__call__`` is what ``model(...)`` and ``generate`` call (the stock signature); ``read_chunks``
    feeds tokens chunk by chunk; the knowledge index's hits and a compressed context are read before
    the prompt as a hidden prefix (``read_knowledge``, ``read_context``).
    """

    def __init__(self, model, state: WrapState):
        self.model = model
        self.state = state
        self.cfg = state.cfg
        self.orig_forward = type(model).forward.__get__(model)  # the class's forward, bound: the stock model

    def read_chunks(self, cache, input_ids, inputs_embeds, valid, *, question: bool, counted: bool, keep_all: bool,
                    keep: int, kwargs: dict, progress_desc: str | None = None, text_ids: torch.Tensor | None = None):
        """Feed tokens chunk by chunk through the model into ``cache``; return the kept logits.

        ``question``: the last chunk retrieves as a question (full topk, embedder votes).
        ``counted``: the tokens count in the HF-visible length (False for the hidden knowledge prefix).
        ``text_ids``: with ``inputs_embeds``, the ids the memory records for them (default -1: no text).
        """
        x = input_ids if input_ids is not None else inputs_embeds
        L = x.shape[1]
        pos = _positions(cache.real_lengths() if cache.token_ids else [0] * x.shape[0], valid).to(x.device)
        bounds = _chunk_bounds(L, chunk_size(self.model, self.cfg))
        bar = None
        if self.state.progress and len(bounds) > 1:
            from tqdm.auto import tqdm
            bar = tqdm(total=L, unit="tok", unit_scale=True, desc=progress_desc or "ctxmem: reading", leave=False)
        parts = []
        for i, (s, e) in enumerate(bounds):
            last = i == len(bounds) - 1
            ids = input_ids if input_ids is not None else text_ids
            cache.begin_chunk(None if ids is None else ids[:, s:e].cpu(), valid[:, s:e], question=question and last)
            inputs = dict(input_ids=input_ids[:, s:e]) if input_ids is not None else dict(inputs_embeds=inputs_embeds[:, s:e])
            cache.pending = L - s
            if self.state.reader is not None:
                self.state.reader.set(question and last)
            try:
                with attention.active_memory(cache):
                    out = self.orig_forward(**inputs, attention_mask=None, position_ids=pos[:, s:e], cache=cache,
                                            use_cache=True, logits_to_keep=0 if keep_all else (keep if last else 1), **kwargs)
            finally:
                cache.pending = 0
                if self.state.reader is not None:
                    self.state.reader.set(False)  # outside a question forward the model is the stock one
            cache.end_chunk(e - s if counted else 0)
            if bar is not None:
                bar.update(e - s)
            if keep_all or last:
                parts.append(out.logits)
        if bar is not None:
            bar.close()
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def read_knowledge(self, cache, queries: list[str], device, kwargs):
        """Before the first prompt: retrieve the KB's hits for each row's query and read them as a hidden prefix."""
        from ..index.augment import knowledge_context

        if self.state.compressor is not None:
            return self.read_knowledge_summaries(cache, queries, device, kwargs)
        tok = self.state.tokenizer
        rows = []
        for query in queries:
            text = knowledge_context(self.state.knowledge, query, tok, budget_tokens=self.state.knowledge_budget)
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
        self.read_chunks(cache, ids.to(device), None, pvalid, question=False, counted=False, keep_all=False,
                         keep=1, kwargs=kwargs, progress_desc="ctxmem: reading knowledge")
        cache.hidden_prefix = [len(r) for r in rows]

    def read_knowledge_summaries(self, cache, queries: list[str], device, kwargs):
        """The hits as summary tokens: each row's prefix is ``comp.prefix(comp.compress(notes))`` =
        ``[BOS, summaries]``, where ``notes`` is ``knowledge_context``'s text (same retrieval, dedup,
        order and labels as the text path) within ``floor((budget - 1) / m) * n`` tokens, so the
        prefix holds at most ``knowledge_budget`` positions. The memory records BOS as its id and
        the summary positions as ``SUMMARY_ID`` (no text for the block selector)."""
        from ..index.augment import knowledge_context

        comp, tok = self.state.compressor, self.state.tokenizer
        n, m = comp.config.segment_tokens, comp.config.slots
        text_budget = max(0, (self.state.knowledge_budget - 1) // m) * n
        rows = []
        for query in queries:
            text = knowledge_context(self.state.knowledge, query, tok, budget_tokens=text_budget) if text_budget else ""
            ids = tok(text, add_special_tokens=False)["input_ids"] if text else []
            rows.append(self.summary_row(ids, []) if ids else None)
        self.read_embedded_prefix(cache, rows, "ctxmem: reading knowledge summaries", kwargs)

    def summary_row(self, far: list[int], near: list[int]):
        """``([BOS, summaries of far], embeddings of near)`` as one (P, d) tensor, and the ids the memory
        records for its positions: BOS, ``SUMMARY_ID`` per summary, then ``near``."""
        comp = self.state.compressor
        emb = self.model.get_input_embeddings()
        parts, ids = [], []
        if far:
            pre = comp.prefix(comp.compress(far, progress=self.state.progress))[0]
            parts.append(pre)
            ids += [comp.config.bos_id] + [SUMMARY_ID] * (pre.shape[0] - 1)
        if near:
            parts.append(emb(torch.tensor(near, device=emb.weight.device)))
            ids += list(near)
        x = torch.cat([t.to(emb.weight.device, emb.weight.dtype) for t in parts])
        return x, ids

    def read_embedded_prefix(self, cache, rows, desc: str, kwargs: dict):
        """Read rows of ``(embeddings, ids)`` (or None: nothing) left-padded, as the memory's hidden prefix."""
        P = max((r[0].shape[0] for r in rows if r is not None), default=0)
        if P == 0:
            return
        emb = self.model.get_input_embeddings().weight
        x = torch.zeros(len(rows), P, emb.shape[1], dtype=emb.dtype, device=emb.device)
        text_ids = torch.zeros(len(rows), P, dtype=torch.long)
        pvalid = torch.zeros(len(rows), P, dtype=torch.bool)
        for b, r in enumerate(rows):
            if r is not None:
                k = r[0].shape[0]
                x[b, P - k:] = r[0]
                text_ids[b, P - k:] = torch.tensor(r[1])
                pvalid[b, P - k:] = True
        self.read_chunks(cache, None, x, pvalid, question=False, counted=False, keep_all=False, keep=1,
                         kwargs=kwargs, progress_desc=desc, text_ids=text_ids)
        cache.hidden_prefix = [0 if r is None else r[0].shape[0] for r in rows]

    def read_context(self, cache, ids: list[int], keep_recent: int):
        far, near = ids[:max(0, len(ids) - keep_recent)], ids[max(0, len(ids) - keep_recent):]
        self.read_embedded_prefix(cache, [self.summary_row(far, near) if ids else None], "ctxmem: reading context", {})
        return len(far)

    # -- reread: the best passages of what was read, read again just before the question ---------------
    def question_tail(self, cache, input_ids: torch.Tensor, valid: torch.Tensor) -> int:
        """How many of the input's last tokens are the question, when this forward should reread; else 0.

        A row's question is what follows the last blank line within its final ``reread_question_max``
        tokens (the last ``query_tokens`` without one); rows share the longest. Reread runs for a prompt
        (not a decode step, not a call that wants every position's logits) whose memory holds more
        blocks than a question attends, when the embed selector is on."""
        cfg = self.cfg
        B, L = input_ids.shape
        if not self.reread_budget() or cache.text_index is None or L < 2:
            return 0
        had = cache.real_lengths() if cache.token_ids else [0] * B
        tails = []
        for b in range(B):
            ids = input_ids[b][valid[b]].tolist()
            t = self._tail_length(ids[-cfg.reread_question_max:], whole=had[b] > 0)
            if self._beyond_budget(had[b] + len(ids) - t):
                tails.append(t)
        return min(max(tails), L) if tails else 0

    def reread_budget(self) -> int:
        return self.cfg.reread_budget(getattr(self.model.config, "max_position_embeddings", None))

    def _beyond_budget(self, tokens: int) -> bool:
        """Whether a question after ``tokens`` stored tokens attends only part of them (else it sees
        everything already and a reread would only repeat text)."""
        cfg = self.cfg
        probe = OpParams(cfg.block_size, cfg.topk_blocks, cfg.sink_tokens, cfg.local_tokens, 1.0)
        return middle_blocks(tokens, probe) > cfg.topk_blocks

    def _tail_length(self, ids: list[int], whole: bool = False) -> int:
        """Tokens after the last blank line in ``ids`` (a token holding it and the question's first
        word counts as the question's). Without one: all of ``ids`` when ``whole`` (a question asked of
        a memory read before), else the last ``query_tokens``."""
        pieces = self.state.tokenizer.batch_decode([[t] for t in ids])
        for j in range(len(pieces) - 1, -1, -1):
            blank = "\n\n" in pieces[j] or (j > 0 and pieces[j - 1].endswith("\n") and pieces[j].startswith("\n"))
            if blank:
                start = j + 1 if pieces[j].rstrip(" \t").endswith("\n") else j
                if 0 < len(ids) - start < len(ids):
                    return len(ids) - start
                break
        return len(ids) if whole else min(self.cfg.query_tokens, len(ids) - 1)

    def passages(self, cache, b: int, query: str) -> list[int]:
        """Row ``b``'s reread: the header, then its best-ranked blocks (with neighbours, merged, in
        document order) as token ids, within ``reread_tokens`` in all; [] when there is nothing to add."""
        cfg, tok = self.cfg, self.state.tokenizer
        ids = cache.token_ids[b]
        S, sink = cfg.block_size, cfg.sink_tokens
        if not ids or ids[0] == -1 or not self._beyond_budget(len(ids)) or not query.strip():
            return []  # a row fed as inputs_embeds has no text; a short one is attended whole anyway
        enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        head, sep, foot = enc(REREAD_HEADER), enc(REREAD_SEPARATOR), enc(REREAD_FOOTER)
        budget = (self.reread_budget() - len(head) - len(foot)) // (S + len(sep))
        nblocks = (len(ids) - sink) // S
        if budget < 1 or nblocks < 1:
            return []
        sims = cache.text_index.similarities(b, ids, nblocks, sink, S, query)
        out = list(head)
        for i, (a, e) in enumerate(excerpt_spans(sims, budget, cfg.embed_neighbors)):
            out += (sep if i else []) + [t for t in ids[sink + a * S: sink + e * S] if t >= 0]
        return out + foot

    def read_question_with_passages(self, cache, tail_ids: torch.Tensor, tail_valid: torch.Tensor, keep, kwargs):
        """Read each row's passages and its question as one chunk (the question attends the passages
        densely); the passages are hidden tokens (``hidden_prefix`` counts them), the question counts."""
        tok = self.state.tokenizer
        B, T = tail_ids.shape
        rows = []
        for b in range(B):
            q = tail_ids[b][tail_valid[b]].tolist()
            rows.append(self.passages(cache, b, tok.decode(q, skip_special_tokens=True)) + q)
        W = max(len(r) for r in rows)
        ids = torch.zeros(B, W, dtype=torch.long)
        valid = torch.zeros(B, W, dtype=torch.bool)
        for b, r in enumerate(rows):
            if r:
                ids[b, W - len(r):] = torch.tensor(r)
                valid[b, W - len(r):] = True
        before = cache.real_lengths()
        hidden = [len(r) - int(tail_valid[b].sum()) for b, r in enumerate(rows)]
        pos = _positions(before, valid).to(tail_ids.device)
        cache.begin_chunk(ids, valid, question=True)
        cache.reread_from = before  # decode steps keep the passages and the question in their local window
        cache.reread_width = max(len(r) for r in rows)
        cache.reread_ids = [r[:h] for r, h in zip(rows, hidden)]  # what each row read again (ask --json shows it)
        cache.hidden_prefix = [h + n for h, n in zip(cache.hidden_prefix or [0] * B, hidden)]
        cache.pending = W
        if self.state.reader is not None:
            self.state.reader.set(True)
        try:
            with attention.active_memory(cache):
                out = self.orig_forward(input_ids=ids.to(tail_ids.device), attention_mask=None, position_ids=pos,
                                        cache=cache, use_cache=True, logits_to_keep=keep, **kwargs)
        finally:
            cache.pending = 0
            if self.state.reader is not None:
                self.state.reader.set(False)
        cache.end_chunk(T)  # the HF view grows by the question's width: what generate fed
        return out.logits

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                 labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        """The stock forward's signature; any length. A fresh ``MemoryCache`` unless one is passed."""
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
            cache = new_cache(self.model)
        self.state.last_memory = cache
        past = cache.seen
        if attention_mask is None:
            valid = torch.ones(B, L, dtype=torch.bool)
        else:
            if not isinstance(attention_mask, torch.Tensor):  # e.g. generate(cache_implementation="static")
                raise ValueError(f"ctxmem: attention_mask must be the 2-D [batch, past + new] padding mask, got a "
                                 f"{type(attention_mask).__name__} (a wrapped model keeps its context in its own "
                                 "MemoryCache: leave generate's cache_implementation unset)")
            if attention_mask.dim() != 2 or attention_mask.shape != (B, past + L):
                raise ValueError(f"ctxmem: attention_mask must be 2-D [batch, past + new] = [{B}, {past + L}], "
                                 f"got {tuple(attention_mask.shape)}")
            valid = attention_mask[:, -L:].bool().cpu()
        had = cache.real_lengths() if cache.token_ids else [0] * B
        # a hidden knowledge prefix alone does not forbid left padding of the prompt after it
        _check_padding(valid, [h - o for h, o in zip(had, cache.hidden_prefix or [0] * B)])
        total = max(h + int(n) for h, n in zip(had, valid.sum(1)))
        if total > self.cfg.max_context:
            raise ValueError(f"ctxmem: context of {total} tokens exceeds MemoryConfig.max_context ({self.cfg.max_context})")
        if position_ids is not None:
            # what generate passes; it does not know about a hidden knowledge prefix
            offset = torch.tensor(cache.hidden_prefix or [0] * B)[:, None]
            pos = _positions([h - o for h, o in zip(had, offset[:, 0].tolist())], valid)
            if not bool((position_ids.expand(B, -1).cpu()[valid] == pos[valid]).all()):
                raise ValueError("ctxmem: position_ids must count each row's real tokens 0, 1, 2, ... "
                                 "(as generate does); leave them None and ctxmem numbers them")
        fresh = not cache.token_ids and cache.hidden_prefix is None  # (read_knowledge may have set an empty prefix)
        if self.state.knowledge is not None and fresh and input_ids is not None:
            tok = self.state.tokenizer
            queries = [tok.decode(input_ids[b][valid[b]].tolist()[-256:], skip_special_tokens=True) for b in range(B)]
            self.read_knowledge(cache, queries, input_ids.device, kwargs)
        keep = logits_to_keep
        keep_all = isinstance(keep, torch.Tensor) or labels is not None or keep == 0
        if not keep_all:
            s, e = _chunk_bounds(L, chunk_size(self.model, self.cfg))[-1]
            keep_all = keep > e - s  # asks for more than the last chunk holds
        tail = 0 if keep_all or input_ids is None else self.question_tail(cache, input_ids, valid)
        if tail and keep > tail:  # logits wanted for more than the question: read as written
            tail = 0
        if tail:  # reread: the body first, then passages of it again in the question's own chunk
            if tail < L:
                self.read_chunks(cache, input_ids[:, :L - tail], None, valid[:, :L - tail], question=False,
                                 counted=True, keep_all=False, keep=1, kwargs=kwargs)
            logits = self.read_question_with_passages(cache, input_ids[:, L - tail:], valid[:, L - tail:], keep, kwargs)
        else:
            logits = self.read_chunks(cache, input_ids, inputs_embeds, valid, question=True, counted=True,
                                      keep_all=keep_all, keep=0 if keep_all else keep, kwargs=kwargs)
        loss = None
        if labels is not None:
            loss = self.model.loss_function(logits=logits, labels=labels, vocab_size=self.model.config.vocab_size)
        if isinstance(keep, torch.Tensor) or (keep_all and keep != 0):
            logits = logits[:, keep] if isinstance(keep, torch.Tensor) else logits[:, -keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache is not False else None)

"""Using summary tokens where they pay: knowledge-index hits (and evicted context) as a soft prefix.

A hit of T tokens costs ``ceil(T / n) * m`` decoder positions as summary tokens instead of T as
text. :func:`summary_inputs` builds ``inputs_embeds`` = ``[BOS, summaries of the notes..., prompt]``
for the ordinary HF ``generate(inputs_embeds=...)``; the compressor's adapter is off there, so
the decoder is the stock model.

    comp = Compressor.from_pretrained("smollm2-r8", model=model, tokenizer=tok)
    hits = KnowledgeIndex.open("kb/").search(question, k=5)
    out = generate_with_summaries(comp, [h.text for h in hits], prompt_ids, max_new_tokens=32)
"""
from __future__ import annotations

import torch


@torch.no_grad()
def summary_inputs(comp, notes: list[str] | list[list[int]], prompt_ids, budget: int | None = None):
    """(inputs_embeds (1, L, d), attention_mask (1, L), summary positions used).

    Notes are compressed in order and kept while their summaries fit ``budget`` positions
    (all of them when ``budget`` is None); the prompt follows as ordinary token embeddings.
    """
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).view(1, -1)
    parts, used = [], 0
    for note in notes:
        s = comp.compress(note)
        if budget is not None and used + s.shape[0] > budget:
            break
        parts.append(s)
        used += s.shape[0]
    d = comp.config.hidden_size
    summ = torch.cat(parts, 0) if parts else torch.zeros(0, d, dtype=comp.slots.dtype, device=comp.slots.device)
    x = torch.cat([comp.prefix(summ), comp.embed(prompt)], dim=1)
    return x, torch.ones(x.shape[:2], dtype=torch.long, device=x.device), used


@torch.no_grad()
def generate_with_summaries(comp, notes, prompt_ids, budget: int | None = None, **generate_kwargs):
    """Generate from ``[BOS, summaries of notes, prompt]``; returns only the new token ids (1, k)."""
    x, mask, _ = summary_inputs(comp, notes, prompt_ids, budget)
    tok = comp.tokenizer
    pad = None if tok is None else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return comp.model.generate(inputs_embeds=x, attention_mask=mask, pad_token_id=pad, **generate_kwargs)

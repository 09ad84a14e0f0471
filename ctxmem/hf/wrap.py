"""``ctxmem.wrap(model)``: give a stock HF causal LM working memory, in place; ``unwrap`` undoes it.

What wrapping changes, and nothing else:
  * ``model.config._attn_implementation`` becomes "ctxmem" (registered through transformers'
    AttentionInterface and AttentionMaskInterface; no modeling file is forked);
  * ``model.forward`` (an instance attribute shadowing the class method: a ``ChunkedForward``,
    ``forward.py``) reads long inputs in chunks of ``prefill_chunk`` tokens through a ``MemoryCache``,
    so ``model(...)`` and ``model.generate(...)`` work unchanged at any context length.
``unwrap`` deletes the attribute and restores the attention implementation, so the stock model
is back bit for bit.
"""
from __future__ import annotations

import os

import torch

from ..config import MemoryConfig
from . import attention
from .cache import MemoryCache, rope_inv_freq, sliding_layers
from .forward import SUMMARY_ID, ChunkedForward, chunk_size  # noqa: F401  (SUMMARY_ID: public name)
from .state import WrapState, new_cache

# Families whose attention modules follow the llama pattern (RoPE'd q/k -> cache.update -> the attention
# interface, with ``scaling`` / ``sliding_window`` / ``softcap`` passed as keywords) and that the test suite
# checks against the stock model (tests/test_wrap.py, tests/test_families.py). What each one needed:
FAMILY_NOTES = {
    "llama": "the reference family",
    "mistral": "a sliding_window config makes every layer an exact window layer (no retrieval)",
    "qwen2": "sliding layers (use_sliding_window, layer_types) keep their window exactly",
    "qwen3": "q/k RMSNorm before RoPE: keys are stored rotated, re-rotation stays exact; sliding layers as qwen2",
    "olmo2": "q/k RMSNorm over the whole projection before RoPE: nothing beyond llama",
    "granite": "attention_multiplier is the module's scaling, used by the op and its block scores",
    "phi3": "partial rotary: only the first 2 * len(inv_freq) dims are re-rotated; a sliding_window config "
            "makes every layer a window layer; longrope refused",
    "gemma2": "query_pre_attn_scalar scaling, attention logit soft-capping in the op, interleaved sliding "
              "layers keep their window exactly (only global layers retrieve)",
    "gemma3_text": "q/k norm, query_pre_attn_scalar scaling, sliding layers keep their window exactly with their "
                   "own RoPE base; global layers retrieve and re-rotate with the global frequencies",
    "olmo3": "q/k RMSNorm before RoPE, sliding layers exact, global layers re-rotate with the global frequencies",
    "ministral": "interleaved sliding layers keep their window exactly",
    "starcoder2": "a sliding_window config makes every layer a window layer",
    "seed_oss": "nothing beyond llama (biases on q/k/v)",
    "arcee": "nothing beyond llama (ReLU^2 MLP)",
    "apertus": "q/k RMSNorm before RoPE",
    "stablelm": "partial rotary (rotary_ndims), optional per-head q/k layernorm before RoPE",
    "smollm3": "NoPE layers (no_rope_layers): their keys are moved with zero frequencies (the identity)",
    "exaone4": "q/k RMSNorm before RoPE; sliding layers exact; the global layers of a hybrid model are NoPE "
               "(moved with zero frequencies)",
    "phi": "partial rotary (rotary_ndims), optional per-head q/k layernorm before RoPE",
    "persimmon": "fused query_key_value, partial rotary, per-head q/k layernorm before RoPE",
    # mixture-of-experts siblings: the attention of their dense family
    "mixtral": "as mistral",
    "qwen2_moe": "as qwen2",
    "qwen3_moe": "as qwen3",
    "olmoe": "q/k RMSNorm over the projection (and clip_qkv) before RoPE, as olmo2",
    "granitemoe": "as granite (attention_multiplier)",
}
SUPPORTED_FAMILIES = tuple(FAMILY_NOTES)
# Families refused with a reason of their own (beyond "not checked yet").
REFUSED_FAMILIES = {
    "gemma3": "the multimodal Gemma3ForConditionalGeneration (image tokens attend bidirectionally, which the "
              "causal op does not do); load the text model (Gemma3ForCausalLM, model_type 'gemma3_text') to "
              "wrap it",
    "gpt2": "learned absolute position embeddings: keys carry no rotation to move them by",
    "cohere": "interleaved RoPE (pairs 2i, 2i+1), not the rotate-half convention the op re-rotates",
    "cohere2": "interleaved RoPE (pairs 2i, 2i+1), not the rotate-half convention the op re-rotates",
    "glm": "interleaved partial RoPE, not the rotate-half convention the op re-rotates",
    "glm4": "interleaved partial RoPE, not the rotate-half convention the op re-rotates",
    "helium": "interleaved RoPE (pairs 2i, 2i+1), not the rotate-half convention the op re-rotates",
    "ernie4_5": "interleaved RoPE (pairs 2i, 2i+1), not the rotate-half convention the op re-rotates",
    "gpt_neox": "its decoder is model.gpt_neox, not model.model (not checked yet)",
    "gemma3n": "per-layer KV sharing across layers (not checked yet)",
    "hunyuan_v1_dense": "q/k layernorm after RoPE: a stored key's per-dimension norm weights do not commute "
                        "with re-rotation",
}
_HYBRID = ("hybrid: some layers are linear-attention or state-space mixers, with no per-token keys to "
           "retrieve")
REFUSED_FAMILIES.update({f: _HYBRID for f in ("qwen3_next", "qwen3_5", "qwen3_5_moe", "lfm2", "lfm2_moe", "falcon_h1",
                                              "granitemoehybrid", "olmo_hybrid", "minimax", "jamba", "zamba2",
                                              "bamba", "nemotron_h")})
# RoPE variants that are a pure rotation by position * inv_freq (re-rotation by a delta is exact). yarn
# scales cos and sin by its attention factor: the stored key carries the scale, rotation is still exact.
PURE_ROTATION_ROPE = ("default", "linear", "llama3", "yarn")
REFUSED_ROPE = {
    "longrope": "its frequencies switch with the forward's largest position (short factor up to "
                "original_max_position_embeddings, long past it), so keys read in chunks are rotated "
                "differently from one stock forward",
    "dynamic": "its frequencies grow with the forward's length, so keys read in chunks are rotated "
               "differently from one stock forward",
}


def _rope_types(mc) -> list[str]:
    """The rope type of every layer kind (gemma3 keeps one rope_parameters dict per layer type)."""
    params = getattr(mc, "rope_parameters", None) or getattr(mc, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return ["default"]
    if params and all(isinstance(v, dict) or v is None for v in params.values()):
        return [v.get("rope_type", v.get("type", "default")) for v in params.values() if v]
    return [params.get("rope_type", params.get("type", "default"))]


def _rope_type(mc) -> str:
    return _rope_types(mc)[0]


def nope_layers(mc) -> list[int]:
    """Layers whose keys carry no RoPE (smollm3's no_rope_layers, exaone4's hybrid global layers)."""
    family = getattr(mc, "model_type", None)
    if family == "smollm3":
        return [i for i, r in enumerate(getattr(mc, "no_rope_layers", None) or []) if not r]
    if family == "exaone4" and getattr(mc, "sliding_window", None) is not None:
        return [i for i, t in enumerate(getattr(mc, "layer_types", None) or []) if t != "sliding_attention"]
    return []


def _check_model(model, cfg: MemoryConfig) -> None:
    mc = model.config
    family = getattr(mc, "model_type", type(model).__name__)
    if family not in SUPPORTED_FAMILIES:
        why = REFUSED_FAMILIES.get(family, "other families may store or rotate keys differently, and ctxmem "
                                           "refuses rather than answer wrongly")
        raise ValueError(
            f"ctxmem.wrap: model family {family!r} is not supported yet; supported: "
            f"{', '.join(SUPPORTED_FAMILIES)}. ({why})")
    if getattr(model, "model", None) is None or getattr(model.model, "rotary_emb", None) is None:
        raise ValueError(f"ctxmem.wrap: expected a *ForCausalLM with .model.rotary_emb, got {type(model).__name__}")
    for rt in _rope_types(mc):
        if rt not in PURE_ROTATION_ROPE:
            why = REFUSED_ROPE.get(rt, "not known to be a pure rotation by position * inv_freq")
            raise ValueError(f"ctxmem.wrap: rope_type {rt!r} is not supported: {why}; "
                             f"supported: {PURE_ROTATION_ROPE}")
    inv = rope_inv_freq(model)
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    if not 0 < 2 * inv.shape[-1] <= head_dim:
        raise ValueError(f"ctxmem.wrap: the model's RoPE has {inv.shape[-1]} frequencies for a head of {head_dim} dims; "
                         "expected 0 < 2 * frequencies <= head_dim")
    if cfg.ram_budget is not None and sliding_layers(mc):
        raise ValueError("ctxmem.wrap: ram_budget (the bounded-RAM store) does not support sliding-window layers yet "
                         f"({family} has {len(sliding_layers(mc))}); leave ram_budget unset for this model")
    if cfg.ram_budget is not None and nope_layers(mc):
        raise ValueError("ctxmem.wrap: ram_budget (the bounded-RAM store) does not support NoPE layers yet "
                         f"({family} has {len(nope_layers(mc))}); leave ram_budget unset for this model")
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
    if "forward" in vars(model):  # e.g. accelerate's hooks: unwrap would have to delete someone else's forward
        raise ValueError("ctxmem.wrap: this model's forward is already replaced on the instance (accelerate hooks, "
                         "another wrapper?); wrap the model before that, or remove it first")
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
    state.forward = ChunkedForward(model, state)
    model.forward = state.forward
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
        state.forward.read_knowledge(memory, queries, model.get_input_embeddings().weight.device, {})
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
        far = state.forward.read_context(memory, ids, keep_recent)
    if memory.hidden_prefix is None:  # an empty context
        memory.hidden_prefix = [0]
    memory.context_report = {"tokens": len(ids), "compressed_tokens": far, "recent_tokens": len(ids) - far,
                             "positions": memory.hidden_prefix[0]}
    return memory

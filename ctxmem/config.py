"""MemoryConfig: how working memory is laid out and how blocks are chosen."""
from __future__ import annotations

from dataclasses import asdict, dataclass

BACKENDS = ("auto", "torch", "numba", "cuda")
SELECTORS = ("auto", "embed", "keys")


@dataclass
class MemoryConfig:
    """Working-memory settings. Defaults are tuned on SmolLM2-135M (see README's passkey table).

    block_size      tokens per KV block (the unit of retrieval)
    topk_blocks     blocks retrieved per layer and KV head at each step
    sink_tokens     first tokens always attended (attention sinks)
    local_tokens    most recent tokens always attended (at least this many, fewer than +block_size)
    prefill_chunk   long inputs are read in chunks of this many tokens (cost O(N x budget))
    backend         "auto" | "torch" | "numba" | "cuda": which implementation of the fused op
    reps_per_block  representative keys per block (means of equal sub-blocks) for key scoring
    selector        how the question and decode steps choose blocks: "embed" (sentence embedder
                    over block text, the remaining budget filled by key scores), "keys" (key
                    scores only), "auto" (embed when a tokenizer is known, else keys)
    embed_hits      blocks the embedder picks for each question / decode step ...
    embed_neighbors ... each bringing this many neighbours on either side
    query_tokens    the last N tokens form the embedder's query text
    prefill_topk    blocks retrieved by key scores while reading the body of a long input
                    (None = topk_blocks; 0 = sinks + local window only, StreamingLLM-style)
    max_context     refuse inputs longer than this many tokens (clear error, not an OOM)
    embedder        sentence-transformers id/path for the embed selector ("minilm" = bundled)
    """

    block_size: int = 64
    topk_blocks: int = 9
    sink_tokens: int = 64
    local_tokens: int = 128
    prefill_chunk: int = 128
    backend: str = "auto"
    reps_per_block: int = 4
    selector: str = "auto"
    embed_hits: int = 3
    embed_neighbors: int = 1
    query_tokens: int = 48
    prefill_topk: int | None = None
    max_context: int = 2_000_000
    embedder: str = "minilm"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"MemoryConfig: {msg}")

        for name in ("block_size", "prefill_chunk", "reps_per_block", "query_tokens", "max_context"):
            val = getattr(self, name)
            need(isinstance(val, int) and not isinstance(val, bool) and val >= 1,
                 f"{name} must be a positive integer, got {val!r}")
        for name in ("topk_blocks", "sink_tokens", "local_tokens", "embed_hits", "embed_neighbors"):
            val = getattr(self, name)
            need(isinstance(val, int) and not isinstance(val, bool) and val >= 0,
                 f"{name} must be a non-negative integer, got {val!r}")
        if self.prefill_topk is not None:
            need(isinstance(self.prefill_topk, int) and self.prefill_topk >= 0,
                 f"prefill_topk must be None or a non-negative integer, got {self.prefill_topk!r}")
        need(self.block_size % self.reps_per_block == 0,
             f"reps_per_block ({self.reps_per_block}) must divide block_size ({self.block_size})")
        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(self.selector in SELECTORS, f"selector must be one of {SELECTORS}, got {self.selector!r}")

    @property
    def body_topk(self) -> int:
        return self.topk_blocks if self.prefill_topk is None else self.prefill_topk

    def span(self) -> int:
        """Largest query-key distance (in positions) ctxmem can present to the model."""
        k = max(self.topk_blocks, self.body_topk)
        return self.sink_tokens + k * self.block_size + self.local_tokens + self.block_size + self.prefill_chunk

    def to_dict(self) -> dict:
        return asdict(self)

"""MemoryConfig: how working memory is laid out and how blocks are chosen."""
from __future__ import annotations

from dataclasses import asdict, dataclass

BACKENDS = ("auto", "torch", "batched", "numba", "cuda")
SELECTORS = ("auto", "embed", "keys")
COLD_DTYPES = ("fp32", "fp16", "int8")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value) -> int:
    """512 -> 512; "512MB" -> 512e6; "1.5GiB" -> 1.5 * 2**30. Raises ValueError naming the value."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size in bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        s = value.strip().upper().replace(" ", "")
        num = s.rstrip("KMGTIB")
        unit = s[len(num):]
        if unit not in _UNITS or not num:
            raise ValueError(f"expected a size like 512MB or 2GB, got {value!r}")
        try:
            n = int(float(num) * _UNITS[unit])
        except (ValueError, OverflowError):  # "x", "nan", "inf"
            raise ValueError(f"expected a size like 512MB or 2GB, got {value!r}") from None
    else:
        raise ValueError(f"expected a size in bytes, got {value!r}")
    if n < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return n



@dataclass
class MemoryConfig:
    """Working-memory settings. Defaults are tuned on SmolLM2-135M (see README's passkey table).

    block_size      tokens per KV block (the unit of retrieval)
    topk_blocks     blocks retrieved per layer and KV head at each step
    sink_tokens     first tokens always attended (attention sinks)
    local_tokens    most recent tokens always attended (at least this many, fewer than +block_size)
    prefill_chunk   long inputs are read in chunks of this many tokens (cost O(N x budget))
    gpu_prefill_chunk  the chunk on a CUDA model (None = prefill_chunk): a GPU reads a chunk in one
                    batched gather and SDPA call per layer, so fewer, larger chunks amortise the kernel
                    launches (32K tokens on an H200: 0.70 s at 4096 vs 6.2 s at 512). Capped so the
                    span stays inside the model's trained window.
    backend         "auto" | "torch" | "batched" | "numba" | "cuda": which implementation of the fused
                    op ("batched": the reference vectorised over rows, the GPU prefill path)
    reps_per_block  representative keys per block (means of equal sub-blocks) for key scoring
    selector        how the question and decode steps choose blocks: "embed" (sentence embedder
                    over block text, the remaining budget filled by key scores), "keys" (key
                    scores only), "auto" (embed when a tokenizer is known, else keys)
    embed_hits      blocks the embedder picks for each question / decode step ...
    embed_neighbors ... each bringing this many neighbours on either side
    embed_margin    None: the question attends the embedder's top ``embed_hits`` blocks (with
                    neighbours) and key-scored blocks up to ``topk_blocks``. A number: only the hits
                    whose similarity is within this margin of the best hit, and no key-scored fill
                    (a small model reads a few relevant blocks better than many; see README).
                    In a batch, every row attends as many blocks as the row with the most hits.
    query_tokens    the last N tokens form the embedder's query text
    prefill_topk    blocks retrieved by key scores while reading the body of a long input
                    (None = topk_blocks; 0 = sinks + local window only, StreamingLLM-style)
    prefill_local   local window while reading the body (None = local_tokens). Question and
                    decode steps keep local_tokens. prefill_topk=0 with prefill_local=640 spends the
                    default's budget on recent tokens instead; no consistent gain yet (README, MemoryConfig)
    max_context     refuse inputs longer than this many tokens (clear error, not an OOM)
    embedder        sentence-transformers id/path for the embed selector ("minilm" = bundled)
    ram_budget      None = keep every block in RAM (fastest). Else bytes (int, or "512MB", "2GB")
                    of decoded KV blocks cached in RAM; colder blocks live in a disk file. Sinks,
                    the local tail and the block representatives stay in RAM on top of it.
    cold_dtype      how blocks leaving the live tail are stored when ram_budget is set:
                    "fp16" (default), "int8" (per-channel scales) or "fp32" (exact)
    offload_dir     folder for the cold file (default: the system temp folder)
    reread_tokens   512 (0 = off): when a question follows a long input (or a saved memory), the
                    embedder ranks the input's blocks against the question's text, and up to this
                    many tokens of the best blocks (each with ``embed_neighbors`` neighbours, in
                    document order) are read again as fresh text just before the question, in the
                    question's own chunk, so the question and the first answer tokens attend them
                    densely ("the knowledge path applied to the context itself"). Needs the embed
                    selector (a tokenizer and an embedder). The question is the text after the
                    prompt's last blank line within its final ``reread_question_max`` tokens.
                    On real text: 33/36 keys found at 4K-32K vs 8/36 for plain RAG and 2/8 without
                    it (benchmarks/preregistered/reread.md). Cut to fit the model's trained window
                    (``reread_budget``).
    reread_question_max  the longest question tail (tokens) searched for that blank line; without
                    one, the last ``query_tokens`` tokens count as the question
    reader          a LoRA adapter (``ctxmem.reader``) switched on for question chunks and decode
                    steps only: "auto" (the default) = the one ``load_model`` attached to a bundled
                    model (SmolLM2: "smollm2-reader"; other models have none), None = none, else a
                    bundled name or a folder
    """

    block_size: int = 64
    topk_blocks: int = 9
    sink_tokens: int = 64
    local_tokens: int = 128
    prefill_chunk: int = 512
    gpu_prefill_chunk: int | None = 4096
    backend: str = "auto"
    reps_per_block: int = 4
    selector: str = "auto"
    embed_hits: int = 3
    embed_neighbors: int = 1
    embed_margin: float | None = 0.1
    query_tokens: int = 48
    prefill_topk: int | None = None
    prefill_local: int | None = None
    max_context: int = 2_000_000
    embedder: str = "minilm"
    ram_budget: int | str | None = None
    cold_dtype: str = "fp16"
    offload_dir: str | None = None
    reread_tokens: int = 512
    reread_question_max: int = 256
    reader: str | None = "auto"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"MemoryConfig: {msg}")

        def whole(val, least: int) -> bool:  # an int (not a bool) of at least ``least``
            return isinstance(val, int) and not isinstance(val, bool) and val >= least

        for name in ("block_size", "prefill_chunk", "reps_per_block", "query_tokens", "max_context",
                     "reread_question_max"):
            val = getattr(self, name)
            need(whole(val, 1), f"{name} must be a positive integer, got {val!r}")
        for name in ("topk_blocks", "sink_tokens", "local_tokens", "embed_hits", "embed_neighbors", "reread_tokens"):
            val = getattr(self, name)
            need(whole(val, 0), f"{name} must be a non-negative integer, got {val!r}")
        for name in ("prefill_topk", "prefill_local", "gpu_prefill_chunk"):
            val = getattr(self, name)
            need(val is None or whole(val, 1 if name == "gpu_prefill_chunk" else 0),
             f"{name} must be None or a {'positive' if name == 'gpu_prefill_chunk' else 'non-negative'} integer, "
             f"got {val!r}")
        # the bounded-RAM tier spills blocks by one fixed local window; two windows are not wired there yet
        need(self.ram_budget is None or self.prefill_local_tokens == self.local_tokens,
             "prefill_local (a body window other than local_tokens) does not work with ram_budget yet")
        if self.embed_margin is not None:
            m = self.embed_margin
            need(isinstance(m, (int, float)) and not isinstance(m, bool) and m == m and m >= 0,
                 f"embed_margin must be None or a non-negative number, got {m!r}")
        need(self.block_size % self.reps_per_block == 0,
             f"reps_per_block ({self.reps_per_block}) must divide block_size ({self.block_size})")
        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(self.selector in SELECTORS, f"selector must be one of {SELECTORS}, got {self.selector!r}")
        need(self.cold_dtype in COLD_DTYPES, f"cold_dtype must be one of {COLD_DTYPES}, got {self.cold_dtype!r}")
        need(self.reader is None or (isinstance(self.reader, str) and self.reader.strip() != ""),
             f"reader must be None or a checkpoint name/folder, got {self.reader!r}")
        if self.ram_budget is not None:
            try:
                parse_bytes(self.ram_budget)
            except ValueError as e:
                need(False, f"ram_budget: {e}")

    @property
    def ram_budget_bytes(self) -> int | None:
        return None if self.ram_budget is None else parse_bytes(self.ram_budget)

    # what a prefill (body) chunk uses: the prefill_* field, or the question's value when it is None
    @property
    def prefill_topk_blocks(self) -> int:
        return self.topk_blocks if self.prefill_topk is None else self.prefill_topk

    @property
    def prefill_local_tokens(self) -> int:
        return self.local_tokens if self.prefill_local is None else self.prefill_local

    def span(self, chunk: int | None = None) -> int:
        """Largest query-key distance (in positions) ctxmem can present to the model, reading in
        chunks of ``chunk`` tokens (default ``prefill_chunk``)."""
        reach = max(self.topk_blocks * self.block_size + self.local_tokens,  # question and decode steps
                    self.prefill_topk_blocks * self.block_size + self.prefill_local_tokens)  # body chunks
        return self.sink_tokens + reach + self.block_size + (self.prefill_chunk if chunk is None else chunk)

    def reread_budget(self, window: int | None) -> int:
        """Tokens of passages a question may read again on a model trained on ``window`` positions:
        ``reread_tokens``, cut so that the question's chunk (passages + question, read as one) and the
        decode steps after it (whose local window covers both) stay inside the window; 0 = none fit."""
        if not self.reread_tokens or window is None:
            return self.reread_tokens
        fixed = self.sink_tokens + self.topk_blocks * self.block_size + self.local_tokens + self.block_size + 1
        return max(0, min(self.reread_tokens, window - fixed - self.reread_question_max))

    def chunk_for(self, device_type: str, window: int | None = None) -> int:
        """The read chunk on a device: ``gpu_prefill_chunk`` on CUDA (never below ``prefill_chunk``,
        cut to a multiple of ``block_size`` that keeps the span inside ``window``), else ``prefill_chunk``."""
        if device_type != "cuda" or self.gpu_prefill_chunk is None:
            return self.prefill_chunk
        chunk = self.gpu_prefill_chunk
        if window is not None and self.span(chunk) > window:
            room = window - self.span(0)
            chunk = room - room % self.block_size
        return max(chunk, self.prefill_chunk)

    def to_dict(self) -> dict:
        return asdict(self)

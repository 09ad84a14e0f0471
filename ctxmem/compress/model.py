"""The learned compressor: n tokens in, m summary tokens out (ICAE-style, optionally anchored).

Encoder = the base causal LM with a LoRA adapter (peft) and ``m`` learned memory-slot embeddings
appended after the segment: ``[BOS, segment (n tokens), slot_1 .. slot_m]``. The final hidden
states at the slots (after the model's final norm) go through a small projector initialised to
identity, times a gain that maps the hidden-state scale to the input-embedding scale (measured
on SmolLM2: final hidden states have norm ~54, input embeddings ~3.2). Those are the summary
tokens. With ``anchor="last"`` each summary token is the embedding of one of the segment's last
m tokens plus that projected hidden state: a learned residual over truncation (measured first:
an untrained ICAE summary recovers ~0 of the full context's gain at 8x while keeping the last
m tokens recovers ~0.6 on code; the anchor starts training from the strong baseline).
The decoder is the *same* model object with the adapter switched off, so it is exactly
the frozen base model; it reads ``[BOS, summary..., text...]`` as ``inputs_embeds``.

Long texts are cut into segments of n tokens, each compressed on its own, and the summaries
are concatenated: ``ceil(tokens / n) * m`` summary tokens in all.

The base model is never resized (SmolLM2 ties input and output embeddings) and is never
changed outside :meth:`Compressor.encode`: the adapter is off except inside it.
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .._checkpoint import CheckpointKind

FORMAT = 1
KIND = "ctxmem-compressor"
BUNDLED_DIR = Path(__file__).resolve().parent / "checkpoints"

_ADAPTER_IDS = itertools.count()


class CompressorError(ValueError):
    """A compressor checkpoint or input is wrong; the message names what and where."""


@dataclass
class CompressorConfig:
    base_model: str = "smollm2"
    ratio: int = 8
    segment_tokens: int = 128
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                              "gate_proj", "up_proj", "down_proj"])
    bos_id: int = 0
    hidden_size: int = 0
    gain: float = 1.0  # initial value of the learned output gain (hidden-state scale -> embedding scale)
    # "none": summary = gain * proj(h) (pure ICAE). "last": summary_j = emb(last m tokens)_j + gain * proj(h_j),
    # a residual over truncation: the decoder keeps the recent tokens and the encoder adds the rest.
    anchor: str = "none"

    def __post_init__(self):
        if self.ratio < 1 or self.segment_tokens < 1:
            raise CompressorError(f"ratio and segment_tokens must be >= 1 (got {self.ratio}, {self.segment_tokens})")
        if self.segment_tokens % self.ratio:
            raise CompressorError(f"segment_tokens ({self.segment_tokens}) must be a multiple of ratio ({self.ratio})")
        self.lora_targets = list(self.lora_targets)
        if self.anchor not in ("none", "last"):
            raise CompressorError(f"anchor must be 'none' or 'last', got {self.anchor!r}")

    @property
    def slots(self) -> int:
        return self.segment_tokens // self.ratio

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "CompressorConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CompressorError(f"{where}: unknown compressor config keys {sorted(unknown)}")
        return cls(**d)


def _need_peft():
    try:
        import peft  # noqa: F401
    except ImportError as e:  # pragma: no cover - peft is a dependency; a trimmed install may lack it
        raise RuntimeError("the compressor needs peft (a ctxmem dependency): pip install 'peft>=0.12,<0.30'") from e
    return peft


CHECKPOINT = CheckpointKind("compressor", KIND, FORMAT, BUNDLED_DIR, CompressorError)
CONFIG_FILE, WEIGHTS_FILE = CHECKPOINT.config_file, CHECKPOINT.weights_file  # compressor.json, compressor.safetensors


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A bundled name (``smollm2-r8``) or a folder holding compressor.json + compressor.safetensors."""
    return CHECKPOINT.resolve(name_or_path)


class Compressor(nn.Module):
    """Distils each segment of ``n`` tokens into ``m = n / ratio`` soft summary tokens.

    ``compress(text_or_ids)`` returns a ``(ceil(T / n) * m, hidden)`` tensor to feed the frozen
    decoder as an ``inputs_embeds`` prefix (see :meth:`prefix`). The base model is shared, not
    copied: ``comp.model`` is the model you passed (with a LoRA adapter injected, off by default).
    """

    def __init__(self, model: nn.Module, tokenizer=None, config: CompressorConfig | None = None, seed: int = 0):
        super().__init__()
        peft = _need_peft()
        config = config or CompressorConfig()
        d = model.get_input_embeddings().weight.shape[1]
        if config.hidden_size and config.hidden_size != d:
            raise CompressorError(f"compressor was made for hidden size {config.hidden_size}, "
                                  f"but the model has {d} (wrong base model? config says {config.base_model!r})")
        config.hidden_size = d
        vocab = model.get_input_embeddings().weight.shape[0]
        if not 0 <= config.bos_id < vocab:
            raise CompressorError(f"bos_id {config.bos_id} is outside the model's vocabulary (size {vocab})")
        self.config = config
        object.__setattr__(self, "model", model)  # shared, not a registered submodule (not in state_dict)
        self.tokenizer = tokenizer
        ref = model.get_input_embeddings().weight
        g = torch.Generator().manual_seed(seed)
        emb_std = float(ref.detach().float().std())
        self.slots = nn.Parameter((torch.randn(config.slots, d, generator=g) * emb_std).to(ref.dtype))
        self.ae = nn.Parameter((torch.randn(d, generator=g) * emb_std).to(ref.dtype))  # "reconstruct" marker
        self.proj = nn.Linear(d, d, bias=True, dtype=ref.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(d, dtype=ref.dtype))
            self.proj.bias.zero_()
        self.gain = nn.Parameter(torch.tensor(float(config.gain), dtype=ref.dtype))
        self.to(ref.device)
        # LoRA on the base model, off except inside encode().
        self.adapter_name = f"ctxmem_c{next(_ADAPTER_IDS)}"
        torch.manual_seed(seed)  # peft initialises lora_A with the global generator
        lcfg = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                               target_modules=list(config.lora_targets), bias="none")
        peft.inject_adapter_in_model(lcfg, model, adapter_name=self.adapter_name)
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._lora_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)
                             and self.adapter_name in m._get_available_adapters()]
        if not self._lora_layers:
            raise CompressorError(f"LoRA targets {config.lora_targets} match no module of this model")
        self._set_lora(False)

    # ---- adapter switching -------------------------------------------------------------
    def _set_lora(self, on: bool) -> None:
        # Set peft's flags directly: its public enable_adapters()/set_adapter() also flip
        # requires_grad on the LoRA weights, which would drop their gradients mid-step.
        # tests/test_compress.py checks that "off" is exactly the stock model.
        for m in self._lora_layers:
            m._active_adapter = [self.adapter_name] if on else [a for a in m.active_adapters if a != self.adapter_name]
            m._disable_adapters = not on

    def remove_adapter(self) -> None:
        """Take this compressor's LoRA adapter out of the base model (the compressor is unusable after).

        ``wrap(model, compressor="name")`` loads a compressor on the wrapped model and removes it
        again at ``unwrap``, so wrapping repeatedly does not pile adapters up in the model.
        """
        for m in self._lora_layers:
            if self.adapter_name in m._get_available_adapters():
                m.delete_adapter(self.adapter_name)
        self._lora_layers = []

    @contextmanager
    def lora(self):
        if not self._lora_layers:
            raise CompressorError("this compressor's adapter was removed from its model (remove_adapter); load it again")
        self._set_lora(True)
        try:
            yield
        finally:
            self._set_lora(False)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        out = {}
        tag = f".{self.adapter_name}."
        for name, p in self.model.named_parameters():
            if tag in name:
                out[name.replace(tag, ".")] = p
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters()) + list(self.lora_parameters().values())

    # ---- pieces ------------------------------------------------------------------------
    @property
    def slots_per_segment(self) -> int:
        return self.config.slots

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.slots.device))

    def bos(self, batch: int) -> torch.Tensor:
        ids = torch.full((batch, 1), self.config.bos_id, dtype=torch.long, device=self.slots.device)
        return self.embed(ids)

    def encode(self, seg_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, 1 <= L <= n -> (B, m, d) summary tokens."""
        if seg_ids.dim() != 2 or seg_ids.shape[1] == 0:
            raise CompressorError(f"encode expects a (batch, length>0) id tensor, got shape {tuple(seg_ids.shape)}")
        if seg_ids.shape[1] > self.config.segment_tokens:
            raise CompressorError(f"segment of {seg_ids.shape[1]} tokens exceeds segment_tokens={self.config.segment_tokens}")
        b = seg_ids.shape[0]
        x = torch.cat([self.bos(b), self.embed(seg_ids), self.slots.unsqueeze(0).expand(b, -1, -1)], dim=1)
        with self.lora():
            out = self.model.model(inputs_embeds=x, use_cache=False)
        h = out.last_hidden_state[:, -self.config.slots:]
        summary = self.proj(h) * self.gain
        if self.config.anchor == "last":
            m, L = self.config.slots, seg_ids.shape[1]
            last = self.embed(seg_ids[:, -m:])  # (B, min(m, L), d)
            if L < m:  # a short last segment: its tokens sit in the last slots
                last = torch.cat([last.new_zeros(b, m - L, last.shape[-1]), last], dim=1)
            summary = summary + last
        return summary

    def prefix(self, summary: torch.Tensor) -> torch.Tensor:
        """``[BOS, summary...]`` as the decoder's inputs_embeds prefix: (k, d) or (B, k, d) -> (B, 1 + k, d)."""
        if summary.dim() == 2:
            summary = summary.unsqueeze(0)
        return torch.cat([self.bos(summary.shape[0]).to(summary.dtype), summary], dim=1)

    def tokenize(self, text_or_ids) -> torch.Tensor:
        if isinstance(text_or_ids, str):
            if self.tokenizer is None:
                raise CompressorError("compress(text) needs a tokenizer; pass tokenizer= or give token ids")
            ids = self.tokenizer(text_or_ids, add_special_tokens=False)["input_ids"]
            return torch.tensor(ids, dtype=torch.long)
        ids = torch.as_tensor(text_or_ids, dtype=torch.long)
        if ids.dim() != 1:
            raise CompressorError(f"compress expects text or a 1-D list of token ids, got shape {tuple(ids.shape)}")
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise CompressorError(f"token ids must lie in [0, {vocab}); got range [{int(ids.min())}, {int(ids.max())}]")
        return ids

    @torch.no_grad()
    def compress(self, text_or_ids, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """Text or token ids -> ``(ceil(T / n) * m, d)`` summary tokens (empty input -> ``(0, d)``).

        ``progress``: a progress bar over segments when there is more than one batch of them."""
        ids = self.tokenize(text_or_ids)
        n, d = self.config.segment_tokens, self.config.hidden_size
        full = ids.numel() // n
        parts = []
        if full:
            segs = ids[: full * n].view(full, n)
            bar = None
            if progress and full > batch_size:
                from tqdm.auto import tqdm
                bar = tqdm(total=full * n, unit="tok", unit_scale=True, desc="ctxmem: compressing", leave=False)
            for i in range(0, full, batch_size):
                parts.append(self.encode(segs[i:i + batch_size]).reshape(-1, d))
                if bar is not None:
                    bar.update(segs[i:i + batch_size].numel())
            if bar is not None:
                bar.close()
        if ids.numel() % n:
            parts.append(self.encode(ids[full * n:].unsqueeze(0)).reshape(-1, d))
        if not parts:
            return torch.zeros(0, d, dtype=self.slots.dtype, device=self.slots.device)
        return torch.cat(parts, dim=0)

    def summary_count(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.config.segment_tokens) * self.config.slots

    # ---- persistence -------------------------------------------------------------------
    def weights(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        state = {k: v.detach() for k, v in self.state_dict().items()}
        state.update({f"lora.{k}": v.detach() for k, v in self.lora_parameters().items()})
        return {k: (v.to(dtype) if dtype is not None else v).contiguous().cpu() for k, v in state.items()}

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None, meta: dict | None = None) -> Path:
        """Write ``compressor.safetensors`` then ``compressor.json`` (version, config, sha256), atomically."""
        return CHECKPOINT.write(path, self.weights(dtype), self.config.to_dict(), meta or {},
                                weights_info={"dtype": str(dtype or self.slots.dtype).replace("torch.", "")})

    @staticmethod
    def read_checkpoint(name_or_path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
        """(compressor.json's document, the tensors, the folder) of a bundled name or a folder, checksum verified."""
        return CHECKPOINT.read(name_or_path)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, model=None, tokenizer=None, device: str | None = None):
        """Load a bundled compressor (``"smollm2-r8"``) or a saved folder; loads its base model unless given."""
        doc, state, path = cls.read_checkpoint(name_or_path)
        config = CompressorConfig.from_dict(doc["config"], where=str(path / CONFIG_FILE))
        if model is None:
            from ..models import load_model

            model, tok = load_model(config.base_model, device=device)
            tokenizer = tokenizer or tok
        comp = cls(model, tokenizer, config)
        try:
            comp.load_weights(state, where=str(path / WEIGHTS_FILE))
        except BaseException:
            comp.remove_adapter()  # leave the caller's model as it was
            raise
        comp.meta = doc.get("meta", {})
        comp.source = str(path)
        return comp.eval()

    @classmethod
    def grown(cls, source: "Compressor", lora_r: int, seed: int = 0) -> "Compressor":
        """A compressor computing exactly what ``source`` computes, with LoRA rank ``lora_r`` >= source's.

        The extra rank is capacity for a second training stage (``ctxmem compressor train --init-from X
        --lora-r R``): each adapter's A gains rows (random, as peft initialises A) and its B gains zero
        columns, so B @ A is unchanged, and lora_alpha grows with r so peft's scaling alpha / r is too.
        ``source``'s adapter is removed from the shared model; the new one takes its place."""
        old = source.config
        if isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < old.lora_r:
            raise CompressorError(f"lora_r must be an int >= the checkpoint's rank {old.lora_r}, got {lora_r!r}")
        if (old.lora_alpha * lora_r) % old.lora_r:
            raise CompressorError(f"rank {old.lora_r} -> {lora_r} would need a fractional lora_alpha "
                                  f"({old.lora_alpha} * {lora_r} / {old.lora_r}); choose a multiple of {old.lora_r}")
        state = source.weights()
        cfg = CompressorConfig.from_dict({**old.to_dict(), "lora_r": lora_r,
                                          "lora_alpha": old.lora_alpha * lora_r // old.lora_r})
        model, tok = source.model, source.tokenizer
        source.remove_adapter()
        comp = cls(model, tok, cfg, seed=seed)
        fresh = comp.weights()
        r0 = old.lora_r
        for k, t in state.items():
            if k.startswith("lora.") and ".lora_A." in k:  # [r, in]: old rows first, fresh random rows after
                state[k] = torch.cat([t, fresh[k][r0:].to(t.dtype)], 0)
            elif k.startswith("lora.") and ".lora_B." in k:  # [out, r]: old columns first, zeros after
                state[k] = torch.cat([t, t.new_zeros(t.shape[0], lora_r - r0)], 1)
        comp.load_weights(state, where="grown weights")
        comp.meta, comp.source = dict(getattr(source, "meta", {})), getattr(source, "source", None)
        return comp.train(source.training)

    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor], where: str = "weights") -> None:
        own = {k: v for k, v in self.state_dict().items()}
        lora = {f"lora.{k}": p for k, p in self.lora_parameters().items()}
        expected = set(own) | set(lora)
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise CompressorError(f"{where}: weights do not match this model/config "
                                  f"(missing {sorted(missing)[:3]}{'...' if len(missing) > 3 else ''}, "
                                  f"unexpected {sorted(unexpected)[:3]}{'...' if len(unexpected) > 3 else ''})")
        for k, t in itertools.chain(own.items(), lora.items()):
            if tuple(state[k].shape) != tuple(t.shape):
                raise CompressorError(f"{where}: {k} has shape {tuple(state[k].shape)}, expected {tuple(t.shape)}")
            t.copy_(state[k].to(t.dtype))

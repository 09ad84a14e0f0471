"""The reader: a LoRA adapter that is on only where ctxmem composes memory for a question.

A small model reads a long input through working memory as sinks + a few retrieved blocks + the
local window. Retrieval finds the right block (README: the embedder ranks the needle's block first),
yet SmolLM2 sometimes fails to *read* it from that composed context, answering with a restatement
of the question. The reader is trained with ctxmem attention in the loop (``ctxmem.reader.train``):
the body of the input is read by the stock model, exactly as without it, and the adapter is switched
on only for the question chunk (the last chunk of each input) and the decode steps, the forwards
that attend the retrieved blocks to answer; every body chunk is stored exactly as without it.

Weights: ``reader.safetensors`` (LoRA A/B) and ``reader.json`` (config, sha256), no pickle.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .._checkpoint import CheckpointKind

FORMAT = 1
KIND = "ctxmem-reader"
BUNDLED_DIR = Path(__file__).resolve().parent / "checkpoints"
_IDS = itertools.count()


class ReaderError(ValueError):
    """A reader checkpoint is wrong; the message names what and where."""


@dataclass
class ReaderConfig:
    base_model: str = "smollm2"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        if not (isinstance(self.lora_r, int) and self.lora_r >= 1):
            raise ReaderError(f"lora_r must be a positive integer, got {self.lora_r!r}")
        self.lora_targets = list(self.lora_targets)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "ReaderConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ReaderError(f"{where}: unknown reader config keys {sorted(unknown)}")
        return cls(**d)


CHECKPOINT = CheckpointKind("reader", KIND, FORMAT, BUNDLED_DIR, ReaderError)
CONFIG_FILE, WEIGHTS_FILE = CHECKPOINT.config_file, CHECKPOINT.weights_file  # reader.json, reader.safetensors


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A bundled name (``smollm2-reader``) or a folder holding reader.json + reader.safetensors."""
    return CHECKPOINT.resolve(name_or_path)


class Reader:
    """A LoRA adapter injected into ``model`` (shared, not copied), off unless :meth:`set` turns it on."""

    def __init__(self, model: nn.Module, config: ReaderConfig | None = None, seed: int = 0):
        import peft
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.config = config or ReaderConfig()
        self.model = model
        self.adapter_name = f"ctxmem_reader{next(_IDS)}"
        self.meta: dict = {}
        self.source: str | None = None
        lcfg = peft.LoraConfig(r=self.config.lora_r, lora_alpha=self.config.lora_alpha, lora_dropout=0.0,
                               target_modules=list(self.config.lora_targets), bias="none")
        with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator: seed it, then restore
            torch.manual_seed(seed)
            with warnings.catch_warnings():  # "multiple adapters in the model": yes, on purpose (a compressor's too)
                warnings.filterwarnings("ignore", message=".*peft_config.*")
                peft.inject_adapter_in_model(lcfg, model, adapter_name=self.adapter_name)
        self._layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)
                        and self.adapter_name in m._get_available_adapters()]
        if not self._layers:
            raise ReaderError(f"LoRA targets {self.config.lora_targets} match no module of this model")
        self.set(False)

    def set(self, on: bool) -> None:
        """Switch the adapter on or off, leaving any other adapter's state (a compressor's) alone.

        peft's flags are set directly: its enable/disable helpers also flip requires_grad on the
        LoRA weights, which would drop their gradients in the middle of a training step."""
        if not self._layers:
            raise ReaderError("this reader's adapter was removed from its model; load it again")
        for m in self._layers:
            active = [a for a in m.active_adapters if a != self.adapter_name] + ([self.adapter_name] if on else [])
            m._active_adapter = active
            m._disable_adapters = not active

    def remove_adapter(self) -> None:
        for m in self._layers:
            if self.adapter_name in m._get_available_adapters():
                m.delete_adapter(self.adapter_name)
        self._layers = []

    def parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA weights by a name that does not depend on the adapter's runtime name."""
        tag = f".{self.adapter_name}."
        return {n.replace(tag, "."): p for n, p in self.model.named_parameters() if tag in n}

    # ---- save / load ---------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, meta: dict | None = None) -> Path:
        """Write ``reader.safetensors`` then ``reader.json`` (format, config, sha256), each atomically."""
        return CHECKPOINT.write(path, {k: v.detach().contiguous().cpu() for k, v in self.parameters().items()},
                                asdict(self.config), meta if meta is not None else self.meta)

    @staticmethod
    def read_checkpoint(name_or_path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
        """(reader.json's document, the LoRA tensors, the folder) of a bundled name or a folder, checksum verified."""
        return CHECKPOINT.read(name_or_path)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, model: nn.Module) -> "Reader":
        """Load a bundled reader (``"smollm2-reader"``) or a saved folder onto ``model``."""
        doc, state, path = cls.read_checkpoint(name_or_path)
        reader = cls(model, ReaderConfig.from_dict(doc["config"], where=str(path / CONFIG_FILE)))
        try:
            reader.load_weights(state, where=str(path / WEIGHTS_FILE))
        except BaseException:
            reader.remove_adapter()  # leave the caller's model as it was
            raise
        reader.meta = doc.get("meta", {})
        reader.source = str(path)
        return reader

    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor], where: str = "weights") -> None:
        own = self.parameters()
        missing, unexpected = set(own) - set(state), set(state) - set(own)
        if missing or unexpected:
            raise ReaderError(f"{where}: weights do not match this model/config (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
        for k, p in own.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise ReaderError(f"{where}: {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[k].to(p.dtype))

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

import hashlib
import itertools
import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .._atomic import atomic_write_bytes

FORMAT = 1
KIND = "ctxmem-reader"
CONFIG_FILE = "reader.json"
WEIGHTS_FILE = "reader.safetensors"
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


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A bundled name (``smollm2-reader``) or a folder holding reader.json + reader.safetensors."""
    p = Path(name_or_path)
    if (p / CONFIG_FILE).is_file():
        return p
    b = BUNDLED_DIR / str(name_or_path)
    if (b / CONFIG_FILE).is_file():
        return b
    bundled = sorted(d.name for d in BUNDLED_DIR.iterdir() if (d / CONFIG_FILE).is_file()) if BUNDLED_DIR.is_dir() else []
    raise ReaderError(f"no reader at {str(name_or_path)!r}: not a folder with {CONFIG_FILE} "
                      f"and not a bundled name (bundled: {', '.join(bundled) or 'none'})")


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
        from safetensors.torch import save

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        blob = save({k: v.detach().contiguous().cpu() for k, v in self.parameters().items()},
                    metadata={"format": "pt", "kind": KIND})
        atomic_write_bytes(path / WEIGHTS_FILE, blob)
        doc = {"kind": KIND, "format": FORMAT, "config": asdict(self.config),
               "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(blob).hexdigest()},
               "meta": meta if meta is not None else self.meta}
        atomic_write_bytes(path / CONFIG_FILE, (json.dumps(doc, indent=2) + "\n").encode())
        return path

    @staticmethod
    def read_checkpoint(name_or_path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
        """(reader.json's document, the LoRA tensors, the folder) of a bundled name or a folder, checksum verified."""
        from safetensors.torch import load

        path = resolve_checkpoint(name_or_path)
        cfile = path / CONFIG_FILE
        try:
            doc = json.loads(cfile.read_text())
        except (OSError, ValueError) as e:
            raise ReaderError(f"{cfile}: unreadable reader config ({e})") from e
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            raise ReaderError(f"{cfile}: not a ctxmem reader config")
        if doc.get("format") != FORMAT:
            raise ReaderError(f"{cfile}: reader format {doc.get('format')!r}, this ctxmem reads format {FORMAT}")
        wfile = path / doc["weights"]["file"]
        try:
            blob = wfile.read_bytes()
        except OSError as e:
            raise ReaderError(f"{wfile}: cannot read reader weights ({e})") from e
        if hashlib.sha256(blob).hexdigest() != doc["weights"]["sha256"]:
            raise ReaderError(f"{wfile}: checksum mismatch (file corrupt or not the one {cfile} describes)")
        return doc, load(blob), path

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

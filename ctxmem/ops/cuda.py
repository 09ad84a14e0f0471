"""CUDA backend of the fused retrieval-attention op: the ``csrc/`` extension, guarded.

The extension (``ctxmem_cuda``) implements the decode step (one query per row) in the
flash-decoding style: block scoring, a radix top-k per KV head shared by the query group, a
split attention over sinks + selected blocks + local window with fp32 accumulation, and a
log-sum-exp merge (see ``csrc/README.md``). Prefill chunks (``C > 1``) run ``batched.py``: one
batched gather and one SDPA call per layer, no host loop per row (compute-bound, where SDPA's
kernels are already near the ceiling).

Building: on the first CUDA call the extension is JIT-built with ``torch.utils.cpp_extension``
(nvcc + ninja, about 30 s, one line on stderr) into the cache folder (``$CTXMEM_CUDA_CACHE``,
default ``~/.cache/ctxmem/cuda-<torch>-<cuda>``) for the archs in ``$TORCH_CUDA_ARCH_LIST``
(default: the device's own); later processes load the build without nvcc when its recorded
source hash matches ``csrc/``. ``CTXMEM_BUILD_CUDA=0`` turns the automatic build off; then, or
when nvcc or ninja is missing, a CUDA call raises an error naming what is missing and how to
build. The reference is used instead only if the user allows it (``CTXMEM_CUDA_FALLBACK=1`` or
``allow_fallback()``), with a one-time warning.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from .dispatch import OpCall, option_reasons, register_backend
from .layout import OpParams
from .batched import retrieval_attention_batched
from .reference import retrieval_attention_ref

EXT_NAME = "ctxmem_cuda"
CSRC = Path(__file__).resolve().parents[2] / "csrc"
DEFAULT_ARCHS = "8.0;9.0"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SUPPORTED_D = (64, 128)

_lock = threading.Lock()
_ext = None
_load_error: str | None = None
_fallback_allowed = os.environ.get("CTXMEM_CUDA_FALLBACK", "") not in ("", "0")
_warned = False

BUILD_HELP = (
    "the ctxmem CUDA extension is not built. It builds by itself on the first CUDA call (needs nvcc "
    "and ninja; about 30 s) unless CTXMEM_BUILD_CUDA=0; to build it explicitly:\n"
    "    python -c \"import ctxmem.ops.cuda as c; c.build(verbose=True)\"\n"
    "To run the plain-torch reference on the GPU instead, set CTXMEM_CUDA_FALLBACK=1 (or call "
    "ctxmem.ops.cuda.allow_fallback()), or choose MemoryConfig(backend=\"torch\")."
)


def _missing_tools() -> list[str]:
    """What a JIT build needs and this machine lacks (nvcc, ninja), named for the error."""
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    missing = []
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if not (nvcc and os.path.exists(nvcc)) and shutil.which("nvcc") is None:
        missing.append("nvcc (the CUDA toolkit; set CUDA_HOME)")
    if not is_ninja_available():
        missing.append("ninja (pip install ninja)")
    return missing


def _default_archs() -> str:
    """The visible GPUs' own compute capabilities (a build for the device at hand), else 8.0;9.0."""
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{ma}.{mi}" for ma, mi in caps)
    return DEFAULT_ARCHS


def sources() -> list[Path]:
    """The extension's sources: the binding first, then every kernel file."""
    return [CSRC / "binding.cpp"] + sorted(CSRC.glob("*.cu"))


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in sources() + sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    env = os.environ.get("CTXMEM_CUDA_CACHE")
    if env:
        return Path(env)
    tv = torch.__version__.split("+")[0]
    cv = (torch.version.cuda or "none").replace(".", "")
    return Path.home() / ".cache" / "ctxmem" / f"cuda-{tv}-cu{cv}"


def _load_prebuilt():
    """Import an already built extension whose source hash matches, without ninja/nvcc."""
    d = cache_dir()
    stamp = d / "sources.sha256"
    if not stamp.is_file() or stamp.read_text().strip() != _source_hash():
        return None
    for so in d.glob(f"{EXT_NAME}*.so"):
        loader = importlib.machinery.ExtensionFileLoader(EXT_NAME, str(so))
        spec = importlib.util.spec_from_file_location(EXT_NAME, so, loader=loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
        return mod
    return None


def build(verbose: bool = False):
    """JIT-build (or re-use) the extension in ``cache_dir()``; returns the module."""
    global _ext, _load_error
    from torch.utils.cpp_extension import load

    if not CSRC.is_dir():
        raise RuntimeError(f"ctxmem CUDA sources not found at {CSRC} (a source checkout is needed to build)")
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    missing = _missing_tools()
    if missing:
        raise RuntimeError("cannot build the ctxmem CUDA extension: missing " + " and ".join(missing))
    env_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not env_archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _default_archs()
    if not verbose:  # library code speaks on stderr only; one line, since this takes a while
        print(f"ctxmem: building the CUDA extension once (about 30 s) into {d}", file=sys.stderr, flush=True)
    try:
        mod = load(
            name=EXT_NAME,
            sources=[str(p) for p in sources()],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
            build_directory=str(d),
            verbose=verbose,
        )
    finally:
        if not env_archs:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
    (d / "sources.sha256").write_text(_source_hash() + "\n")
    with _lock:
        _ext, _load_error = mod, None
    return mod


def load_extension(build_if_missing: bool | None = None):
    """The extension module, or None (reason in ``load_error()``). Builds when none is cached and a
    GPU is visible, unless ``CTXMEM_BUILD_CUDA=0`` (or ``build_if_missing=False``)."""
    global _ext, _load_error
    if _ext is not None:
        return _ext
    if build_if_missing is None:
        build_if_missing = os.environ.get("CTXMEM_BUILD_CUDA", "1") != "0" and torch.cuda.is_available()
    try:
        mod = _load_prebuilt()
        if mod is None:
            try:
                import ctxmem_cuda as mod  # type: ignore[no-redef]  # installed elsewhere
            except ImportError:
                mod = None
        if mod is None and build_if_missing:
            return build()
        if mod is not None:
            with _lock:
                _ext, _load_error = mod, None
            return mod
        _load_error = BUILD_HELP
    except Exception as e:  # a broken or stale build: say why, never crash at import
        _load_error = f"loading/building the ctxmem CUDA extension failed: {e!r}\n{BUILD_HELP}"
    return None


def load_error() -> str | None:
    return _load_error


def available() -> bool:
    return load_extension() is not None


def allow_fallback(flag: bool = True) -> None:
    """Let CUDA calls run the plain-torch reference when the extension is missing."""
    global _fallback_allowed
    _fallback_allowed = bool(flag)


_index_cache: dict = {}


def _as_index(x, B: int, device) -> torch.Tensor:
    """``lengths`` / ``n_new`` on the device. The cache keeps them on the host; a plain ``.to(device)``
    of a pageable tensor synchronises the stream, once per layer and step. Every layer of a decode
    step asks for the same values: copy them once (pinned, asynchronous) and reuse the device tensor."""
    t = torch.as_tensor(x)
    if t.device == device and t.dtype == torch.int64:
        return t.reshape(B)
    if t.device.type != "cpu":
        return t.to(device=device, dtype=torch.int64).reshape(B)
    key = (device, tuple(t.reshape(-1).tolist()))
    hit = _index_cache.get(key)
    if hit is None:
        if len(_index_cache) > 256:  # one entry per distinct step; old steps are never asked again
            _index_cache.clear()
        host = t.to(torch.int64).reshape(B)
        if torch.cuda.is_available():
            host = host.pin_memory()
        hit = (host, host.to(device, non_blocking=True))  # the pinned source lives as long as the copy
        _index_cache[key] = hit
    return hit[1]


def retrieval_attention_cuda(q, k, v, reps, lengths, n_new, params: OpParams, inv_freq, bias=None):
    """CUDA implementation of ``retrieval_attention_ref`` (decode kernels; prefill chunks batched)."""
    global _warned
    B, Hq, C, D = q.shape
    if C != 1:
        return retrieval_attention_batched(q, k, v, reps, lengths, n_new, params, inv_freq, bias)
    ext = load_extension()
    if ext is None:
        if not _fallback_allowed:
            raise RuntimeError(f"ctxmem backend 'cuda': {load_error()}")
        if not _warned:
            warnings.warn("ctxmem: CUDA extension missing, running the plain-torch reference "
                          "(CTXMEM_CUDA_FALLBACK is set): " + (load_error() or ""), stacklevel=2)
            _warned = True
        return retrieval_attention_ref(q, k, v, reps, lengths, n_new, params, inv_freq, bias)
    why = option_reasons(OpCall(q, k, v, reps, lengths, n_new, params, inv_freq, bias), "cuda decode")
    if why:  # the dispatcher never sends these here; a direct call gets the reasons
        raise ValueError("; ".join(why))
    dt = q.dtype
    if k.dtype != dt or v.dtype != dt or reps.dtype != dt or D not in _SUPPORTED_D:
        # mixed dtypes would need a converted copy of the whole cache: use the reference
        return retrieval_attention_ref(q, k, v, reps, lengths, n_new, params, inv_freq, bias)
    dev = q.device
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        return ext.decode(q, k, v, reps, _as_index(lengths, B, dev), _as_index(n_new, B, dev), bias,
                          inv_freq, int(params.block_size), int(params.topk), int(params.sink),
                          int(params.local), float(params.scaling), int(stream))


def _unsupported(q: torch.Tensor) -> str | None:
    if q.device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors (got {q.device.type})"
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"the cuda backend supports float32, float16 and bfloat16 (got {q.dtype})"
    if q.shape[-1] not in _SUPPORTED_D:
        return f"the cuda kernels are built for head dim 64 and 128 (got {q.shape[-1]})"
    # a missing build is *not* a reason to pass: the call raises with build instructions
    return None


def _reasons(call) -> list[str]:
    """Every reason the CUDA backend cannot run this call (the dispatcher's view)."""
    first = _unsupported(call.q)
    if first is not None:
        return [first]
    why = []
    if any(t.dtype != call.q.dtype for t in (call.k, call.v, call.reps)):
        why.append(f"q, k, v and reps must share one dtype (got {call.q.dtype}, {call.k.dtype}, {call.v.dtype}, "
                   f"{call.reps.dtype}); a converted copy of the whole store would be needed")
    if call.q.shape[2] == 1:  # prefill chunks run on 'batched', which has every option
        why += option_reasons(call, "cuda decode")
    if call.q.shape[2] == 1 and _fallback_allowed and load_extension() is None:
        why.append("the extension is not built (CTXMEM_CUDA_FALLBACK is set)")
    return why


register_backend("cuda", retrieval_attention_cuda, _reasons, prefill="batched", fallback_ok=lambda: _fallback_allowed)

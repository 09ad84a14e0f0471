"""Compressed memory: a learned compressor turns each segment of n tokens into m summary tokens.

    comp = ctxmem.Compressor.from_pretrained("smollm2-r8")   # bundled, or a saved folder
    summary = comp.compress("long text")                      # (ceil(T / n) * m, hidden)
    embeds = comp.prefix(summary)                             # [BOS, summary] for inputs_embeds

Training (``ctxmem compressor train``) and evaluation against baselines (``ctxmem compressor
eval``) live in :mod:`.train` and :mod:`.evaluate`. Names load lazily, so the CLI parser does
not import torch.
"""
from importlib import import_module

__all__ = ["Compressor", "CompressorConfig", "CompressorError"]


def __getattr__(name):
    if name in __all__:
        value = getattr(import_module(".model", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ctxmem.compress' has no attribute {name!r}")

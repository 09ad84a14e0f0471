"""The reader: a LoRA adapter trained with ctxmem attention in the loop, on only for questions.

    ctxmem.wrap(model, reader="smollm2-reader")     # bundled, or a folder saved by the trainer

Training: ``python -m ctxmem.reader.train`` (see :mod:`.train`). Names load lazily.
"""
from importlib import import_module

__all__ = ["Reader", "ReaderConfig", "ReaderError"]


def __getattr__(name):
    if name in __all__:
        value = getattr(import_module(".adapter", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ctxmem.reader' has no attribute {name!r}")

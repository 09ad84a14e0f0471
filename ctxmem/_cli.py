"""What every ``ctxmem`` command shares: one contract for exit codes, errors and ``--json``.

* exit 0 on success; 1 on a handled error, with one line ``PREFIX: error: MSG`` on stderr (no
  traceback); 2 on bad usage (argparse's own); 130 on Ctrl-C, with one line on stderr.
* with ``--json``, stdout carries exactly one JSON object: the result, or for a handled error (and
  Ctrl-C) ``{"ok": false, "error": MSG, "kind": KIND}``, KIND the exception's class name.
* library code never writes to stdout (progress bars and one-time messages go to stderr).
"""
from __future__ import annotations

import functools
import json
import sys

# what a handler's failure may raise and still count as "handled" (one line, exit 1)
HANDLED = (OSError, ValueError, RuntimeError)


def fail(prefix: str, msg: str, as_json: bool = False, kind: str = "error", **extra) -> int:
    """Print ``PREFIX: error: MSG`` on stderr (and ``{"ok": false, "error": MSG, "kind": KIND}`` on
    stdout with --json); return exit code 1."""
    if as_json:
        print(json.dumps({"ok": False, "error": msg, "kind": kind, **extra}), flush=True)
    print(f"{prefix}: error: {msg}", file=sys.stderr, flush=True)
    return 1


def error_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def interrupted(prefix: str, as_json: bool, hint: str = "") -> int:
    """Ctrl-C: one line on stderr (and a JSON error with --json); exit code 130."""
    if as_json:
        print(json.dumps({"ok": False, "error": "interrupted", "kind": "KeyboardInterrupt"}), flush=True)
    print(f"{prefix}: interrupted{hint}", file=sys.stderr, flush=True)
    return 130


def handled(prefix: str, errors: tuple[type[BaseException], ...] = HANDLED,
            hint: str = " (rerun the same command to resume)"):
    """Decorate a handler ``fn(args) -> int``: ``errors`` become a one-line message and exit code 1,
    Ctrl-C exit code 130 with ``hint``."""
    def deco(fn):
        @functools.wraps(fn)
        def run(args) -> int:
            as_json = getattr(args, "json", False)
            try:
                return fn(args)
            except KeyboardInterrupt:
                return interrupted(prefix, as_json, hint)
            except BrokenPipeError:  # `ctxmem ... | head`: not an error; the caller silences stdout
                raise
            except errors as e:
                return fail(prefix, error_line(e), as_json, kind=type(e).__name__)
        return run
    return deco


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is a clear error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device visible to torch (use --device cpu or auto)")
    return name

"""What every ``ctxmem`` subcommand group shares: one-line errors instead of tracebacks."""
from __future__ import annotations

import functools
import json
import sys


def fail(prefix: str, msg: str, as_json: bool = False) -> int:
    """Print ``PREFIX: error: MSG`` on stderr (and ``{"ok": false, ...}`` on stdout with --json); exit code 1."""
    if as_json:
        print(json.dumps({"ok": False, "error": msg}))
    print(f"{prefix}: error: {msg}", file=sys.stderr)
    return 1


def handled(prefix: str, errors: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError)):
    """Decorate a handler ``fn(args) -> int``: ``errors`` become a one-line message and exit code 1,
    Ctrl-C exit code 130 with a hint that rerunning resumes."""
    def deco(fn):
        @functools.wraps(fn)
        def run(args) -> int:
            try:
                return fn(args)
            except KeyboardInterrupt:
                print(f"{prefix}: interrupted (rerun the same command to resume)", file=sys.stderr)
                return 130
            except errors as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                return fail(prefix, msg, getattr(args, "json", False))
        return run
    return deco

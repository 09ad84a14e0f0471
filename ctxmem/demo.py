"""`make demo`: the main job on the bundled defaults, offline.

Builds a long real document every machine has — the Python language reference that ships with
CPython (``pydoc_data.topics``), about 40K tokens — hides one sentence deep inside it (70% of the
way through), and runs ``ctxmem ask`` on it with the bundled SmolLM2-135M (trained window 8K).
Prints the answer, the context length, the time and the peak memory.
"""
from __future__ import annotations

import sys

from .cli import main as cli_main
from .models import cache_root

FACT = "The secret code of the ctxmem demo is 7 3 9 1 5."
QUESTION = "What is the secret code of the ctxmem demo?"


def build_document(target_chars: int = 170_000, depth: float = 0.7) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:target_chars]
    cut = text.rfind("\n\n", 0, int(len(text) * depth)) + 2
    return text[:cut] + FACT + "\n\n" + text[cut:]


def main(argv: list[str] | None = None) -> int:
    path = cache_root() / "demo" / "python-reference-with-fact.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_document())
    print(f"ctxmem demo: reading {path} ({path.stat().st_size:,} bytes), hidden fact at 70% depth:\n  {FACT!r}\n"
          f"question: {QUESTION!r}", flush=True)
    return cli_main(["ask", "--context", str(path), QUESTION, *(argv or [])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

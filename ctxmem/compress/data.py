"""Training and evaluation text: the Python standard library's own source and docstrings.

Every machine with Python carries it, so anyone can reproduce a checkpoint. Whole modules are
held out for evaluation (:data:`HELDOUT`); training never sees any part of them.

``--data`` accepts files, folders (their ``*.py`` files) and two names: ``stdlib`` (the
training set: the stdlib minus tests, site-packages and the held-out modules) and
``stdlib-heldout`` (the held-out modules).
"""
from __future__ import annotations

import random
import sysconfig
from functools import lru_cache
from pathlib import Path

# Whole modules kept out of training, for evaluation. Chosen for variety (prose-heavy docs,
# algorithms, parsing, numerics), fixed before any training run.
HELDOUT = ("argparse.py", "difflib.py", "textwrap.py", "statistics.py", "fractions.py", "calendar.py",
           "shlex.py", "heapq.py", "bisect.py", "graphlib.py", "ipaddress.py", "string.py")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test", "ensurepip"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(heldout: bool = False) -> list[Path]:
    root = stdlib_root()
    if heldout:
        return [root / f for f in HELDOUT if (root / f).is_file()]
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if str(rel) in HELDOUT:
            continue
        out.append(p)
    return out


def resolve_data(paths: list[str]) -> list[Path]:
    """Expand ``--data`` arguments into a sorted, de-duplicated list of text files."""
    files: list[Path] = []
    for arg in paths:
        if arg == "stdlib":
            files += stdlib_files(heldout=False)
        elif arg == "stdlib-heldout":
            files += stdlib_files(heldout=True)
        else:
            p = Path(arg)
            if p.is_dir():
                files += sorted(p.rglob("*.py"))
            elif p.is_file():
                files.append(p)
            else:
                raise FileNotFoundError(f"--data {arg!r}: no such file or folder (or use 'stdlib' / 'stdlib-heldout')")
    seen, out = set(), []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    if not out:
        raise ValueError(f"--data {paths}: no files found")
    return out


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return path.read_text(encoding="utf-8", errors="replace")


class WindowSampler:
    """Random windows of ``length`` tokens from a list of files; batch ``step`` depends only on (seed, step).

    That makes a resumed run see exactly the batches an uninterrupted one would.
    """

    def __init__(self, files: list[Path], tokenizer, length: int, batch_size: int, seed: int = 0,
                 cache_files: int = 64):
        self.files = list(files)
        self.tok = tokenizer
        self.length = length
        self.batch_size = batch_size
        self.seed = seed
        self.sizes = [max(1, f.stat().st_size) for f in self.files]
        self._cached = lru_cache(maxsize=cache_files)(self._text)

    def _text(self, i: int) -> str:
        return read_text(self.files[i])

    def batch(self, step: int):
        """(batch_size, length) token windows; a window is cut from a random character offset of a
        file chosen with probability proportional to its size (tokenizing only a slice, not the file)."""
        import torch

        rng = random.Random(f"{self.seed}:{step}")
        rows = []
        tries = 0
        while len(rows) < self.batch_size:
            tries += 1
            if tries > 1000 + 100 * self.batch_size:
                raise ValueError(f"no file in --data has {self.length} tokens (segment + continuation)")
            i = rng.choices(range(len(self.files)), weights=self.sizes)[0]
            text = self._cached(i)
            span = 8 * self.length + 64  # characters: code averages ~3-4 per token
            start = rng.randrange(0, max(1, len(text) - span))
            ids = self.tok(text[start:start + span], add_special_tokens=False)["input_ids"]
            ids = ids[1:] if start > 0 else ids  # the first token may be a cut-off piece
            if len(ids) < self.length:
                continue
            rows.append(ids[:self.length])
        return torch.tensor(rows, dtype=torch.long)


def eval_windows(files: list[Path], tokenizer, length: int, max_windows: int) -> list[tuple[str, list[int]]]:
    """Non-overlapping windows of ``length`` tokens, in a fixed shuffled order per file, taken round-robin across files."""
    per_file = []
    for f in files:
        ids = tokenizer(read_text(f), add_special_tokens=False)["input_ids"]
        wins = [(str(f.name), ids[s:s + length]) for s in range(0, len(ids) - length + 1, length)]
        random.Random(f.name).shuffle(wins)  # spread over the whole file, deterministically
        per_file.append(wins)
    out = []
    for k in range(max((len(w) for w in per_file), default=0)):
        for w in per_file:
            if k < len(w):
                out.append(w[k])
                if len(out) >= max_windows:
                    return out
    if not out:
        raise ValueError(f"no file among {len(files)} has {length} tokens (segment + continuation)")
    return out

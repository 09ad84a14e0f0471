"""Finding the sources of a build and turning their bytes into text (the input policy).

Sources
    * a file: indexed as text, or as JSONL when its name ends in ``.jsonl``/``.ndjson``;
    * a folder: walked recursively in sorted order, not following symlinked folders. Entries
      whose name starts with ``.`` and folders named ``__pycache__`` or ``node_modules`` are
      left out; ``include`` globs (any must match) and ``exclude`` globs (none may match) are
      matched against the path relative to the folder and, for a glob without ``/``, against
      the file name too. A file named explicitly is always taken. The KB's own folder is
      never indexed;
    * ``-``: standard input, read once, indexed as one text under the source name ``<stdin>``.

Source names are absolute paths (``os.path.abspath``, symlinks kept); JSONL records are
named ``PATH#L<line>`` (1-based line) and their offsets index the record's text field.

Decoding policy (every skip and every note is reported in the build summary)
    * empty file or only whitespace: skipped (``empty``);
    * a NUL byte in the first 8 KiB: skipped (``binary``);
    * a UTF-8 BOM is dropped; a UTF-16 BOM decodes as UTF-16;
    * otherwise UTF-8; invalid bytes become U+FFFD and a note counts them; if more than 30% of
      the characters would be U+FFFD the file is skipped as ``binary``;
    * a file over ``max_file_bytes`` (default 256 MiB): skipped (``too large``);
    * unreadable or missing paths: skipped with the OS error;
    * enormous lines are kept: the chunker cuts them by characters (note ``longest line``);
    * JSONL lines that are not JSON objects with a string text field are skipped and counted.

Chunk offsets index the decoded text: :func:`read_source_text` gives exactly that text, so
``read_source_text(hit.source)[hit.start:hit.end] == hit.text``.
"""
from __future__ import annotations

import fnmatch
import json
import os
import sys
from dataclasses import dataclass, field

from .errors import BadInputError

STDIN_NAME = "<stdin>"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
LONG_LINE_CHARS = 100_000
_SKIP_DIRS = {"__pycache__", "node_modules"}


class SkipSource(Exception):
    """Raised by the decoders: the source is left out for the reason given."""


@dataclass
class SourceSpec:
    key: str                    # the source name kept in the KB (absolute path or <stdin>)
    path: str | None            # where to read it (None for stdin)
    kind: str = "text"          # "text" or "jsonl"
    size: int = 0
    data: bytes | None = None   # stdin's bytes


@dataclass
class Document:
    """One unit of text to chunk: a whole text file, or one JSONL record."""
    source: str                 # display name (``key`` or ``key#L12``)
    text: str


@dataclass
class Decoded:
    docs: list[Document]
    notes: list[str] = field(default_factory=list)


def _match(rel: str, name: str, pats) -> bool:
    for p in pats:
        if fnmatch.fnmatchcase(rel, p) or ("/" not in p and fnmatch.fnmatchcase(name, p)):
            return True
    return False


def discover(sources, include=None, exclude=None, skip_dirs=()) -> tuple[list[SourceSpec], list[dict]]:
    """Expand ``sources`` into files; return ``(specs, skipped)``. Reads only stdin."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    include = list(include or [])
    exclude = list(exclude or [])
    skip_real = {os.path.realpath(d) for d in skip_dirs}
    specs: list[SourceSpec] = []
    skipped: list[dict] = []
    seen: set[str] = set()

    def add_file(path: str):
        key = os.path.abspath(path)
        if key in seen:
            return
        seen.add(key)
        if any(os.path.realpath(key).startswith(d + os.sep) for d in skip_real):
            return
        try:
            size = os.stat(key).st_size
        except OSError as e:
            skipped.append({"source": key, "reason": f"unreadable: {e.strerror or e}"})
            return
        kind = "jsonl" if key.lower().endswith(JSONL_SUFFIXES) else "text"
        specs.append(SourceSpec(key, key, kind, size))

    for src in sources:
        src = os.fspath(src)
        if src == "-":
            if STDIN_NAME in seen:
                continue
            seen.add(STDIN_NAME)
            data = sys.stdin.buffer.read()
            specs.append(SourceSpec(STDIN_NAME, None, "text", len(data), data))
            continue
        if os.path.isdir(src):
            root = os.path.abspath(src)
            if os.path.realpath(root) in skip_real:
                continue
            for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: skipped.append(
                    {"source": os.path.abspath(e.filename or src), "reason": f"unreadable: {e.strerror or e}"})):
                rel_dir = os.path.relpath(dirpath, root)
                rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
                keep = []
                for d in sorted(dirnames):
                    full = os.path.join(dirpath, d)
                    if d.startswith(".") or d in _SKIP_DIRS or os.path.realpath(full) in skip_real:
                        continue
                    if exclude and _match(rel_dir + d, d, exclude):
                        continue
                    keep.append(d)
                dirnames[:] = keep
                for f in sorted(filenames):
                    if f.startswith("."):
                        continue
                    rel = rel_dir + f
                    if include and not _match(rel, f, include):
                        continue
                    if exclude and _match(rel, f, exclude):
                        continue
                    add_file(os.path.join(dirpath, f))
        elif os.path.exists(src) or os.path.islink(src):
            add_file(src)
        else:
            skipped.append({"source": os.path.abspath(src), "reason": "unreadable: no such file or folder"})
    return specs, skipped


def read_bytes(spec: SourceSpec, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The source's bytes; raises :class:`SkipSource` (too large / unreadable)."""
    if spec.data is not None:
        data = spec.data
    else:
        try:
            size = os.stat(spec.path).st_size
            if size > max_file_bytes:
                raise SkipSource(f"too large: {size} bytes > max_file_bytes={max_file_bytes}")
            with open(spec.path, "rb") as f:
                data = f.read(max_file_bytes + 1)
        except OSError as e:
            raise SkipSource(f"unreadable: {e.strerror or e}") from None
    if len(data) > max_file_bytes:
        raise SkipSource(f"too large: more than max_file_bytes={max_file_bytes} bytes")
    return data


def decode_text(data: bytes) -> tuple[str, list[str]]:
    """Bytes -> text under the documented policy; raises :class:`SkipSource`."""
    notes: list[str] = []
    if not data.strip():
        raise SkipSource("empty")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16", errors="replace")
        return _check_text(text, notes)
    if b"\x00" in data[:8192]:
        raise SkipSource("binary: NUL bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - data.count("\xef\xbf\xbd".encode("latin-1"))
        if bad > 0.3 * max(1, len(text)):
            raise SkipSource("binary: not UTF-8 text") from None
        notes.append(f"invalid UTF-8: {bad} byte sequence(s) replaced by U+FFFD")
    return _check_text(text, notes)


def _check_text(text: str, notes: list[str]) -> tuple[str, list[str]]:
    if not text.strip():
        raise SkipSource("empty")
    longest, pos, n = 0, 0, len(text)
    while pos < n:
        nl = text.find("\n", pos)
        nl = n if nl < 0 else nl
        longest = max(longest, nl - pos)
        pos = nl + 1
    if longest > LONG_LINE_CHARS:
        notes.append(f"longest line {longest} chars: cut by length")
    return text, notes


def decode_source(spec: SourceSpec, data: bytes, text_field: str = "text") -> Decoded:
    """The documents of one source; raises :class:`SkipSource`."""
    text, notes = decode_text(data)
    if spec.kind != "jsonl":
        return Decoded([Document(spec.key, text)], notes)
    docs, bad = [], 0
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        val = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(val, str):
            bad += 1
            continue
        if val.strip():
            docs.append(Document(f"{spec.key}#L{lineno}", val))
    if bad:
        notes.append(f"{bad} JSONL line(s) skipped: not a JSON object with a string {text_field!r} field")
    if not docs:
        raise SkipSource(f"no JSONL record with a non-empty string {text_field!r} field")
    return Decoded(docs, notes)


def read_source_text(source: str, text_field: str = "text") -> str:
    """The text a hit's offsets refer to: a file decoded by the policy, or a JSONL record's field."""
    path, sep, line = source.rpartition("#L")
    if not (sep and line.isdigit() and path.lower().endswith(JSONL_SUFFIXES)):
        path, line = source, ""
    if path == STDIN_NAME:
        raise BadInputError("standard input was not kept; its text exists only in the KB's chunks")
    with open(path, "rb") as f:
        text, _ = decode_text(f.read())
    if line:
        rec = json.loads(text.split("\n")[int(line) - 1])
        return rec[text_field]
    return text

"""Question answering over a codebase no one here wrote: the Python standard library's source.

Questions come from the AST of the running interpreter's standard library, and each answer is an
exact string of its source:

* ``raises``:  "Which function raises ValueError with the message "..."?" -> the function's name
  (a function with a ``raise Name("literal message")`` whose message is 16-100 characters);
* ``returns``: "What does the function `name` return?" -> the source text of the expression of
  its only ``return`` statement (one line, 6-60 characters, not a bare True/False/None/self).

The haystack is several other standard-library modules concatenated (each headed by
``# ---- file: NAME.py ----``), cut to the exact token length, with the target function (under a
``# ---- file: NAME.py (excerpt) ----`` header and an ``# ---- end of excerpt ----`` line; a method
keeps its ``class`` line) inserted at a line boundary at the asked depth. Modules that contain the answer, the message or another
definition of the function's name are left out of the filler, so the answer and the definition
occur exactly once in the context.
"""
from __future__ import annotations

import ast
import functools
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from . import ChatFrame, Sample, insert_needles

# big, generated or data-only modules make poor haystacks (and slow parsing)
_SKIP = {"pydoc_data", "antigravity", "this", "__hello__", "__phello__"}
_TRIVIAL_RETURNS = {"True", "False", "None", "self", "result", "res", "value", "ret", "rv", "s", "x"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def module_sources() -> dict[str, str]:
    """Top-level standard-library modules (``NAME.py``), name -> source, sorted by name."""
    out = {}
    for p in sorted(stdlib_dir().glob("*.py")):
        name = p.stem
        if name in _SKIP or name.startswith("_"):
            continue
        try:
            out[name] = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
    if len(out) < 20:
        raise RuntimeError(f"found only {len(out)} standard-library modules under {stdlib_dir()}")
    return out


@dataclass(frozen=True)
class CodeFact:
    kind: str          # "raises" | "returns"
    module: str
    function: str
    cls: str | None
    excerpt: str       # the function's source (with "class C:" above it for a method)
    answer: str
    exception: str = ""
    message: str = ""


def _segment(src_lines: list[str], node) -> str:
    return "\n".join(src_lines[node.lineno - 1: node.end_lineno])


@functools.lru_cache(maxsize=1)
def facts() -> tuple[CodeFact, ...]:
    """Every usable question in the standard library, in a fixed order."""
    out = []
    for mod, src in module_sources().items():
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines()
        defs: list[tuple[ast.AST, str | None]] = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defs.append((node, None))
            elif isinstance(node, ast.ClassDef):
                defs += [(n, node.name) for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for fn, cls in defs:
            name = fn.name
            if name.startswith("__") or len(name) < 6 or fn.decorator_list:
                continue
            seg = _segment(lines, fn)
            if len(seg) > 1500:
                continue
            excerpt = (f"class {cls}:\n" if cls else "") + seg
            nodes = list(ast.walk(fn))[1:]
            if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)) for n in nodes):
                continue  # nested scopes make "the function's return" ambiguous
            raises = [n for n in nodes if isinstance(n, ast.Raise)]
            msgs = []
            for r in raises:
                e = r.exc
                if (isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and len(e.args) == 1
                        and not e.keywords and isinstance(e.args[0], ast.Constant)
                        and isinstance(e.args[0].value, str)):
                    msg = e.args[0].value
                    if 16 <= len(msg) <= 100 and "\n" not in msg and msg.isprintable():
                        msgs.append((e.func.id, msg))
            for exc, msg in msgs:
                if sum(m == msg for _, m in msgs) == 1 and excerpt.count(msg) == 1 and excerpt.count(name) == 1:
                    out.append(CodeFact("raises", mod, name, cls, excerpt, name, exc, msg))
            returns = [n for n in nodes if isinstance(n, ast.Return)]
            if len(returns) == 1 and returns[0].value is not None:
                v = returns[0].value
                expr = (lines[v.lineno - 1].encode()[v.col_offset:v.end_col_offset].decode(errors="replace")
                        if v.lineno == v.end_lineno else None)
                if (expr and "\n" not in expr and 6 <= len(expr) <= 60 and expr not in _TRIVIAL_RETURNS
                        and excerpt.count(expr) == 1 and excerpt.count(f"def {name}(") == 1):
                    out.append(CodeFact("returns", mod, name, cls, excerpt, expr))
    return tuple(out)


END_EXCERPT = "\n# ---- end of excerpt ----\n"


def _header(mod: str, excerpt: bool = False) -> str:
    return f"\n# ---- file: {mod}.py{' (excerpt)' if excerpt else ''} ----\n"


@functools.lru_cache(maxsize=4096)
def _module_ids(tok_key: int, mod: str) -> tuple[int, ...]:
    frame = _FRAMES[tok_key]
    return tuple(frame.encode(_header(mod) + module_sources()[mod]))


_FRAMES: dict[int, ChatFrame] = {}


def _question(f: CodeFact) -> tuple[str, str]:
    if f.kind == "raises":
        q = f'Which function raises {f.exception} with the message "{f.message}"? Answer with the function name.'
        return q, f"The function that raises {f.exception} with this message is"
    q = f"What does the function `{f.function}` return? Answer with the expression of its return statement."
    return q, f"The function `{f.function}` returns"


def codeqa(tok, length, depth=0.5, seed=0, kind=None, frame=None) -> Sample:
    """One question about a standard-library function, its source hidden at ``depth`` of a haystack
    of other standard-library modules ``length`` tokens long. ``kind``: "raises", "returns" or
    None (alternate with the seed)."""
    frame = frame or ChatFrame(tok)
    _FRAMES[id(frame)] = frame
    rng = random.Random(f"codeqa/{length}/{depth}/{seed}/{kind}")
    kind = kind or ("raises", "returns")[seed % 2]
    pool = [f for f in facts() if f.kind == kind]
    if not pool:
        raise RuntimeError(f"no {kind!r} questions found in the standard library at {stdlib_dir()}")
    fact = pool[rng.randrange(len(pool))]
    question, prefix = _question(fact)
    head = "Below is source code from the Python standard library. Read it, then answer the question.\n"
    tail = f"\n\nQuestion: {question}"
    needle = frame.encode(_header(fact.module, excerpt=True) + fact.excerpt + END_EXCERPT)
    budget = length - frame.overhead(head, tail, prefix) - len(needle)
    if budget <= 0:
        raise ValueError(f"context length {length} too short for this code question")
    banned = [fact.answer, f"def {fact.function}(", fact.function] + ([fact.message] if fact.message else [])
    mods = [m for m in module_sources() if m != fact.module and not any(b in module_sources()[m] for b in banned)]
    rng.shuffle(mods)
    filler: list[int] = []
    used = []
    for m in mods:
        if len(filler) >= budget:
            break
        filler.extend(_module_ids(id(frame), m))
        used.append(m)
    if len(filler) < budget:
        raise ValueError(f"the standard library holds only {len(filler)} usable filler tokens, {budget} needed")
    filler = filler[:budget]
    hay, spans = insert_needles(tok, filler, [(depth, needle)])
    ids, off = frame.assemble(head, hay, tail, prefix)
    hay_span = (off, off + len(hay))
    assert len(ids) == length, (len(ids), length)
    return Sample(haystack_span=hay_span, task="codeqa", length=length, depth=depth, seed=seed, ids=ids, answers=[fact.answer],
                  question=question, context=tok.decode(hay), max_new_tokens=24,
                  needle_spans=[(s + off, e + off) for s, e in spans],
                  meta=dict(kind=fact.kind, module=fact.module, function=fact.function, cls=fact.cls,
                            exception=fact.exception, message=fact.message, excerpt=fact.excerpt,
                            filler_modules=used))


TASKS = {"codeqa": codeqa}

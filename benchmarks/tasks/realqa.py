"""Questions over real long documents that ship on this machine, answers checked exactly.

Three kinds of document, each a concatenation of *units* (a unit is one package, one topic, one
source file) under a header line, none of them text any model or setting here was trained or tuned on:

* ``metadata``: installed packages' ``*.dist-info/METADATA`` in site-packages (``Name``, ``Version``,
  ``Summary`` and the long description, cut to 12,000 characters at a line end);
  a fact is a package's version ("What is the version of the package X?");
* ``pydoc``: the Python reference manual's topics (``pydoc_data.topics``); a fact is the section
  heading that follows a given heading, or a topic's title (its first heading) given its key;
* ``code``: Python source of third-party packages in site-packages (not the standard library, on
  which the reader and the compressor were trained; not ctxmem), each file from its first top-level
  ``def`` or ``class``, cut to 5,000 characters at a line end; a fact is the default value of a parameter of a function (a number or a short
  string literal, from the AST).

Question types:

* ``single``: one fact, answered by one passage;
* ``two``: two facts from units far apart (one in the first 35% of the document, one in the last
  35%), asked together ("Two questions. (1) ... (2) ..."); both must be in the answer (RULER's string_match_all gives 0.5 for one);
  the two passages are independent, not a chain;
* ``count``: how many units the document holds (the first integer of the answer must equal it):
  only a reading of the whole document answers it.

Facts are kept only when unambiguous in the document they are asked about: the answer string
occurs exactly once in it (for code: the function's ``def name(`` does; a default value such as
``10`` may occur elsewhere), and a heading asked about occurs once. **Split:** each unit is ``tune`` or ``test`` by the crc32 of its name (a package's
name, a topic's key, a source file's top-level package): ``crc32 % 4 == 0`` is ``tune`` (about a
quarter), the rest ``test``. Documents are built from one split only; results in README are on
``test``; anything chosen for a method (top-k, prompt wording) may only be chosen on ``tune``.
The operating system's documentation folders and license texts are never read.

Every sample is a pure function of (kind, question type, length, index, split) and of the files
installed (the list of units used is recorded with each sample).
"""
from __future__ import annotations

import ast
import email.parser
import functools
import random
import re
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ["metadata", "pydoc", "code"]
QTYPES = ["single", "two", "count"]
UNIT_WORD = {"metadata": "package", "pydoc": "topic", "code": "source file"}
HEAD = "Read the document below and answer the question after it.\n\n"
DEPTHS = [0.5, 0.2, 0.8, 0.35, 0.65, 0.1, 0.9]
_SKIP_PACKAGES = {"ctxmem", "pip", "setuptools", "_distutils_hack", "pkg_resources", "__pycache__"}


def split_of(name: str) -> str:
    return "tune" if zlib.crc32(name.encode()) % 4 == 0 else "test"


@dataclass
class Fact:
    ask: str            # the question
    say: str            # the answer's opening words
    answer: str
    offset: int         # character offset of the answer in the unit's text
    unique: str = ""    # a string that must occur exactly once in the document (default: the answer)
    answer_once: bool = True  # ... and the answer too


@dataclass
class Unit:
    name: str           # what the split is decided on
    label: str          # shown in the unit's header
    text: str           # header + body
    facts: list[Fact] = field(default_factory=list)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    j = text.rfind("\n", 0, limit)
    return text[:j if j > limit // 2 else limit]


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


# -- units of each kind ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def metadata_units() -> tuple[Unit, ...]:
    out = []
    for p in sorted(site_packages().glob("*.dist-info/METADATA")):
        try:
            msg = email.parser.Parser().parsestr(p.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
        name, version = (msg.get("Name") or "").strip(), (msg.get("Version") or "").strip()
        if not name or not version or name.lower() in _SKIP_PACKAGES:
            continue
        summary = " ".join((msg.get("Summary") or "").split())
        body = msg.get_payload() if not msg.is_multipart() else ""
        head = f"## Package: {name}\nName: {name}\nVersion: "
        text = head + version + f"\nSummary: {summary}\n\n" + _cut(str(body or "").strip(), 12000) + "\n"
        facts = [Fact(f"What is the version of the package {name}?", f"The version of the package {name} is", version,
                      len(head))] if re.fullmatch(r"\d+(\.\w+)+", version) else []
        out.append(Unit(name, name, text, facts))
    return tuple(out)


_UNDERLINE = re.compile(r"^([*=\-~^\"]){3,}\s*$")


@functools.lru_cache(maxsize=1)
def pydoc_units() -> tuple[Unit, ...]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        head = f"## Topic: {key}\n"
        body = topics[key].strip()
        text = head + body + "\n"
        lines = text.split("\n")
        heads, pos = [], 0
        for i, line in enumerate(lines):
            if i + 1 < len(lines) and line.strip() and _UNDERLINE.match(lines[i + 1]) \
                    and len(lines[i + 1].strip()) >= len(line.strip()) - 1:
                heads.append((line.strip(), pos))
            pos += len(line) + 1
        facts = [Fact(f'Which section heading comes right after the heading "{a}"?',
                      f'The heading right after the heading "{a}" is', b, bpos, unique=a)
                 for (a, _), (b, bpos) in zip(heads, heads[1:]) if 3 <= len(b) <= 60]
        if heads and 3 <= len(heads[0][0]) <= 60:  # the topic's title, under its "## Topic:" line
            facts.append(Fact(f'What is the title of the topic "{key}"?', f'The title of the topic "{key}" is',
                              heads[0][0], heads[0][1], unique=head))
        out.append(Unit(key, key, text, facts))
    return tuple(out)


def _code_files() -> list[tuple[str, Path]]:
    sp = site_packages()
    files = []
    for top in sorted(sp.iterdir()):
        if not top.is_dir() or top.name.lower() in _SKIP_PACKAGES or top.name.endswith(("-info", ".libs")) \
                or top.name.startswith(("_", ".")):
            continue
        for p in sorted(top.rglob("*.py")):
            if "test" in p.name or "tests" in p.parts or "__pycache__" in p.parts:
                continue
            try:
                size = p.stat().st_size
            except OSError:
                continue
            if 2000 <= size <= 60000:
                files.append((top.name, p))
    return files


@functools.lru_cache(maxsize=1)
def code_candidates() -> tuple[tuple[str, str], ...]:
    """(top-level package, path relative to site-packages) of every candidate source file, sorted."""
    sp = site_packages()
    return tuple((top, str(p.relative_to(sp))) for top, p in _code_files())


def _default_facts(src: str, fname: str) -> list[Fact]:
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return []
    lines = src.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    facts = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("__"):
            continue
        if node.end_lineno is None or starts[node.end_lineno] > len(src):
            continue
        a = node.args
        pos = a.posonlyargs + a.args
        pairs = list(zip(pos[len(pos) - len(a.defaults):], a.defaults)) + \
            [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
        for arg, d in pairs:
            if not isinstance(d, ast.Constant) or isinstance(d.value, bool):
                continue
            v = d.value
            if isinstance(v, (int, float)):
                ans = ast.get_source_segment(src, d) or ""
                if ans in ("0", "1") or not re.fullmatch(r"[\d.e\-+_]+", ans):
                    continue
            elif isinstance(v, str):
                ans = v
                if not (2 <= len(ans) <= 40 and re.fullmatch(r"[\w .\-/:%]+", ans)):
                    continue
            else:
                continue
            off = starts[d.lineno - 1] + d.col_offset
            subj = f"the parameter `{arg.arg}` of the function `{node.name}`"
            facts.append(Fact(f"What is the default value of {subj}?", f"The default value of {subj} is", ans, off,
                              unique=f"def {node.name}(", answer_once=False))
    return facts


@functools.lru_cache(maxsize=4096)
def code_unit(top: str, rel: str) -> Unit:
    src = (site_packages() / rel).read_text(encoding="utf-8", errors="replace")
    # from the first top-level def or class (imports and module docstrings hold no facts)
    m = re.search(r"^(?:async def|def|class) ", src, flags=re.M)
    first = src.count("\n", 0, m.start()) + 1 if m else 1
    head = f"## File: {rel} (from line {first})\n"
    body = _cut(src[m.start() if m else 0:], 5000)
    facts = [Fact(f.ask, f.say, f.answer, f.offset + len(head), f.unique, f.answer_once)
             for f in _default_facts(body, rel)]
    return Unit(top, rel, head + body + ("" if body.endswith("\n") else "\n"), facts)


def units(kind: str, split: str, rng: random.Random) -> list[Unit]:
    """Every unit of a kind in a split, in the order ``rng`` shuffles them (code: loaded lazily)."""
    if kind == "metadata":
        us = [u for u in metadata_units() if split_of(u.name) == split]
    elif kind == "pydoc":
        us = [u for u in pydoc_units() if split_of(u.name) == split]
    elif kind == "code":
        cands = [c for c in code_candidates() if split_of(c[0]) == split]
        rng.shuffle(cands)
        return _LazyUnits(cands)
    else:
        raise ValueError(f"unknown document kind {kind!r}; kinds: {KINDS}")
    us = list(us)
    rng.shuffle(us)
    return us


class _LazyUnits(list):
    def __init__(self, cands):
        super().__init__()
        self.cands = cands

    def __iter__(self):
        for top, rel in self.cands:
            try:
                yield code_unit(top, rel)
            except OSError:
                continue


# -- samples -------------------------------------------------------------------------------------

@dataclass
class RealSample:
    kind: str
    qtype: str
    length: int              # the asked context length
    index: int
    split: str
    ids: list[int]           # the full prompt (exactly ``len(ids)`` tokens, at most ``length``)
    document: str            # the document text (what every method reads, or retrieves from)
    question: str
    answer_prefix: str
    answers: list[str]
    depths: list[float]      # where each answer sits in the document, 0..1 (count: [])
    units: list[str]         # labels of the units, in document order
    haystack_span: tuple[int, int]
    max_new_tokens: int = 24

    def describe(self) -> dict:
        return dict(kind=self.kind, qtype=self.qtype, length=self.length, index=self.index, split=self.split,
                    tokens=len(self.ids), question=self.question, answer_prefix=self.answer_prefix,
                    answers=self.answers, depths=self.depths, n_units=len(self.units))


_NTOK: dict = {}


def _n_tokens(tok, text: str) -> int:
    key = (id(tok), zlib.crc32(text.encode()), len(text))
    if key not in _NTOK:
        _NTOK[key] = len(tok(text, add_special_tokens=False)["input_ids"])
    return _NTOK[key]


def make(tok, frame, kind: str, qtype: str, length: int, index: int, split: str = "test") -> RealSample:
    """Sample ``index`` of (kind, qtype) at ``length`` tokens: the same prompt in every run."""
    if qtype not in QTYPES:
        raise ValueError(f"unknown question type {qtype!r}; types: {QTYPES}")
    err = None
    for attempt in range(40):  # a document without a usable fact is drawn again (attempt is part of the seed)
        try:
            return _make(tok, frame, kind, qtype, length, index, split, attempt)
        except _NoFact as e:
            err = e
    raise ValueError(str(err))


class _NoFact(ValueError):
    pass


def _make(tok, frame, kind, qtype, length, index, split, attempt) -> RealSample:
    rng = random.Random(f"realqa/{kind}/{qtype}/{length}/{index}/{split}" + (f"/{attempt}" if attempt else ""))
    reserve = 200  # chat frame, instruction, question and answer opening
    budget = length - reserve
    picked, pieces, total = [], [], 0
    for tried, u in enumerate(units(kind, split, rng)):
        n = _n_tokens(tok, u.text) + 2
        if total + n <= budget:
            picked.append(u)
            total += n
        if budget - total < 64 or tried > 3000:
            break
    if total < 0.85 * budget:
        raise ValueError(f"{kind}/{split} holds only about {total} tokens of units, not {budget}")
    offsets, pos = [], 0
    for u in picked:
        offsets.append(pos)
        pieces.append(u.text)
        pos += len(u.text) + 1
    document = "\n".join(pieces)
    L = len(document)
    cands = []
    for u, off in zip(picked, offsets):
        for f in u.facts:
            if document.count(f.unique or f.answer) == 1 and (not f.answer_once or document.count(f.answer) == 1):
                cands.append(((off + f.offset) / L, f))
    cands.sort(key=lambda c: c[0])
    word = UNIT_WORD[kind]
    if qtype == "count":
        question = f"How many {word}s does the document contain? Each one starts with a line beginning with \"## \"."
        prefix = f"The number of {word}s in the document is"
        answers, depths = [str(len(picked))], []
    elif qtype == "single":
        if not cands:
            raise _NoFact(f"no unambiguous fact in the {kind} document")
        want = DEPTHS[index % len(DEPTHS)]
        d, f = min(cands, key=lambda c: (abs(c[0] - want), c[1].answer))
        question, prefix = f.ask, f.say
        answers, depths = [f.answer], [round(d, 3)]
    else:
        early = [c for c in cands if c[0] < 0.35]
        late = [c for c in cands if c[0] > 0.65]
        if not early or not late:
            raise _NoFact(f"no two unambiguous facts far apart in the {kind} document")
        (d1, f1), (d2, f2) = rng.choice(early), rng.choice(late)
        if rng.random() < 0.5:
            (d1, f1), (d2, f2) = (d2, f2), (d1, f1)
        question, prefix = f"Two questions. (1) {f1.ask} (2) {f2.ask}", f"(1) {f1.say}"
        answers, depths = [f1.answer, f2.answer], [round(d1, 3), round(d2, 3)]
    tail = f"\n\nQuestion: {question}"
    doc_ids = tok(document, add_special_tokens=False)["input_ids"]
    ids, off = frame.assemble(HEAD, doc_ids, tail, prefix)
    return RealSample(kind, qtype, length, index, split, ids, document, question, prefix, answers, depths,
                      [u.label for u in picked], (off, off + len(doc_ids)),
                      max_new_tokens=40 if qtype == "two" else 24)


_TOKEN = re.compile(r"[\w.\-+/:%]+")


def match(prediction: str, answer: str) -> bool:
    """Exact match of an answer inside a prediction: a one-word answer (a version, a number, an
    identifier) must be a whole token of the prediction (``1.2`` does not match ``1.2.3``, ``10`` not
    ``100``; trailing dots, quotes and backticks ignored); a longer one, a case-insensitive substring."""
    if re.fullmatch(r"[\w.\-+/:%]+", answer):
        toks = {t.strip(".:") for t in _TOKEN.findall(prediction)}
        return answer.strip(".:") in toks or answer.lower().strip(".:") in {t.lower() for t in toks}
    return answer.lower() in prediction.lower()


def score(sample: RealSample, prediction: str) -> float:
    if sample.qtype == "count":
        m = re.search(r"\d+", prediction)
        return float(bool(m) and m.group(0) == sample.answers[0])
    return sum(match(prediction, a) for a in sample.answers) / len(sample.answers)

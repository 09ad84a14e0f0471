"""Synthetic retrieval tasks the reader adapter trains on: facts hidden in long text, then a question.

Everything is generated from a seed and from text every machine has (the Python standard library's
training modules, see ``ctxmem.compress.data``), so a checkpoint is reproducible anywhere. The
templates are our own and deliberately differ from the benchmarks' ("pass key", RULER's "special
magic number", the benchmarks' filler sentences and the reference manual's prose are never used), so
the benchmarks measure whether reading transfers, not whether a template was memorised.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

# What a fact is about. Two facts in one haystack never share a label.
LABELS = (
    "access code", "locker combination", "serial number", "room number", "order number", "flight code",
    "account number", "ticket number", "vault code", "parcel number", "badge number", "invoice number",
    "station code", "batch number", "door code", "license number", "booking reference", "seat code",
    "project code", "tracking number", "meeting room", "safe combination", "lab code", "gate code",
    "secret word", "password", "code word", "favourite colour of the director", "name of the ship",
    "city of the next meeting",
)
_WORD_LABELS = {"secret word", "password", "code word", "favourite colour of the director", "name of the ship",
                "city of the next meeting"}
_WORDS = ("amber", "falcon", "harbor", "juniper", "lantern", "meadow", "orchid", "pepper", "quartz", "saffron",
          "thistle", "velvet", "willow", "cobalt", "ember", "glacier", "hazel", "indigo", "marble", "nutmeg",
          "Lisbon", "Oslo", "Quito", "Nairobi", "Kyoto", "Tallinn", "Lima", "Perth", "Ghent", "Dakar")
FACT_TEMPLATES = (
    "The {label} is {value}.",
    "Remember this: the {label} is {value}.",
    "Important: {label} = {value}.",
    "Note that the {label} is {value}. Do not forget it.",
    "For the record, the {label} is {value}.",
    "The {label} has been set to {value}.",
)
QUESTION_TEMPLATES = ("What is the {label}?", "What is the {label} mentioned in the text?",
                      "Which {label} does the text give?", "Tell me the {label}.")
HEADS = ("", "Read the text below and answer the question at the end.\n\n",
         "Some facts are hidden in the following text.\n\n")
ANSWER = "The {label} is {value}."
# Our own repetitive filler (the benchmarks use other sentences): half the haystacks are this, the other
# half real code, so neither is the only thing the adapter has seen.
_SENTENCES = ("The river runs past the old mill.", "A cat sleeps on the warm stones.",
              "Clouds drift over the quiet hills.", "The baker opens the shop at dawn.",
              "Leaves fall slowly in the park.", "A train passes the small station.",
              "The lamp on the desk is still on.", "Children play by the fountain.",
              "The road winds through the valley.", "Rain taps on the kitchen window.",
              "An old clock ticks in the hall.", "The market is busy on Sundays.")


@dataclass
class Task:
    messages_user: str  # the user turn: head + haystack with facts + question
    answer: str  # the assistant turn
    value: str  # what the answer must contain
    depth: float  # where the asked fact sits (0..1 of the haystack)
    needed: tuple[str, ...] = ()  # haystack text the answer is read from (chains: its statements); () = value's fact
    names: tuple[str, ...] = ()  # chains: the names the answer must list, in order


def _value(rng: random.Random, label: str) -> str:
    if label in _WORD_LABELS:
        return rng.choice(_WORDS)
    kind = rng.random()
    if kind < 0.7:
        digits = rng.randint(4, 7)
        return str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    if kind < 0.85:
        return f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}-{rng.randrange(100, 9999)}"
    return "".join(rng.choice("0123456789abcdef") for _ in range(8))


def _filler(rng: random.Random, n_chars: int) -> str:
    unit = " ".join(rng.sample(_SENTENCES, rng.randint(3, 6))) + " "
    return (unit * (n_chars // len(unit) + 1))[:n_chars]


def _code(rng: random.Random, texts: list[str], n_chars: int) -> str:
    parts, total = [], 0
    while total < n_chars:
        t = rng.choice(texts)
        s = rng.randrange(0, max(1, len(t) - 2000))
        piece = t[s:s + n_chars - total]
        parts.append(piece)
        total += len(piece)
    return "\n".join(parts)[:n_chars]


def make_task(seed: int, texts: list[str], n_chars: int) -> Task:
    """One task of about ``n_chars`` characters of haystack with 1-3 facts; the question asks one."""
    rng = random.Random(seed)
    hay = _filler(rng, n_chars) if rng.random() < 0.5 else _code(rng, texts, n_chars)
    labels = rng.sample(LABELS, rng.randint(1, 3))
    facts = [(lab, _value(rng, lab)) for lab in labels]
    cuts = sorted(rng.randrange(0, len(hay)) for _ in facts)
    # snap each cut to a sentence or line end so a fact is not spliced into a word
    snapped = []
    for c in cuts:
        j = max(hay.rfind(". ", 0, c), hay.rfind("\n", 0, c))
        snapped.append(j + 1 if j >= 0 else 0)
    order = list(range(len(facts)))
    rng.shuffle(order)
    pieces, prev = [], 0
    depth_of = {}
    for slot, c in enumerate(snapped):
        lab, val = facts[order[slot]]
        pieces.append(hay[prev:c])
        depth_of[lab] = c / max(1, len(hay))
        pieces.append(" " + rng.choice(FACT_TEMPLATES).format(label=lab, value=val) + " ")
        prev = c
    pieces.append(hay[prev:])
    lab, val = facts[rng.randrange(len(facts))]
    question = rng.choice(QUESTION_TEMPLATES).format(label=lab)
    user = rng.choice(HEADS) + "".join(pieces) + "\n\n" + question
    return Task(user, ANSWER.format(label=lab, value=val), val, depth_of[lab])


# ---- reference chains: "b takes a's value", asked which names end up holding a value ------------------
# Our own wordings (RULER's vt writes "VAR X = VAR Y" and asks "Find all variables that are assigned the
# value ..."; neither the VAR keyword nor that question appears here). One style per task, so a chain reads
# as one program or one story; the name style is drawn independently of it.
CHAIN_STYLES = (
    ("{a} = {v}", "{b} = {a}"),
    ("let {a} = {v};", "let {b} = {a};"),
    ("Set {a} to {v}.", "Set {b} to the value of {a}."),
    ("{a} holds {v}.", "{b} holds whatever {a} holds."),
    ("The value of {a} is {v}.", "{b} is a copy of {a}."),
    ("{a} := {v}", "{b} := {a}"),
)
CHAIN_QUESTIONS = ("Which names end up holding {v}?", "List every name whose value is {v}.",
                   "Which variables are equal to {v}, directly or through another name?",
                   "Name all the variables that get the value {v}.")
CHAIN_ANSWERS = ("{names}.", "The names holding {v} are {names}.", "They are {names}.")
_SYL = ("ka", "lo", "mi", "ra", "tu", "ve", "zo", "ni", "pe", "su", "do", "fi", "go", "ha", "ju", "qu", "wy", "xe")


def _chain_name(rng: random.Random, taken: set[str], hay: str) -> str:
    """A fresh name of at least 4 characters that the haystack does not contain."""
    while True:
        style = rng.randrange(4)
        if style == 0:  # snake_case identifier
            n = "_".join("".join(rng.choice(_SYL) for _ in range(rng.randint(1, 2))) for _ in range(rng.randint(1, 2)))
        elif style == 1:  # a capitalised word with a digit
            n = "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize() + str(rng.randrange(10))
        elif style == 2:  # an upper-case code
            n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(3, 7)))
        else:  # camelCase
            n = rng.choice(_SYL) + "".join(rng.choice(_SYL).capitalize() for _ in range(rng.randint(1, 2)))
        if len(n) >= 4 and n not in taken and n not in hay:
            taken.add(n)
            return n


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def make_chain_task(seed: int, texts: list[str], n_chars: int) -> Task:
    """A reference chain of 1-4 hops (a name gets a value, each next name takes the previous one's),
    with 0-2 distractor chains of other values interleaved hop by hop, statements in order over the
    haystack; the question asks which names hold the first chain's value, the answer lists them in order."""
    rng = random.Random(f"chain:{seed}")
    hay = _filler(rng, n_chars) if rng.random() < 0.5 else _code(rng, texts, n_chars)
    first, alias = rng.choice(CHAIN_STYLES)
    hops, n_chains = rng.randint(1, 4), rng.randint(1, 3)
    taken: set[str] = set()
    values: list[str] = []
    while len(values) < n_chains:
        digits = rng.randint(4, 6)
        v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if v not in hay and all(v not in w and w not in v for w in values):
            values.append(v)
    chains = [[_chain_name(rng, taken, hay) for _ in range(hops + 1)] for _ in values]
    stmts = [first.format(a=c[0], v=v) if h == 0 else alias.format(a=c[h - 1], b=c[h])
             for h in range(hops + 1) for c, v in zip(chains, values)]
    cuts = sorted(rng.randrange(0, len(hay)) for _ in stmts)
    pieces, prev = [], 0
    for c, st in zip(cuts, stmts):
        j = max(hay.rfind(". ", 0, c), hay.rfind("\n", 0, c))
        c = max(prev, j + 1 if j >= 0 else 0)
        pieces += [hay[prev:c], "\n" + st + "\n"]
        prev = c
    pieces.append(hay[prev:])
    v, names = values[0], chains[0]
    asked = tuple(st for i, st in enumerate(stmts) if i % n_chains == 0)  # hop h of chain 0 is stmts[h * n_chains]
    user = rng.choice(HEADS) + "".join(pieces) + "\n\n" + rng.choice(CHAIN_QUESTIONS).format(v=v)
    return Task(user, rng.choice(CHAIN_ANSWERS).format(v=v, names=_join(names)), v, cuts[0] / max(1, len(hay)),
                needed=asked, names=tuple(names))


FAMILIES = {"facts": make_task, "chains": make_chain_task}

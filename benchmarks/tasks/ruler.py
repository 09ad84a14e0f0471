"""RULER-style synthetic tasks (Hsieh et al., 2024, "RULER: What's the real context size of your
long-context language models?"), generated from a seed at an exact token length.

Templates, answer prefixes and scoring follow RULER's (``scripts/data/synthetic/constants.py``):

* ``niah_single``   one needle "One of the special magic {numbers|words|uuids} for {key} is: {value}."
                    in the haystack; asked for the key's value.
* ``niah_multikey`` the same, plus 3 distractor needles with other keys (RULER niah_multikey_1).
* ``niah_multivalue`` one key with 4 values spread over the haystack; all 4 must be named.
* ``vt``            variable tracking: "VAR ABCDE = 12345", then a chain of 4 hops
                    "VAR FGHIJ = VAR ABCDE", ... spread over the haystack; name every variable
                    that holds the value.
* ``cwe``           common-word extraction: a numbered list of words; name the 10 most frequent.

The haystack of the needle tasks and vt is RULER's "noise" filler (niah_single_1's setting);
``haystack="essay"`` uses real prose instead (the Python reference manual, RULER uses Paul
Graham's essays). Keys are adjective-noun pairs and word values come from the fixed word list
below (RULER draws them from the ``wonderwords`` package), so nothing depends on the machine.
"""
from __future__ import annotations

import math
from collections import Counter
import random
import uuid

from . import ChatFrame, Sample, insert_needles, repeat_to

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")

ADJECTIVES = """
able acid angry bitter black blue bold brave brief bright broad broken busy calm careful cheap
clean clear clever cold cool crazy curly damp dark dear deep dirty dry dull eager early easy
empty equal even faint fair false famous fancy fast fat fierce fine firm flat fluffy foolish
fresh friendly full funny gentle giant glad golden good grand great green grey happy hard
heavy helpful high hollow honest huge humble hungry icy jolly juicy kind large late lazy light
little lively long loose loud lovely low lucky mad mighty mild modern narrow neat nervous new
nice noisy odd old orange pale perfect plain polite poor proud purple quick quiet rapid rare
raw red rich ripe rough round royal rude sad safe salty sharp shiny short shy silent silly
simple slim slow small smooth soft solid sour spicy square steep sticky stiff strange strict
strong sweet swift tall tame tender thick thin tidy tiny tough warm weak wet white wide wild
wise witty wooden yellow young zany
""".split()

NOUNS = """
acorn actor anchor apple arrow artist badge bakery ballet banana barn basket beach beaver bell
bicycle blanket boat bottle branch bread breeze bridge brush bucket butter cabin camel candle
canyon captain carpet castle cattle cellar chair cheese cherry circus cliff clock cloud coast
coffee comet copper cotton cousin crayon cricket crown cushion daisy desert diamond doctor
dolphin donkey dragon drawer eagle engine falcon farmer feather fence ferry fiddle finger
forest fountain garden garlic giraffe glacier goat guitar hammer harbor helmet honey horse
island jacket jungle kettle kitten ladder lantern lemon library lizard magnet mango marble
meadow melon mirror monkey mountain needle nest ocean octopus orchard otter oven owl paddle
palace panda parrot pebble pencil pepper piano pillow pirate planet pocket pony potato puzzle
rabbit radio raven ribbon river robot rocket saddle sailor salmon sandal scarf shadow shell
shovel singer spider spoon squirrel statue storm sugar swan table teapot temple tiger tomato
tower tractor trumpet tunnel turtle umbrella valley velvet violin wagon walnut whale window
wizard wolf zebra
""".split()

WORDS = sorted(set(ADJECTIVES) | set(NOUNS))

_TYPES = {"numbers": "numbers", "words": "words", "uuids": "uuids"}


def _value(rng: random.Random, kind: str, avoid: set[str]) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))  # RULER: 7-digit numbers
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        while True:
            w = rng.choice(WORDS)
            if w not in avoid:
                return w
    raise ValueError(f"unknown value kind {kind!r}; one of {sorted(_TYPES)}")


def _keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in keys:
            keys.append(k)
    return keys


def _filler(frame: ChatFrame, haystack: str, n: int, rng: random.Random) -> list[int]:
    if n <= 0:
        raise ValueError(f"context length too short for this task's instructions ({n} haystack tokens)")
    if haystack == "noise":
        return repeat_to(frame.encode(NOISE), n)
    if haystack == "essay":
        ids = _essay_ids(frame)
        return repeat_to(ids, n, offset=rng.randrange(len(ids)))
    raise ValueError(f"unknown haystack {haystack!r}; use 'noise' or 'essay'")


_ESSAY: dict[int, list[int]] = {}


def _essay_ids(frame: ChatFrame) -> list[int]:
    key = id(frame.tok)
    if key not in _ESSAY:
        from benchmarks.common import real_text
        _ESSAY[key] = frame.encode(real_text())
    return _ESSAY[key]


def _niah(tok, length: int, depth: float, seed: int, *, task: str, kind: str, n_keys: int, n_values: int,
          haystack: str, frame: ChatFrame | None) -> Sample:
    frame = frame or ChatFrame(tok)
    rng = random.Random(f"{task}/{kind}/{length}/{depth}/{seed}")
    keys = _keys(rng, n_keys)
    key = keys[0]
    avoid = set(key.split("-"))
    values = []
    while len(values) < n_values:
        v = _value(rng, kind, avoid | set(values))
        if v not in values:
            values.append(v)
    distractor_values = []
    for _ in keys[1:]:
        distractor_values.append(_value(rng, kind, avoid | set(values) | set(distractor_values)))
    kind_word = _TYPES[kind]
    head = (f"Some special magic {kind_word} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind_word} afterwards.\n")
    # RULER's niah template: the same question form for one value or several
    question = f"What are all the special magic {kind_word} for {key} mentioned in the provided text?"
    prefix = f"The special magic {kind_word} for {key} mentioned in the provided text are"
    tail = f"\n{question}"

    def needle(k, v):
        return frame.encode(f" One of the special magic {kind_word} for {k} is: {v}.")

    needles = [needle(key, v) for v in values] + [needle(k, v) for k, v in zip(keys[1:], distractor_values)]
    budget = length - frame.overhead(head, tail, prefix)
    filler = _filler(frame, haystack, budget - sum(len(n) for n in needles), rng)
    # the asked needle at ``depth``; the others (more values of the same key, distractor keys) at
    # random depths that keep clear of it
    depths = [depth]
    while len(depths) < len(needles):
        d = rng.uniform(0.02, 0.98)
        if all(abs(d - e) > 0.5 / (len(needles) + 1) for e in depths):
            depths.append(d)
    hay, spans = insert_needles(tok, filler, list(zip(depths, needles)))
    ids, off = frame.assemble(head, hay, tail, prefix)
    hay_span = (off, off + len(hay))
    assert len(ids) == length, (len(ids), length)
    spans = [(s + off, e + off) for s, e in spans]
    return Sample(haystack_span=hay_span, task=task, length=length, depth=depth, seed=seed, ids=ids, answers=values, question=question,
                  context=tok.decode(hay), max_new_tokens=(48 if kind == "uuids" else 16) * n_values,  # a uuid is up to 36 tokens
                  needle_spans=spans,
                  meta=dict(kind=kind, key=key, haystack=haystack, distractors=dict(zip(keys[1:], distractor_values)),
                            depths=depths))


def niah_single(tok, length, depth=0.5, seed=0, kind="numbers", haystack="noise", frame=None) -> Sample:
    return _niah(tok, length, depth, seed, task="niah_single", kind=kind, n_keys=1, n_values=1,
                 haystack=haystack, frame=frame)


def niah_multikey(tok, length, depth=0.5, seed=0, kind="numbers", haystack="noise", n_keys=4, frame=None) -> Sample:
    return _niah(tok, length, depth, seed, task="niah_multikey", kind=kind, n_keys=n_keys, n_values=1,
                 haystack=haystack, frame=frame)


def niah_multivalue(tok, length, depth=0.5, seed=0, kind="numbers", haystack="noise", n_values=4, frame=None) -> Sample:
    return _niah(tok, length, depth, seed, task="niah_multivalue", kind=kind, n_keys=1, n_values=n_values,
                 haystack=haystack, frame=frame)


def _varname(rng: random.Random, taken: set[str]) -> str:
    while True:
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in taken:
            taken.add(v)
            return v


def vt(tok, length, depth=None, seed=0, num_chains=1, num_hops=4, haystack="noise", frame=None) -> Sample:
    """Variable tracking (RULER ``vt``): chains of ``num_hops`` assignments; the first chain is asked
    about, the others (same shape, other values) are distractors. Statements are spread evenly
    over the haystack in order (``depth`` is not used: the chain spans the whole context)."""
    frame = frame or ChatFrame(tok)
    rng = random.Random(f"vt/{length}/{num_chains}/{num_hops}/{seed}")
    taken: set[str] = set()
    chains, values = [], []
    for _ in range(num_chains):
        while True:
            val = str(rng.randint(10000, 99999))
            if val not in values:
                values.append(val)
                break
        names = [_varname(rng, taken) for _ in range(num_hops + 1)]
        stmts = [f"VAR {names[0]} = {val}"] + [f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(num_hops)]
        chains.append((names, stmts))
    # interleave the chains hop by hop, as RULER does
    order = [chains[c][1][h] for h in range(num_hops + 1) for c in range(num_chains)]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = f"Find all variables that are assigned the value {values[0]} in the text above."
    tail = f"\nQuestion: {question}"
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {num_hops + 1} variables "
              f"are assigned the value {values[0]}, they are:")
    needles = [frame.encode(f" {s}.") for s in order]
    budget = length - frame.overhead(head, tail, prefix)
    filler = _filler(frame, haystack, budget - sum(len(n) for n in needles), rng)
    n = len(needles)
    depths = [0.05 + 0.9 * i / max(1, n - 1) for i in range(n)]
    hay, spans = insert_needles(tok, filler, list(zip(depths, needles)))
    ids, off = frame.assemble(head, hay, tail, prefix)
    hay_span = (off, off + len(hay))
    assert len(ids) == length, (len(ids), length)
    return Sample(haystack_span=hay_span, task="vt", length=length, depth=None, seed=seed, ids=ids, answers=list(chains[0][0]),
                  question=question, context=tok.decode(hay), max_new_tokens=8 * (num_hops + 1),
                  needle_spans=[(s + off, e + off) for s, e in spans],
                  meta=dict(value=values[0], statements=order, chains=[c[0] for c in chains], values=values,
                            haystack=haystack))


def cwe(tok, length, depth=None, seed=0, num_cw=10, freq_cw=30, frame=None) -> Sample:
    """Common-word extraction (RULER ``cwe``): a numbered list in which ``num_cw`` words appear
    ``freq_cw`` times each and the other words are spread evenly over the rest; name the ``num_cw``
    most common. The word list is finite, so at long lengths the frequencies grow together (common
    words stay at least 3x as frequent as any other word; short lists lower ``freq_cw``); the list
    is padded to the exact length with at most a few newline tokens at its end."""
    frame = frame or ChatFrame(tok)
    rng = random.Random(f"cwe/{length}/{num_cw}/{seed}")
    words = list(WORDS)
    rng.shuffle(words)
    common, rare = words[:num_cw], words[num_cw:]
    head = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
    question = f"What are the {num_cw} most common words in the above list?"
    tail = f"\nQuestion: {question}"
    prefix = f"Answer: The top {num_cw} words that appear most often in the list are:"
    budget = length - frame.overhead(head, tail, prefix)
    if budget <= 0:
        raise ValueError("context length too short for cwe")
    # each entry is " {i}." + " {word}", tokenized as two pieces, so lengths add up exactly
    word_len = {w: len(frame.encode(f" {w}")) for w in words}
    num_cache: dict[int, int] = {}

    def num_len(i):
        if i not in num_cache:
            num_cache[i] = len(frame.encode(f" {i}."))
        return num_cache[i]

    def plan(n):
        # short lists scale the common frequency down (at least 3); rare words are spread evenly
        f_c0 = min(freq_cw, max(3, n // (2 * num_cw)))
        f_u = max(1, math.ceil(max(0, n - num_cw * f_c0) / len(rare)))
        f_c = max(f_c0, 3 * f_u)
        n_rare = max(0, n - num_cw * f_c)
        per = [n_rare // len(rare) + (1 if i < n_rare % len(rare) else 0) for i in range(len(rare))]
        bag = [w for w in common for _ in range(f_c)] + [w for w, c in zip(rare, per) for _ in range(c)]
        cost = sum(num_len(i) for i in range(1, len(bag) + 1)) + sum(word_len[w] for w in bag)
        return bag, f_c, cost

    lo, hi = 1, max(2, budget)  # largest list that fits the budget (cost grows with n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan(mid)[2] <= budget:
            lo = mid
        else:
            hi = mid - 1
    bag, f_c, cost = plan(lo)
    if cost > budget:
        raise ValueError("context length too short for cwe")
    random.Random(f"cwe-order/{length}/{seed}").shuffle(bag)
    hay = []
    for i, w in enumerate(bag, 1):
        hay += frame.encode(f" {i}.") + frame.encode(f" {w}")
    pad = budget - len(hay)
    nl = frame.encode("\n")
    if pad and len(nl) != 1:
        raise ValueError("tokenizer does not encode a newline as one token; cannot pad cwe exactly")
    hay = hay + nl * pad
    ids, off = frame.assemble(head, hay, tail, prefix)
    hay_span = (off, off + len(hay))
    assert len(ids) == length, (len(ids), length)
    counts = Counter(bag)
    return Sample(haystack_span=hay_span, task="cwe", length=length, depth=None, seed=seed, ids=ids, answers=common, question=question,
                  context=tok.decode(hay), max_new_tokens=48,
                  meta=dict(freq_common=f_c, max_freq_other=max((counts[w] for w in rare if w in counts), default=0),
                            entries=len(bag), pad_tokens=pad))


TASKS = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "vt": vt,
    "cwe": cwe,
}

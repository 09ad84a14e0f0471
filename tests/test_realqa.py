"""The real-document QA generator (benchmarks/tasks/realqa.py): seeded, within length, the answers
really in the document at the stated depth, unambiguous, split by source; the exact-match scorer.
Tokenizer only, no model runs."""
import pytest

from benchmarks.tasks import ChatFrame
from benchmarks.tasks import realqa as rq


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from ctxmem.models import resolve_lm_path

    return AutoTokenizer.from_pretrained(resolve_lm_path("smollm2"))


@pytest.fixture(scope="module")
def frame(tok):
    return ChatFrame(tok)


@pytest.mark.parametrize("kind,qtype", [("metadata", "single"), ("metadata", "two"), ("pydoc", "single"),
                                        ("pydoc", "count")])
def test_sample_is_seeded_and_answerable(tok, frame, kind, qtype):
    a = rq.make(tok, frame, kind, qtype, 4096, 0)
    b = rq.make(tok, frame, kind, qtype, 4096, 0)
    assert a.ids == b.ids and a.answers == b.answers and a.question == b.question
    assert 0.85 * 4096 < len(a.ids) <= 4096
    s, e = a.haystack_span
    assert tok.decode(a.ids[s:e]) == a.document
    # every unit is from the test split, none from tune
    names = {u.label: u.name for u in (rq.metadata_units() if kind == "metadata" else rq.pydoc_units())}
    assert all(rq.split_of(names[label]) == "test" for label in a.units)
    if qtype == "count":
        assert a.answers == [str(len(a.units))] and a.document.count("## ") >= len(a.units)
    else:
        for ans, d in zip(a.answers, a.depths):
            assert a.document.count(ans) == 1  # unambiguous: the answer occurs once
            assert abs(a.document.index(ans) / len(a.document) - d) < 0.002
    if qtype == "two":
        assert min(a.depths) < 0.35 and max(a.depths) > 0.65
    assert a.question in tok.decode(a.ids[e:])
    assert tok.decode(a.ids).rstrip().endswith(a.answer_prefix)


def test_tune_and_test_splits_are_disjoint(tok, frame):
    t = rq.make(tok, frame, "metadata", "single", 4096, 0, split="tune")
    s = rq.make(tok, frame, "metadata", "single", 4096, 0, split="test")
    assert not set(t.units) & set(s.units)
    assert all(rq.split_of(n) == "tune" for n in t.units)


def test_code_facts_from_the_ast():
    src = ("def load(path, mode='rb', retries=3, scale=0.25, flag=True, n=1):\n    return path\n\n"
           "class A:\n    def fit(self, steps=100, *, name='adam'):\n        pass\n")
    got = {(f.ask, f.answer) for f in rq._default_facts(src, "x.py")}
    assert ("What is the default value of the parameter `mode` of the function `load`?", "rb") in got
    assert ("What is the default value of the parameter `retries` of the function `load`?", "3") in got
    assert ("What is the default value of the parameter `scale` of the function `load`?", "0.25") in got
    assert ("What is the default value of the parameter `steps` of the function `fit`?", "100") in got
    assert ("What is the default value of the parameter `name` of the function `fit`?", "adam") in got
    assert not any("flag" in q or "`n`" in q for q, _ in got)  # booleans and 0/1 are too easy to guess
    for f in rq._default_facts(src, "x.py"):
        assert src[f.offset:].lstrip("'").startswith(f.answer)


def test_exact_match():
    assert rq.match("The version is 1.2.3.", "1.2.3")
    assert not rq.match("The version is 1.2.3.", "1.2")
    assert not rq.match("it is 100", "10")
    assert rq.match("`rb`", "rb")
    assert rq.match('the heading "Resolution of names" follows', "Resolution of names")
    smp = rq.RealSample("pydoc", "count", 4096, 0, "test", [], "", "", "", ["12"], [], [], (0, 0))
    assert rq.score(smp, " 12 topics") == 1.0 and rq.score(smp, " 112 topics, 12") == 0.0
    two = rq.RealSample("metadata", "two", 4096, 0, "test", [], "", "", "", ["1.0.2", "3.4"], [], [], (0, 0))
    assert rq.score(two, "1.0.2 and (2) 3.4") == 1.0 and rq.score(two, "1.0.2 only") == 0.5

"""The evaluation suite's task generators (benchmarks/tasks): seeded, exact-length, answers really
there (once, at the asked depth), AST-derived answers re-verified. No model runs."""
import ast
import re
from collections import Counter

import pytest

from benchmarks.tasks import ChatFrame, codeqa, perplexity, ruler, score, strict_score


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from ctxmem.models import resolve_lm_path

    return AutoTokenizer.from_pretrained(resolve_lm_path("smollm2"))


@pytest.fixture(scope="module")
def frame(tok):
    return ChatFrame(tok)


ALL = [(name, fn) for name, fn in ruler.TASKS.items()] + [("codeqa", codeqa.codeqa)]


@pytest.mark.parametrize("name,fn", ALL)
@pytest.mark.parametrize("length", [2048, 4096, 12345])
def test_exact_length_and_seeded(tok, frame, name, fn, length):
    a = fn(tok, length, seed=3, frame=frame)
    b = fn(tok, length, seed=3, frame=ChatFrame(tok))
    c = fn(tok, length, seed=4, frame=frame)
    assert len(a.ids) == length == a.length
    assert a.ids == b.ids and a.answers == b.answers  # same seed, same prompt, token for token
    assert a.ids != c.ids
    s, e = a.haystack_span
    assert tok.decode(a.ids[s:e]) == a.context
    assert a.ids[:len(frame.pre)] == frame.pre  # the chat frame is intact around the haystack
    assert a.question in tok.decode(a.ids[e:])


def _once_at_depth(tok, smp, value, depth, tol=0.03):
    text = tok.decode(smp.ids)
    assert text.count(value) == 1, (value, text.count(value))
    hs, he = smp.haystack_span
    hits = [(s, e) for s, e in smp.needle_spans if value in tok.decode(smp.ids[s:e])]
    assert len(hits) == 1
    s, e = hits[0]
    hay_without_needles = (he - hs) - sum(b - a for a, b in smp.needle_spans)
    before = (s - hs) - sum(b - a for a, b in smp.needle_spans if b <= s)
    assert abs(before / hay_without_needles - depth) <= tol, (before / hay_without_needles, depth)


@pytest.mark.parametrize("kind", ["numbers", "words", "uuids"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_single_needle_once_at_depth(tok, frame, kind, depth):
    smp = ruler.niah_single(tok, 4096, depth=depth, seed=1, kind=kind, frame=frame)
    assert len(smp.answers) == 1
    _once_at_depth(tok, smp, smp.answers[0], depth)
    key = smp.meta["key"]
    assert tok.decode(smp.ids).count(f"for {key} is:") == 1
    if kind == "uuids":
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", smp.answers[0])
    if kind == "numbers":
        assert re.fullmatch(r"\d{7}", smp.answers[0])


@pytest.mark.parametrize("task", ["niah_single", "niah_multivalue"])
@pytest.mark.parametrize("kind", ["numbers", "words", "uuids"])
def test_answer_budget_fits_the_answer(tok, frame, task, kind):
    """The generation budget must hold every expected value written as the model writes a list
    (':\n\n- value' per value): a uuid is up to 36 tokens here, so 32 could never score."""
    for seed in range(5):
        smp = getattr(ruler, task)(tok, 2048, seed=seed, kind=kind, frame=frame)
        listing = ":\n\n" + "".join(f"- {v}\n" for v in smp.answers)
        assert len(tok(listing, add_special_tokens=False)["input_ids"]) <= smp.max_new_tokens, (kind, smp.answers)


def test_essay_haystack(tok, frame):
    smp = ruler.niah_single(tok, 8192, depth=0.3, seed=2, haystack="essay", frame=frame)
    assert len(smp.ids) == 8192
    _once_at_depth(tok, smp, smp.answers[0], 0.3)
    assert "The grass is green" not in smp.context


def test_multikey_distractors(tok, frame):
    smp = ruler.niah_multikey(tok, 8192, depth=0.7, seed=5, frame=frame)
    text = tok.decode(smp.ids)
    key = smp.meta["key"]
    d = smp.meta["distractors"]
    assert len(d) == 3 and key not in d and smp.answers[0] not in d.values()
    _once_at_depth(tok, smp, smp.answers[0], 0.7)
    for k, v in d.items():
        assert text.count(f"for {k} is: {v}.") == 1
    assert text.count(key) == 1 + 2  # its needle, the question and the answer prefix


def test_multivalue_all_present(tok, frame):
    smp = ruler.niah_multivalue(tok, 4096, depth=0.2, seed=7, frame=frame)
    assert len(set(smp.answers)) == 4
    _once_at_depth(tok, smp, smp.answers[0], 0.2)
    text = tok.decode(smp.ids)
    for v in smp.answers:
        assert text.count(f"for {smp.meta['key']} is: {v}.") == 1


@pytest.mark.parametrize("chains,hops", [(1, 4), (2, 3)])
def test_variable_tracking_chain(tok, frame, chains, hops):
    smp = ruler.vt(tok, 4096, seed=11, num_chains=chains, num_hops=hops, frame=frame)
    stmts = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", smp.context)
    assert len(stmts) == chains * (hops + 1)
    value: dict[str, str] = {}
    for name, rhs in stmts:  # resolve in text order: every right-hand side is already defined
        assert name not in value
        value[name] = value[rhs[4:]] if rhs.startswith("VAR ") else rhs
    asked = smp.meta["value"]
    assert sorted(n for n, v in value.items() if v == asked) == sorted(smp.answers)
    assert len(smp.answers) == hops + 1
    assert f"value {asked} in the text above" in smp.question


@pytest.mark.parametrize("length", [1024, 4096, 16384])
def test_cwe_counts(tok, frame, length):
    smp = ruler.cwe(tok, length, seed=2, frame=frame)
    entries = re.findall(r" (\d+)\. ([a-z]+)", smp.context)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = Counter(w for _, w in entries)
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(smp.answers)
    least_common = min(counts[w] for w in smp.answers)
    most_other = max(c for w, c in counts.items() if w not in smp.answers)
    assert least_common >= 3 * most_other
    assert smp.meta["pad_tokens"] < 16


def _excerpt(context: str, module: str) -> str:
    head = f"# ---- file: {module}.py (excerpt) ----\n"
    assert context.count(head) == 1 and context.count(codeqa.END_EXCERPT) == 1
    return context.split(head, 1)[1].split(codeqa.END_EXCERPT, 1)[0]


@pytest.mark.parametrize("seed", range(6))
def test_codeqa_answers_reverified_from_the_ast(tok, frame, seed):
    smp = codeqa.codeqa(tok, 6144, depth=[0.1, 0.5, 0.9][seed % 3], seed=seed, frame=frame)
    m = smp.meta
    ans = smp.answers[0]
    assert smp.context.count(ans) == 1  # the answer occurs once in the whole context
    assert smp.context.count(f"def {m['function']}(") == 1
    src = _excerpt(smp.context, m["module"])
    tree = ast.parse(src)
    fns = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == m["function"]]
    assert len(fns) == 1
    fn = fns[0]
    if m["kind"] == "raises":
        assert ans == m["function"] and m["message"] in smp.question and ans not in smp.question
        raised = [(r.exc.func.id, r.exc.args[0].value) for r in ast.walk(fn)
                  if isinstance(r, ast.Raise) and isinstance(r.exc, ast.Call) and isinstance(r.exc.func, ast.Name)
                  and r.exc.args and isinstance(r.exc.args[0], ast.Constant)]
        assert (m["exception"], m["message"]) in raised
    else:
        rets = [r for r in ast.walk(fn) if isinstance(r, ast.Return)]
        assert len(rets) == 1
        assert ast.get_source_segment(src, rets[0].value) == ans
    # the excerpt is where it was asked to be
    _once_at_depth(tok, smp, f"# ---- file: {m['module']}.py (excerpt) ----", smp.depth, tol=0.05)
    # and it is the real standard-library source
    assert src.split("\n", 1)[-1].strip() in codeqa.module_sources()[m["module"]]


def test_codeqa_filler_is_stdlib_modules(tok, frame):
    smp = codeqa.codeqa(tok, 8192, seed=1, frame=frame)
    for mod in smp.meta["filler_modules"][:-1]:  # the last one may be cut
        assert f"# ---- file: {mod}.py ----\n" + codeqa.module_sources()[mod] in smp.context


def test_perplexity_windows(tok):
    a = perplexity.window(tok, "code", 2048, seed=0, target=256, max_length=8192)
    b = perplexity.window(tok, "code", 8192, seed=0, target=256, max_length=8192)
    assert len(a.ids) == 2048 and len(b.ids) == 8192
    assert b.ids[-2048:] == a.ids  # a longer context adds text before the same scored tokens
    d = perplexity.window(tok, "docs", 4096, seed=1)
    assert len(d.ids) == 4096 and d.ids != perplexity.window(tok, "docs", 4096, seed=2).ids
    with pytest.raises(ValueError):
        perplexity.window(tok, "docs", 10_000_000)


def test_score_is_rulers_string_match_all():
    assert score("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert score("only 1234567", ["1234567", "7654321"]) == 0.5
    assert score("APPLE", ["apple"]) == 1.0
    assert score("", ["x"]) == 0.0


def test_strict_score_counts_a_named_distractor_as_a_miss(tok, frame):
    smp = ruler.niah_multikey(tok, 4096, depth=0.3, seed=2, frame=frame)
    right, wrong = smp.answers[0], next(iter(smp.meta["distractors"].values()))
    assert strict_score(f" {right}.", smp.answers, [wrong]) == 1.0
    assert score(f" {right} and {wrong}", smp.answers) == 1.0
    from benchmarks import suite

    rows = [dict(task="niah_multikey", length=4096, method="ctxmem", score=1.0, seconds=1.0, peak_rss_mb=1,
                 strict_score=v) for v in (1.0, 0.0)]
    assert suite.summarize(rows)["niah_multikey/4096/ctxmem"]["strict_score"] == 0.5
    assert strict_score(f" {right} and {wrong}", smp.answers, [wrong]) == 0.0
    assert strict_score(f" {wrong}.", smp.answers, [wrong]) == 0.0


def test_suite_plan_table_and_readme(tmp_path):
    from benchmarks import suite

    plan = suite.quick_plan()
    assert {c.task for c in plan.cells} == set(suite.TASK_ORDER)
    assert all(m in suite.METHODS for c in plan.cells for m in c.methods)
    rows = [dict(task="niah_single", length=4096, method=m, depth=0.5, seed=0, score=s, seconds=10.0,
                 peak_rss_mb=900) for m, s in (("stock", 0.0), ("ctxmem", 1.0))]
    rows.append(dict(task="vt", length=4096, method="streaming", depth=None, seed=0, score=None, error="boom"))
    ppl = [dict(method="stock", corpus="code", length=2048, target=256, seed=0, nll=1.0, ppl=2.718, seconds=3.0,
                peak_rss_mb=800)]
    result = dict(suite="suite_test", command="python -m benchmarks.suite --quick", model="smollm2",
                  machine=dict(date="2026-01-01", cpu_model="cpu", cores=2, threads=2, load_avg=[1.0, 1, 1]),
                  wall_seconds=60.0, plan=plan.to_dict(), haystack="noise", unavailable={"x": "why"},
                  streaming_config=dict(local_tokens=704), summary=suite.summarize(rows),
                  ppl=suite.summarize_ppl(ppl))
    lines = suite.table(result)
    assert any(line.startswith("| niah_single | 4K | 0% (1)") and "100% (1)" in line for line in lines)
    assert any("error (1)" in line for line in lines)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{suite.BEGIN}\nold\n{suite.END}\ntail\n")
    assert suite.write_readme(result, readme)
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{suite.END}\ntail\n") and "| niah_single | 4K |" in text
    assert suite.write_readme(result, readme) and readme.read_text().count(suite.BEGIN) == 1


def test_first_sample_extends_an_earlier_run():
    """--first-sample 3 --samples 7 runs exactly the samples a 10-sample run adds to a 3-sample one."""
    from benchmarks import suite

    def grid(samples, first=0):
        plan = suite.grid_plan("custom", ["niah_single", "vt"], [4096, 8192], ["stock", "ctxmem"], samples, 4096,
                               [], ["code"], 1, first=first)
        return {(c.task, c.length, m, i) for c in plan.cells for m in c.methods for i in c.indices()}

    early, later, whole = grid(3), grid(7, first=3), grid(10)
    assert early | later == whole and not early & later
    assert {i for *_, i in later} == set(range(3, 10))
    assert ("niah_single", 8192, "stock", 5) not in whole  # stock only up to stock_max


def test_merge_runs(tmp_path, monkeypatch, tok, frame):
    """--merge: two runs of one configuration become one result; each row's prompt is generated
    again and must give the saved answers; a sample twice, a partial run or another config is refused."""
    from benchmarks import common, suite

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(suite, "RESULTS", tmp_path)

    def run(name, seeds, config=None, partial=False, answers=None):
        rows = []
        for i in seeds:
            smp = suite.make_sample(tok, frame, "niah_multikey", 1024, i)
            wrong = next(iter(smp.meta["distractors"].values()))
            pred = f" {smp.answers[0]} and {wrong}" if i % 2 else f" {smp.answers[0]}."
            rows.append(dict(task="niah_multikey", length=1024, method="ctxmem", depth=smp.depth, seed=i,
                             score=1.0, answers=answers or smp.answers, prediction=pred, seconds=1.0, peak_rss_mb=5))
        res = dict(suite=name, partial=partial, command=f"run {name}", model="smollm2", haystack="noise",
                   machine=dict(date="d"), wall_seconds=10.0, plan=dict(name="custom", cells=[], note="n"),
                   config=config or dict(topk=32), streaming_config=dict(local_tokens=704), unavailable={},
                   summary=suite.summarize(rows), ppl={})
        suite.write_result(res, rows, [])

    run("a", [0, 1])
    run("b", [2, 3, 4])
    result, rows, _ = suite.merge(["a", "b"], "ab", tok=tok)
    s = result["summary"]["niah_multikey/1024/ctxmem"]
    assert s["n"] == 5 and s["score"] == 1.0 and s["strict_score"] == 3 / 5  # seeds 1 and 3 name a distractor
    assert (tmp_path / "ab_niah_multikey.json").exists() and result["wall_seconds"] == 20.0
    assert [m["suite"] for m in result["merged_from"]] == ["a", "b"]
    with pytest.raises(ValueError, match="more than one"):
        suite.merge(["a", "ab"], "x", tok=tok)
    run("c", [5], config=dict(topk=16))
    with pytest.raises(ValueError, match="'config' differ"):
        suite.merge(["a", "c"], "x", tok=tok)
    run("d", [6], partial=True)
    with pytest.raises(ValueError, match="partial"):
        suite.merge(["a", "d"], "x", tok=tok)
    run("e", [7], answers=["0000000"])
    with pytest.raises(ValueError, match="not the generator's"):
        suite.merge(["a", "e"], "x", tok=tok)
    with pytest.raises(ValueError, match="overwrite"):
        suite.merge(["a", "b"], "a", tok=tok)


def test_reader_benchmark_first_sample_gives_fresh_prompts():
    """benchmarks.reader --first-sample 2 --samples 2 runs exactly samples 2-3 of a 4-sample run (same prompts),
    and a negative start is refused by name."""
    from benchmarks import reader
    from ctxmem.reader.tasks import FAMILIES

    texts = ["def f(x):\n    return x + 1\n" * 200, "class A:\n    pass\n" * 300]
    for family, make in FAMILIES.items():
        whole = reader.task_samples(make, texts, [512, 1024], 0, 4, 3.3)
        later = reader.task_samples(make, texts, [512, 1024], 2, 2, 3.3)
        for n in (512, 1024):
            assert list(later[n]) == [2, 3]
            assert [t.messages_user for t in later[n].values()] == [whole[n][i].messages_user for i in (2, 3)]
            assert whole[n][0].messages_user != whole[n][2].messages_user, family
    with pytest.raises(SystemExit):
        reader.main(["--first-sample", "-1"])

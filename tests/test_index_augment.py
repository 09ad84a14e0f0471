"""knowledge_context: dedup, order and token budget (with a stub KB and a real HF tokenizer)."""
import functools
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from ctxmem.index import Hit, knowledge_context
from ctxmem.index.augment import HEADER


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    from ctxmem.models import embedder_path

    return AutoTokenizer.from_pretrained(embedder_path("minilm"))


def ntok(s):
    return len(tokenizer().encode(s, add_special_tokens=False))


class StubKB:
    def __init__(self, hits):
        self.hits = hits

    def search(self, text, k=5):
        return sorted(self.hits, key=lambda h: -h.score)[:k]

    @property
    def sources(self):
        return sorted({h.source for h in self.hits})


DOC_A = "The castle stands on the hill. " * 3 + "Its walls are copper. " * 3 + "Ravens nest in the towers. " * 3
HITS = [
    Hit(DOC_A[0:100], 0.9, "/data/a.txt", 0, 100),
    Hit(DOC_A[80:170], 0.7, "/data/a.txt", 80, 170),  # overlaps the first: merged
    Hit("Bridges cross the river.", 0.8, "/data/b.txt", 40, 64),
    Hit("Bridges  cross the river.\n", 0.5, "/data/c.txt", 0, 26),  # same text, other source: dropped
    Hit("Deserts are dry.", 0.6, "/data/b.txt", 0, 16),
]


def passages(ctx):
    return re.findall(r"^\[(\d+)\] (\S+) \(chars (\d+)-(\d+)\)$", ctx, flags=re.M)


def test_dedup_merge_and_order():
    ctx = knowledge_context(StubKB(HITS), "castle", tokenizer(), budget_tokens=1000, k=8)
    assert ctx.startswith(HEADER)
    got = [(src, int(a), int(b)) for _, src, a, b in passages(ctx)]
    # sources by best score (a: 0.9, b: 0.8), then by position; c's duplicate text is gone;
    # labels relative to the folder that holds every source (/data)
    assert got == [("a.txt", 0, 170), ("b.txt", 0, 16), ("b.txt", 40, 64)]
    assert DOC_A[0:170].strip() in ctx
    assert ctx.count("Bridges") == 1


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(0, 200), k=st.integers(0, 6))
def test_budget_is_respected(budget, k):
    ctx = knowledge_context(StubKB(HITS), "castle", tokenizer(), budget_tokens=budget, k=k)
    assert ntok(ctx) <= budget
    if ctx:
        assert passages(ctx)
    if budget >= 200 and k >= 1:
        assert ctx  # room for at least the best hit


def test_cut_passage_and_empty_cases():
    long_hit = Hit("word " * 400, 0.9, "/data/long.txt", 0, 2000)
    ctx = knowledge_context(StubKB([long_hit]), "q", tokenizer(), budget_tokens=64)
    assert ctx.rstrip().endswith("[...]") and ntok(ctx) <= 64
    assert knowledge_context(StubKB([]), "q", tokenizer()) == ""
    assert knowledge_context(StubKB(HITS), "   ", tokenizer()) == ""
    assert knowledge_context(StubKB(HITS), "q", tokenizer(), budget_tokens=3) == ""
    assert knowledge_context(StubKB(HITS), "q", None, budget_tokens=200)  # no tokenizer: 4 chars per token


def test_source_root_and_labels():
    from ctxmem.index.augment import _label, source_root

    assert source_root(["/kb/docs/a.md", "/kb/docs/sub/b.md", "/kb/docs/log.jsonl#L7"]) == "/kb/docs"
    assert source_root(["/tmp/x1/haystack.txt"]) == "/tmp/x1"  # one file: its name is the label
    assert source_root(["<stdin>"]) is None
    root = "/kb/docs"
    assert _label("/kb/docs/sub/b.md", root) == "sub/b.md"
    assert _label("/kb/docs/log.jsonl#L7", root) == "log.jsonl#L7"
    assert _label("/elsewhere/c.md", root) == "/elsewhere/c.md"  # not under the root: kept whole
    assert _label("<stdin>", root) == "<stdin>"


def test_context_does_not_depend_on_where_the_kb_was_built_or_the_cwd(tmp_path, monkeypatch):
    """The same files and question give the same text from two KBs in different folders, from any CWD."""
    from ctxmem.index import KnowledgeIndex

    texts = {"notes.md": "The harbor lantern of Copperton is green. " * 4,
             "sub/more.md": "Bridges cross the river at dawn. " * 4}
    ctxs = []
    for where in ("one", "two/deeper"):
        docs = tmp_path / where / "docs"
        for name, text in texts.items():
            (docs / name).parent.mkdir(parents=True, exist_ok=True)
            (docs / name).write_text(text)
        kb = KnowledgeIndex.build([docs], tmp_path / where / "kb", embedder="hash:64")
        for cwd in (tmp_path, docs / "sub"):
            monkeypatch.chdir(cwd)
            ctxs.append(knowledge_context(kb, "What colour is the lantern?", tokenizer(), budget_tokens=300))
    assert ctxs[0] and all(c == ctxs[0] for c in ctxs), ctxs
    assert {src for _, src, _, _ in passages(ctxs[0])} <= {"notes.md", "sub/more.md"}

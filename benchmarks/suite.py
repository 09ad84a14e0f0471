"""The long-context evaluation suite: RULER-style synthetic tasks, question answering over the
Python standard library's source, and perplexity on long real text, for every method in one run.

    python -m benchmarks.suite --quick            # README's table (< 10 minutes on 2 cores, idle machine)
    python -m benchmarks.suite                    # the full grid: 4K..64K, every task (many hours on a CPU)
    python -m benchmarks.suite --tasks niah_single,vt --lengths 16384,32768 --methods ctxmem,streaming \\
        --samples 2 --out suite_long              # any sub-grid
    python -m benchmarks.suite --list             # tasks, methods, and the quick plan, without running
    python -m benchmarks.suite ... --samples 7 --first-sample 3 --out run2   # samples 3-9: extends a 3-sample run
    python -m benchmarks.suite --merge run1,run2 --out both                  # ... and the two as one result

Methods (same prompts, same greedy decoding, one after the other on each sample):
  stock              the unwrapped model (sdpa); only up to --stock-max tokens (8K = its trained window)
  streaming          StreamingLLM through the same wrapper: topk 0 (sinks + a local window), the
                     window widened by topk x block so it holds as many tokens as ctxmem's budget
  ctxmem             working memory with the default MemoryConfig (the bundled reader on, for SmolLM2)
  ctxmem+kb          ctxmem plus a knowledge index built over the same haystack (RAG), its hits read
                     as a hidden prefix (wrap(model, knowledge=KB))
  ctxmem+compressor  ctxmem+kb with the hits read as summary tokens of the learned compressor
                     (wrap(model, knowledge=KB, compressor=comp)); the same --kb-budget, counted in
                     decoder positions (about ratio x more text); checkpoint $CTXMEM_SUITE_COMPRESSOR
  rag                plain RAG, no ctxmem: the haystack cut into chunks of 128 MiniLM tokens sharing 64
                     (ctxmem.index's chunker), ranked by cosine with the sample's question by the same
                     embedder as ctxmem's selector, the top 3 read in document order by the stock model
                     in place of the haystack, in the same prompt; its time includes embedding the haystack

Writes benchmarks/results/OUT.json (plan, machine, summary, wall time), OUT_TASK.json (every
answer, per task), OUT_heatmap.png (needle depth x length), OUT_accuracy.png (score vs length per
task and method), OUT_cost.png (time to answer and peak RSS vs length, log-log, with O(N) and
O(N^2) slopes), OUT_ppl.png; --quick (or --readme) also writes the table into README.md between
``<!-- suite:begin -->`` and ``<!-- suite:end -->``. With --json, stdout is one JSON object and
progress goes to stderr.
"""
from __future__ import annotations

import os

# Before torch (or numba) starts its OpenMP threads: on a shared machine, threads that spin while
# waiting steal the cores the working threads need. Measured here under load ~4 on 2 cores,
# ctxmem read 2K tokens in 99-115 s with the default (active) policy and in 7-10 s with PASSIVE.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks.common import RESULTS, PeakRSS, cpu_model, machine, write_json
from benchmarks.tasks import ChatFrame, score, strict_score
from benchmarks.tasks import codeqa as codeqa_mod
from benchmarks.tasks import perplexity as ppl_mod
from benchmarks.tasks import ruler
from ctxmem._atomic import atomic_write_bytes
from ctxmem.memory._malloc import release_free_memory

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"

TASKS = {**ruler.TASKS, **codeqa_mod.TASKS}
TASK_ORDER = ["niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "codeqa"]
METHODS = ["stock", "streaming", "ctxmem", "ctxmem+kb", "ctxmem+compressor", "rag"]
LABELS = {"stock": "stock", "streaming": "StreamingLLM", "ctxmem": "ctxmem", "ctxmem+kb": "ctxmem+KB",
          "ctxmem+compressor": "ctxmem+compressor", "rag": "plain RAG"}
# sample i of a task gets depth DEPTHS[i % len] and value kind KINDS[task][i % len]
DEPTHS = [0.5, 0.25, 0.75, 0.1, 0.9, 0.4, 0.6, 0.3, 0.7, 0.05, 0.95]
KINDS = {"niah_single": ["numbers", "words", "uuids"], "niah_multikey": ["numbers", "uuids"],
         "niah_multivalue": ["numbers"], "codeqa": ["raises", "returns"]}


def make_sample(tok, frame, task: str, length: int, i: int, haystack: str = "noise"):
    """Sample i of a task at a length: the same prompt in every run (seed i, depth and value kind
    cycling through DEPTHS and KINDS)."""
    kw = dict(seed=i, frame=frame)
    if task in KINDS:
        kw["kind"] = KINDS[task][i % len(KINDS[task])]
    if task not in ("vt", "cwe"):
        kw["depth"] = DEPTHS[i % len(DEPTHS)]
    if task.startswith("niah") or task == "vt":
        kw["haystack"] = haystack
    return TASKS[task](tok, length, **kw)


@dataclass
class Cell:
    task: str
    length: int
    methods: list[str]
    samples: int
    first: int = 0  # sample indices first .. first + samples - 1 (a later run can extend an earlier one)

    def indices(self) -> range:
        return range(self.first, self.first + self.samples)


@dataclass
class Plan:
    name: str
    cells: list[Cell]
    ppl_lengths: dict[str, list[int]] = field(default_factory=dict)  # method -> lengths
    ppl_corpora: list[str] = field(default_factory=lambda: ["code"])
    ppl_samples: int = 1
    ppl_target: int = 256
    note: str = ""

    def to_dict(self) -> dict:
        return dict(name=self.name, cells=[c.__dict__ for c in self.cells], ppl_lengths=self.ppl_lengths,
                    ppl_corpora=self.ppl_corpora, ppl_samples=self.ppl_samples, ppl_target=self.ppl_target,
                    note=self.note)

    def calls(self) -> int:
        return sum(len(c.methods) * c.samples for c in self.cells) + \
            self.ppl_samples * len(self.ppl_corpora) * sum(len(v) for v in self.ppl_lengths.values())


def quick_plan() -> Plan:
    """Sized to finish in under 10 minutes on 2 idle cores: every task once at 4K for three
    methods, the needles again at 8K (ctxmem, and the stock model on the single needle), the
    knowledge index on the code task, and perplexity inside and past the 8K window; plain RAG on every
    QA cell (added 2026-12-04: about 5 s per 4K answer). (StreamingLLM
    at 8K and vt at 8K were dropped on 2026-11-30: the reader made the plan 11.9 min, and they
    scored 0 at 4K and 8K in every earlier run.)"""
    base = ["stock", "streaming", "ctxmem"]
    cells = [Cell(t, 4096, base + ["rag"], 1) for t in TASK_ORDER]
    cells += [Cell("niah_single", 8192, ["stock", "ctxmem", "rag"], 1), Cell("niah_multikey", 8192, ["ctxmem", "rag"], 1)]
    cells.append(Cell("codeqa", 4096, ["ctxmem+kb"], 1))
    # the same KB task with the hits read as summary tokens (recorded as unavailable if no checkpoint loads)
    cells.append(Cell("codeqa", 4096, ["ctxmem+compressor"], 1))
    return Plan("quick", cells, ppl_lengths={m: [2048, 10240] for m in base}, ppl_corpora=["code"],
                note="1 sample per cell; stock to 8K; perplexity of the last 256 tokens of one window of code")


def grid_plan(name: str, tasks: list[str], lengths: list[int], methods: list[str], samples: int, stock_max: int,
              ppl_lengths: list[int], ppl_corpora: list[str], ppl_samples: int, first: int = 0) -> Plan:
    cells = []
    for n in lengths:
        for t in tasks:
            ms = [m for m in methods if m != "stock" or n <= stock_max]
            if ms:
                cells.append(Cell(t, n, ms, samples, first))
    pm = [m for m in methods if m in ("stock", "streaming", "ctxmem")]
    ppl = {m: [n for n in ppl_lengths if m != "stock" or n <= 2 * stock_max] for m in pm}
    return Plan(name, cells, ppl_lengths={m: v for m, v in ppl.items() if v}, ppl_corpora=ppl_corpora,
                ppl_samples=ppl_samples,
                note=f"{samples} sample{'s' if samples != 1 else ''} per cell"
                     + (f" (samples {first}-{first + samples - 1})" if first else "") + f"; stock to {stock_max // 1024}K")


def _strict(text: str, sample) -> dict:
    """For multi-key needles: the score with naming a distractor's value counted as a miss."""
    d = sample.meta.get("distractors")
    return dict(strict_score=strict_score(text, sample.answers, list(d.values()))) if d else {}


# ---------------------------------------------------------------------------------------------
# methods


def _compressor(model=None, tokenizer=None):
    """COMPRESSOR SLOT (issue 4). Returns wrap() keyword arguments that put the compressor in the
    loop (``compressor=comp``, loaded onto ``model`` so its encoder shares the wrapped model's
    weights; the caller adds ``knowledge=``), or raises ``MethodUnavailable`` saying why. The
    checkpoint comes from $CTXMEM_SUITE_COMPRESSOR (default: the bundled "smollm2-r8")."""
    import ctxmem

    try:
        comp_cls = getattr(ctxmem, "Compressor")
    except AttributeError:
        raise MethodUnavailable("ctxmem.Compressor does not exist yet (issue 4)") from None
    import inspect

    if "compressor" not in inspect.signature(ctxmem.wrap).parameters:
        raise MethodUnavailable("ctxmem.wrap has no compressor= argument yet; adapt benchmarks/suite.py:_compressor")
    try:
        comp = comp_cls.from_pretrained(os.environ.get("CTXMEM_SUITE_COMPRESSOR", "smollm2-r8"), model=model,
                                        tokenizer=tokenizer)
    except Exception as e:  # noqa: BLE001 - any failure makes the method unavailable, with the reason
        raise MethodUnavailable(f"ctxmem.Compressor.from_pretrained failed: {type(e).__name__}: {e}") from None
    return dict(compressor=comp)


class MethodUnavailable(RuntimeError):
    pass


def rag_ids(tok, sample, embedder, k: int | None = None) -> tuple[list[int], dict]:
    """Plain RAG's prompt for a sample: the same ids with the haystack replaced by the top-k chunks of
    ``sample.context`` for ``sample.question`` (benchmarks.common.rag_retrieve), and what was picked
    (``rag_hit``: the first needle's text, the one asked about, is inside the picked text; None for
    tasks without needles; ``rag_needles_picked``: how many of the needles, distractors included)."""
    from benchmarks.common import RAG_TOP_K, rag_retrieve

    pick = rag_retrieve(sample.context, sample.question, embedder, k=k or RAG_TOP_K)
    s, e = sample.haystack_span
    ids = list(sample.ids[:s]) + tok(pick.text, add_special_tokens=False)["input_ids"] + list(sample.ids[e:])
    needles = [tok.decode(sample.ids[a:b]).strip() for a, b in sample.needle_spans]
    info = dict(pick.describe(), rag_prompt_tokens=len(ids),
                rag_hit=(needles[0] in pick.text) if needles else None,
                rag_needles_picked=sum(n in pick.text for n in needles) if needles else None)
    return ids, info


def method_config(method: str, base):
    if method == "streaming":
        # StreamingLLM: sinks + recent window only; the window gets ctxmem's retrieved budget too.
        # No reader: the baseline is the stock model on a sliding window, as the paper has it.
        return replace(base, topk_blocks=0, prefill_topk=0, embed_hits=0, selector="keys", reader=None,
                       local_tokens=base.local_tokens + base.topk_blocks * base.block_size)
    return base


class Runner:
    def __init__(self, args, plan: Plan):
        import torch

        import ctxmem

        self.args, self.plan = args, plan
        torch.set_grad_enabled(False)
        torch.manual_seed(0)
        if args.threads:
            from benchmarks.common import set_threads
            set_threads(args.threads)
        self.log(f"loading {args.model} ...")
        self.model, self.tok = ctxmem.load_model(args.model)
        self.emb = ctxmem.load_embedder("minilm")
        self.frame = ChatFrame(self.tok)
        self.base = ctxmem.MemoryConfig(**args.config)
        self.rows: list[dict] = []
        self.ppl_rows: list[dict] = []
        self.unavailable: dict[str, str] = {}
        self._comp_kwargs = None  # the compressor, loaded once onto self.model (its adapter stays, off)
        self.tmp = Path(tempfile.mkdtemp(prefix="ctxmem-suite-"))

    def log(self, msg: str):
        from tqdm.auto import tqdm
        tqdm.write(msg, file=sys.stderr)

    # -- one method on one prompt -------------------------------------------------------------
    def _wrapped(self, method: str, sample=None):
        """Context manager: the model set up for ``method`` (wrap before, unwrap after)."""
        import contextlib

        import ctxmem

        @contextlib.contextmanager
        def cm():
            if method == "stock":
                yield {}
                return
            extra, info = {}, {}
            if method in ("ctxmem+kb", "ctxmem+compressor"):
                if method == "ctxmem+compressor" and self._comp_kwargs is None:
                    self._comp_kwargs = _compressor(self.model, self.tok)
                t0 = time.perf_counter()
                kb = self._kb(sample)
                info["kb_build_seconds"] = round(time.perf_counter() - t0, 2)
                info["kb_chunks"] = len(kb)
                extra = dict(knowledge=kb, knowledge_budget=self.args.kb_budget,
                             **(self._comp_kwargs if method == "ctxmem+compressor" else {}))
                # hits are labelled relative to the KB's own source folder ("haystack.txt"), so the
                # prompt does not depend on the random temporary folder
            ctxmem.wrap(self.model, method_config(method, self.base), tokenizer=self.tok, embedder=self.emb, **extra)
            try:
                yield info
            finally:
                ctxmem.unwrap(self.model)
        return cm()

    def _kb(self, sample):
        from ctxmem.index import KnowledgeIndex

        d = self.tmp / f"kb-{len(self.rows)}"
        d.mkdir()
        (d / "haystack.txt").write_text(sample.context)
        return KnowledgeIndex.build([str(d / "haystack.txt")], str(d / "kb"), embedder=self.emb, progress=False)

    def answer(self, method: str, sample) -> dict:
        import torch

        from benchmarks.passkey import answer

        release_free_memory()  # each row's peak RSS is its own, not earlier rows' heap high-water
        if method == "rag":
            with PeakRSS() as mem:
                ids, info = rag_ids(self.tok, sample, self.emb)
                text, sec, prefill, decode = answer(self.model, self.tok, torch.tensor([ids]), sample.max_new_tokens)
            sec += info["rag_seconds"]  # time to answer includes chunking and embedding the haystack
        else:
            ids = torch.tensor([sample.ids])
            with self._wrapped(method, sample) as info, PeakRSS() as mem:
                text, sec, prefill, decode = answer(self.model, self.tok, ids, sample.max_new_tokens)
        return dict(task=sample.task, length=sample.length, method=method, depth=sample.depth, seed=sample.seed,
                    kind=sample.meta.get("kind"), score=score(text, sample.answers), answers=sample.answers,
                    **_strict(text, sample),
                    prediction=text, seconds=round(sec, 2), prefill_seconds=round(prefill, 2),
                    decode_ms_per_token=round(1000 * decode, 1) if decode == decode else None,
                    peak_rss_mb=round(mem.peak_mb), rss_before_mb=round(mem.start_mb), **info)

    def perplexity(self, method: str, w) -> dict:
        import torch
        import torch.nn.functional as F

        import ctxmem

        ids = torch.tensor([w.ids])
        T = w.target
        release_free_memory()
        t0 = time.perf_counter()
        with self._wrapped(method) as info, PeakRSS() as mem:
            if method == "stock":
                logits = self.model(ids, logits_to_keep=T + 1).logits[0, :-1]
            else:
                cache = ctxmem.new_cache(self.model)
                first = self.model(ids[:, :-T], cache=cache, logits_to_keep=1).logits[0, -1:]
                rest = self.model(ids[:, -T:], cache=cache, logits_to_keep=0).logits[0, :-1]
                logits = torch.cat([first, rest])
            nll = F.cross_entropy(logits.float(), ids[0, -T:], reduction="mean").item()
        return dict(method=method, **w.describe(), nll=round(nll, 4), ppl=round(math.exp(nll), 3),
                    seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=round(mem.peak_mb), **info)

    # -- the run -------------------------------------------------------------------------------
    def warmup(self) -> float:
        """One short untimed answer per method kind, so one-time costs (numba kernels compiled or
        loaded from their cache, the embedder's first call, torch's first allocations) land in no
        measurement. Returns its seconds (counted in the wall time)."""
        t0 = time.perf_counter()
        smp = ruler.niah_single(self.tok, 1536, depth=0.5, seed=999, frame=self.frame)
        smp.max_new_tokens = 2
        used = {m for c in self.plan.cells for m in c.methods} | set(self.plan.ppl_lengths)
        for m in ("stock", "streaming", "ctxmem"):
            if m in used or (m == "ctxmem" and used & {"ctxmem+kb", "ctxmem+compressor"}) or (m == "stock" and "rag" in used):
                self.answer(m, smp)
        return time.perf_counter() - t0

    def run(self) -> dict:
        from tqdm.auto import tqdm

        t_start = time.perf_counter()
        self.log(f"warm-up: {self.warmup():.1f} s")
        bar = tqdm(total=self.plan.calls(), unit="run", desc="suite", file=sys.stderr, dynamic_ncols=True)
        for cell in self.plan.cells:
            for i in cell.indices():
                try:
                    sample = self.make(cell.task, cell.length, i)
                except Exception as e:  # noqa: BLE001 - a generator failure is reported, not fatal
                    for method in cell.methods:
                        self.rows.append(dict(task=cell.task, length=cell.length, method=method, depth=None, seed=i,
                                              score=None, error=f"cannot generate: {type(e).__name__}: {e}"))
                        self.log(self._line(self.rows[-1]))
                        bar.update(1)
                    continue
                for method in cell.methods:
                    bar.set_postfix_str(f"{cell.task} {cell.length // 1024}K {method}")
                    if method in self.unavailable:
                        bar.update(1)
                        continue
                    try:
                        row = self.answer(method, sample)
                    except MethodUnavailable as e:
                        self.unavailable[method] = str(e)
                        self.log(f"{method}: unavailable ({e})")
                        bar.update(1)
                        continue
                    except Exception as e:  # noqa: BLE001 - a failure is a result; record it and go on
                        row = dict(task=cell.task, length=cell.length, method=method, depth=sample.depth,
                                   seed=sample.seed, score=None, error=f"{type(e).__name__}: {e}")
                    self.rows.append(row)
                    bar.update(1)
                    self.log(self._line(row))
                    self.save(time.perf_counter() - t_start, partial=True)
        for corpus in (self.plan.ppl_corpora if self.plan.ppl_lengths else []):
            longest = max(n for v in self.plan.ppl_lengths.values() for n in v)
            lengths = sorted({n for v in self.plan.ppl_lengths.values() for n in v})
            for s in range(self.plan.ppl_samples):
                for n in lengths:
                    w = ppl_mod.window(self.tok, corpus, n, seed=s, target=self.plan.ppl_target, max_length=longest)
                    for method, ls in self.plan.ppl_lengths.items():
                        if n not in ls:
                            continue
                        bar.set_postfix_str(f"ppl {corpus} {n // 1024}K {method}")
                        try:
                            row = self.perplexity(method, w)
                        except Exception as e:  # noqa: BLE001
                            row = dict(method=method, **w.describe(), ppl=None, error=f"{type(e).__name__}: {e}")
                        self.ppl_rows.append(row)
                        bar.update(1)
                        self.log(f"ppl   {corpus:5s} {n:>6d} {method:18s} ppl={row.get('ppl')} "
                                 f"{row.get('seconds', '-')}s {row.get('error', '')}")
                        self.save(time.perf_counter() - t_start, partial=True)
        bar.close()
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)  # the knowledge indexes built over haystacks
        return self.save(time.perf_counter() - t_start, partial=False)

    def make(self, task: str, length: int, i: int):
        return make_sample(self.tok, self.frame, task, length, i, self.args.haystack)

    @staticmethod
    def _line(r: dict) -> str:
        if r.get("error"):
            return f"{r['task']:15s} {r['length']:>6d} {r['method']:18s} ERROR {r['error']}"
        d = "" if r["depth"] is None else f"d={r['depth']:.2f}"
        return (f"{r['task']:15s} {r['length']:>6d} {r['method']:18s} {d:7s} score={r['score']:.2f} "
                f"{r['seconds']:6.1f}s rss {r['peak_rss_mb']:>5d} MB  {r['prediction'][:50]!r}")

    def save(self, wall: float, partial: bool) -> dict:
        out = self.args.out
        m = machine()
        m.update(cpu_model=cpu_model(), python=platform.python_version(), load_avg=list(os.getloadavg()),
                 omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
        result = dict(suite=out, partial=partial, command=" ".join(["python -m benchmarks.suite"] + sys.argv[1:]),
                      model=self.args.model, machine=m, wall_seconds=round(wall, 1), plan=self.plan.to_dict(),
                      config=self.base.to_dict(), streaming_config=method_config("streaming", self.base).to_dict(),
                      haystack=self.args.haystack, unavailable=self.unavailable,
                      summary=summarize(self.rows), ppl=summarize_ppl(self.ppl_rows))
        write_result(result, self.rows, self.ppl_rows)
        return result


def write_result(result: dict, rows: list[dict], ppl_rows: list[dict]) -> None:
    """OUT_TASK.json per task, OUT_ppl.json, then OUT.json (the summary) last."""
    out, m = result["suite"], result["machine"]
    for task in sorted({r["task"] for r in rows}):
        write_json(f"{out}_{task}", dict(suite=out, task=task, machine=m, rows=[r for r in rows if r["task"] == task]))
    if ppl_rows:
        write_json(f"{out}_ppl", dict(suite=out, machine=m, rows=ppl_rows))
    write_json(out, result)


def merge(names: list[str], out: str, tok=None) -> tuple[dict, list[dict], list[dict]]:
    """Several finished runs of one configuration as one result (a run extended with --first-sample,
    say). Refuses runs whose model, haystack or configs differ, partial runs, and a sample present
    twice. Each row's prompt is generated again and its answers compared, so runs whose task
    generators differ cannot be merged; multi-key rows saved before ``strict_score`` existed get it."""
    if len(names) < 2:
        raise ValueError(f"--merge needs two or more runs, got {names}")
    if out in names:
        raise ValueError(f"--out {out!r} would overwrite one of the merged runs")
    loaded = [load(n) for n in names]
    base = loaded[0][0]
    for n, (res, _, _) in zip(names, loaded):
        if res.get("partial"):
            raise ValueError(f"cannot merge {n}: it is a partial run (interrupted)")
        for key in ("model", "haystack", "config", "streaming_config"):
            if res.get(key) != base.get(key):
                raise ValueError(f"cannot merge {names[0]} and {n}: their {key!r} differ")
    rows = [r for _, rs, _ in loaded for r in rs]
    ppl_rows = [r for _, _, rs in loaded for r in rs]
    seen: set = set()
    for key in [(r["task"], r["length"], r["method"], r["seed"]) for r in rows] + \
               [("ppl", r["corpus"], r["length"], r["method"], r["seed"]) for r in ppl_rows]:
        if key in seen:
            raise ValueError(f"{key} is in more than one of {names}")
        seen.add(key)
    if tok is None:
        from transformers import AutoTokenizer

        from ctxmem.models import resolve_lm_path
        tok = AutoTokenizer.from_pretrained(resolve_lm_path(base["model"]))
    frame, made = ChatFrame(tok), {}
    for r in rows:
        k = (r["task"], r["length"], r["seed"])
        if k not in made:
            made[k] = make_sample(tok, frame, *k, haystack=base["haystack"])
        smp = made[k]
        if "answers" in r and r["answers"] != smp.answers:
            raise ValueError(f"{k}: the saved answers {r['answers']} are not the generator's {smp.answers}")
        if not r.get("error") and "strict_score" not in r:
            r.update(_strict(r["prediction"], smp))
    per_cell = sorted(set(Counter((r["task"], r["length"], r["method"]) for r in rows).values()))
    result = dict(base, suite=out, partial=False, command=f"python -m benchmarks.suite --merge {','.join(names)} --out {out}",
                  merged_from=[dict(suite=n, command=res["command"], machine=res["machine"],
                                    wall_seconds=res["wall_seconds"]) for n, (res, _, _) in zip(names, loaded)],
                  machine=loaded[-1][0]["machine"], wall_seconds=round(sum(res["wall_seconds"] for res, _, _ in loaded), 1),
                  plan=dict(base["plan"], name="merged",
                            note=f"{'-'.join(map(str, per_cell))} samples per cell, merged from {', '.join(names)}"),
                  unavailable={k: v for res, _, _ in loaded for k, v in res["unavailable"].items()},
                  summary=summarize(rows), ppl=summarize_ppl(ppl_rows))
    write_result(result, rows, ppl_rows)
    return result, rows, ppl_rows


# ---------------------------------------------------------------------------------------------
# summaries, table, plots


def summarize(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(f"{r['task']}/{r['length']}/{r['method']}",
                           dict(task=r["task"], length=r["length"], method=r["method"], n=0, errors=0,
                                score_sum=0.0, seconds=[], peak_rss_mb=[]))
        s["n"] += 1
        if r.get("error"):
            s["errors"] += 1
            continue
        s["score_sum"] += r["score"]
        if "strict_score" in r:
            s["strict_sum"] = s.get("strict_sum", 0.0) + r["strict_score"]
        s["seconds"].append(r["seconds"])
        s["peak_rss_mb"].append(r["peak_rss_mb"])
    for s in out.values():
        ok = s["n"] - s["errors"]
        s["score"] = round(s.pop("score_sum") / s["n"], 4) if s["n"] else None  # errors count as 0
        if "strict_sum" in s:
            s["strict_score"] = round(s.pop("strict_sum") / s["n"], 4)
        s["seconds"] = round(sum(s["seconds"]) / ok, 2) if ok else None
        s["peak_rss_mb"] = max(s["peak_rss_mb"]) if ok else None
    return out


def summarize_ppl(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(f"{r['corpus']}/{r['length']}/{r['method']}",
                           dict(corpus=r["corpus"], length=r["length"], method=r["method"], nll=[], seconds=[],
                                peak_rss_mb=[], errors=0))
        if r.get("error"):
            s["errors"] += 1
            continue
        s["nll"].append(r["nll"])
        s["seconds"].append(r["seconds"])
        s["peak_rss_mb"].append(r["peak_rss_mb"])
    for s in out.values():
        n = len(s["nll"])
        s["n"] = n
        s["ppl"] = round(math.exp(sum(s["nll"]) / n), 3) if n else None
        s["nll"] = round(sum(s["nll"]) / n, 4) if n else None
        s["seconds"] = round(sum(s["seconds"]) / n, 2) if n else None
        s["peak_rss_mb"] = max(s["peak_rss_mb"]) if n else None
    return out


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def table(result: dict) -> list[str]:
    summ, ppl = result["summary"], result["ppl"]
    methods = [m for m in METHODS if any(s["method"] == m for s in summ.values())]
    lines = ["| task | context | " + " | ".join(LABELS[m] for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    order = {t: i for i, t in enumerate(TASK_ORDER)}
    keys = sorted({(s["task"], s["length"]) for s in summ.values()}, key=lambda k: (order.get(k[0], 99), k[1]))
    for task, n in keys:
        cells = []
        for m in methods:
            s = summ.get(f"{task}/{n}/{m}")
            if not s:
                cells.append("–")
            elif s["seconds"] is None:
                cells.append(f"error ({s['errors']})")
            else:
                cells.append(f"{100 * s['score']:.0f}% ({s['n']}) · {s['seconds']:.0f} s" +
                             (f" · {s['errors']} err" if s["errors"] else ""))
        lines.append(f"| {task} | {_k(n)} | " + " | ".join(cells) + " |")
    if ppl:
        pm = [m for m in METHODS if any(s["method"] == m for s in ppl.values())]
        lines += ["", "| perplexity (last 256 tokens) | context | " + " | ".join(LABELS[m] for m in pm) + " |",
                  "|---|---|" + "---|" * len(pm)]
        for corpus, n in sorted({(s["corpus"], s["length"]) for s in ppl.values()}):
            cells = []
            for m in pm:
                s = ppl.get(f"{corpus}/{n}/{m}")
                cells.append("–" if not s else ("error" if s["ppl"] is None else f"{s['ppl']:.2f} · {s['seconds']:.0f} s"))
            lines.append(f"| {corpus} | {_k(n)} | " + " | ".join(cells) + " |")
    return lines


def readme_block(result: dict) -> str:
    m = result["machine"]
    cmd = result["command"]
    head = (f"### `{cmd}` ({m['date']}, {m['cpu_model']}, {m['cores']} cores, {m['threads']} torch threads, "
            f"load average at the end {m['load_avg'][0]:.1f}; wall time {result['wall_seconds'] / 60:.1f} min)\n\n"
            f"{_model_name(result['model'])} (trained window 8K). Each cell: score (samples) · mean seconds to answer. "
            f"Score = RULER's string_match_all (the share of the expected strings found in the answer). "
            f"{result['plan']['note']}. Haystack of the needle tasks and vt: RULER's {result['haystack']!r} filler. "
            f"StreamingLLM = the same wrapper with topk 0 and a local window of "
            f"{result['streaming_config']['local_tokens']} tokens (ctxmem's budget), no reader. "
            + (f"ctxmem = the default MemoryConfig (reader {result['config'].get('reader')!r}). "
               if "config" in result else "") +
            ("plain RAG = the haystack in chunks of 128 MiniLM tokens sharing 64, the 3 closest to the question "
               "(cosine, ctxmem's embedder) read in document order by the stock model; its time includes embedding. "
               if any(s["method"] == "rag" for s in result["summary"].values()) else "") +
            f"Full results: `benchmarks/results/{result['suite']}*.json`.\n")
    if result["unavailable"]:
        head += "\nNot run: " + "; ".join(f"{k}: {v}" for k, v in result["unavailable"].items()) + ".\n"
    return head + "\n" + "\n".join(table(result)) + "\n"


def write_readme(result: dict, path: Path = README) -> bool:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        print(f"README markers {BEGIN} / {END} not found in {path}; table not written", file=sys.stderr)
        return False
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    name = result["suite"]
    images = (f"![needles](benchmarks/results/{name}_heatmap.png)\n![accuracy](benchmarks/results/{name}_accuracy.png)\n"
              f"![cost](benchmarks/results/{name}_cost.png)\n" +
              (f"![perplexity](benchmarks/results/{name}_ppl.png)\n" if result.get("ppl") else ""))
    atomic_write_bytes(path, (text[:a] + "\n" + readme_block(result) + "\n" + images + text[b:]).encode())
    return True


def load(name: str) -> tuple[dict, list[dict], list[dict]]:
    """A saved run: its summary JSON, the rows of every task, the perplexity rows."""
    result = json.loads((RESULTS / f"{name}.json").read_text())
    rows = []
    for task in TASK_ORDER:
        p = RESULTS / f"{name}_{task}.json"
        if p.exists():
            rows += json.loads(p.read_text())["rows"]
    p = RESULTS / f"{name}_ppl.json"
    ppl_rows = json.loads(p.read_text())["rows"] if p.exists() else []
    return result, rows, ppl_rows


def _plain_ticks(ax):
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.yaxis,):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())


def _model_name(name: str) -> str:
    return {"smollm2": "SmolLM2-135M-Instruct"}.get(name, name)


def plot(result: dict, rows: list[dict], ppl_rows: list[dict]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = result["suite"]
    written = []
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    colors = {"stock": "#7f7f7f", "streaming": "#ff7f0e", "ctxmem": "#1f77b4", "ctxmem+kb": "#2ca02c",
              "ctxmem+compressor": "#9467bd", "rag": "#d62728"}

    # needle heatmap: depth x length per method (single needle; color = mean score)
    sel = [r for r in rows if r["task"] == "niah_single" and not r.get("error")]
    if sel:
        ms = [m for m in methods if any(r["method"] == m for r in sel)]
        fig, axes = plt.subplots(1, len(ms), figsize=(3.6 * len(ms), 3.4), squeeze=False)
        lens = sorted({r["length"] for r in sel})
        deps = sorted({r["depth"] for r in sel})
        for ax, m in zip(axes[0], ms):
            grid = [[float("nan")] * len(lens) for _ in deps]
            acc: dict = {}
            for r in sel:
                if r["method"] == m:
                    acc.setdefault((deps.index(r["depth"]), lens.index(r["length"])), []).append(r["score"])
            for (i, j), v in acc.items():
                grid[i][j] = sum(v) / len(v)
            ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(len(lens)), [_k(n) for n in lens])
            ax.set_yticks(range(len(deps)), [f"{d:.2f}" for d in deps])
            ax.set_xlabel("context length")
            ax.set_ylabel("needle depth")
            ax.set_title(LABELS[m])
        fig.suptitle(f"Single needle found (green; blank = not run) — {_model_name(result['model'])}")
        fig.tight_layout()
        p = RESULTS / f"{name}_heatmap.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)

    # accuracy vs length per task
    tasks = [t for t in TASK_ORDER if any(r["task"] == t for r in rows)]
    if tasks:
        cols = min(3, len(tasks))
        nrow = -(-len(tasks) // cols)
        fig, axes = plt.subplots(nrow, cols, figsize=(4 * cols, 3.2 * nrow), squeeze=False)
        for ax, t in zip(axes.flat, tasks):
            for m in methods:
                pts = sorted((s["length"], s["score"]) for s in result["summary"].values()
                             if s["task"] == t and s["method"] == m and s["score"] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", color=colors[m], label=LABELS[m])
            ax.set_xscale("log", base=2)
            ax.set_ylim(-5, 105)
            ax.set_title(t)
            ax.set_xlabel("context tokens")
            ax.set_ylabel("score %")
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(tasks):]:
            ax.axis("off")
        handles = {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=len(handles), fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.94))
        p = RESULTS / f"{name}_accuracy.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)

    # cost: time to answer and peak RSS vs length, log-log, with O(N) and O(N^2) slopes
    ok = [r for r in rows if not r.get("error")]
    if ok:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, ylabel in ((axes[0], "seconds", "seconds to answer"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
            for m in methods:
                pts: dict = {}
                for r in ok:
                    if r["method"] == m:
                        pts.setdefault(r["length"], []).append(r[key])
                if pts:
                    xs = sorted(pts)
                    ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], "o-", color=colors[m], label=LABELS[m])
            xs = sorted({r["length"] for r in ok})
            if len(xs) > 1 and key == "seconds":
                y0 = min(r[key] for r in ok if r["length"] == xs[0])
                for power, style, lab in ((1, ":", "O(N)"), (2, "--", "O(N²)")):
                    ax.plot(xs, [y0 * (x / xs[0]) ** power for x in xs], style, color="black", alpha=0.5, label=lab)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            _plain_ticks(ax)
            ax.set_xlabel("context tokens")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_title("Time to answer (all tasks, mean)")
        axes[1].set_title("Process peak RSS during the answer\n(one process; free heap handed back to the OS before each)",
                          fontsize=9)
        fig.tight_layout()
        p = RESULTS / f"{name}_cost.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)

    okp = [r for r in ppl_rows if r.get("ppl") is not None]
    if okp:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for corpus in sorted({r["corpus"] for r in okp}):
            for m in methods + [x for x in METHODS if x not in methods]:
                s = sorted((v["length"], v["ppl"]) for v in result["ppl"].values()
                           if v["corpus"] == corpus and v["method"] == m and v["ppl"] is not None)
                if s:
                    ax.plot([a for a, _ in s], [b for _, b in s], "o-", color=colors[m], label=f"{LABELS[m]} · {corpus}")
        ax.axvline(8192, color="black", ls=":", alpha=0.5)
        ax.text(8192, ax.get_ylim()[1], " trained window", va="top", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _plain_ticks(ax)
        ax.set_xlabel("context tokens")
        ax.set_ylabel("perplexity of the last 256 tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = RESULTS / f"{name}_ppl.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written


# ---------------------------------------------------------------------------------------------


def _csv(s: str, conv=str) -> list:
    return [conv(x) for x in s.split(",") if x.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the fixed quick plan (README's table; < 10 min)")
    p.add_argument("--tasks", default=",".join(TASK_ORDER))
    p.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    p.add_argument("--methods", default="stock,streaming,ctxmem,ctxmem+kb,ctxmem+compressor,rag")
    p.add_argument("--samples", type=int, default=5, help="samples per (task, length)")
    p.add_argument("--first-sample", type=int, default=0, metavar="I",
                   help="run samples I .. I+samples-1 (sample i is the same prompt in every run: extends an earlier run)")
    p.add_argument("--stock-max", type=int, default=8192, help="the stock model runs up to this length")
    p.add_argument("--ppl-lengths", default="2048,4096,8192,16384,32768,65536", help="'' for none")
    p.add_argument("--ppl-corpora", default="code,docs")
    p.add_argument("--ppl-samples", type=int, default=2)
    p.add_argument("--haystack", default="noise", choices=["noise", "essay"], help="filler of the needle tasks and vt")
    p.add_argument("--kb-budget", type=int, default=1024, help="knowledge tokens read before the prompt")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="MemoryConfig override")
    p.add_argument("--out", default=None, help="results name (default suite_quick / suite)")
    p.add_argument("--readme", action=argparse.BooleanOptionalAction, default=None,
                   help="write the table into README.md (default: on with --quick)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    p.add_argument("--list", action="store_true", help="print tasks, methods and the plan, run nothing")
    p.add_argument("--merge", default=None, metavar="RUN,RUN,...",
                   help="write --out as these finished runs together (one configuration, no sample twice), run nothing")
    p.add_argument("--replot", action="store_true",
                   help="redraw the plots (and README with --readme) from the saved JSON of --out, run nothing")
    args = p.parse_args(argv)
    from ctxmem.cli import _parse_overrides
    args.config = _parse_overrides(args.set)

    bad = [t for t in _csv(args.tasks) if t not in TASKS]
    badm = [m for m in _csv(args.methods) if m not in METHODS]
    if args.first_sample < 0 or args.samples < 0:
        p.error(f"--first-sample ({args.first_sample}) and --samples ({args.samples}) must be >= 0")
    if bad or badm:
        p.error(f"unknown task(s) {bad} / method(s) {badm}; tasks: {list(TASKS)}, methods: {METHODS}")
    if args.merge and not args.out:
        p.error("--merge needs --out NAME")
    if args.quick:
        plan = quick_plan()
        args.out = args.out or "suite_quick"
    else:
        plan = grid_plan("full" if args.lengths == p.get_default("lengths") else "custom", _csv(args.tasks),
                         _csv(args.lengths, int), _csv(args.methods), args.samples, args.stock_max,
                         _csv(args.ppl_lengths, int), _csv(args.ppl_corpora), args.ppl_samples,
                         first=args.first_sample)
        args.out = args.out or "suite"
    if args.readme is None:
        args.readme = args.quick
    if args.merge:
        try:
            result, rows, ppl_rows = merge(_csv(args.merge), args.out)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
        written = plot(result, rows, ppl_rows)
        if args.readme and write_readme(result):
            print(f"README.md: table written between {BEGIN} and {END}", file=sys.stderr)
        print("\n".join(table(result)) if not args.json else json.dumps(result))
        print(f"wrote benchmarks/results/{args.out}.json, per-task json, " + ", ".join(x.name for x in written),
              file=sys.stderr)
        return 0
    if args.replot:
        result, rows, ppl_rows = load(args.out)
        written = plot(result, rows, ppl_rows)
        if args.readme and write_readme(result):
            print(f"README.md: table written between {BEGIN} and {END}", file=sys.stderr)
        print("\n".join(table(result)) if not args.json else json.dumps(result))
        print("wrote " + ", ".join(x.name for x in written), file=sys.stderr)
        return 0
    if args.list:
        print(json.dumps(dict(tasks=list(TASKS), methods=METHODS, plan=plan.to_dict(), calls=plan.calls()), indent=2))
        return 0
    runner = Runner(args, plan)
    runner.log(f"plan {plan.name}: {plan.calls()} model runs -> benchmarks/results/{args.out}*.json")
    result = runner.run()
    written = plot(result, runner.rows, runner.ppl_rows)
    if args.readme:
        if write_readme(result):
            runner.log(f"README.md: table written between {BEGIN} and {END}")
    runner.log(f"wrote benchmarks/results/{args.out}.json, per-task json, " + ", ".join(x.name for x in written))
    runner.log(f"wall time {result['wall_seconds'] / 60:.1f} min")
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

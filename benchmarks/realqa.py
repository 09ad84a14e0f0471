"""Questions over real long documents (installed packages' METADATA, the Python reference manual's
pydoc topics, third-party Python source): ctxmem against plain RAG, the stock model and StreamingLLM,
same prompts, same run. Questions and documents: ``benchmarks/tasks/realqa.py`` (one passage, two
passages far apart, counting; answers checked exactly; a fixed tune/test split by source).

    python -m benchmarks.realqa --lengths 4096,16384 --samples 1 --threads 1          # test split
    python -m benchmarks.realqa --list                                                 # the plan only
    python -m benchmarks.realqa --merge realqa_4096,realqa_16384 --out realqa          # runs as one result

Methods (greedy decoding, the bundled SmolLM2-135M-Instruct, trained window 8K):
  stock            the unwrapped model; a prompt longer than its window keeps the document's first and
                   last parts (the middle cut) so that prompt + answer fit in 8,192 positions
  streaming        StreamingLLM through ctxmem's wrapper (topk 0, local window = ctxmem's budget, no reader)
  ctxmem           the default MemoryConfig (reader on)
  rag              plain RAG: the document cut into chunks of 128 MiniLM tokens sharing 64
                   (ctxmem.index's chunker), ranked by cosine with the question by the embedder ctxmem's
                   selector uses, the top 3 read in document order by the stock model in place of the
                   document, same prompt; time includes chunking and embedding the document
  ctxmem+reread    ctxmem reading the whole document, plus RAG's picked text placed again as plain text
                   after it, just before the question ("Excerpts that may help:"); time includes RAG's
  reread           the product feature: the default MemoryConfig with reread_tokens=512 (ctxmem ranks its
                   own blocks against the question and reads the best again before it; no RAG involved)

Writes benchmarks/results/OUT.json (every answer, summaries, machine, wall time) and OUT.png
(score by method and length per question type; seconds per answer).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import sys
import time

from benchmarks.common import (RAG_CHUNK_TOKENS, RAG_OVERLAP, RAG_TOP_K, RESULTS, cpu_model, machine, rag_retrieve,
                               set_threads, write_json)
from benchmarks.tasks import ChatFrame
from benchmarks.tasks import realqa as rq

METHODS = ["stock", "streaming", "ctxmem", "rag", "ctxmem+reread", "reread"]
LABELS = {"stock": "stock (8K window)", "streaming": "StreamingLLM", "ctxmem": "ctxmem", "rag": "plain RAG",
          "ctxmem+reread": "ctxmem+RAG's picks", "reread": "ctxmem, reread_tokens=512"}
COLORS = {"stock": "#7f7f7f", "streaming": "#ff7f0e", "ctxmem": "#1f77b4", "rag": "#d62728",
          "ctxmem+reread": "#9467bd", "reread": "#2ca02c"}
REREAD_TOKENS = 512  # the pre-registered candidate (benchmarks/preregistered/reread.md)
REREAD = "\n\nExcerpts from the document that may help:\n"


def stock_ids(sample, window: int) -> list[int]:
    """The prompt cut to fit the stock model's window: the document's middle goes, its first and last
    parts stay (the chat frame, instruction, question and answer opening are kept whole)."""
    ids = sample.ids
    room = window - sample.max_new_tokens
    if len(ids) <= room:
        return list(ids)
    s, e = sample.haystack_span
    keep = room - (len(ids) - (e - s))
    head = keep // 2
    return list(ids[:s + head]) + list(ids[e - (keep - head):])


def method_ids(method: str, sample, tok, emb, window: int) -> tuple[list[int], dict]:
    if method == "stock":
        ids = stock_ids(sample, window)
        return ids, dict(truncated=len(ids) < len(sample.ids))
    if method in ("streaming", "ctxmem", "reread"):
        return list(sample.ids), {}
    pick = rag_retrieve(sample.document, sample.question, emb)
    info = dict(pick.describe(), rag_has_answers=[a in pick.text for a in sample.answers] if sample.qtype != "count" else None)
    s, e = sample.haystack_span
    if method == "rag":
        ids = list(sample.ids[:s]) + tok(pick.text, add_special_tokens=False)["input_ids"] + list(sample.ids[e:])
    else:  # ctxmem+reread: the whole document, then the picked chunks again just before the question
        ids = list(sample.ids[:e]) + tok(REREAD + pick.text, add_special_tokens=False)["input_ids"] + list(sample.ids[e:])
    return ids, info


def run(args) -> dict:
    import torch

    import ctxmem
    from benchmarks.passkey import answer
    from benchmarks.suite import method_config

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    if args.threads:
        set_threads(args.threads)
    t_start = time.perf_counter()
    code = _code_state()
    model, tok = ctxmem.load_model("smollm2")
    emb = ctxmem.load_embedder("minilm")
    frame = ChatFrame(tok)
    window = args.stock_window or model.config.max_position_embeddings
    base = ctxmem.MemoryConfig(**args.config)
    samples, failed = [], []
    for n in args.lengths:
        for kind in args.kinds:
            for q in args.qtypes:
                for i in range(args.first_sample, args.first_sample + args.samples):
                    try:
                        samples.append(rq.make(tok, frame, kind, q, n, i, split=args.split))
                    except ValueError as e:
                        failed.append(dict(kind=kind, qtype=q, length=n, index=i, error=str(e)))
                        log(f"cannot generate {kind}/{q}/{n}/{i}: {e}")
    log(f"{len(samples)} samples ({len(failed)} could not be generated), {len(args.methods)} methods")
    # warm-up, untimed: numba kernels, the embedder's first call, torch's first allocations
    w = rq.make(tok, frame, "metadata", "single", 2048, 0, split="tune")
    w.max_new_tokens = 2
    rows = []

    def save(partial=True):
        m = machine()
        m.update(cpu_model=cpu_model(), python=platform.python_version(), load_avg=list(os.getloadavg()),
                 omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
        result = dict(benchmark="realqa", partial=partial, command=" ".join(["python -m benchmarks.realqa"] + sys.argv[1:]),
                      model="smollm2", machine=m, wall_seconds=round(time.perf_counter() - t_start, 1), code=code,
                      split=args.split, stock_window=window, config=base.to_dict(),
                      rag=dict(embedder="minilm", chunk_tokens=RAG_CHUNK_TOKENS, overlap=RAG_OVERLAP, top_k=RAG_TOP_K),
                      samples=[s.describe() | dict(units=s.units) for s in samples], not_generated=failed,
                      rows=rows, summary=summarize(rows))
        write_json(args.out, result)
        return result

    for method in args.methods:
        wrapped = method in ("streaming", "ctxmem", "ctxmem+reread", "reread")
        if wrapped:
            cfg = method_config("streaming", base) if method == "streaming" else base
            if method == "reread":
                cfg = ctxmem.MemoryConfig(**{**base.to_dict(), "reread_tokens": REREAD_TOKENS})
            ctxmem.wrap(model, cfg, tokenizer=tok, embedder=emb)
        try:
            ids, _ = method_ids(method, w, tok, emb, window)
            answer(model, tok, torch.tensor([ids]), 2)
            for smp in samples:
                try:
                    t0 = time.perf_counter()
                    ids, info = method_ids(method, smp, tok, emb, window)
                    prep = time.perf_counter() - t0
                    text, sec, prefill, decode = answer(model, tok, torch.tensor([ids]), smp.max_new_tokens)
                    row = dict(method=method, kind=smp.kind, qtype=smp.qtype, length=smp.length, index=smp.index,
                               doc_tokens=len(smp.ids), prompt_tokens=len(ids), answers=smp.answers,
                               depths=smp.depths, score=rq.score(smp, text), prediction=text,
                               seconds=round(sec + prep, 2), prefill_seconds=round(prefill, 2),
                               decode_ms_per_token=round(1000 * decode, 1) if decode == decode else None, **info)
                except Exception as e:  # noqa: BLE001 - a failure is a result
                    row = dict(method=method, kind=smp.kind, qtype=smp.qtype, length=smp.length, index=smp.index,
                               score=None, error=f"{type(e).__name__}: {e}")
                rows.append(row)
                log(line(row))
                save()
        finally:
            if wrapped:
                ctxmem.unwrap(model)
    return save(partial=False)


def _code_state() -> dict:
    """The commit this ran on and the files that differed from it (others may edit the tree meanwhile)."""
    import subprocess

    root = RESULTS.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "--", "ctxmem", "benchmarks"], cwd=root,
                               capture_output=True, text=True).stdout.split("\n")
        return dict(head=head, modified=[x.strip() for x in dirty if x.strip()])
    except OSError:
        return {}


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def line(r: dict) -> str:
    if r.get("error"):
        return f"{r['method']:14s} {r['kind']:8s} {r['qtype']:6s} {r['length']:>6d} #{r['index']} ERROR {r['error']}"
    return (f"{r['method']:14s} {r['kind']:8s} {r['qtype']:6s} {r['length']:>6d} #{r['index']} score={r['score']:.2f} "
            f"{r['seconds']:6.1f}s  want {r['answers']}  got {r['prediction'][:60]!r}")


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        for key in (f"{r['method']}/{r['length']}/all", f"{r['method']}/{r['length']}/{r['qtype']}",
                    f"{r['method']}/{r['length']}/{r['kind']}"):
            s = out.setdefault(key, dict(n=0, score_sum=0.0, full=0, errors=0, seconds=[]))
            s["n"] += 1
            if r.get("error"):
                s["errors"] += 1
                continue
            s["score_sum"] += r["score"]
            s["full"] += r["score"] == 1.0
            s["seconds"].append(r["seconds"])
    for s in out.values():
        s["points"] = round(s["score_sum"], 3)  # a two-passage question with one of its two answers: 0.5
        s["score"] = round(s.pop("score_sum") / s["n"], 4)
        s["seconds"] = round(sum(s["seconds"]) / len(s["seconds"]), 2) if s["seconds"] else None
    return out


def _k(n: int) -> str:
    return f"{n // 1024}K"


def table(result: dict) -> list[str]:
    summ = result["summary"]
    methods = [m for m in METHODS if any(k.startswith(m + "/") for k in summ)]
    lengths = sorted({int(k.split("/")[1]) for k in summ})
    groups = ["single", "two", "count", "all"]
    lines = ["| method | context | one passage | two passages | count | all | s/answer |",
             "|---|---|---|---|---|---|---|"]
    for n in lengths:
        for m in methods:
            cells = []
            for g in groups:
                s = summ.get(f"{m}/{n}/{g}")
                cells.append("–" if not s else f"{s['points']:g}/{s['n']}")
            a = summ.get(f"{m}/{n}/all")
            if a is None:
                continue
            sec = f"{a['seconds']:.1f}" if a["seconds"] is not None else "–"
            lines.append(f"| {LABELS[m]} | {_k(n)} | " + " | ".join(cells) + f" | {sec} |")
    return lines


def plot(result: dict, name: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = result["summary"]
    methods = [m for m in METHODS if any(k.startswith(m + "/") for k in summ)]
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    for ax, g, title in zip(axes, ["single", "two", "count", "all"],
                            ["one passage", "two passages far apart", "count the units", "all questions"]):
        for m in methods:
            pts = sorted((int(k.split("/")[1]), s["score"]) for k, s in summ.items()
                         if k.startswith(m + "/") and k.endswith("/" + g))
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", color=COLORS[m], label=LABELS[m])
        ax.set_xscale("log", base=2)
        ax.set_ylim(-5, 105)
        ax.set_title(title)
        ax.set_xlabel("context tokens")
        ax.set_ylabel("score %")
        ax.grid(True, alpha=0.3)
    ax = axes[4]
    for m in methods:
        pts = sorted((int(k.split("/")[1]), s["seconds"]) for k, s in summ.items()
                     if k.startswith(m + "/") and k.endswith("/all") and s["seconds"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS[m], label=LABELS[m])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(f"seconds per answer ({result['machine']['threads']} torch thread(s))")
    ax.set_xlabel("context tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"Real-document QA ({result['split']} split) — SmolLM2-135M-Instruct, trained window 8K")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=90)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default=",".join(rq.KINDS))
    p.add_argument("--qtypes", default=",".join(rq.QTYPES))
    p.add_argument("--lengths", default="4096,16384")
    p.add_argument("--samples", type=int, default=1, help="questions per (kind, question type, length)")
    p.add_argument("--first-sample", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--split", default="test", choices=["test", "tune"])
    p.add_argument("--stock-window", type=int, default=0, help="0 = the model's max_position_embeddings")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="MemoryConfig override")
    p.add_argument("--out", default="realqa")
    p.add_argument("--list", action="store_true", help="print the generated questions, run nothing")
    p.add_argument("--replot", action="store_true", help="redraw the plot and table from --out's JSON")
    p.add_argument("--allow-partial", action="store_true", help="with --merge: accept runs stopped part way")
    p.add_argument("--merge", default=None, metavar="RUN,RUN", help="write --out as these finished runs together "
                   "(runs side by side: wall time = the longest), run nothing")
    args = p.parse_args(argv)
    from ctxmem.cli import _parse_overrides
    args.config = _parse_overrides(args.set)
    args.kinds, args.qtypes = args.kinds.split(","), args.qtypes.split(",")
    args.methods = args.methods.split(",")
    args.lengths = [int(x) for x in args.lengths.split(",")]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; methods: {METHODS}")
    if args.merge:
        names = args.merge.split(",")
        loaded = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
        for n, r in zip(names, loaded):
            if r.get("partial") and not args.allow_partial:
                p.error(f"{n} is a partial run (stopped before every method ran; --allow-partial merges what it has)")
            for key in ("config", "rag", "split", "stock_window", "model"):
                if r.get(key) != loaded[0].get(key):
                    p.error(f"{names[0]} and {n} differ in {key!r}")
        rows = [row for r in loaded for row in r["rows"]]
        keys = [(r["method"], r["kind"], r["qtype"], r["length"], r["index"]) for r in rows]
        if len(set(keys)) != len(keys):
            p.error("a (method, kind, question type, length, index) is in more than one run")
        result = dict(loaded[0], command=f"python -m benchmarks.realqa --merge {args.merge} --out {args.out}"
                      + (" --allow-partial" if args.allow_partial else ""),
                      partial=any(r.get("partial") for r in loaded),
                      merged_from=[dict(name=n, command=r["command"], machine=r["machine"], code=r.get("code"),
                                        wall_seconds=r["wall_seconds"], partial=r.get("partial"),
                                        methods=sorted({x["method"] for x in r["rows"]}))
                                   for n, r in zip(names, loaded)],
                      wall_seconds=max(r["wall_seconds"] for r in loaded),
                      samples=[x for r in loaded for x in r["samples"]],
                      not_generated=[x for r in loaded for x in r["not_generated"]],
                      rows=rows, summary=summarize(rows))
        write_json(args.out, result)
        plot(result, args.out)
        print("\n".join(table(result)))
        return 0
    if args.replot:
        result = json.loads((RESULTS / f"{args.out}.json").read_text())
        plot(result, args.out)
        print("\n".join(table(result)))
        return 0
    if args.list:
        from transformers import AutoTokenizer

        from ctxmem.models import resolve_lm_path
        tok = AutoTokenizer.from_pretrained(resolve_lm_path("smollm2"))
        frame = ChatFrame(tok)
        for n in args.lengths:
            for kind in args.kinds:
                for q in args.qtypes:
                    for i in range(args.first_sample, args.first_sample + args.samples):
                        try:
                            s = rq.make(tok, frame, kind, q, n, i, split=args.split)
                            print(json.dumps(s.describe()))
                        except ValueError as e:
                            print(json.dumps(dict(kind=kind, qtype=q, length=n, index=i, error=str(e))))
        return 0
    result = run(args)
    plot(result, args.out)
    print("\n".join(table(result)))
    log(f"wrote benchmarks/results/{args.out}.json and {args.out}.png; wall time {result['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

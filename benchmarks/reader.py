"""The reader adapter on held-out retrieval tasks: ctxmem with and without it, same prompts, same run.

Tasks are ``ctxmem.reader.tasks`` (the training generator) with two things training never sees:
haystack code from the held-out standard library modules (``ctxmem.compress.data.HELDOUT``), and
seeds from a separate range. An answer counts as found when the asked value appears in the first
generated tokens (``--family chains``: its score is the share of the chain's names it gives, found =
all of them). ``attended`` says whether the embedder's vote put the value in front of the question
(the reader cannot read what retrieval missed). Also: the perplexity of held-out code under
the reader (it is on for the last chunk of a read), to show what it costs plain language modelling.

    python -m benchmarks.reader --reader smollm2-reader --lengths 2048,8192 --samples 20
Writes benchmarks/results/OUT.json (default ``reader``) and OUT.png.
"""
from __future__ import annotations

import argparse
import json
import math
import random

import torch

import ctxmem
from benchmarks.common import Timer, machine, parse_variant, write_json, RESULTS
from ctxmem.reader.tasks import FAMILIES
from ctxmem.reader.train import prompt_ids

SEED0 = 7_000_000  # training uses seed * 1_000_003 + step with small seeds: far from this range


def heldout_texts() -> list[str]:
    from ctxmem.compress.data import read_text, stdlib_files

    return [read_text(f) for f in stdlib_files(heldout=True)]


def attended(cfg, ids: list[int], value: str, index) -> bool:
    """Would the question chunk attend the value? (the cache's own vote, replayed without the model;
    ``index``: a BlockTextIndex of this prompt, shared across methods so its blocks are embedded once)"""
    from ctxmem.ops import middle_blocks
    from ctxmem.reader.train import cfg_params, composed_text

    t = max(0, len(ids) - cfg.prefill_chunk)  # the last chunk is cut full from the end (wrap._chunk_bounds)
    nmid = middle_blocks(t, cfg_params(cfg))
    if nmid <= cfg.topk_blocks:
        return True
    bias, _ = index.vote(0, ids, nmid, cfg.sink_tokens, cfg.block_size, query_tokens=cfg.query_tokens,
                         hits=cfg.embed_hits, neighbors=cfg.embed_neighbors, margin=cfg.embed_margin)
    return value in composed_text(index.tokenizer, ids, t, cfg, {j for j in range(nmid) if bias[j] > 0})


@torch.no_grad()
def code_nll(model, tok, texts, n_windows: int, length: int, target: int) -> list[float]:
    """Per window, the mean NLL of the last ``target`` tokens of held-out code windows read through working
    memory (the same windows in the same order for any ``n_windows``: the first 8 of 32 are the 8)."""
    out = []
    rng = random.Random(0)
    for _ in range(n_windows):
        t = rng.choice(texts)
        ids = tok(t, add_special_tokens=False)["input_ids"]
        s = rng.randrange(0, max(1, len(ids) - length))
        w = torch.tensor([ids[s:s + length]])
        logits = model(w, logits_to_keep=target + 1).logits[0, :-1].float()
        out.append(float(torch.nn.functional.cross_entropy(logits, w[0, -target:])))
    return out


def task_samples(make, texts, lengths, first: int, count: int, chars_per_token: float) -> dict:
    """{length: {i: task}} for samples first..first+count-1; sample i is the same prompt in every run (its
    seed depends only on the length and i), so --first-sample extends an earlier run with fresh prompts."""
    return {n: {i: make(SEED0 + 1000 * n + i, texts, int(n * chars_per_token)) for i in range(first, first + count)}
            for n in lengths}


def run(args):
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = ctxmem.load_model("smollm2")
    texts = heldout_texts()
    embedder = ctxmem.load_embedder("minilm")
    methods = {"ctxmem": ctxmem.MemoryConfig(reader=None), "ctxmem+reader": ctxmem.MemoryConfig(reader=args.reader)}
    for spec in args.variant:  # NAME:KEY=VALUE,...: another config on the same prompts
        name, over = parse_variant(spec)
        methods[name] = ctxmem.MemoryConfig(**over)
    if args.methods:  # a subset (e.g. a new reader against a default measured before, or NLL only with --samples 0)
        keep = args.methods.split(",")
        unknown = [m for m in keep if m not in methods]
        if unknown:
            raise SystemExit(f"benchmarks.reader: unknown --methods {unknown}; have {list(methods)}")
        methods = {m: methods[m] for m in keep}
    lengths = [int(x) for x in args.lengths.split(",")]
    from ctxmem.memory.text_index import BlockTextIndex

    rows, nll, per_window = [], {}, {}
    indexes = {}  # (length, sample) -> the prompt's block index, embedded once for every method
    make = FAMILIES[args.family]
    first = args.first_sample
    samples = task_samples(make, texts, lengths, first, args.samples, args.chars_per_token)
    for method, cfg in methods.items():
        ctxmem.wrap(model, cfg, tokenizer=tok, embedder=embedder)
        for n in lengths:
            for i, task in samples[n].items():
                ids = prompt_ids(tok, task.messages_user)
                with Timer() as t:
                    out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False,
                                         pad_token_id=tok.eos_token_id)
                text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
                # facts: the value; chains: every name (score = the share of the names given, RULER-style)
                wanted = task.names or (task.value,)
                score = sum(w in text for w in wanted) / len(wanted)
                row = dict(method=method, length=n, tokens=len(ids), sample=i, depth=round(task.depth, 3),
                           value=task.value, wanted=list(wanted), score=round(score, 3), found=score == 1,
                           attended=attended(cfg, ids, task.value,
                                             indexes.setdefault((n, i), BlockTextIndex(tok, embedder))),
                           answer=text, seconds=round(t.seconds, 2))
                rows.append(row)
                print(f"{method:14s} {n:>6d} #{i:<3d} found={row['found']!s:5s} attended={row['attended']!s:5s} "
                      f"{t.seconds:5.1f}s {text[:48]!r}", flush=True)
        if args.nll_windows:
            per_window[method] = code_nll(model, tok, texts, args.nll_windows, args.nll_length, args.nll_target)
            nll[method] = sum(per_window[method]) / len(per_window[method])
            print(f"{method}: held-out code NLL {nll[method]:.4f} (ppl {math.exp(nll[method]):.3f})", flush=True)
        ctxmem.unwrap(model)
    summary = {}
    for r in rows:
        s = summary.setdefault(f"{r['method']}/{r['length']}", dict(found=0, score=0.0, attended=0,
                                                                     found_when_attended=0, n=0))
        s["n"] += 1
        s["score"] = round(s["score"] + r["score"], 3)
        s["found"] += r["found"]
        s["attended"] += r["attended"]
        s["found_when_attended"] += r["found"] and r["attended"]
    result = dict(machine=machine(), reader=args.reader, family=args.family,
                  configs={m: c.to_dict() for m, c in methods.items()},
                  lengths=lengths, samples=args.samples, first_sample=first,
                  nll={m: round(v, 4) for m, v in nll.items()}, nll_windows=args.nll_windows,
                  nll_per_window={m: [round(x, 4) for x in v] for m, v in per_window.items()},
                  nll_length=args.nll_length, nll_target=args.nll_target, summary=summary, rows=rows)
    path = write_json(args.out, result)
    plot(result, args.out)
    print(f"wrote {path}")
    print(json.dumps(summary, indent=1))


def plot(result, name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    colors = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for method, color in zip(dict.fromkeys(r["method"] for r in result["rows"]), colors):
        xs = [n for n in result["lengths"] if f"{method}/{n}" in result["summary"]]
        cell = [result["summary"][f"{method}/{n}"] for n in xs]
        ys = [c.get("score", c["found"]) / c["n"] for c in cell]  # results from before "score": found
        ax.plot(xs, ys, "o-", color=color, label=method)
    xs = [n for n in result["lengths"] if f"ctxmem/{n}" in result["summary"]]
    if xs:
        ys = [result["summary"][f"ctxmem/{n}"]["attended"] / result["summary"][f"ctxmem/{n}"]["n"] for n in xs]
        ax.plot(xs, ys, "k--", lw=1, label="value attended (retrieval)")
    xs = result["lengths"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{n // 1024}K" for n in xs])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context (tokens)")
    chains = result.get("family") == "chains"
    ax.set_ylabel("share of the chain's names given" if chains else "found")
    ax.set_title(f"held-out {'reference chains' if chains else 'retrieval tasks'} ({result['samples']} per length)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reader", default="smollm2-reader", help="bundled name or folder")
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--family", default="facts", choices=sorted(FAMILIES),
                   help="task family (facts: one value; chains: every name of a reference chain)")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--first-sample", type=int, default=0, metavar="I",
                   help="samples I..I+N-1 (fresh prompts beside a run of 0..N-1)")
    p.add_argument("--chars-per-token", type=float, default=3.3)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--nll-windows", type=int, default=8)
    p.add_argument("--nll-length", type=int, default=2048)
    p.add_argument("--nll-target", type=int, default=128)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="another MemoryConfig on the same prompts, e.g. q16:query_tokens=16")
    p.add_argument("--methods", default="", help="run only these (comma list of ctxmem, ctxmem+reader, variants)")
    p.add_argument("--out", default="reader")
    args = p.parse_args(argv)
    if args.first_sample < 0 or args.samples < 0:
        p.error(f"--first-sample ({args.first_sample}) and --samples ({args.samples}) must be >= 0")
    run(args)


if __name__ == "__main__":
    main()

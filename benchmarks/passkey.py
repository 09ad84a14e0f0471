"""Passkey retrieval: ctxmem vs the stock model, SmolLM2-135M, same run.

A 5-digit number is hidden at several depths of a long haystack (repeated filler, and real
prose: the Python reference manual); the answer counts as found when the number appears in the
first generated tokens. With ``--rag``, plain RAG on the same prompts: the haystack cut into chunks
of 128 MiniLM tokens sharing 64, ranked by cosine with the question by ctxmem's own embedder, the
top 3 read in document order by the stock model in the same prompt template (time to answer
includes chunking and embedding the haystack). Writes benchmarks/results/passkey.json, passkey_heatmap.png (depth x
length, green = found) and passkey_time.png (time to answer vs context length).

    python -m benchmarks.passkey                       # the README table (about 40 minutes here)
    python -m benchmarks.passkey --lengths 4096,8192 --depths 0.5 --haystacks filler   # quick look
"""
from __future__ import annotations

import argparse
import time

import torch

import ctxmem
from benchmarks.common import (PASSKEY_QUESTION, RAG_CHUNK_TOKENS, RAG_OVERLAP, RAG_TOP_K, RESULTS, Timer, found, machine,
                               parse_variant, passkey_body, passkey_key, passkey_needle, passkey_prompt_from_body,
                               peak_rss_mb, rag_retrieve, set_threads, write_json)


class TokenClock:
    """A generate() streamer that timestamps each new token: prefill vs per-token decode time."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def answer(model, tok, ids, max_new_tokens):
    clock = TokenClock()
    with Timer() as t:
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=clock,
                             pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    # stamps[0]: prompt handed over; stamps[1]: first new token (after prefill); then one per token
    s = clock.stamps
    decode = (s[-1] - s[1]) / (len(s) - 2) if len(s) > 2 else float("nan")
    return text, t.seconds, s[1] - s[0] if len(s) > 1 else t.seconds, decode


def run(args):
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    if args.threads:
        set_threads(args.threads)
    model, tok = ctxmem.load_model("smollm2")
    cfg = ctxmem.MemoryConfig(**args.config)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    real_depths = [float(x) for x in (args.real_depths or args.depths).split(",")]
    haystacks = args.haystacks.split(",")
    rows = []

    emb = ctxmem.load_embedder("minilm")  # once: ctxmem's selector and RAG share it

    def one(method, kind, n, d, i):
        key = passkey_key(1000 * i + n)
        body = passkey_body(tok, kind, n, d, key, seed=i)
        extra = {}
        if method == "rag":  # plain RAG: the stock model reads the best chunks instead of the haystack
            pick = rag_retrieve(body, PASSKEY_QUESTION, emb, k=args.rag_k, chunk_tokens=args.rag_chunk,
                                overlap=args.rag_overlap)
            extra = dict(pick.describe(), rag_hit=passkey_needle(key).strip() in pick.text,
                         haystack_tokens=passkey_prompt_from_body(tok, body).shape[1])
            ids = passkey_prompt_from_body(tok, pick.text)
        else:
            ids = passkey_prompt_from_body(tok, body)
        text, sec, prefill, decode = answer(model, tok, ids, args.max_new_tokens)
        sec += extra.get("rag_seconds", 0.0)  # RAG's time to answer includes embedding the haystack
        row = dict(method=method, haystack=kind, length=n, tokens=ids.shape[1], depth=d, key=key,
                   found=found(text, key), answer=text, seconds=round(sec, 2), prefill_seconds=round(prefill, 2),
                   decode_ms_per_token=round(1000 * decode, 1), peak_rss_mb=round(peak_rss_mb()), **extra)
        rows.append(row)
        print(f"{method:7s} {kind:6s} {n:>6d} d={d:.2f} found={row['found']!s:5s} {sec:6.1f}s "
              f"decode {row['decode_ms_per_token']:6.1f} ms/tok  {text[:40]!r}", flush=True)

    variants = {"ctxmem": cfg}
    for spec in args.variant:  # NAME:KEY=VALUE,KEY=VALUE: another ctxmem config on the same prompts
        name, over = parse_variant(spec)
        variants[name] = ctxmem.MemoryConfig(**{**args.config, **over})
    skip = {tuple(x.split("@")) for x in args.skip}  # (method, length) pairs run on the first depths only

    def depth_list(kind, method, n):
        ds = real_depths if kind == "real" else depths
        return ds[:args.skip_keep] if (method, str(n)) in skip else ds

    def partial():
        write_json(args.out, dict(machine=machine(), partial=True, config=cfg.to_dict(), rows=rows,
                                  summary=summarize(rows)))

    # every method on one prompt before the next prompt: methods share the machine's load alike
    for kind in haystacks:
        for n in lengths:
            for i, d in enumerate(real_depths if kind == "real" else depths, start=args.first_index):
                for method, vcfg in variants.items():
                    if d in depth_list(kind, method, n):
                        ctxmem.wrap(model, vcfg, tokenizer=tok, embedder=emb)
                        try:
                            one(method, kind, n, d, i)
                        finally:
                            ctxmem.unwrap(model)
                if args.rag and d in depth_list(kind, "rag", n):  # plain RAG, the unwrapped model
                    one("rag", kind, n, d, i)
                if n <= args.stock_max or (n == args.stock_ref and args.stock_ref > 0):
                    one("stock", kind, n, d, i)
                partial()
    # the stock model's own reference length, and one timing point beyond the sweep
    for kind in haystacks:
        if args.stock_ref > 0 and args.stock_ref not in lengths:
            for i, d in enumerate(real_depths if kind == "real" else depths):
                one("stock", kind, args.stock_ref, d, i)
        for n in [x for x in lengths if args.stock_max < x <= args.stock_time_max]:
            if kind == haystacks[0]:
                one("stock", kind, n, 0.5, 0)
    result = dict(machine=machine(), config=cfg.to_dict(), lengths=lengths, depths=depths, rows=rows,
                  rag=dict(chunk_tokens=args.rag_chunk, overlap=args.rag_overlap, top_k=args.rag_k,
                           embedder="minilm") if args.rag else None,
                  variants={k: v.to_dict() for k, v in variants.items() if k != "ctxmem"}, summary=summarize(rows))
    path = write_json(args.out, result)
    plot(result, args.out)
    print(f"wrote {path}")
    for line in table(result):
        print(line)


def summarize(rows):
    out = {}
    for r in rows:
        k = f"{r['method']}/{r['haystack']}/{r['length']}"
        s = out.setdefault(k, dict(found=0, n=0, seconds=[], decode=[]))
        s["found"] += r["found"]
        s["n"] += 1
        s["seconds"].append(r["seconds"])
        s["decode"].append(r["decode_ms_per_token"])
    for s in out.values():
        s["rate"] = s["found"] / s["n"]
        s["seconds"] = sum(s["seconds"]) / len(s["seconds"])
        s["decode_ms_per_token"] = sum(s["decode"]) / len(s["decode"])
        del s["decode"]
    return out


def table(result):
    summ = result["summary"]
    keys = sorted({(k.split("/")[1], int(k.split("/")[2])) for k in summ})
    extra = [m for m in dict.fromkeys(k.split("/")[0] for k in summ) if m not in ("stock", "ctxmem")]
    lines = ["| haystack | context | stock found | stock s/answer | ctxmem found | ctxmem s/answer | ctxmem decode ms/tok |"
             + "".join(f" {m} found | {m} s/answer |" for m in extra),
             "|---|---|---|---|---|---|---|" + "---|---|" * len(extra)]
    f = lambda s, key, fmt: (fmt.format(s[key]) if s else "–")  # noqa: E731
    hits = lambda s: f(s, 'found', '{}') + ('/' + str(s['n']) if s else '')  # noqa: E731
    for kind, n in keys:
        st, cm = summ.get(f"stock/{kind}/{n}"), summ.get(f"ctxmem/{kind}/{n}")
        lines.append(f"| {kind} | {n:,} | {hits(st)} | {f(st, 'seconds', '{:.1f}')} | {hits(cm)} | "
                     f"{f(cm, 'seconds', '{:.1f}')} | {f(cm, 'decode_ms_per_token', '{:.0f}')} |"
                     + "".join(f" {hits(summ.get(f'{m}/{kind}/{n}'))} | {f(summ.get(f'{m}/{kind}/{n}'), 'seconds', '{:.1f}')} |"
                               for m in extra))
    return lines


def plot(result, name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rows = result["rows"]
    panels = sorted({(r["method"], r["haystack"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (method, kind) in zip(axes[0], panels):
        sel = [r for r in rows if r["method"] == method and r["haystack"] == kind]
        lens = sorted({r["length"] for r in sel})
        deps = sorted({r["depth"] for r in sel})
        grid = [[float("nan")] * len(lens) for _ in deps]
        for r in sel:
            grid[deps.index(r["depth"])][lens.index(r["length"])] = 1.0 if r["found"] else 0.0
        ax.imshow(grid, cmap=ListedColormap(["#d9534f", "#5cb85c"]), vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lens)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lens])
        ax.set_yticks(range(len(deps)), [f"{d:.2f}" for d in deps])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{method} · {kind}")
    fig.suptitle("Passkey found (green) — SmolLM2-135M, trained window 8K")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}_heatmap.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        style = "o-" if method == "stock" else "s-"
        pts = {}
        for r in rows:
            if r["method"] == method:
                pts.setdefault(r.get("haystack_tokens", r["tokens"]) // 1024 * 1024, []).append(r["seconds"])
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], style, label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("seconds to answer")
    ax.set_title(f"Time to answer (CPU, {torch.get_num_threads()} torch threads)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}_time.png", dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,8192,16384,32768")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--real-depths", default="0.1,0.5,0.9", help="depths for the real-text haystack")
    p.add_argument("--haystacks", default="filler,real")
    p.add_argument("--stock-ref", type=int, default=2048, help="the stock model's own reference length")
    p.add_argument("--stock-max", type=int, default=4096, help="stock runs every depth up to this length")
    p.add_argument("--stock-time-max", type=int, default=32768, help="... and one depth (for time) up to this")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="MemoryConfig override")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="another ctxmem method on the same prompts, e.g. reader:reader=smollm2-reader")
    p.add_argument("--rag", action="store_true", help="plain RAG (stock model, top chunks by MiniLM) on the same prompts")
    p.add_argument("--rag-k", type=int, default=RAG_TOP_K, help="chunks RAG reads")
    p.add_argument("--rag-chunk", type=int, default=RAG_CHUNK_TOKENS, help="RAG chunk size, embedder tokens")
    p.add_argument("--rag-overlap", type=int, default=RAG_OVERLAP, help="tokens consecutive RAG chunks share")
    p.add_argument("--skip", action="append", default=[], metavar="METHOD@LENGTH",
                   help="run METHOD at LENGTH on the first --skip-keep depths only (for time)")
    p.add_argument("--skip-keep", type=int, default=3)
    p.add_argument("--first-index", type=int, default=0,
                   help="number the prompts from here (each index has its own key and haystack start): "
                        "more prompts that are new, not repeats of an earlier run's")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default="passkey")
    args = p.parse_args()
    from ctxmem.cli import _parse_overrides
    args.config = _parse_overrides(args.set)
    run(args)


if __name__ == "__main__":
    main()

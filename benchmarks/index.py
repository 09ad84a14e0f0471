"""Knowledge-index benchmark: builder throughput against the embedder's own, and ANN latency/recall.

(a) the embedder alone: ``SentenceTransformer.encode`` over the chunk texts - the limit;
(b) the full builder: ``KnowledgeIndex.build`` on the same files, giving the same chunks
    (discovery, reading, hashing, chunking, embedding, chunk store, commits with fsync, index).
Both in the same process, interleaved, model loaded once; target: (b) <= 1.1 x (a).

(c) query latency (one query at a time, p50/p99) and recall@10 against exact search for
    each index type at 100K and 1M synthetic 384-d vectors (topic clusters, each varying in a
    low-rank subspace; see ctxmem.index.testing.synthetic_vectors), held-out queries;
    target p99 <= 5 ms with recall@10 >= 0.95. The searches go through the same
    ``ann.Searcher`` the KB uses.

Writes benchmarks/results/index.json and benchmarks/results/index.png.

``--engine ray`` measures the Ray engine instead (benchmarks/results/index_ray.json/.png):
(d) build throughput on one local Ray cluster with 1 and 2 embedder workers (one CPU and one
    torch thread each), against the local engine on the same corpus in the same run;
(e) the index shard cost: an IVF-PQ index over synthetic vectors trained once, filled as 1
    shard and as 2 shards in parallel Ray tasks, and the shards merged (cost per vector).
These are the inputs of the 100-node / 10B-token model in the README.

    python benchmarks/index.py                       # defaults: ~120 chunks x 4, 100K and 1M vectors
    python benchmarks/index.py --sizes 100000 --chunks 100 --kinds hnsw   # quick
    python benchmarks/index.py --engine ray --chunks 240 --workers 1,2     # the Ray engine
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctxmem._atomic import atomic_write_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make_corpus(dest: Path, target_chunks: int, chars_per_chunk: int = 800) -> int:
    """Copy real text (the Python standard library's own sources) until ~target_chunks chunks."""
    lib = Path(os.__file__).parent
    files = sorted(p for p in lib.glob("*.py") if p.stat().st_size > 2000)
    budget, total = target_chunks * chars_per_chunk, 0
    dest.mkdir(parents=True)
    for p in files:
        if total >= budget:
            break
        text = p.read_text(encoding="utf-8", errors="replace")[: budget - total]
        (dest / p.name).write_text(text, encoding="utf-8")
        total += len(text)
    return total


def bench_build(args) -> dict:
    import ctxmem
    from ctxmem.index import KnowledgeIndex

    model = ctxmem.load_embedder(args.embedder)
    work = Path(tempfile.mkdtemp(prefix="ctxmem-bench-index-"))
    try:
        chars = make_corpus(work / "corpus", args.chunks)
        kw = dict(embedder=model, chunk_tokens=args.chunk_tokens, overlap=args.overlap, progress=False,
                  batch_size=args.batch_size)
        # warm-up: one untimed build (first-call costs: threads, allocator, kernels for these
        # shapes, the embedder probe); it also gives the chunk texts for (a)
        model.encode(["warm up"] * 64, batch_size=args.batch_size)
        warm = KnowledgeIndex.build([work / "corpus"], work / "kb-warm", **kw)
        texts = [h.text for _, h in warm.iter_chunks()]
        log(f"build: {len(texts)} chunks, {chars} chars of text")
        runs = {k: [] for k in ("embedder", "builder", "builder_embed_part", "embedder_cpu", "builder_cpu")}

        def run_builder(rep):
            t0, c0 = time.perf_counter(), time.process_time()
            b = KnowledgeIndex.build([work / "corpus"], work / f"kb{rep}", **kw)
            runs["builder"].append(time.perf_counter() - t0)
            runs["builder_cpu"].append(time.process_time() - c0)
            runs["builder_embed_part"].append(b.last_summary["embed_seconds"])
            assert sorted(h.text for _, h in b.iter_chunks()) == sorted(texts), "not the same chunks"

        def run_embedder():
            t0, c0 = time.perf_counter(), time.process_time()
            model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=True,
                         show_progress_bar=False)
            runs["embedder"].append(time.perf_counter() - t0)
            runs["embedder_cpu"].append(time.process_time() - c0)

        for rep in range(args.repeats):  # interleaved, alternating which goes first
            if rep % 2 == 0:
                run_builder(rep)
                run_embedder()
            else:
                run_embedder()
                run_builder(rep)
            log(f"  rep {rep}: builder {runs['builder'][-1]:.2f} s wall / {runs['builder_cpu'][-1]:.2f} s cpu "
                f"(embedding {runs['builder_embed_part'][-1]:.2f} s of it), embedder alone "
                f"{runs['embedder'][-1]:.2f} s wall / {runs['embedder_cpu'][-1]:.2f} s cpu")
        # rerun on the unchanged corpus: no embedding at all
        t0 = time.perf_counter()
        again = KnowledgeIndex.build([work / "corpus"], work / "kb0", **kw)
        rerun = time.perf_counter() - t0
        # end-to-end KB query latency (embed the query + search + read the chunk)
        qs = [t[:120] for t in texts[:: max(1, len(texts) // 50)]]
        lat = []
        for q in qs:
            t0 = time.perf_counter()
            again.search(q, k=5)
            lat.append(time.perf_counter() - t0)
        emb_t, bld_t = min(runs["embedder"]), min(runs["builder"])
        ratios = [b / e for b, e in zip(runs["builder"], runs["embedder"])]
        cpu_ratio = min(runs["builder_cpu"]) / min(runs["embedder_cpu"])
        overhead = [b - e for b, e in zip(runs["builder"], runs["builder_embed_part"])]
        return {
            "embedder": args.embedder, "chunks": len(texts), "chunk_tokens": args.chunk_tokens,
            "overlap": args.overlap, "batch_size": args.batch_size, "corpus_chars": chars,
            "embedder_seconds": runs["embedder"], "builder_seconds": runs["builder"],
            "embedder_cpu_seconds": runs["embedder_cpu"], "builder_cpu_seconds": runs["builder_cpu"],
            "builder_embedding_seconds": runs["builder_embed_part"],
            "builder_overhead_seconds": overhead,
            "builder_overhead_fraction": float(np.median(
                [o / e for o, e in zip(overhead, runs["builder_embed_part"])])),
            "embedder_chunks_per_s": len(texts) / emb_t, "builder_chunks_per_s": len(texts) / bld_t,
            "ratio_best": bld_t / emb_t, "ratio_cpu_best": cpu_ratio,
            "ratio_per_rep": ratios, "ratio_median": float(np.median(ratios)),
            "ratio_total": sum(runs["builder"]) / sum(runs["embedder"]),
            "rerun_unchanged_seconds": rerun, "rerun_chunks_embedded": again.last_summary["chunks_embedded"],
            "kb_query_ms_p50": 1e3 * float(np.percentile(lat, 50)),
            "kb_query_ms_p99": 1e3 * float(np.percentile(lat, 99)),
            "target_ratio": 1.1,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_ann(args) -> list[dict]:
    import faiss

    from ctxmem.index import ann
    from ctxmem.index.testing import synthetic_vectors

    rows = []
    for n in args.sizes:
        t0 = time.perf_counter()
        allv = synthetic_vectors(n + args.queries, args.dim, seed=n)
        x, q = allv[:n], allv[n:]
        del allv
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        exact = faiss.IndexFlatIP(args.dim)
        exact.add(x)
        _, truth = exact.search(q, 10)
        gt_s = time.perf_counter() - t0
        del exact
        log(f"ann n={n}: vectors {gen_s:.1f} s, exact top-10 of {len(q)} queries {gt_s:.1f} s")
        ids = np.arange(n, dtype=np.int64)
        for kind in args.kinds:
            if kind == "flat" and n > args.flat_max:
                continue
            params = ann.default_params(kind, n, args.dim)
            t0 = time.perf_counter()
            index = ann.create(kind, x, ids, params)
            build_s = time.perf_counter() - t0
            searcher = ann.Searcher(index, kind)
            for v in q[:20]:
                searcher.search(v[None], 10)  # warm
            nq = len(q) if kind != "flat" or n <= 100_000 else min(len(q), 200)  # exact search is slow
            lat, cpu, got = [], [], np.empty((nq, 10), np.int64)
            for i, v in enumerate(q[:nq]):
                t1, c1 = time.perf_counter(), time.thread_time()
                _, got[i:i + 1] = searcher.search(v[None], 10)
                lat.append(time.perf_counter() - t1)
                cpu.append(time.thread_time() - c1)
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth[:nq])]))
            row = {"n": n, "dim": args.dim, "index": kind, "params": params, "build_seconds": build_s,
                   "queries": nq, "p50_ms": 1e3 * float(np.percentile(lat, 50)),
                   "p99_ms": 1e3 * float(np.percentile(lat, 99)), "recall_at_10": recall,
                   "cpu_p50_ms": 1e3 * float(np.percentile(cpu, 50)), "cpu_p99_ms": 1e3 * float(np.percentile(cpu, 99)),
                   "meets_target": bool(np.percentile(lat, 99) * 1e3 <= 5.0 and recall >= 0.95)}
            rows.append(row)
            log(f"  {kind:6s} build {build_s:7.1f} s  p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  "
                f"(cpu p99 {row['cpu_p99_ms']:.3f} ms)  recall@10 {recall:.4f}")
            del index, searcher
            gc.collect()
        del x, q
        gc.collect()
    return rows


def bench_ray(args) -> dict:
    """(d) Ray engine build throughput with 1..N workers vs the local engine; (e) shard costs."""
    import ray

    import ctxmem
    from ctxmem.index import KnowledgeIndex

    work = Path(tempfile.mkdtemp(prefix="ctxmem-bench-ray-"))
    out = {"embedder": args.embedder, "chunk_tokens": args.chunk_tokens, "overlap": args.overlap,
           "batch_size": args.batch_size, "runs": []}
    try:
        chars = make_corpus(work / "corpus", args.chunks)
        kw = dict(embedder=args.embedder, chunk_tokens=args.chunk_tokens, overlap=args.overlap, progress=False,
                  batch_size=args.batch_size, index="flat")
        model = ctxmem.load_embedder(args.embedder)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        ref = None
        for rep in range(args.repeats_ray):
            for engine, workers in [("local", None)] + [("ray", w) for w in args.workers]:
                dest = work / f"kb-{engine}-{workers}-{rep}"
                extra = {"engine": "ray", "workers": workers} if engine == "ray" else {"embedder": model}
                t0, c0 = time.perf_counter(), time.process_time()
                kb = KnowledgeIndex.build([work / "corpus"], dest, **{**kw, **extra})
                wall = time.perf_counter() - t0
                chunks = [h.text for _, h in kb.iter_chunks()]
                if ref is None:
                    ref = chunks
                    tok = model.tokenizer
                    out["tokens"] = int(sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in chunks))
                    out["chunks"], out["corpus_chars"] = len(chunks), chars
                assert chunks == ref, "engines disagree"
                rs = kb.last_summary.get("ray", {})
                first = rs.get("first_batch_seconds")
                row = {"engine": engine, "workers": workers or 1, "rep": rep, "seconds": wall,
                       "driver_cpu_seconds": time.process_time() - c0, "chunks_per_s": len(chunks) / wall,
                       "first_batch_seconds": first, "loadavg": os.getloadavg()[0]}
                rest = len(chunks) - rs.get("first_batch_rows", len(chunks))
                if first is not None and rest > 0:  # after the actors are up: the rate the model scales
                    row["steady_chunks_per_s"] = rest / max(rs["last_batch_seconds"] - first, 1e-9)
                out["runs"].append(row)
                log(f"  {engine} workers={workers or 1} rep {rep}: {wall:.1f} s, {row['chunks_per_s']:.2f} chunk/s"
                    + (f" (first batch after {first:.1f} s; then {row['steady_chunks_per_s']:.2f} chunk/s)"
                       if "steady_chunks_per_s" in row else ""))
                shutil.rmtree(dest, ignore_errors=True)
        out["shards"] = bench_shards(args, ray)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    best = {}
    for r in out["runs"]:
        k = f"{r['engine']}-{r['workers']}"
        best[k] = max(best.get(k, 0.0), r.get("steady_chunks_per_s", r["chunks_per_s"]))
    out["best_steady_chunks_per_s"] = best
    out["tokens_per_chunk"] = out["tokens"] / out["chunks"]
    if "ray-1" in best and out.get("shards"):
        out["model_100_nodes_10b_tokens"] = scale_model(out)
    return out


def bench_shards(args, ray) -> dict:
    """IVF-PQ over synthetic vectors: train once, fill 1 shard vs N shards in parallel, merge."""
    from ctxmem.index import ann
    from ctxmem.index.ray_engine import _fill_shard
    from ctxmem.index.testing import synthetic_vectors

    n, dim = args.shard_vectors, args.dim
    x = synthetic_vectors(n, dim, seed=1)
    ids = np.arange(n, dtype=np.int64)
    params = ann.default_params("ivfpq", n, dim)
    t0 = time.perf_counter()
    rows = ann.training_rows("ivfpq", n, params)
    template = ann.serialize(ann.new_index("ivfpq", dim, params, x[rows]))
    train_s = time.perf_counter() - t0
    fill = ray.remote(num_cpus=1)(_fill_shard)
    tref, res = ray.put(template), {"vectors": n, "dim": dim, "params": params, "train_seconds": train_s,
                                    "train_vectors": int(len(rows))}
    for n_shards in args.workers:
        bounds = np.linspace(0, n, n_shards + 1).astype(np.int64)
        refs = [ray.put(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        t0 = time.perf_counter()
        parts = ray.get([fill.remote(tref, r, ids[a:b], "ivfpq") for r, a, b in zip(refs, bounds[:-1], bounds[1:])])
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        shards = [ann.deserialize(p.tobytes()) for p in parts]
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = shards[0]
        for sh in shards[1:]:
            ann.merge_into(index, sh, "ivfpq")
        merge_s = time.perf_counter() - t0
        nbytes = len(ann.serialize(index))
        res[f"shards_{n_shards}"] = {"fill_seconds": fill_s, "deserialize_seconds": load_s, "merge_seconds": merge_s,
                                     "index_bytes": nbytes}
        log(f"  ivfpq n={n}: {n_shards} shard(s) filled in {fill_s:.1f} s, deserialised in {load_s:.2f} s, "
            f"merged in {merge_s:.3f} s ({nbytes / n:.0f} bytes/vector)")
        del index, shards, parts
        gc.collect()
    last = res[f"shards_{max(args.workers)}"]
    res["merge_seconds_per_million"] = (last["merge_seconds"] + last["deserialize_seconds"]) / n * 1e6
    res["fill_seconds_per_million_one_core"] = res[f"shards_{min(args.workers)}"]["fill_seconds"] \
        * min(args.workers) / n * 1e6
    return res


def scale_model(r: dict, nodes: int = 100, cores_per_node: int = 16, tokens: float = 10e9, chunk_tokens: int = 128,
                overlap: int = 16, usd_per_core_hour: float = 0.04, dim: int = 384,
                driver_gb_per_s: float = 1.0) -> dict:
    """The README's model: a 10B-token build on ``nodes`` CPU nodes, from this run's measurements.

    Measured here: one worker's steady embedding rate (tokens/s on one core), the 1 -> 2 worker
    scaling efficiency, the IVF-PQ shard fill cost per vector (one core), the merge cost per
    vector and the index bytes per vector. Assumed (stated in the output): cores per node, one
    worker per core, the scaling efficiency holding across nodes, the price of a core-hour.
    """
    import math

    best = r["best_steady_chunks_per_s"]
    tpc = r["tokens_per_chunk"]
    one = best["ray-1"] * tpc                                  # tokens/s of one worker on one core
    eff = best.get("ray-2", 2 * best["ray-1"]) / (2 * best["ray-1"])
    stride = chunk_tokens - overlap
    n = tokens / stride                                        # chunks in the KB
    embedded = n * chunk_tokens                                # tokens embedded (overlap counted twice)
    workers = nodes * cores_per_node
    rate = workers * one * min(eff, 1.0)                       # tokens/s of the cluster
    embed_h = embedded / rate / 3600
    chunk_rate = rate / chunk_tokens
    sh = r["shards"]
    fill_h = sh["fill_seconds_per_million_one_core"] * n / 1e6 / workers / 3600
    merge_h = sh["merge_seconds_per_million"] * n / 1e6 / 3600
    bpv = sh[f"shards_{max(k for k in (1, 2) if f'shards_{k}' in sh)}"]["index_bytes"] / sh["vectors"]
    nlist = int(min(65536, 2 ** round(math.log2(2 * math.sqrt(n)))))
    train_scale = (40 * nlist * nlist) / (sh["train_vectors"] * sh["params"]["nlist"])
    train_h = sh["train_seconds"] * train_scale / 3600
    gather_h = n * 4 * dim / 1e9 / driver_gb_per_s / 3600  # the driver reads every vector to ship the shards
    hours = embed_h + fill_h + merge_h + train_h + gather_h
    return {
        "assumed": {"nodes": nodes, "cores_per_node": cores_per_node, "workers": workers, "tokens": tokens,
                    "chunk_tokens": chunk_tokens, "overlap": overlap, "usd_per_core_hour": usd_per_core_hour,
                    "driver_gb_per_s": driver_gb_per_s},
        "measured": {"worker_tokens_per_s": one, "worker_chunks_per_s_at_bench_size": best["ray-1"],
                     "bench_tokens_per_chunk": tpc, "scaling_efficiency_1_to_2": eff,
                     "fill_s_per_million_one_core": sh["fill_seconds_per_million_one_core"],
                     "merge_s_per_million": sh["merge_seconds_per_million"], "index_bytes_per_vector": bpv},
        "chunks": n, "cluster_tokens_per_s": rate, "cluster_chunks_per_s": chunk_rate,
        "embed_hours": embed_h, "index_fill_hours": fill_h, "index_merge_hours": merge_h,
        "ivf_nlist": nlist, "ivf_train_hours_extrapolated": train_h, "driver_gather_hours": gather_h,
        "total_hours": hours,
        "core_hours": workers * hours, "usd": workers * hours * usd_per_core_hour,
        "driver_ingest_mb_per_s": chunk_rate * (4 * dim + 4.3 * chunk_tokens) / 1e6,
        "segments_gb": n * (4 * dim + 4.3 * chunk_tokens + 40) / 1e9,
        "index_gb": n * bpv / 1e9,
        "this_2_core_machine_days": embedded / (one * 2 * min(eff, 1.0)) / 86400,
    }


def plot_ray(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result["ray"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = list(r["best_steady_chunks_per_s"])
    vals = [r["best_steady_chunks_per_s"][k] for k in keys]
    bars = ax.bar(keys, vals, color=["#888" if k.startswith("local") else "#2a7" for k in keys])
    for bar, v in zip(bars, vals):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylabel("chunks / second (best run; Ray: after the actors are up)")
    ax.set_title(f"index build, {r['chunks']} chunks of <= {r['chunk_tokens']} tokens, {r['embedder']}, "
                 f"{result['machine']['cpus']} shared CPU cores\nlocal engine vs Ray engine with N embedder "
                 "workers (1 CPU each)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 2]})
    b = result.get("build")
    if b:
        vals = [b["embedder_chunks_per_s"], b["builder_chunks_per_s"]]
        bars = a1.bar(["embedder alone\n(encode)", "full builder"], vals, color=["#888", "#2a7"])
        for bar, v in zip(bars, vals):
            a1.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom")
        a1.set_ylabel("chunks / second")
        a1.set_title(f"build rate: {b['chunks']} chunks of {b['chunk_tokens']} tokens, best of "
                     f"{len(b['builder_seconds'])}\nbuilder/embedder time: {b['ratio_best']:.2f} wall, "
                     f"{b['ratio_cpu_best']:.2f} cpu (target <= 1.1)\nnon-embedding work in the builder: "
                     f"{100 * b['builder_overhead_fraction']:.1f}%", fontsize=9)
    rows = result.get("ann", [])
    if rows:
        labels = [f"{r['index']}\n{r['n'] // 1000}K" for r in rows]
        xs = np.arange(len(rows))
        a2.bar(xs - 0.2, [r["p50_ms"] for r in rows], 0.4, label="p50", color="#59c")
        a2.bar(xs + 0.2, [r["p99_ms"] for r in rows], 0.4, label="p99", color="#c55")
        for x, r in zip(xs, rows):
            a2.text(x, r["p99_ms"] * 1.15, f"R@10\n{r['recall_at_10']:.3f}", ha="center", va="bottom", fontsize=8)
        a2.axhline(5.0, color="k", ls="--", lw=1, label="target p99 5 ms")
        a2.set_yscale("log")
        a2.set_xticks(xs, labels)
        a2.set_ylabel("query latency (ms, one query, 1 thread)")
        a2.set_ylim(top=max(r["p99_ms"] for r in rows) * 6)
        a2.set_title("index search latency (one query, one thread) and recall@10 vs exact\n"
                     "synthetic 384-d vectors, 1000 held-out queries", fontsize=9)
        a2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--chunks", type=int, default=120, help="about this many chunks for the build benchmark")
    ap.add_argument("--chunk-tokens", type=int, default=200, help="200 tokens ~ 150 words")
    ap.add_argument("--overlap", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=4, help="interleaved (embedder, builder) pairs")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[100_000, 1_000_000])
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["flat", "hnsw", "ivfpq"])
    ap.add_argument("--flat-max", type=int, default=1_000_000, help="skip flat above this size")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-ann", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "index.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from --out")
    ap.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="ray: measure the Ray engine (writes index_ray.json unless --out is given)")
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                    help="Ray embedder worker counts to measure (default 1,2)")
    ap.add_argument("--repeats-ray", type=int, default=2, help="rounds of (local, ray x workers) builds")
    ap.add_argument("--shard-vectors", type=int, default=200_000, help="vectors for the IVF shard/merge cost")
    args = ap.parse_args(argv)
    if args.engine == "ray" and args.out == str(RESULTS / "index.json"):
        args.out = str(RESULTS / "index_ray.json")
    out = Path(args.out)
    if args.plot_only:
        res = json.loads(out.read_text())
        (plot_ray if "ray" in res else plot)(res, out.with_suffix(".png"))
        return 0
    previous = json.loads(out.read_text()) if out.exists() else {}

    import torch

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
                    "cuda": torch.cuda.is_available()},
        "args": {k: v for k, v in vars(args).items()},
    }
    t0 = time.perf_counter()
    if args.engine == "ray":
        result["ray"] = bench_ray(args)
        result["machine"]["loadavg_end"] = os.getloadavg()
        result["seconds"] = time.perf_counter() - t0
        result["run_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, json.dumps(result, indent=2).encode())
        plot_ray(result, out.with_suffix(".png"))
        log(f"wrote {out} and {out.with_suffix('.png')} in {result['seconds']:.0f} s")
        return 0
    if not args.skip_build:
        result["build"] = bench_build(args)
    if not args.skip_ann:
        result["ann"] = bench_ann(args)
    elif previous.get("ann"):  # keep the last measured ANN rows, saying so
        result["ann"] = previous["ann"]
        result["ann_from_run_at"] = previous.get("run_at", "an earlier run")
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t0
    result["run_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.skip_build and previous.get("build"):
        result["build"] = previous["build"]
        result["build_from_run_at"] = previous.get("run_at", "an earlier run")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(result, indent=2).encode())
    plot(result, out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

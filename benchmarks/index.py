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

(f) retrieval quality on a real KB (MiniLM, ~3000 chunks of this venv's installed packages'
    sources and docs and the standard library): known-item queries (a line copied from a chunk,
    an identifier from code) and paraphrase queries (a prose line reworded by a fixed synonym
    rule written before any result was seen), recall@1 and @10 for dense, lexical and hybrid
    search; targets: known-item hybrid R@1 >= 0.95, paraphrase hybrid R@10 within 0.02 of dense.
(g) the lexical index at 100K and 1M chunks of the same kind of real text (fixed 400-character
    chunks): build time, size, known-item recall of BM25 alone, and search p99 of dense (on
    synthetic vectors: embedding 1M chunks takes hours here), lexical, fusion and hybrid;
    target hybrid p99 <= 10 ms at 1M.

Writes benchmarks/results/index.json, index.png and index_retrieval.png.

``--engine ray`` measures the Ray engine instead (benchmarks/results/index_ray.json/.png):
(d) build throughput on one local Ray cluster with 1 and 2 embedder workers (one CPU and one
    torch thread each), against the local engine on the same corpus in the same run;
(e) the index shard cost: an IVF-PQ index over synthetic vectors trained once, filled as 1
    shard and as 2 shards in parallel Ray tasks, and the shards merged (cost per vector).
These are the inputs of the 100-node / 10B-token model in the README.

    python benchmarks/index.py                       # defaults: ~120 chunks x 4, 100K and 1M vectors
    python benchmarks/index.py --sizes 100000 --chunks 100 --kinds hnsw   # quick
    python benchmarks/index.py --engine ray --chunks 240 --workers 1,2     # the Ray engine
    python benchmarks/index.py --skip-build --skip-ann                    # (f) and (g) only
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


# ----------------------------------------------------------------------------- retrieval quality (f, g)

TEXT_SUFFIXES = {".py", ".pyi", ".md", ".rst", ".h", ".hpp", ".cuh", ".c", ".cpp"}

# The paraphrase rule, fixed before any result was looked at: lowercase, drop punctuation, and
# replace every word found in this hand-written table by its entry (words of the same meaning
# in a technical text); a sentence is used only when at least 40% of its words of four letters
# or more are replaced.
SYNONYMS = {
    "function": "routine", "functions": "routines", "method": "procedure", "methods": "procedures",
    "return": "give back", "returns": "gives back", "returned": "given back", "value": "quantity",
    "values": "quantities", "file": "document", "files": "documents", "directory": "folder",
    "create": "make", "creates": "makes", "created": "made", "creating": "making", "use": "employ",
    "used": "employed", "uses": "employs", "using": "employing", "default": "standard",
    "defaults": "standard settings", "specify": "state", "specified": "stated", "specifies": "states",
    "provide": "supply", "provides": "supplies", "provided": "supplied", "argument": "parameter",
    "arguments": "parameters", "option": "setting", "options": "settings", "error": "failure",
    "errors": "failures", "raise": "throw", "raises": "throws", "raised": "thrown", "object": "instance",
    "objects": "instances", "list": "sequence", "lists": "sequences", "string": "text",
    "strings": "texts", "number": "count", "numbers": "counts", "example": "sample",
    "examples": "samples", "following": "next", "instead": "rather", "allows": "lets", "allow": "let",
    "contains": "holds", "contain": "hold", "containing": "holding", "install": "set up",
    "installed": "set up", "installation": "setup", "package": "library", "packages": "libraries",
    "module": "component", "modules": "components", "support": "handle", "supports": "handles",
    "supported": "handled", "called": "invoked", "call": "invoke", "calls": "invokes",
    "check": "verify", "checks": "verifies", "checked": "verified", "change": "modify",
    "changes": "modifications", "changed": "modified", "data": "information", "input": "entry",
    "output": "result", "outputs": "results", "result": "outcome", "results": "outcomes",
    "available": "accessible", "currently": "at present", "current": "present", "possible": "feasible",
    "should": "ought to", "must": "has to", "need": "require", "needs": "requires", "needed": "required",
    "first": "initial", "last": "final", "new": "fresh", "large": "big", "small": "little",
    "different": "distinct", "same": "identical", "simple": "plain", "easy": "straightforward",
    "fast": "quick", "faster": "quicker", "slow": "sluggish", "start": "begin", "starts": "begins",
    "end": "finish", "ends": "finishes", "run": "execute", "runs": "executes", "running": "executing",
    "build": "construct", "builds": "constructs", "built": "constructed", "add": "append",
    "added": "appended", "adds": "appends", "remove": "delete", "removed": "deleted",
    "removes": "deletes", "set": "assign", "sets": "assigns", "get": "obtain", "gets": "obtains",
    "write": "store", "writes": "stores", "written": "stored", "read": "load", "reads": "loads",
    "show": "display", "shows": "displays", "shown": "displayed", "find": "locate", "finds": "locates",
    "found": "located", "type": "kind", "types": "kinds", "size": "length", "version": "release",
    "versions": "releases", "user": "person", "users": "people", "model": "network", "models": "networks",
    "train": "fit", "training": "fitting", "tensor": "array", "tensors": "arrays",
    "documentation": "docs", "information": "details", "specific": "particular", "multiple": "several",
    "each": "every", "also": "additionally", "however": "but", "because": "since", "when": "whenever",
    "only": "solely", "always": "invariably", "never": "not ever", "usually": "typically",
    "important": "significant", "note": "remark", "see": "refer to", "section": "part",
    "implementation": "realisation", "implemented": "realised", "behavior": "behaviour",
    "behaviour": "conduct", "automatically": "on its own", "manually": "by hand", "instance": "object",
}

_WORD_RE = None


def _words(line: str) -> list[str]:
    import re

    global _WORD_RE
    if _WORD_RE is None:
        _WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]*")
    return _WORD_RE.findall(line)


def paraphrase(line: str) -> str | None:
    """The fixed rewording rule (see SYNONYMS); None when it changes too little."""
    words = [w.lower() for w in _words(line)]
    long = [w for w in words if len(w) >= 4]
    if len(words) < 8 or not long:
        return None
    if sum(w in SYNONYMS for w in long) < 0.4 * len(long):
        return None
    return " ".join(SYNONYMS.get(w, w) for w in words)


def corpus_files(seed: int = 0) -> list[Path]:
    """Text files of the installed packages (this venv's site-packages: sources, headers, docs) and
    of the Python standard library, in a seeded random order; licence files and package metadata
    folders are left out."""
    import random
    import sysconfig

    paths = sysconfig.get_paths()
    files = []
    for root in (Path(paths["purelib"]), Path(paths["stdlib"])):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.endswith((".dist-info", ".egg-info"))
                                 and d not in ("__pycache__", "site-packages", "dist-packages"))
            for f in sorted(filenames):
                p = Path(dirpath) / f
                if p.suffix in TEXT_SUFFIXES and not f.upper().startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE")):
                    files.append(p)
    files = sorted(set(files))
    random.Random(seed).shuffle(files)
    return files


def cheap_chunks(files, n: int, size: int = 400, stride: int = 350):
    """``n`` chunks of about ``size`` characters every ``stride`` (cut at line ends where one is
    near), standing in for the real chunker's 128-token chunks at scale; ``(texts, file_of_chunk)``."""
    texts, src = [], []
    for fi, p in enumerate(files):
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        pos = 0
        while pos < len(t) and len(texts) < n:
            end = min(len(t), pos + size)
            nl = t.rfind("\n", pos + size // 2, end)
            end = nl + 1 if nl > 0 and end < len(t) else end
            if t[pos:end].strip():
                texts.append(t[pos:end])
                src.append(fi)
            pos = max(end - (size - stride), pos + 1) if end < len(t) else len(t)
        if len(texts) >= n:
            break
    return texts, src


def scale_queries(texts, rng, n_phrase: int, n_ident: int, searcher):
    """:func:`known_item_queries`' phrase and identifier queries over a corpus too big to scan per
    query: a line's holders are the chunks with that whole line (a table of every 8-25-word line's
    hash), an identifier's the chunks where it stands as a word, case aside (its BM25 postings:
    an identifier is one token)."""
    import re

    ident_re = re.compile(r"\b(?=[A-Za-z_]*(?:_[A-Za-z0-9]|[a-z][A-Z]))[A-Za-z_][A-Za-z0-9_]{9,}\b")
    table: dict[int, list] = {}
    for c, t in enumerate(texts):
        for ln in t.splitlines():
            ln = ln.strip()
            if 8 <= ln.count(" ") + 1 <= 25 and 8 <= len(ln.split()) <= 25:
                table.setdefault(hash(ln), []).append(c)
    ip, ind = searcher.bm25.scores["indptr"], searcher.bm25.scores["indices"]
    out = {"phrase": [], "identifier": []}
    seen = set()
    for c in rng.permutation(len(texts)):
        if len(out["phrase"]) >= n_phrase and len(out["identifier"]) >= n_ident:
            break
        lines = [ln.strip() for ln in texts[c].splitlines()]
        lines = [ln for ln in lines if 8 <= len(ln.split()) <= 25 and ln not in seen]
        if lines and len(out["phrase"]) < n_phrase:
            ln = lines[int(rng.integers(len(lines)))]
            seen.add(ln)
            rel = sorted(set(table.get(hash(ln), [])))
            if 1 <= len(rel) <= 3:
                out["phrase"].append((ln, rel, ln))
        if len(out["identifier"]) < n_ident:
            names = sorted(set(ident_re.findall(texts[c])) - seen)
            if names:
                name = names[int(rng.integers(len(names)))]
                seen.add(name)
                t = searcher.vocab.get(name.lower())
                if t is not None and 1 <= ip[t + 1] - ip[t] <= 3:
                    out["identifier"].append((name, [int(r) for r in ind[ip[t]:ip[t + 1]]], name))
    return out


def _is_prose(line: str) -> bool:
    """A line of words (docs, docstrings, comments): 80% of its tokens are plain words."""
    toks = line.lstrip("#/*-> ").split()
    return bool(toks) and sum(t.strip(".,;:()'\"`!?").isalpha() for t in toks) >= 0.8 * len(toks)


def known_item_queries(texts, rng, n_phrase: int, n_ident: int, n_para: int):
    """Queries with their relevant chunks (any chunk that holds the copied text).

    phrase: a whole line of 8-25 words copied from a chunk; identifier: a name with an underscore
    or an inner capital, 10+ characters, from a chunk; paraphrase: a prose line reworded by
    :func:`paraphrase` (lines of words only: docs, docstrings, comments). Only items held by 1-3
    chunks are kept (boilerplate lines are skipped)."""
    import re

    ident_re = re.compile(r"\b(?=[A-Za-z_]*(?:_[A-Za-z0-9]|[a-z][A-Z]))[A-Za-z_][A-Za-z0-9_]{9,}\b")
    big = "\x00".join(texts)
    starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])

    def holders(s: str, word: bool = False) -> list[int]:
        out, i = [], big.find(s)
        while i >= 0 and len(out) <= 3:
            c = int(np.searchsorted(starts, i, side="right") - 1)
            if not word or re.search(r"(?<![A-Za-z0-9_])" + re.escape(s) + r"(?![A-Za-z0-9_])", texts[c]):
                if c not in out:
                    out.append(c)
            i = big.find(s, i + 1)
        return out

    out = {"phrase": [], "identifier": [], "paraphrase": []}
    want = {"phrase": n_phrase, "identifier": n_ident, "paraphrase": n_para}
    seen = set()
    for c in rng.permutation(len(texts)):
        if all(len(out[k]) >= want[k] for k in out):
            break
        lines = [ln.strip() for ln in texts[c].splitlines()]
        lines = [ln for ln in lines if 8 <= len(ln.split()) <= 25 and ln not in seen]
        if lines and (len(out["phrase"]) < n_phrase or len(out["paraphrase"]) < n_para):
            ln = lines[int(rng.integers(len(lines)))]
            seen.add(ln)
            rel = holders(ln)
            if 1 <= len(rel) <= 3:
                para = paraphrase(ln) if n_para and _is_prose(ln) else None
                if para is not None and len(out["paraphrase"]) < n_para:
                    out["paraphrase"].append((para, rel, ln))
                elif len(out["phrase"]) < n_phrase:
                    out["phrase"].append((ln, rel, ln))
        if len(out["identifier"]) < n_ident:
            names = sorted(set(ident_re.findall(texts[c])) - seen)
            if names:
                name = names[int(rng.integers(len(names)))]
                seen.add(name)
                rel = holders(name, word=True)
                if 1 <= len(rel) <= 3:
                    out["identifier"].append((name, rel, name))
    return out


MODES_MEASURED = ("dense", "lexical", "hybrid", "hybrid_rrf_only")


def _recall(ranked, rel, k):
    return float(np.mean([bool(set(r[:k].tolist()) & set(g)) for r, g in zip(ranked, rel)])) if rel else float("nan")


def _pct(x, p):
    return 1e3 * float(np.percentile(x, p))


def bench_retrieval(args) -> dict:
    """(f) recall@1/@10 of dense, lexical and hybrid search on a real KB (MiniLM) built from
    installed packages' sources and docs; end-to-end query latency."""
    import ctxmem
    from ctxmem.index import KnowledgeIndex, embed, lexical

    model = ctxmem.load_embedder(args.embedder)
    files = [p for p in corpus_files(seed=1) if p.stat().st_size <= 40_000]
    budget, chosen, total = args.retrieval_chunks * 420, [], 0
    for p in files:  # ~420 characters per 128-token chunk of code and prose (measured on this corpus)
        if total >= budget:
            break
        chosen.append(p)
        total += p.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="ctxmem-bench-retrieval-"))
    try:
        t0 = time.perf_counter()
        kb = KnowledgeIndex.build([str(p) for p in chosen], work / "kb", embedder=model, chunk_tokens=128, overlap=16,
                                  progress=False)
        build_s = time.perf_counter() - t0
        s = kb.last_summary
        ids, hits = zip(*kb.iter_chunks())
        texts = [h.text for h in hits]
        t0 = time.perf_counter()
        model.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        embed_alone_s = time.perf_counter() - t0
        log(f"retrieval: KB of {len(texts)} chunks from {len(chosen)} files built in {build_s:.1f} s "
            f"(embedding {s['embed_seconds']:.1f} s of it; the embedder alone on the same texts {embed_alone_s:.1f} s)")
        qs = known_item_queries(texts, np.random.default_rng(2), args.queries_per_kind, args.queries_per_kind,
                                args.queries_per_kind)
        ids = np.array(ids, dtype=np.int64)
        table, lat = {}, {}
        for kind, items in qs.items():
            qtext = [q for q, _, _ in items]
            rel = [[int(ids[c]) for c in r] for _, r, _ in items]
            qv = embed.encode(kb.embedder, qtext)
            table[kind] = {"queries": len(items), "examples": [{"query": q, "from": src} for q, _, src in items[:3]]}
            ranked = {m: [] for m in MODES_MEASURED}
            for j, q in enumerate(qtext):
                for mode in ("dense", "lexical", "hybrid"):
                    t1, c1 = time.perf_counter(), time.thread_time()
                    ranked[mode].append(kb.rank_many([q], 10, mode=mode, q=qv[j:j + 1])[0][0])
                    lat.setdefault(mode, []).append(time.perf_counter() - t1)
                    lat.setdefault(mode + "_cpu", []).append(time.thread_time() - c1)
                # the ablation: plain RRF of the same two rankings, without "exact words first"
                d50 = kb.rank_many([q], lexical.FUSION_DEPTH, mode="dense", q=qv[j:j + 1])[0][0]
                l50 = kb.rank_many([q], lexical.FUSION_DEPTH, mode="lexical")[0][0]
                ranked["hybrid_rrf_only"].append(lexical.rrf([d50, l50], 10)[0])
            for mode in MODES_MEASURED:
                table[kind][mode] = {"recall_at_1": _recall(ranked[mode], rel, 1),
                                     "recall_at_10": _recall(ranked[mode], rel, 10)}
            log(f"  {kind:10s} n={len(items):4d}  " + "  ".join(
                f"{m} R@1 {table[kind][m]['recall_at_1']:.3f} R@10 {table[kind][m]['recall_at_10']:.3f}"
                for m in MODES_MEASURED))
        e2e = []
        for q in [q for q, _, _ in qs["phrase"][:100]]:
            t1 = time.perf_counter()
            kb.search(q, k=5)
            e2e.append(time.perf_counter() - t1)
        return {
            "corpus": "installed packages' sources, headers and docs (this venv's site-packages) and the Python "
                      "standard library; files <= 40 KB, seeded order",
            "embedder": args.embedder, "chunks": len(texts), "files": len(chosen), "chunk_tokens": 128, "overlap": 16,
            "index_type": kb.info()["index_type"], "lexical": kb.info()["lexical"],
            "build_seconds": build_s, "build_embed_seconds": s["embed_seconds"],
            "embedder_alone_seconds": embed_alone_s,
            "build_over_embedder": build_s / embed_alone_s,
            "table": table,
            "search_ms": {m: {"p50": _pct(v, 50), "p99": _pct(v, 99)} for m, v in lat.items()},
            "kb_search_hybrid_end_to_end_ms": {"p50": _pct(e2e, 50), "p99": _pct(e2e, 99)},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_lexical_scale(args) -> list[dict]:
    """(g) the lexical index and the fusion at 100K and 1M chunks of real text (cheap fixed-size
    chunks); the dense side on synthetic vectors (embedding 1M chunks with MiniLM takes hours on
    2 cores), so hybrid recall is not measured here, only its cost."""
    from ctxmem.index import ann, lexical
    from ctxmem.index.testing import synthetic_vectors

    rows = []
    files = corpus_files(seed=1)
    for n in args.scale_sizes:
        t0 = time.perf_counter()
        texts, _ = cheap_chunks(files, n)
        read_s = time.perf_counter() - t0
        n = len(texts)
        log(f"scale n={n}: read and cut into chunks in {read_s:.1f} s ({sum(map(len, texts)) / 1e6:.0f} MB of text)")
        gc.collect()
        # the lexical build exactly as the KB does it: term counts per segment, then the index
        t0, c0 = time.perf_counter(), time.process_time()
        pieces, seg = [], 4096
        for a in range(0, n, seg):
            st = lexical.count_terms(texts[a:a + seg])
            blob = lexical.encode_segment(st)
            pieces.append((lexical.decode_segment(blob, "seg", len(st.doc_len)), np.arange(len(st.doc_len)),
                           np.arange(a, a + len(st.doc_len))))
        count_s, count_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        arrays = lexical.build_arrays(pieces)
        del pieces
        blob = lexical.encode_index(arrays)
        index_s, index_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        searcher = lexical.LexicalSearcher(lexical.decode_index(blob, "index"))
        open_s = time.perf_counter() - t0
        nbytes = len(blob)
        del blob, arrays
        gc.collect()
        qs = scale_queries(texts, np.random.default_rng(3), args.scale_queries, args.scale_queries, searcher)
        log(f"  lexical: term counts {count_s:.1f} s ({count_cpu:.1f} s cpu), "
            f"index {index_s:.1f} s ({index_cpu:.1f} s cpu), "
            f"load {open_s:.1f} s, {nbytes / 1e6:.0f} MB, "
            f"{len(searcher.vocab)} terms")
        # dense stand-in: synthetic vectors in the index type 'auto' picks at this size
        allv = synthetic_vectors(n + 500, args.dim, seed=n)
        x, qv = allv[:n], allv[n:]
        del allv
        kind = ann.choose_type("auto", n)
        t0, c0 = time.perf_counter(), time.process_time()
        index = ann.create(kind, x, np.arange(n, dtype=np.int64), ann.default_params(kind, n, args.dim))
        dense_s, dense_cpu = time.perf_counter() - t0, time.process_time() - c0
        del x
        dsearch = ann.Searcher(index, kind)
        log(f"  dense stand-in: {kind} over synthetic vectors built in {dense_s:.1f} s ({dense_cpu:.1f} s cpu)")
        row = {"n": n, "lexical_count_seconds": count_s, "lexical_index_seconds": index_s,
               "lexical_build_seconds": count_s + index_s, "lexical_build_cpu_seconds": count_cpu + index_cpu,
               "lexical_load_seconds": open_s, "lexical_bytes": nbytes, "vocab": len(searcher.vocab),
               "dense_index": kind, "dense_index_build_seconds": dense_s, "dense_index_build_cpu_seconds": dense_cpu,
               "loadavg": os.getloadavg()[0],
               "queries": {}}
        for kindq, items in qs.items():
            if not items:
                continue
            lat = {"dense": [], "lexical": [], "fusion": [], "hybrid": [], "hybrid_cpu": []}
            ranked = []
            for j, (q, _, _) in enumerate(items[:20]):  # warm-up (first-call costs), untimed
                searcher.search(q, lexical.FUSION_DEPTH)
                dsearch.search(qv[j][None], lexical.FUSION_DEPTH)
            for j, (q, _, _) in enumerate(items):
                v = qv[j % len(qv)][None]
                t1, c1 = time.perf_counter(), time.thread_time()
                D, I = dsearch.search(v, lexical.FUSION_DEPTH)
                t2 = time.perf_counter()
                lid, _ = searcher.search(q, lexical.FUSION_DEPTH)
                t3 = time.perf_counter()
                lexical.fuse(I[0][I[0] >= 0], lid, 10, q, texts.__getitem__)
                t4, c4 = time.perf_counter(), time.thread_time()
                for key, val in (("dense", t2 - t1), ("lexical", t3 - t2), ("fusion", t4 - t3), ("hybrid", t4 - t1),
                                 ("hybrid_cpu", c4 - c1)):
                    lat[key].append(val)
                ranked.append(lid)
            rel = [r for _, r, _ in items]
            row["queries"][kindq] = {
                "n": len(items), "lexical_recall_at_1": _recall(ranked, rel, 1),
                "lexical_recall_at_10": _recall(ranked, rel, 10),
                **{f"{key}_ms": {"p50": _pct(v, 50), "p99": _pct(v, 99)} for key, v in lat.items()}}
            r = row["queries"][kindq]
            log(f"  {kindq:10s} n={len(items)} lexical R@1 {r['lexical_recall_at_1']:.3f} R@10 "
                f"{r['lexical_recall_at_10']:.3f}; p99 ms: dense {r['dense_ms']['p99']:.2f}, lexical "
                f"{r['lexical_ms']['p99']:.2f}, fusion {r['fusion_ms']['p99']:.2f}, hybrid {r['hybrid_ms']['p99']:.2f} "
                f"(cpu {r['hybrid_cpu_ms']['p99']:.2f})")
        rows.append(row)
        del index, dsearch, searcher, texts
        gc.collect()
    return rows


def plot_retrieval(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result.get("retrieval")
    sc = result.get("lexical_scale", [])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    if r:
        kinds = list(r["table"])
        modes = ("dense", "lexical", "hybrid")
        colors = {"dense": "#59c", "lexical": "#c95", "hybrid": "#2a7"}
        xs = np.arange(len(kinds))
        for i, m in enumerate(modes):
            for j, at in enumerate(("recall_at_1", "recall_at_10")):
                vals = [r["table"][k][m][at] for k in kinds]
                off = (i - 1) * 0.27 + (j - 0.5) * 0.13
                a1.bar(xs + off, vals, 0.12, color=colors[m], alpha=0.55 if j == 0 else 1.0,
                       label=f"{m} R@{'1' if j == 0 else '10'}")
        a1.set_xticks(xs, [f"{k}\n(n={r['table'][k]['queries']})" for k in kinds])
        a1.set_ylim(0, 1.05)
        a1.axhline(0.95, color="k", ls="--", lw=0.8)
        a1.set_ylabel("recall (a chunk holding the item in the top k)")
        a1.set_title(f"known-item and paraphrase queries, {r['chunks']} chunks of installed packages' code and docs\n"
                     f"{r['embedder']}, light bars R@1, dark bars R@10", fontsize=9)
        a1.legend(fontsize=7, ncol=3, loc="lower left")
    if sc:
        labels, p99 = [], {"dense": [], "lexical": [], "hybrid": [], "hybrid_cpu": []}
        for row in sc:
            q = row["queries"].get("phrase") or next(iter(row["queries"].values()))
            labels.append(f"{row['n'] // 1000}K chunks\n(load avg {row.get('loadavg', float('nan')):.1f})")
            for m in p99:
                p99[m].append(q[f"{m}_ms"]["p99"])
        xs = np.arange(len(labels))
        for i, m in enumerate(p99):
            a2.bar(xs + (i - 1.5) * 0.21, p99[m], 0.2, label=m.replace("_cpu", " (CPU time)"),
                   hatch="//" if m.endswith("_cpu") else None, color=["#59c", "#c95", "#2a7", "#fff"][i],
                   edgecolor="#2a7" if m.endswith("_cpu") else None)
        a2.axhline(10, color="k", ls="--", lw=1, label="target 10 ms")
        a2.set_xticks(xs, labels)
        a2.set_ylabel("search p99, ms (one query; embedding it excluded)")
        a2.set_title("search p99 at scale, copied-line queries, 2 shared cores: BM25 on real text,\n"
                     "dense (auto index type) on synthetic vectors; wall time unless marked CPU", fontsize=9)
        a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    ap.add_argument("--skip-retrieval", action="store_true", help="skip (f) and (g), keeping earlier results")
    ap.add_argument("--retrieval-chunks", type=int, default=3000, help="(f): about this many chunks in the real KB")
    ap.add_argument("--queries-per-kind", type=int, default=200, help="(f): phrase, identifier, paraphrase queries")
    ap.add_argument("--scale-sizes", type=lambda s: [int(x) for x in s.split(",")] if s else [],
                    default=[100_000, 1_000_000], help="(g): chunk counts for the lexical index at scale")
    ap.add_argument("--scale-queries", type=int, default=300, help="(g): phrase and identifier queries per size")
    args = ap.parse_args(argv)
    if args.engine == "ray" and args.out == str(RESULTS / "index.json"):
        args.out = str(RESULTS / "index_ray.json")
    out = Path(args.out)
    if args.plot_only:
        res = json.loads(out.read_text())
        (plot_ray if "ray" in res else plot)(res, out.with_suffix(".png"))
        if res.get("retrieval") or res.get("lexical_scale"):
            plot_retrieval(res, out.with_name(out.stem + "_retrieval.png"))
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
    if not args.skip_retrieval:
        if args.retrieval_chunks > 0:
            result["retrieval"] = bench_retrieval(args)
        if args.scale_sizes:
            result["lexical_scale"] = bench_lexical_scale(args)
    for key in ("retrieval", "lexical_scale"):
        if key not in result and previous.get(key):
            result[key] = previous[key]
            result[f"{key}_from_run_at"] = previous.get(f"{key}_from_run_at", previous.get("run_at", "an earlier run"))
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t0
    result["run_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.skip_build and previous.get("build"):
        result["build"] = previous["build"]
        result["build_from_run_at"] = previous.get("run_at", "an earlier run")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(result, indent=2).encode())
    plot(result, out.with_suffix(".png"))
    if result.get("retrieval") or result.get("lexical_scale"):
        plot_retrieval(result, out.with_name(out.stem + "_retrieval.png"))
    log(f"wrote {out} and {out.with_suffix('.png')} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Ray engine of the index builder: the same KB, built by a cluster.

``KnowledgeIndex.build(..., engine="ray")`` / ``ctxmem index build ... --engine ray`` runs
the local builder's steps on Ray (``pip install 'ctxmem[distributed]'``):

1. **Read and chunk** (Ray Data tasks): every source is read, hashed, decoded and chunked
   by :func:`ctxmem.index.builder.prepare_source` - the local builder's own code - given
   what the manifest knows of it, so unchanged sources are not re-chunked and a partly
   committed one continues at its next chunk.
2. **Embed** (a Ray Data actor pool): one embedder per actor, loaded once, on a CPU or a GPU;
   each actor checks that its model embeds the probe sentence as the KB records.
3. **Commit** (the driver, this process): rows come back in source order (Ray Data's
   ``preserve_order``) and are committed through the local builder's ``Ingestor``
   (segments, manifest, fsync). Chunk ids are given in that order, so a KB built by Ray has
   the same chunk ids, chunks and provenance as one built locally.
4. **Index**: IVF-PQ indexes are trained once on the driver (the local builder's sample) and
   filled as shards in parallel Ray tasks over consecutive id ranges; the shards are merged
   into one index, identical to the one the local builder makes. Flat and HNSW indexes are
   built on the driver: adding to a flat index is a copy, and HNSW graphs cannot be merged
   (``auto`` picks HNSW only up to 200,000 chunks). ``IndexShards`` would need a new file
   format, and the merge costs one copy of the codes (see benchmarks/index.py).

Fault tolerance
    A worker that dies (killed, OOM, node lost) has its batch retried by Ray on a restarted
    actor (Ray Data's default: unlimited retries); the batch's rows are produced once. The
    driver checks every source's chunk numbers as they arrive (a repeat is dropped, a gap is
    an error), so the KB holds each chunk exactly once. A driver that dies loses at most the
    rows since its last commit; rerunning the build (either engine) resumes from the manifest
    exactly as the local builder does.

Scaling limits: the driver receives every chunk's text and vector (~2.3 KB per chunk at
384 dimensions) and writes the segments, so it caps the build at roughly its disk and
network bandwidth; the README's model puts numbers on it.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from . import ann, embed
from .builder import gather_vectors, known_state, prepare_source
from .errors import BadInputError, KnowledgeIndexError
from .sources import SourceSpec

INSTALL_HINT = "pip install 'ctxmem[distributed]'"
ENGINES = ("local", "ray")
# Chunks per embedder task: about 1/8 of a worker's share of the corpus (estimated from its
# bytes), within these bounds - large enough that Ray's per-task overhead is small, small
# enough that every worker gets work and a killed actor redoes little. None: automatic.
ACTOR_BATCH_ROWS: int | None = None
ACTOR_BATCH_MIN, ACTOR_BATCH_MAX = 32, 1024
# IVF shards smaller than this are not worth a task: adding ~50K vectors takes about a second.
SHARD_MIN_VECTORS = 50_000


def require_ray():
    """Import Ray, or fail with the command that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the [data] extra of ray)
    except ImportError as e:
        raise KnowledgeIndexError(f"--engine ray needs Ray with Ray Data ({e}); install it with: {INSTALL_HINT}") \
            from None
    return ray


# ----------------------------------------------------------------------------- worker side

_STR_COLS = ("status", "stage", "reason", "sha256", "notes", "source", "text")
_INT_COLS = ("i", "n_chunks", "first", "chunk_no", "start", "end")


def _chunk_batch(batch: dict, chunker, text_field: str, max_file_bytes: int) -> dict:
    """Ray Data map: sources -> rows. A source gives one row per chunk to embed
    (``status == "chunk"``), or one row saying it was skipped or reused."""
    out = {c: [] for c in _STR_COLS + _INT_COLS}

    def row(**kw):
        for c in _STR_COLS:
            out[c].append(kw.get(c, ""))
        for c in _INT_COLS:
            out[c].append(kw.get(c, 0))

    for j in range(len(batch["i"])):
        spec = SourceSpec(str(batch["key"][j]), str(batch["path"][j]) or None, str(batch["kind"][j]),
                          int(batch["size"][j]), bytes(batch["data"][j]) if batch["has_data"][j] else None)
        known = None
        if batch["known_sha"][j]:
            known = {"sha256": str(batch["known_sha"][j]), "complete": bool(batch["known_complete"][j]),
                     "done": int(batch["known_done"][j])}
        prep = prepare_source(spec, chunker, text_field, max_file_bytes, known)
        i = int(batch["i"][j])
        if prep["status"] != "chunks":
            row(i=i, status=prep["status"], stage=prep.get("stage", ""), reason=prep.get("reason", ""),
                sha256=prep.get("sha256", ""), chunk_no=-1)
            continue
        notes = json.dumps(prep["notes"])
        for c, (src, a, b, text) in enumerate(prep["chunks"]):
            row(i=i, status="chunk", sha256=prep["sha256"], notes=notes if c == 0 else "",
                n_chunks=prep["n_chunks"], first=prep["first"], chunk_no=prep["first"] + c, source=src,
                start=a, end=b, text=text)
    res = {c: np.array(out[c], dtype=object) for c in _STR_COLS}
    res.update({c: np.array(out[c], dtype=np.int64) for c in _INT_COLS})
    return res


class _EmbedActor:
    """One embedder per Ray actor (on its GPU when it has one), loaded once."""

    def __init__(self, embedder, recorded: dict, batch_size: int, threads: int):
        if threads > 0:
            try:
                import torch

                torch.set_num_threads(threads)
            except ImportError:
                pass
        self.emb = embed.load(embedder)
        # a node with another model version (or another model) must not write into this KB
        embed.check_same(self.emb, recorded, f"the KB being built (Ray worker pid {os.getpid()})")
        self.dim = int(recorded["dim"])
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        n = len(batch["i"])
        vecs = np.zeros((n, self.dim), dtype=np.float32)
        rows = np.flatnonzero(batch["status"] == "chunk")
        if len(rows):
            texts = [str(t) for t in batch["text"][rows]]
            order = np.argsort([-len(t) for t in texts], kind="stable")  # less padding per batch
            v = embed.encode(self.emb, [texts[k] for k in order], self.batch_size)
            if v.shape[1] != self.dim:
                raise KnowledgeIndexError(f"embedder returned dim {v.shape[1]}, the KB has {self.dim}")
            vecs[rows[order]] = v
        batch["vector"] = vecs
        return batch


def _fill_shard(template, vectors: np.ndarray, ids: np.ndarray, kind: str):
    """Ray task: a copy of the trained empty index holding one shard's vectors."""
    index = ann.deserialize(template)
    ann.add(index, kind, vectors, ids, presorted=True)  # Ray sets OMP_NUM_THREADS to the task's 1 CPU
    return np.frombuffer(ann.serialize(index), dtype=np.uint8)


# ----------------------------------------------------------------------------- driver side

class RayEngine:
    """Connects to (or starts) a Ray cluster and runs a build's ingestion and index on it.

    ``address``: a Ray cluster to join (``ray://host:10001``, ``host:6379`` or ``auto``);
    ``None`` starts a local cluster on this machine (``num_cpus``: CPUs it offers, default
    all), unless this process is already connected to one. ``workers``: embedder actors
    (default: as many as the cluster's CPUs, or GPUs, allow); ``cpus_per_worker`` /
    ``gpus_per_worker``: resources of each actor (with GPUs, leave CPUs for the readers).
    """

    def __init__(self, address: str | None = None, workers: int | None = None, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, num_cpus: int | None = None, shard_min: int | None = None):
        if workers is not None and workers < 1:
            raise BadInputError("workers must be >= 1")
        if cpus_per_worker <= 0 or gpus_per_worker < 0:
            raise BadInputError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        self.ray = require_ray()
        self.address, self.workers = address, workers
        self.cpus_per_worker, self.gpus_per_worker = float(cpus_per_worker), float(gpus_per_worker)
        self.num_cpus = num_cpus
        self.shard_min = int(shard_min if shard_min is not None else SHARD_MIN_VECTORS)
        self._started = False
        self.stats: dict = {}

    # -- the cluster -----------------------------------------------------------------------------
    def start(self) -> None:
        ray = self.ray
        if ray.is_initialized():  # the caller's cluster: use it, leave it running
            return
        kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            if self.address:
                ray.init(address=self.address, **kw)
            else:
                ray.init(num_cpus=self.num_cpus, **kw)
        except Exception as e:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
            raise KnowledgeIndexError(f"cannot start or join {where}: {type(e).__name__}: {e}") from None
        self._started = True

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def n_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        res = self.ray.cluster_resources()
        if self.gpus_per_worker > 0:
            n = res.get("GPU", 0) // self.gpus_per_worker
            if n < 1:
                raise KnowledgeIndexError(f"gpus_per_worker={self.gpus_per_worker}, but the Ray cluster has "
                                          f"{res.get('GPU', 0)} GPUs")
            return int(n)
        return max(1, int(res.get("CPU", 1) // self.cpus_per_worker))

    # -- ingestion -------------------------------------------------------------------------------
    def feed(self, embedder_spec):
        """The ``feed`` for :meth:`Ingestor.run`: ``embedder_spec`` is what each actor loads
        (a name, or an embedder object Ray can serialise)."""
        return lambda ing, specs: self._feed(ing, specs, embedder_spec)

    def _dataset(self, ing, specs, embedder_spec):
        ray = self.ray
        m = ing.sess.m
        items = []
        for i, s in enumerate(specs):
            k = known_state(m, s.key) or {"sha256": "", "complete": False, "done": 0}
            items.append({"i": i, "key": s.key, "path": s.path or "", "kind": s.kind, "size": int(s.size),
                          "data": s.data or b"", "has_data": s.data is not None, "known_sha": k["sha256"],
                          "known_complete": k["complete"], "known_done": k["done"]})
        workers = self.n_workers()
        # one source per read task (for load balance), up to a few thousand tasks
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4096)))
        # Readers reserve no CPU: the embedders hold every CPU slot, and reading + chunking cost a
        # few percent of embedding. It also keeps Ray Data from fusing the two stages, which
        # would hand each actor a bundle of whole sources instead of batches of chunks.
        ds = ds.map_batches(_chunk_batch, batch_size=None, batch_format="numpy",
                            fn_kwargs={"chunker": ing.chunker, "text_field": ing.text_field,
                                       "max_file_bytes": ing.max_file_bytes},
                            num_cpus=0, compute=ray.data.TaskPoolStrategy(size=2 * workers))
        rows = ACTOR_BATCH_ROWS
        if rows is None:
            est_chunks = sum(s.size for s in specs) / (4.0 * ing.chunker.chunk_tokens)  # ~4 bytes per token
            rows = int(np.clip(est_chunks / (8 * workers), ACTOR_BATCH_MIN, ACTOR_BATCH_MAX))
        self.stats["batch_rows"] = rows
        threads = max(1, int(self.cpus_per_worker))
        res = {"num_cpus": self.cpus_per_worker}
        if self.gpus_per_worker:
            res["num_gpus"] = self.gpus_per_worker
        return ds.map_batches(
            _EmbedActor, batch_size=rows, batch_format="numpy",
            fn_constructor_args=(embedder_spec, m["embedder"], ing.batch_size, threads),
            compute=ray.data.ActorPoolStrategy(size=workers), **res), workers

    def _feed(self, ing, specs, embedder_spec) -> None:
        if not specs:
            return
        ray = self.ray
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        ctx.execution_options.preserve_order = True  # commit order = source order = the local builder's ids
        ctx.enable_progress_bars = False  # the builder's own bar counts bytes
        t0 = time.perf_counter()
        try:
            ds, workers = self._dataset(ing, specs, embedder_spec)
            self._consume(ing, specs, ds)
        except ray.exceptions.RayError as e:  # a worker's error: one line, without Ray's traceback
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            raise KnowledgeIndexError(f"the Ray build failed: {lines[-1] if lines else type(e).__name__} "
                                      "(what was committed is kept; rerun to resume)") from None
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        self.stats.update(workers=workers, pipeline_seconds=time.perf_counter() - t0)
        ing.stats["embed_seconds"] += time.perf_counter() - t0  # wall time of the whole pipeline

    def _consume(self, ing, specs, ds) -> None:
        """Admit sources and commit their chunks as rows arrive, checking exactly-once."""
        m = ing.sess.m
        dim = m["embedder"]["dim"]
        vecs: list[np.ndarray] = []
        last_commit = time.monotonic()
        cur = -1          # index of the source whose rows are arriving
        nxt = want = 0    # its next expected chunk number, and its chunk count
        weight = 0.0

        def commit():
            nonlocal last_commit
            if ing.pending:
                ing.commit_pending(np.concatenate(vecs) if len(vecs) > 1 else vecs[0])
                vecs.clear()
            last_commit = time.monotonic()

        def source_done():
            if cur >= 0 and nxt != want:
                raise KnowledgeIndexError(f"Ray returned chunks {nxt}..{want - 1} of {specs[cur].key} short; "
                                          "rerun the build to resume it")

        t0 = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            # until the first batch: cluster scheduling and the actors loading their models
            if "first_batch_seconds" not in self.stats:
                self.stats.update(first_batch_seconds=round(time.perf_counter() - t0, 3),
                                  first_batch_rows=int(np.count_nonzero(batch["status"] == "chunk")))
            status, chunk_no, src_i = batch["status"], batch["chunk_no"], batch["i"]
            keep = np.zeros(len(src_i), dtype=bool)
            for r in range(len(src_i)):
                i = int(src_i[r])
                if i < cur:
                    continue  # a repeat of a source already done
                if i > cur:
                    source_done()
                    if i != cur + 1:
                        raise KnowledgeIndexError(f"Ray returned nothing for {specs[cur + 1].key}; "
                                                  "rerun the build to resume it")
                    cur, spec = i, specs[i]
                    prep = {"status": "chunks" if status[r] == "chunk" else str(status[r]),
                            "stage": str(batch["stage"][r]), "reason": str(batch["reason"][r]),
                            "sha256": str(batch["sha256"][r]), "n_chunks": int(batch["n_chunks"][r]),
                            "first": int(batch["first"][r]),
                            "notes": json.loads(batch["notes"][r]) if batch["notes"][r] else []}
                    ent = ing.admit(spec, prep)
                    if ent is False:  # the manifest changed under us: cannot happen (we hold the lock)
                        raise KnowledgeIndexError(f"{spec.key}: committed chunks disagree with the manifest")
                    nxt = want = 0
                    if ent is not None:
                        nxt, want = prep["first"], prep["n_chunks"]
                        weight = spec.size / want
                        ing._advance(weight * nxt)
                if status[r] != "chunk":
                    continue
                c = int(chunk_no[r])
                if c < nxt:
                    continue  # delivered twice: keep the first
                if c > nxt:
                    raise KnowledgeIndexError(f"Ray lost chunk {nxt} of {specs[i].key}; rerun the build to resume it")
                nxt += 1
                keep[r] = True
                rec = {"source": str(batch["source"][r]), "start": int(batch["start"][r]),
                       "end": int(batch["end"][r]), "text": str(batch["text"][r])}
                ing.pending.append((specs[i].key, rec, weight))
                ing._advance(weight)
            if keep.any():
                v = batch["vector"]
                v = np.stack(v) if v.dtype == object else v  # ragged-tensor form, if Ray chose it
                v = np.asarray(v, dtype=np.float32).reshape(-1, dim)[keep]
                vecs.append(v)
            if len(ing.pending) >= ing.commit_every or time.monotonic() - last_commit >= ing.commit_seconds:
                commit()
        self.stats["last_batch_seconds"] = round(time.perf_counter() - t0, 3)
        source_done()
        if cur != len(specs) - 1:
            raise KnowledgeIndexError(f"Ray returned nothing for {specs[cur + 1].key}; rerun the build to resume it")
        commit()

    # -- the index ---------------------------------------------------------------------------------
    def create_index(self, sess, kind: str, ids: np.ndarray, params: dict):
        """``create`` for :meth:`Session.finalize`: IVF shards filled in parallel, then merged."""
        n = len(ids)
        n_shards = min(self.n_workers(), n // max(1, self.shard_min))
        if kind not in ann.MERGEABLE or kind == "flat" or n_shards < 2:
            return ann.create(kind, gather_vectors(sess.dir, sess.m, ids), ids, params)
        ray = self.ray
        t0 = time.perf_counter()
        rows = ann.training_rows(kind, n, params)  # the local builder's sample: the same quantizers
        template = ann.serialize(ann.new_index(kind, sess.m["embedder"]["dim"], params,
                                               gather_vectors(sess.dir, sess.m, ids[rows])))
        t_train = time.perf_counter() - t0
        fill = ray.remote(num_cpus=1, max_retries=3)(_fill_shard)
        tmpl_ref = ray.put(template)
        bounds = np.linspace(0, n, n_shards + 1).astype(np.int64)
        refs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            part = ids[a:b]
            refs.append(fill.remote(tmpl_ref, ray.put(gather_vectors(sess.dir, sess.m, part)), part, kind))
        t1 = time.perf_counter()
        shards = [ann.deserialize(ray.get(r).tobytes()) for r in refs]
        t2 = time.perf_counter()
        index = shards[0]
        for s in shards[1:]:
            ann.merge_into(index, s, kind)
        ann.apply_search_params(index, kind, params)
        self.stats.update(index_shards=n_shards, index_train_seconds=round(t_train, 3),
                          index_fill_seconds=round(t2 - t1, 3), index_merge_seconds=round(time.perf_counter() - t2, 3))
        return index

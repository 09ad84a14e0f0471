"""The vector index: FAISS over L2-normalised embeddings, inner product (= cosine) scores.

Index types (``index=`` / ``--index``):

=========  ============================================  ===============================
type       FAISS structure                               remove
=========  ============================================  ===============================
``flat``   ``IDMap2,Flat``: exact search                 in place (``remove_ids``)
``hnsw``   ``IDMap2,HNSW32``, efConstruction 40,         rebuilt from the stored
           efSearch 128                                  embeddings
``ivfpq``  ``IDMap2,IVF{nlist},PQ{d/8}x8np,RFlat``:      lists emptied and refilled
           IVF-PQ candidates re-ranked exactly           (the trained quantizers are
           (nlist ~ 2 sqrt(n), nprobe 32, k_factor 16)   kept: no retraining)
``auto``   ``flat`` up to 20,000 vectors, ``hnsw`` up to 200,000, ``ivfpq`` beyond
=========  ============================================  ===============================

Why these cut-offs (benchmarks/index.py, 2 shared CPU cores, one query on one thread): exact
search costs ~6 ms of CPU per query at 100K vectors (~60 ms at 1M); HNSW and IVF-PQ both reach
recall@10 >= 0.998 at 100K well under 1 ms of CPU; at 1M, IVF-PQ keeps recall@10 0.9999 at
~1 ms and builds in 83 s, while HNSW with these parameters drops to 0.85 and builds in 275 s.
HNSW stays the choice for mid-size KBs: it needs no training and takes additions gracefully.

Every index holds the chunks' int64 ids (``IDMap2``). Vectors are always added in ascending id
order, and HNSW graphs under 50,000 vectors are built on one thread, so rebuilding from the
same vectors gives the same index: "add, then remove" restores the previous search results.
Jobs under 50,000 vectors run on one OpenMP thread (deterministic, and immune to OpenMP
spin-wait slowdowns on a busy machine); bigger ones use every core.

The file on disk is always the CPU index (``faiss.serialize_index``). With ``faiss-gpu`` and a
visible GPU (and ``CTXMEM_FAISS_GPU`` not ``0``), IVF training runs its k-means on the GPU and
flat indexes over 100,000 vectors are searched on a GPU copy; nothing else changes.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import numpy as np

from .errors import BadInputError

INDEX_TYPES = ("auto", "flat", "hnsw", "ivfpq")
AUTO_FLAT_MAX = 20_000
AUTO_HNSW_MAX = 200_000
IVFPQ_MIN = 1024  # fewer vectors cannot train 256 PQ centroids per sub-space; flat is used instead
_SMALL_JOB = 50_000
_GPU_FLAT_MIN = 100_000
_omp_lock = threading.Lock()


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    if os.environ.get("CTXMEM_FAISS_GPU", "1") == "0":
        return False
    faiss = _faiss()
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


@contextmanager
def omp_threads(n: int | None):
    """Run FAISS with ``n`` OpenMP threads (one query is fastest on one thread: no spin-waits)."""
    if n is None:
        yield
        return
    faiss = _faiss()
    with _omp_lock:
        old = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(max(1, int(n)))
        try:
            yield
        finally:
            faiss.omp_set_num_threads(old)


def choose_type(requested: str, n: int) -> str:
    if requested not in INDEX_TYPES:
        raise BadInputError(f"unknown index type {requested!r}; choose one of {', '.join(INDEX_TYPES)}")
    if requested == "auto":
        return "flat" if n <= AUTO_FLAT_MAX else "hnsw" if n <= AUTO_HNSW_MAX else "ivfpq"
    if requested == "ivfpq" and n < IVFPQ_MIN:
        return "flat"
    return requested


def _pq_m(dim: int) -> int:
    if dim % 8 == 0:
        return dim // 8
    for m in range(dim // 4, 0, -1):
        if dim % m == 0:
            return m
    return 1


def default_params(kind: str, n: int, dim: int) -> dict:
    if kind == "flat":
        return {"factory": "IDMap2,Flat"}
    if kind == "hnsw":
        return {"factory": "IDMap2,HNSW32", "efConstruction": 40, "efSearch": 128}
    if kind == "ivfpq":
        nlist = 1 << int(round(np.log2(max(16.0, 2.0 * np.sqrt(max(n, 1))))))
        nlist = int(min(65536, max(16, nlist), max(16, n // 40)))
        # "np": no polysemous training (slow, and unused: candidates are re-ranked exactly)
        return {"factory": f"IDMap2,IVF{nlist},PQ{_pq_m(dim)}x8np,RFlat", "nlist": nlist, "nprobe": 32,
                "k_factor": 16, "train_size": int(min(n, 40 * nlist))}
    raise BadInputError(f"unknown index type {kind!r}")


def apply_search_params(index, kind: str, params: dict) -> None:
    faiss = _faiss()
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = int(params.get("efSearch", 64))
    elif kind == "ivfpq":
        inner = faiss.downcast_index(index.index)
        inner.k_factor = float(params.get("k_factor", 8))
        faiss.extract_index_ivf(index).nprobe = int(params.get("nprobe", 32))


def _threads(n: int):
    """One OpenMP thread for small jobs: as fast, deterministic, and immune to the spin-wait
    slowdowns OpenMP suffers on an oversubscribed machine (seconds instead of milliseconds)."""
    return 1 if n < _SMALL_JOB else None


def _sorted(vectors: np.ndarray, ids: np.ndarray):
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    return np.ascontiguousarray(vectors[order], dtype=np.float32), ids[order]


def training_rows(kind: str, n: int, params: dict) -> np.ndarray | None:
    """Which of ``n`` id-sorted vectors train an index of ``kind`` (``None``: no training).

    A fixed seed, so any engine that trains on these rows gets the same quantizers."""
    if kind != "ivfpq":
        return None
    n_train = int(params.get("train_size", n))
    if n_train >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))


def new_index(kind: str, dim: int, params: dict, train: np.ndarray | None = None):
    """An empty index of ``kind``, trained on ``train`` when the type needs training."""
    faiss = _faiss()
    index = faiss.index_factory(dim, params["factory"], faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efConstruction = int(params.get("efConstruction", 40))
    if kind == "ivfpq":
        train = np.ascontiguousarray(train, dtype=np.float32)
        ivf = faiss.extract_index_ivf(index)
        if gpu_available():
            try:
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))
            except Exception:
                pass
        with omp_threads(_threads(len(train))):
            index.train(train)
        ivf.clustering_index = None
    return index


def create(kind: str, vectors: np.ndarray, ids: np.ndarray, params: dict):
    """A new index of ``kind`` holding ``vectors`` (n, d) under ``ids``; trained if needed."""
    vectors, ids = _sorted(vectors, ids)
    rows = training_rows(kind, len(vectors), params)
    index = new_index(kind, vectors.shape[1], params, None if rows is None else vectors[rows])
    add(index, kind, vectors, ids, presorted=True)
    apply_search_params(index, kind, params)
    return index


MERGEABLE = ("flat", "ivfpq")


def merge_into(dst, src, kind: str) -> None:
    """Append every vector of ``src`` to ``dst`` (same type and trained quantizers); empties ``src``.

    Merging shards built over consecutive id ranges, in order, gives exactly the index one
    process would have built (same inverted lists, same bytes). HNSW graphs cannot be merged.
    """
    faiss = _faiss()
    if kind == "flat":
        dst.merge_from(src)
        return
    if kind != "ivfpq":
        raise BadInputError(f"{kind} indexes cannot be merged; build them in one piece")
    # IDMap2 -> IndexRefineFlat -> (IVFPQ base, Flat refine). faiss has no merge for the
    # refine wrapper, so merge its two parts and the id map by hand.
    d_map, s_map = faiss.downcast_index(dst), faiss.downcast_index(src)
    d_ref, s_ref = faiss.downcast_index(d_map.index), faiss.downcast_index(s_map.index)
    offset = d_ref.ntotal  # src's internal sequence numbers continue after dst's
    faiss.downcast_index(d_ref.base_index).merge_from(faiss.downcast_index(s_ref.base_index), offset)
    faiss.downcast_index(d_ref.refine_index).merge_from(faiss.downcast_index(s_ref.refine_index), 0)
    d_ref.ntotal = d_ref.base_index.ntotal
    ids = np.concatenate([faiss.vector_to_array(d_map.id_map), faiss.vector_to_array(s_map.id_map)])
    faiss.copy_array_to_vector(ids.astype(np.int64), d_map.id_map)
    d_map.ntotal = d_ref.ntotal
    d_map.construct_rev_map()
    s_map.id_map.clear()
    s_map.ntotal = s_ref.ntotal = 0


def add(index, kind: str, vectors: np.ndarray, ids: np.ndarray, presorted: bool = False) -> None:
    if len(ids) == 0:
        return
    if not presorted:
        vectors, ids = _sorted(vectors, ids)
    with omp_threads(_threads(index.ntotal + len(ids))):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))


def index_ids(index) -> np.ndarray:
    return _faiss().vector_to_array(index.id_map).astype(np.int64)


def remove(index, kind: str, ids: np.ndarray, live_vectors=None, live_ids=None, params=None):
    """Remove ``ids``; returns the index to use from now on (a rebuilt one for hnsw/ivfpq).

    ``live_vectors``/``live_ids`` (every vector that stays) are needed for hnsw and ivfpq.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return index
    if kind == "flat":
        with omp_threads(_threads(index.ntotal)):
            index.remove_ids(ids)
        return index
    if kind == "ivfpq":
        index.reset()  # IDMap2 + refine + IVF lists emptied; the trained quantizers stay
        add(index, kind, live_vectors, live_ids)
        return index
    return create(kind, live_vectors, live_ids, params)


def serialize(index) -> bytes:
    return _faiss().serialize_index(index).tobytes()


def deserialize(data: bytes):
    return _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))


class Searcher:
    """Searches an index; holds a GPU copy of large flat indexes when a GPU is there."""

    def __init__(self, index, kind: str):
        self.index, self.kind = index, kind
        self._gpu = None
        if kind == "flat" and index.ntotal >= _GPU_FLAT_MIN and gpu_available():
            try:
                faiss = _faiss()
                self._res = faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._res, 0, index)
            except Exception:
                self._gpu = None

    def search(self, q: np.ndarray, k: int):
        index = self._gpu if self._gpu is not None else self.index
        k = int(min(k, max(self.index.ntotal, 1)))
        q = np.ascontiguousarray(q, dtype=np.float32)
        with omp_threads(1 if len(q) < 8 and self._gpu is None else None):
            return index.search(q, k)

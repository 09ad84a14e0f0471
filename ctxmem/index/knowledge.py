"""``KnowledgeIndex``: a persistent FAISS + BM25 index over chunks of a corpus, with provenance.

>>> kb = KnowledgeIndex.build(["docs/", "notes.txt"], "kb/")          # doctest: +SKIP
>>> KnowledgeIndex.open("kb/").search("a question", k=5)               # doctest: +SKIP
[Hit(text='...', score=0.71, source='/abs/docs/a.md', start=1200, end=1890), ...]

``search`` fuses two rankings by default (``mode="hybrid"``): the FAISS index over the chunk
embeddings and a BM25 index over their words (:mod:`ctxmem.index.lexical`), by reciprocal rank
fusion, with chunks that hold the query's words verbatim first. ``Hit.score`` is, by mode:
``dense``, the cosine similarity of the query and the chunk (inner product of normalised
embeddings); ``lexical``, the chunk's BM25 score; ``hybrid``, the fused score ``sum 1 / (60 +
rank)``, plus 1.0 for a chunk that holds the query verbatim (:func:`ctxmem.index.lexical.fuse`).
``text == read_source_text(source)[start:end]``. The on-disk layout, the commit and resume rules
are in :mod:`ctxmem.index.builder`; input policy in :mod:`ctxmem.index.sources`.
"""
from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import ann, embed, lexical
from .builder import (Ingestor, Session, check_writable_state, live_ids, live_parts, load_index, load_lexical,
                      load_segment_terms, load_vectors, make_chunker, new_manifest, open_store)
from .chunking import Chunker
from .errors import (BadInputError, EmbedderMismatchError, IndexCorruptError, IndexIncompleteError,
                     KnowledgeIndexError)
from .manifest import MANIFEST, VERSION, read_manifest, sha256_file
from .sources import DEFAULT_MAX_FILE_BYTES, STDIN_NAME, discover

_MAX_OPEN_STORES = 64


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk: its text, score (see the module docstring), and where it lies in its source."""
    text: str
    score: float
    source: str
    start: int
    end: int

    def to_dict(self) -> dict:
        return asdict(self)


def _check_sizes(path: Path, m: dict) -> None:
    for fname, meta in m["files"].items():
        p = path / fname
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise IndexCorruptError(p, "missing") from None
        if size != meta["size"]:
            raise IndexCorruptError(p, f"size {size} bytes, manifest says {meta['size']}"
                                   + (" (truncated)" if size < meta["size"] else ""))


class KnowledgeIndex:
    """A knowledge base folder opened for search (and for ``add``/``remove``)."""

    def __init__(self, path, manifest: dict, embedder=None):
        self.path = Path(path)
        self._emb_spec = embedder
        self._emb = None
        self.last_summary: dict | None = None
        self._load(manifest)

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path, embedder=None) -> "KnowledgeIndex":
        """Open a KB folder. Checks the manifest (version, checksum), every file's size and the
        FAISS index's checksum; chunk records are checked (crc32) as they are read, and
        :meth:`verify` checks everything. ``embedder`` (name or object) overrides the recorded
        one and must match it; by default the recorded embedder is loaded at the first search.
        """
        path = Path(path)
        if not path.is_dir():
            raise BadInputError(f"no KB at {path} (not a folder)")
        m = read_manifest(path)
        if m["state"] != "ready":
            op = m.get("op", "build")
            how = "KnowledgeIndex.add_to / `ctxmem index add`" if op == "add" else \
                "KnowledgeIndex.build / `ctxmem index build`"
            raise IndexIncompleteError(f"the last {op} into {path} did not finish (killed?); run the same {op} "
                                       f"again ({how}) to resume it")
        kb = cls(path, m, embedder)
        if embedder is not None:
            _ = kb.embedder  # check it now
        return kb

    def _load(self, m: dict) -> None:
        _check_sizes(self.path, m)
        if m.get("index") is None:
            raise IndexCorruptError(self.path / MANIFEST, "ready KB without an index")
        self._m = m
        self._index = load_index(self.path, m)
        self._searcher = ann.Searcher(self._index, m["index"]["type"])
        parts = sorted(live_parts(m), key=lambda p: p[1])
        keys = {id(p): k for k, e in m["sources"].items() for p in e["parts"]}
        self._parts = parts
        self._part_keys = [keys[id(p)] for p in parts]
        self._id0s = np.array([p[1] for p in parts], dtype=np.int64)
        self._stores: OrderedDict = OrderedDict()
        self._lex = None
        self._warned_no_lexical = False

    @property
    def has_lexical(self) -> bool:
        """Whether this KB holds a BM25 index (KBs written before it existed do not; see :meth:`upgrade`)."""
        return self._m.get("lexical") is not None

    def _lexical(self) -> "lexical.LexicalSearcher":
        if self._lex is None:
            self._lex = lexical.LexicalSearcher(load_lexical(self.path, self._m))
        return self._lex

    def close(self) -> None:
        for s in self._stores.values():
            s.close()
        self._stores.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return int(self._m["index"]["count"])

    def __repr__(self) -> str:
        return (f"KnowledgeIndex({str(self.path)!r}, chunks={len(self)}, sources={len(self._m['sources'])}, "
                f"index={self._m['index']['type']!r}, embedder={self._m['embedder']['name']!r})")

    @property
    def embedder(self):
        """The embedder used for queries (loaded on first use, checked against the KB's)."""
        if self._emb is None:
            spec = self._emb_spec if self._emb_spec is not None else self._m["embedder"]["name"]
            emb = embed.load(spec)
            embed.check_same(emb, self._m["embedder"], f"KB {self.path}")
            self._emb = emb
        return self._emb

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def build(cls, sources, out_dir, embedder="minilm", index: str = "auto", chunk_tokens: int = 128,
              overlap: int = 16, include=None, exclude=None, progress: bool = True, *,
              text_field: str = "text", batch_size: int = 32, commit_every: int = 65536,
              commit_seconds: float = 30.0, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
              max_chars: int | None = None, engine: str = "local", address: str | None = None,
              workers: int | None = None, cpus_per_worker: float = 1.0,
              gpus_per_worker: float = 0.0) -> "KnowledgeIndex":
        """Build (or resume, or bring up to date) the KB at ``out_dir`` from ``sources``.

        ``sources``: files, folders (recursive, filtered by ``include``/``exclude`` globs), JSONL
        files (``text_field``) and ``"-"`` for standard input. The KB ends up holding exactly
        the given sources: unchanged ones are reused without embedding, changed ones
        re-embedded, ones no longer given dropped. ``index``: ``auto``, ``flat``, ``hnsw`` or
        ``ivfpq``. The run's summary (skipped sources with reasons, decoding notes, counts,
        rates) is in the returned object's ``last_summary``.

        ``engine="ray"`` runs reading, chunking, embedding and IVF index shards on a Ray cluster
        (see :mod:`ctxmem.index.ray_engine`; ``pip install 'ctxmem[distributed]'``): the one
        at ``address``, or a local one started for the build. ``workers`` embedder actors of
        ``cpus_per_worker`` CPUs / ``gpus_per_worker`` GPUs each. Same KB, same resume rules.
        """
        t0 = time.perf_counter()
        ann.choose_type(index, 0)  # validates the name
        if engine not in ("local", "ray"):
            raise BadInputError(f"unknown engine {engine!r}; choose local or ray")
        if engine == "local" and (address is not None or workers is not None):
            raise BadInputError("address and workers are options of engine='ray'")
        eng = None
        if engine == "ray":  # fails early, before any folder is made, when Ray is missing
            from .ray_engine import RayEngine

            eng = RayEngine(address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                            gpus_per_worker=gpus_per_worker)
        try:
            return cls._build(sources, out_dir, embedder, index, chunk_tokens, overlap, include, exclude, progress,
                              text_field, batch_size, commit_every, commit_seconds, max_file_bytes, max_chars, eng, t0)
        finally:
            if eng is not None:
                eng.close()

    @classmethod
    def _build(cls, sources, out_dir, embedder, index, chunk_tokens, overlap, include, exclude, progress,
               text_field, batch_size, commit_every, commit_seconds, max_file_bytes, max_chars, eng, t0):
        emb = embed.load(embedder)
        chunker = make_chunker(emb, chunk_tokens, overlap, max_chars)
        out_dir = Path(out_dir)
        with Session(out_dir, create_ok=True) as sess:
            sess.progress = progress
            if sess.m is None:
                sess.m = new_manifest(embed.describe(emb), chunker, text_field, index)
            else:
                m = sess.m
                embed.check_same(emb, m["embedder"], f"KB {out_dir}")
                want = {"chunk_tokens": chunker.chunk_tokens, "overlap": chunker.overlap,
                        "max_chars": chunker.max_chars}
                have = {k: m["chunking"][k] for k in want}
                if want != have or m["text_field"] != text_field:
                    raise BadInputError(
                        f"KB {out_dir} was built with {have} and text_field={m['text_field']!r}; pass the same "
                        "settings to update it, or build into a new folder")
                m["index_requested"] = index
            specs, skipped = discover(sources, include, exclude, skip_dirs=[out_dir])
            ing = Ingestor(sess, emb, chunker, mode="build", text_field=text_field, progress=progress,
                           batch_size=batch_size, commit_every=commit_every, commit_seconds=commit_seconds,
                           max_file_bytes=max_file_bytes)
            if eng is not None:
                eng.start()
                ing.run(specs, skipped, feed=eng.feed(embedder))
            else:
                ing.run(specs, skipped)
            if not live_ids(sess.m).size:
                reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in ing.skipped[:5]) or "no sources found"
                raise BadInputError(f"nothing to index ({reasons})")
            sess.finalize(index, create=eng.create_index if eng is not None else None)
            summary = ing.summary()
            summary["engine"] = "ray" if eng is not None else "local"
            if eng is not None:
                summary["ray"] = dict(eng.stats)
        kb = cls(out_dir, read_manifest(out_dir), emb)
        kb._emb = emb
        summary.update(kb=str(out_dir), index_type=kb._m["index"]["type"], seconds=round(time.perf_counter() - t0, 3))
        summary["chunks_per_second"] = round(summary["chunks_embedded"] / max(summary["seconds"], 1e-9), 3)
        kb.last_summary = summary
        return kb

    @classmethod
    def add_to(cls, path, sources, embedder=None, include=None, exclude=None, progress: bool = False, *,
               batch_size: int = 32, commit_every: int = 65536, commit_seconds: float = 30.0,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> "KnowledgeIndex":
        """Add sources to the KB at ``path`` (new ones embedded, changed ones re-embedded, the
        rest kept) and return it opened; also resumes an interrupted ``add``. The run's summary
        is in ``last_summary``. ``embedder`` defaults to the KB's own and must match it.
        """
        t0 = time.perf_counter()
        path = Path(path)
        if not path.is_dir():
            raise BadInputError(f"no KB at {path} (not a folder)")
        m = read_manifest(path)
        emb = embed.load(embedder if embedder is not None else m["embedder"]["name"])
        embed.check_same(emb, m["embedder"], f"KB {path}")
        with Session(path, create_ok=False) as sess:
            m = sess.m
            sess.progress = progress
            check_writable_state(m, "add", path)
            ch = m["chunking"]
            chunker = Chunker(embed.tokenizer_of(emb), chunk_tokens=ch["chunk_tokens"], overlap=ch["overlap"],
                              max_chars=ch["max_chars"])
            specs, skipped = discover(sources, include, exclude, skip_dirs=[path])
            ing = Ingestor(sess, emb, chunker, mode="add", text_field=m["text_field"], progress=progress,
                           batch_size=batch_size, commit_every=commit_every, commit_seconds=commit_seconds,
                           max_file_bytes=max_file_bytes)
            ing.run(specs, skipped)
            requested = (m.get("index") or {}).get("requested") or m.get("index_requested", "auto")
            sess.finalize(requested)
            summary = ing.summary()
        kb = cls(path, read_manifest(path), emb)
        kb._emb = emb
        summary.update(kb=str(path), index_type=kb._m["index"]["type"], seconds=round(time.perf_counter() - t0, 3))
        kb.last_summary = summary
        return kb

    def add(self, sources, include=None, exclude=None, progress: bool = False, **kw) -> dict:
        """Add sources to this KB (see :meth:`add_to`); returns the run's summary."""
        kb = type(self).add_to(self.path, sources, embedder=self.embedder, include=include, exclude=exclude,
                               progress=progress, **kw)
        self.close()
        self._load(kb._m)
        self.last_summary = kb.last_summary
        return kb.last_summary

    def remove(self, source) -> int:
        """Remove a source (a file path, every source under a folder path, or ``-`` for stdin).

        Returns the number of chunks removed; raises :class:`BadInputError` if none matches.
        """
        with Session(self.path, create_ok=False) as sess:
            m = sess.m
            check_writable_state(m, "remove", self.path)
            keys = _matching_sources(m, source)
            if not keys:
                raise BadInputError(f"no source {source!r} in KB {self.path} (see `ctxmem index info --json`)")
            n = sess.drop_sources(keys)
            sess.finalize((m.get("index") or {}).get("requested", "auto"))
        self.close()
        self._load(read_manifest(self.path))
        return n

    @classmethod
    def upgrade(cls, path, progress: bool = False) -> dict:
        """Bring a KB written by an older ctxmem up to this one's layout, without re-embedding:
        adds the lexical (BM25) index from the stored chunk texts. Does nothing to a current KB.
        Returns ``{"path", "changed", "chunks", "lexical"}``."""
        path = Path(path)
        if not path.is_dir():
            raise BadInputError(f"no KB at {path} (not a folder)")
        with Session(path, create_ok=False) as sess:
            m = sess.m
            sess.progress = progress
            check_writable_state(m, "upgrade", path)
            changed = sess.finalize((m.get("index") or {}).get("requested", "auto"))
            m = sess.m
        return {"path": str(path), "changed": bool(changed), "chunks": int(m["index"]["count"]),
                "lexical": m.get("lexical")}

    # -- searching -----------------------------------------------------------------------------

    def search(self, text: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The ``k`` best chunks for ``text``, best first.

        ``mode``: ``hybrid`` (default: dense and BM25 rankings fused by reciprocal rank),
        ``dense`` (embedding similarity only) or ``lexical`` (BM25 only; loads no embedder).
        On a KB without a lexical index (see :meth:`upgrade`) ``hybrid`` searches ``dense``
        and warns once; ``lexical`` raises :class:`BadInputError`.
        """
        if not isinstance(text, str):
            raise TypeError("search() takes a string; use search_vectors() for embeddings")
        return self.search_many([text], k, mode=mode)[0]

    def _mode(self, mode: str) -> str:
        if mode not in lexical.MODES:
            raise BadInputError(f"unknown search mode {mode!r}; choose one of {', '.join(lexical.MODES)}")
        if mode != "dense" and not self.has_lexical:
            if mode == "lexical":
                raise BadInputError(f"KB {self.path} has no lexical index (written by an older ctxmem); add it "
                                    f"with `ctxmem index upgrade {self.path}` (no re-embedding)")
            if not self._warned_no_lexical:
                self._warned_no_lexical = True
                warnings.warn(f"KB {self.path} has no lexical index (written by an older ctxmem): searching dense "
                              f"only; `ctxmem index upgrade {self.path}` adds it without re-embedding", stacklevel=3)
            return "dense"
        return mode

    def search_many(self, texts: list[str], k: int = 5, mode: str = "hybrid") -> list[list[Hit]]:
        mode = self._mode(mode)
        if k <= 0 or not texts:
            return [[] for _ in texts]
        if mode == "dense":
            return self.search_vectors(self._embed(texts), k)
        if len(self) == 0:
            return [[] for _ in texts]
        return [[self._hit(int(i), float(s)) for i, s in zip(*r)] for r in self.rank_many(texts, k, mode)]

    def _embed(self, texts) -> np.ndarray:
        threads = embed.query_threads() if len(texts) <= 8 else None
        return embed.encode(self.embedder, list(texts), threads=threads)

    def rank_many(self, texts: list[str], k: int = 5, mode: str = "hybrid", q: np.ndarray | None = None):
        """``[(chunk ids, scores)]`` per text, best first, without reading the chunks (benchmarks,
        rerankers). ``q``: the texts' embeddings when already computed."""
        mode = self._mode(mode)
        out = []
        depth = max(k, lexical.FUSION_DEPTH) if mode == "hybrid" else k
        if mode != "lexical":
            q = self._embed(texts) if q is None else np.atleast_2d(np.asarray(q, dtype=np.float32))
            D, I = self._searcher.search(q, depth) if len(self) else (np.zeros((len(texts), 0)),) * 2
        for j, text in enumerate(texts):
            if mode == "dense":
                keep = I[j] >= 0
                out.append((I[j][keep].astype(np.int64), D[j][keep]))
                continue
            lid, lsc = self._lexical().search(text, depth)
            if mode == "lexical":
                out.append((lid, lsc))
                continue
            dids = I[j][I[j] >= 0].astype(np.int64)
            out.append(lexical.fuse(dids, lid, k, text, self._text))
        return out

    def search_vectors(self, q: np.ndarray, k: int = 5) -> list[list[Hit]]:
        """Search with query embeddings (n, dim) made by the KB's embedder."""
        q = np.atleast_2d(np.asarray(q, dtype=np.float32))
        dim = self._m["embedder"]["dim"]
        if q.shape[1] != dim:
            raise EmbedderMismatchError(f"query vectors have dim {q.shape[1]}; KB {self.path} has dim {dim} "
                                        f"(embedder {self._m['embedder']['name']!r})")
        if k <= 0 or len(self) == 0:
            return [[] for _ in range(len(q))]
        D, I = self._searcher.search(q, k)
        return [[self._hit(int(i), float(d)) for d, i in zip(Dr, Ir) if i >= 0] for Dr, Ir in zip(D, I)]

    def _store(self, seg: str):
        s = self._stores.get(seg)
        if s is None:
            try:
                s = open_store(self.path, self._m, seg)
            except IndexCorruptError as e:
                if "missing" in e.problem:
                    raise KnowledgeIndexError(f"{e.path} is gone: the KB was changed by another process; "
                                              "open it again") from None
                raise
            self._stores[seg] = s
            if len(self._stores) > _MAX_OPEN_STORES:
                self._stores.popitem(last=False)[1].close()
        else:
            self._stores.move_to_end(seg)
        return s

    def _locate(self, cid: int):
        p = int(np.searchsorted(self._id0s, cid, side="right")) - 1
        if p < 0 or cid >= self._parts[p][1] + self._parts[p][2]:
            raise IndexCorruptError(self.path / self._m["index"]["file"], f"index returned unknown chunk id {cid}")
        part = self._parts[p]
        return part, self._part_keys[p], part[3] + cid - part[1]

    def _hit(self, cid: int, score: float) -> Hit:
        part, _key, row = self._locate(cid)
        store = self._store(part[0])
        if int(store.ids[row]) != cid:
            raise IndexCorruptError(store.path, f"row {row} holds chunk {int(store.ids[row])}, expected {cid}")
        r = store.record(row)
        return Hit(r["text"], score, r["source"], r["start"], r["end"])

    def _text(self, cid: int) -> str:
        return self._hit(cid, 0.0).text

    def get(self, cid: int) -> Hit:
        """The chunk with id ``cid`` (score 1.0)."""
        return self._hit(int(cid), 1.0)

    def iter_chunks(self):
        """Every chunk as ``(id, Hit)`` in id order (score 1.0)."""
        for cid in live_ids(self._m):
            yield int(cid), self._hit(int(cid), 1.0)

    def vectors(self, ids=None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, embeddings)`` of the given chunk ids (default: all), read from the segments."""
        from .builder import gather_vectors

        ids = live_ids(self._m) if ids is None else np.asarray(ids, dtype=np.int64)
        return ids, gather_vectors(self.path, self._m, ids)

    # -- inspecting ----------------------------------------------------------------------------

    def info(self) -> dict:
        return kb_info(self.path, self._m)

    def verify(self) -> dict:
        return verify_kb(self.path)

    @property
    def sources(self) -> list[str]:
        return list(self._m["sources"])


def _matching_sources(m: dict, source) -> list[str]:
    source = os.fspath(source)
    if source in ("-", STDIN_NAME):
        return [STDIN_NAME] if STDIN_NAME in m["sources"] else []
    if source in m["sources"]:
        return [source]
    p = os.path.abspath(source)
    prefix = p.rstrip(os.sep) + os.sep
    return [k for k in m["sources"] if k == p or k.startswith(prefix)]


def kb_info(path, m: dict | None = None) -> dict:
    """Facts about a KB (works on an interrupted build too; loads no model)."""
    path = Path(path)
    if m is None:
        if not path.is_dir():
            raise BadInputError(f"no KB at {path} (not a folder)")
        m = read_manifest(path)
    idx = m.get("index") or {}
    ch = m["chunking"]
    return {
        "path": str(path),
        "state": m["state"],
        "format_version": VERSION,
        "chunks": int(sum(p[2] for p in live_parts(m))),
        "sources": len(m["sources"]),
        "segments": len(m["segments"]),
        "dim": int(m["embedder"]["dim"]),
        "embedder": m["embedder"]["name"],
        "index_type": idx.get("type"),
        "index_requested": idx.get("requested", m.get("index_requested")),
        "index_params": idx.get("params"),
        "lexical": ({key: m["lexical"][key] for key in ("file", "count", "vocab", "postings", "avgdl", "params")}
                    if m.get("lexical") else None),
        "chunk_tokens": ch["chunk_tokens"],
        "overlap": ch["overlap"],
        "tokenizer": ch["tokenizer"],
        "text_field": m["text_field"],
        "bytes": int(sum(f["size"] for f in m["files"].values())),
        "created_at": m.get("created_at"),
        "updated_at": m.get("updated_at"),
        "ctxmem_version": m.get("ctxmem_version"),
        "source_list": sorted(m["sources"]),
    }


def verify_kb(path) -> dict:
    """Check every byte and every cross-reference of a KB.

    Raises :class:`IndexCorruptError` (naming the file) on any corruption, and
    :class:`IndexIncompleteError` for an interrupted build whose files are intact.
    Returns a report dict when all is well.
    """
    path = Path(path)
    if not path.is_dir():
        raise BadInputError(f"no KB at {path} (not a folder)")
    m = read_manifest(path)
    _check_sizes(path, m)
    for fname, meta in m["files"].items():
        if sha256_file(path / fname) != meta["sha256"]:
            raise IndexCorruptError(path / fname, "checksum mismatch")
    dim = m["embedder"]["dim"]
    owner: dict[str, list] = {}
    for key, ent in m["sources"].items():
        for p in ent["parts"]:
            owner.setdefault(p[0], []).append((key, p))
        if ent["complete"] and sum(p[2] for p in ent["parts"]) != ent["chunks"]:
            raise IndexCorruptError(path / MANIFEST, f"source {key} is marked complete with a wrong chunk count")
    n_chunks = 0
    for seg, meta in m["segments"].items():
        if seg + ".lex" in m["files"]:
            load_segment_terms(path, m, seg)
        vecs = load_vectors(path, m, seg)
        if not np.isfinite(vecs).all():
            raise IndexCorruptError(path / (seg + ".npy"), "non-finite embeddings")
        store = open_store(path, m, seg)
        try:
            expected = np.full(store.n, -1, dtype=np.int64)
            keys = [None] * store.n
            for key, p in owner.get(seg, []):
                if p[3] < 0 or p[3] + p[2] > store.n or (expected[p[3]:p[3] + p[2]] != -1).any():
                    raise IndexCorruptError(path / MANIFEST, f"chunk ranges of segment {seg} overlap or overflow")
                expected[p[3]:p[3] + p[2]] = np.arange(p[1], p[1] + p[2])
                keys[p[3]:p[3] + p[2]] = [key] * p[2]
            if (expected == -1).any():
                raise IndexCorruptError(path / MANIFEST, f"segment {seg} has rows no source owns")
            if not np.array_equal(store.ids, expected):
                raise IndexCorruptError(store.path, "chunk ids disagree with the manifest")
            for i in range(store.n):
                r = store.record(i)
                k = keys[i]
                if not (r["source"] == k or r["source"].startswith(k + "#L")) or not 0 <= r["start"] <= r["end"]:
                    raise IndexCorruptError(store.path, f"record {i} does not belong to source {k}")
        finally:
            store.close()
        n_chunks += meta["chunks"]
    ids = live_ids(m)
    if len(np.unique(ids)) != len(ids):
        raise IndexCorruptError(path / MANIFEST, "duplicate chunk ids")
    if m["state"] != "ready":
        raise IndexIncompleteError(f"{path}: files intact, but the last {m.get('op', 'build')} did not finish; "
                                   "run it again to resume")
    index = load_index(path, m)
    if index.d != dim:
        raise IndexCorruptError(path / m["index"]["file"], f"index dim {index.d}, embedder dim {dim}")
    if not np.array_equal(np.sort(ann.index_ids(index)), ids):
        raise IndexCorruptError(path / m["index"]["file"], "index ids disagree with the chunk store")
    if m.get("lexical") is not None:
        lex = load_lexical(path, m)
        if not np.array_equal(lex.ids, ids):
            raise IndexCorruptError(path / m["lexical"]["file"], "lexical index ids disagree with the chunk store")
    return {"ok": True, "path": str(path), "files": len(m["files"]) + 1, "chunks": int(n_chunks),
            "sources": len(m["sources"]), "bytes": int(sum(f["size"] for f in m["files"].values())),
            "lexical": m.get("lexical") is not None}

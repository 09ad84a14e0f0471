"""The write side of a KB: build, add, remove - durable, resumable, crash-consistent.

A KB folder holds::

    manifest.msgpack        versioned, checksummed; names every other file with its sha256
    seg-NNNNNN.chunks       chunk store of one segment (see store.py)
    seg-NNNNNN.npy          that segment's embeddings, float32 (n, dim), normalised
    seg-NNNNNN.lex          that segment's term counts per chunk (see lexical.py)
    index-NNNNNN.faiss      the FAISS index over every chunk (see ann.py)
    lexical-NNNNNN.bm25     the BM25 index over every chunk (see lexical.py)
    .lock                   held (flock) by the one process writing the KB

How a build commits (the resume contract)
    Sources are read in a fixed order and chunked; chunks are embedded in groups, and each
    group is committed: its segment (chunk store + embeddings) is written under a fresh name
    (temp file, fsync, rename) and then the manifest, which records for every source its
    content hash and the chunk-id ranges committed so far. A group holds whole sources or the
    next contiguous run of a large source's chunks. Groups are sized to commit about every
    ``commit_seconds`` (default 30 s) and at most every ``commit_every`` chunks.

    A rerun with the same arguments reads the manifest and skips every source whose content
    hash is committed in full, continues a partly committed source at its next chunk
    (chunking is deterministic), re-embeds a source whose hash changed (its old chunks are
    dropped), and drops sources no longer given. The FAISS index is brought in line with the
    committed chunks at the end (added to, or rebuilt for types that cannot remove), and so is
    the BM25 index (rebuilt from the segments' term counts: its idf is corpus-wide). So a
    build killed at any moment loses at most the group in flight, and the rerun ends with
    exactly the chunks of a clean build. Files that no committed manifest names (left by a
    kill) are deleted at the start of the next write. A rerun on an unchanged corpus embeds
    nothing and writes nothing.

    While a build or add is in progress the manifest's state is ``building`` and
    :meth:`KnowledgeIndex.open` refuses the KB (``IndexIncompleteError``); ``info`` and
    ``verify`` still work. ``remove`` rewrites the affected segments without re-embedding
    and commits once.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import re
import time
from pathlib import Path

import numpy as np

from .._atomic import atomic_write_bytes
from . import ann, embed, lexical
from .chunking import Chunker
from .errors import BadInputError, IndexCorruptError, IndexIncompleteError, KnowledgeIndexError
from .manifest import MANIFEST, read_manifest, sha256_bytes, write_manifest
from .sources import DEFAULT_MAX_FILE_BYTES, SkipSource, decode_source, read_bytes
from .store import ChunkStoreReader, encode_store

SEG_FILE_RE = re.compile(r"^seg-\d{6,}\.(chunks|npy|lex)$")
INDEX_FILE_RE = re.compile(r"^(index-\d{6,}\.faiss|lexical-\d{6,}\.bm25)$")
TMP_FILE_RE = re.compile(r"^\..+\.tmp$")
LOCK_NAME = ".lock"


def _ours(name: str) -> bool:
    return bool(name in (MANIFEST, LOCK_NAME) or SEG_FILE_RE.match(name) or INDEX_FILE_RE.match(name)
                or TMP_FILE_RE.match(name))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- reading helpers

def read_checked(kb_dir: Path, m: dict, fname: str) -> bytes:
    """A KB file's bytes after checking its size and sha256 against the manifest."""
    path = kb_dir / fname
    meta = m["files"].get(fname)
    if meta is None:
        raise IndexCorruptError(path, "not listed in the manifest")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IndexCorruptError(path, "missing") from None
    except OSError as e:
        raise IndexCorruptError(path, f"unreadable: {e.strerror or e}") from None
    if len(data) != meta["size"]:
        raise IndexCorruptError(path, f"size {len(data)} bytes, manifest says {meta['size']}"
                                   + (" (truncated)" if len(data) < meta["size"] else ""))
    if sha256_bytes(data) != meta["sha256"]:
        raise IndexCorruptError(path, "checksum mismatch")
    return data


def load_vectors(kb_dir: Path, m: dict, seg: str) -> np.ndarray:
    fname = seg + ".npy"
    data = read_checked(kb_dir, m, fname)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise IndexCorruptError(kb_dir / fname, f"not a valid .npy array ({e})") from None
    want = (m["segments"][seg]["chunks"], m["embedder"]["dim"])
    if arr.dtype != np.float32 or arr.shape != want:
        raise IndexCorruptError(kb_dir / fname, f"array {arr.dtype}{arr.shape}, expected float32{want}")
    return arr


def open_store(kb_dir: Path, m: dict, seg: str, checksum: bool = False) -> ChunkStoreReader:
    fname = seg + ".chunks"
    if checksum:
        read_checked(kb_dir, m, fname)
    r = ChunkStoreReader(kb_dir / fname)
    if r.n != m["segments"][seg]["chunks"]:
        raise IndexCorruptError(kb_dir / fname, f"holds {r.n} chunks, manifest says {m['segments'][seg]['chunks']}")
    return r


def load_index(kb_dir: Path, m: dict):
    meta = m["index"]
    data = read_checked(kb_dir, m, meta["file"])
    try:
        index = ann.deserialize(data)
    except Exception as e:
        raise IndexCorruptError(kb_dir / meta["file"], f"not a valid FAISS index ({e})") from None
    ann.apply_search_params(index, meta["type"], meta["params"])
    return index


def load_lexical(kb_dir: Path, m: dict) -> "lexical.Bm25Arrays":
    """The KB's BM25 index, checked (sha256, structure, and its chunk ids against the manifest's)."""
    meta = m["lexical"]
    path = kb_dir / meta["file"]
    a = lexical.decode_index(read_checked(kb_dir, m, meta["file"]), path)
    if len(a.ids) != meta["count"] or lexical.ids_digest(a.ids) != meta["ids_sha256"]:
        raise IndexCorruptError(path, "its chunk ids disagree with the manifest")
    return a


def load_segment_terms(kb_dir: Path, m: dict, seg: str) -> "lexical.SegmentTerms":
    fname = seg + ".lex"
    return lexical.decode_segment(read_checked(kb_dir, m, fname), kb_dir / fname, m["segments"][seg]["chunks"])


def live_parts(m: dict) -> list[list]:
    """Every committed part ``[segment, id0, n, row0]`` of every source."""
    return [p for ent in m["sources"].values() for p in ent["parts"]]


def live_ids(m: dict) -> np.ndarray:
    parts = live_parts(m)
    if not parts:
        return np.zeros(0, np.int64)
    return np.sort(np.concatenate([np.arange(p[1], p[1] + p[2], dtype=np.int64) for p in parts]))


def gather_vectors(kb_dir: Path, m: dict, ids: np.ndarray) -> np.ndarray:
    """Embeddings of chunk ``ids`` (read from the segments, checksums verified)."""
    dim = m["embedder"]["dim"]
    out = np.empty((len(ids), dim), dtype=np.float32)
    if not len(ids):
        return out
    parts = sorted(live_parts(m), key=lambda p: p[1])
    id0s = np.array([p[1] for p in parts], dtype=np.int64)
    pi = np.searchsorted(id0s, ids, side="right") - 1
    by_seg: dict[str, list[int]] = {}
    for j, p in enumerate(pi):
        by_seg.setdefault(parts[p][0], []).append(j)
    for seg, js in by_seg.items():
        vecs = load_vectors(kb_dir, m, seg)
        js = np.array(js)
        rows = np.array([parts[pi[j]][3] + ids[j] - parts[pi[j]][1] for j in js], dtype=np.int64)
        out[js] = vecs[rows]
    return out


# ----------------------------------------------------------------------------- the write session

class Session:
    """One write session on a KB folder: the lock, the manifest in memory, commits and cleanup."""

    def __init__(self, path, create_ok: bool):
        self.dir = Path(path)
        if self.dir.exists() and not self.dir.is_dir():
            raise BadInputError(f"{self.dir} exists and is not a folder")
        self._created = False
        self.commits = 0
        self.progress = False  # a progress bar (stderr) for the lexical upgrade of an old KB
        if not self.dir.exists():
            if not create_ok:
                raise BadInputError(f"no KB at {self.dir}")
            self.dir.mkdir(parents=True)
            self._created = True
        self._lock_fd = None
        self._lock()
        try:
            if (self.dir / MANIFEST).exists():
                self.m = read_manifest(self.dir)
            else:
                others = sorted(n for n in os.listdir(self.dir) if not _ours(n))
                if others:
                    raise BadInputError(f"{self.dir} is not empty and is not a ctxmem KB (it holds {others[0]!r}); "
                                        "choose a new or empty folder")
                if not create_ok:
                    read_manifest(self.dir)  # raises, naming the missing manifest
                self.m = None
            self.gc()
        except BaseException:
            self.close()
            raise

    def _lock(self):
        try:
            import fcntl
        except ImportError:  # not on POSIX: no cross-process lock
            return
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise KnowledgeIndexError(f"{self.dir} is being written by another process "
                                      f"(lock {self.dir / LOCK_NAME}); wait for it to finish") from None
        self._lock_fd = fd

    def close(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
            if self._created and self.commits == 0:  # a folder we made and never committed to
                for name in os.listdir(self.dir):
                    if _ours(name):
                        try:
                            os.unlink(self.dir / name)
                        except OSError:
                            pass
                try:
                    self.dir.rmdir()
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def gc(self):
        """Delete our files that the committed manifest does not name (left by a kill)."""
        keep = set(self.m["files"]) if self.m else set()
        for name in os.listdir(self.dir):
            if name in (MANIFEST, LOCK_NAME) or name in keep or not _ours(name):
                continue
            try:
                os.unlink(self.dir / name)
            except OSError:
                pass

    def new_name(self, prefix: str) -> str:
        self.m["seq"] += 1
        return f"{prefix}-{self.m['seq']:06d}"

    def write_file(self, fname: str, data: bytes) -> None:
        atomic_write_bytes(self.dir / fname, data)
        self.m["files"][fname] = {"sha256": sha256_bytes(data), "size": len(data)}

    def forget_file(self, fname: str) -> None:
        self.m["files"].pop(fname, None)  # deleted from disk by the gc after the next commit

    def write_segment(self, records: list[dict], ids: np.ndarray, vectors: np.ndarray) -> str:
        seg = self.new_name("seg")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(vectors, dtype="<f4"), allow_pickle=False)
        self.write_file(seg + ".npy", buf.getvalue())
        self.write_file(seg + ".chunks", encode_store(records, ids))
        self.write_file(seg + ".lex", lexical.encode_segment(lexical.count_terms([r["text"] for r in records])))
        self.m["segments"][seg] = {"chunks": len(records)}
        return seg

    def commit(self) -> None:
        self.m["updated_at"] = _now()
        write_manifest(self.dir, self.m)
        self.commits += 1
        self.gc()

    # -- editing -------------------------------------------------------------------------------

    def drop_sources(self, keys) -> int:
        """Remove sources (in memory; files rewritten, committed later). Returns chunks dropped."""
        m = self.m
        keys = [k for k in keys if k in m["sources"]]
        if not keys:
            return 0
        affected = {p[0] for k in keys for p in m["sources"][k]["parts"]}
        dropped = sum(p[2] for k in keys for p in m["sources"][k]["parts"])
        for k in keys:
            del m["sources"][k]
        staying: dict[str, list[list]] = {}
        for ent in m["sources"].values():
            for p in ent["parts"]:
                if p[0] in affected:
                    staying.setdefault(p[0], []).append(p)
        for seg in sorted(affected):
            parts = sorted(staying.get(seg, []), key=lambda p: p[3])
            if parts:
                vecs = load_vectors(self.dir, m, seg)
                store = open_store(self.dir, m, seg, checksum=True)
                try:
                    rows = np.concatenate([np.arange(p[3], p[3] + p[2]) for p in parts])
                    records = [store.record(int(r)) for r in rows]
                    ids = store.ids[rows]
                finally:
                    store.close()
                new_seg = self.write_segment(records, ids, vecs[rows])
                row = 0
                for p in parts:
                    p[0], p[3] = new_seg, row
                    row += p[2]
            del m["segments"][seg]
            for ext in (".npy", ".chunks", ".lex"):
                self.forget_file(seg + ext)
        return dropped

    def finalize(self, requested: str, create=None) -> bool:
        """Bring the FAISS and BM25 indexes in line with the committed chunks; mark the KB ready.

        Sources left partly committed (an interrupted run whose sources were not given again)
        are dropped first. Returns False when nothing needed writing. ``create(session, kind,
        ids, params)``, when given, builds a new index instead of :func:`ann.create` (the Ray
        engine builds IVF shards in parallel); it must give the same index.
        """
        m = self.m
        partial = [k for k, e in m["sources"].items() if not e["complete"]]
        self.drop_sources(partial)
        ids = live_ids(m)
        n, dim = len(ids), m["embedder"]["dim"]
        kind = ann.choose_type(requested, n)
        cur = m.get("index")
        index = None
        dense_done = False
        if cur is not None and cur["type"] == kind and cur["file"] in m["files"]:
            index = load_index(self.dir, m)
            params = cur["params"]
            have = ann.index_ids(index)
            to_remove = np.setdiff1d(have, ids)
            to_add = np.setdiff1d(ids, have)
            if not len(to_remove) and not len(to_add):
                dense_done = m["state"] == "ready" and cur.get("requested") == requested
            else:
                if len(to_remove):
                    live = gather_vectors(self.dir, m, ids) if kind != "flat" else None
                    index = ann.remove(index, kind, to_remove, live, ids, params)
                    to_add = np.setdiff1d(ids, ann.index_ids(index))
                if len(to_add):
                    ann.add(index, kind, gather_vectors(self.dir, m, to_add), to_add)
                ann.apply_search_params(index, kind, params)
        if index is None:
            params = ann.default_params(kind, n, dim)
            if create is not None and n:
                index = create(self, kind, ids, params)
            else:
                vecs = gather_vectors(self.dir, m, ids) if n else np.zeros((0, dim), np.float32)
                index = ann.create(kind, vecs, ids, params)
        if not dense_done:
            fname = self.new_name("index") + ".faiss"
            self.write_file(fname, ann.serialize(index))
            if cur is not None:
                self.forget_file(cur["file"])
            m["index"] = {"requested": requested, "type": kind, "params": params, "file": fname, "count": int(n)}
        del index
        lexical_done = not self.finalize_lexical(ids)
        if dense_done and lexical_done:
            return False
        m["state"] = "ready"
        m.pop("op", None)
        self.commit()
        return True

    def finalize_lexical(self, ids: np.ndarray) -> bool:
        """Bring the BM25 index in line with the chunks ``ids`` (in memory; committed by the caller).

        Segments without term counts (written before the lexical index existed) get them from
        their chunk texts first. Returns False when nothing needed writing.
        """
        m = self.m
        missing = [seg for seg in sorted(m["segments"]) if seg + ".lex" not in m["files"]]
        bar = None
        if missing and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(m["segments"][s]["chunks"] for s in missing), unit="chunk",
                       desc="ctxmem index: term counts", dynamic_ncols=True, mininterval=0.5)
        try:
            for seg in missing:
                store = open_store(self.dir, m, seg, checksum=True)
                try:
                    texts = [r["text"] for r in store.records()]
                finally:
                    store.close()
                self.write_file(seg + ".lex", lexical.encode_segment(lexical.count_terms(texts)))
                if bar is not None:
                    bar.update(len(texts))
        finally:
            if bar is not None:
                bar.close()
        cur = m.get("lexical")
        digest = lexical.ids_digest(ids)
        if (cur is not None and cur["file"] in m["files"] and cur["ids_sha256"] == digest
                and cur["tokenizer"] == lexical.TOKENIZER and cur["params"] == lexical.PARAMS):
            return False
        pieces = []
        by_seg: dict[str, list[list]] = {}
        for p in live_parts(m):
            by_seg.setdefault(p[0], []).append(p)
        for seg in sorted(by_seg):
            parts = by_seg[seg]
            rows = np.concatenate([np.arange(p[3], p[3] + p[2], dtype=np.int64) for p in parts])
            pids = np.concatenate([np.arange(p[1], p[1] + p[2], dtype=np.int64) for p in parts])
            pieces.append((load_segment_terms(self.dir, m, seg), rows, pids))
        arrays = lexical.build_arrays(pieces)
        fname = self.new_name("lexical") + ".bm25"
        self.write_file(fname, lexical.encode_index(arrays))
        if cur is not None:
            self.forget_file(cur["file"])
        m["lexical"] = {"file": fname, "count": int(len(arrays.ids)), "ids_sha256": digest,
                        "vocab": len(arrays.vocab), "postings": int(len(arrays.data)), "avgdl": arrays.avgdl,
                        "tokenizer": lexical.TOKENIZER, "params": lexical.PARAMS}
        return True


def new_manifest(desc: dict, chunker: Chunker, text_field: str, requested: str) -> dict:
    from .. import __version__

    return {
        "state": "building", "op": "build", "created_at": _now(), "updated_at": _now(),
        "ctxmem_version": __version__,
        "embedder": desc,
        "chunking": {"chunk_tokens": chunker.chunk_tokens, "overlap": chunker.overlap,
                     "max_chars": chunker.max_chars, "tokenizer": chunker.tokenizer_name},
        "text_field": text_field,
        "index": None, "index_requested": requested,
        "sources": {}, "segments": {}, "files": {}, "seq": 0, "next_id": 0,
        "last_run": {},
    }


# ----------------------------------------------------------------------------- ingestion

class Ingestor:
    """Reads, chunks, embeds and commits sources into a session (see the module docstring)."""

    def __init__(self, sess: Session, emb, chunker: Chunker, *, mode: str, text_field: str = "text",
                 progress: bool = True, batch_size: int = 32, commit_every: int = 65536,
                 commit_seconds: float = 30.0, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        if commit_every < 1:
            raise BadInputError("commit_every must be >= 1")
        self.sess, self.emb, self.chunker, self.mode = sess, emb, chunker, mode
        self.text_field, self.progress, self.batch_size = text_field, progress, int(batch_size)
        self.commit_every, self.commit_seconds = int(commit_every), float(commit_seconds)
        self.max_file_bytes = int(max_file_bytes)
        self.group = min(self.commit_every, 256)
        self.pending: list[tuple[str, dict, float]] = []  # (source key, record, progress weight)
        self.stats = {"sources_indexed": 0, "sources_reused": 0, "sources_removed": 0,
                      "chunks_embedded": 0, "embed_seconds": 0.0}
        self.skipped: list[dict] = []
        self.notes: list[dict] = []
        self.bar = None

    # The run -----------------------------------------------------------------------------------
    def run(self, specs, skipped, feed=None) -> None:
        """Ingest ``specs``. ``feed(ingestor, specs)``, when given, replaces the local loop over
        the sources (the Ray engine); it must :meth:`admit` every source in order and commit
        their chunks in order through :meth:`commit_pending`."""
        m = self.sess.m
        self.skipped.extend(skipped)
        given = {s.key for s in specs}
        if self.mode == "build":
            gone = [k for k in m["sources"] if k not in given]
            self.stats["sources_removed"] += len(gone)
            self.sess.drop_sources(gone)
        total_bytes = sum(s.size for s in specs)
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="ctxmem index", dynamic_ncols=True, mininterval=0.5, leave=True)
        try:
            if feed is not None:
                feed(self, specs)
            else:
                for spec in specs:
                    self._source(spec)
                self.flush()
        finally:
            if self.bar is not None:
                self.bar.close()

    def _advance(self, nbytes: float) -> None:
        if self.bar is not None and nbytes:
            self.bar.update(nbytes)

    def _drop(self, key: str) -> None:
        if key in self.sess.m["sources"]:
            self.sess.drop_sources([key])
            self.stats["sources_removed"] += 1

    def _source(self, spec) -> None:
        prep = prepare_source(spec, self.chunker, self.text_field, self.max_file_bytes,
                              known_state(self.sess.m, spec.key))
        ent = self.admit(spec, prep)
        if ent is None:
            return
        if ent is False:  # the committed part no longer fits the text: start the source over
            return self._source(spec)
        weight = spec.size / prep["n_chunks"]
        self._advance(weight * prep["first"])
        for doc_source, a, b, text in prep["chunks"]:
            rec = {"source": doc_source, "start": a, "end": b, "text": text}
            self.pending.append((spec.key, rec, weight))
            if len(self.pending) >= self.group:
                self.flush()

    def admit(self, spec, prep: dict):
        """Record what :func:`prepare_source` found for ``spec`` in the manifest (in memory).

        Returns the source's manifest entry when its chunks ``prep["first"]:`` are to be
        embedded and committed, ``None`` when there is nothing to embed (skipped or reused),
        and ``False`` when the committed part does not match ``prep["first"]`` (the source was
        dropped; prepare it again from chunk 0). Runs on the process that owns the session
        (the local builder, or the Ray engine's driver).
        """
        m = self.sess.m
        status = prep["status"]
        if status == "skip":
            self.skipped.append({"source": spec.key, "reason": prep["reason"]})
            # an unreadable file keeps its old chunks on add; a file that no longer decodes loses them
            if self.mode == "build" or prep["stage"] == "decode":
                self._drop(spec.key)
            self._advance(spec.size)
            return None
        if status == "reused":
            self.stats["sources_reused"] += 1
            self._advance(spec.size)
            return None
        for note in prep["notes"]:
            self.notes.append({"source": spec.key, "note": note})
        digest = prep["sha256"]
        ent = m["sources"].get(spec.key)
        if ent is not None and ent["sha256"] != digest:
            self.sess.drop_sources([spec.key])  # changed: old chunks go, new ones come
            ent = None
        if ent is None:
            ent = {"sha256": digest, "size": spec.size, "kind": spec.kind, "complete": False,
                   "chunks": prep["n_chunks"], "parts": [], "notes": prep["notes"]}
            m["sources"][spec.key] = ent
        if sum(p[2] for p in ent["parts"]) != prep["first"]:  # cannot happen with deterministic chunking
            self._drop(spec.key)
            return False
        self.stats["sources_indexed"] += 1
        return ent

    def flush(self) -> None:
        if not self.pending:
            return
        m = self.sess.m
        texts = [r["text"] for _, r, _ in self.pending]
        n = len(texts)
        vecs = np.empty((n, m["embedder"]["dim"]), dtype=np.float32)
        order = sorted(range(n), key=lambda i: -len(texts[i]))  # less padding per batch
        step = max(self.batch_size * 8, 64)
        t0 = time.perf_counter()
        for a in range(0, n, step):
            idx = order[a:a + step]
            v = embed.encode(self.emb, [texts[i] for i in idx], self.batch_size)
            if v.shape[1] != vecs.shape[1]:
                raise KnowledgeIndexError(f"embedder returned dim {v.shape[1]}, the KB has {vecs.shape[1]}")
            vecs[idx] = v
            self._advance(sum(self.pending[i][2] for i in idx))
            if self.bar is not None:
                done = self.stats["chunks_embedded"] + a + len(idx)
                secs = self.stats["embed_seconds"] + time.perf_counter() - t0
                self.bar.set_postfix(chunks=done, rate=f"{done / max(secs, 1e-9):.1f} chunk/s", refresh=False)
        dt = time.perf_counter() - t0
        self.stats["embed_seconds"] += dt
        self.commit_pending(vecs)
        rate = n / max(dt, 1e-9)
        self.group = int(min(self.commit_every, max(min(16, self.commit_every), rate * self.commit_seconds)))

    def commit_pending(self, vecs: np.ndarray) -> None:
        """Commit the pending chunks with their embeddings ``vecs`` as one segment.

        Chunk ids are given in pending order, which is source order then chunk order, so
        every engine that feeds chunks in that order gives the same ids.
        """
        sess, m = self.sess, self.sess.m
        n = len(self.pending)
        self.stats["chunks_embedded"] += n
        ids = np.arange(m["next_id"], m["next_id"] + n, dtype=np.int64)
        m["next_id"] += n
        seg = sess.write_segment([r for _, r, _ in self.pending], ids, vecs)
        i = 0
        touched = []
        while i < n:
            key = self.pending[i][0]
            j = i
            while j < n and self.pending[j][0] == key:
                j += 1
            ent = m["sources"][key]
            ent["parts"].append([seg, int(ids[i]), j - i, i])
            touched.append(ent)
            i = j
        for ent in touched:
            ent["complete"] = sum(p[2] for p in ent["parts"]) == ent["chunks"]
        m["state"] = "building"
        m.setdefault("op", self.mode)
        sess.commit()
        self.pending.clear()

    def summary(self) -> dict:
        m = self.sess.m
        return {**self.stats, "embed_seconds": round(self.stats["embed_seconds"], 3),
                "skipped": self.skipped, "notes": self.notes, "commits": self.sess.commits,
                "chunks": int(sum(p[2] for p in live_parts(m))), "sources": len(m["sources"])}


# ----------------------------------------------------------------------------- per-source work

def known_state(m: dict, key: str) -> dict | None:
    """What the manifest says of source ``key`` (``None`` if nothing): what a worker needs to
    decide, without the manifest, whether the source is unchanged or partly committed."""
    ent = m["sources"].get(key)
    if ent is None:
        return None
    return {"sha256": ent["sha256"], "complete": bool(ent["complete"]),
            "done": int(sum(p[2] for p in ent["parts"]))}


def prepare_source(spec, chunker: Chunker, text_field: str, max_file_bytes: int, known: dict | None) -> dict:
    """Read, hash, decode and chunk one source: the part of ingestion that needs no manifest.

    Returns a dict with ``status``:

    * ``"skip"``: ``reason``, and ``stage`` (``"read"`` or ``"decode"``);
    * ``"reused"``: the bytes hash to a source ``known`` as completely committed;
    * ``"chunks"``: ``sha256``, ``notes``, ``n_chunks`` (all chunks of the source), ``first``
      (chunks already committed for this content: ``known["done"]`` when the hash matches,
      else 0) and ``chunks``: ``(doc_source, start, end, text)`` for chunks ``first:``.
      Whitespace-only chunks are not indexed.

    Deterministic and free of side effects, so it can run on any worker and be retried.
    """
    try:
        data = read_bytes(spec, max_file_bytes)
    except SkipSource as e:
        return {"status": "skip", "stage": "read", "reason": str(e)}
    digest = hashlib.sha256(data).hexdigest()
    if known is not None and known["sha256"] == digest and known["complete"]:
        return {"status": "reused", "sha256": digest}
    try:
        decoded = decode_source(spec, data, text_field)
    except SkipSource as e:
        return {"status": "skip", "stage": "decode", "reason": str(e)}
    del data
    chunks = []
    for doc in decoded.docs:
        for c in chunker.chunk(doc.text):
            if not doc.text[c.start:c.end].isspace():
                chunks.append((doc, int(c.start), int(c.end)))
    if not chunks:
        return {"status": "skip", "stage": "decode", "reason": "empty: no token to index"}
    first = known["done"] if known is not None and known["sha256"] == digest else 0
    if first > len(chunks):  # cannot happen with deterministic chunking; start over
        first = 0
    return {"status": "chunks", "sha256": digest, "notes": list(decoded.notes), "n_chunks": len(chunks),
            "first": first, "chunks": [(doc.source, a, b, doc.text[a:b]) for doc, a, b in chunks[first:]]}


def make_chunker(emb, chunk_tokens: int, overlap: int, max_chars: int | None = None) -> Chunker:
    limit = embed.max_tokens(emb)
    if limit is not None and chunk_tokens > limit:
        raise BadInputError(f"chunk_tokens={chunk_tokens} is more than embedder {embed.name_of(emb)!r} reads "
                            f"({limit} tokens); use --chunk-tokens {limit} or less")
    return Chunker(embed.tokenizer_of(emb), chunk_tokens=chunk_tokens, overlap=overlap, max_chars=max_chars)


def check_writable_state(m: dict, op: str, where) -> None:
    if m["state"] != "ready" and not (op == "add" and m.get("op") == "add") and op != "build":
        raise IndexIncompleteError(
            f"the last {m.get('op', 'build')} into {where} was interrupted; run it again to finish it "
            f"before running {op}")

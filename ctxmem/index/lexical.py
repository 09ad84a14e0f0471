"""The lexical index: BM25 over the chunks' words, beside the FAISS index, and rank fusion.

Dense embeddings rank meaning; a user who pastes a phrase, an identifier or an error message
expects the chunk that contains it. Every KB therefore also holds a BM25 index, and
:meth:`KnowledgeIndex.search` fuses both rankings (``mode="hybrid"``, the default).

Library: `bm25s <https://github.com/xhluca/bm25s>`_ (pure Python on numpy/scipy: no native
build, ~100 KB, BM25 as one sparse matrix of precomputed per-(term, chunk) scores, so a query
is a sum over the query terms' postings). It gives the tokenizer (scikit-learn's word pattern
``\\b\\w\\w+\\b``, lowercased, English stop words dropped; ``snake_case`` identifiers stay one
token) and query scoring (``BM25.get_scores_from_ids``, Lucene's BM25: k1 1.5, b 0.75). Its
own ``save`` writes unversioned, unchecksummed files in place; ctxmem keeps its arrays in its
own checksummed files instead (below). No pickle anywhere.

Files (each listed with its sha256 in the KB manifest, written atomically):

``seg-NNNNNN.lex``
    written with its segment, in the same commit: every chunk's term counts (a msgpack map:
    the segment's term list, and as little-endian arrays the chunks' token counts, a CSR
    ``indptr`` and each posting's term and count). Made from the chunk texts, so a rebuild
    or a removal never tokenizes again what a segment already holds.
``lexical-NNNNNN.bm25``
    the BM25 index over every live chunk, rebuilt from the segments' term counts whenever
    the set of chunks changes (BM25's idf and average length are corpus-wide): bm25s's score
    matrix in CSC form (``data`` float32, ``indices`` int32 rows, ``indptr`` int64 per
    term), the vocabulary, and each row's chunk id (rows in ascending id order).

A KB written before the lexical index existed opens and searches dense-only (``hybrid``
falls back to ``dense`` with a warning; ``lexical`` is refused). Any write to it (``index
add``, ``index remove``, a rerun of ``index build``) or ``ctxmem index upgrade KB`` adds the
lexical files from the stored chunk texts, without re-embedding.

Fusion (:func:`fuse`): reciprocal rank fusion, ``score(c) = sum over rankings of 1 / (60 +
rank of c)`` (ranks from 1, each ranking cut at ``max(k, 50)``), ties broken by chunk id; then
exact words first: among the BM25 top 10, a chunk that holds the query's words verbatim (in
order, case and punctuation aside; queries of two words or more, or one identifier-like word
such as ``read_source_text`` or ``getLogger``) gains 1.0, which puts it above every chunk that
does not (an RRF score is below 2/61).
"""
from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass

import msgpack
import numpy as np

from .errors import IndexCorruptError

SEG_FORMAT = "ctxmem-lex-seg"
INDEX_FORMAT = "ctxmem-bm25"
LEX_VERSION = 1
TOKENIZER = {"library": "bm25s", "pattern": r"(?u)\b\w\w+\b", "lower": True, "stopwords": "en"}
PARAMS = {"method": "lucene", "k1": 1.5, "b": 0.75}
RRF_K = 60
FUSION_DEPTH = 50
PHRASE_CHECK = 10      # BM25 hits checked for the query's words verbatim
PHRASE_BONUS = 1.0
_WORD = re.compile(r"\w+")
_IDENT = re.compile(r"_|[a-z][A-Z]|[A-Za-z]\d")
MODES = ("hybrid", "dense", "lexical")


# ----------------------------------------------------------------------------- tokenizing

def tokenize(texts: list[str]) -> tuple[list[str], list[list[int]]]:
    """``(terms, ids)``: bm25s's tokens of each text as ids into ``terms`` (this batch's own list)."""
    import bm25s

    tok = bm25s.tokenize(list(texts), lower=TOKENIZER["lower"], token_pattern=TOKENIZER["pattern"],
                         stopwords=TOKENIZER["stopwords"], return_ids=True, show_progress=False)
    terms = [""] * len(tok.vocab)
    for t, i in tok.vocab.items():
        terms[i] = t
    return terms, tok.ids


def query_terms(text: str) -> list[str]:
    terms, ids = tokenize([text])
    return [terms[i] for i in ids[0]]


@dataclass
class SegmentTerms:
    """Term counts of the chunks of one segment (CSR: chunk i's postings are ``indptr[i]:indptr[i+1]``)."""
    terms: list
    doc_len: np.ndarray   # int32 (n,): tokens in each chunk (stop words excluded)
    indptr: np.ndarray    # int64 (n + 1,)
    term: np.ndarray      # int32: index into ``terms``, ascending within a chunk
    tf: np.ndarray        # int32: count of that term in the chunk

    @property
    def n(self) -> int:
        return len(self.doc_len)


def count_terms(texts: list[str]) -> SegmentTerms:
    """Tokenize ``texts`` and count each chunk's terms."""
    n = len(texts)
    terms, ids = tokenize(texts) if n else ([], [])
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=n)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
    v = max(len(terms), 1)
    key = np.repeat(np.arange(n, dtype=np.int64), lens) * v + flat
    uniq, tf = np.unique(key, return_counts=True)
    doc = uniq // v
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(doc, minlength=n), out=indptr[1:])
    return SegmentTerms(terms, lens.astype(np.int32), indptr, (uniq % v).astype(np.int32), tf.astype(np.int32))


def _b(a: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(a, dtype=dtype).tobytes()


def encode_segment(st: SegmentTerms) -> bytes:
    """The bytes of a ``seg-NNNNNN.lex`` file."""
    return msgpack.packb({"format": SEG_FORMAT, "version": LEX_VERSION, "tokenizer": TOKENIZER, "n": st.n,
                          "terms": st.terms, "doc_len": _b(st.doc_len, "<i4"), "indptr": _b(st.indptr, "<i8"),
                          "term": _b(st.term, "<i4"), "tf": _b(st.tf, "<i4")}, use_bin_type=True)


def _arr(d: dict, key: str, dtype: str, count: int | None, path) -> np.ndarray:
    raw = d.get(key)
    if not isinstance(raw, bytes) or len(raw) % np.dtype(dtype).itemsize:
        raise IndexCorruptError(path, f"field {key!r} is not a {dtype} array")
    a = np.frombuffer(raw, dtype=dtype)
    if count is not None and len(a) != count:
        raise IndexCorruptError(path, f"field {key!r} holds {len(a)} values, expected {count}")
    return a


def _unpack(data: bytes, fmt: str, path) -> dict:
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:
        raise IndexCorruptError(path, f"not a valid {fmt} file ({type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise IndexCorruptError(path, f"not a {fmt} file")
    if d.get("version") != LEX_VERSION:
        raise IndexCorruptError(path, f"{fmt} version {d.get('version')!r}; this ctxmem reads {LEX_VERSION}")
    if d.get("tokenizer") != TOKENIZER:
        raise IndexCorruptError(path, f"made with tokenizer {d.get('tokenizer')!r}, this ctxmem uses {TOKENIZER!r}")
    return d


def _check_csr(path, indptr: np.ndarray, nnz: int, what: str) -> None:
    if len(indptr) == 0 or indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
        raise IndexCorruptError(path, f"{what} pointer table is corrupt")


def decode_segment(data: bytes, path, n: int) -> SegmentTerms:
    """Parse and check a ``seg-NNNNNN.lex`` file that should hold ``n`` chunks."""
    d = _unpack(data, SEG_FORMAT, path)
    terms = d.get("terms")
    if d.get("n") != n or not isinstance(terms, list):
        raise IndexCorruptError(path, f"holds {d.get('n')!r} chunks, the manifest says {n}")
    doc_len = _arr(d, "doc_len", "<i4", n, path)
    indptr = _arr(d, "indptr", "<i8", n + 1, path)
    term = _arr(d, "term", "<i4", None, path)
    tf = _arr(d, "tf", "<i4", len(term), path)
    _check_csr(path, indptr, len(term), "chunk")
    if len(term) and (term.min() < 0 or term.max() >= len(terms) or tf.min() < 1):
        raise IndexCorruptError(path, "term ids or counts out of range")
    return SegmentTerms(terms, doc_len, indptr, term, tf)


# ----------------------------------------------------------------------------- the BM25 index

@dataclass
class Bm25Arrays:
    vocab: list           # term of each column
    ids: np.ndarray       # int64 (n,): chunk id of each row, ascending
    data: np.ndarray      # float32 (nnz,): BM25 score of (term, row)
    indices: np.ndarray   # int32 (nnz,): row
    indptr: np.ndarray    # int64 (len(vocab) + 1,)
    avgdl: float


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def build_arrays(pieces) -> Bm25Arrays:
    """The BM25 index over chunks given as ``pieces``: ``(SegmentTerms, rows, ids)`` with ``rows``
    the segment rows to take and ``ids`` their chunk ids; rows end up in ascending id order.

    Scores are bm25s's "lucene" variant, computed vectorised from the stored counts:
    ``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))``, ``score = idf * tf / (tf + k1 (1 - b + b dl / avgdl))``.
    """
    vocab: dict[str, int] = {}
    rows_l, term_l, tf_l, dl_l, id_l = [], [], [], [], []
    base = 0
    for st, rows, ids in pieces:
        rows = np.asarray(rows, dtype=np.int64)
        gmap = np.fromiter((vocab.setdefault(t, len(vocab)) for t in st.terms), dtype=np.int64, count=len(st.terms))
        a, b = st.indptr[rows], st.indptr[rows + 1]
        cnt = b - a
        tot = int(cnt.sum())
        # positions of every posting of the chosen rows
        pos = np.repeat(a - np.concatenate(([0], np.cumsum(cnt)[:-1])), cnt) + np.arange(tot, dtype=np.int64)
        rows_l.append(np.repeat(np.arange(base, base + len(rows), dtype=np.int64), cnt))
        term_l.append(gmap[st.term[pos]])
        tf_l.append(st.tf[pos])
        dl_l.append(st.doc_len[rows])
        id_l.append(np.asarray(ids, dtype=np.int64))
        base += len(rows)
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
    row, term, tf = cat(rows_l, np.int64), cat(term_l, np.int64), cat(tf_l, np.int32).astype(np.float32)
    dl, ids = cat(dl_l, np.int32).astype(np.float64), cat(id_l, np.int64)
    n = len(ids)
    order = np.argsort(ids, kind="stable")
    if n and np.any(order != np.arange(n)):  # rows by ascending chunk id
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n)
        row, ids, dl = rank[row], ids[order], dl[order]
    # drop terms that only removed chunks held
    df = np.bincount(term, minlength=len(vocab))
    keep = np.flatnonzero(df)
    remap = np.full(len(vocab), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    terms_all = list(vocab)
    vocab_list = [terms_all[i] for i in keep]
    term = remap[term]
    df = df[keep].astype(np.float64)
    avgdl = float(dl.mean()) if n else 1.0
    k1, b = PARAMS["k1"], PARAMS["b"]
    idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5))
    norm = k1 * ((1.0 - b) + b * dl / max(avgdl, 1e-9))
    data = (idf[term] * (tf / (tf + norm[row]))).astype(np.float32)
    # CSC: postings grouped by term, rows ascending within a term
    order = np.argsort(term * max(n, 1) + row, kind="stable")
    indptr = np.zeros(len(keep) + 1, np.int64)
    np.cumsum(np.bincount(term, minlength=len(keep)), out=indptr[1:])
    return Bm25Arrays(vocab_list, ids, data[order], row[order].astype(np.int32), indptr, avgdl)


def encode_index(a: Bm25Arrays) -> bytes:
    return msgpack.packb({"format": INDEX_FORMAT, "version": LEX_VERSION, "tokenizer": TOKENIZER, "params": PARAMS,
                          "num_docs": len(a.ids), "avgdl": a.avgdl, "vocab": a.vocab, "ids": _b(a.ids, "<i8"),
                          "data": _b(a.data, "<f4"), "indices": _b(a.indices, "<i4"),
                          "indptr": _b(a.indptr, "<i8")}, use_bin_type=True)


def decode_index(data: bytes, path) -> Bm25Arrays:
    d = _unpack(data, INDEX_FORMAT, path)
    if d.get("params") != PARAMS:
        raise IndexCorruptError(path, f"BM25 parameters {d.get('params')!r}, this ctxmem uses {PARAMS!r}")
    vocab, n = d.get("vocab"), d.get("num_docs")
    if not isinstance(vocab, list) or not isinstance(n, int) or not isinstance(d.get("avgdl"), float):
        raise IndexCorruptError(path, "lacks its fields")
    ids = _arr(d, "ids", "<i8", n, path)
    indptr = _arr(d, "indptr", "<i8", len(vocab) + 1, path)
    indices = _arr(d, "indices", "<i4", None, path)
    vals = _arr(d, "data", "<f4", len(indices), path)
    _check_csr(path, indptr, len(indices), "term")
    if n and np.any(np.diff(ids) <= 0):
        raise IndexCorruptError(path, "chunk ids are not ascending")
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        raise IndexCorruptError(path, "row numbers out of range")
    return Bm25Arrays(vocab, ids, vals, indices, indptr, d["avgdl"])


class LexicalSearcher:
    """BM25 search over a :class:`Bm25Arrays` through bm25s's scorer."""

    def __init__(self, a: Bm25Arrays):
        import bm25s

        self.ids = a.ids
        self.n = len(a.ids)
        self.vocab = {t: i for i, t in enumerate(a.vocab)}
        self.bm25 = bm25s.BM25(k1=PARAMS["k1"], b=PARAMS["b"], method=PARAMS["method"], backend="numpy")
        self.bm25.scores = {"data": a.data, "indices": a.indices, "indptr": a.indptr, "num_docs": self.n}
        self.bm25.vocab_dict = self.vocab
        self.bm25.nonoccurrence_array = None

    def search(self, text: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(chunk ids, BM25 scores)`` of the best ``k`` chunks holding a query term, best first
        (ties by chunk id)."""
        q = np.array([self.vocab[t] for t in query_terms(text) if t in self.vocab], dtype=np.int64)
        if not len(q) or k <= 0 or not self.n:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        scores = self.bm25.get_scores_from_ids(q)  # bm25s: the sum over the query terms' postings
        cand = self._candidates(q, scores, k)
        if len(cand) > k:
            top = cand[np.argpartition(-scores[cand], k - 1)[:k]]
            cand = cand[scores[cand] >= scores[top].min()]  # keep every tie of the k-th: exact tie-break
        sc = scores[cand]
        order = np.lexsort((cand, -sc))[:k]  # rows are in id order: row order = id order
        return self.ids[cand[order]], sc[order]

    def _candidates(self, q: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
        """Rows that can be in the top ``k``: those scoring at least the ``k``-th best score among
        the chunks holding the query's rarest terms (a lower bound of the true ``k``-th best), so
        the selection sorts a few rows, not every chunk that holds a common word."""
        ip, ind = self.bm25.scores["indptr"], self.bm25.scores["indices"]
        terms = np.unique(q)
        df = ip[terms + 1] - ip[terms]
        probe, want = [], 4 * k
        for t in terms[np.argsort(df, kind="stable")]:  # rarest first; any distinct rows give a lower bound
            take = ind[ip[t]:min(ip[t + 1], ip[t] + want)]
            probe.append(take)
            want -= len(take)
            if want <= 0:
                break
        rows = np.sort(np.concatenate(probe))
        rows = rows[np.concatenate(([True], rows[1:] != rows[:-1]))]
        if len(rows) < k:
            return np.flatnonzero(scores > 0)
        ps = scores[rows]
        floor = np.partition(ps, len(ps) - k)[len(ps) - k]
        return np.flatnonzero(scores >= floor)


def rrf(rankings, k: int, k0: int = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of rankings (each an array of chunk ids, best first):
    ``(ids, scores)`` of the top ``k``, scores ``sum 1 / (k0 + rank)``, ties by id."""
    acc: dict[int, float] = {}
    for ranking in rankings:
        for r, cid in enumerate(np.asarray(ranking, dtype=np.int64).tolist(), 1):
            acc[cid] = acc.get(cid, 0.0) + 1.0 / (k0 + r)
    if not acc:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    ids = np.fromiter(acc.keys(), dtype=np.int64, count=len(acc))
    sc = np.fromiter(acc.values(), dtype=np.float64, count=len(acc))
    order = np.lexsort((ids, -sc))[:k]
    return ids[order], sc[order]


def normalize(text: str) -> str:
    """Lowercased words separated by single spaces (what "verbatim" means for :func:`fuse`)."""
    return " ".join(_WORD.findall(text.lower()))


def phrase_of(query: str) -> str | None:
    """The normalised query when it is a phrase (two words or more) or one identifier-like word."""
    words = _WORD.findall(query)
    if len(words) >= 2 or (len(words) == 1 and len(words[0]) >= 6 and _IDENT.search(words[0])):
        return " ".join(w.lower() for w in words)
    return None


def holds_phrase(text: str, phrase: str) -> bool:
    return f" {phrase} " in f" {normalize(text)} "


def fuse(dense_ids, lexical_ids, k: int, query: str | None = None, text_of=None) -> tuple[np.ndarray, np.ndarray]:
    """Hybrid ranking: :func:`rrf` of the two rankings, then chunks among the first
    ``PHRASE_CHECK`` BM25 hits whose text (``text_of(id)``) holds ``query`` verbatim first
    (score + ``PHRASE_BONUS``). ``(ids, scores)`` of the top ``k``, best first."""
    dense_ids = np.asarray(dense_ids, dtype=np.int64)
    lexical_ids = np.asarray(lexical_ids, dtype=np.int64)
    ids, scores = rrf([dense_ids, lexical_ids], len(dense_ids) + len(lexical_ids))
    phrase = phrase_of(query) if query is not None and text_of is not None else None
    if phrase is not None and len(ids):
        exact = {int(c) for c in lexical_ids[:PHRASE_CHECK] if holds_phrase(text_of(int(c)), phrase)}
        if exact:
            held = np.fromiter((int(c) in exact for c in ids), dtype=np.float64, count=len(ids))
            scores = scores + PHRASE_BONUS * held
            order = np.lexsort((ids, -scores))
            ids, scores = ids[order], scores[order]
    return ids[:k], scores[:k]

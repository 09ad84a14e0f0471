"""Save working memory to a folder and load it in another process: read once, answer many times.

A memory folder holds two files:

    manifest.msgpack     the envelope every ctxmem manifest shares (``ctxmem/_envelope.py``:
                         format, version, sha256 of the body, msgpack body); the body says what was saved
                         (format, version, model fingerprint, layout, rows, dtypes) and lists the
                         data file's segments with their byte lengths and crc32s
    data-<id>.bin        the segments, little-endian, in this order:
                           tokens of each row (int32)
                           for each layer, for each row: hot keys [H, n, D], hot values,
                             representatives [H, nblocks, R, D], then the row's cold blocks in
                             their encoded form (see cold_store.py)
                           the block-text embeddings of each row (float32 [n, dim])

This module is storage only: it writes and reads a ``BlockStore`` given the model's fingerprint (a
dict the caller computes; ``ctxmem.hf.persist`` does, for a wrapped model, and checks it on load).

"Hot" positions are the sinks and the tail a ``TieredStoreLayer`` keeps in RAM; for an
all-in-RAM layer they are every position. Writes are atomic: the data file under a fresh name,
then the manifest (temp file + fsync + rename), then old data files are removed. A kill at any
moment leaves the old memory or the new one. No absolute paths are stored, so a folder can be
moved or copied to another machine.
"""
from __future__ import annotations

import os
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_open, fsync_dir
from .._envelope import EnvelopeError, read_envelope, read_outer, unpack_body, write_envelope
from .store import BlockStore

FORMAT = "ctxmem-memory"
VERSION = 2  # 2: the shared envelope (sha256); 1 (crc32 envelope, same body) is still read
MANIFEST = "manifest.msgpack"
LAYOUT_FIELDS = ("block_size", "sink_tokens", "local_tokens", "reps_per_block")
_DTYPES = {"float32": (torch.float32, "<f4"), "float16": (torch.float16, "<f2"), "bfloat16": (torch.bfloat16, "<i2")}


class MemoryFormatError(ValueError):
    """A memory folder is missing, truncated, corrupt or of another version; names the file."""

    def __init__(self, path, msg: str):
        self.path = str(path)
        super().__init__(f"{path}: {msg}")


class MemoryMismatchError(ValueError):
    """The memory was made by a different model, or with a block layout this config does not share."""


def _dtype_name(dt: torch.dtype) -> str:
    for name, (t, _) in _DTYPES.items():
        if t == dt:
            return name
    raise ValueError(f"ctxmem.save_memory: unsupported KV dtype {dt}")


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr = t.numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False)


# -- save -----------------------------------------------------------------------------------
class _Writer:
    def __init__(self, f):
        self.f, self.segments, self.offset = f, [], 0

    def put(self, data) -> None:
        if isinstance(data, np.ndarray):  # a flat byte view, no copy (and no trouble with 0-size shapes)
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        mv = memoryview(data).cast("B")
        self.f.write(mv)
        self.segments.append([self.offset, mv.nbytes, zlib.crc32(mv)])
        self.offset += mv.nbytes


def save_store(memory: BlockStore, path: str | os.PathLike, fingerprint: dict, *, meta: dict | None = None) -> Path:
    """Write ``memory`` to folder ``path``, recording ``fingerprint`` (what a reader must match).

    ``meta``: small msgpack-able facts to keep beside it (``ctxmem ask`` stores its source's hash).
    """
    if not memory.token_ids or not memory.layers[0].is_initialized:
        raise ValueError("ctxmem.save_memory: nothing to save (the model has not read anything yet)")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"ctxmem.save_memory: {path} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    layers = memory.layers
    l0 = layers[0]
    B, H, _, D = l0.k.shape
    cold = memory.cold
    data_name = f"data-{uuid.uuid4().hex[:12]}.bin"
    embed = memory.text_index.rows if memory.text_index is not None else {}
    with atomic_open(path / data_name) as f:
        w = _Writer(f)
        for b in range(B):
            w.put(np.asarray(memory.token_ids[b], dtype="<i4"))
        rows = []
        for li, layer in enumerate(layers):
            for b in range(B):
                hk, hv, spilled = layer.export_row(b)
                nblocks = max(0, (int(layer.lengths[b]) - memory.cfg.sink_tokens) // memory.cfg.block_size)
                w.put(_np(hk))
                w.put(_np(hv))
                w.put(_np(layer.reps[b, :, :nblocks]))
                for j in range(spilled):
                    w.put(cold.encoded((li, b, j)))
                if li == 0:
                    rows.append({"length": int(layer.lengths[b]), "spilled": spilled, "hot": int(hk.shape[1]),
                                 "blocks": nblocks})
        dims = []
        for b in range(B):
            e = embed.get(b)
            dims.append(0 if e is None else list(e.shape))
            if e is not None:
                w.put(_np(e.float()))
        segments = w.segments
    body = {
        "format": FORMAT, "version": VERSION, "byte_order": "little",
        "model": fingerprint,
        "layout": {k: getattr(memory.cfg, k) for k in LAYOUT_FIELDS},
        "config": memory.cfg.to_dict(),
        "dtype": _dtype_name(l0.k.dtype), "reps_dtype": _dtype_name(l0.reps.dtype),
        "cold_dtype": cold.cold_dtype if cold is not None else None,
        "num_layers": len(layers), "kv_heads": int(H), "head_dim": int(D), "reps_per_block": int(l0.reps.shape[3]),
        "seen": int(memory.seen), "hidden_prefix": memory.hidden_prefix,
        "reread_from": memory.reread_from, "reread_width": int(memory.reread_width),
        "rows": rows, "embeddings": dims,
        "data": {"name": data_name, "bytes": w.offset}, "segments": segments, "meta": meta or {},
    }
    write_envelope(path / MANIFEST, FORMAT, VERSION, body)
    for old in path.glob("data-*.bin"):  # the manifest now points at the new data: the old can go
        if old.name != data_name:
            old.unlink(missing_ok=True)
    fsync_dir(path)
    return path


# -- load -----------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest's body, validated; raises ``MemoryFormatError`` naming the file otherwise."""
    mpath = Path(path) / MANIFEST
    try:
        outer = read_outer(mpath)
        if "crc32" in outer and "format" not in outer:  # version 1: {"crc32", "body"}, format inside
            raw = outer.get("body")
            if not isinstance(raw, bytes) or not isinstance(outer["crc32"], int):
                raise EnvelopeError("format", "not a ctxmem memory manifest")
            if zlib.crc32(raw) != outer["crc32"]:
                raise EnvelopeError("checksum", "checksum mismatch (the manifest is corrupt)")
            body = unpack_body(raw)
            version = body.get("version")
        else:
            version, body = read_envelope(mpath, FORMAT, outer)
    except EnvelopeError as e:
        msg = {"missing": "no memory here (manifest missing)",
               "format": "not a ctxmem memory manifest"}.get(e.kind, str(e))
        raise MemoryFormatError(mpath, msg) from None
    if body.get("format") != FORMAT:
        raise MemoryFormatError(mpath, "not a ctxmem memory manifest")
    if version not in (1, VERSION) or body.get("version") != version:
        raise MemoryFormatError(mpath, f"memory format version {body.get('version')!r}; this ctxmem reads 1 and {VERSION}")
    _check_body(mpath, body)
    return body


def _check_body(mpath, body: dict) -> None:
    """Structure and arithmetic: every count the loader will trust is checked here."""
    def need(cond, what):
        if not cond:
            raise MemoryFormatError(mpath, f"inconsistent manifest: {what}")

    def nat(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    need(body.get("byte_order") == "little", "byte_order")
    need(body.get("dtype") in _DTYPES and body.get("reps_dtype") in _DTYPES, "dtype")
    need(body.get("cold_dtype") in (None, "fp32", "fp16", "int8"), "cold_dtype")
    for k in ("num_layers", "kv_heads", "head_dim", "reps_per_block", "seen"):
        need(nat(body.get(k)) and (k == "seen" or body[k] > 0), k)
    need(isinstance(body.get("model"), dict) and isinstance(body.get("layout"), dict), "model/layout")
    lay = body["layout"]
    need(all(nat(lay.get(k)) for k in LAYOUT_FIELDS) and lay["block_size"] > 0, "layout")
    need(lay["block_size"] % body["reps_per_block"] == 0, "reps_per_block")
    rows, dims = body.get("rows"), body.get("embeddings")
    need(isinstance(rows, list) and rows and isinstance(dims, list) and len(dims) == len(rows), "rows")
    hp = body.get("hidden_prefix")
    need(hp is None or (isinstance(hp, list) and len(hp) == len(rows) and all(nat(x) for x in hp)), "hidden_prefix")
    rf = body.get("reread_from")  # absent in memories saved before reread existed
    need(rf is None or (isinstance(rf, list) and len(rf) == len(rows) and all(nat(x) for x in rf)), "reread_from")
    need(nat(body.get("reread_width", 0)), "reread_width")
    S, sink = lay["block_size"], lay["sink_tokens"]
    for r in rows:
        need(isinstance(r, dict) and all(nat(r.get(k)) for k in ("length", "spilled", "hot", "blocks")), "row")
        need(r["blocks"] == max(0, (r["length"] - sink) // S), "row blocks")
        need(r["spilled"] <= r["blocks"] and r["hot"] == r["length"] - r["spilled"] * S, "row spill")
        need(r["spilled"] == 0 or body["cold_dtype"] is not None, "cold blocks without a cold dtype")
    for d in dims:
        need(d == 0 or (isinstance(d, list) and len(d) == 2 and all(nat(x) for x in d)), "embeddings")
    data = body.get("data")
    need(isinstance(data, dict) and isinstance(data.get("name"), str) and nat(data.get("bytes")), "data")
    need(data["name"].startswith("data-") and "/" not in data["name"] and "\\" not in data["name"]
         and ".." not in data["name"], "data file name")
    segs = body.get("segments")
    need(isinstance(segs, list) and all(isinstance(s, list) and len(s) == 3 and all(nat(x) for x in s) for s in segs),
         "segments")
    off = 0
    for s in segs:
        need(s[0] == off, "segment offsets")
        off += s[1]
    need(off == data["bytes"], "segment total")
    # the segment count the loader will walk, and each segment's size from the shapes
    esz = {"float32": 4, "float16": 2, "bfloat16": 2}
    H, D, R = body["kv_heads"], body["head_dim"], body["reps_per_block"]
    from .cold_store import encoded_nbytes
    rec = encoded_nbytes(body["cold_dtype"], H, S, D) if body["cold_dtype"] else 0
    want = [r["length"] * 4 for r in rows]
    for _ in range(body["num_layers"]):
        for r in rows:
            want += [H * r["hot"] * D * esz[body["dtype"]]] * 2
            want += [H * r["blocks"] * R * D * esz[body["reps_dtype"]]]
            want += [rec] * r["spilled"]
    want += [d[0] * d[1] * 4 for d in dims if d != 0]
    need(len(want) == len(segs) and all(w == s[1] for w, s in zip(want, segs)), "segment sizes")


class _SegmentReader:
    def __init__(self, path: Path, segments: list, nbytes: int):
        self.path, self.segments, self.i = path, segments, 0
        try:
            self.f = open(path, "rb")
        except OSError as e:
            raise MemoryFormatError(path, f"cannot open the data file ({e.strerror or e})") from None
        size = os.fstat(self.f.fileno()).st_size
        if size != nbytes:
            self.f.close()
            raise MemoryFormatError(path, f"is {size} bytes, the manifest says {nbytes} (truncated or appended to)")

    def next(self) -> bytearray:
        off, n, crc = self.segments[self.i]
        self.i += 1
        buf = bytearray(n)
        got = self.f.readinto(buf) if n else 0
        if got != n:
            raise MemoryFormatError(self.path, f"truncated (segment {self.i - 1} at byte {off})")
        if zlib.crc32(buf) != crc:
            raise MemoryFormatError(self.path, f"checksum mismatch in segment {self.i - 1} (byte {off})")
        return buf

    def tensor(self, dtype_name: str, shape) -> torch.Tensor:
        t, np_dt = _DTYPES[dtype_name]
        arr = np.frombuffer(self.next(), dtype=np_dt).astype(np.dtype(np_dt).newbyteorder("="), copy=False)
        x = torch.from_numpy(arr.reshape(shape))
        return x.view(torch.bfloat16) if dtype_name == "bfloat16" else x

    def close(self):
        self.f.close()


def load_store(memory: BlockStore, path: str | os.PathLike, fingerprint: dict) -> BlockStore:
    """Read folder ``path`` into ``memory`` (a fresh store); returns it.

    The folder must have been saved with the same ``fingerprint`` (the same model) and a config sharing
    ``memory.cfg``'s block layout (``LAYOUT_FIELDS``); topk, selector, backend and the RAM budget may differ.
    """
    path = Path(path)
    body = read_manifest(path)
    diff = [k for k in fingerprint if body["model"].get(k) != fingerprint[k]]
    if diff:
        raise MemoryMismatchError(f"ctxmem.load_memory: {path} was made by a different model "
                                  f"(differs in {', '.join(diff)})")
    cfg = memory.cfg
    bad = [f"{k}={body['layout'][k]} (this config: {getattr(cfg, k)})" for k in LAYOUT_FIELDS
           if body["layout"][k] != getattr(cfg, k)]
    if bad:
        raise MemoryMismatchError(f"ctxmem.load_memory: {path} was made with another block layout: {'; '.join(bad)}")
    rows = body["rows"]
    B, H, D, R = len(rows), body["kv_heads"], body["head_dim"], body["reps_per_block"]
    dtype = _DTYPES[body["dtype"]][0]
    reader = _SegmentReader(path / body["data"]["name"], body["segments"], body["data"]["bytes"])
    try:
        memory.token_ids = [np.frombuffer(reader.next(), dtype="<i4").tolist() for _ in range(B)]
        if [len(t) for t in memory.token_ids] != [r["length"] for r in rows]:
            raise MemoryFormatError(reader.path, "token counts disagree with the manifest")
        for li, layer in enumerate(memory.layers):
            layer.prepare_import(B, H, D, dtype, rows)
            for b, r in enumerate(rows):
                hk = reader.tensor(body["dtype"], (H, r["hot"], D))
                hv = reader.tensor(body["dtype"], (H, r["hot"], D))
                reps = reader.tensor(body["reps_dtype"], (H, r["blocks"], R, D))
                layer.import_row(b, r, hk, hv, reps)
                for j in range(r["spilled"]):
                    layer.import_cold_block((li, b, j), bytes(reader.next()), body["cold_dtype"])
        for b, d in enumerate(body["embeddings"]):
            if d != 0:
                e = reader.tensor("float32", tuple(d))
                # block embeddings are reused only with the same embedder; otherwise re-embedded lazily
                if memory.text_index is not None and body["config"].get("embedder") == cfg.embedder:
                    memory.text_index.rows[b] = e.clone()
    finally:
        reader.close()
    memory.seen = body["seen"]
    memory.hidden_prefix = body["hidden_prefix"]
    memory.reread_from = body.get("reread_from")
    memory.reread_width = body.get("reread_width", 0)
    memory.n_new = torch.zeros(B, dtype=torch.long)
    return memory

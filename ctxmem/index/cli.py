"""``ctxmem index ...``: build, query, inspect and edit a knowledge base from the shell.

Wire into a parser with :func:`add_index_parser`; each subcommand's handler (``args.func``)
returns the exit code: 0 on success, 1 on any error, with a one-line ``ctxmem index CMD:
error: ...`` message on stderr (no traceback), 130 on Ctrl-C. ``--json`` prints one JSON document
on stdout: the result, or ``{"ok": false, "error": ..., "kind": ...}``.
Standalone: ``python -m ctxmem.index.cli index build SRC... -o KB``.
"""
from __future__ import annotations

import argparse
import json
import sys

from .._cli import fail, handled
from .errors import KnowledgeIndexError

_INDEX_CHOICES = ("auto", "flat", "hnsw", "ivfpq")


def _fail(cmd: str, msg: str, as_json: bool = False, **kw) -> int:
    return fail(f"ctxmem index {cmd}", msg, as_json, **kw)


def _handled(cmd: str):
    return handled(f"ctxmem index {cmd}", (KnowledgeIndexError, OSError, ValueError, RuntimeError))


def _report_inputs(summary: dict) -> None:
    for s in summary.get("skipped", []):
        print(f"skipped {s['source']}: {s['reason']}", file=sys.stderr)
    for n in summary.get("notes", []):
        print(f"note {n['source']}: {n['note']}", file=sys.stderr)


def _print_summary(verb: str, summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _report_inputs(summary)
    print(f"{verb} {summary['kb']}: {summary['chunks']} chunks from {summary['sources']} sources "
          f"({summary['chunks_embedded']} embedded from {summary['sources_indexed']} new/changed sources, "
          f"{summary['sources_reused']} unchanged, {summary['sources_removed']} removed, "
          f"{len(summary['skipped'])} skipped) in {summary['seconds']:.1f} s, index {summary['index_type']}"
          + (f", on Ray with {summary['ray']['workers']} workers" if summary.get("ray", {}).get("workers") else ""))


def _add_source_args(p) -> None:
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="in folders, index only files matching GLOB (repeatable; path relative to the folder, "
                        "or file name for a GLOB without '/')")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="in folders, skip matching files/folders (repeatable)")
    p.add_argument("--batch-size", type=int, default=32, help="embedding batch size (default 32)")
    p.add_argument("--commit-every", type=int, default=65536, metavar="N",
                   help="commit at least every N chunks (default 65536; commits also come about every "
                        "--commit-seconds)")
    p.add_argument("--commit-seconds", type=float, default=30.0,
                   help="target seconds of embedding per commit (default 30)")
    p.add_argument("--max-file-bytes", type=int, default=256 * 1024 * 1024, help="skip larger files (default 256 MiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _embedder_on(spec: str, device: str, engine: str):
    """``--device``: the named embedder loaded on that device (auto: the GPU when there is one)."""
    if device == "auto" or engine != "local" or spec.startswith("hash"):
        return spec
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device cuda: torch sees no CUDA GPU (torch {torch.__version__})")
    from ..models import load_embedder

    return load_embedder(spec, device=device)


@_handled("build")
def _cmd_build(args) -> int:
    from .knowledge import KnowledgeIndex

    embedder = _embedder_on(args.embedder, args.device, args.engine)
    kb = KnowledgeIndex.build(args.sources, args.out, embedder=embedder, index=args.index,
                              chunk_tokens=args.chunk_tokens, overlap=args.overlap, include=args.include,
                              exclude=args.exclude, progress=not args.no_progress, text_field=args.text_field,
                              batch_size=args.batch_size, commit_every=args.commit_every,
                              commit_seconds=args.commit_seconds, max_file_bytes=args.max_file_bytes,
                              engine=args.engine, address=args.address, workers=args.workers,
                              cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker)
    _print_summary("built", kb.last_summary, args.json)
    return 0


@_handled("add")
def _cmd_add(args) -> int:
    from .knowledge import KnowledgeIndex

    kb = KnowledgeIndex.add_to(args.kb, args.sources, embedder=args.embedder, include=args.include,
                               exclude=args.exclude, progress=not args.no_progress, batch_size=args.batch_size,
                               commit_every=args.commit_every, commit_seconds=args.commit_seconds,
                               max_file_bytes=args.max_file_bytes)
    summary = kb.last_summary
    if summary["sources_indexed"] == 0 and summary["sources_reused"] == 0 and summary["skipped"]:
        if not args.json:  # with --json the error object is the one document on stdout
            _report_inputs(summary)
        return _fail("add", "no source could be read", args.json, kind="BadInputError",
                     skipped=summary["skipped"])
    _print_summary("updated", summary, args.json)
    return 0


@_handled("remove")
def _cmd_remove(args) -> int:
    from .knowledge import KnowledgeIndex

    kb = KnowledgeIndex.open(args.kb)
    removed = {s: kb.remove(s) for s in args.source}
    info = kb.info()
    if args.json:
        print(json.dumps({"ok": True, "removed_chunks": removed, "chunks": info["chunks"], "sources": info["sources"]}))
    else:
        for s, n in removed.items():
            print(f"removed {n} chunks of {s}; {info['chunks']} chunks from {info['sources']} sources remain")
    return 0


@_handled("query")
def _cmd_query(args) -> int:
    from .knowledge import KnowledgeIndex

    kb = KnowledgeIndex.open(args.kb, embedder=args.embedder)
    mode = args.mode if kb.has_lexical or args.mode != "hybrid" else "dense"
    if mode != args.mode:
        print(f"ctxmem index query: note: {args.kb} has no lexical index (written by an older ctxmem); searching "
              f"dense only. `ctxmem index upgrade {args.kb}` adds it without re-embedding", file=sys.stderr)
    hits = kb.search(args.text, k=args.k, mode=mode)
    if args.json:
        print(json.dumps({"query": args.text, "k": args.k, "mode": mode, "hits": [h.to_dict() for h in hits]},
                         indent=2))
        return 0
    if not hits:
        print("no hits")
    for i, h in enumerate(hits, 1):
        preview = " ".join(h.text.split())
        if len(preview) > args.width:
            preview = preview[:args.width - 3] + "..."
        print(f"{i}. {h.score:.4f}  {h.source}:{h.start}-{h.end}\n   {preview}")
    return 0


@_handled("upgrade")
def _cmd_upgrade(args) -> int:
    from .knowledge import KnowledgeIndex

    report = KnowledgeIndex.upgrade(args.kb, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report))
    elif report["changed"]:
        lex = report["lexical"]
        print(f"upgraded {report['path']}: lexical index over {lex['count']} chunks ({lex['vocab']} terms) added")
    else:
        print(f"{report['path']} is up to date")
    return 0


@_handled("info")
def _cmd_info(args) -> int:
    from .knowledge import kb_info

    info = kb_info(args.kb)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, val in info.items():
        if key == "source_list":
            continue
        print(f"{key:16s} {val}")
    return 0


@_handled("verify")
def _cmd_verify(args) -> int:
    from .knowledge import verify_kb

    report = verify_kb(args.kb)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"ok: {report['path']}: {report['chunks']} chunks, {report['sources']} sources, "
              f"{report['files']} files checked")
    return 0


def add_index_parser(subparsers) -> None:
    """Register ``index`` with build/query/info/verify/add/remove/upgrade on an argparse subparsers object."""
    p = subparsers.add_parser("index", help="build, query and maintain a knowledge index (KB)",
                              description="Build, query and maintain a knowledge index: a folder holding a "
                                          "FAISS index and a BM25 index over chunks of a corpus, with provenance.")
    sub = p.add_subparsers(dest="index_command", metavar="{build,query,info,verify,add,remove,upgrade}")
    sub.required = True

    b = sub.add_parser("build", help="build (or resume, or update) a KB from files, folders, JSONL, stdin",
                       description="Build a KB. Rerunning the same command resumes an interrupted build, "
                                   "re-embeds changed files only, and drops sources no longer given.")
    b.add_argument("sources", nargs="+", metavar="SRC", help="file, folder, JSONL file, or - for standard input")
    b.add_argument("-o", "--out", required=True, metavar="KB", help="the KB folder")
    b.add_argument("--embedder", default="minilm",
                   help="sentence-transformers id or path, 'minilm' (bundled, default) or 'hash:DIM'")
    b.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the embedder runs (default auto: the GPU when there is one); faiss-gpu, when "
                        "installed (the gpu extra), builds the index on the GPU")
    b.add_argument("--index", default="auto", choices=_INDEX_CHOICES, help="index type (default auto: by size)")
    b.add_argument("--chunk-tokens", type=int, default=128, help="tokens per chunk (default 128)")
    b.add_argument("--overlap", type=int, default=16, help="tokens shared by consecutive chunks (default 16)")
    b.add_argument("--text-field", default="text", help="JSONL field holding the text (default 'text')")
    b.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local (default): this process; ray: read, chunk, embed and index on a Ray cluster "
                        "(pip install 'ctxmem[distributed]'); the KB is the same")
    b.add_argument("--address", default=None, metavar="ADDR",
                   help="with --engine ray: join the Ray cluster at ADDR (host:port, ray://host:10001 or auto); "
                        "default: start a local one on this machine")
    b.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --engine ray: embedder actors (default: as many as the cluster's CPUs/GPUs allow)")
    b.add_argument("--cpus-per-worker", type=float, default=1.0, help="with --engine ray: CPUs per embedder (default 1)")
    b.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="with --engine ray: GPUs per embedder (default 0: embed on CPUs)")
    _add_source_args(b)
    b.set_defaults(func=_cmd_build)

    q = sub.add_parser("query", help="search a KB")
    q.add_argument("kb", metavar="KB")
    q.add_argument("text")
    q.add_argument("-k", type=int, default=5, help="number of hits (default 5)")
    q.add_argument("--mode", default="hybrid", choices=("hybrid", "dense", "lexical"),
                   help="hybrid (default): embedding and BM25 rankings fused by reciprocal rank; dense: embedding "
                        "similarity only (score: cosine); lexical: BM25 only (exact words, identifiers; no model "
                        "loaded)")
    q.add_argument("--embedder", default=None, help="embedder to query with (must be the KB's; default: the KB's)")
    q.add_argument("--width", type=int, default=160, help=argparse.SUPPRESS)
    q.add_argument("--json", action="store_true", help="hits as JSON (text, score, source, start, end)")
    q.set_defaults(func=_cmd_query)

    i = sub.add_parser("info", help="describe a KB")
    i.add_argument("kb", metavar="KB")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_info)

    v = sub.add_parser("verify", help="check every file of a KB (exit 1 naming the file on corruption)")
    v.add_argument("kb", metavar="KB")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_cmd_verify)

    a = sub.add_parser("add", help="add or update sources in a KB")
    a.add_argument("kb", metavar="KB")
    a.add_argument("sources", nargs="+", metavar="SRC")
    a.add_argument("--embedder", default=None, help=argparse.SUPPRESS)
    _add_source_args(a)
    a.set_defaults(func=_cmd_add)

    r = sub.add_parser("remove", help="remove a source (file, or every file under a folder) from a KB")
    r.add_argument("kb", metavar="KB")
    r.add_argument("--source", required=True, action="append", metavar="PATH", help="repeatable")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_cmd_remove)

    u = sub.add_parser("upgrade", help="add what a KB written by an older ctxmem lacks (the lexical index), "
                                       "without re-embedding")
    u.add_argument("kb", metavar="KB")
    u.add_argument("--no-progress", action="store_true", help="no progress bar")
    u.add_argument("--json", action="store_true")
    u.set_defaults(func=_cmd_upgrade)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ctxmem")
    sub = parser.add_subparsers(dest="command", metavar="{index}")
    sub.required = True
    add_index_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

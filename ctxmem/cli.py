"""The `ctxmem` command line: ask (the main job), index (the knowledge index), compressor."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Before torch loads OpenMP: idle worker threads sleep instead of spinning. On a loaded or shared
# machine spinning threads steal the cores the busy ones need (measured ~10x slower reads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._cli import HANDLED, error_line, fail, handled, interrupted, resolve_device  # noqa: E402
from .index.errors import KnowledgeIndexError  # noqa: E402


def _parse_overrides(pairs: list[str]) -> dict:
    from .config import MemoryConfig

    fields = MemoryConfig.__dataclass_fields__
    out = {}
    for pair in pairs or []:
        key, sep, val = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set expects KEY=VALUE with KEY one of {sorted(fields)}; got {pair!r}")
        if val.lower() == "none":
            out[key] = None
        else:
            casts = (int, float, str) if "float" in str(fields[key].type) else (int, str)
            for cast in casts:
                try:
                    out[key] = cast(val)
                    break
                except ValueError:
                    pass
    return out


@handled("ctxmem ask", (KnowledgeIndexError, *HANDLED), hint="")
def cmd_ask(args) -> int:
    from pathlib import Path

    from .reading import build_prompt, read_text_file

    t0 = time.perf_counter()
    # the inputs are checked before torch and the model load, so a mistake is named at once
    context = read_text_file(args.context) if args.context else ""
    if not context and not args.knowledge and not args.memory:
        raise ValueError("give --context FILE, --memory PATH and/or --knowledge KB")
    if args.memory and args.stock:
        raise ValueError("--memory needs ctxmem (drop --stock)")
    if args.compressor:
        if not args.knowledge:
            raise ValueError("--compressor compresses the knowledge index's hits; give --knowledge KB too")
        if args.stock:
            raise ValueError("--compressor needs ctxmem (drop --stock)")
        if args.memory:
            raise ValueError("--compressor cannot be combined with --memory yet (a saved memory holds no "
                             "knowledge prefix); drop one of them")
    if args.memory and not context and not Path(args.memory).exists():
        raise ValueError(f"no memory at {args.memory}; give --context FILE to read one and save it there")
    import torch

    from . import MemoryConfig, load_model, wrap

    torch.set_grad_enabled(False)
    device = resolve_device(args.device)
    model, tok = load_model(args.model, device=device)
    knowledge_text = None
    kb = None
    if args.knowledge:
        from .index import KnowledgeIndex
        from .index.augment import knowledge_context

        kb = KnowledgeIndex.open(args.knowledge)
        if not args.compressor:  # with a compressor the wrapper reads the hits as summary tokens, below
            knowledge_text = knowledge_context(kb, args.question, tok, budget_tokens=args.knowledge_budget)
    overrides = _parse_overrides(args.set)
    if args.ram_budget is not None:
        overrides["ram_budget"] = args.ram_budget
    if not args.stock:
        extra = {}
        if args.compressor:
            extra = dict(knowledge=kb, knowledge_budget=args.knowledge_budget, compressor=args.compressor)
        wrap(model, MemoryConfig(**overrides), tokenizer=tok, progress=not args.json, **extra)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    memory_report = None
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    knowledge_report = None
    if args.memory:
        ids, memory, memory_report = _memory_for(args, model, tok, context, knowledge_text)
        out = model.generate(torch.tensor([ids], device=device), cache=memory, **gen)
    elif args.compressor:
        from .hf import read_knowledge

        # the hits for the question (as the text path queries), read as [BOS, summary tokens] before the prompt
        memory = read_knowledge(model, [args.question])
        knowledge_report = {"summary_positions": memory.hidden_prefix[0], "budget_positions": args.knowledge_budget,
                            "compressor": getattr(model._ctxmem.compressor, "source", None)}
        ids = build_prompt(tok, context, args.question, None)
        out = model.generate(torch.tensor([ids], device=device), cache=memory, **gen)
    else:
        ids = build_prompt(tok, context, args.question, knowledge_text)
        out = model.generate(torch.tensor([ids], device=device), **gen)
    t_answer = time.perf_counter() - t1
    answer = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    peak = _peak_rss_mb()
    report = {"answer": answer, "context_tokens": len(ids), "seconds_answer": round(t_answer, 2),
              "seconds_load": round(t_load, 2), "tokens_per_second_read": round(len(ids) / t_answer, 1),
              "peak_rss_mb": round(peak), "mode": "stock" if args.stock else "ctxmem",
              "device": device}
    state = getattr(model, "_ctxmem", None)
    if state is not None:
        report["reader"] = getattr(state.reader, "source", None)  # the adapter used for the answer, if any
        # which implementation of the fused op ran (layer calls per backend): cuda, numba, batched or torch
        report["backends"] = dict(getattr(state.last_memory, "backends_run", None) or {})
        reread = getattr(state.last_memory, "reread_ids", None)
        if reread and reread[0]:  # the passages read again before the question (MemoryConfig.reread_tokens)
            report["reread"] = {"tokens": len(reread[0]), "text": tok.decode(reread[0])}
    if memory_report:
        report["memory"] = memory_report
    if knowledge_report:
        report["knowledge"] = knowledge_report
    if args.json:
        print(json.dumps(report))
    else:
        print(answer)
        mem = f" · memory {memory_report['action']} ({memory_report['seconds']:.1f} s)" if memory_report else ""
        if knowledge_report:
            mem += f" · knowledge as {knowledge_report['summary_positions']} summary positions"
        if report.get("reread"):
            mem += f" · {report['reread']['tokens']} tokens of passages read again"
        print(f"-- {len(ids):,} context tokens · answered in {t_answer:.1f} s "
              f"({report['tokens_per_second_read']:,.0f} tok/s) · peak RSS {peak:,.0f} MB · {report['mode']}"
              f"{' (' + ', '.join(report['backends']) + ')' if report.get('backends') else ''}{mem}",
              file=sys.stderr)
    return 0


def _memory_for(args, model, tok, context: str, knowledge_text: str | None):
    """``--memory PATH``: load the document's saved memory, or read the document and save it there.

    The memory is keyed by the document's sha256 (kept in the memory's manifest): a changed
    document is read again and the memory replaced (atomically).
    """
    import hashlib
    from pathlib import Path

    import torch

    from . import load_memory, read_memory, save_memory
    from .memory.persist import MANIFEST, read_manifest
    from .reading import build_prompt_parts

    path = Path(args.memory)
    t = time.perf_counter()
    digest = hashlib.sha256(context.encode()).hexdigest() if context else None
    from .memory import MemoryMismatchError

    saved = read_manifest(path) if (path / MANIFEST).exists() else None
    memory = None
    if saved is not None and (digest is None or saved["meta"].get("source_sha256") == digest):
        try:
            memory = load_memory(model, path)
        except MemoryMismatchError:
            if not context:
                raise
            # another model or block layout made it: read the document again below
    if memory is not None:
        prefix = memory.token_ids[0]
        _, suffix = build_prompt_parts(tok, "", args.question, knowledge_text)
        action = "loaded"
    elif context:
        prefix, suffix = build_prompt_parts(tok, context, args.question, knowledge_text)
        memory = read_memory(model, torch.tensor([prefix], device=next(model.parameters()).device))
        save_memory(model, path, memory, meta={"source_sha256": digest, "source_name": Path(args.context).name})
        action = "read and saved"
    else:
        raise ValueError(f"no memory at {path}; give --context FILE to read one and save it there")
    return prefix + suffix, memory, {"path": str(path), "action": action, "seconds": round(time.perf_counter() - t, 2),
                                     "tokens": len(prefix)}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctxmem", description="Long-context memory for Hugging Face causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="read a long file and answer a question from it")
    ask.add_argument("question")
    ask.add_argument("--context", help="text file to read (any length)")
    ask.add_argument("--knowledge", help="knowledge index folder (from `ctxmem index build`)")
    ask.add_argument("--knowledge-budget", type=int, default=1024,
                     help="tokens of retrieved notes (default 1024); with --compressor, decoder positions of "
                          "their summary tokens (about ratio x more text)")
    ask.add_argument("--compressor", metavar="NAME_OR_PATH",
                     help="read the --knowledge hits as summary tokens of this compressor (e.g. smollm2-r8)")
    ask.add_argument("--model", default="smollm2", help="bundled name or HF id/path (default: smollm2)")
    ask.add_argument("--max-new-tokens", type=int, default=48)
    ask.add_argument("--memory", metavar="PATH",
                     help="saved memory of the document: loaded if it exists (no re-reading), else the "
                          "--context is read once and saved there")
    ask.add_argument("--ram-budget", metavar="SIZE",
                     help="keep at most SIZE (e.g. 1GB) of KV blocks in RAM; colder blocks go to disk")
    ask.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a MemoryConfig field")
    ask.add_argument("--stock", action="store_true", help="run the unwrapped model (for comparison)")
    ask.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where the model runs (default auto: cuda when torch sees a GPU, else cpu)")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.set_defaults(func=cmd_ask)

    try:
        from .index.cli import add_index_parser
    except ImportError:  # the index tier is optional at import time
        add_index_parser = None
    if add_index_parser is not None:
        add_index_parser(sub)
    try:
        from .compress.cli import add_compressor_parser
    except ImportError:  # the compressor tier is optional at import time
        add_compressor_parser = None
    if add_compressor_parser is not None:
        add_compressor_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 ok, 1 a handled error (one line on stderr; with --json one JSON object
    ``{"ok": false, "error", "kind"}`` on stdout), 2 bad usage (argparse), 130 Ctrl-C."""
    args = build_parser().parse_args(argv)
    prefix = f"ctxmem {args.command}"
    as_json = getattr(args, "json", False)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `ctxmem ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # outside a handler (e.g. while importing): still no traceback
        return interrupted(prefix, as_json)
    except (KnowledgeIndexError, *HANDLED) as e:  # a handler without its own net
        return fail(prefix, error_line(e), as_json, kind=type(e).__name__)


if __name__ == "__main__":
    sys.exit(main())

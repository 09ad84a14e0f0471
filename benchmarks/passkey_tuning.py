"""Passkey *tuning* prompts: where configurations and checkpoints are chosen, never the benchmark's.

Ten prompts at one length: depths 0.02 + 0.1 i, keys ``passkey_key(777 + 1000 i + length)``, haystack
seeds 50 + i (``benchmarks.passkey`` uses other depths, keys and seeds). The reader's pre-registered gate
(``benchmarks/preregistered/reader.md``) ran this at 16K.

    python -m benchmarks.passkey_tuning --length 16384 --variant r2:reader=/path/to/run --variant off:reader=none
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import ctxmem
from benchmarks.common import found, parse_variant, passkey_key, passkey_prompt
from benchmarks.passkey import answer

DEPTHS = [0.02 + 0.1 * i for i in range(10)]  # the same floats the gate used (not rounded)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--haystack", default="filler", choices=["filler", "real"])
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="a MemoryConfig to run (repeatable; default: the defaults)")
    p.add_argument("--indices", default="", help="run only these prompts (comma list of 0-9)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    variants = dict(parse_variant(spec) for spec in args.variant or ["default:"])
    idx = [int(x) for x in args.indices.split(",")] if args.indices else list(range(len(DEPTHS)))
    model, tok = ctxmem.load_model("smollm2")
    results = {}
    for name, over in variants.items():
        ctxmem.wrap(model, ctxmem.MemoryConfig(**over), tokenizer=tok)
        rows, t0 = [], time.time()
        for i in idx:
            key = passkey_key(777 + 1000 * i + args.length)
            ids = passkey_prompt(tok, args.haystack, args.length, DEPTHS[i], key, seed=50 + i)
            text, *_ = answer(model, tok, ids, 12)
            rows.append(dict(depth=DEPTHS[i], key=key, found=found(text, key), answer=text))
            print(f"  {name} d={DEPTHS[i]:.2f} {rows[-1]['found']} {text[:50]!r}", flush=True)
        ctxmem.unwrap(model)
        hits = sum(r["found"] for r in rows)
        print(f"{name}: {hits}/{len(rows)} at {args.length} ({time.time() - t0:.0f} s) {over}", flush=True)
        results[name] = dict(config=over, found=hits, n=len(rows), rows=rows)
    if args.json:
        print(json.dumps(dict(length=args.length, haystack=args.haystack, variants=results)))


if __name__ == "__main__":
    main()

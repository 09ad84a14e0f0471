"""Is RULER vt failing at retrieval or at reading? For each vt prompt: which of the chain's statements the
question chunk attends, which any of the first decode steps attends, and what the model writes.

    python -m benchmarks.vt_attended --length 4096 --samples 2 --reader smollm2-reader --reader /path/to/run

Prints one line per (reader, sample); nothing is written (a probe, minutes on 2 cores).
"""
from __future__ import annotations

import argparse

import torch

import ctxmem
from benchmarks.tasks.ruler import vt
from ctxmem.hf.wrap import new_cache
from ctxmem.reader.train import attended_text


def probe(model, tok, length: int, seed: int, steps: int) -> tuple[str, list[bool], list[bool]]:
    s = vt(tok, length, seed=seed)
    stmts = s.meta["statements"]
    cache = new_cache(model)
    cache.record_selection = True
    out = model(torch.tensor([s.ids]), cache=cache, logits_to_keep=1)
    seen = [[st in attended_text(cache, tok) for st in stmts]]
    written = []
    for _ in range(steps):  # greedy decoding by hand, so each step's selection can be read
        written.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([written[-1:]]), cache=cache, logits_to_keep=1)
        seen.append([st in attended_text(cache, tok) for st in stmts])
    return tok.decode(written), seen[0], [any(x[i] for x in seen) for i in range(len(stmts))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="decode steps to follow")
    p.add_argument("--reader", action="append", default=[], help="reader name/folder (repeatable; 'none' = off)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, tok = ctxmem.load_model("smollm2")
    for reader in args.reader or ["smollm2-reader"]:
        ctxmem.wrap(model, ctxmem.MemoryConfig(reader=None if reader == "none" else reader), tokenizer=tok)
        for seed in range(args.samples):
            text, at_question, any_step = probe(model, tok, args.length, seed, args.steps)
            print(f"{reader} sample {seed}: statements attended at the question {at_question}, "
                  f"by some decode step {any_step}; wrote {text!r}", flush=True)
        ctxmem.unwrap(model)


if __name__ == "__main__":
    main()

"""Model-level check of the fused-op backends: torch reference vs numba, same model, same run.

SmolLM2-135M reads a 16K-token prompt and generates greedily with each backend; the tokens must
be identical. Reports prefill seconds and decode ms/token per backend and their ratios (the op-level
kernel numbers are in benchmarks/ops.py). Writes benchmarks/results/backends.json.

These machines are shared and their speed drifts by 10-20% over minutes, so the backends run in
``--rounds`` rounds, each round every backend once, back to back; the speed-ups reported are the
medians of the per-round ratios (each ratio compares runs minutes apart, not a run against a
number from another hour).

    python -m benchmarks.backends [--tokens 16384] [--new 16] [--selector keys] [--rounds 3]
    python -m benchmarks.backends --config '{"prefill_chunk": 512}' --out backends_chunk512
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import ctxmem
from benchmarks.common import machine, passkey_key, passkey_prompt, write_json
from benchmarks.passkey import answer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--selector", default="keys", help="keys isolates the op; embed adds the embedder's cost")
    p.add_argument("--backends", default="torch,numba")
    p.add_argument("--rounds", type=int, default=3, help="each backend once per round; ratios per round")
    p.add_argument("--config", default="{}", help="other MemoryConfig settings as JSON (default: the defaults)")
    p.add_argument("--out", default="backends", help="result name under benchmarks/results (default backends)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    import json

    try:
        overrides = json.loads(args.config)
        if not isinstance(overrides, dict) or {"backend", "selector"} & set(overrides):
            raise ValueError("give a JSON object of MemoryConfig settings other than backend and selector")
        ctxmem.MemoryConfig(**overrides).validate()
    except (ValueError, TypeError) as e:
        p.error(f"--config: {e}")
    torch.set_grad_enabled(False)
    model, tok = ctxmem.load_model("smollm2")
    key = passkey_key(7)
    ids = passkey_prompt(tok, "filler", args.tokens, 0.5, key)
    names = args.backends.split(",")
    rounds = []
    for r in range(args.rounds):
        runs = {}
        for be in names:
            ctxmem.wrap(model, ctxmem.MemoryConfig(backend=be, selector=args.selector, **overrides), tokenizer=tok)
            if be == "numba" and r == 0:
                answer(model, tok, ids[:, :600], 2)  # pay numba's one-time compile/cache load outside the timing
            text, sec, prefill, decode = answer(model, tok, ids, args.new)
            ctxmem.unwrap(model)
            runs[be] = dict(seconds=round(sec, 2), prefill_seconds=round(prefill, 2),
                            decode_ms_per_token=round(1000 * decode, 2), answer=text)
            print(f"round {r + 1}", be, runs[be], flush=True)
        rounds.append(runs)
    answers = {run["answer"] for runs in rounds for run in runs.values()}
    import dataclasses

    cfg = ctxmem.MemoryConfig(backend=names[0], selector=args.selector, **overrides)
    res = dict(machine=machine(), tokens=int(ids.shape[1]), new_tokens=args.new, selector=args.selector,
               config={k: v for k, v in dataclasses.asdict(cfg).items() if k != "backend"},
               rounds=rounds, identical_tokens=len(answers) == 1)
    if len(names) == 2:
        a, b = names

        def ratios(field):
            return [round(rr[a][field] / rr[b][field], 3) for rr in rounds]

        res["prefill_speedups"] = ratios("prefill_seconds")
        res["decode_speedups"] = ratios("decode_ms_per_token")
        res["prefill_speedup"] = round(statistics.median(res["prefill_speedups"]), 2)
        res["decode_speedup"] = round(statistics.median(res["decode_speedups"]), 2)
    res["command"] = "python -m benchmarks.backends " + " ".join(sys.argv[1:])
    print(write_json(args.out, res))
    print({k: res.get(k) for k in ("identical_tokens", "prefill_speedups", "prefill_speedup",
                                   "decode_speedups", "decode_speedup")})


if __name__ == "__main__":
    main()

"""Model-level check of the fused-op backends: torch reference vs numba, same model, same run.

SmolLM2-135M reads a 16K-token prompt and generates greedily with each backend; the tokens must
be identical. Reports prefill seconds and decode ms/token per backend and their ratios (the op-level
kernel numbers are in benchmarks/ops.py). Writes benchmarks/results/backends.json.

    python -m benchmarks.backends [--tokens 16384] [--new 16] [--selector keys]
"""
from __future__ import annotations

import argparse

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
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model, tok = ctxmem.load_model("smollm2")
    key = passkey_key(7)
    ids = passkey_prompt(tok, "filler", args.tokens, 0.5, key)
    runs = {}
    for be in args.backends.split(","):
        ctxmem.wrap(model, ctxmem.MemoryConfig(backend=be, selector=args.selector), tokenizer=tok)
        if be == "numba":
            answer(model, tok, ids[:, :600], 2)  # pay numba's one-time compile/cache load outside the timing
        text, sec, prefill, decode = answer(model, tok, ids, args.new)
        ctxmem.unwrap(model)
        runs[be] = dict(seconds=round(sec, 2), prefill_seconds=round(prefill, 2),
                        decode_ms_per_token=round(1000 * decode, 2), answer=text)
        print(be, runs[be], flush=True)
    names = list(runs)
    res = dict(machine=machine(), tokens=int(ids.shape[1]), new_tokens=args.new, selector=args.selector, runs=runs,
               identical_tokens=len({r["answer"] for r in runs.values()}) == 1)
    if len(names) == 2:
        a, b = runs[names[0]], runs[names[1]]
        res["prefill_speedup"] = round(a["prefill_seconds"] / b["prefill_seconds"], 2)
        res["decode_speedup"] = round(a["decode_ms_per_token"] / b["decode_ms_per_token"], 2)
    print(write_json("backends", res))
    print({k: res.get(k) for k in ("identical_tokens", "prefill_speedup", "decode_speedup")})


if __name__ == "__main__":
    main()

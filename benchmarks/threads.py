"""What OpenMP's idle-thread policy costs: the same read under three settings, idle and loaded.

Each run is a fresh process that imports torch first (as a library user's script does), so the
setting in its environment is the one libgomp reads. It reads a passkey prompt with the numba
backend and key selector and reports prefill seconds and decode ms/token. Settings:
libgomp's default (spin, then sleep), ``GOMP_SPINCOUNT=1000`` and ``OMP_WAIT_POLICY=PASSIVE``
(what the CLI and the benchmarks set). ``--busy-runs N`` adds N rounds with one core kept busy by
another process. Writes benchmarks/results/threads.json.

    python -m benchmarks.threads [--tokens 8192] [--runs 2] [--busy-runs 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.common import machine, write_json

SETTINGS = {"default": {}, "spincount_1000": {"GOMP_SPINCOUNT": "1000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}

CHILD = """
import json, sys
import torch                       # first, as a user's script would: libgomp reads its settings now
torch.set_grad_enabled(False)
import ctxmem
from benchmarks.common import passkey_key, passkey_prompt
from benchmarks.passkey import answer
model, tok = ctxmem.load_model("smollm2")
ids = passkey_prompt(tok, "filler", int(sys.argv[1]), 0.5, passkey_key(7))
ctxmem.wrap(model, ctxmem.MemoryConfig(backend="numba", selector="keys"), tokenizer=tok)
answer(model, tok, ids[:, :600], 2)   # numba's kernels loaded outside the timing
text, sec, prefill, decode = answer(model, tok, ids, 16)
print(json.dumps(dict(prefill_s=round(prefill, 2), decode_ms=round(1000 * decode, 1))))
"""


def run_one(setting: str, tokens: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[setting])
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    res = subprocess.run([sys.executable, "-c", CHILD, str(tokens)], env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{setting}: child failed\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--runs", type=int, default=2, help="rounds on the idle machine (settings interleaved)")
    p.add_argument("--busy-runs", type=int, default=1, help="rounds with one core kept busy (0 = none)")
    args = p.parse_args()
    runs = []
    for cond, rounds in (("idle", args.runs), ("one_core_busy", args.busy_runs)):
        busy = None
        if cond == "one_core_busy" and rounds:
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for r in range(rounds):
                for s in SETTINGS:
                    row = dict(condition=cond, setting=s, round=r, **run_one(s, args.tokens))
                    print(row, flush=True)
                    runs.append(row)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    summary = {}
    for cond in ("idle", "one_core_busy"):
        for s in SETTINGS:
            xs = [r["prefill_s"] for r in runs if r["condition"] == cond and r["setting"] == s]
            if xs:
                summary.setdefault(cond, {})[s] = dict(prefill_s_mean=round(sum(xs) / len(xs), 2), runs=len(xs))
    res = dict(machine=machine(), tokens=args.tokens, settings=SETTINGS, runs=runs, summary=summary,
               note="fresh process per run; torch imported before anything else; numba backend, key selector")
    print(write_json("threads", res))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Microbenchmark of the fused retrieval-attention op alone: numba vs the torch reference.

SmolLM2-135M shapes (9 query heads, 3 KV heads, head dim 64) with the default memory layout
(block 64, top-32 blocks, 64 sinks, 1024 local tokens, 4 representatives per block); a decode
step (C = 1) and a 512-query prefill chunk, at 4K / 16K / 32K tokens of context, fp32 and bf16.

Both backends run in the same process, interleaved call by call (these machines are shared and
noisy): the ratio is the number to read. Each call reads the K/V of a different "layer" (as a
model does), cycling through enough layers that the caches span several times the L3, so decode
bytes/s are memory bytes/s, not cache hits. The memory bandwidth ceiling is measured in the
same run with a plain copy (bytes read + bytes written per second).

    python -m benchmarks.ops [--contexts 4096,16384,32768] [--reps 7] [--quick]

writes benchmarks/results/ops.json (and ops.png when matplotlib is there).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ctxmem.ops import OpParams, retrieval_attention_ref, row_layout
from ctxmem.ops import numba_kernels
from ctxmem._atomic import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = dict(B=1, Hq=9, Hkv=3, D=64, R=4)
PARAMS = dict(block_size=64, topk=32, sink=64, local=1024)


def copy_bandwidth(nbytes: int = 512 << 20, reps: int = 5) -> dict:
    """Plain-copy bandwidth, counting bytes read plus bytes written (the usual convention)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    ts1 = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)  # single-threaded
        ts1.append(time.perf_counter() - t0)
    return {"bytes": nbytes, "torch_copy_GBps": 2 * nbytes / min(ts) / 1e9,
            "numpy_copy_1thread_GBps": 2 * nbytes / min(ts1) / 1e9}


def touched(N: int, C: int, p: OpParams, dtype) -> dict:
    """Bytes of K/V/reps the op must read (each once) and the attention FLOPs of one call."""
    B, Hq, Hkv, D, R = (SHAPE[k] for k in ("B", "Hq", "Hkv", "D", "R"))
    es = torch.finfo(dtype).bits // 8
    t = N - C
    lay = row_layout(t, p)
    keys = lay.s_end + lay.nsel * p.block_size + (N - lay.local_start)
    scored = lay.nmid if lay.nsel < lay.nmid else 0
    kv = B * Hkv * keys * D * 2 * es
    reps = B * Hkv * scored * R * D * es
    # each query sees sinks + blocks + the local keys up to its own position
    base = lay.s_end + lay.nsel * p.block_size + (t - lay.local_start)
    pairs = sum(base + i + 1 for i in range(C))
    return {"keys_per_head": keys, "kv_bytes": kv, "reps_bytes": reps, "bytes": kv + reps,
            "flops": 4 * B * Hq * pairs * D}


def make_layers(N: int, C: int, dtype, n_layers: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, D, R = (SHAPE[k] for k in ("B", "Hq", "Hkv", "D", "R"))
    S = PARAMS["block_size"]
    layers = []
    for _ in range(n_layers):
        k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
        reps = torch.randn(B, Hkv, N // S + 1, R, D, generator=g).to(dtype)
        layers.append((k, v, reps))
    q = torch.randn(B, Hq, C, D, generator=g).to(dtype)
    return q, layers


def bench_case(N: int, C: int, dtype, reps: int, cache_bytes: int, threads: int | None = None) -> dict:
    B, Hkv, D = SHAPE["B"], SHAPE["Hkv"], SHAPE["D"]
    p = OpParams(scaling=D ** -0.5, **PARAMS)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    es = torch.finfo(dtype).bits // 8
    per_layer = 2 * B * Hkv * N * D * es
    n_layers = max(2, min(64, -(-cache_bytes // per_layer)))
    q, layers = make_layers(N, C, dtype, n_layers)
    lengths, n_new = torch.tensor([N]), torch.tensor([C])
    fns = {"torch": retrieval_attention_ref, "numba": numba_kernels.retrieval_attention_numba}
    # correctness on this very input (and warm-up of both)
    k, v, rp = layers[0]
    ref_o, ref_s = fns["torch"](q, k, v, rp, lengths, n_new, p, inv)
    nb_o, nb_s = fns["numba"](q, k, v, rp, lengths, n_new, p, inv)
    err = (ref_o.float() - nb_o.float()).abs().max().item()
    same_sel = bool(torch.equal(ref_s, nb_s))
    times = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    saved = (torch.get_num_threads(), numba_kernels.numba.get_num_threads())
    if threads:
        torch.set_num_threads(threads)
        numba_kernels.numba.set_num_threads(threads)
    try:
        li = 0
        for _ in range(reps):
            for name in ("torch", "numba"):  # interleaved: both see the same machine state
                k, v, rp = layers[li % n_layers]
                li += 1
                c0, t0 = time.process_time(), time.perf_counter()
                fns[name](q, k, v, rp, lengths, n_new, p, inv)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    finally:
        torch.set_num_threads(saved[0])
        numba_kernels.numba.set_num_threads(saved[1])
    tb = touched(N, C, p, dtype)
    res = {"context": N, "chunk": C, "dtype": str(dtype).replace("torch.", ""),
           "threads": threads or "default", "layers_cycled": n_layers,
           "max_abs_err": err, "selected_equal": same_sel, **tb}
    for name, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        res[name] = {"median_ms": med * 1e3, "min_ms": best * 1e3,
                     "cpu_median_ms": statistics.median(cpu[name]) * 1e3,
                     "GBps": tb["bytes"] / med / 1e9, "GFLOPs": tb["flops"] / med / 1e9}
    res["speedup_median"] = res["torch"]["median_ms"] / res["numba"]["median_ms"]
    res["speedup_min"] = res["torch"]["min_ms"] / res["numba"]["min_ms"]
    res["speedup_cpu_time"] = res["torch"]["cpu_median_ms"] / res["numba"]["cpu_median_ms"]
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--chunks", default="1,512")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cache-mb", type=int, default=256, help="K/V bytes cycled through per case")
    ap.add_argument("--threads", default="0,1",
                    help="thread counts to run each case with (0 = the libraries' default, all cores)")
    ap.add_argument("--quick", action="store_true", help="one context, 3 reps (smoke run)")
    ap.add_argument("--out", default=str(RESULTS / "ops.json"))
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from --out")
    a = ap.parse_args(argv)
    if a.replot:
        data = json.loads(Path(a.out).read_text())
        _plot(data["results"], Path(a.out).with_suffix(".png"))
        return data
    if a.quick:
        a.contexts, a.reps = "4096", 3
    load0 = _load()
    t0 = time.perf_counter()
    numba_kernels.warmup()
    warm = time.perf_counter() - t0
    bw = copy_bandwidth()
    print(f"numba warm-up (compile or cache load): {warm:.1f} s; copy bandwidth "
          f"{bw['torch_copy_GBps']:.1f} GB/s (torch, {torch.get_num_threads()} threads), "
          f"{bw['numpy_copy_1thread_GBps']:.1f} GB/s (1 thread), read+write")
    rows = []
    for th in (int(x) or None for x in a.threads.split(",")):
        for N in map(int, a.contexts.split(",")):
            for C in map(int, a.chunks.split(",")):
                for dn in a.dtypes.split(","):
                    r = bench_case(N, C, getattr(torch, dn), a.reps, a.cache_mb << 20, th)
                    r["numba"]["frac_of_copy_bw"] = r["numba"]["GBps"] / bw["torch_copy_GBps"]
                    rows.append(r)
                    print(f"thr={str(r['threads']):7s} N={N:6d} C={C:4d} {r['dtype']:8s} "
                          f"torch {r['torch']['median_ms']:8.2f} ms  numba {r['numba']['median_ms']:7.2f} ms  "
                          f"x{r['speedup_median']:5.2f} (cpu-time x{r['speedup_cpu_time']:5.2f})  "
                          f"numba {r['numba']['GBps']:6.2f} GB/s ({100 * r['numba']['frac_of_copy_bw']:4.1f}% of copy) "
                          f"{r['numba']['GFLOPs']:6.1f} GFLOP/s  err {r['max_abs_err']:.1e} sel_eq {r['selected_equal']}")
    out = {
        "benchmark": "fused retrieval-attention op, numba vs torch reference",
        "shape": SHAPE, "params": PARAMS,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "numba_threads": numba_kernels.numba.get_num_threads(),
                    "numba_threading_layer": _threading_layer(),
                    "loadavg_start_end": [load0, _load()]},
        "numba_warmup_s": warm, "copy_bandwidth": bw, "results": rows,
        "notes": ("Times are wall-clock medians of interleaved calls in one process (cpu_median_ms: "
                  "process CPU time, robust to other load when threads=1); bytes = K/V (+ "
                  "block representatives) the op must read once per call; GB/s = bytes / median time; "
                  "copy bandwidth counts read + write. bf16 is read in place (16-bit loads widened in "
                  "the kernel), so it touches half the bytes of fp32."),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(a.out, (json.dumps(out, indent=1) + "\n").encode())
    _plot(rows, Path(a.out).with_suffix(".png"))
    print(f"wrote {a.out}")
    return out


def _load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _threading_layer():
    try:
        return numba_kernels.numba.threading_layer()
    except ValueError:
        return None


def _plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"default": "-", 1: ":"}
    colors = {("torch", "float32"): "0.35", ("torch", "bfloat16"): "0.7",
              ("numba", "float32"): "tab:blue", ("numba", "bfloat16"): "tab:cyan"}
    for ax, C in zip(axes, (1, 512)):
        for th, ls in styles.items():
            for dt in ("float32", "bfloat16"):
                sel = [r for r in rows if r["chunk"] == C and r["dtype"] == dt and r["threads"] == th]
                if not sel:
                    continue
                xs = [r["context"] for r in sel]
                for name in ("torch", "numba"):
                    ax.plot(xs, [r[name]["median_ms"] for r in sel], ls, color=colors[(name, dt)],
                            marker="o", label=f"{name} {dt} ({'all cores' if th == 'default' else '1 thread'})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel("ms per call (median, log scale)")
        ax.set_title("decode step" if C == 1 else f"prefill chunk of {C} queries")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=6.5, loc="center right")
    fig.suptitle("fused retrieval attention, one layer, SmolLM2 shapes: numba vs torch reference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

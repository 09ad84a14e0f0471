"""Memory that lasts: peak RSS vs context length, save/load reuse, and the cost of cold dtypes.

Every measurement runs in a fresh child process (so ``ru_maxrss`` is that run's own peak) on a
passkey haystack; the parent collects the children's JSON lines into
benchmarks/results/memory.json and memory_rss.png.

    python -m benchmarks.memory rss --lengths 32768,131072     # peak RSS, all-in-RAM vs tiered
    python -m benchmarks.memory reuse --tokens 32768           # load_memory + answer vs read again
    python -m benchmarks.memory dtypes --tokens 16384          # fp32 / fp16 / int8 cold blocks
    python -m benchmarks.memory all                            # the three above (README's numbers)
    python -m benchmarks.memory store --tokens 1048576         # the store alone at 1M tokens (no model)
    python -m benchmarks.memory rss --lengths 1048576 --tiered-only   # 1M tokens through the model (~1.5 h)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine, write_json

SUFFIX = 32  # the question's tokens: the memory holds everything before them


def _child(spec: dict) -> dict:
    """Run one measurement in a fresh process; returns its JSON report (its progress and trace
    lines go to our stderr as they happen)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "child", json.dumps(spec)],
                         stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"child {spec} failed ({out.returncode}); its stderr is above")
    rep = json.loads(lines[-1])
    print(json.dumps(rep), flush=True)
    return rep


class RssTrace:
    """Samples (seconds, tokens read, RSS now, peak RSS) every ``every`` seconds on a thread, so a
    long read shows its rate and memory as it goes and the report keeps the curve."""

    def __init__(self, memory, every: float = 30.0):
        import threading

        self.memory, self.every, self.rows = memory, every, []
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        from benchmarks.common import current_rss_mb, peak_rss_mb

        row = [round(time.perf_counter() - self.t0, 1), int(self.memory.seen), round(current_rss_mb()),
               round(peak_rss_mb())]
        self.rows.append(row)
        rate = row[1] / row[0] if row[0] else 0.0
        print(f"trace: {row[0]:8.0f} s  {row[1]:>9,} tokens  {rate:6.0f} tok/s  rss {row[2]:,} MB  peak {row[3]:,} MB",
              file=sys.stderr, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def child(spec: dict) -> dict:
    import torch

    import ctxmem
    from benchmarks.common import found, passkey_key, passkey_prompt, peak_rss_mb, current_rss_mb

    torch.set_grad_enabled(False)
    model, tok = ctxmem.load_model("smollm2")
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    ctxmem.wrap(model, ctxmem.MemoryConfig(**spec.get("config", {})), tokenizer=tok)
    rss_ready = current_rss_mb()
    n, depth = spec["tokens"], spec.get("depth", 0.5)
    key = passkey_key(n + int(depth * 100))
    ids = passkey_prompt(tok, "filler", n, depth, key)
    prefix = ids[:, :-SUFFIX]
    rep = {"task": spec["task"], "tokens": int(ids.shape[1]), "config": spec.get("config", {}),
           "weights_mb": round(weights_mb), "rss_after_load_mb": round(rss_ready)}
    t0 = time.perf_counter()
    if spec["task"] == "load":
        memory = ctxmem.load_memory(model, spec["path"])
        if memory.token_ids[0] != prefix[0].tolist():
            raise RuntimeError("the loaded memory holds other tokens than this prompt's document")
        rep["seconds_load"] = round(time.perf_counter() - t0, 2)
    else:
        memory = ctxmem.new_cache(model)
        with RssTrace(memory, spec.get("trace_every", 30.0)) as trace:
            memory = ctxmem.read_memory(model, prefix, memory=memory)
        rep["seconds_read"] = round(time.perf_counter() - t0, 2)
        rep["trace"] = {"columns": ["seconds", "tokens", "rss_mb", "peak_rss_mb"], "rows": trace.rows}
        if spec.get("save"):
            t1 = time.perf_counter()
            ctxmem.save_memory(model, spec["save"], memory)
            rep["seconds_save"] = round(time.perf_counter() - t1, 2)
            rep["saved_mb"] = round(sum(p.stat().st_size for p in Path(spec["save"]).iterdir()) / 2**20)
    if spec["task"] == "ppl":
        rep.update(_ppl(model, tok, memory, spec))
    else:
        t2 = time.perf_counter()
        out = model.generate(ids, cache=memory, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        rep["seconds_answer"] = round(time.perf_counter() - t2, 2)
        rep["answer"] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        rep["found"] = found(rep["answer"], key)
    rep["seconds_total"] = round(time.perf_counter() - t0, 2)
    rep["peak_rss_mb"] = round(peak_rss_mb())
    if memory.cold is not None:
        rep["cold"] = dict(memory.cold.stats, blocks=len(memory.cold), ram_mb=round(memory.cold.ram_bytes / 2**20))
    return rep


def _ppl(model, tok, memory, spec) -> dict:
    """Mean next-token NLL on real text that follows the (filler) document: the stored blocks'
    precision is what differs between the runs, so differences here are the dtype's cost."""
    import torch

    from benchmarks.common import real_text

    text_ids = tok(real_text(), add_special_tokens=False)["input_ids"][: spec.get("eval_tokens", 1024) + 1]
    x = torch.tensor([text_ids])
    nll, count = 0.0, 0
    for s in range(0, x.shape[1] - 1, 128):
        chunk = x[:, s:s + 128]
        tgt = x[:, s + 1:s + 129]
        out = model(chunk[:, : tgt.shape[1]], cache=memory)
        logp = torch.log_softmax(out.logits.float(), -1)
        nll -= float(logp.gather(-1, tgt[..., None]).sum())
        count += tgt.shape[1]  # the memory grows as it reads: later chunks see the earlier ones
    return {"nll": round(nll / count, 5), "eval_tokens": count}


def store_only(n: int, budget: str, cold_dtype: str) -> dict:
    """The working-memory store of SmolLM2's shape (30 layers x 3 KV heads x 64 dims, fp32) filled
    with n tokens of synthetic keys/values through the real update/spill/cold path, then decode
    steps' op inputs built over it: RAM and time of the memory layer itself, without the model's
    compute (reading 1M tokens through SmolLM2 takes about an hour on these 2 cores)."""
    import torch

    from benchmarks.common import current_rss_mb, peak_rss_mb
    from ctxmem import MemoryConfig
    from ctxmem.hf import MemoryCache

    torch.set_grad_enabled(False)
    layers, H, D, Hq, C = 30, 3, 64, 9, 128
    cfg = MemoryConfig(ram_budget=budget, cold_dtype=cold_dtype)
    inv = 1.0 / (100000 ** (torch.arange(0, D, 2).float() / D))
    cache = MemoryCache(layers, cfg, inv)
    g = torch.Generator().manual_seed(0)
    pool = [(torch.randn(1, H, C, D, generator=g), torch.randn(1, H, C, D, generator=g)) for _ in range(8)]
    ids = torch.zeros(1, C, dtype=torch.long)
    valid = torch.ones(1, C, dtype=torch.bool)
    rss0 = current_rss_mb()
    t0 = time.perf_counter()
    from tqdm import tqdm
    for i, s in enumerate(tqdm(range(0, n, C), desc="store", unit="chunk", mininterval=5)):
        cache.begin_chunk(ids, valid, question=False)
        k, v = pool[i % len(pool)]
        for layer in cache.layers:
            layer.update(k, v)
        cache.end_chunk(C)
    t_fill = time.perf_counter() - t0
    q = torch.randn(1, Hq, 1, D, generator=g)
    params = cache.op_params(D ** -0.5)
    steps = []
    for _ in range(5):
        cache.begin_chunk(ids[:, :1], valid[:, :1], question=True)
        t1 = time.perf_counter()
        for layer in cache.layers:
            layer.update(k[:, :, :1], v[:, :, :1])
            layer.op_inputs(q, params, None)
        steps.append(time.perf_counter() - t1)
        cache.end_chunk(1)
    reps_mb = sum(layer.reps.numel() * layer.reps.element_size() for layer in cache.layers) / 2**20
    tail_mb = sum(2 * layer.k.numel() * layer.k.element_size() for layer in cache.layers) / 2**20
    return {"task": "store", "tokens": n, "layers": layers, "config": {"ram_budget": budget, "cold_dtype": cold_dtype},
            "seconds_fill": round(t_fill, 1), "tokens_per_second_fill": round(n / t_fill),
            "decode_step_ms_all_layers": round(1000 * sorted(steps)[len(steps) // 2], 1),
            "rss_before_mb": round(rss0), "rss_after_mb": round(current_rss_mb()), "peak_rss_mb": round(peak_rss_mb()),
            "reps_mb": round(reps_mb), "tails_mb": round(tail_mb), "cold": dict(cache.cold.stats, blocks=len(cache.cold),
            ram_mb=round(cache.cold.ram_bytes / 2**20), disk_mb=round(cache.cold.rec_bytes * len(cache.cold._slots) / 2**20)),
            "all_in_ram_fp32_kv_mb": round(n * layers * 2 * H * D * 4 / 2**20)}


def run_rss(lengths: list[int], budget: str, tiered_only: bool = False, cold_dtype: str = "fp16") -> list[dict]:
    rows = []
    for n in lengths:
        if n <= 65536 and not tiered_only:  # all-in-RAM beyond 64K would need many GB here: that is the point
            rows.append(_child({"task": "read", "tokens": n, "config": {}}))
        rows.append(_child({"task": "read", "tokens": n, "config": {"ram_budget": budget, "cold_dtype": cold_dtype}}))
    return rows


def run_reuse(n: int, reread: bool = False) -> dict:
    """Read + save + answer in one process, then load + answer in another. The cost of reading
    again is the first run's read + answer (the same work, minus the save); ``reread`` measures it
    in a third process as well."""
    with tempfile.TemporaryDirectory(prefix="ctxmem-bench-") as d:
        first = _child({"task": "read", "tokens": n, "config": {}, "save": f"{d}/mem"})
        loaded = _child({"task": "load", "tokens": n, "config": {}, "path": f"{d}/mem"})
        again = _child({"task": "read", "tokens": n, "config": {}}) if reread else None
    return reuse_summary(first, loaded, again)


def reuse_summary(first: dict, loaded: dict, again: dict | None = None) -> dict:
    reread = (again["seconds_read"] + again["seconds_answer"]) if again else (first["seconds_read"] + first["seconds_answer"])
    reuse = loaded["seconds_load"] + loaded["seconds_answer"]
    return {"first": first, "load": loaded, "read_again": again, "seconds_reread_and_answer": round(reread, 2),
            "seconds_load_and_answer": round(reuse, 2), "speedup": round(reread / reuse, 1),
            "same_answer": first["answer"] == loaded["answer"] and (again is None or again["answer"] == first["answer"])}


def run_dtypes(n: int, depths: list[float]) -> list[dict]:
    rows = []
    for cfg in ({}, {"ram_budget": "256MB", "cold_dtype": "fp16"}, {"ram_budget": "256MB", "cold_dtype": "int8"}):
        rows.append(_child({"task": "ppl", "tokens": n, "config": cfg}))
        for d in depths:
            rows.append(_child({"task": "read", "tokens": n, "depth": d, "config": cfg}))
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(result.get("rss", []))
    if result.get("reuse"):
        rows.append(result["reuse"]["first"])  # a full all-in-RAM read (and save) too
    store = result.get("store")
    if not rows and not store:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    from ctxmem.config import parse_bytes

    budgets = sorted({r["config"]["ram_budget"] for r in rows if "ram_budget" in r["config"]}, key=parse_bytes)
    groups = [("SmolLM2, all in RAM", None)] + [(f"SmolLM2, ram_budget {b}", b) for b in budgets]
    for i, (label, budget) in enumerate(groups):
        mine = [r for r in rows if r["config"].get("ram_budget") == budget]
        pts = sorted((r["tokens"], r["peak_rss_mb"]) for r in mine)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] / 1024 for p in pts], "o-", color=f"C{i}", label=label)
        for r in mine:  # a traced long read: RSS while it read
            tr = (r.get("trace") or {}).get("rows") or []
            if r["tokens"] >= 2**19 and len(tr) > 2:
                ax.plot([max(t[1], 1) for t in tr], [t[2] / 1024 for t in tr], "-", lw=0.8, color=f"C{i}",
                        alpha=0.6, label=f"RSS while reading {r['tokens']:,} tokens")
    if store:
        ax.plot([store["tokens"]], [store["peak_rss_mb"] / 1024], "s", color="black",
                label=f"memory layer alone, ram_budget {store['config']['ram_budget']} (synthetic KV)")
    xs = [2**k for k in range(12, 21)]
    ax.plot(xs, [x * 46080 / 2**30 for x in xs], ":", color="gray", label="fp32 KV of SmolLM2 (46 KB/token)")
    w = (rows or [{"weights_mb": 513}])[0]["weights_mb"]
    ax.axhline((w + 2048) / 1024, color="gray", ls="--", label="target: weights + 2 GB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title("Peak RSS while reading and answering (CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["rss", "reuse", "dtypes", "all", "store", "child"])
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--budget", default="1GB", help="ram_budget of the tiered runs")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--tiered-only", action="store_true", help="rss: skip the all-in-RAM runs")
    ap.add_argument("--cold-dtype", default="fp16", choices=["fp16", "int8", "fp32"], help="rss: cold dtype of the tiered runs")
    ap.add_argument("--reread", action="store_true", help="reuse: also time reading again in a third process")
    args = ap.parse_args()
    if args.what == "child":
        print(json.dumps(child(json.loads(args.spec))), flush=True)
        return
    path = RESULTS / "memory.json"
    result = {"machine": machine()}
    if args.what in ("rss", "all"):
        result["rss"] = run_rss([int(x) for x in args.lengths.split(",")], args.budget, args.tiered_only,
                                args.cold_dtype)
    if args.what in ("reuse", "all"):
        result["reuse"] = run_reuse(args.tokens or 32768, args.reread)
    if args.what == "store":
        rep = store_only(args.tokens or 2**20, args.budget, "fp16")
        print(json.dumps(rep), flush=True)
        result["store"] = rep
    if args.what in ("dtypes", "all"):
        result["dtypes"] = run_dtypes(args.tokens or 16384, [float(x) for x in args.depths.split(",")])
    # merge into what other runs wrote (read now, not at start: runs may overlap)
    merged = json.loads(path.read_text()) if path.exists() else {}
    if "rss" in result:  # keep other lengths' rows; a rerun of the same point replaces it
        key = lambda r: (r["tokens"], json.dumps(r["config"], sort_keys=True))  # noqa: E731
        rows = {key(r): r for r in merged.get("rss", [])}
        rows.update({key(r): r for r in result["rss"]})
        result["rss"] = sorted(rows.values(), key=key)
    merged.update(result)
    write_json("memory", merged)
    plot(merged, RESULTS / "memory_rss.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

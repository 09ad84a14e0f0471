"""Whole model on a GPU: stock HF (sdpa) vs ctxmem, prefill seconds, decode ms/token, peak memory.

Random weights of real shapes (SmolLM2-135M, Llama-3.2-1B, Llama-3-8B; bf16), one process, the
same prompt for both methods, ``torch.cuda.synchronize()`` around every timing. Prefill is one
forward over the whole prompt (``logits_to_keep=1``); decode is ``--new`` greedy steps of one
token each through the same forward (what ``generate`` calls), each token copied to the host as
``generate`` does, timed together and divided. ctxmem
runs ``MemoryConfig(selector="keys", backend="cuda", prefill_chunk=--chunk)``: prefill chunks go
through the batched gather + SDPA path, decode steps through the CUDA kernels. Stock runs
wherever its KV cache and the O(N^2) prefill fit the time asked for (``--stock-max``).

    python benchmarks/gpu_e2e.py [--shapes smollm2-135m,llama3.2-1b,llama3-8b]
        [--contexts 32768,131072,1048576] [--batch8] [--out benchmarks/results/gpu_e2e.json]
    python benchmarks/gpu_e2e.py --plot benchmarks/results/gpu_e2e.json   # the plot only (no GPU)

Results are written after every measurement, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {
    # SmolLM2-135M-Instruct (the bundled model's shape)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    # not a real model: a dry run of this script on the CPU (--device cpu --shapes tiny)
    "tiny": dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 max_position_embeddings=8192, rope_theta=10000.0, tie_word_embeddings=True),
}


def kv_bytes(shape: dict, tokens: int, batch: int = 1) -> int:
    s = shape
    return 2 * 2 * batch * tokens * s["num_hidden_layers"] * s["num_key_value_heads"] * s["head_dim"]


def param_bytes(shape: dict) -> int:
    s = shape
    h, i, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    att = h * s["head_dim"] * (s["num_attention_heads"] * 2 + s["num_key_value_heads"] * 2)
    return 2 * (L * (att + 3 * h * i) + V * h * (1 if s["tie_word_embeddings"] else 2))


def build_model(name: str, device: str = "cuda"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[name], attn_implementation="sdpa")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(model, ids, new: int, make_cache=None) -> dict:
    """Prefill seconds, decode ms/token and peak GPU memory of one prompt."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    kw = {} if make_cache is None else dict(cache=make_cache())
    _sync()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1, **kw)
    _sync()
    prefill = time.perf_counter() - t0
    cache = out.cache
    tok = out.logits[:, -1:].argmax(-1)
    del out
    _sync()
    t0 = time.perf_counter()
    for _ in range(new):
        out = model(tok, cache=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        tok.cpu()  # each step's token reaches the host, as in generate (stopping criteria, streaming)
    _sync()
    decode = (time.perf_counter() - t0) / max(new, 1)
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    del cache, out, tok, kw
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return dict(prefill_s=round(prefill, 4), decode_ms=round(decode * 1e3, 3), peak_gb=round(peak / 1e9, 3))


BACKEND = "cuda"


def ctxmem_config(chunk: int):
    import ctxmem
    return ctxmem.MemoryConfig(selector="keys", backend=BACKEND, prefill_chunk=chunk, gpu_prefill_chunk=chunk, reader=None,
                               max_context=4_000_000)


def static_cache(model, N: int, new: int, batch: int = 1):
    from transformers import StaticCache
    return lambda: StaticCache(config=model.config, max_cache_len=N + new + 8)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2-135m,llama3.2-1b,llama3-8b")
    ap.add_argument("--contexts", default="32768,131072,1048576")
    ap.add_argument("--new", type=int, default=32, help="decode steps timed")
    ap.add_argument("--chunk", type=int, default=4096, help="ctxmem prefill_chunk on the GPU")
    ap.add_argument("--also-chunk", type=int, default=512,
                    help="also time ctxmem at this chunk on the first shape's first context (0: skip)")
    ap.add_argument("--stock-max", type=int, default=131072, help="longest context stock is run at")
    ap.add_argument("--mem-gb", type=float, default=120.0, help="skip a run whose KV + weights exceed this")
    ap.add_argument("--batch8", action="store_true", help="also a batch of 8 rows at 32K on the first shape")
    ap.add_argument("--profile", action="store_true", help="torch.profiler summary of ctxmem decode and prefill")
    ap.add_argument("--no-static", action="store_true", help="skip the stock-with-StaticCache baseline")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script (batched backend, tiny sizes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_e2e.json"))
    ap.add_argument("--plot", metavar="JSON", help="only draw the plot of an earlier results file")
    a = ap.parse_args(argv)
    if a.plot:
        plot(json.loads(Path(a.plot).read_text()), Path(a.plot).with_suffix(".png"))
        return {}

    import torch
    import ctxmem
    from ctxmem._atomic import atomic_write_bytes
    from ctxmem.ops import cuda as cuda_backend

    global BACKEND
    torch.set_grad_enabled(False)
    t_build = time.perf_counter()
    if a.device == "cuda" and cuda_backend.load_extension() is None:
        raise SystemExit(f"CUDA extension unavailable: {cuda_backend.load_error()}")
    if a.device != "cuda":
        BACKEND = "batched"
    res = dict(device=torch.cuda.get_device_name() if a.device == "cuda" else a.device, torch=torch.__version__, cuda=torch.version.cuda,
               date=time.strftime("%Y-%m-%d"), new_tokens=a.new, chunk=a.chunk,
               extension_load_s=round(time.perf_counter() - t_build, 2),
               config=dict(selector="keys", topk_blocks=9, block_size=64, sink_tokens=64, local_tokens=128,
                           prefill_chunk=a.chunk, backend=BACKEND),
               runs=[])

    def save():
        atomic_write_bytes(a.out, (json.dumps(res, indent=1) + "\n").encode())

    def log(row):
        res["runs"].append(row)
        print(json.dumps(row), flush=True)
        save()

    shapes = a.shapes.split(",")
    contexts = [int(x) for x in a.contexts.split(",")]
    gen = torch.Generator().manual_seed(0)
    for si, name in enumerate(shapes):
        shape = SHAPES[name]
        model = build_model(name, a.device)
        V = shape["vocab_size"]
        # warm-up of both methods (cuBLAS, allocator, the extension) on a short prompt
        warm = torch.randint(0, V, (1, min(8192, min(contexts))), generator=gen).to(a.device)
        measure(model, warm, 2)
        ctxmem.wrap(model, ctxmem_config(a.chunk))
        measure(model, warm, 2)
        ctxmem.unwrap(model)
        for ci, N in enumerate(contexts):
            ids = torch.randint(0, V, (1, N), generator=gen).to(a.device)
            fits = (kv_bytes(shape, N) + param_bytes(shape)) / 1e9 <= a.mem_gb
            if not fits:
                log(dict(shape=name, context=N, method="ctxmem", skipped=f"KV {kv_bytes(shape, N) / 1e9:.0f} GB "
                         f"+ weights exceed {a.mem_gb:.0f} GB (no offload to host on the GPU path yet)"))
                continue
            if N <= a.stock_max:
                stock = [("stock", None)] + ([] if a.no_static else [("stock-static", static_cache(model, N, a.new))])
                for method, make in stock:
                    try:
                        log(dict(shape=name, context=N, method=method, **measure(model, ids, a.new, make)))
                    except torch.OutOfMemoryError as e:
                        log(dict(shape=name, context=N, method=method, skipped=f"out of memory: {str(e)[:120]}"))
            else:
                log(dict(shape=name, context=N, method="stock", skipped=f"longer than --stock-max {a.stock_max}"))
            chunks = [a.chunk] + ([a.also_chunk] if a.also_chunk and si == 0 and ci == 0 else [])
            for chunk in chunks:
                ctxmem.wrap(model, ctxmem_config(chunk))
                try:
                    log(dict(shape=name, context=N, method="ctxmem", chunk=chunk, **measure(model, ids, a.new)))
                except torch.OutOfMemoryError as e:
                    log(dict(shape=name, context=N, method="ctxmem", chunk=chunk, skipped=f"out of memory: {str(e)[:120]}"))
                finally:
                    ctxmem.unwrap(model)
            del ids
        if a.batch8 and si == 0:
            ids = torch.randint(0, V, (8, contexts[0]), generator=gen).to(a.device)
            for method in ("stock", "ctxmem"):
                if method == "ctxmem":
                    ctxmem.wrap(model, ctxmem_config(a.chunk))
                try:
                    m = measure(model, ids, a.new)
                    m["decode_tok_s"] = round(8 * 1e3 / m["decode_ms"], 1)
                    m["prefill_tok_s"] = round(8 * contexts[0] / m["prefill_s"], 1)
                    log(dict(shape=name, context=contexts[0], batch=8, method=method, **m))
                finally:
                    if method == "ctxmem":
                        ctxmem.unwrap(model)
        if a.profile and si == 0:
            res["profile"] = profile(model, shape, a.chunk)
            save()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return res


def profile(model, shape, chunk: int) -> dict:
    """Where ctxmem's time goes: host (CPU) vs device (CUDA) time, and the top ops by host time."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    import ctxmem

    ids = torch.randint(0, shape["vocab_size"], (1, 32768 if model.device.type == "cuda" else 4096)).to(model.device)
    ctxmem.wrap(model, ctxmem_config(chunk))
    out_rep = {}
    try:
        for phase in ("prefill", "decode"):
            out = model(ids, use_cache=True, logits_to_keep=1)
            cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
            _sync()
            with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                if phase == "prefill":
                    model(ids, use_cache=True, logits_to_keep=1)
                else:
                    for _ in range(8):
                        tok = model(tok, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
                _sync()
            ev = prof.key_averages()
            cpu = sum(e.self_cpu_time_total for e in ev) / 1e6
            dev = sum(getattr(e, "self_device_time_total", 0) for e in ev) / 1e6
            top = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
            out_rep[phase] = dict(cpu_s=round(cpu, 4), cuda_s=round(dev, 4),
                                  top_cpu=[(e.key, e.count, round(e.self_cpu_time_total / 1e3, 2)) for e in top])
            print(phase, json.dumps(out_rep[phase]), flush=True)
            del cache, out
    finally:
        ctxmem.unwrap(model)
    return out_rep


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in res["runs"] if "skipped" not in r and "batch" not in r]
    shapes = sorted({r["shape"] for r in runs}, key=list(SHAPES).index)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "prefill_s", "prefill (s)"), (axes[1], "decode_ms", "decode (ms/token)")):
        for si, shape in enumerate(shapes):
            for method, style in (("stock", "--"), ("stock-static", ":"), ("ctxmem", "-")):
                pts = sorted((r["context"], r[key]) for r in runs if r["shape"] == shape and r["method"] == method
                             and r.get("chunk", res["chunk"]) == res["chunk"])
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=f"C{si}", label=f"{shape} {method}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"ctxmem vs stock HF sdpa on {res['device']} (bf16, random weights of real shapes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

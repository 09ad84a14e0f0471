"""Compressed memory: recovered fraction of the full context's gain, per ratio and method.

    python -m benchmarks.compression                       # bundled checkpoints, 64 held-out windows
    python -m benchmarks.compression --windows 96 --checkpoint 8=/path/to/run

For each ratio (4, 8, 16) every method gets the same decoder budget (n / ratio positions) on
windows of held-out stdlib modules (never trained on): ``[segment 128 | continuation 64]``.
Writes benchmarks/results/compression.json and compression.png (recovered vs ratio, 95% CIs).
A ratio without a trained checkpoint still gets its baselines, and says so.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from benchmarks.common import RESULTS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--segment-tokens", type=int, default=128)
    p.add_argument("--cont-tokens", type=int, default=64)
    p.add_argument("--checkpoint", action="append", default=[], metavar="RATIO=PATH",
                   help="use this compressor for RATIO instead of the bundled smollm2-rRATIO")
    p.add_argument("--no-llmlingua", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "compression.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    import ctxmem
    from ctxmem._atomic import atomic_write_bytes
    from ctxmem.compress.data import HELDOUT, eval_windows, stdlib_files
    from ctxmem.compress.evaluate import evaluate, llmlingua_compressor
    from ctxmem.compress.model import Compressor, CompressorError
    from ctxmem.models import resolve_lm_path

    chosen = dict(kv.split("=", 1) for kv in args.checkpoint)
    model, tok = ctxmem.load_model("smollm2")
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    files = stdlib_files(heldout=True)
    n = args.segment_tokens
    windows = eval_windows(files, tok, n + args.cont_tokens, args.windows)
    ll, note = (None, "disabled with --no-llmlingua") if args.no_llmlingua else \
        llmlingua_compressor(resolve_lm_path("smollm2"), tok)
    cache: dict = {}
    results = {}
    t0 = time.perf_counter()
    for r in args.ratios:
        ck = chosen.get(str(r), f"smollm2-r{r}")
        comp, why = None, None
        try:
            comp = Compressor.from_pretrained(ck, model=model, tokenizer=tok)
            if comp.config.segment_tokens != n or comp.config.bos_id != bos:
                raise CompressorError(f"{ck}: segment_tokens {comp.config.segment_tokens} / bos {comp.config.bos_id} "
                                      f"differ from this benchmark's {n} / {bos}")
        except CompressorError as e:
            comp, why = None, str(e)
        rep = evaluate(model, tok, windows, n, r, compressor=comp, bos_id=bos, llmlingua=ll, llmlingua_note=note,
                       cache=cache)
        if comp is None:
            rep["ctxmem_missing"] = f"no trained compressor for ratio {r}: {why}"
        else:
            rep["train"] = {k: comp.meta.get(k) for k in ("step", "steps", "seconds", "seed", "data", "train", "command")
                            if k in comp.meta}
        results[str(r)] = rep
        m = rep["methods"]
        best = max((k for k in m if k not in ("ctxmem", "control")), key=lambda k: m[k]["recovered"])
        print(f"ratio {r}: " + ", ".join(f"{k} {v['recovered']:+.3f}" for k, v in sorted(m.items())) +
              f"  (best baseline: {best})", file=sys.stderr)
    doc = {"benchmark": "compression", "model": "SmolLM2-135M-Instruct (fp32, CPU)",
           "data": {"heldout_modules": list(HELDOUT), "windows": len(windows),
                    "files": sorted({f for f, _ in windows}), "segment_tokens": n,
                    "continuation_tokens": args.cont_tokens},
           "metric": "recovered = (ce_none - ce) / (ce_none - ce_full), CE on the continuation; 95% CI: "
                     "paired bootstrap over windows (1000 resamples, seed 0)",
           "targets": {"8": {"recovered": 0.6, "beat_every_baseline": True}, "4": {"recovered": 0.75}},
           "ratios": results, "seconds": round(time.perf_counter() - t0, 1),
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()}}
    for r, rep in results.items():
        m = rep["methods"]
        if "ctxmem" in m:
            base = {k: v["recovered"] for k, v in m.items() if k not in ("ctxmem", "control")}
            rep["verdict"] = {"ctxmem": m["ctxmem"]["recovered"], "best_baseline": max(base, key=base.get),
                              "best_baseline_recovered": max(base.values()),
                              "beats_every_baseline": all(m["ctxmem"]["recovered"] > v for v in base.values()),
                              "target": doc["targets"].get(r, {}).get("recovered")}
    out = args.out
    atomic_write_bytes(out, (json.dumps(doc, indent=2) + "\n").encode())
    _plot(doc, out.replace(".json", ".png"))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _plot(doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted(int(r) for r in doc["ratios"])
    methods = sorted({k for rep in doc["ratios"].values() for k in rep["methods"]})
    style = {"ctxmem": dict(lw=2.5, color="C3", marker="o"), "control": dict(ls=":", color="grey", marker="x")}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, k in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for r in ratios:
            v = doc["ratios"][str(r)]["methods"].get(k)
            if v:
                xs.append(r)
                ys.append(v["recovered"])
                lo.append(v["recovered"] - v["recovered_ci95"][0])
                hi.append(v["recovered_ci95"][1] - v["recovered"])
        kw = style.get(k, dict(marker="s", ms=4, color=f"C{i % 10}" if f"C{i % 10}" != "C3" else "C9"))
        ax.errorbar(xs, ys, yerr=[lo, hi], label=k, capsize=3, **kw)
    ax.axhline(0, color="k", lw=0.5)
    ax.axhline(1, color="k", lw=0.5, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ratios, [f"{r}x" for r in ratios])
    ax.set_xlabel("compression ratio (segment tokens per decoder position)")
    ax.set_ylabel("recovered fraction of full-context gain")
    w = next(iter(doc["ratios"].values()))
    ax.set_title(f"SmolLM2-135M, held-out stdlib: {w['windows']} windows of "
                 f"{w['segment_tokens']}+{w['continuation_tokens']} tokens", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

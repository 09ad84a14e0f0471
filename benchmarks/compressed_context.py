"""Does a long context's far part pay as summary tokens? Continuation loss vs decoder positions.

    python -m benchmarks.compressed_context                      # bundled smollm2-r4 and -r8, 24 windows
    python -m benchmarks.compressed_context --context 4096 --windows 24 --ratios 8

Windows of held-out stdlib modules (never trained on): ``[context (4096 tokens) | continuation (128)]``.
Every method is what the decoder reads before the continuation, always after BOS:

* ``recent_R``: the last R tokens of the context (a window; R from 0 to the whole context);
* ``summaries_rK_R``: what ``ctxmem.read_context(model, context, keep_recent=R)`` builds with the
  ratio-K compressor: ``[BOS, summaries of the first C - R tokens]`` then the last R tokens. Read here
  with the stock model on ``inputs_embeds`` (the wrapper equals that: tests/test_compress_wrap.py).

Summaries pay where they beat the window that uses as many positions: ``summaries_rK_R`` against
``recent_R'`` with R' = R + (positions of the summaries), paired over windows, 95% bootstrap CI. The
plot draws CE against positions: the windows as a curve, the summaries as points.
Writes benchmarks/results/compressed_context.json and compressed_context.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from benchmarks.common import RESULTS

BOOT = 1000


def _paired(a: list[float], b: list[float], seed: int = 0) -> dict:
    """mean(a - b) with a 95% bootstrap CI over windows."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    idx = torch.randint(0, len(d), (BOOT, len(d)), generator=torch.Generator().manual_seed(seed))
    m = d[idx].mean(1).sort().values
    return {"mean": round(float(d.mean()), 4), "ci95": [round(float(m[int(0.025 * BOOT)]), 4),
                                                       round(float(m[int(0.975 * BOOT) - 1]), 4)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096, help="context tokens per window (default 4096)")
    p.add_argument("--cont-tokens", type=int, default=128)
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--ratios", type=int, nargs="+", default=[4, 8])
    p.add_argument("--keep-recent", type=int, nargs="+", default=[256, 1024],
                   help="recent tokens kept as tokens beside the summaries (default 256 1024)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="RATIO=PATH",
                   help="use this compressor for RATIO instead of the bundled smollm2-rRATIO")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "compressed_context.json"))
    args = p.parse_args(argv)
    if any(r < 0 or r >= args.context for r in args.keep_recent):
        p.error(f"--keep-recent values must be in [0, {args.context})")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    import ctxmem
    from ctxmem._atomic import atomic_write_bytes
    from ctxmem.compress.data import HELDOUT, eval_windows, stdlib_files
    from ctxmem.compress.evaluate import _ce as batch_ce
    from ctxmem.compress.evaluate import _mean_ci
    from ctxmem.compress.model import Compressor

    def _ce(x: torch.Tensor, cont: torch.Tensor) -> float:  # CE of cont after the decoder inputs x (P, d)
        return float(batch_ce(model, x[None], cont[None])[0])

    chosen = dict(kv.split("=", 1) for kv in args.checkpoint)
    model, tok = ctxmem.load_model("smollm2")
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    emb = model.get_input_embeddings()
    C, c = args.context, args.cont_tokens
    windows = eval_windows(stdlib_files(heldout=True), tok, C + c, args.windows)
    comps = {}
    for r in args.ratios:
        comps[r] = Compressor.from_pretrained(chosen.get(str(r), f"smollm2-r{r}"), model=model, tokenizer=tok)
        if comps[r].config.ratio != r:
            p.error(f"checkpoint for ratio {r} is ratio {comps[r].config.ratio}")
    # the summaries' position counts, so the windows of equal positions are on the curve too
    sizes = {(r, R): 1 + -(-(C - R) // comps[r].config.segment_tokens) * comps[r].config.slots
             for r in args.ratios for R in args.keep_recent}
    curve = sorted({0, 64, 128, 256, 512, 1024, 2048, C} | set(args.keep_recent)
                   | {R + s - 1 for (r, R), s in sizes.items()})
    curve = [R for R in curve if R <= C]
    ce: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    for w, (_, ids) in enumerate(tqdm(windows, desc="windows", unit="win")):
        first = w == 0
        ids = torch.tensor(ids)
        ctx, cont = ids[:C], ids[C:]
        b = emb(torch.tensor([bos]))
        for R in curve:  # [BOS, last R tokens]: R + 1 positions
            ce.setdefault(f"recent_{R}", []).append(_ce(torch.cat([b, emb(ctx[C - R:])]), cont))
        for r, comp in comps.items():
            n, m = comp.config.segment_tokens, comp.config.slots
            whole = comp.compress(ctx.tolist())  # segments are encoded one by one: a prefix's summaries are a slice
            for R in args.keep_recent:
                if (C - R) % n == 0:
                    summ = whole[:(C - R) // n * m]
                    if first:  # the slice is what compressing the far part alone gives
                        torch.testing.assert_close(summ, comp.compress(ctx[:C - R].tolist()), rtol=1e-5, atol=1e-5)
                else:
                    summ = comp.compress(ctx[:C - R].tolist())
                x = torch.cat([comp.prefix(summ)[0], emb(ctx[C - R:])])
                assert x.shape[0] == sizes[(r, R)] + R
                ce.setdefault(f"summaries_r{r}_{R}", []).append(_ce(x, cont))
    seconds = time.perf_counter() - t0

    methods = {}
    for name, v in ce.items():
        if name.startswith("recent_"):
            R = int(name.split("_")[1])
            methods[name] = {"positions": R + 1, "tokens_covered": R}
        else:
            _, rr, R = name.split("_")
            r, R = int(rr[1:]), int(R)
            methods[name] = {"positions": sizes[(r, R)] + R, "tokens_covered": C, "ratio": r, "keep_recent": R,
                             "summary_positions": sizes[(r, R)]}
        mean, ci95 = _mean_ci(v)
        methods[name].update(ce=round(mean, 4), ce_ci95=round(ci95, 4))
    pays = {}
    for (r, R), s in sizes.items():
        name = f"summaries_r{r}_{R}"
        same = f"recent_{R + s - 1}"  # [BOS, last R + s - 1 tokens] = R + s positions, as many as the summaries'
        pays[name] = {"vs_equal_positions": same, "ce_minus_equal_positions": _paired(ce[name], ce[same]),
                      "vs_recent_alone": f"recent_{R}", "ce_minus_recent_alone": _paired(ce[name], ce[f"recent_{R}"]),
                      "vs_full": f"recent_{C}", "ce_minus_full": _paired(ce[name], ce[f"recent_{C}"])}
        ci = pays[name]["ce_minus_equal_positions"]["ci95"]
        pays[name]["verdict"] = ("pays" if ci[1] < 0 else "costs" if ci[0] > 0 else "no difference resolved")
    doc = {
        "benchmark": "compressed_context", "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "command": "python -m benchmarks.compressed_context " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "data": {"heldout_modules": list(HELDOUT), "windows": len(windows), "files": sorted({f for f, _ in windows}),
                 "context_tokens": C, "continuation_tokens": c},
        "metric": "mean CE of the continuation after [BOS, what the method keeps]; paired differences: "
                  "95% bootstrap over windows (1000 resamples, seed 0); negative = the summaries are better",
        "checkpoints": {str(r): {"source": comp.source, "steps": comp.meta.get("steps")} for r, comp in comps.items()},
        "methods": methods, "summaries": pays, "seconds": round(seconds, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
    }
    out = args.out
    atomic_write_bytes(out, (json.dumps(doc, indent=2) + "\n").encode())
    _plot(doc, out.rsplit(".", 1)[0] + ".png")
    for name, v in pays.items():
        d = v["ce_minus_equal_positions"]
        lo, hi = d["ci95"]
        print(f"{name:22s} {methods[name]['positions']:5d} positions  ce {methods[name]['ce']:.3f}  vs "
              f"{v['vs_equal_positions']:12s} {d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]  {v['verdict']}")
    print(f"wrote {out} ({seconds:.0f} s)")
    return 0


def _plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctxmem._atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4.2))
    rec = sorted((v["positions"], v["ce"], v["ce_ci95"]) for k, v in doc["methods"].items() if k.startswith("recent_"))
    ax.errorbar([r[0] for r in rec], [r[1] for r in rec], yerr=[r[2] for r in rec], fmt="-o", ms=3, color="0.4",
                label="recent window (last tokens only)")
    marks = {4: "s", 8: "D", 16: "^"}
    for k, v in doc["methods"].items():
        if k.startswith("summaries_"):
            ax.errorbar([v["positions"]], [v["ce"]], yerr=[v["ce_ci95"]], fmt=marks.get(v["ratio"], "o"), ms=6,
                        label=f"summaries {v['ratio']}x + last {v['keep_recent']} tokens")
    ax.set_xscale("symlog", linthresh=64)
    ax.set_xlabel("decoder positions before the continuation (BOS included)")
    ax.set_ylabel("continuation CE (nats/token)")
    ax.set_title(f"{doc['data']['context_tokens']}-token held-out contexts, {doc['data']['windows']} windows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())

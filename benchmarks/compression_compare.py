"""Compare compressor checkpoints on the same windows (paired): recovered fraction per checkpoint with
95% bootstrap CIs, and the paired bootstrap CI of the difference. Same metric and windows as
benchmarks/compression.py (held-out: eval_windows(stdlib_files(heldout=True), n+64, W)).

    python -m benchmarks.compression_compare --split heldout --windows 48 --ratio 8 A=PATH B=PATH --out x.json
    python -m benchmarks.compression_compare --split val ...   # windows from training-split modules (every 40th file): selection set
"""
import argparse
import json
import sys
import time

import torch

from ctxmem._atomic import atomic_write_bytes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoints", nargs="+", metavar="LABEL=PATH")
    p.add_argument("--ratio", type=int, default=8)
    p.add_argument("--split", choices=["heldout", "val"], default="heldout")
    p.add_argument("--windows", type=int, default=48)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    import ctxmem
    from ctxmem.compress.data import eval_windows, stdlib_files
    from ctxmem.compress.evaluate import Baselines, _ce, bootstrap_recovered
    from ctxmem.compress.model import Compressor

    model, tok = ctxmem.load_model("smollm2")
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    n, c = 128, 64
    files = stdlib_files(heldout=True) if a.split == "heldout" else stdlib_files(heldout=False)[::40]
    windows = eval_windows(files, tok, n + c, a.windows)
    ids = torch.tensor([w for _, w in windows])
    m = n // a.ratio
    base = Baselines(model, bos)
    t0 = time.perf_counter()
    res = {"full": [], "none": [], "truncate": []}
    comps = {}
    for kv in a.checkpoints:
        label, path = kv.split("=", 1)
        comps[label] = Compressor.from_pretrained(path, model=model, tokenizer=tok)
        assert comps[label].config.ratio == a.ratio
        res[label] = []
        res[label + ":acc"] = []
    for s in range(0, len(ids), 8):
        win = ids[s:s + 8]
        seg, cont = win[:, :n], win[:, n:]
        b = seg.shape[0]
        bo = base.bos(b)
        res["full"] += _ce(model, torch.cat([bo, base.emb(seg)], 1), cont).tolist()
        res["none"] += _ce(model, bo, cont).tolist()
        res["truncate"] += _ce(model, torch.cat([bo, base.truncate(seg, m)], 1), cont).tolist()
        for label, comp in comps.items():
            pre = comp.prefix(comp.encode(seg))
            res[label] += _ce(model, pre, cont).tolist()
            x = torch.cat([pre, comp.ae.view(1, 1, -1).expand(b, 1, -1), base.emb(seg)], 1)
            logits = model(inputs_embeds=x, use_cache=False, logits_to_keep=n + 1).logits[:, :-1]
            res[label + ":acc"] += (logits.argmax(-1) == seg).float().mean(1).tolist()
        print(f"{s + b}/{len(ids)} windows, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    out = {"command": " ".join(["python -m benchmarks.compression_compare"] + sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "split": a.split, "windows": len(ids), "files": sorted({f for f, _ in windows}), "ratio": a.ratio,
           "seconds": round(time.perf_counter() - t0, 1), "methods": {}, "paired_differences": {}}
    for k in ["truncate", *comps]:
        r, lo, hi = bootstrap_recovered(res["none"], res["full"], res[k])
        d = {"recovered": round(r, 4), "recovered_ci95": [round(lo, 4), round(hi, 4)],
             "ce": round(sum(res[k]) / len(res[k]), 4)}
        if k in comps:
            acc = torch.tensor(res[k + ":acc"])
            d["reconstruction_accuracy"] = round(float(acc.mean()), 4)
            d["reconstruction_accuracy_ci95"] = round(float(1.96 * acc.std() / len(acc) ** 0.5), 4)
            d["checkpoint"] = comps[k].source
            d["steps"] = comps[k].meta.get("steps")
        out["methods"][k] = d
    # paired bootstrap of recovered(B) - recovered(A) for every pair (and each vs truncate)
    names = ["truncate", *comps]
    none, full = (torch.tensor(res[k], dtype=torch.float64) for k in ("none", "full"))
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(none), (1000, len(none)), generator=g)
    den = none[idx].mean(1) - full[idx].mean(1)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            cx, cy = (torch.tensor(res[k], dtype=torch.float64) for k in (x, y))
            diff = ((cx[idx].mean(1) - cy[idx].mean(1)) / den).sort().values  # = rec(y) - rec(x)
            point = float((cx.mean() - cy.mean()) / (none.mean() - full.mean()))
            out["paired_differences"][f"{y} - {x}"] = {"recovered_diff": round(point, 4),
                                                       "ci95": [round(float(diff[25]), 4), round(float(diff[974]), 4)]}
    out["per_window"] = {k: [round(v, 4) for v in vals] for k, vals in res.items()}
    atomic_write_bytes(a.out, json.dumps(out, indent=1).encode())
    print(json.dumps({k: v for k, v in out.items() if k != "per_window"}, indent=1))


if __name__ == "__main__":
    main()

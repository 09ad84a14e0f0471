"""``ctxmem compressor train|eval``: train a compressor on the stdlib (resumable), evaluate it against baselines.

    ctxmem compressor train --model smollm2 --ratio 8 --data stdlib --out runs/r8 --steps 400
    ctxmem compressor eval --ratio 8 --data stdlib-heldout --json          # the bundled smollm2-r8
    ctxmem compressor eval --ratio 8 --checkpoint runs/r8 --json

Handlers return the exit code: 0 ok, 1 on a clear error (one line on stderr, ``{"ok": false, "error": ...,
"kind": ...}`` on stdout with --json), 130 when interrupted (a training run keeps its last checkpoint and
resumes when the same command is run again).
"""
from __future__ import annotations

import json
import sys

from .._cli import handled, resolve_device


def _handled(cmd: str):
    return handled(f"ctxmem compressor {cmd}")


def _device(name: str) -> str:
    return resolve_device(name)


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


@_handled("train")
def _cmd_train(args) -> int:
    import torch

    from ..models import load_model
    from .data import WindowSampler, resolve_data
    from .model import Compressor
    from .train import TrainConfig, make_compressor, train

    _threads(args.threads)
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1")
    device = _device(args.device)
    files = resolve_data(args.data)
    model, tok = load_model(args.model, device=device)
    sampler = WindowSampler(files, tok, args.segment_tokens + args.cont_tokens, args.batch_size, seed=args.seed)
    calib = WindowSampler(files, tok, args.segment_tokens, 2, seed=args.seed + 10_000).batch(0)
    init = None
    if args.init_from:  # a second stage: the checkpoint's config and weights, a fresh optimizer and schedule
        comp = Compressor.from_pretrained(args.init_from, model=model, tokenizer=tok)
        cfg = comp.config
        if (cfg.ratio, cfg.segment_tokens, cfg.base_model) != (args.ratio, args.segment_tokens, args.model):
            comp.remove_adapter()
            raise ValueError(f"--init-from {args.init_from} is ratio {cfg.ratio}, {cfg.segment_tokens}-token segments, "
                             f"model {cfg.base_model!r}; this command asks for ratio {args.ratio}, "
                             f"{args.segment_tokens}, {args.model!r}")
        init = {"path": comp.source, "sha256": Compressor.read_checkpoint(args.init_from)[0]["weights"]["sha256"],
                "steps": comp.meta.get("steps")}
        if args.lora_r is not None and args.lora_r != cfg.lora_r:
            init["lora_r"] = [cfg.lora_r, args.lora_r]
            comp = Compressor.grown(comp, args.lora_r, seed=args.seed)
    else:
        comp = make_compressor(model, tok, args.ratio, args.segment_tokens, base_model=args.model, seed=args.seed,
                               lora_r=8 if args.lora_r is None else args.lora_r, calib=calib, anchor=args.anchor)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                     cont_tokens=args.cont_tokens, w_ae=args.w_ae, w_lm=args.w_lm, w_kl=args.w_kl,
                     seed=args.seed, save_every=args.save_every, init_from=init["sha256"] if init else None)
    meta = {"data": args.data, "files": len(files), "model": args.model, "device": device,
            "torch_threads": torch.get_num_threads(), "python_stdlib": sys.version.split()[0],
            **({"init_from": init} if init else {})}
    log = (lambda *a: print(*a, file=sys.stderr))
    summary = train(comp, lambda s: sampler.batch(s), args.out, tc,
                    max_seconds=args.max_minutes * 60 if args.max_minutes else None,
                    progress=not args.no_progress, meta=meta, log=log)
    if args.save_bundle and summary["finished"]:
        comp.save_pretrained(args.save_bundle, dtype=torch.float16,
                             meta={**comp_meta(args, summary), "train": tc.__dict__,
                                   **({"init_from": init} if init else {})})
        summary["bundle"] = args.save_bundle
    if args.json:
        print(json.dumps({"ok": True, **summary}))
    else:
        state = "finished" if summary["finished"] else f"stopped at step {summary['steps']} (rerun to resume)"
        f, l = summary["first"], summary["last"]
        ae = f", ae_acc {f['ae_acc']:.2f} -> {l['ae_acc']:.2f}" if f and "ae_acc" in f and "ae_acc" in l else ""
        extra = (f"; loss {f['loss']:.3f} -> {l['loss']:.3f} (lm {f['lm']:.3f} -> {l['lm']:.3f}, "
                 f"kl {f['kl']:.3f} -> {l['kl']:.3f}{ae})") if f else ""
        print(f"{state}: {summary['steps']} steps in {summary['seconds']:.0f} s{extra}; saved in {summary['out']}")
    return 0


def comp_meta(args, summary) -> dict:
    return {"steps": summary["steps"], "seconds": summary["seconds"], "data": args.data, "seed": args.seed,
            "command": "ctxmem compressor train " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else ""}


@_handled("eval")
def _cmd_eval(args) -> int:
    from ..models import load_model
    from .data import eval_windows, resolve_data
    from .evaluate import evaluate, llmlingua_compressor
    from .model import Compressor, CompressorError, resolve_checkpoint

    _threads(args.threads)
    comp = None
    n = args.segment_tokens
    if not args.baselines_only:
        ck = args.checkpoint or f"{args.model}-r{args.ratio}"
        try:
            resolve_checkpoint(ck)
        except CompressorError as e:
            raise CompressorError(f"{e}; give --checkpoint PATH, or --baselines-only") from None
        comp = Compressor.from_pretrained(ck)
        if comp.config.ratio != args.ratio:
            raise ValueError(f"--ratio {args.ratio} but checkpoint {ck} is ratio {comp.config.ratio}")
        model, tok, n, bos = comp.model, comp.tokenizer, comp.config.segment_tokens, comp.config.bos_id
    else:
        model, tok = load_model(args.model)
        i = tok.convert_tokens_to_ids("<|endoftext|>")
        bos = i if isinstance(i, int) and tok.convert_ids_to_tokens(i) == "<|endoftext|>" else (tok.bos_token_id or 0)
    files = resolve_data(args.data)
    windows = eval_windows(files, tok, n + args.cont_tokens, args.max_windows)
    ll, note = None, "disabled with --no-llmlingua"
    if not args.no_llmlingua:
        from ..models import resolve_lm_path

        ll, note = llmlingua_compressor(resolve_lm_path(args.model), tok)
    rep = evaluate(model, tok, windows, n, args.ratio, compressor=comp, bos_id=bos, batch_size=args.batch_size,
                   llmlingua=ll, llmlingua_note=note, progress=not args.no_progress)
    rep["files"] = sorted({f for f, _ in windows})
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"ratio {args.ratio}: {rep['windows']} windows of {n}+{rep['continuation_tokens']} tokens; "
              f"ce_full {rep['ce_full']:.3f}, ce_none {rep['ce_none']:.3f}")
        for name, v in sorted(rep["methods"].items(), key=lambda kv: -kv[1]["recovered"]):
            lo, hi = v["recovered_ci95"]
            print(f"  {name:16s} ce {v['ce']:.3f}  recovered {v['recovered']:+.3f}  [{lo:+.3f}, {hi:+.3f}]")
        if "reconstruction_accuracy" in rep:
            print(f"  reconstruction token accuracy {rep['reconstruction_accuracy']:.3f}")
        for k in ("llmlingua_skipped", "llmlingua_note"):
            if k in rep:
                print(f"  {k.replace('_', ' ')}: {rep[k]}")
    return 0


def add_compressor_parser(sub) -> None:
    p = sub.add_parser("compressor", help="train / evaluate the learned compressor (summary tokens)")
    csub = p.add_subparsers(dest="compressor_command", required=True)

    t = csub.add_parser("train", help="train a compressor on text files (default: the Python stdlib); resumable")
    t.add_argument("--model", default="smollm2", help="base model: bundled name or HF id/path (default smollm2)")
    t.add_argument("--ratio", type=int, default=8, help="segment tokens per summary token (default 8)")
    t.add_argument("--data", nargs="+", default=["stdlib"], metavar="PATH",
                   help="files/folders, or 'stdlib' (training split) / 'stdlib-heldout' (default: stdlib)")
    t.add_argument("--out", default=None, help="run folder; rerun with the same folder to resume "
                                               "(default runs/compressor-MODEL-rRATIO)")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--segment-tokens", type=int, default=128, help="n: tokens per segment (default 128)")
    t.add_argument("--cont-tokens", type=int, default=64, help="continuation tokens for the LM/KL losses (default 64)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=20)
    t.add_argument("--lora-r", type=int, default=None,
                   help="LoRA rank (default 8; with --init-from, the checkpoint's, or a larger rank to grow it to: "
                        "the grown adapter starts as the same function)")
    t.add_argument("--anchor", default="last", choices=["last", "none"],
                   help="'last': summary = last m token embeddings + learned residual (default); 'none': pure ICAE")
    t.add_argument("--w-ae", type=float, default=1.0, help="weight of the reconstruction loss")
    t.add_argument("--w-lm", type=float, default=1.0, help="weight of the continuation LM loss")
    t.add_argument("--w-kl", type=float, default=1.0, help="weight of the self-distillation KL")
    t.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from this compressor's weights (bundled name or folder) with a fresh optimizer and "
                        "LR schedule: a second training stage, e.g. with other loss weights")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps (default 25)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--save-bundle", default=None, metavar="DIR",
                   help="when finished, also write an fp16 copy for shipping (e.g. ctxmem/compress/checkpoints/smollm2-r8)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_train_entry)

    e = csub.add_parser("eval", help="recovered fraction of the full context's gain, vs baselines, on held-out text")
    e.add_argument("--ratio", type=int, default=8)
    e.add_argument("--model", default="smollm2")
    e.add_argument("--checkpoint", default=None, help="compressor folder or bundled name (default MODEL-rRATIO)")
    e.add_argument("--data", nargs="+", default=["stdlib-heldout"], metavar="FILE")
    e.add_argument("--max-windows", type=int, default=64)
    e.add_argument("--segment-tokens", type=int, default=128, help="only with --baselines-only (else the checkpoint's)")
    e.add_argument("--cont-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--baselines-only", action="store_true", help="no compressor: just the baselines")
    e.add_argument("--no-llmlingua", action="store_true", help="skip the llmlingua baseline")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_eval)


def _train_entry(args) -> int:
    if args.out is None:
        args.out = f"runs/compressor-{args.model.replace('/', '_')}-r{args.ratio}"
    return _cmd_train(args)

"""Train the reader adapter with ctxmem attention in the loop.

    python -m ctxmem.reader.train --out runs/reader --steps 300        # resumes from --out if present

Each step: a synthetic retrieval task (``tasks.py``) of ``--min-tokens``..``--max-tokens`` tokens as a
chat prompt; the wrapped model reads its body with the adapter off and no gradient (the numba kernel
does the work), exactly as at inference; the question chunk and the teacher-forced answer run with
the adapter on and autograd on (the op's torch reference has the backward), and the loss is the
cross-entropy of the answer. Since the question attends sinks + retrieved blocks + local window
whatever the context length, short haystacks train the composition long ones present.
A step whose asked fact is not among the attended tokens (the embedder missed it) has no answer loss:
its answer could only be guessed, and guessing is not what the adapter should learn.

``--tasks facts:1,chains:2`` mixes in reference chains (``tasks.make_chain_task``): their answers list
names that are found one after another, so they are teacher-forced token by token as decoding reads
them (each step retrieves with the names written so far), and train only when the answer's steps
together attended every statement of the chain.

With ``--kl-weight`` > 0 each step also reads a plain window of training-module code twice, adapter off
and on, and adds KL(off || on) over the predictions of its last chunk: the adapter is on for the last
chunk of every read, so it must leave plain language modelling where the stock model had it.

Task ``s`` depends only on ``(seed, s)``, and the run folder holds the adapter, the optimizer state
(safetensors) and ``train_state.json`` (written last), so rerunning the command resumes where it
stopped and sees the tasks an uninterrupted run would.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .._atomic import atomic_write_bytes
from .adapter import Reader, ReaderConfig, ReaderError

STATE_FILE = "train_state.json"
OPT_FILE = "optimizer.safetensors"
TRAIN_CONFIG = {"prefill_chunk": 128, "gpu_prefill_chunk": None}  # MemoryConfig settings the trainer fixes unless --config overrides them


@dataclass
class Example:
    prompt: list[int]  # read through working memory; its last chunk is the question
    answer: list[int]  # teacher-forced after it
    visible: Callable | None = None  # (cache) -> bool: is what the answer needs among the attended tokens?
    # (text) -> bool. When set, the answer is teacher-forced token by token, as decoding reads it (each
    # step retrieves with the names written so far: a chain's later hops are found only that way), and
    # the step trains only if ``text``, everything the answer's steps attended, holds what it is read from.
    visible_answer: Callable | None = None


@dataclass
class TrainSettings:
    steps: int = 300
    lr: float = 2e-4
    warmup: int = 20
    clip: float = 1.0
    seed: int = 0
    save_every: int = 25
    kl_weight: float = 0.0  # weight of KL(adapter off || on) on a plain window (see kl_loss)


def example_loss(model, ex: Example, new_cache) -> torch.Tensor | None:
    """Cross-entropy of ``ex.answer`` after reading ``ex.prompt`` through a fresh working memory
    (None when ``ex.visible`` or ``ex.visible_answer`` says the needed tokens were not attended). Call under grad."""
    tok = model._ctxmem.tokenizer
    if ex.visible_answer is not None and tok is None:  # before any forward: the check needs the text
        raise ReaderError("example_loss: visible_answer reads the attended text; wrap(..., tokenizer=tok)")
    cache = new_cache(model)
    cache.record_selection = ex.visible is not None or ex.visible_answer is not None
    out = model(torch.tensor([ex.prompt]), cache=cache, logits_to_keep=1)
    if ex.visible is not None and not ex.visible(cache):
        return None
    first = out.logits[0, -1:]
    if ex.visible_answer is not None:
        # decode-style: one token per step, each choosing its own blocks (a forward per answer token)
        seen, logits = [attended_text(cache, tok)], [first]
        for tok_id in ex.answer[:-1]:
            logits.append(model(torch.tensor([[tok_id]]), cache=cache, logits_to_keep=1).logits[0, -1:])
            seen.append(attended_text(cache, tok))
        if not ex.visible_answer(" ".join(seen)):
            return None
        first = torch.cat(logits)
    elif len(ex.answer) > 1:
        # The answer is teacher-forced as one more question chunk, not token by token (2 forwards a
        # step instead of one per token). Its block choice sees the whole answer, where a decode step
        # sees the tokens before it; the first answer token, the one that decides, comes from the question.
        rest = model(torch.tensor([ex.answer[:-1]]), cache=cache, logits_to_keep=0).logits[0]
        first = torch.cat([first, rest])
    cache.record_selection = False
    return torch.nn.functional.cross_entropy(first.float(), torch.tensor(ex.answer))


def kl_loss(model, ids: list[int], new_cache, keep: int) -> torch.Tensor:
    """KL(adapter off || adapter on) over the next-token predictions of the last ``keep`` positions of
    ``ids`` read through working memory (mean over positions, in nats). Call under grad."""
    state = model._ctxmem
    reader, state.reader = state.reader, None  # the same read with the adapter never switched on
    try:
        with torch.no_grad():
            base = model(torch.tensor([ids]), cache=new_cache(model), logits_to_keep=keep).logits[0].float()
    finally:
        state.reader = reader
    out = model(torch.tensor([ids]), cache=new_cache(model), logits_to_keep=keep).logits[0].float()
    t_logp, s_logp = base.log_softmax(-1), out.log_softmax(-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()


def train(model, reader: Reader, make_example: Callable[[int], Example], out_dir: str | Path,
          ts: TrainSettings, task: dict | None = None, progress: bool = True, log: Callable = print,
          make_plain: Callable[[int], list[int]] | None = None) -> dict:
    """Train ``reader`` (its model already wrapped with ``reader=reader``) for ``ts.steps`` steps.

    ``make_plain``: ``step -> token ids`` of a plain text window for the KL term (needed when
    ``ts.kl_weight`` > 0).
    ``task``: what ``make_example`` depends on besides the step (recorded; a resume must match).
    Resumes from ``out_dir`` when it holds a run made with the same settings, task and reader config."""
    from safetensors.torch import load, save

    from ..hf.forward import chunk_size
    from ..hf.state import new_cache

    if getattr(model, "_ctxmem", None) is None or model._ctxmem.reader is not reader:
        raise ReaderError("reader.train: wrap the model with reader=<this reader> first")
    if ts.kl_weight > 0 and make_plain is None:
        raise ReaderError("reader.train: kl_weight > 0 needs make_plain (the plain windows the KL is taken on)")
    keep = chunk_size(model, model._ctxmem.cfg)  # the KL covers the chunk the adapter is on for
    out_dir = Path(out_dir)
    params = list(reader.parameters().values())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=ts.lr, weight_decay=0.0)
    state = {"step": 0, "log": [], "settings": asdict(ts), "task": task or {}, "reader": asdict(reader.config)}
    sfile = out_dir / STATE_FILE
    if sfile.is_file():
        try:
            saved = json.loads(sfile.read_text())
        except ValueError as e:
            raise ReaderError(f"{sfile}: unreadable ({e}); delete {out_dir} to start over") from e
        saved_settings = {**asdict(TrainSettings()), **saved["settings"]}  # runs older than a setting had its default
        same = {k: v for k, v in saved_settings.items() if k not in ("steps", "save_every")}
        now = {k: v for k, v in asdict(ts).items() if k not in ("steps", "save_every")}
        if same != now or saved.get("task") != state["task"] or saved.get("reader") != state["reader"]:
            raise ReaderError(f"{sfile}: resuming needs the same settings; saved {saved.get('settings')} "
                              f"{saved.get('task')} {saved.get('reader')}, given {asdict(ts)} {state['task']} "
                              f"{state['reader']}; use another --out or delete {out_dir}")
        reader.load_weights(Reader.read_checkpoint(out_dir)[1], where=str(out_dir))
        blob = load((out_dir / OPT_FILE).read_bytes())
        opt.load_state_dict({"state": {i: {"step": blob[f"{i}.step"][0], "exp_avg": blob[f"{i}.exp_avg"],
                                           "exp_avg_sq": blob[f"{i}.exp_avg_sq"]}
                                       for i in range(len(params)) if f"{i}.step" in blob},
                             "param_groups": opt.state_dict()["param_groups"]})
        state.update(step=saved["step"], log=saved["log"])
        log(f"reader: resuming {out_dir} from step {state['step']}")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=ts.steps, initial=state["step"], unit="step", desc="reader")
    while state["step"] < ts.steps:
        step = state["step"]
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = ts.lr * min(1.0, (step + 1) / max(1, ts.warmup))
        torch.manual_seed(ts.seed * 1_000_003 + step)
        with torch.enable_grad():
            loss = example_loss(model, make_example(step), new_cache)
            kl = kl_loss(model, make_plain(step), new_cache, keep) if ts.kl_weight > 0 else None
            total = [x for x in (loss, None if kl is None else ts.kl_weight * kl) if x is not None]
            if total:
                sum(total).backward()
                torch.nn.utils.clip_grad_norm_(params, ts.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        rec = {"step": step, "loss": None if loss is None else round(loss.item(), 4)}
        if kl is not None:
            rec["kl"] = round(kl.item(), 5)
        state["log"].append({**rec, "seconds": round(time.time() - t0, 2)})
        state["step"] = step + 1
        if bar is not None:
            recent = [r["loss"] for r in state["log"][-50:] if r["loss"] is not None]
            kls = [r["kl"] for r in state["log"][-50:] if "kl" in r]
            bar.set_postfix(loss=f"{sum(recent) / max(1, len(recent)):.3f}",
                            skipped=sum(r["loss"] is None for r in state["log"][-50:]),
                            **({"kl": f"{sum(kls) / len(kls):.4f}"} if kls else {}))
            bar.update(1)
        if state["step"] % ts.save_every == 0 or state["step"] == ts.steps:
            _save(reader, opt, params, state, out_dir, save)
    if bar is not None:
        bar.close()
    return state


def _save(reader, opt, params, state, out_dir: Path, save) -> None:
    # weights and optimizer first, the state file (which names the step) last: a crash in between
    # resumes from the previous state file and repeats at most one save's steps
    reader.save_pretrained(out_dir, meta={"trained_steps": state["step"], "settings": state["settings"]})
    st = opt.state_dict()["state"]
    blob = {}
    for i in range(len(params)):
        if i in st:
            blob[f"{i}.step"] = torch.as_tensor(st[i]["step"], dtype=torch.float32).reshape(1)
            blob[f"{i}.exp_avg"] = st[i]["exp_avg"].contiguous()
            blob[f"{i}.exp_avg_sq"] = st[i]["exp_avg_sq"].contiguous()
    atomic_write_bytes(out_dir / OPT_FILE, save(blob))
    atomic_write_bytes(out_dir / STATE_FILE, (json.dumps(state) + "\n").encode())


# ---- the synthetic tasks on a real model -------------------------------------------------------
def prompt_ids(tok, user: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"])


def composed_text(tok, ids: list[int], t: int, cfg, blocks) -> str:
    """The text a chunk starting at position ``t`` attends: sinks, the middle ``blocks``, the local window."""
    from ..ops import middle_blocks

    sink, S = min(cfg.sink_tokens, t), cfg.block_size
    local_start = sink + middle_blocks(t, cfg_params(cfg)) * S
    parts = [ids[:sink]] + [ids[cfg.sink_tokens + j * S: cfg.sink_tokens + (j + 1) * S] for j in sorted(blocks)]
    parts.append(ids[local_start:])
    return " ".join(tok.decode(x) for x in parts)


def cfg_params(cfg):
    from ..ops import OpParams

    return OpParams(cfg.block_size, cfg.topk_blocks, cfg.sink_tokens, cfg.local_tokens, 1.0)


def attended_text(cache, tok) -> str:
    """The text the last chunk attended in row 0 (with the blocks layer 0 selected for it)."""
    ids = cache.token_ids[0]
    sel = cache.last_selection.get(0)
    blocks = set() if sel is None else {int(j) for j in sel[0].flatten().tolist() if j >= 0}
    return composed_text(tok, ids, len(ids) - int(cache.n_new[0]), cache.cfg, blocks)


def stdlib_texts(max_files: int = 400, seed: int = 0) -> list[str]:
    """Source of the standard library's training modules (never the held-out ones), as haystack text."""
    from ..compress.data import read_text, stdlib_files

    files = stdlib_files(heldout=False)
    random.Random(seed).shuffle(files)
    out = []
    for f in files:
        t = read_text(f)
        if len(t) > 4000:
            out.append(t)
            if len(out) >= max_files:
                break
    return out


def parse_mix(spec: str) -> dict[str, float]:
    """``"facts"`` or ``"facts:2,chains:1"`` -> {family: weight} (families of ``tasks.FAMILIES``)."""
    from .tasks import FAMILIES

    mix = {}
    for part in spec.split(","):
        name, _, w = part.strip().partition(":")
        if name not in FAMILIES:
            raise ReaderError(f"--tasks: unknown task family {name!r} (known: {', '.join(FAMILIES)})")
        try:
            mix[name] = float(w) if w else 1.0
        except ValueError:
            raise ReaderError(f"--tasks: weight of {name!r} must be a number, got {w!r}") from None
        if not mix[name] > 0:
            raise ReaderError(f"--tasks: weight of {name!r} must be positive, got {w!r}")
    return mix


def task_examples(tok, seed: int, min_tokens: int, max_tokens: int, chars_per_token: float = 3.6,
                  mix: dict[str, float] | None = None):
    """``step -> Example`` over the synthetic retrieval tasks (depends only on seed and step).

    ``mix``: task family -> weight (default: facts only, the tasks the bundled reader was trained on;
    with facts only the examples are exactly those of runs made before families existed)."""
    from .tasks import FAMILIES

    mix = mix or {"facts": 1.0}
    names, weights = list(mix), list(mix.values())
    texts = stdlib_texts(seed=seed)
    end = tok("<|im_end|>", add_special_tokens=False)["input_ids"]

    def make(step: int) -> Example:
        rng = random.Random(f"{seed}:{step}")
        n_tok = rng.randint(min_tokens, max_tokens)
        family = names[0] if len(names) == 1 else random.Random(f"family:{seed}:{step}").choices(names, weights)[0]
        task = FAMILIES[family](seed * 1_000_003 + step, texts, n_chars=int(n_tok * chars_per_token))
        ans = tok(task.answer, add_special_tokens=False)["input_ids"] + end
        if task.needed:  # read over several decode steps: check what they attended together
            return Example(prompt_ids(tok, task.messages_user), ans,
                           visible_answer=lambda text: all(st in text for st in task.needed))
        return Example(prompt_ids(tok, task.messages_user), ans,
                       visible=lambda cache: task.value in attended_text(cache, tok))

    return make


def plain_windows(tok, seed: int, min_tokens: int, max_tokens: int):
    """``step -> token ids``: a window of training-module code (depends only on seed and step)."""
    texts = stdlib_texts(seed=seed)

    def make(step: int) -> list[int]:
        rng = random.Random(f"plain:{seed}:{step}")
        n = rng.randint(min_tokens, max_tokens)
        while True:
            text = rng.choice(texts)
            start = rng.randrange(0, max(1, len(text) - 5 * n))
            ids = tok(text[start:start + 5 * n], add_special_tokens=False)["input_ids"]  # >= n tokens for code
            if len(ids) >= n:
                return ids[:n]

    return make


def main(argv=None) -> None:
    import ctxmem

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run folder (resumed when it holds a run)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--min-tokens", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--config", default="{}", help="MemoryConfig overrides as JSON (default: the defaults, "
                   "with prefill_chunk 128)")
    p.add_argument("--kl-weight", type=float, default=0.0,
                   help="weight of KL(adapter off || on) on plain code windows (keeps language modelling)")
    p.add_argument("--kl-tokens", default="1024,1536", help="MIN,MAX length of the KL's plain code windows")
    p.add_argument("--tasks", default="facts", help="task families and weights, e.g. facts:1,chains:1 "
                   "(facts: the bundled reader's; chains: reference chains, see reader/tasks.py)")
    p.add_argument("--init", default=None, help="start from this reader checkpoint's weights (a fresh optimizer); "
                   "pair it with a new --seed so the tasks are new")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = ctxmem.load_model(args.model)
    reader = Reader(model, ReaderConfig(base_model=args.model, lora_r=args.rank, lora_alpha=2 * args.rank,
                                        lora_targets=args.targets.split(",")), seed=args.seed)
    init = None
    if args.init:
        doc, weights, init = Reader.read_checkpoint(args.init)
        reader.load_weights(weights, where=str(init))  # a resume then replaces them with the run's own
    # The trainer reads in 128-token chunks, as the bundled reader was trained, whatever the inference default
    # (512 since 2026-11-30); --config can still set it. The task records only the overrides given.
    ctxmem.wrap(model, ctxmem.MemoryConfig(**{**TRAIN_CONFIG, **json.loads(args.config)}), tokenizer=tok,
                reader=reader)
    ts = TrainSettings(steps=args.steps, lr=args.lr, warmup=args.warmup, seed=args.seed, save_every=args.save_every,
                       kl_weight=args.kl_weight)
    mix = parse_mix(args.tasks)
    make = task_examples(tok, args.seed, args.min_tokens, args.max_tokens, mix=mix)
    kl_min, kl_max = (int(x) for x in args.kl_tokens.split(","))
    plain = plain_windows(tok, args.seed, kl_min, kl_max) if args.kl_weight > 0 else None
    task = {"model": args.model, "min_tokens": args.min_tokens, "max_tokens": args.max_tokens,
            "config": json.loads(args.config),
            **({} if mix == {"facts": 1.0} else {"tasks": mix}),  # runs from before --tasks resume
            **({"kl_tokens": [kl_min, kl_max]} if args.kl_weight > 0 else {}),
            **({"init": str(init), "init_sha256": doc["weights"]["sha256"]} if init else {})}
    state = train(model, reader, make, args.out, ts, task=task, make_plain=plain)
    done = [r for r in state["log"] if r["loss"] is not None]
    print(json.dumps({"out": str(args.out), "steps": state["step"], "trained": len(done),
                      "skipped": state["step"] - len(done),
                      "loss_last50": round(sum(r["loss"] for r in done[-50:]) / max(1, len(done[-50:])), 4),
                      **({"kl_last50": round(sum(r["kl"] for r in state["log"][-50:]) / len(state["log"][-50:]), 5)}
                         if args.kl_weight > 0 else {})}))


if __name__ == "__main__":
    main()

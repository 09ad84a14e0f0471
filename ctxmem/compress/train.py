"""Training the compressor: reconstruction + continuation LM + self-distillation (KL).

For a window ``[segment (n tokens) | continuation (c tokens)]``:

- reconstruction: the frozen decoder reads ``[BOS, summary, AE]`` and must reproduce the segment
  (teacher-forced cross-entropy over its n tokens);
- continuation: the decoder reads ``[BOS, summary]`` and predicts the continuation (cross-entropy);
- KL: on the continuation, KL(teacher || student) where the teacher is the same frozen model
  reading the full segment ``[BOS, segment, continuation]``.

Only the LoRA adapter (encoder side), the memory slots, the projector, the gain and the AE
marker are trained. A run is checkpointed every ``save_every`` steps into
``OUT/checkpoint-STEP/`` (a loadable compressor + optimizer state, safetensors only) and the
pointer ``OUT/trainer.json`` is swapped atomically after it; rerunning the same command resumes
from the last checkpoint. Batch ``s`` depends only on ``(seed, s)``, so a resumed run sees the
same data as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .._atomic import atomic_write_bytes
from .model import Compressor, CompressorConfig, CompressorError

TRAINER_FILE = "trainer.json"
OPTIM_FILE = "optimizer.safetensors"


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 2
    lr: float = 1e-3
    warmup: int = 20
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    cont_tokens: int = 64
    w_ae: float = 1.0
    w_lm: float = 1.0
    w_kl: float = 1.0
    seed: int = 0
    save_every: int = 50
    init_from: str | None = None  # start from this checkpoint's weights (fresh optimizer): a second stage


def compressor_losses(comp: Compressor, window: torch.Tensor, cont_tokens: int,
                      reconstruction: bool = True) -> dict[str, torch.Tensor]:
    """Losses on a (B, n + c) batch of token windows; every value is a scalar tensor.

    ``reconstruction=False`` skips the autoencoding pass (no "ae"/"ae_acc"): a third less work when
    its weight is 0."""
    n, m = comp.config.segment_tokens, comp.config.slots
    if window.shape[1] != n + cont_tokens:
        raise CompressorError(f"window of {window.shape[1]} tokens, expected segment {n} + continuation {cont_tokens}")
    window = window.to(comp.slots.device)
    seg, cont = window[:, :n], window[:, n:]
    b = window.shape[0]
    summary = comp.encode(seg)
    pre = comp.prefix(summary)  # (B, 1 + m, d)
    dec = comp.model  # adapter off outside encode(): the frozen base model
    out = {}
    if reconstruction:  # [BOS, summary, AE, seg] -> seg
        x = torch.cat([pre, comp.ae.view(1, 1, -1).expand(b, 1, -1), comp.embed(seg)], dim=1)
        logits = dec(inputs_embeds=x, use_cache=False, logits_to_keep=n + 1).logits[:, :-1]
        out["ae"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), seg.reshape(-1))
        out["ae_acc"] = (logits.argmax(-1) == seg).float().mean().detach()
    # continuation: [BOS, summary, cont] -> cont
    x = torch.cat([pre, comp.embed(cont)], dim=1)
    s_logits = dec(inputs_embeds=x, use_cache=False, logits_to_keep=cont_tokens + 1).logits[:, :-1].float()
    lm = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]), cont.reshape(-1))
    with torch.no_grad():
        full = torch.cat([torch.full((b, 1), comp.config.bos_id, device=window.device), window], dim=1)
        t_logits = dec(input_ids=full, use_cache=False, logits_to_keep=cont_tokens + 1).logits[:, :-1].float()
        t_logp = F.log_softmax(t_logits, -1)
        ce_full = F.nll_loss(t_logp.reshape(-1, t_logp.shape[-1]), cont.reshape(-1))
    s_logp = F.log_softmax(s_logits, -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    return {**out, "lm": lm, "kl": kl, "ce_full": ce_full}


def _term_as_interrupt():
    """SIGTERM (kill, a scheduler's timeout) -> KeyboardInterrupt, so the finally block checkpoints."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    return signal.signal(signal.SIGTERM, handler)


def _lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_frac + (1 - tc.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _named_trainables(comp: Compressor) -> dict[str, torch.nn.Parameter]:
    out = {k: p for k, p in comp.named_parameters()}
    out.update({f"lora.{k}": p for k, p in comp.lora_parameters().items()})
    return out


def _optim_state(opt: torch.optim.Optimizer, names: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    by_param = {id(p): k for k, p in names.items()}
    out = {}
    for p, st in opt.state.items():
        k = by_param[id(p)]
        for sk, sv in st.items():
            out[f"{k}::{sk}"] = torch.as_tensor(sv).detach().cpu().contiguous()
    return out


def _load_optim_state(opt: torch.optim.Optimizer, names: dict[str, torch.nn.Parameter], state: dict, where: str):
    for k, p in names.items():
        keys = [f"{k}::{s}" for s in ("step", "exp_avg", "exp_avg_sq")]
        if not all(kk in state for kk in keys):
            raise CompressorError(f"{where}: optimizer state lacks {k}")
        opt.state[p] = {"step": state[keys[0]].clone(), "exp_avg": state[keys[1]].to(p.device).clone(),
                        "exp_avg_sq": state[keys[2]].to(p.device).clone()}


def _save_checkpoint(out: Path, comp: Compressor, opt, tc: TrainConfig, step: int, history: list, meta: dict):
    from safetensors.torch import save

    ck = out / f"checkpoint-{step}"
    if ck.exists():
        shutil.rmtree(ck)
    comp.save_pretrained(ck, meta={**meta, "step": step})
    atomic_write_bytes(ck / OPTIM_FILE, save(_optim_state(opt, _named_trainables(comp))))
    doc = {"step": step, "checkpoint": ck.name, "train": asdict(tc), "compressor": comp.config.to_dict(),
           "history": history, "meta": meta}
    atomic_write_bytes(out / TRAINER_FILE, (json.dumps(doc, indent=1) + "\n").encode())  # the commit point
    for old in out.glob("checkpoint-*"):
        if old.name != ck.name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def train(comp: Compressor, batches, out: str | Path, tc: TrainConfig, max_seconds: float | None = None,
          progress: bool = True, meta: dict | None = None, log=print) -> dict:
    """Train ``comp`` in place; ``batches(step) -> (B, n + c) LongTensor``. Resumes from ``out`` if it holds a run.

    Returns a summary: steps done, seconds, first/last losses, and whether the run finished.
    """
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    names = _named_trainables(comp)
    for p in comp.model.parameters():
        p.requires_grad_(False)
    for p in names.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(names.values()), lr=tc.lr, weight_decay=tc.weight_decay)
    step, history = 0, []
    tfile = out / TRAINER_FILE
    if tfile.exists():
        try:
            doc = json.loads(tfile.read_text())
        except ValueError as e:
            raise CompressorError(f"{tfile}: unreadable ({e}); delete {out} to start over") from e
        if doc["compressor"] != comp.config.to_dict():
            raise CompressorError(f"{tfile}: this run was made with compressor config {doc['compressor']}, "
                                  f"not {comp.config.to_dict()}; use another --out or delete {out}")
        saved_tc = {k: v for k, v in {**asdict(TrainConfig()), **doc["train"]}.items()  # older runs lack newer keys
                    if k not in ("steps", "save_every")}
        now_tc = {k: v for k, v in asdict(tc).items() if k not in ("steps", "save_every")}
        if saved_tc != now_tc:
            raise CompressorError(f"{tfile}: resuming needs the same training settings; saved {saved_tc}, given {now_tc}")
        ck = out / doc["checkpoint"]
        _, state, _ = Compressor.read_checkpoint(ck)
        comp.load_weights(state, where=str(ck))
        _load_optim_state(opt, names, load_file(str(ck / OPTIM_FILE)), str(ck / OPTIM_FILE))
        step, history = int(doc["step"]), list(doc["history"])
        meta = {**doc.get("meta", {}), **meta}
        log(f"resuming {out} from step {step}")
    meta.setdefault("seconds", 0.0)
    t0 = time.perf_counter()
    secs_before = float(meta["seconds"])
    comp.train()
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    finished = step >= tc.steps
    last_saved = step
    old_term = _term_as_interrupt()
    try:
        while step < tc.steps:
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                break
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, tc)
            with torch.enable_grad():
                losses = compressor_losses(comp, batches(step), tc.cont_tokens, reconstruction=tc.w_ae != 0)
                loss = tc.w_lm * losses["lm"] + tc.w_kl * losses["kl"]
                if "ae" in losses:
                    loss = loss + tc.w_ae * losses["ae"]
                if not torch.isfinite(loss):
                    raise RuntimeError(f"non-finite loss at step {step}: { {k: float(v) for k, v in losses.items()} }")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(list(names.values()), tc.clip)
                opt.step()
            step += 1
            rec = {"step": step, "loss": round(float(loss.detach()), 5), **{k: round(float(v.detach()), 5) for k, v in losses.items()},
                   "grad_norm": round(float(gn), 4), "lr": _lr_at(step - 1, tc)}
            history.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lm=f"{rec['lm']:.3f}", kl=f"{rec['kl']:.3f}",
                            **({"ae_acc": f"{rec['ae_acc']:.2f}"} if "ae_acc" in rec else {}))
            if step % tc.save_every == 0 or step == tc.steps:
                meta["seconds"] = round(secs_before + time.perf_counter() - t0, 1)
                _save_checkpoint(out, comp, opt, tc, step, history, meta)
                last_saved = step
        finished = step >= tc.steps
    finally:
        bar.close()
        comp.eval()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if step > last_saved:  # stopped by time, error or Ctrl-C: keep what was done
            meta["seconds"] = round(secs_before + time.perf_counter() - t0, 1)
            _save_checkpoint(out, comp, opt, tc, step, history, meta)
    meta["seconds"] = round(secs_before + time.perf_counter() - t0, 1)
    if finished:
        comp.save_pretrained(out, meta={**meta, "step": step, "train": asdict(tc)})
    first = history[0] if history else None
    return {"steps": step, "finished": finished, "seconds": meta["seconds"], "first": first,
            "last": history[-1] if history else None, "out": str(out)}


def make_compressor(model, tokenizer, ratio: int, segment_tokens: int, base_model: str, seed: int = 0,
                    lora_r: int = 8, calib: torch.Tensor | None = None, anchor: str = "last") -> Compressor:
    """A fresh compressor; ``gain`` is set from the measured scale of embeddings vs final hidden states
    (times 0.1 with ``anchor="last"``, so the untrained residual is a small perturbation of truncation)."""
    bos = 0
    if tokenizer is not None:
        for t in ("<|endoftext|>",):
            i = tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == t:
                bos = i
                break
        else:  # pragma: no cover
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (tokenizer.eos_token_id or 0)
    gain = 1.0
    if calib is not None:
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            h = model.model(input_ids=calib.to(emb.device), use_cache=False).last_hidden_state
            gain = float(emb.norm(dim=-1).mean() / h.norm(dim=-1).mean())
    if anchor == "last":
        gain *= 0.1
    cfg = CompressorConfig(base_model=base_model, ratio=ratio, segment_tokens=segment_tokens, lora_r=lora_r,
                           lora_alpha=2 * lora_r, bos_id=bos, gain=round(gain, 6), anchor=anchor)
    return Compressor(model, tokenizer, cfg, seed=seed)

"""Evaluating compression: how much of the full context's help survives at a fixed decoder budget.

For each held-out window ``[segment (n tokens) | continuation (c tokens)]`` the frozen decoder
reads ``[BOS, context, continuation]`` and we measure its mean cross-entropy on the c
continuation tokens. The context is:

- ``full``: the whole segment (n positions) -- the ceiling; ``none``: nothing -- the floor;
- every other method gets the same budget of ``m = n / ratio`` decoder positions:
  ``ctxmem`` (the learned summary tokens), ``truncate`` (the last m tokens), ``random_drop``
  (m tokens kept at random, in order; 3 seeds), ``mean_pool`` (the mean of each run of
  n/m token embeddings), ``surprisal_drop`` (the m tokens SmolLM2 finds most surprising, in
  order: LLMLingua's token-level criterion with the model itself as scorer), ``llmlingua``
  (the real package, when it runs offline) and ``control`` (ctxmem summaries of a different
  document: must recover about nothing).

``recovered = (ce_none - ce) / (ce_none - ce_full)``, computed on the means over windows; the
95% interval is a paired bootstrap over windows (1000 resamples, fixed seed).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

BOOT = 1000


def _ce(model, x_embeds: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """Per-row mean CE of ``cont`` (B, c) when the decoder reads ``[x_embeds, cont]``; x includes BOS."""
    c = cont.shape[1]
    emb = model.get_input_embeddings()(cont)
    logits = model(inputs_embeds=torch.cat([x_embeds, emb], 1), use_cache=False, logits_to_keep=c + 1).logits[:, :-1]
    return F.cross_entropy(logits.float().transpose(1, 2), cont, reduction="none").mean(1)


def bootstrap_recovered(ce_none, ce_full, ce, seed: int = 0, n: int = BOOT) -> tuple[float, float, float]:
    ce_none, ce_full, ce = (torch.as_tensor(v, dtype=torch.float64) for v in (ce_none, ce_full, ce))
    point = float((ce_none.mean() - ce.mean()) / (ce_none.mean() - ce_full.mean()))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(ce), (n, len(ce)), generator=g)
    num = ce_none[idx].mean(1) - ce[idx].mean(1)
    den = ce_none[idx].mean(1) - ce_full[idx].mean(1)
    r = (num / den).sort().values
    return point, float(r[int(0.025 * n)]), float(r[int(0.975 * n) - 1])


def _mean_ci(v) -> tuple[float, float]:
    v = torch.as_tensor(v, dtype=torch.float64)
    return float(v.mean()), float(1.96 * v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0


class Baselines:
    """Context selections at a budget of m positions, each returning (B, m, d) decoder inputs."""

    def __init__(self, model, bos_id: int):
        self.model = model
        self.bos_id = bos_id
        self.emb = model.get_input_embeddings()

    def bos(self, b: int) -> torch.Tensor:
        return self.emb(torch.full((b, 1), self.bos_id, dtype=torch.long))

    def truncate(self, seg: torch.Tensor, m: int) -> torch.Tensor:
        return self.emb(seg[:, -m:])

    def random_drop(self, seg: torch.Tensor, m: int, seed: int) -> torch.Tensor:
        rows = []
        for i in range(seg.shape[0]):
            keep = sorted(random.Random(f"{seed}:{i}:{seg.shape[1]}").sample(range(seg.shape[1]), m))
            rows.append(seg[i, keep])
        return self.emb(torch.stack(rows))

    def mean_pool(self, seg: torch.Tensor, m: int) -> torch.Tensor:
        b, n = seg.shape
        return self.emb(seg).view(b, m, n // m, -1).mean(2)

    def surprisal_scores(self, seg: torch.Tensor) -> torch.Tensor:
        """-log p(token | prefix) under the model for each segment token (B, n)."""
        x = torch.cat([torch.full((seg.shape[0], 1), self.bos_id, dtype=torch.long), seg], 1)
        logits = self.model(input_ids=x, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.transpose(1, 2), seg, reduction="none")

    def surprisal_drop(self, seg: torch.Tensor, m: int, scores: torch.Tensor) -> torch.Tensor:
        keep = scores.topk(m, dim=1).indices.sort(dim=1).values
        return self.emb(seg.gather(1, keep))


def _with_architectures(model_path: str) -> str:
    """LLMLingua reads ``config.architectures``; the cached GGUF conversion has none. Give it a
    temp folder of links to the same files with ``architectures`` filled in."""
    import json
    import os
    import tempfile
    from pathlib import Path

    src = Path(model_path)
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        return model_path
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("architectures"):
        return model_path
    tmp = Path(tempfile.mkdtemp(prefix="ctxmem-llmlingua-"))
    for f in src.iterdir():
        if f.name != "config.json":
            os.symlink(f.resolve(), tmp / f.name)
    cfg["architectures"] = ["LlamaForCausalLM"] if cfg.get("model_type") == "llama" else [cfg.get("model_type", "")]
    (tmp / "config.json").write_text(json.dumps(cfg))
    return str(tmp)


def llmlingua_compressor(model_path: str, tokenizer=None):
    """(callable(text, target_tokens) -> text, note) or (None, reason) when LLMLingua cannot run here.

    LLMLingua counts its budget with tiktoken's ``cl100k_base``, which tiktoken downloads from
    openaipublic.blob.core.windows.net on first use: offline that fails. When it does and a
    ``tokenizer`` is given, we retry with SmolLM2's own tokenizer as the counter (so the budget
    is in decoder tokens, which is what we compare at) and say so in the note.
    """
    try:
        import tiktoken
        from llmlingua import PromptCompressor
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        return None, f"llmlingua not importable: {type(e).__name__}: {e}"
    note = None
    model_path = _with_architectures(model_path)
    try:
        pc = PromptCompressor(model_name=model_path, device_map="cpu")
    except Exception as e:  # noqa: BLE001
        first = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if tokenizer is None or "tiktoken" not in first and "openaipublic" not in first:
            return None, f"llmlingua PromptCompressor(SmolLM2) failed offline: {first}"

        class _Counter:  # what llmlingua uses of a tiktoken Encoding
            def encode(self, text, **kw):
                return tokenizer(text, add_special_tokens=False)["input_ids"]

            def decode(self, ids, **kw):
                return tokenizer.decode(ids)

        orig = tiktoken.encoding_for_model
        tiktoken.encoding_for_model = lambda *a, **k: _Counter()
        try:
            pc = PromptCompressor(model_name=model_path, device_map="cpu")
        except Exception as e2:  # noqa: BLE001
            return None, (f"llmlingua failed offline: {first}; with SmolLM2's tokenizer as its counter: "
                          f"{type(e2).__name__}: {str(e2).splitlines()[0][:200]}")
        finally:
            tiktoken.encoding_for_model = orig
        note = ("llmlingua's tiktoken counter (cl100k_base) needs a download, unavailable offline; "
                "ran LLMLingua with SmolLM2 as scorer and SmolLM2's tokenizer as its token counter")

    def run(text: str, target: int) -> str:
        return pc.compress_prompt([text], target_token=target, use_context_level_filter=False,
                                  iterative_size=32)["compressed_prompt"]

    probe = " ".join(f"word{i} means thing number {i}." for i in range(40))  # ~300 tokens: forces iterations
    try:
        run(probe, 16)
    except Exception as e:  # noqa: BLE001 - report whatever breaks, do not fake the baseline
        return None, ((note + "; then ") if note else "") + (
            f"compress_prompt fails here: {type(e).__name__}: {str(e).splitlines()[0][:200]} "
            "(llmlingua 0.2.2 unpacks past_key_values as legacy (key, value) tuples; transformers 5 returns "
            "a Cache object). Its token-level criterion is measured as surprisal_drop instead.")
    return run, note


@torch.no_grad()
def evaluate(model, tokenizer, windows: list[tuple[str, list[int]]], segment_tokens: int, ratio: int,
             compressor=None, bos_id: int = 0, batch_size: int = 8, seeds=(0, 1, 2), llmlingua=None,
             llmlingua_note: str | None = None, cache: dict | None = None, progress: bool = True) -> dict:
    """Run every method on ``windows`` (each n + c tokens) at budget m = n / ratio; return the JSON report.

    ``cache`` (a dict) carries the ratio-independent numbers (full, none, surprisal scores) between calls.
    """
    from tqdm.auto import tqdm

    n = segment_tokens
    if n % ratio:
        raise ValueError(f"segment_tokens {n} is not a multiple of ratio {ratio}")
    m = n // ratio
    c = len(windows[0][1]) - n
    if c < 1 or any(len(w) != n + c for _, w in windows):
        raise ValueError("every window must have the same length, longer than the segment")
    if compressor is not None and (compressor.config.segment_tokens != n or compressor.config.ratio != ratio):
        raise ValueError(f"compressor is n={compressor.config.segment_tokens}, ratio={compressor.config.ratio}; "
                         f"eval asked for n={n}, ratio={ratio}")
    cache = {} if cache is None else cache
    base = Baselines(model, bos_id)
    ids = torch.tensor([w for _, w in windows], dtype=torch.long)
    names = [f for f, _ in windows]
    # control: each window gets the summary of a window from a different file (rotate by half)
    k = len(windows)
    partner = []
    for i in range(k):
        j = next(((i + k // 2 + t) % k for t in range(k) if names[(i + k // 2 + t) % k] != names[i]), None)
        partner.append(j)
    res: dict[str, list[float]] = {}
    acc: list[float] = []
    summaries: list[torch.Tensor] = []

    def add(name, v):
        res.setdefault(name, []).extend(v.tolist())

    bar = tqdm(total=k, disable=not progress, desc=f"eval r{ratio}", unit="win", dynamic_ncols=True)
    for s in range(0, k, batch_size):
        win = ids[s:s + batch_size]
        seg, cont = win[:, :n], win[:, n:]
        b = seg.shape[0]
        bos = base.bos(b)
        key = ("full_none", n, s, b)
        if key not in cache:
            cache[key] = (_ce(model, torch.cat([bos, base.emb(seg)], 1), cont), _ce(model, bos, cont),
                          base.surprisal_scores(seg))
        ce_full, ce_none, scores = cache[key]
        add("full", ce_full)
        add("none", ce_none)
        add("truncate", _ce(model, torch.cat([bos, base.truncate(seg, m)], 1), cont))
        for sd in seeds:
            add(f"random_drop_seed{sd}", _ce(model, torch.cat([bos, base.random_drop(seg, m, sd)], 1), cont))
        add("mean_pool", _ce(model, torch.cat([bos, base.mean_pool(seg, m)], 1), cont))
        add("surprisal_drop", _ce(model, torch.cat([bos, base.surprisal_drop(seg, m, scores)], 1), cont))
        if llmlingua is not None:
            rows = []
            for i in range(b):
                text = llmlingua(tokenizer.decode(seg[i].tolist()), m)
                t = tokenizer(text, add_special_tokens=False)["input_ids"][:m]
                rows.append(t)
            for i, t in enumerate(rows):  # varying lengths: one at a time, each capped at m
                x = torch.cat([bos[i:i + 1], base.emb(torch.tensor([t], dtype=torch.long))], 1) if t else bos[i:i + 1]
                add("llmlingua", _ce(model, x, cont[i:i + 1]))
                res.setdefault("_llmlingua_len", []).append(len(t))
        if compressor is not None:
            summ = compressor.encode(seg)
            summaries.append(summ)
            pre = compressor.prefix(summ)
            add("ctxmem", _ce(model, pre, cont))
            # reconstruction accuracy: [BOS, summary, AE, seg] teacher-forced
            x = torch.cat([pre, compressor.ae.view(1, 1, -1).expand(b, 1, -1), base.emb(seg)], 1)
            logits = model(inputs_embeds=x, use_cache=False, logits_to_keep=n + 1).logits[:, :-1]
            acc.extend((logits.argmax(-1) == seg).float().mean(1).tolist())
        bar.update(b)
    if compressor is not None:
        allsum = torch.cat(summaries, 0)
        for s in range(0, k, batch_size):
            idx = list(range(s, min(k, s + batch_size)))
            ok = [i for i in idx if partner[i] is not None]
            if not ok:
                continue
            pre = compressor.prefix(allsum[[partner[i] for i in ok]])
            add("control", _ce(model, pre, ids[ok, n:]))
    bar.close()

    ce_none, ce_full = res["none"], res["full"]
    methods = {}
    for name, v in res.items():
        if name in ("full", "none") or name.startswith("_"):
            continue
        if name == "control":
            ok = [i for i in range(k) if partner[i] is not None]
            cn, cf = [ce_none[i] for i in ok], [ce_full[i] for i in ok]
        else:
            cn, cf = ce_none, ce_full
        rec, lo, hi = bootstrap_recovered(cn, cf, v)
        mean, half = _mean_ci(v)
        methods[name] = {"ce": round(mean, 4), "ce_ci95": round(half, 4), "recovered": round(rec, 4),
                         "recovered_ci95": [round(lo, 4), round(hi, 4)]}
    rd = [k_ for k_ in methods if k_.startswith("random_drop_seed")]
    if rd:
        per_row = torch.tensor([res[k_] for k_ in rd]).mean(0)
        rec, lo, hi = bootstrap_recovered(ce_none, ce_full, per_row)
        methods["random_drop"] = {"ce": round(float(per_row.mean()), 4), "recovered": round(rec, 4),
                                  "recovered_ci95": [round(lo, 4), round(hi, 4)],
                                  "seeds": list(seeds),
                                  "recovered_per_seed": [methods[k_]["recovered"] for k_ in rd]}
        for k_ in rd:
            del methods[k_]
    if "llmlingua" in methods:
        methods["llmlingua"]["mean_tokens"] = round(sum(res["_llmlingua_len"]) / len(res["_llmlingua_len"]), 2)
    out = {"ratio": ratio, "segment_tokens": n, "slots": m, "continuation_tokens": c, "windows": k,
           "ce_full": round(_mean_ci(ce_full)[0], 4), "ce_full_ci95": round(_mean_ci(ce_full)[1], 4),
           "ce_none": round(_mean_ci(ce_none)[0], 4), "ce_none_ci95": round(_mean_ci(ce_none)[1], 4),
           "methods": methods, "bootstrap": {"resamples": BOOT, "seed": 0, "unit": "window"}}
    if acc:
        out["reconstruction_accuracy"] = round(sum(acc) / len(acc), 4)
        out["reconstruction_accuracy_ci95"] = round(_mean_ci(acc)[1], 4)
    if llmlingua_note:
        out["llmlingua_note" if llmlingua is not None else "llmlingua_skipped"] = llmlingua_note
    if compressor is not None:
        out["checkpoint"] = getattr(compressor, "source", None)
    return out

"""The learned compressor on tiny random models: shapes, determinism, persistence, training."""
import json
import math
import zlib
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model

pytest.importorskip("peft")

from ctxmem.compress.model import BUNDLED_DIR, CONFIG_FILE, WEIGHTS_FILE, Compressor, CompressorConfig, CompressorError  # noqa: E402
from ctxmem.compress.train import TrainConfig, compressor_losses, train  # noqa: E402

N, RATIO = 8, 4  # segment tokens, ratio -> 2 slots


def _comp(family="llama", seed=0, ratio=RATIO, n=N):
    model = tiny_model(family, seed=seed)
    cfg = CompressorConfig(base_model="tiny", ratio=ratio, segment_tokens=n, lora_r=4, lora_alpha=8, bos_id=1)
    comp = Compressor(model, None, cfg, seed=seed).eval()
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter so tests can see it
        for k, p in comp.lora_parameters().items():
            if "lora_B" in k:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(zlib.crc32(k.encode())))
    return comp


@pytest.fixture(scope="module")
def comp():
    return _comp()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 96), min_size=0, max_size=40))
def test_count_and_determinism(comp, ids):
    a = comp.compress(ids)
    b = comp.compress(ids)
    assert a.shape == (math.ceil(len(ids) / N) * (N // RATIO), 64)
    assert a.shape[0] == comp.summary_count(len(ids))
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()


def test_segments_are_independent_and_batched_equals_single(comp):
    ids = torch.randint(0, 97, (3 * N + 3,), generator=torch.Generator().manual_seed(1))
    whole = comp.compress(ids, batch_size=2)
    parts = [comp.compress(ids[i:i + N]) for i in range(0, len(ids), N)]
    torch.testing.assert_close(whole, torch.cat(parts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comp.compress(ids, batch_size=1, progress=True), whole, rtol=1e-5, atol=1e-5)
    # the summary depends on its segment
    other = ids.clone()
    other[0] = (other[0] + 1) % 97
    assert not torch.allclose(comp.compress(other)[:2], whole[:2])
    torch.testing.assert_close(comp.compress(other)[2:], whole[2:], rtol=1e-5, atol=1e-5)


def test_adapter_is_off_outside_encode():
    stock = tiny_model("qwen2", seed=3)
    model = tiny_model("qwen2", seed=3)
    cfg = CompressorConfig(base_model="tiny", ratio=2, segment_tokens=4, lora_r=4, lora_alpha=8, bos_id=1)
    comp = Compressor(model, None, cfg)
    for k, p in comp.lora_parameters().items():
        if "lora_B" in k:
            p.fill_(0.1)
    x = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(model(x).logits, stock(x).logits, rtol=0, atol=0)
    with comp.lora():
        assert not torch.allclose(model(x).logits, stock(x).logits)
    torch.testing.assert_close(model(x).logits, stock(x).logits, rtol=0, atol=0)
    assert sum(p.numel() for p in comp.state_dict().values()) < 10_000  # the base model is not in it


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 96), min_size=1, max_size=30), family=st.sampled_from(["llama", "mistral"]))
def test_save_load_identity(ids, family):
    comp = _comp(family, seed=5)
    with tempfile.TemporaryDirectory() as d:
        comp.save_pretrained(d, meta={"note": "test"})
        fresh = tiny_model(family, seed=5)  # same base weights, no adapter yet
        loaded = Compressor.from_pretrained(d, model=fresh)
        assert loaded.meta == {"note": "test"}
        assert torch.equal(comp.compress(ids), loaded.compress(ids))
        assert loaded.config == comp.config


def test_checkpoint_errors_name_the_file(tmp_path):
    comp = _comp()
    comp.save_pretrained(tmp_path)
    w = tmp_path / WEIGHTS_FILE
    blob = bytearray(w.read_bytes())
    blob[-1] ^= 0xFF
    w.write_bytes(bytes(blob))
    with pytest.raises(CompressorError, match="checksum mismatch") as e:
        Compressor.from_pretrained(tmp_path, model=tiny_model("llama"))
    assert str(w) in str(e.value)
    comp.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / CONFIG_FILE).read_text())
    doc["format"] = 99
    (tmp_path / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(CompressorError, match="format 99"):
        Compressor.from_pretrained(tmp_path, model=tiny_model("llama"))
    comp.save_pretrained(tmp_path)
    with pytest.raises(CompressorError, match="hidden size 64"):
        Compressor.from_pretrained(tmp_path, model=tiny_model("llama", heads=2))
    with pytest.raises(CompressorError, match="no compressor at"):
        Compressor.from_pretrained(tmp_path / "nope", model=tiny_model("llama"))
    with pytest.raises(CompressorError, match="multiple of ratio"):
        CompressorConfig(ratio=3, segment_tokens=8)


def test_bad_inputs(comp):
    with pytest.raises(CompressorError, match="needs a tokenizer"):
        comp.compress("some text")
    with pytest.raises(CompressorError, match=r"token ids must lie in \[0, 97\)"):
        comp.compress([5, 97])
    with pytest.raises(CompressorError, match="1-D"):
        comp.compress([[1, 2]])


def _batches(step, b=4, seed=0):
    # learnable structure: each window repeats its segment, so the continuation is in the summary
    g = torch.Generator().manual_seed(seed * 1000 + step)
    seg = torch.randint(2, 97, (b, N), generator=g)
    return torch.cat([seg, seg], 1)


def test_training_reduces_loss(tmp_path):
    comp = _comp(seed=1)
    # a random tiny model's logits are near uniform whatever it reads; sharpen them so context can matter
    comp.model.lm_head.weight.mul_(10)
    fixed = _batches(0)
    with torch.enable_grad():
        before = compressor_losses(comp, fixed, N)
        tc = TrainConfig(steps=12, batch_size=4, lr=2e-2, warmup=1, cont_tokens=N, save_every=100)
        out = train(comp, lambda s: fixed, tmp_path / "run", tc, progress=False, log=lambda *a: None)
    with torch.no_grad():
        after = compressor_losses(comp, fixed, N)
    total = lambda L: float(L["ae"] + L["lm"] + L["kl"])  # noqa: E731
    assert out["finished"] and out["steps"] == 12
    assert total(after) < 0.8 * total(before), (total(before), total(after))
    assert float(after["lm"]) < float(before["lm"])
    assert (tmp_path / "run" / CONFIG_FILE).is_file()  # the finished run is a loadable compressor
    Compressor.from_pretrained(tmp_path / "run", model=tiny_model("llama", seed=1))


def test_resume_matches_uninterrupted(tmp_path):
    tc = TrainConfig(steps=4, batch_size=2, lr=5e-3, warmup=1, cont_tokens=N, save_every=2)
    a = _comp(seed=2)
    with torch.enable_grad():
        train(a, lambda s: _batches(s, 2), tmp_path / "a", tc, progress=False, log=lambda *a: None)
        b = _comp(seed=2)
        half = train(b, lambda s: _batches(s, 2), tmp_path / "b", tc, max_seconds=0.0, progress=False,
                     log=lambda *a: None)  # stops before the first step
        assert half["steps"] == 0 and not half["finished"]
        tc2 = TrainConfig(**{**tc.__dict__, "steps": 2})
        train(b, lambda s: _batches(s, 2), tmp_path / "b", tc2, progress=False, log=lambda *a: None)
        c = _comp(seed=2)  # a fresh process would start from scratch weights; resume must restore them
        logs = []
        train(c, lambda s: _batches(s, 2), tmp_path / "b", tc, progress=False, log=logs.append)
    assert logs and "from step 2" in logs[0]
    ids = list(range(2, 2 + 3 * N))
    torch.testing.assert_close(a.compress(ids), c.compress(ids), rtol=1e-5, atol=1e-6)
    hist = json.loads((tmp_path / "b" / "trainer.json").read_text())["history"]
    assert [h["step"] for h in hist] == [1, 2, 3, 4]


def test_resume_rejects_changed_settings(tmp_path):
    tc = TrainConfig(steps=1, batch_size=2, lr=5e-3, warmup=1, cont_tokens=N, save_every=1)
    with torch.enable_grad():
        train(_comp(seed=2), lambda s: _batches(s, 2), tmp_path, tc, progress=False, log=lambda *a: None)
        with pytest.raises(CompressorError, match="same training settings"):
            train(_comp(seed=2), lambda s: _batches(s, 2), tmp_path,
                  TrainConfig(**{**tc.__dict__, "lr": 1e-4}), progress=False, log=lambda *a: None)


def test_without_reconstruction_weight_the_pass_is_skipped_and_training_still_learns(tmp_path):
    comp = _comp(seed=3)
    comp.model.lm_head.weight.mul_(10)
    fixed = _batches(0)
    with torch.no_grad():
        both = compressor_losses(comp, fixed, N)
        lean = compressor_losses(comp, fixed, N, reconstruction=False)
    assert "ae" in both and "ae" not in lean and "ae_acc" not in lean
    for k in ("lm", "kl", "ce_full"):  # the other terms are the same computation
        torch.testing.assert_close(lean[k], both[k])
    tc = TrainConfig(steps=10, batch_size=4, lr=2e-2, warmup=1, cont_tokens=N, save_every=100, w_ae=0.0)
    with torch.enable_grad():
        out = train(comp, lambda s: fixed, tmp_path / "run", tc, progress=False, log=lambda *a: None)
    with torch.no_grad():
        after = compressor_losses(comp, fixed, N, reconstruction=False)
    assert out["finished"] and "ae_acc" not in out["last"]
    assert float(after["lm"] + after["kl"]) < 0.8 * float(lean["lm"] + lean["kl"])


def test_resume_of_a_run_saved_before_newer_settings_existed(tmp_path):
    """A trainer.json written before ``init_from`` existed resumes when the new setting is at its default."""
    tc = TrainConfig(steps=2, batch_size=2, lr=5e-3, warmup=1, cont_tokens=N, save_every=1)
    with torch.enable_grad():
        train(_comp(seed=2), lambda s: _batches(s, 2), tmp_path, TrainConfig(**{**tc.__dict__, "steps": 1}),
              progress=False, log=lambda *a: None)
        doc = json.loads((tmp_path / "trainer.json").read_text())
        del doc["train"]["init_from"]
        (tmp_path / "trainer.json").write_text(json.dumps(doc))
        logs = []
        out = train(_comp(seed=2), lambda s: _batches(s, 2), tmp_path, tc, progress=False, log=logs.append)
        assert out["steps"] == 2 and "from step 1" in logs[0]
        with pytest.raises(CompressorError, match="same training settings"):  # a changed one still refuses
            train(_comp(seed=2), lambda s: _batches(s, 2), tmp_path,
                  TrainConfig(**{**tc.__dict__, "steps": 3, "init_from": "ab12"}), progress=False, log=lambda *a: None)


def test_baselines_budget_and_eval_report():
    from ctxmem.compress.evaluate import Baselines, bootstrap_recovered, evaluate

    model = tiny_model("llama", seed=4)
    base = Baselines(model, bos_id=1)
    seg = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    for m in (1, 2, 4, 8):
        assert base.truncate(seg, m).shape == (3, m, 64)
        assert base.random_drop(seg, m, seed=0).shape == (3, m, 64)
        assert base.mean_pool(seg, m).shape == (3, m, 64)
        assert base.surprisal_drop(seg, m, base.surprisal_scores(seg)).shape == (3, m, 64)
    torch.testing.assert_close(base.truncate(seg, 16), base.emb(seg))
    # recovered is 1 for the full context, 0 for none
    r, lo, hi = bootstrap_recovered([3.0, 4.0], [1.0, 2.0], [1.0, 2.0])
    assert r == pytest.approx(1.0) and lo <= 1.0 <= hi + 1e-9
    comp = _comp(seed=4, n=8, ratio=4)
    windows = [(f"f{i % 3}", torch.randint(2, 97, (12,), generator=torch.Generator().manual_seed(i)).tolist())
               for i in range(6)]
    rep = evaluate(comp.model, None, windows, 8, 4, compressor=comp, bos_id=1, batch_size=4, progress=False)
    assert set(rep["methods"]) >= {"ctxmem", "truncate", "random_drop", "mean_pool", "surprisal_drop", "control"}
    assert rep["slots"] == 2 and rep["windows"] == 6 and 0 <= rep["reconstruction_accuracy"] <= 1
    ce_none, ce_full = rep["ce_none"], rep["ce_full"]
    for v in rep["methods"].values():  # the report's numbers are rounded to 4 decimals
        assert ce_none - v["ce"] == pytest.approx(v["recovered"] * (ce_none - ce_full), abs=3e-4)


def test_cli_parser_wiring():
    from ctxmem.cli import build_parser

    a = build_parser().parse_args(["compressor", "train", "--ratio", "8", "--data", "x.py", "--steps", "3"])
    assert a.compressor_command == "train" and a.ratio == 8 and a.data == ["x.py"] and a.steps == 3
    a = build_parser().parse_args(["compressor", "eval", "--ratio", "4", "--json"])
    assert a.compressor_command == "eval" and a.json and a.data == ["stdlib-heldout"]


def test_cli_train_init_from_another_ratio_is_a_clear_error(tmp_path, capsys):
    from ctxmem.cli import main

    rc = main(["compressor", "train", "--ratio", "8", "--init-from", "smollm2-r4", "--out", str(tmp_path / "run"),
               "--steps", "1", "--data", __file__, "--json"])
    assert rc == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["ok"] and "is ratio 4" in doc["error"] and "asks for ratio 8" in doc["error"]
    assert not (tmp_path / "run" / "trainer.json").exists()  # nothing started


def test_cli_eval_missing_checkpoint_is_a_clear_error(capsys):
    from ctxmem.cli import main

    rc = main(["compressor", "eval", "--ratio", "8", "--checkpoint", "/nonexistent/ck", "--json"])
    assert rc == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and "/nonexistent/ck" in out["error"]


def test_heldout_modules_never_in_training():
    from ctxmem.compress.data import HELDOUT, stdlib_files

    train_files = {p.resolve() for p in stdlib_files()}
    held = stdlib_files(heldout=True)
    assert held and all(p.resolve() not in train_files for p in held)
    assert len(held) == len(HELDOUT)
    assert not any("site-packages" in str(p) for p in train_files)
    assert Path(held[0]).suffix == ".py"


def test_summary_inputs_and_generate(comp):
    from ctxmem.compress.augment import generate_with_summaries, summary_inputs

    notes = [list(range(2, 2 + 2 * N + 1)), list(range(3, 3 + N))]  # 3 + 1 segments -> 8 summary positions
    x, mask, used = summary_inputs(comp, notes, [5, 6, 7])
    assert used == 8 and x.shape == (1, 1 + 8 + 3, 64) and mask.shape == (1, 12)
    torch.testing.assert_close(x[0, -3:], comp.embed(torch.tensor([5, 6, 7])))
    _, _, used = summary_inputs(comp, notes, [5], budget=7)  # the second note would not fit
    assert used == 6
    out = generate_with_summaries(comp, notes, [5, 6, 7], max_new_tokens=3, do_sample=False)
    assert out.shape[-1] == 3


class _CharTok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_window_sampler_depends_only_on_seed_and_step(tmp_path):
    from ctxmem.compress.data import WindowSampler, eval_windows

    files = []
    for i in range(3):
        f = tmp_path / f"m{i}.py"
        f.write_text("".join(chr(32 + (i * 7 + j) % 90) for j in range(500 + 300 * i)))
        files.append(f)
    (tmp_path / "short.py").write_text("x = 1\n")
    s1 = WindowSampler(files + [tmp_path / "short.py"], _CharTok(), 40, 3, seed=7)
    s2 = WindowSampler(files + [tmp_path / "short.py"], _CharTok(), 40, 3, seed=7)
    a = [s1.batch(k) for k in (0, 1, 2)]
    b = [s2.batch(k) for k in (2, 1, 0)][::-1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (3, 40) and not torch.equal(a[0], a[1])
    w = eval_windows(files, _CharTok(), 40, 10)
    assert len(w) == 10 and all(len(ids) == 40 for _, ids in w)
    assert {f for f, _ in w} == {"m0.py", "m1.py", "m2.py"}


def test_anchor_last_is_truncation_plus_residual():
    model = tiny_model("llama", seed=6)
    cfg = CompressorConfig(base_model="tiny", ratio=4, segment_tokens=8, lora_r=4, lora_alpha=8, bos_id=1,
                           anchor="last")
    comp = Compressor(model, None, cfg).eval()
    ids = torch.randint(0, 97, (2 * 8 + 1,), generator=torch.Generator().manual_seed(0))
    comp.gain.fill_(0.0)  # no residual: exactly the last m token embeddings of each segment
    emb = comp.embed(ids)
    want = torch.cat([emb[6:8], emb[14:16], torch.zeros(1, 64), emb[16:17]])
    torch.testing.assert_close(comp.compress(ids), want, rtol=0, atol=0)
    comp.gain.fill_(0.5)
    assert not torch.allclose(comp.compress(ids), want)
    with pytest.raises(CompressorError, match="anchor"):
        CompressorConfig(anchor="first")


@pytest.mark.parametrize("name", sorted(d.name for d in BUNDLED_DIR.iterdir() if (d / "compressor.json").is_file()))
def test_bundled_checkpoints_are_intact_and_named_for_their_ratio(name):
    """Every shipped checkpoint reads back (checksum verified), is the ratio its name says, and
    records the command that trained it."""
    doc, state, _ = Compressor.read_checkpoint(name)
    cfg = CompressorConfig.from_dict(doc["config"], where=name)
    assert name == f"{cfg.base_model}-r{cfg.ratio}"
    assert doc["meta"]["command"].startswith("ctxmem compressor train") and f"--ratio {cfg.ratio}" in doc["meta"]["command"]
    assert state and all(t.dtype == torch.float16 for t in state.values())


def test_grown_rank_computes_the_same_summaries_and_then_trains():
    """Compressor.grown: rank 4 -> 8 keeps every summary (B's new columns are zero, alpha grows with r),
    the adapter shapes are the new rank's, the grown one trains, and a smaller rank is refused by name."""
    src = _comp(seed=3)
    ids = torch.randint(0, 96, (3 * N,), generator=torch.Generator().manual_seed(0))
    before = src.compress(ids)
    big = Compressor.grown(src, 8, seed=1)
    assert (big.config.lora_r, big.config.lora_alpha) == (8, 16)
    shapes = {k: tuple(p.shape) for k, p in big.lora_parameters().items()}
    assert all(s[0] == 8 for k, s in shapes.items() if "lora_A" in k) and any("lora_A" in k for k in shapes)
    assert all(s[1] == 8 for k, s in shapes.items() if "lora_B" in k)
    torch.testing.assert_close(big.compress(ids), before, rtol=1e-5, atol=1e-6)
    # the new rows of A are live capacity: a gradient step moves the new columns of B
    big.train()
    for p in big.trainable_parameters():
        p.requires_grad_(True)
    batch = torch.randint(0, 96, (2, N + 4), generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():
        losses = compressor_losses(big, batch, 4)
        (losses["ae"] + losses["lm"]).backward()
    grads = [p.grad[:, 4:].abs().sum() for k, p in big.lora_parameters().items() if "lora_B" in k]
    assert float(sum(grads)) > 0
    with pytest.raises(CompressorError, match="lora_r must be an int >= the checkpoint's rank 8"):
        Compressor.grown(big, 4)
    big.remove_adapter()

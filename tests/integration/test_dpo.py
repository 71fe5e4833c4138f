"""`posttrain dpo` on the tiny Llama: every loss type learns, the reference is right and frozen (reference not frozen or wrong: TRL #1652),
prompts get no gradient, accumulation is exact (#5), degenerate pairs are dropped (#15), resume is exact (#18)."""

import gc
import hashlib
import json
import math
import random
import re
import shutil
import weakref

import pytest
import torch

from posttrain.config import load_config
from posttrain.train.registry import run
from posttrain.metrics import read_metrics
from posttrain.models.loading import adapter_disabled, load_causal_lm
from posttrain.ops import IGNORE_INDEX
from posttrain.train import common, reference
from posttrain.data.preference import pair_batch
from posttrain.train.dpo import DPO

LN2 = math.log(2.0)
BASE = [
    "model.autocast=none", "train.num_threads=1", "train.progress=false", "train.tensorboard=false",
    "train.schedule=constant", "train.lr=1e-2", "train.batch_size=8", "train.max_steps=25",
]


def write_pairs(path, n=40, degenerate=0, seed=0):
    """Sums with a right ("ok S") and a wrong ("no S+k") answer: variable lengths, an easy preference to learn."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            a, b = rng.randrange(100), rng.randrange(1000)
            fh.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": f"ok {a + b}", "rejected": f"no {a + b + 1 + i % 3}"}) + "\n")
        for i in range(degenerate):
            fh.write(json.dumps({"prompt": f"same {i}", "chosen": "yes", "rejected": " yes "}) + "\n")
    return str(path)


def make_cfg(tmp_path, model_dir, data, *overrides, run="run"):
    flags = {"model.name_or_path": model_dir, "data.path": data, "train.output_dir": str(tmp_path / run)}
    return load_config("dpo", None, [*BASE, *overrides], flags)


def build(cfg, **kw):
    common.setup_run(cfg)
    return DPO(cfg, **kw)


def file_hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def policy_logps(model, items, pad_id, model_cfg):
    return reference.score_sequences(model, items, pad_id, 16, model_cfg)


@pytest.fixture
def data(tmp_path):
    return write_pairs(tmp_path / "pairs.jsonl")


LEARNING = [
    ("dpo", []), ("ipo", []), ("robust", ["algo.label_smoothing=0.1"]), ("cdpo", ["algo.label_smoothing=0.1"]),
    ("hinge", []), ("simpo", ["algo.beta=2.0"]), ("orpo", []),
]


@pytest.mark.parametrize("loss_type,extra", LEARNING, ids=[name for name, _ in LEARNING])
def test_every_loss_type_learns(tmp_path, tiny_dir, loss_type, extra):
    data = write_pairs(tmp_path / "pairs.jsonl", n=50)
    cfg = make_cfg(tmp_path, tiny_dir, data, f"algo.loss_type={loss_type}", "data.eval_fraction=0.2", *extra)
    final = run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 25
    first, last = rows[0], rows[-5:]
    last_loss = sum(r["loss"] for r in last) / 5
    last_margin = sum(r["rewards/margins"] for r in last) / 5
    assert last_loss < first["loss"] - 0.1 * abs(first["loss"]), (first["loss"], last_loss)
    assert last_margin > first["rewards/margins"] + 0.05 and last_margin > 0
    assert final["eval/rewards/accuracies"] == 1.0 and final["eval/rewards/margins"] > 0
    uses_ref = loss_type not in ("simpo", "orpo")
    assert (tmp_path / "run" / reference.REFERENCE_FILE).exists() == uses_ref
    assert first["models_in_memory"] == 1
    if uses_ref:
        # policy == reference at step 0 (up to the rounding of one row per pair against the reference's two rows)
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_step0_loss_is_ln2_and_reference_is_frozen(tmp_path, tiny_dir, data):
    cfg = make_cfg(tmp_path, tiny_dir, data, "train.max_steps=6")
    algo = build(cfg)
    ref_file = tmp_path / "run" / reference.REFERENCE_FILE
    before = file_hash(ref_file)
    stored = algo.reference.tables["train.chosen"].clone()
    items = [p.chosen for p in algo.train_items]
    from posttrain.train.loop import Trainer

    Trainer(algo, cfg.train).fit()
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert file_hash(ref_file) == before
    fresh = load_causal_lm(cfg.model, tiny_dir, trainable=False)  # what the reference checkpoint says, after training
    torch.testing.assert_close(policy_logps(fresh, items, algo.pad_id, cfg.model), stored, atol=1e-5, rtol=0)
    moved = policy_logps(algo.model, items, algo.pad_id, cfg.model) - stored
    assert moved.abs().max() > 1e-2  # the policy did move away from it


def test_no_second_model_for_full_finetuning(tmp_path, tiny_dir, data, monkeypatch):
    """Full fine-tuning: the reference pass runs on the policy itself before training; nothing else is loaded."""
    monkeypatch.setattr(reference, "load_frozen_lm", lambda *a, **k: pytest.fail("loaded a reference model"))
    algo = build(make_cfg(tmp_path, tiny_dir, data))
    assert algo._once["models_in_memory"] == 1 and algo._once["reference/computed"] > 0


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
@pytest.mark.parametrize("precompute", [True, False])
def test_reference_free_losses_load_no_reference(tmp_path, tiny_dir, data, monkeypatch, loss_type, precompute):
    def refuse(*a, **k):
        pytest.fail("a reference-free loss touched the reference")

    monkeypatch.setattr(reference, "build_reference", refuse)
    monkeypatch.setattr(reference, "load_frozen_lm", refuse)
    cfg = make_cfg(tmp_path, tiny_dir, data, f"algo.loss_type={loss_type}", f"algo.precompute_ref={precompute}", "train.max_steps=2")
    run(cfg)
    assert not (tmp_path / "run" / reference.REFERENCE_FILE).exists()
    assert read_metrics(tmp_path / "run")[0]["models_in_memory"] == 1


def loss_and_hidden_grad(algo, batch):
    """The micro-batch loss and, per position, the gradient magnitude on the decoder's last hidden state (rows, T)."""
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["h"] = output

    handle = algo.model.model.norm.register_forward_hook(keep)
    out = algo.loss(batch, algo.totals([batch]))
    handle.remove()
    out.loss.backward()
    return out, captured["h"].grad.abs().sum(-1)


def test_prompt_tokens_get_no_gradient(tmp_path, tiny_dir, data, tok):
    """The last hidden state at t only feeds the prediction of token t+1: its gradient must be exactly 0 wherever
    token t+1 is a prompt token or padding, and non-zero where it is a completion token."""
    algo = build(make_cfg(tmp_path, tiny_dir, data))
    items = algo.train_items[:4]
    batch = pair_batch(items, algo.pad_id, "train")
    out, grad = loss_and_hidden_grad(algo, batch)  # grad: (2B, T)
    target_is_completion = torch.zeros_like(grad, dtype=torch.bool)
    target_is_completion[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    assert (grad[~target_is_completion] == 0).all()
    assert (grad[target_is_completion] > 0).all()
    for row, seq in enumerate([p.chosen for p in items] + [p.rejected for p in items]):
        labels = batch["labels"][row]
        assert (labels[: seq.prompt_len] == IGNORE_INDEX).all()
        trained = tok.decode(labels[labels != IGNORE_INDEX].tolist())
        assert re.fullmatch(("ok" if row < len(items) else "no") + r" \d+<\|im_end\|>", trained), trained


def test_shared_prompt_rows_get_gradient_only_where_a_completion_token_is_predicted(tmp_path, tiny_dir, data):
    """One row [prompt | chosen | rejected] per pair: the hidden states that predict a completion token (the prompt's
    last one predicts the first token of both answers) get gradient, every other position exactly none."""
    algo = build(make_cfg(tmp_path, tiny_dir, data))
    batch = pair_batch(algo.train_items[:4], algo.pad_id, "train", share_prompt=True)
    out, grad = loss_and_hidden_grad(algo, batch)
    grad = grad.reshape(-1)  # (B*T,)
    predicts = torch.zeros_like(grad, dtype=torch.bool)
    predicts[batch["score_index"]] = True
    assert (grad[~predicts] == 0).all() and (grad[predicts] > 0).all()
    assert batch["input_ids"].shape[0] == 4 and 0.5 < out.metrics["forward_token_fraction"] < 1.0


def test_shared_prompt_rows_train_exactly_like_two_rows(tmp_path, tiny_dir, data):
    """algo.share_prompt=true (the default) against false: the same losses, margins and gradient norms."""
    runs = {}
    for share in (True, False):
        run(make_cfg(tmp_path, tiny_dir, data, f"algo.share_prompt={share}", "train.max_steps=6", run=f"run-{share}"))
        runs[share] = [r for r in read_metrics(tmp_path / f"run-{share}") if "loss" in r]
    for a, b in zip(runs[True], runs[False]):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert runs[False][0]["forward_token_fraction"] == 1.0 and runs[True][0]["forward_token_fraction"] < 0.8


def test_shared_prompt_reference_pass_matches_separate_rows(tmp_path, tiny_dir, data):
    """The precomputed reference scores each pair in one row too: the same table as two rows per pair."""
    tables = {}
    for share in (True, False):
        algo = build(make_cfg(tmp_path, tiny_dir, data, f"algo.share_prompt={share}", run=f"run-{share}"))
        tables[share] = algo.reference.tables
    assert set(tables[True]) == set(tables[False]) == {"train.chosen", "train.rejected", "eval.chosen", "eval.rejected"}
    for col in tables[False]:
        assert not torch.isnan(tables[True][col]).all()
        torch.testing.assert_close(tables[True][col], tables[False][col], atol=2e-5, rtol=0, equal_nan=True)


def test_lora_reference_is_the_adapter_off_base(tmp_path, tiny_dir, data):
    cfg = make_cfg(tmp_path, tiny_dir, data, "model.lora.enabled=true", "model.lora.r=4", "train.max_steps=5", "train.lr=5e-2")
    algo = build(cfg)
    assert reference.reference_source(algo.model, None) == "adapter_off"
    items = [p.rejected for p in algo.train_items]
    base = load_causal_lm(cfg.model, tiny_dir, trainable=False)  # trainable=False: no adapter
    stored = algo.reference.tables["train.rejected"].clone()
    torch.testing.assert_close(stored, policy_logps(base, items, algo.pad_id, cfg.model), atol=1e-5, rtol=0)
    from posttrain.train.loop import Trainer

    Trainer(algo, cfg.train).fit()
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    with adapter_disabled(algo.model):
        torch.testing.assert_close(policy_logps(algo.model, items, algo.pad_id, cfg.model), stored, atol=1e-5, rtol=0)
    assert (policy_logps(algo.model, items, algo.pad_id, cfg.model) - stored).abs().max() > 1e-3


def test_nonzero_adapter_reference_is_the_initial_policy(tmp_path, tiny_dir, data, tok):
    """reference not frozen or wrong: TRL #1652 — we adopt: the reference is the policy as training starts, adapter included."""
    cfg = make_cfg(tmp_path, tiny_dir, data, "model.lora.enabled=true", "model.lora.r=4", "train.max_steps=2")
    model, tokenizer = common.load_policy_and_tokenizer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # as if resuming from a trained adapter
    algo = build(cfg, model=model, tokenizer=tokenizer)
    assert reference.reference_source(model, None) == "initial_policy"
    items = [p.chosen for p in algo.train_items]
    initial = policy_logps(model, items, algo.pad_id, cfg.model)
    with adapter_disabled(model):
        bare = policy_logps(model, items, algo.pad_id, cfg.model)
    stored = algo.reference.tables["train.chosen"]
    scored = ~torch.isnan(stored)  # only the pairs that 2 steps visit were scored
    assert scored.nonzero().squeeze(-1).tolist() == reference.planned_indices(algo.order, 2)
    assert 0 < scored.sum() < len(items)
    torch.testing.assert_close(stored[scored], initial[scored], atol=1e-5, rtol=0)
    assert (stored[scored] - bare[scored]).abs().max() > 1e-2
    batch = pair_batch([algo.train_items[i] for i in algo.order.next()], algo.pad_id, "train")
    assert algo.loss(batch, algo.totals([batch])).loss.item() == pytest.approx(LN2, abs=1e-6)


def test_separate_ref_model_is_loaded_only_for_the_pass(tmp_path, tiny_dir, data, monkeypatch):
    from tiny import tiny_model_dir

    other = tiny_model_dir(tmp_path / "other", seed=1)
    loaded = []
    real = reference.load_frozen_lm

    def spy(*a, **k):
        model = real(*a, **k)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(reference, "load_frozen_lm", spy)
    cfg = make_cfg(tmp_path, tiny_dir, data, f"algo.ref_model={other}")
    algo = build(cfg)
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None  # freed before training
    assert algo._once["models_in_memory"] == 1
    ref = load_causal_lm(cfg.model, other, trainable=False)
    items = [p.chosen for p in algo.train_items]
    expected = policy_logps(ref, items, algo.pad_id, cfg.model)
    torch.testing.assert_close(algo.reference.tables["train.chosen"], expected, atol=1e-5, rtol=0)
    batch = pair_batch(algo.train_items[:8], algo.pad_id, "train")
    assert abs(algo.loss(batch, algo.totals([batch])).loss.item() - LN2) > 1e-3


@pytest.mark.parametrize("share", [False, True], ids=["two-rows", "shared-prompt"])
@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "orpo"])
def test_gradient_accumulation_is_exact(tmp_path, tiny_dir, data, loss_type, share):
    """8 variable-length pairs as 1 x 8, 2 x 4, 8 x 1 and 3 + 5 micro-batches: the same gradient (accumulation normalized per micro-batch: transformers PR #34191)."""
    algo = build(make_cfg(tmp_path, tiny_dir, data, f"algo.loss_type={loss_type}"))
    items = algo.train_items[:8]
    assert len({len(p.chosen) for p in items} | {len(p.rejected) for p in items}) > 2
    with torch.no_grad():  # move off the reference so that every pair has a non-trivial gradient
        for p in algo.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)

    def grads(sizes):
        algo.model.zero_grad()
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        update = [pair_batch(items[s : s + n], algo.pad_id, "train", share) for s, n in zip(starts, sizes)]
        totals = algo.totals(update)
        for micro in update:
            algo.loss(micro, totals).loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in algo.model.parameters()])

    full = grads([8])
    assert full.abs().max() > 1e-4
    for sizes in ([4, 4], [1] * 8, [3, 5]):  # unequal micro-batches too (an epoch's last batch is short)
        torch.testing.assert_close(grads(sizes), full, atol=1e-5, rtol=0)


def test_degenerate_pairs_are_dropped_and_counted(tmp_path, tiny_dir, caplog):
    data = write_pairs(tmp_path / "pairs.jsonl", n=30, degenerate=3)
    with caplog.at_level("WARNING", logger="posttrain"):
        algo = build(make_cfg(tmp_path, tiny_dir, data, "data.eval_fraction=0"))
    assert len(algo.train_items) == 30
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["degenerate_dropped"] == 3
    assert report["train"]["first_degenerate"][0].endswith("pairs.jsonl:31")
    assert "dropped 3 pairs whose chosen == rejected" in caplog.text


@pytest.mark.parametrize("lora", [False, True])
def test_live_reference_matches_precomputed(tmp_path, tiny_dir, data, lora):
    """precompute_ref=False: a frozen copy next to the policy (2 models), or with LoRA the adapter switched off
    per batch (1 model); either way the same numbers as the precomputed table."""
    extra = ["model.lora.enabled=true", "model.lora.r=4", "train.lr=5e-2"] if lora else []
    for precompute in (True, False):
        args = (f"algo.precompute_ref={precompute}", "train.max_steps=4", *extra)
        cfg = make_cfg(tmp_path, tiny_dir, data, *args, run=f"run-{precompute}")
        run(cfg)
    pre, live = (read_metrics(tmp_path / f"run-{p}") for p in (True, False))
    assert pre[0]["models_in_memory"] == 1 and live[0]["models_in_memory"] == (1 if lora else 2)
    assert live[0]["loss"] == pytest.approx(LN2, abs=1e-6) and live[-2]["rewards/margins"] != 0.0
    for a, b in zip(pre, live):
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


def test_resume_gives_the_same_metrics_and_reuses_the_reference(tmp_path, tiny_dir):
    data = write_pairs(tmp_path / "pairs.jsonl", n=60)
    args = ("train.max_steps=6", "train.save_every=3", "train.batch_size=4", "train.grad_accum=2")
    run(make_cfg(tmp_path, tiny_dir, data, *args))
    straight = read_metrics(tmp_path / "run")
    ref_hash = file_hash(tmp_path / "run" / reference.REFERENCE_FILE)
    assert straight[0]["reference/computed"] < 2 * 57 + 6  # only the pairs 6 steps visit, plus the eval split
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-6")
    shutil.rmtree(tmp_path / "run" / "final")
    run(make_cfg(tmp_path, tiny_dir, data, *args, "train.resume=true"))
    resumed = read_metrics(tmp_path / "run")
    assert resumed[3]["reference/computed"] == 0 and resumed[3]["reference/reused"] > 0
    assert file_hash(tmp_path / "run" / reference.REFERENCE_FILE) == ref_hash
    for a, b in zip(straight[3:6], resumed[3:6]):
        assert a["step"] == b["step"]
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key

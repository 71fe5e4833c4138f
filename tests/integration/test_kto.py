"""`posttrain kto` on the tiny Llama: it learns, starts at the reference (loss 1/2, KL 0), KL pairs are real
mismatches (KTO pairs matched with themselves: TRL #1911) with precomputed reference log-probs, preference data feeds it, accumulation is exact
with z_ref over the whole update (#5), resume is exact (#18)."""

import hashlib
import json
import random
import shutil

import pytest
import torch

from posttrain.config import load_config
from posttrain.train.registry import run
from posttrain.metrics import read_metrics
from posttrain.models.loading import load_causal_lm
from posttrain.train import common, reference
from posttrain.train.kto import KTO, kl_partners, kto_batch, reward_accuracy

BASE = [
    "model.autocast=none", "train.num_threads=1", "train.progress=false", "train.tensorboard=false",
    "train.schedule=constant", "train.lr=1e-2", "train.batch_size=8", "train.max_steps=25",
]


def write_unpaired(path, n=48, seed=0):
    """Sums answered right ("ok S") or wrong ("no S+1"), labels alternating; same length either way, so that
    length-grouped batches mix both labels."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            a, b = rng.randrange(100), rng.randrange(1000)
            good = i % 2 == 0
            text = f"ok {a + b}" if good else f"no {a + b + 1}"
            fh.write(json.dumps({"prompt": f"{a}+{b}=", "completion": text, "label": good}) + "\n")
    return str(path)


def write_pairs(path, n=24, degenerate=0, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            a, b = rng.randrange(100), rng.randrange(1000)
            fh.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": f"ok {a + b}", "rejected": f"no {a + b + 1}"}) + "\n")
        for i in range(degenerate):
            fh.write(json.dumps({"prompt": f"same {i}", "chosen": "yes", "rejected": "yes"}) + "\n")
    return str(path)


def make_cfg(tmp_path, model_dir, data, *overrides, run="run"):
    flags = {"model.name_or_path": model_dir, "data.path": data, "train.output_dir": str(tmp_path / run)}
    return load_config("kto", None, [*BASE, *overrides], flags)


def build(cfg, **kw):
    common.setup_run(cfg)
    return KTO(cfg, **kw)


@pytest.fixture
def unpaired(tmp_path):
    return write_unpaired(tmp_path / "unpaired.jsonl")


def test_kto_learns_from_the_reference_point(tmp_path, tiny_dir):
    data = write_unpaired(tmp_path / "u.jsonl", n=60)
    final = run(make_cfg(tmp_path, tiny_dir, data, "data.eval_fraction=0.25"))
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    first, last = rows[0], rows[-5:]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # σ(0) = 1/2 on every row when policy == reference
    assert first["kto/z_ref"] == 0.0 and first["models_in_memory"] == 1
    assert sum(r["loss"] for r in last) / 5 < 0.35
    margins = [r["rewards/margins"] for r in last if "rewards/margins" in r]
    assert margins and min(margins) > 0.5
    assert final["eval/rewards/accuracies"] == 1.0 and final["eval/rewards/margins"] > 0.5
    assert all(torch.isfinite(torch.tensor(r["kto/z_ref"])) for r in rows)


def test_kl_partners_are_mismatched():
    for n in (2, 3, 7, 50, 51):
        keys = [f"p{i}" for i in range(n)]
        partner = kl_partners(keys, seed=n)
        assert sorted(partner) == list(range(n))  # a permutation: every completion used once
        assert all(partner[i] != i for i in range(n))
    keys = [f"p{i // 2}" for i in range(21)]  # split preference pairs: neighbours share a prompt
    partner = kl_partners(keys, seed=3)
    assert all(keys[partner[i]] != keys[i] for i in range(21))
    assert kl_partners(keys, seed=3) == partner  # seeded: a resumed run pairs the same way
    assert kl_partners(["only"], seed=0) == [0]


def test_kl_pairs_have_precomputed_reference(tmp_path, tiny_dir, unpaired, tok):
    cfg = make_cfg(tmp_path, tiny_dir, unpaired, "data.eval_fraction=0")
    algo = build(cfg)
    records = [json.loads(line) for line in open(unpaired)]
    for item, record in zip(algo.train_items, records):
        text = tok.decode(item.kl.input_ids)
        assert f"{record['prompt']}<|im_end|>" in text and not text.endswith(record["completion"] + "<|im_end|>")
    ref = load_causal_lm(cfg.model, tiny_dir, trainable=False)
    kl_items = [x.kl for x in algo.train_items]
    expected = reference.score_sequences(ref, kl_items, algo.pad_id, 16, cfg.model)
    torch.testing.assert_close(algo.reference.tables["train.kl"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_kl_is_finite_at_small_batches(tmp_path, tiny_dir, unpaired, batch_size):
    run(make_cfg(tmp_path, tiny_dir, unpaired, f"train.batch_size={batch_size}", "train.max_steps=4"))
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 4
    assert all(torch.isfinite(torch.tensor([r["loss"], r["kto/z_ref"], r["grad_norm"]])).all() for r in rows)


def test_preference_data_feeds_kto(tmp_path, tiny_dir, caplog):
    data = write_pairs(tmp_path / "pairs.jsonl", n=24, degenerate=2)
    with caplog.at_level("WARNING", logger="posttrain"):
        algo = build(make_cfg(tmp_path, tiny_dir, data, "data.eval_fraction=0.25", "train.max_steps=3"))
    items = algo.train_items + algo.eval_items
    assert len(items) == 2 * 24
    assert sum(x.desirable for x in items) == 24
    for split in (algo.train_items, algo.eval_items):  # a held-out pair is held out whole
        by_pair = {}
        for x in split:
            by_pair.setdefault(x.pair, []).append(x.desirable)
        assert len(by_pair) == len(split) // 2 and all(sorted(v) == [False, True] for v in by_pair.values())
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["degenerate_dropped"] + report["eval"]["degenerate_dropped"] == 2
    assert "chosen == rejected" in caplog.text


def test_reward_accuracy_hand_computed():
    rewards = torch.tensor([1.0, 0.5, -1.0, 2.0])
    desirable = torch.tensor([True, False, True, False])
    assert reward_accuracy(rewards, desirable, torch.tensor([0, 0, 1, 1])) == 0.5  # pair 0 right, pair 1 wrong
    # unpaired: 4 comparisons, 1 > 0.5 and 1 < 2 and -1 < 0.5 and -1 < 2 -> 1/4 right
    assert reward_accuracy(rewards, desirable, torch.tensor([-1, -1, -1, -1])) == 0.25
    assert reward_accuracy(rewards[:1], desirable[:1], torch.tensor([-1])) is None


def test_gradient_accumulation_is_exact(tmp_path, tiny_dir, unpaired):
    """z_ref comes from all the update's KL pairs, so 1 x 8, 2 x 4, 8 x 1 and 3 + 5 give the same gradient."""
    algo = build(make_cfg(tmp_path, tiny_dir, unpaired, "data.eval_fraction=0"))
    items = algo.train_items[:8]
    with torch.no_grad():
        for p in algo.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    algo.reference.tables["train.kl"] -= 1.0  # keep z_ref = max(0, mean KL) away from its clamp

    def grads(sizes):
        algo.model.zero_grad()
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        update = [kto_batch(items[s : s + n], algo.pad_id, "train") for s, n in zip(starts, sizes)]
        algo.kl_logps = algo.kl_pair_logps(update)  # what next_iteration does before handing the loop an update
        totals = algo.totals(update)
        assert totals["kl_policy"].shape == (8,)
        for micro in update:
            algo.loss(micro, totals).loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in algo.model.parameters()]), totals

    full, totals = grads([8])
    assert full.abs().max() > 1e-4 and float((totals["kl_policy"] - totals["kl_ref"]).mean()) > 0  # z_ref active
    for sizes in ([4, 4], [1] * 8, [3, 5]):
        torch.testing.assert_close(grads(sizes)[0], full, atol=1e-5, rtol=0)


def test_live_reference_matches_precomputed(tmp_path, tiny_dir, unpaired):
    for precompute in (True, False):
        args = (f"algo.precompute_ref={precompute}", "train.max_steps=4")
        run(make_cfg(tmp_path, tiny_dir, unpaired, *args, run=f"run-{precompute}"))
    pre, live = (read_metrics(tmp_path / f"run-{p}") for p in (True, False))
    assert pre[0]["models_in_memory"] == 1 and live[0]["models_in_memory"] == 2
    for a, b in zip(pre, live):
        for key in ("loss", "kto/z_ref"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5)


def test_resume_gives_the_same_metrics(tmp_path, tiny_dir, unpaired):
    args = ("train.max_steps=6", "train.save_every=3", "train.batch_size=4", "train.grad_accum=2")
    run(make_cfg(tmp_path, tiny_dir, unpaired, *args))
    straight = read_metrics(tmp_path / "run")
    ref_file = tmp_path / "run" / reference.REFERENCE_FILE
    ref_hash = hashlib.sha256(ref_file.read_bytes()).hexdigest()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-6")
    shutil.rmtree(tmp_path / "run" / "final")
    run(make_cfg(tmp_path, tiny_dir, unpaired, *args, "train.resume=true"))
    resumed = read_metrics(tmp_path / "run")
    assert resumed[3]["reference/computed"] == 0
    assert hashlib.sha256(ref_file.read_bytes()).hexdigest() == ref_hash
    for a, b in zip(straight[3:6], resumed[3:6]):
        assert a["step"] == b["step"]
        for key in ("loss", "grad_norm", "kto/z_ref"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_kl_partners_are_fixed_across_epochs(tmp_path, tiny_dir, unpaired):
    """Stated difference from the paper/TRL (per-batch mismatching): an example's KL completion is the same in
    every epoch, and it comes from another example of the whole set, not necessarily of the same batch."""
    algo = build(make_cfg(tmp_path, tiny_dir, unpaired, "data.eval_fraction=0", "train.batch_size=4"))
    seen: dict[int, list] = {}
    for _ in range(2 * algo.order.batches_per_epoch):  # two epochs
        idx = algo.order.next()
        for i, row in zip(idx, kto_batch([algo.train_items[i] for i in idx], algo.pad_id, "train")["kl"]["input_ids"]):
            seen.setdefault(i, []).append(row[row != algo.pad_id].tolist())
    assert all(len(rows) == 2 and rows[0] == rows[1] for rows in seen.values())  # the same pair both epochs
    own = {i: algo.train_items[i].seq.input_ids for i in seen}
    assert all(rows[0] != [t for t in own[i] if t != algo.pad_id] for i, rows in seen.items())  # never its own

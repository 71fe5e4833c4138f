"""SFT end to end on a tiny Llama: loss falls, accumulation is exact, resume reproduces, final/ loads."""

import json

import pytest
import torch

from posttrain.metrics import read_metrics
from posttrain.train.registry import run
from posttrain.ops import IGNORE_INDEX
from posttrain.train.sft import SFT, sft_loss
from tiny import addition_sft_rows, run_config, write_jsonl


@pytest.fixture
def sft_data(tmp_path):
    rows = addition_sft_rows(64)
    rows[5]["messages"][0]["content"] = "a much longer question " * 3  # lengths must differ for the accumulation test
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def test_sft_loss_falls_and_final_loads_with_transformers(tmp_path, tiny_dir, sft_data):
    cfg = run_config("sft", tmp_path / "run", tiny_dir, sft_data, "train.max_steps=25", "train.lr=3e-3", "train.eval_every=25")
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert rows[-1]["loss"] < 0.75 * rows[0]["loss"]
    for key in ("lr", "grad_norm", "tokens_per_s", "peak_mem_gb"):
        assert key in rows[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = tmp_path / "run" / "final"
    model, tok = AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    assert tok.chat_template and model.config.num_hidden_layers == 2
    assert (tmp_path / "run" / "config.yaml").exists() and json.loads((tmp_path / "run" / "data_report.json").read_text())["train"]["kept"] > 0


def test_accumulation_normalizes_by_the_whole_batch(tmp_path, tiny_dir, sft_data):
    """Two micro-batches of different lengths give the same gradient as one batch (accumulation normalized per micro-batch: transformers PR #34191)."""
    cfg = run_config("sft", tmp_path / "run", tiny_dir, sft_data, "train.batch_size=4")
    algo = SFT(cfg)
    from posttrain.train.common import padded_sft_batch

    by_len = sorted(algo.train_items, key=len)
    items = by_len[:1] + by_len[-3:]
    assert len({len(x) for x in items}) > 1

    def grads(micro_batches):
        algo.model.zero_grad()
        totals = algo.totals(micro_batches)
        for mb in micro_batches:
            sft_loss(algo.model, mb, totals).loss.backward()
        return torch.cat([p.grad.flatten() for p in algo.model.parameters() if p.grad is not None])

    pad = algo.pad_id
    whole = grads([padded_sft_batch(items, pad)])
    split = grads([padded_sft_batch(items[:1], pad), padded_sft_batch(items[1:], pad)])
    assert torch.allclose(whole, split, atol=1e-6, rtol=1e-5)
    # the per-micro-batch mean (the bug) gives a different gradient
    algo.model.zero_grad()
    for mb in [padded_sft_batch(items[:1], pad), padded_sft_batch(items[1:], pad)]:
        n = int((mb["labels"][:, 1:] != IGNORE_INDEX).sum())
        (sft_loss(algo.model, mb, {"num_tokens": n, "num_seqs": 1}).loss / 2).backward()
    wrong = torch.cat([p.grad.flatten() for p in algo.model.parameters() if p.grad is not None])
    assert not torch.allclose(whole, wrong, atol=1e-6, rtol=1e-5)


def test_interrupted_then_resumed_run_logs_the_same_metrics(tmp_path, tiny_dir, sft_data):
    """Ctrl-C at step 6 saves a checkpoint; a fresh resume logs exactly what an uninterrupted run logs."""
    from posttrain.train.loop import Trainer

    common = ["train.lr=2e-3", "train.grad_accum=2", "train.batch_size=4", "train.save_every=3", "train.max_steps=8"]
    run(run_config("sft", tmp_path / "full", tiny_dir, sft_data, *common))
    cfg = run_config("sft", tmp_path / "half", tiny_dir, sft_data, *common)
    algo = SFT(cfg)
    real_next = algo.next_iteration

    def interrupt_at_6(step):
        if step == 6:
            raise KeyboardInterrupt
        return real_next(step)

    algo.next_iteration = interrupt_at_6
    with pytest.raises(SystemExit, match="interrupted at step 5"):
        Trainer(algo, cfg.train).fit()
    run(run_config("sft", tmp_path / "half", tiny_dir, sft_data, *common, "train.resume=true"))
    keys = ("step", "loss", "grad_norm", "lr", "padding_fraction")
    a = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "full") if "loss" in r]
    b = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "half") if "loss" in r]
    assert [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-8), (x, y)


def test_nan_loss_is_skipped_then_stops(tmp_path, tiny_dir, sft_data):
    from posttrain.train.loop import NonFiniteLossError, Trainer

    cfg = run_config("sft", tmp_path / "run", tiny_dir, sft_data, "train.max_steps=10", "train.max_bad_steps=3")
    algo = SFT(cfg)
    real_loss, calls = algo.loss, {"n": 0}

    def flaky(micro, totals):
        calls["n"] += 1
        out = real_loss(micro, totals)
        if calls["n"] in (2,) or calls["n"] >= 5:
            out.loss = out.loss * float("nan")
        return out

    algo.loss = flaky
    before = [p.detach().clone() for p in algo.model.parameters()]
    with pytest.raises(NonFiniteLossError, match="3 non-finite"):
        Trainer(algo, cfg.train).fit()
    rows = read_metrics(tmp_path / "run")
    assert rows[1]["skipped"] == 1.0 and rows[0]["skipped"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.model.parameters()))


def test_cli_sft_runs_and_reports_bad_data(tmp_path, tiny_dir, sft_data, capsys):
    from posttrain.cli import main

    out = tmp_path / "cli"
    assert main(["sft", "--model", tiny_dir, "--data", sft_data, "--output-dir", str(out), "--max-steps", "2",
                 "model.autocast=none", "train.progress=false"]) == 0
    assert (out / "final" / "config.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]}\n')
    assert main(["sft", "--model", tiny_dir, "--data", str(bad), "--output-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: field 'messages[1].content': expected a string, got int" in err and "Traceback" not in err


def test_max_minutes_stops_early_then_evaluates_and_exports(tmp_path, tiny_dir, sft_data, monkeypatch):
    """A time budget ends the run at a step boundary as max_steps would: final eval, checkpoint, final/."""
    import posttrain.train.loop as loop

    clock = iter(range(0, 10_000, 25))  # every call to the loop's clock: 25 s later
    monkeypatch.setattr(loop.time, "monotonic", lambda: float(next(clock)))
    cfg = run_config("sft", tmp_path / "run", tiny_dir, sft_data, "train.max_steps=50", "train.max_minutes=1",
                     "train.eval_every=1000")
    run(cfg)
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert steps == [1, 2]  # deadline at 60 s; the checks before steps 1, 2, 3 read 25, 50, 75 s
    assert (tmp_path / "run" / "final" / "config.json").exists()
    assert any(r.get("final") for r in read_metrics(tmp_path / "run"))

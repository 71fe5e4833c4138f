"""`posttrain eval` for a causal LM (reward functions, pass@k) and for a reward model; LoRA merge-and-export."""

import json

import pytest
import torch

from posttrain.cli import main
from posttrain.evaluate import pass_at_k
from posttrain.train.registry import run
from tiny import addition_sft_rows, run_config, write_jsonl


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)


def test_eval_cli_scores_a_causal_lm(tmp_path, tiny_dir, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {i}", "answer": str(i)} for i in range(6)])
    out = tmp_path / "res.jsonl"
    assert main(["eval", "--model", tiny_dir, "--data", prompts, "--reward", "numeric", "--samples", "3",
                 "--max-new-tokens", "4", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_prompts"] == 6 and summary["samples"] == 3
    for key in ("numeric/mean_reward", "numeric/accuracy", "numeric/pass@1", "numeric/pass@3"):
        assert key in summary
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 18 and {"prompt", "completion", "numeric"} <= set(rows[0])


def test_eval_cli_scores_a_reward_model(tmp_path, tiny_dir, capsys):

    pairs = [{"prompt": f"q{i}", "chosen": "a" * (1 + i % 4), "rejected": "z" * (1 + i % 3)} for i in range(24)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run(run_config("rm", tmp_path / "rm", tiny_dir, data, "train.max_steps=2"))
    assert main(["eval", "--model", str(tmp_path / "rm" / "final"), "--data", data, "--limit", "24",
                 "--output", str(tmp_path / "r.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_pairs"] == 24 and 0.0 <= summary["accuracy"] <= 1.0 and "margin" in summary


def test_lora_sft_exports_a_merged_checkpoint(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(32))
    cfg = run_config("sft", tmp_path / "run", tiny_dir, data, "train.max_steps=5", "train.lr=1e-2",
                     "model.lora.enabled=true", "model.lora.r=4", "model.lora.target_modules=[q_proj,v_proj]")
    run(cfg)
    from transformers import AutoModelForCausalLM

    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists()  # merged: plain transformers weights
    merged = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["params/trainable"] < rows[0]["params/total"] / 5

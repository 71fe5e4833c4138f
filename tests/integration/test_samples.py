"""samples.jsonl of the online runs: the first prompts of each step with their completions, each reward function's
score, the advantage and the KL; a resumed run writes each step once."""

import json
import shutil
from collections import Counter

import pytest
import torch

from posttrain.train.registry import run
from posttrain.train.samples import sample_rows
from posttrain.types import RolloutBatch
from tiny import prompt_rows, run_config, vowel_reward, write_jsonl

FAST = ["algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=6", "algo.sampling.prompts_per_step=4",
        "algo.sampling.num_generations=4", "train.batch_size=16", "algo.sampling.eval_max_new_tokens=6",
        "data.num_eval_examples=4", "train.samples_per_step=2"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_grpo_samples_scores_advantages_kl_and_resume(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(48))
    args = (*FAST, "train.max_steps=4", "train.save_every=2", "algo.kl.beta=0.04", "train.lr=1e-3")
    run(run_config("grpo", tmp_path / "run", tiny_dir, data, *args))
    path = tmp_path / "run" / "samples.jsonl"
    rows = read(path)
    assert Counter(r["step"] for r in rows) == {1: 8, 2: 8, 3: 8, 4: 8}  # 2 prompts x 4 completions per step
    for r in rows:
        assert r["rewards"]["vowel_reward"] == pytest.approx(vowel_reward([r["prompt"]], [r["completion"]])[0])
        assert r["reward"] == pytest.approx(r["rewards"]["vowel_reward"])
        assert r["kl"] is not None and r["kl_to"] == "reference" and r["advantage"] is not None
    for step in range(1, 5):
        for group in (0, 1):
            adv = [r["advantage"] for r in rows if r["step"] == step and r["group"] == group]
            assert len(adv) == 4 and abs(sum(adv)) < 1e-4  # group-relative: they sum to 0
    # a crash after step 3 was written but before its checkpoint: resume from step 2 writes steps 3 and 4 once
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-4")
    shutil.rmtree(tmp_path / "run" / "final")
    run(run_config("grpo", tmp_path / "run", tiny_dir, data, *args, "train.resume=true"))
    again = read(path)
    assert Counter(r["step"] for r in again) == {1: 8, 2: 8, 3: 8, 4: 8}
    assert again[:16] == rows[:16]


def test_samples_off_and_fresh_start_truncates(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(48))
    run(run_config("grpo", tmp_path / "off", tiny_dir, data, *FAST, "train.max_steps=1", "train.samples_per_step=0"))
    assert not (tmp_path / "off" / "samples.jsonl").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "samples.jsonl").write_text(json.dumps({"step": 9}) + "\n")  # an older run's
    run(run_config("grpo", tmp_path / "run", tiny_dir, data, *FAST, "train.max_steps=1"))
    assert {r["step"] for r in read(tmp_path / "run" / "samples.jsonl")} == {1}


def _batch(**extra) -> RolloutBatch:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    return RolloutBatch(input_ids=torch.zeros(4, 5, dtype=torch.long), attention_mask=torch.ones(4, 5),
                        completion_mask=mask, loss_mask=mask, rewards=torch.tensor([1.0, 0.0, 0.5, 0.0]),
                        group=torch.tensor([0, 0, 1, 1]), truncated=torch.tensor([False, True, False, False]),
                        prompt_width=2, texts=["a", "b", "c", "d"], prompts=["p0", "p0", "p1", "p1"],
                        extra={"reward_valid": torch.tensor([True, True, True, False]), **extra})


def test_sample_rows_by_hand():
    """PPO: token advantages averaged over the loss tokens; KL k1 summed over them from old and reference log-probs."""
    adv = torch.tensor([[1.0, 3.0, 9.0], [0.0, 3.0, 6.0], [2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    old = torch.full((4, 3), -1.0)
    ref = torch.tensor([[-1.5, -2.0, -9.0], [-1.0, -1.0, -1.0], [-0.5, 0.0, 0.0], [-1.0, -1.0, 0.0]])
    scores = torch.tensor([1.0, float("nan"), 0.0, 0.0])  # per row, as the collector keeps them
    rows = sample_rows(7, _batch(advantages=adv, old_logp=old, ref_logp=ref, **{"score/numeric": scores}), 1)
    assert [(r["step"], r["group"], r["completion"]) for r in rows] == [(7, 0, "a"), (7, 0, "b")]  # first prompt only
    assert [r["advantage"] for r in rows] == [2.0, 3.0]
    assert [r["kl"] for r in rows] == [pytest.approx(1.5), pytest.approx(0.0)]
    assert rows[0]["rewards"] == {"numeric": 1.0} and rows[1]["rewards"] == {"numeric": None}
    assert [r["length"] for r in rows] == [2, 3] and rows[1]["truncated"] is True
    # online DPO: no advantage, no reference: nulls, and the pair's roles; a masked reward is null
    rows = sample_rows(1, _batch(chosen=torch.tensor([2]), rejected=torch.tensor([3])), 2)
    assert all(r["advantage"] is None and r["kl"] is None for r in rows)
    assert [r.get("pair") for r in rows] == [None, None, "chosen", "rejected"] and rows[3]["reward"] is None

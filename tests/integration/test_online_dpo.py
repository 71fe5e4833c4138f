"""Online DPO on a tiny Llama: best-vs-worst pairs of sampled completions raise a trivial reward."""

import torch

from posttrain.metrics import read_metrics
from posttrain.train.registry import run
from posttrain.train.online_dpo import best_worst_pairs
from tiny import prompt_rows, run_config, write_jsonl


def test_best_worst_pairs_by_hand():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.3, 1.0, 0.0, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    chosen, rejected = best_worst_pairs(rewards, group)
    assert chosen.tolist() == [1, 6] and rejected.tolist() == [0, 7]  # group 1 tied: skipped


def test_online_dpo_raises_a_trivial_reward(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(64))
    cfg = run_config("online-dpo", tmp_path / "run", tiny_dir, data, "algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=6",
                     "algo.sampling.prompts_per_step=16", "algo.sampling.num_generations=4", "train.batch_size=16", "train.max_steps=20",
                     "train.lr=5e-3", "train.schedule=constant", "algo.sampling.eval_max_new_tokens=6", "data.num_eval_examples=8",
                     "algo.beta=0.1")
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert rows[-1]["reward"] > rows[0]["reward"] + 0.3
    assert rows[-1]["models_in_memory"] == 2.0 and "rewards/margins" in rows[-1]

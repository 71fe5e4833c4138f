"""Online algorithms over a multi-turn environment on a tiny Llama: GRPO learns a two-turn task; PPO and online
DPO run over trajectories and log the environment's metrics."""

import pytest

from posttrain.metrics import read_metrics
from posttrain.train.registry import run
from tiny import prompt_rows, run_config, write_jsonl

ENV = ["algo.env.name=tiny_envs:TwoTurnVowels", "algo.env.cut_turns=answer", "algo.env.max_turns=2", "algo.env.max_total_tokens=40",
       "algo.reward.functions=[]", "algo.sampling.max_new_tokens=6", "algo.sampling.prompts_per_step=4",
       "algo.sampling.num_generations=8", "train.batch_size=32", "algo.sampling.eval_max_new_tokens=6",
       "data.num_eval_examples=4", "train.lr=1e-2", "train.schedule=constant"]


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(48))


def test_grpo_learns_a_two_turn_environment(tmp_path, tiny_dir, prompts):
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *ENV, "train.max_steps=30", "algo.kl.beta=0")
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert rows[0]["reward"] < 0.5
    assert max(r["reward"] for r in rows) > 0.9, [round(r["reward"], 2) for r in rows]
    last = rows[-1]
    assert last["env/env_token_fraction"] > 0 and last["env/asks_mean"] > 0 and last["env/cut_turns_mean"] > 0
    for key in ("env/turns_mean", "env/errors", "env/turn_reward_mean", "env/ended_done"):
        assert key in last, key


@pytest.mark.parametrize("command, extra", [("ppo", ["algo.kl.beta=0.01"]), ("online-dpo", [])])
def test_ppo_and_online_dpo_run_over_trajectories(tmp_path, tiny_dir, prompts, command, extra):
    cfg = run_config(command, tmp_path / "run", tiny_dir, prompts, *ENV, "train.max_steps=2", *extra)
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "env/turns_mean" in r]
    assert rows and all(r["env/turns_mean"] >= 1 for r in rows)

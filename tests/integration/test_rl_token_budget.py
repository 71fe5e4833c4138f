"""`train.max_tokens_per_micro_batch` for the RL loss passes: micro-batches cut by what a pass really costs
(packed group rows under prompt sharing, padded rows otherwise) hold the budget, take every row once, and give the
losses of the row-count micro-batches (GRPO with and without prompt sharing, PPO, online DPO)."""

import pytest
import torch

from posttrain.data.packing import pack_rows, rollout_micro_batches
from posttrain.metrics import read_metrics
from posttrain.train.registry import run
from posttrain.types import RolloutBatch
from tiny import prompt_rows, run_config, write_jsonl

BUDGET = "train.max_tokens_per_micro_batch=48"


def _rollout(groups=6, G=4, P=7, C=9, seed=0) -> RolloutBatch:
    """Left-padded prompts of 2..P tokens, right-padded completions of 1..C tokens, G rows per group."""
    g = torch.Generator().manual_seed(seed)
    n = groups * G
    ids = torch.randint(1, 50, (n, P + C), generator=g)
    mask = torch.zeros(n, P + C, dtype=torch.long)
    comp = torch.zeros(n, C, dtype=torch.long)
    for k in range(groups):
        p = int(torch.randint(2, P + 1, (1,), generator=g))
        for r in range(k * G, (k + 1) * G):
            ids[r, :P] = ids[k * G, :P]
            c = int(torch.randint(1, C + 1, (1,), generator=g))
            mask[r, P - p : P + c] = 1
            comp[r, :c] = 1
    group = torch.arange(groups).repeat_interleave(G)
    return RolloutBatch(ids, mask, comp, comp.clone(), torch.zeros(n), group, torch.zeros(n, dtype=torch.bool), P,
                        [""] * n, [""] * groups)


@pytest.mark.parametrize("budget", [12, 20, 40, 400])
def test_passes_hold_the_budget_and_take_every_row_once(budget):
    batch = _rollout()
    rows = torch.randperm(batch.num_rows, generator=torch.Generator().manual_seed(1))[:19]
    passes = rollout_micro_batches(batch, rows, budget, share_prompt=True)
    assert sorted(torch.cat(passes).tolist()) == sorted(rows.tolist())
    comp_len = batch.completion_mask.sum(-1)
    for p in passes:
        cost = pack_rows(batch, p)["input_ids"].numel()  # the packed pass as the loss builds it
        assert cost <= budget or len(p) == 1, (p.tolist(), cost)
    if budget == 400:  # everything fits: one pass
        assert len(passes) == 1
    else:
        # no two passes could have been one: each pass's row count is what the budget forces
        assert len(passes) < len(rows) or budget < int(comp_len.min()) + 3
    padded = rollout_micro_batches(batch, rows, budget, share_prompt=False)
    per = max(1, budget // batch.input_ids.shape[1])
    assert [len(p) for p in padded[:-1]] == [per] * (len(padded) - 1) and torch.equal(torch.cat(padded), rows)


def test_a_group_too_long_for_the_budget_is_split_with_its_prompt():
    batch = _rollout(groups=1, G=8, seed=3)
    passes = rollout_micro_batches(batch, torch.arange(8), 20, share_prompt=True)
    assert len(passes) > 1
    prompt = int(batch.attention_mask[0, : batch.prompt_width].sum())
    for p in passes:
        row = pack_rows(batch, p)
        assert row["input_ids"].shape[0] == 1  # one group: one packed row per pass, the prompt in each
        assert int((row["segments"] == 0).sum()) == prompt


FAST = ["algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=6", "algo.sampling.prompts_per_step=4",
        "algo.sampling.eval_max_new_tokens=6", "data.num_eval_examples=8", "train.max_steps=3", "train.lr=1e-2",
        "train.eval_every=0", "train.batch_size=32"]


@pytest.mark.parametrize("command,extra", [
    ("grpo", ["algo.sampling.num_generations=8", "algo.kl.beta=0.05", "algo.num_iterations=2", "algo.minibatch_rows=12"]),
    ("grpo", ["algo.sampling.num_generations=8", "algo.kl.beta=0.05", "algo.share_prompt=false"]),
    ("ppo", ["algo.sampling.num_generations=2", "algo.minibatch_rows=4"]),
    ("online-dpo", ["algo.sampling.num_generations=4", "algo.beta=0.1"]),
])
def test_budget_micro_batches_train_like_row_micro_batches(tmp_path, tiny_dir, command, extra):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(48))
    runs = {}
    for name, budget in (("rows", []), ("budget", [BUDGET])):
        run(run_config(command, tmp_path / name, tiny_dir, data, *FAST, *extra, *budget))
        runs[name] = [r for r in read_metrics(tmp_path / name) if "loss" in r]
    assert len(runs["rows"]) == len(runs["budget"]) == 3
    for a, b in zip(runs["rows"], runs["budget"]):
        for key in ("loss", "grad_norm", "reward"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def test_budget_cuts_an_update_into_more_passes(tmp_path, tiny_dir):
    from posttrain.train.grpo import GRPO

    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(48))
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, data, *FAST, "algo.sampling.num_generations=8", BUDGET)
    algo = GRPO(cfg)
    iteration = algo.next_iteration(1)
    passes = [p for update in iteration.updates for p in update]
    assert len(passes) > 1 and sum(len(p) for p in passes) == 32
    for p in passes:
        assert pack_rows(algo.batch, p)["input_ids"].numel() <= 48 or len(p) == 1

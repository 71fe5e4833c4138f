"""Two CPU processes (gloo) give the loss curve of one process with the same global batch: whole models with
all-reduced gradients (train.sharding=none) and FSDP2-sharded ones (full, grad_op)."""

import os
import subprocess
import sys

import pytest

from posttrain.metrics import read_metrics
from tiny import addition_sft_rows, prompt_rows, write_jsonl

BASE = ["model.autocast=none", "train.tensorboard=false", "train.progress=false", "data.eval_fraction=0.0", "train.lr=3e-3"]


def cli(args: list[str], launcher: list[str] | None = None) -> None:
    tests_dir = os.path.dirname(os.path.dirname(__file__))  # rewards named tiny:vowel_reward live there
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    launcher = launcher or [sys.executable, "-m", "posttrain.cli"]
    proc = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def losses(run_dir, key="loss"):
    return [r[key] for r in read_metrics(run_dir) if "loss" in r]


def pair_rows(n: int = 48):
    return [{"prompt": f"{i % 9}+{i % 5}=", "chosen": f"ok {i % 9 + i % 5}", "rejected": f"no {i % 9 + i % 5 + 1}"}
            for i in range(n)]


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_sft_two_processes_match_one(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(64))
    common = ["sft", "--model", tiny_dir, "--data", data, "--max-steps", "6", *BASE]
    cli([*common, "--output-dir", str(tmp_path / "one"), "train.batch_size=8"])
    cli([*common, "--output-dir", str(tmp_path / "two"), "train.batch_size=4", "--num-processes", "2"])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)


def test_grpo_runs_on_two_processes(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(32))
    cli(["grpo", "--model", tiny_dir, "--data", data, "--max-steps", "3", "--output-dir", str(tmp_path / "g"), *BASE,
         "algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=4", "algo.sampling.prompts_per_step=4", "algo.sampling.num_generations=4",
         "train.batch_size=16", "algo.sampling.eval_max_new_tokens=4", "data.num_eval_examples=4", "--num-processes", "2"])
    rows = [r for r in read_metrics(tmp_path / "g") if "loss" in r]
    assert len(rows) == 3 and all(r["completions/mean_length"] > 0 for r in rows)


def test_dpo_two_processes_match_one(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    common = ["dpo", "--model", tiny_dir, "--data", data, "--max-steps", "5", *BASE]
    cli([*common, "--output-dir", str(tmp_path / "one"), "train.batch_size=8"])
    cli([*common, "--output-dir", str(tmp_path / "two"), "train.batch_size=4", "--num-processes", "2"])
    assert len(losses(tmp_path / "one")) == 5
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("mode", ["full", "grad_op"])
def test_sft_sharded_matches_one_process(tmp_path, tiny_dir, mode):
    """FSDP2 over 2 processes: the same losses and gradient norms as 1 process, and the exported model (weights
    gathered from the shards) equals the 1-process one."""
    data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(64))
    common = ["sft", "--model", tiny_dir, "--data", data, "--max-steps", "5", *BASE]
    cli([*common, "--output-dir", str(tmp_path / "one"), "train.batch_size=8"])
    cli([*common, "--output-dir", str(tmp_path / "fsdp"), "train.batch_size=4", f"train.sharding={mode}", "--num-processes", "2"])
    for key in ("loss", "grad_norm"):
        assert losses(tmp_path / "fsdp", key) == pytest.approx(losses(tmp_path / "one", key), rel=1e-4, abs=1e-5), key
    one, fsdp = final_weights(tmp_path / "one"), final_weights(tmp_path / "fsdp")
    assert sorted(one) == sorted(fsdp)
    assert max(float((one[k] - fsdp[k]).abs().max()) for k in one) < 1e-5


def test_sharded_run_resumes_to_the_same_result(tmp_path, tiny_dir):
    """A sharded run stopped after 3 steps and resumed (whole weights and optimizer state re-sharded) ends where
    an uninterrupted 6-step sharded run ends."""
    data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(64))
    common = ["sft", "--model", tiny_dir, "--data", data, *BASE, "train.batch_size=4", "train.sharding=full",
              "train.schedule=constant", "--num-processes", "2"]
    cli([*common, "--max-steps", "6", "--output-dir", str(tmp_path / "straight")])
    cli([*common, "--max-steps", "3", "--output-dir", str(tmp_path / "resumed")])
    cli([*common, "--max-steps", "6", "--output-dir", str(tmp_path / "resumed"), "train.resume=true"])
    assert losses(tmp_path / "resumed")[-3:] == pytest.approx(losses(tmp_path / "straight")[-3:], rel=1e-5, abs=1e-6)


def test_dpo_sharded_matches_one_process(tmp_path, tiny_dir):
    # 50 pairs: 40 train (a whole number of global batches: several processes drop a short last one) and 10 held out
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(50))
    common = ["dpo", "--model", tiny_dir, "--data", data, "--max-steps", "4", *BASE, "data.eval_fraction=0.2"]
    cli([*common, "--output-dir", str(tmp_path / "one"), "train.batch_size=8"])
    cli([*common, "--output-dir", str(tmp_path / "fsdp"), "train.batch_size=4", "train.sharding=full", "--num-processes", "2"])
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-5)
    final = lambda d: [r for r in read_metrics(d) if r.get("final")][-1]  # noqa: E731  (evaluated on rank 0, gathered weights)
    assert final(tmp_path / "fsdp")["eval/loss"] == pytest.approx(final(tmp_path / "one")["eval/loss"], rel=1e-4)


def test_grpo_and_ppo_run_sharded(tmp_path, tiny_dir):
    """Sampling (ranks generate different lengths), held-out evaluation and export under FSDP2."""
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(32))
    online = ["--model", tiny_dir, "--data", data, "--max-steps", "2", *BASE, "algo.reward.functions=[tiny:vowel_reward]",
              "algo.sampling.max_new_tokens=5", "algo.sampling.prompts_per_step=4", "algo.sampling.num_generations=4", "train.batch_size=8",
              "algo.sampling.eval_max_new_tokens=4", "data.eval_fraction=0.2", "data.num_eval_examples=4", "train.sharding=full",
              "--num-processes", "2"]
    cli(["grpo", *online, "--output-dir", str(tmp_path / "g"), "algo.kl.beta=0.05"])
    cli(["ppo", *online, "--output-dir", str(tmp_path / "p")])
    for run in ("g", "p"):
        rows = read_metrics(tmp_path / run)
        assert len([r for r in rows if "loss" in r]) == 2 and any("eval/vowel_reward/mean_reward" in r for r in rows), run
        assert (tmp_path / run / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("launch", [["--multi_gpu"], ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD"]])
def test_accelerate_launch_trains_like_one_process(tmp_path, tiny_dir, launch):
    """`accelerate launch` (its CPU processes talk gloo): plain data parallel, and its FSDP config read as
    train.sharding=auto -> full."""
    data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(64))
    args = ["sft", "--model", tiny_dir, "--data", data, "--max-steps", "4", *BASE]
    cli([*args, "--output-dir", str(tmp_path / "one"), "train.batch_size=8"])
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "posttrain.cli"]
    cli([*args, "--output-dir", str(tmp_path / "acc"), "train.batch_size=4"], launcher=accelerate)
    first = read_metrics(tmp_path / "acc")[0]
    assert first["processes"] == 2 and first["sharded_modules"] == (1 if "--use_fsdp" in launch else 0)
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-5)


def test_minibatch_schedule_counts_local_rows_on_two_processes(tmp_path, tiny_dir):
    """With minibatch_rows, each process slices its own rows into minibatches: 2 processes x (2 prompts x 4 samples)
    with minibatch_rows=4 make 2 updates per step, and the cosine schedule planned for them reaches 0 exactly at
    the last update (planning for the global 16 rows, as before, left it half-way: lr 0.5 x peak)."""
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(32))
    cli(["grpo", "--model", tiny_dir, "--data", data, "--max-steps", "2", "--output-dir", str(tmp_path / "g"), *BASE,
         "algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=4", "algo.sampling.prompts_per_step=4", "algo.sampling.num_generations=4",
         "algo.minibatch_rows=4", "train.batch_size=4", "algo.sampling.eval_max_new_tokens=4", "data.num_eval_examples=4",
         "train.schedule=cosine", "--num-processes", "2"])
    rows = [r for r in read_metrics(tmp_path / "g") if "loss" in r]
    assert [r["updates"] for r in rows] == [2.0, 2.0]
    assert rows[0]["lr"] == pytest.approx(3e-3 * 0.5, rel=1e-6)  # after 2 of 4 updates: cos(pi/2) -> half
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_zero_variance_groups_is_a_fraction_of_each_process_groups(tmp_path, tiny_dir):
    """Every group has equal rewards: the metric is 1.0 with 2 processes too (it divided each process's count by the
    global prompt count, reading 1/2 of the truth)."""
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(32))
    cli(["grpo", "--model", tiny_dir, "--data", data, "--max-steps", "2", "--output-dir", str(tmp_path / "g"), *BASE,
         "algo.reward.functions=[tiny:constant_reward]", "algo.sampling.max_new_tokens=3", "algo.sampling.prompts_per_step=4",
         "algo.sampling.num_generations=2", "train.batch_size=8", "algo.sampling.eval_max_new_tokens=2",
         "data.num_eval_examples=2", "--num-processes", "2"])
    rows = [r for r in read_metrics(tmp_path / "g") if "zero_variance_groups" in r]
    assert [r["zero_variance_groups"] for r in rows] == [1.0, 1.0]

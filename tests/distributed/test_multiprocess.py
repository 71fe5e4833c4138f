"""Two CPU processes (gloo) give the loss curve of one process with the same global batch."""

import os
import subprocess
import sys

import pytest

from posttrain.metrics import read_metrics
from tiny import addition_sft_rows, prompt_rows, write_jsonl

BASE = ["model.autocast=none", "train.tensorboard=false", "train.progress=false", "data.eval_fraction=0.0", "train.lr=3e-3"]


def cli(args: list[str]) -> None:
    tests_dir = os.path.dirname(os.path.dirname(__file__))  # rewards named tiny:vowel_reward live there
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


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
         "algo.rewards=[tiny:vowel_reward]", "algo.max_new_tokens=4", "algo.prompts_per_step=4", "algo.num_generations=4",
         "train.batch_size=16", "algo.eval_max_new_tokens=4", "data.num_eval_examples=4", "--num-processes", "2"])
    rows = [r for r in read_metrics(tmp_path / "g") if "loss" in r]
    assert len(rows) == 3 and all(r["completions/mean_length"] > 0 for r in rows)

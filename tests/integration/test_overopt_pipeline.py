"""The over-optimization experiment on a tiny model, end to end: a noisy proxy RM, PPO against it with held-out
proxy and gold evaluations, best-of-n, overoptimization.json and the report's section."""

import json
import math

import yaml

from posttrain.cli import main
from posttrain.metrics import read_metrics
from test_pipeline import FAST, ONLINE


def test_overopt_pipeline(tmp_path, tiny_dir):
    cfg = {
        "output_dir": str(tmp_path / "pipe"), "model": tiny_dir, "data": "task:arithmetic",
        "eval": {"prompts": 4, "max_new_tokens": 6, "kl_prompts": 2}, "defaults": FAST,
        "stages": [
            {"name": "rm_proxy", "command": "rm", "overrides": {"train.max_steps": 2, "data.num_examples": 8,
                                                                "algo.label_noise": 0.25}},
            {"name": "ppo", "command": "ppo", "reward_model": "rm_proxy",
             "overrides": {"train.max_steps": 3, "train.eval_every": 1, "algo.reward.functions": [], "algo.reward.eval_functions": ["numeric"],
                           **ONLINE}},
            {"name": "overopt", "command": "overopt", "reward_model": "rm_proxy",
             "overrides": {"algo.ppo_run": "ppo", "algo.max_n": 4, "algo.max_new_tokens": 6}},
        ],
    }
    path = tmp_path / "overopt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", str(path)]) == 0
    out = tmp_path / "pipe"
    assert "label_noise=0.25: 2 of 8 training pairs swapped" in (out / "rm_proxy" / "stage.log").read_text()
    points = json.loads((out / "overopt" / "overoptimization.json").read_text())["points"]
    bon = [p for p in points if p["method"] == "best-of-n"]
    assert [p["step"] for p in bon] == [1, 2, 4] and [p["kl"] for p in bon] == [0.0, math.log(2) - 0.5, math.log(4) - 0.75]
    assert bon[1]["proxy_reward"] >= bon[0]["proxy_reward"] - 1e-6 and bon[2]["proxy_reward"] >= bon[1]["proxy_reward"] - 1e-6
    ppo = [p for p in points if p["method"] == "ppo"]
    rows = read_metrics(out / "ppo")
    kl = {r["step"]: r["kl/seq_k1_sum"] for r in rows if "kl/seq_k1_sum" in r}
    logged = [r for r in rows if "eval/reward_model/mean_reward" in r]
    assert [p["step"] for p in ppo] == [0, 1, 2, 3]  # the start, evaluations at steps 1 and 2, the final one
    assert [p["kl"] for p in ppo[1:]] == [max(kl[r["step"]], 0.0) for r in logged]
    assert [p["gold_reward"] for p in ppo[1:]] == [r["eval/numeric/mean_reward"] for r in logged]
    html = (out / "report.html").read_text()
    assert "Reward over-optimization" in html and "best-of-n" in html and "no overoptimization.json" not in html

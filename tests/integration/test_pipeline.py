"""A quick pipeline on a tiny model, end to end: every stage, the summary, the report; re-run skips done stages."""

import json
import re

import yaml

from posttrain.cli import main
from posttrain.metrics import read_metrics

FAST = {"model.autocast": "none", "data.max_length": 256, "data.num_eval_examples": 4, "train.progress": False,
        "train.tensorboard": False, "data.num_examples": 32, "train.batch_size": 4}
ONLINE = {"algo.sampling.max_new_tokens": 6, "algo.sampling.eval_max_new_tokens": 6, "algo.sampling.prompts_per_step": 4}


def write_pipeline(tmp_path, model_dir):
    cfg = {
        "output_dir": str(tmp_path / "pipe"), "model": model_dir, "data": "task:arithmetic",
        "eval": {"prompts": 4, "max_new_tokens": 6, "kl_prompts": 2}, "defaults": FAST,
        "stages": [
            {"name": "sft", "command": "sft", "overrides": {"train.max_steps": 3, "train.lr": 1e-3}},
            {"name": "rm", "command": "rm", "from": "sft", "overrides": {"train.max_steps": 2}},
            {"name": "dpo", "command": "dpo", "from": "sft", "overrides": {"train.max_steps": 2}},
            {"name": "kto", "command": "kto", "from": "sft", "overrides": {"train.max_steps": 2}},
            {"name": "ppo", "command": "ppo", "from": "sft", "reward_model": "rm",
             "overrides": {"train.max_steps": 2, "algo.reward.functions": [], "algo.reward.eval_functions": ["numeric"], **ONLINE}},
            {"name": "grpo", "command": "grpo", "from": "sft",
             "overrides": {"train.max_steps": 2, "algo.sampling.num_generations": 4, "algo.kl.beta": 0.04, **ONLINE}},
        ],
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_quick_pipeline_end_to_end(tmp_path, tiny_dir, capsys):
    path = write_pipeline(tmp_path, tiny_dir)
    assert main(["pipeline", str(path)]) == 0
    out = tmp_path / "pipe"
    summary = json.loads((out / "pipeline_summary.json").read_text())
    names = [s["name"] for s in summary["stages"]]
    assert names == ["base", "sft", "rm", "dpo", "kto", "ppo", "grpo"]
    by = {s["name"]: s for s in summary["stages"]}
    assert by["ppo"]["models_in_memory"] == 4 and by["grpo"]["models_in_memory"] == 2 and by["sft"]["models_in_memory"] == 1
    assert by["dpo"]["models_in_memory"] == 1  # reference log-probs precomputed, no reference held
    for stage in ("sft", "dpo", "kto", "ppo", "grpo"):
        assert by[stage]["kl_to_ref"] is not None and len(by[stage]["samples"]) == 4
        peak = max(r["peak_mem_gb"] for r in read_metrics(out / stage) if "peak_mem_gb" in r)
        assert by[stage]["peak_mem_gb"] == peak  # the summary's numbers are the metrics files' numbers
    _check_heldout_statistics(out, summary)
    html = (out / "report.html").read_text()
    for section in ("Training curves", "Comparison", "KL", "before and after"):
        assert re.search(section, html, re.IGNORECASE), section
    assert "data:image/png;base64," in html and (out / "report.md").exists()
    for stage in ("ppo", "grpo"):  # the online stages' training samples, and their tables in the report
        steps = {json.loads(line)["step"] for line in (out / stage / "samples.jsonl").read_text().splitlines()}
        assert steps == {1, 2} and f'id="rollout-samples-{stage}"' in html
    # a re-run skips every finished stage
    capsys.readouterr()
    assert main(["pipeline", str(path)]) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 6


def _check_heldout_statistics(out, summary):
    """Every generating stage answered the same prompts; its file's 0/1 outcomes give the summary's accuracy,
    Wilson interval, discordant counts against SFT and McNemar's p."""
    from posttrain.report.stats import mcnemar, wilson

    assert summary["baseline"] == "sft" and summary["heldout_prompts"] == 4 and summary["smoke_run"] is False
    rows = {}
    for name in ("base", "sft", "dpo", "kto", "ppo", "grpo"):
        lines = [json.loads(x) for x in (out / f"heldout_{name}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in lines] == [0, 1, 2, 3] and all(r["correct"] in (0, 1) for r in lines)
        rows[name] = [r["correct"] for r in lines]
    assert [r["prompt"] for r in map(json.loads, (out / "heldout_sft.jsonl").read_text().splitlines())] == \
        [r["prompt"] for r in map(json.loads, (out / "heldout_grpo.jsonl").read_text().splitlines())]
    assert not (out / "heldout_rm.jsonl").exists()
    by = {s["name"]: s for s in summary["stages"]}
    for name, outcomes in rows.items():
        entry, k = by[name], sum(outcomes)
        assert (entry["heldout_n"], entry["heldout_correct"], entry["heldout_accuracy"]) == (4, k, k / 4)
        assert entry["heldout_accuracy_ci"] == list(wilson(k, 4))
        if name == "sft":
            assert "vs_baseline" not in entry
            continue
        vs = entry["vs_baseline"]
        b = sum(s and not x for s, x in zip(rows["sft"], outcomes))
        c = sum(x and not s for s, x in zip(rows["sft"], outcomes))
        assert (vs["baseline"], vs["baseline_only"], vs["stage_only"]) == ("sft", b, c)
        assert vs["p"] == mcnemar(b, c).p and vs["diff"] == (c - b) / 4
        assert vs["diff_ci"][0] <= vs["diff"] <= vs["diff_ci"][1]
    assert "heldout_n" not in by["rm"] and "vs_baseline" not in by["rm"]


def test_demo_configs_held_out_size_and_smoke_flag():
    from posttrain.pipeline import CONFIG_DIR, load_pipeline

    demo, quick = load_pipeline(CONFIG_DIR / "demo.yaml"), load_pipeline(CONFIG_DIR / "demo_quick.yaml")
    assert demo.eval["prompts"] == 256 and demo.smoke is False
    assert quick.smoke is True and quick.eval["prompts"] < 64


def test_seeds_repeat_the_rl_stages_and_settle_stability(tmp_path, tiny_dir, capsys):
    """`--seeds 2`: ppo and grpo run again with train.seed=1 in <stage>_seed1/; the summary lists the runs, the
    report gives their spread and the stability claim is judged from it; the progress line counts every run."""
    cfg = yaml.safe_load(write_pipeline(tmp_path, tiny_dir).read_text())
    cfg["stages"] = [s for s in cfg["stages"] if s["name"] in ("sft", "rm", "ppo", "grpo")]
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", str(path), "--seeds", "2"]) == 0
    out = tmp_path / "pipe"
    printed = capsys.readouterr().out
    assert "[pipeline] stage 1/6: sft (sft, 3 steps)" in printed and "ETA: after the first stage" in printed
    assert "[pipeline] stage 6/6: grpo_seed1 (grpo, 2 steps)" in printed
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["seeds"] == {"n": 2, "runs": {"ppo": [[0, "ppo"], [1, "ppo_seed1"]], "grpo": [[0, "grpo"], [1, "grpo_seed1"]]}}
    assert [s["name"] for s in summary["stages"]] == ["base", "sft", "rm", "ppo", "grpo"]
    assert "train.seed=1" in (out / "grpo_seed1" / "command.txt").read_text()
    from posttrain.report.claims import check_claims
    from posttrain.report.load import load_run

    run = load_run(out)
    assert [s.name for s in run.stages] == ["base", "sft", "rm", "ppo", "grpo"]
    stability = next(c for c in check_claims(run.stages) if c.name == "stability")
    assert stability.verdict in ("confirmed", "not confirmed") and "over 2 seeds" in stability.measured
    assert 'id="seeds"' in (out / "report.html").read_text()

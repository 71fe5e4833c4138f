"""`posttrain pairs` and the pipeline's `pairs` stage: a policy's own samples labelled 0/1, paired right against
wrong per prompt, split into training and held-out pairs by prompt, and fed to later stages by `data_from`."""

import json
import random

import pytest
import yaml

from posttrain.cli import main
from posttrain.config import ConfigError
from posttrain.data.formats import load_dataset_records
from posttrain.onpolicy_pairs import make_pairs
from posttrain.pipeline import load_pipeline, stage_argv

FAST = {"model.autocast": "none", "data.max_length": 256, "train.progress": False, "train.tensorboard": False,
        "train.batch_size": 4}


def test_make_pairs_by_hand():
    """Prompt 0: right 'a', wrong 'b','c' -> 2 distinct pairs (per_prompt 2 of the 2 combos); prompt 1: all wrong ->
    none; prompt 2: right 'x' twice (one text), wrong 'y' -> 1 pair; duplicates never become two pairs."""
    records = load_dataset_records("task:arithmetic", "prompts", "train", n=3)
    rows = [{"index": 0, "completion": c, "s": s} for c, s in (("a", 1.0), ("b", 0.0), ("c", 0.0))]
    rows += [{"index": 1, "completion": c, "s": 0.0} for c in ("d", "e")]
    rows += [{"index": 2, "completion": c, "s": s} for c, s in (("x", 1.0), ("x", 1.0), ("y", 0.0))]
    pairs, mixed = make_pairs(records, rows, "s", per_prompt=2, rng=random.Random(0))
    assert mixed == 2
    got = sorted((p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs)
    assert got == [("a", "b"), ("a", "c"), ("x", "y")]
    assert all(p["prompt"] == records[0].data["prompt"] for p in pairs[:2]) and pairs[2]["prompt"] == records[2].data["prompt"]
    one, _ = make_pairs(records, rows, "s", per_prompt=1, rng=random.Random(0))
    assert len(one) == 2  # at most one pair per prompt


def test_pairs_command_splits_by_prompt(tmp_path, tiny_dir, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[1]))
    out = tmp_path / "pairs"
    assert main(["pairs", "--model", tiny_dir, "--data", "task:arithmetic", "--output-dir", str(out), "--prompts", "12",
                 "--eval-prompts", "6", "--samples", "4", "--max-new-tokens", "8", "--score", "tiny:first_code_even",
                 "--device", "cpu"]) == 0
    summary = json.loads((out / "pairs_summary.json").read_text())
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 18 * 4 and {s["index"] for s in samples} == set(range(18))
    train = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (out / "eval_pairs.jsonl").read_text().splitlines()]
    assert summary["train_pairs"] == len(train) > 0 and summary["eval_pairs"] == len(held)
    records = load_dataset_records("task:arithmetic", "prompts", "train", n=18)
    train_prompts = {json.dumps(r.data["prompt"]) for r in records[:12]}
    assert {json.dumps(p["prompt"]) for p in train} <= train_prompts
    assert not {json.dumps(p["prompt"]) for p in held} & train_prompts  # held-out pairs come from other prompts
    by_text = {(s["index"], s["completion"]): s["first_code_even"] for s in samples}
    index_of = {json.dumps(r.data["prompt"]): i for i, r in enumerate(records)}
    for p in train + held:  # every chosen was labelled 1 and every rejected 0, for that prompt
        i = index_of[json.dumps(p["prompt"])]
        assert by_text[(i, p["chosen"][0]["content"])] == 1.0 and by_text[(i, p["rejected"][0]["content"])] == 0.0
    mixed = sum(1 for i in range(12) if len({s["first_code_even"] for s in samples if s["index"] == i}) == 2)
    assert summary["train_prompts_mixed"] == mixed


def test_data_from_must_name_an_earlier_pairs_stage(tmp_path):
    base = {"output_dir": str(tmp_path / "o"), "model": "m", "data": "task:arithmetic"}
    for stages, message in ((
        [{"name": "sft", "command": "sft"}, {"name": "rm", "command": "rm", "data_from": "sft"}], "must be one of"),
        ([{"name": "rm", "command": "rm", "data_from": "pairs"}], "not an earlier stage")):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({**base, "stages": stages}))
        with pytest.raises(ConfigError, match=message):
            load_pipeline(path)


def test_pipeline_pairs_stage_feeds_rm_dpo_kto(tmp_path, tiny_dir, monkeypatch, capsys):
    """sft -> pairs (the SFT model's samples) -> rm, dpo and kto trained on those pairs, each evaluated on the held-out
    pairs; the summary carries the pairs' counts and the rm's held-out pairwise accuracy on them."""
    tests_dir = str(__import__("pathlib").Path(__file__).parents[1])
    monkeypatch.setenv("PYTHONPATH", tests_dir)  # stage processes import tiny's labeller
    pairs_opts = {"prompts": 12, "eval_prompts": 6, "samples": 4, "max_new_tokens": 8, "score": "tiny:first_code_even"}
    cfg = {"output_dir": str(tmp_path / "pipe"), "model": tiny_dir, "data": "task:arithmetic",
           "eval": {"prompts": 4, "max_new_tokens": 6, "kl_prompts": 2}, "defaults": FAST,
           "stages": [{"name": "sft", "command": "sft", "overrides": {"train.max_steps": 2, "data.num_examples": 16}},
                      {"name": "pairs", "command": "pairs", "from": "sft", "overrides": pairs_opts},
                      *({"name": c, "command": c, "from": "sft", "data_from": "pairs", "overrides": {"train.max_steps": 2}}
                        for c in ("rm", "dpo", "kto"))]}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = load_pipeline(path)
    out = tmp_path / "pipe"
    argv = stage_argv(p, p.stages[2], out)
    assert f"data.path={out / 'pairs' / 'pairs.jsonl'}" in argv and f"data.eval_path={out / 'pairs' / 'eval_pairs.jsonl'}" in argv
    assert stage_argv(p, p.stages[1], out)[:3] == ["pairs", "--model", str(out / "sft" / "final")]
    assert main(["pipeline", str(path)]) == 0
    summary = json.loads((out / "pipeline_summary.json").read_text())
    by = {s["name"]: s for s in summary["stages"]}
    counts = json.loads((out / "pairs" / "pairs_summary.json").read_text())
    assert by["pairs"]["pairs"] == counts and "heldout_accuracy" not in by["pairs"]
    held = len((out / "pairs" / "eval_pairs.jsonl").read_text().splitlines())
    rm_final = [json.loads(x) for x in (out / "rm" / "metrics.jsonl").read_text().splitlines()][-1]
    assert by["rm"]["heldout_accuracy"] == rm_final["eval/accuracy"]
    assert held > 0 and abs(held * rm_final["eval/accuracy"] - round(held * rm_final["eval/accuracy"])) < 1e-9  # of those pairs
    for stage in ("dpo", "kto"):
        assert by[stage]["heldout_n"] == 4
    table_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("pairs "))
    assert f"{counts['train_pairs']} + {counts['eval_pairs']} held-out pairs" in table_row  # what it made, in the table

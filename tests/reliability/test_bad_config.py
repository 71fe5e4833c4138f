"""Bad configuration and bad input through the CLI: each one clear line on stderr (file and line, or config key and
value, or flag), exit status 2, no traceback, and nothing half-written: a config error leaves no run directory, a
data error no `final/` model (issue: "Bad input and bad configuration, each one clear line")."""

import json
import os
import subprocess
import sys

import pytest

from posttrain.cli import main
from posttrain.config import load_config
from tiny import addition_sft_rows, prompt_rows, tiny_model_dir, write_jsonl

QUICK = ["model.autocast=none", "train.progress=false", "train.tensorboard=false", "data.eval_fraction=0"]
ONLINE = ["algo.sampling.prompts_per_step=2", "algo.sampling.num_generations=2", "algo.sampling.max_new_tokens=3",
          "algo.sampling.eval_max_new_tokens=2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", addition_sft_rows(8))


def cli_error(capsys, argv: list[str], alone: bool = False) -> str:
    """The one error line of a refused command line (exit 2, no traceback). `alone`: stderr holds nothing else (a
    config error comes before the model loader, whose progress bars may precede a data error)."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("posttrain ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    if alone:
        assert err.strip() == errors[0], err
    return errors[0]


def sft(model_dir, data, out, *extra) -> list[str]:
    return ["sft", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
            *QUICK, *extra]


# ---- configuration: refused before anything is written ------------------------------------------------------------

# (overrides, the start of the message after "posttrain sft: error: ")
BAD_VALUES = {
    "grad_accum 0": (["train.grad_accum=0"], "train.grad_accum=0: must be at least 1"),
    "negative max_steps": (["train.max_steps=-3"], "train.max_steps=-3: must be >= 0"),
    "fractional batch_size": (["train.batch_size=2.5"], "train.batch_size: expected int, got 2.5"),
    "batch_size 0": (["train.batch_size=0"], "train.batch_size=0: must be at least 1"),
    "negative warmup": (["train.warmup_steps=-1"], "train.warmup_steps=-1: must be >= 0"),
    "unknown overlong policy": (["data.overlong=cut"], "data.overlong='cut': must be drop or truncate"),
    "negative lr": (["train.lr=-1"], "train.lr=-1.0: must be a finite number >= 0"),
    "lora rank 0": (["model.lora.enabled=true", "model.lora.r=0"], "model.lora.r=0: must be at least 1"),
    "everything held out": (["data.eval_fraction=1"], "data.eval_fraction=1.0: must be in [0, 1)"),
    "malformed override": (["train.lr=[1,"], "override 'train.lr=[1,': not valid YAML: expected the node content"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value_names_key_and_value_and_writes_nothing(tmp_path, model_dir, sft_data, capsys, case):
    overrides, message = BAD_VALUES[case]
    out = tmp_path / "run"
    line = cli_error(capsys, sft(model_dir, sft_data, out, *overrides), alone=True)
    assert line.startswith(f"posttrain sft: error: {message}"), line
    assert not out.exists()


def test_a_bad_value_in_a_config_file_names_its_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 2.5\n")
    line = cli_error(capsys, ["sft", str(path), "--output-dir", str(tmp_path / "run")], alone=True)
    assert line == "posttrain sft: error: train.batch_size: expected int, got 2.5"


def test_int_keys_still_accept_integral_floats_and_the_meaningful_zeros():
    cfg = load_config("sft", None, ["train.batch_size=3.0", "train.max_steps=1e3", "train.warmup_steps=0"])
    assert (cfg.train.batch_size, cfg.train.max_steps) == (3, 1000)
    assert load_config("sft", None, ["train.max_steps=0", "train.lr=0"]).train.max_steps == 0  # evaluate/export only


@pytest.mark.parametrize("text,where", [
    ("train:\n\tlr: 0.1\n", ":2:1: not valid YAML: found character '\\t' that cannot start any token (YAML indents "
                            "with spaces, never tabs)"),
    ("train: {lr: [1,\n", ":2:1: not valid YAML: expected the node content, but found '<stream end>'"),
    ("train:\n  lr: 1\n max_steps: 2\n", ":3:2: not valid YAML: expected <block end>"),
])
def test_a_config_file_that_is_not_yaml_names_its_line(tmp_path, capsys, text, where):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    line = cli_error(capsys, ["sft", str(path), "--output-dir", str(tmp_path / "run")], alone=True)
    assert line.startswith(f"posttrain sft: error: {path}{where}"), line
    assert not (tmp_path / "run").exists()


def test_a_model_that_is_nowhere_names_the_flag(tmp_path, sft_data, capsys):
    line = cli_error(capsys, sft("/nonexistent/model", sft_data, tmp_path / "run"), alone=True)
    assert line == ("posttrain sft: error: model.name_or_path='/nonexistent/model': no such file or folder, "
                    "and not a hub id (namespace/name) (--model)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("below", ["", "sub"])
def test_an_output_dir_that_is_a_file_names_the_flag(tmp_path, model_dir, sft_data, capsys, below):
    blocker = tmp_path / "results.txt"
    blocker.write_text("keep me")
    out = blocker / below if below else blocker
    line = cli_error(capsys, sft(model_dir, sft_data, out), alone=True)
    assert line == (f"posttrain sft: error: train.output_dir={str(out)!r}: {str(blocker)!r} is a file, not a "
                    "directory (--output-dir)")
    assert blocker.read_text() == "keep me"


def test_grpo_refuses_one_generation_and_says_why(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(4))
    argv = ["grpo", "--model", model_dir, "--data", data, "--output-dir", str(tmp_path / "run"), *QUICK,
            "algo.sampling.num_generations=1"]
    line = cli_error(capsys, argv, alone=True)
    assert line.startswith("posttrain grpo: error: algo.sampling.num_generations=1: must be at least 2 for grpo: "
                           "advantages are relative to the prompt's group"), line
    assert not (tmp_path / "run").exists()
    from posttrain.train import registry

    registry.get("ppo")
    assert load_config("ppo", None, []).algo.sampling.num_generations == 1  # PPO's own default: a critic baseline


def test_the_cli_prints_no_traceback_in_a_fresh_process(tmp_path):
    """The exit status and stderr a shell sees (no pytest capture): one line, status 2."""
    path = tmp_path / "tabs.yaml"
    path.write_text("train:\n\tlr: 0.1\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "sft", str(path), "--output-dir",
                             str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"posttrain sft: error: {path}:2:1: not valid YAML")


# ---- data: named by file and line, nothing exported ---------------------------------------------------------------

def test_duplicated_json_keys_name_file_line_and_key(tmp_path, model_dir, capsys):
    jsonl = tmp_path / "d.jsonl"
    good = json.dumps(addition_sft_rows(1)[0])
    jsonl.write_text(f'{good}\n{{"prompt": "1+1", "completion": "2", "completion": "3"}}\n')
    line = cli_error(capsys, sft(model_dir, jsonl, tmp_path / "a"))
    assert line.startswith(f"posttrain sft: error: {jsonl}:2: duplicated key 'completion'"), line
    whole = tmp_path / "d.json"
    whole.write_text('[\n {"prompt": "1+1", "completion": "2"},\n {"prompt": "2+2",\n  "prompt": "3+3",\n'
                     '  "completion": "4"}\n]\n')
    line = cli_error(capsys, sft(model_dir, whole, tmp_path / "b"))
    assert line.startswith(f"posttrain sft: error: {whole}:4: duplicated key 'prompt'"), line
    nested = tmp_path / "n.jsonl"  # inside a message, and a brace inside a string does not confuse the locator
    nested.write_text('{"messages": [{"role": "user", "content": "{\\"a\\": 1}"}, '
                      '{"role": "assistant", "content": "x", "role": "user"}]}\n')
    line = cli_error(capsys, sft(model_dir, nested, tmp_path / "c"))
    assert line.startswith(f"posttrain sft: error: {nested}:1: duplicated key 'role'"), line
    assert not any((tmp_path / run / "final").exists() for run in "abc")


def test_the_first_repeat_in_reading_order_is_named(tmp_path):
    """An outer key repeated before an inner object's repeat is the one reported (json.loads' hook meets the inner
    first, since inner objects close first), at the line of its second occurrence."""
    from posttrain.data.formats import DataError, read_records

    path = tmp_path / "d.json"
    path.write_text('[\n{"a": 1,\n "a": {"b": 1,\n   "b": 2}}]\n')
    with pytest.raises(DataError) as info:
        read_records(str(path))
    assert str(info.value).startswith(f"{path}:3: duplicated key 'a' in one JSON object")


def test_every_example_over_max_length_names_the_file_and_the_count(tmp_path, model_dir, sft_data, capsys):
    out = tmp_path / "run"
    line = cli_error(capsys, sft(model_dir, sft_data, out, "data.max_length=8"))
    assert line.startswith(f"posttrain sft: error: {sft_data}: no examples left to train on: all 8 records of the "
                           f"train split were dropped: 8 longer than data.max_length=8 tokens (data.overlong='drop'; "
                           f"first: {sft_data}:1, {sft_data}:2"), line
    assert not (out / "final").exists()
    assert json.loads((out / "data_report.json").read_text())["train"]["dropped"] == 8  # the counts stay on disk


def test_every_pair_identical_names_the_file_and_the_count(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{i}", "chosen": "same", "rejected": " same"}
                                                  for i in range(5)])
    argv = ["dpo", "--model", model_dir, "--data", data, "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
            *QUICK, "train.batch_size=2"]
    line = cli_error(capsys, argv)
    assert line == (f"posttrain dpo: error: {data}: no examples left to train on: all 5 pairs of the train split "
                    f"have chosen == rejected (first: {data}:1, {data}:2, {data}:3)")
    assert not (tmp_path / "run" / "final").exists()


def test_every_prompt_over_max_prompt_length_names_the_file(tmp_path, model_dir, capsys):
    rows = [{"prompt": "a long prompt " * 10, "answer": "1"} for _ in range(3)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    argv = ["grpo", "--model", model_dir, "--data", data, "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
            *QUICK, *ONLINE, "data.max_prompt_length=20"]
    line = cli_error(capsys, argv)
    assert line.startswith(f"posttrain grpo: error: {data}: no examples left to train on: all 3 prompts of the "
                           "train split were dropped: 3 longer than data.max_prompt_length=20 tokens (first: "), line
    assert not (tmp_path / "run" / "final").exists()


def test_a_column_a_reward_needs_is_missing(tmp_path, model_dir, capsys):
    rows = prompt_rows(4)
    del rows[2]["answer"]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    argv = ["grpo", "--model", model_dir, "--data", data, "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
            *QUICK, *ONLINE, "algo.reward.functions=[numeric,tiny:vowel_reward]"]
    line = cli_error(capsys, argv)
    assert line == (f"posttrain grpo: error: {data}:3: missing column 'answer', which reward 'numeric' "
                    "(algo.reward.functions) needs; columns: ['prompt']")
    assert not (tmp_path / "run" / "final").exists()


def test_required_columns_read_from_the_reward_signatures():
    from posttrain.rewards.registry import load_reward
    from posttrain.train.collector import required_columns

    assert required_columns(load_reward("numeric")) == ["answer"]
    assert required_columns(load_reward("numeric", tolerance=0.1)) == ["answer"]  # options bound by partial
    assert required_columns(load_reward("code")) == ["tests"]
    assert required_columns(load_reward("format")) == [] and required_columns(load_reward("length_penalty")) == []


def test_the_empty_train_split_error_counts_each_reason(tmp_path):
    """Records a caller removed before encoding (DPO's and KTO's identical pairs) are counted with the over-long ones
    when they pass them as `dropped_before`."""
    from posttrain.data.collate import LengthReport
    from posttrain.train.common import nothing_left
    from tiny import run_config

    cfg = run_config("sft", tmp_path / "run", "smollm2", "pairs.jsonl", "data.max_length=32", "data.overlong=truncate")
    report = LengthReport("truncate", dropped=2, examples=["pairs.jsonl:4", "pairs.jsonl:5"])
    message = str(nothing_left(cfg, "train", report, {"with chosen == rejected": 3}))
    assert message == ("pairs.jsonl: no examples left to train on: all 5 records of the train split were dropped: "
                       "3 with chosen == rejected; 2 longer than data.max_length=32 tokens (data.overlong='truncate'; "
                       "first: pairs.jsonl:4, pairs.jsonl:5)")

"""Discoverable configuration: field docs from the source, `posttrain CMD --help`, `posttrain config CMD`."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import yaml

import posttrain.config as config
from posttrain.cli import build_parser, config_from_args, main
from posttrain.config import load_config
from posttrain.config_docs import FieldDoc, default_yaml, describe_fields, field_doc, help_epilog
from posttrain.train import registry

COMMANDS = list(registry.discover())


# ---- the doc extractor, on dataclasses written for it -------------------------------------------------------------

@dataclass
class Inner:
    depth: int = 2  # how deep


@dataclass
class Base:
    alpha: int = 1  # the base alpha
    # a doc above the field,
    # on two lines
    beta: str | None = None
    mode: str = "auto"  # auto | manual | shared
    # shared: one model for both (this line explains `mode`, it is not gamma's doc)
    gamma: float = 0.5
    url: str = "http://host/#anchor"  # a '#' in a string is no comment
    names: list[str] = field(default_factory=lambda: ["a", "b"])  # trailing comment after a call
    inner: Inner = field(default_factory=Inner)

    undocumented: bool = False


@dataclass
class Child(Base):
    alpha: int = 7
    beta: str | None = "x"  # the child's own doc
    extra: dict = field(default_factory=dict)


def test_trailing_above_and_continued_comments():
    assert field_doc(Base, "alpha") == "the base alpha"
    assert field_doc(Base, "beta") == "a doc above the field, on two lines"
    assert field_doc(Base, "mode") == ("auto | manual | shared; shared: one model for both (this line explains "
                                       "`mode`, it is not gamma's doc)")
    assert field_doc(Base, "gamma") == ""
    assert field_doc(Base, "url") == "a '#' in a string is no comment"
    assert field_doc(Base, "names") == "trailing comment after a call"
    assert field_doc(Base, "undocumented") == ""


def test_describe_fields_follows_inheritance_and_nesting():
    """Child.alpha redefines the default without a doc: Base's doc applies; Child.beta has its own."""
    rows = {f.key: f for f in describe_fields(Child, "algo")}
    assert list(rows) == ["algo.alpha", "algo.beta", "algo.mode", "algo.gamma", "algo.url", "algo.names",
                          "algo.inner.depth", "algo.undocumented", "algo.extra"]
    assert rows["algo.alpha"] == FieldDoc("algo.alpha", "int", "7", "the base alpha")
    assert rows["algo.beta"] == FieldDoc("algo.beta", "str | None", "x", "the child's own doc")
    assert rows["algo.inner.depth"] == FieldDoc("algo.inner.depth", "int", "2", "how deep")
    assert rows["algo.names"].default == "[a, b]" and rows["algo.extra"].default == "{}"
    assert describe_fields(Base)[1] == FieldDoc("beta", "str | None", "null", "a doc above the field, on two lines")


def test_the_real_configs_are_documented():
    from posttrain.config import ModelConfig, TrainConfig

    rows = {f.key: f for f in describe_fields(ModelConfig, "model")}
    assert rows["model.dtype"] == FieldDoc("model.dtype", "str", "fp32", "weights: fp32 | bf16")
    assert rows["model.frozen_dtype"].doc.startswith("frozen models (reference, reward models, judges)")
    assert rows["model.lora.target_modules"].default == "[q_proj, k_proj, v_proj, o_proj]"
    assert field_doc(TrainConfig, "device").startswith("where models, batches")  # two comment lines above it
    assert "0 = only at the end" == field_doc(TrainConfig, "save_every")


def test_inherited_online_fields_take_the_base_docs():
    """GRPO/PPO sections subclass OnlineConfig: a field they do not redefine has OnlineConfig's doc."""
    from posttrain.train.online import OnlineConfig

    spec = registry.get("ppo")
    assert issubclass(spec.config, OnlineConfig)
    rows = {f.key: f for f in describe_fields(spec.config, "algo")}
    assert rows["algo.mask_truncated"].doc == field_doc(OnlineConfig, "mask_truncated") != ""
    from posttrain.online_config import RewardConfig

    assert rows["algo.reward.functions"].doc == field_doc(RewardConfig, "functions") != ""  # a section's field
    sections = ("sampling", "reward", "reference", "env")  # listed by their fields
    assert {f"algo.{name}" for name in OnlineConfig.__dataclass_fields__ if name not in sections} <= set(rows)
    assert {"algo.sampling.temperature", "algo.reference.model", "algo.kl.placement"} - set(rows) == {"algo.kl.placement"}


# ---- posttrain CMD --help --------------------------------------------------------------------------------------------

def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_key_with_type_and_default(command, capsys):
    out = _help(command, capsys)
    lines = out.splitlines()
    registry.get(command)
    for section, cls in config.config_sections(command):
        assert f"{section}:" in lines
        for f in describe_fields(cls, section):
            line = next((ln for ln in lines if ln.startswith(f"  {f.key} ")), None)
            assert line is not None, f"{f.key} missing from `posttrain {command} --help`"
            assert f" {f.type} " in line and f" {f.default}" in line


def test_help_lines_fit_the_width_and_keep_docs_readable():
    registry.get("dpo")
    text = help_epilog("dpo", width=100)
    rows = [ln for ln in text.splitlines() if ln.startswith("  algo.")]
    assert all(len(ln) <= 100 for ln in rows)
    assert any(ln.startswith("  algo.beta") and "β of the implicit reward" in ln for ln in rows)
    cut = next(ln for ln in rows if ln.startswith("  algo.loss_type"))
    assert cut.endswith("…") and "dpo | ipo" in cut  # too long for 100 columns: cut at a word, marked


def test_help_in_a_narrow_terminal_puts_docs_under_their_keys():
    registry.get("sft")
    lines = help_epilog("sft", width=80).splitlines()
    assert all(len(ln) <= 80 for ln in lines)
    i = next(i for i, ln in enumerate(lines) if ln.startswith("  algo.use_chat_template"))
    assert lines[i + 1].startswith("      prompt/completion records")


def test_help_names_renamed_keys(monkeypatch):
    monkeypatch.setitem(config.RENAMED_KEYS, "algo.chat_template", "algo.use_chat_template")
    monkeypatch.setitem(config.RENAMED_KEYS, "algo.gone", "algo.not_in_sft")
    registry.get("sft")
    text = help_epilog("sft")
    assert "algo.chat_template -> algo.use_chat_template" in text
    assert "algo.gone" not in text  # only the renames into this command's keys


def test_top_level_help_imports_no_torch():
    code = ("import sys\nfrom posttrain.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'posttrain --help imported torch'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "config" in result.stdout and "eval" in result.stdout


# ---- posttrain config CMD --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_config_prints_yaml_that_the_command_reads_back(command, capsys, tmp_path):
    assert main(["config", command]) == 0
    text = capsys.readouterr().out
    tree = yaml.safe_load(text)
    assert "command" not in tree  # load_config ignores it: the command line picks the command
    path = tmp_path / f"{command}.yaml"
    path.write_text(text)
    args = build_parser(command).parse_args([command, str(path)])  # what `posttrain CMD FILE` validates
    assert config_from_args(command, args) == load_config(command)
    edited = text.replace("  max_steps: 100\n", "  max_steps: 3\n")
    path.write_text(edited)
    assert load_config(command, str(path)).train.max_steps == 3


def test_config_yaml_carries_the_docs_as_comments():
    registry.get("dpo")
    text = default_yaml("dpo", registry.get("dpo").help)
    assert text.startswith("# posttrain dpo: DPO family")
    assert "  loss_type: dpo  # dpo | ipo | robust | cdpo | hinge | simpo | orpo" in text
    assert "  lora:\n    enabled: false\n" in text  # nested section indented under model
    # a doc too long for its line goes above the key, wrapped
    lines = text.splitlines()
    i = lines.index("  share_prompt: true")
    assert lines[i - 1].startswith("  # ") and "chosen and rejected in one row" in lines[i - 2]
    assert all(len(ln) <= 120 for ln in lines)


def test_config_refuses_an_unknown_command(capsys):
    with pytest.raises(SystemExit):
        main(["config", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_command_whose_own_code_fails_to_import_is_a_bug_not_unavailable(monkeypatch):
    """Only a missing third-party dependency makes a command "not available in this build"; an ImportError raised
    by posttrain's own modules surfaces as the bug it is."""
    from posttrain import cli

    monkeypatch.setattr(cli, "EXTRA_COMMANDS", [("broken", "posttrain.no_such_module:add_arguments", "x")])
    with pytest.raises(ModuleNotFoundError, match="posttrain.no_such_module"):
        cli.build_parser("broken")
    monkeypatch.setattr(cli, "EXTRA_COMMANDS", [("optional", "some_missing_package_xyz:add_arguments", "x")])
    args = cli.build_parser("optional").parse_args(["optional"])
    assert "some_missing_package_xyz" in args.unavailable

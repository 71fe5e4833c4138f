import logging
from typing import Optional

import pytest

import posttrain.config as config
from posttrain.config import ConfigError, LoraConfig, _coerce, build, load_config, save_config
import posttrain.train.sft  # noqa: F401  registers the sft algo config


def test_precedence_file_flags_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  max_steps: 7\nmodel:\n  name_or_path: a\n")
    cfg = load_config("sft", str(path), ["train.lr=0.3", "model.lora.enabled=true", "model.lora.target_modules=[q_proj]"],
                      {"model.name_or_path": "b", "train.lr": 0.2})
    assert cfg.train.lr == 0.3 and cfg.train.max_steps == 7 and cfg.model.name_or_path == "b"
    assert cfg.model.lora.enabled is True and cfg.model.lora.target_modules == ["q_proj"]
    assert cfg.algo.use_chat_template is True
    save_config(cfg, tmp_path / "run")
    assert "lr: 0.3" in (tmp_path / "run" / "config.yaml").read_text()


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rat'|did you mean"):
        load_config("sft", None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"'train.max_step'.*did you mean 'max_steps'"):
        load_config("sft", None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"'algo.use_chat_templte'.*use_chat_template"):
        load_config("sft", None, ["algo.use_chat_templte=false"])


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"train.max_steps: expected int"):
        load_config("sft", None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"key=value"):
        load_config("sft", None, ["train.lr"])


# ---- coercions: one test per branch of config._coerce ------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("1", True), ("true", True), ("Yes", True), ("ON", True),
                                           ("0", False), ("false", False), ("No", False), ("off", False)])
def test_bool_from_strings(text, expected):
    assert _coerce(text, bool, "k") is expected


def test_bool_from_yaml_and_bad_strings():
    assert _coerce(True, bool, "k") is True and _coerce(0, bool, "k") is False
    with pytest.raises(ConfigError, match=r"model.lora.enabled: expected true/false, got 'maybe'"):
        load_config("sft", None, ["model.lora.enabled=maybe"])


def test_int_from_int_strings_and_whole_floats():
    assert _coerce("3", int, "k") == 3 and _coerce("3.0", int, "k") == 3 and _coerce(3.0, int, "k") == 3
    assert load_config("sft", None, ["train.max_steps=1e3"]).train.max_steps == 1000  # YAML reads 1e3 as a string
    with pytest.raises(ConfigError, match=r"k: expected int, got '3.5'"):
        _coerce("3.5", int, "k")


def test_float_from_strings():
    assert load_config("sft", None, ["train.lr=1e-5"]).train.lr == 1e-5  # YAML 1.1: "1e-5" is a string
    assert _coerce("0.5", float, "k") == 0.5 and _coerce(2, float, "k") == 2.0
    assert isinstance(_coerce(2, float, "k"), float)


def test_list_from_comma_text_yaml_text_and_yaml_lists():
    assert _coerce("a,b", list[str], "k") == ["a", "b"]
    assert _coerce("a,,b,", list[str], "k") == ["a", "b"]  # empty items dropped
    assert _coerce("[1, 2]", list[float], "k") == [1.0, 2.0]
    assert _coerce([1, "2"], list[int], "k") == [1, 2]
    assert _coerce("1,2", tuple[int, ...], "k") == (1, 2)
    lora = load_config("sft", None, ["model.lora.target_modules=q_proj,v_proj"]).model.lora
    assert lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"k: expected a list, got 3"):
        _coerce(3, list[str], "k")


@pytest.mark.parametrize("value", [None, "null", "None", "NULL", "none"])
def test_optional_from_none_and_null(value):
    assert _coerce(value, Optional[str], "k") is None
    assert _coerce(value, str | None, "k") is None


def test_optional_keeps_other_values_and_coerces_them():
    assert _coerce("bf16", str | None, "k") == "bf16" and _coerce("2", Optional[float], "k") == 2.0
    assert load_config("sft", None, ["model.frozen_dtype=bf16"]).model.frozen_dtype == "bf16"


def test_nested_dataclass_from_a_mapping():
    lora = _coerce({"r": "8", "enabled": "yes"}, LoraConfig, "model.lora")
    assert lora == LoraConfig(enabled=True, r=8)
    with pytest.raises(ConfigError, match=r"unknown config key 'model.lora.rr' \(did you mean 'r'\?\)"):
        _coerce({"rr": 8}, LoraConfig, "model.lora")


def test_str_from_scalars_and_dict_from_mappings():
    assert _coerce(3, str, "k") == "3" and _coerce("x", str, "k") == "x"
    assert _coerce({"a": 1}, dict, "k") == {"a": 1}
    with pytest.raises(ConfigError, match=r"k: expected a mapping, got 3"):
        _coerce(3, dict, "k")


@pytest.mark.parametrize("override,message", [
    ("train.lr=[1, 2]", r"train.lr: expected float, got \[1, 2\]"),
    ("model.name_or_path=[a, b]", r"model.name_or_path: expected str, got \['a', 'b'\]"),
    ("model.lora.enabled={a: 1}", r"model.lora.enabled: expected bool, got \{'a': 1\}"),
    ("model.lora=3", r"model.lora: expected a mapping, got 3"),
    ("model.lora.r=many", r"model.lora.r: expected int, got 'many'"),
    ("train.lr=[1, 2", r"override 'train.lr=\[1, 2': not valid YAML"),
])
def test_bad_values_name_the_key_for_every_kind(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("sft", None, [override])


# ---- errors of files and overrides --------------------------------------------------------------------------------

def test_a_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- lr\n")
    with pytest.raises(ConfigError, match=r"list.yaml: the config file must be a YAML mapping"):
        load_config("sft", str(path))
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config("sft", str(path))


def test_an_override_without_equals():
    with pytest.raises(ConfigError, match=r"override 'train.lr' must look like key=value"):
        load_config("sft", None, ["train.lr"])


def test_a_dotted_path_through_a_value_that_is_not_a_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"override 'train.lr.x': 'lr' is not a section"):
        load_config("sft", str(path), ["train.lr.x=1"])
    with pytest.raises(ConfigError, match=r"'train' is not a section"):
        load_config("sft", None, ["train=3", "train.lr=1"])


def test_a_command_line_command_key_is_ignored_in_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("command: dpo\ntrain:\n  max_steps: 4\n")
    cfg = load_config("sft", str(path))
    assert cfg.command == "sft" and cfg.train.max_steps == 4


# ---- suggestions over every section ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command,override,suggestion", [
    ("dpo", "loss_type=ipo", "algo.loss_type"),  # a key without its section
    ("sft", "train.save_step=3", "save_every"),  # plain difflib picks max_steps
    ("sft", "data.seed=1", "train.seed"),  # the right name in the wrong section
    ("sft", "model.lora_r=8", "model.lora.r"),  # by path
    ("sft", "lora.enabled=true", "model.lora"),
    ("dpo", "algo.ref=x", "ref_model"),
])
def test_unknown_keys_suggest_the_closest_key_of_any_section(command, override, suggestion):
    import posttrain.train.dpo  # noqa: F401  registers the dpo section

    with pytest.raises(ConfigError, match=rf"did you mean '{suggestion}'\?"):
        load_config(command, None, [override])


def test_no_suggestion_when_nothing_is_close():
    with pytest.raises(ConfigError) as err:
        load_config("sft", None, ["train.foo=1"])  # not 'train' (the section the typo is in)
    assert "did you mean" not in str(err.value)


def test_build_alone_suggests_within_its_dataclass():
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.enabeld' \(did you mean 'enabled'\?\)"):
        build(LoraConfig, {"enabeld": True}, "lora")


# ---- renamed keys ---------------------------------------------------------------------------------------------------

@pytest.fixture
def rename():
    """config.rename_key, its registrations undone after the test."""
    saved = dict(config.RENAMED_KEYS)
    yield config.rename_key
    config.RENAMED_KEYS.clear()
    config.RENAMED_KEYS.update(saved)


def _deprecations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "deprecated" in r.getMessage()]


def test_an_old_algo_key_works_with_one_deprecation_line(rename, tmp_path, caplog):
    rename("algo.chat_template", "algo.use_chat_template")
    path = tmp_path / "old.yaml"
    path.write_text("algo:\n  chat_template: false\n")
    with caplog.at_level(logging.WARNING, logger="posttrain.config"):
        from_file = load_config("sft", str(path), ["algo.chat_template=false"])
    assert from_file.algo.use_chat_template is False
    assert _deprecations(caplog) == ["config key 'algo.chat_template' is deprecated; use 'algo.use_chat_template' "
                                     "(the old name goes in the next release)"]
    caplog.clear()
    assert load_config("sft", None, ["algo.use_chat_template=false"]).algo.use_chat_template is False
    assert _deprecations(caplog) == []


def test_a_renamed_subsection_moves_in_files_and_overrides(rename, tmp_path, caplog):
    rename("model.adapter", "model.lora")
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  adapter:\n    enabled: true\n    r: 4\n")
    with caplog.at_level(logging.WARNING, logger="posttrain.config"):
        cfg = load_config("sft", str(path), ["model.adapter.alpha=8"])
    assert (cfg.model.lora.enabled, cfg.model.lora.r, cfg.model.lora.alpha) == (True, 4, 8)
    assert _deprecations(caplog) == ["config key 'model.adapter' is deprecated; use 'model.lora' "
                                     "(the old name goes in the next release)"]


def test_renames_across_sections_in_chains_and_inside_renamed_sections(rename):
    import posttrain.train.dpo  # noqa: F401

    rename("train.reference", "algo.ref_model")  # another section
    assert load_config("dpo", None, ["train.reference=ckpt"]).algo.ref_model == "ckpt"
    rename("model.peft", "model.adapter")
    rename("model.adapter", "model.lora")  # a chain: peft -> adapter -> lora
    rename("model.lora.rank", "model.lora.r")  # a field inside the renamed section
    cfg = load_config("sft", None, ["model.peft.rank=2", "model.adapter.alpha=3"])
    assert (cfg.model.lora.r, cfg.model.lora.alpha) == (2, 3)


def test_old_and_new_name_together_in_a_file_is_an_error(rename, tmp_path):
    rename("algo.chat_template", "algo.use_chat_template")
    path = tmp_path / "both.yaml"
    path.write_text("algo:\n  chat_template: false\n  use_chat_template: true\n")
    with pytest.raises(ConfigError, match=r"'algo.chat_template' and 'algo.use_chat_template' are both set"):
        load_config("sft", str(path))


def test_flags_follow_renames_silently(rename, caplog):
    rename("algo.chat_template", "algo.use_chat_template")
    with caplog.at_level(logging.WARNING, logger="posttrain.config"):
        cfg = load_config("sft", None, [], {"algo.chat_template": False})  # a flag table not updated yet
    assert cfg.algo.use_chat_template is False and _deprecations(caplog) == []


def test_rename_key_refuses_conflicts(rename):
    rename("algo.a", "algo.b")
    rename("algo.a", "algo.b")  # the same rename again (a module imported twice)
    with pytest.raises(ValueError, match=r"already renamed to 'algo.b'"):
        rename("algo.a", "algo.c")
    with pytest.raises(ValueError, match=r"renamed to itself"):
        rename("algo.x", "algo.x")


def test_flat_online_keys_of_the_last_release_still_load(caplog):
    """algo.temperature, algo.rewards, algo.beta ... moved into sections: the old names give the same config, with
    one deprecation line each naming the new key; DPO's own algo.beta is not renamed."""
    import logging

    import posttrain.train.dpo  # noqa: F401  (registers the commands)
    import posttrain.train.grpo  # noqa: F401
    from posttrain.config import load_config

    old = ["algo.temperature=0.7", "algo.rewards=[format]", "algo.beta=0.04", "algo.kl_in=reward", "algo.ref_model=r"]
    new = ["algo.sampling.temperature=0.7", "algo.reward.functions=[format]", "algo.kl.beta=0.04",
           "algo.kl.placement=reward", "algo.reference.model=r"]
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        assert load_config("grpo", None, old) == load_config("grpo", None, new)
    lines = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(lines) == 5 and "use 'algo.kl.placement'" in " ".join(lines)
    assert load_config("dpo", None, ["algo.beta=0.3"]).algo.beta == 0.3

import pytest

from posttrain.config import ConfigError, load_config, save_config
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

"""Adding an algorithm is one decorated class in one file: the command, its config section, its keys in --help and
its run on the one loop all come from `@algorithm`. Every command of the package is found without an import."""

from dataclasses import dataclass

import pytest

from posttrain.metrics import read_metrics
from posttrain.train import registry
from tiny import addition_sft_rows, run_config, write_jsonl


def test_every_command_is_discovered_from_the_source():
    found = registry.discover()
    assert {"sft", "rm", "dpo", "kto", "ppo", "grpo", "online-dpo", "overopt"} <= set(found)
    assert found["grpo"][0] == "posttrain.train.grpo" and "GRPO" in found["grpo"][1]
    for name in found:
        spec = registry.get(name)
        assert spec.name == name and (spec.cls is not None) != (spec.runner is not None)


def test_a_new_algorithm_is_one_decorated_class(tmp_path, tiny_dir):
    from posttrain.train.sft import SFT

    @dataclass
    class HalfLRConfig:
        use_chat_template: bool = True
        loss_agg: str = "token-mean"
        scale: float = 0.5  # the loss is scaled by this (a trivial variant of SFT)

    @registry.algorithm("test-scaled-sft", config=HalfLRConfig, help="SFT with a scaled loss (a test)")
    class ScaledSFT(SFT):
        def loss(self, micro, totals):
            out = super().loss(micro, totals)
            return type(out)(out.loss * self.cfg.algo.scale, out.metrics)

    try:
        data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(24))
        cfg = run_config("test-scaled-sft", tmp_path / "run", tiny_dir, data, "train.max_steps=2", "algo.scale=0.25")
        assert cfg.algo.scale == 0.25  # its section parses and validates like the built-in ones
        registry.run(cfg)
        rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r and not r.get("final")]
        assert len(rows) == 2 and (tmp_path / "run" / "final" / "config.json").exists()
        with pytest.raises(Exception, match="did you mean 'scale'"):
            run_config("test-scaled-sft", tmp_path / "other", tiny_dir, data, "algo.scael=1")
    finally:
        from posttrain.config import ALGO_SECTIONS

        registry.ALGORITHMS.pop("test-scaled-sft")
        ALGO_SECTIONS.pop("test-scaled-sft")

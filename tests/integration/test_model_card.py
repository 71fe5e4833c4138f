"""final/README.md: a Hugging Face model card that names the run's base model, data, algorithm, settings, its final
held-out metrics (the last eval row of metrics.jsonl) and the command that reproduces it."""

import yaml

from posttrain.metrics import read_metrics
from posttrain.train.model_card import BUNDLED_HUB_ID, base_model, render_card
from posttrain.train.registry import run
from tiny import addition_sft_rows, run_config, sum_pair_rows, write_jsonl


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


def test_sft_then_dpo_cards_name_base_model_metrics_and_command(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(48))
    run(run_config("sft", tmp_path / "sft", tiny_dir, data, "train.max_steps=3", "train.lr=1e-3"))
    card = (tmp_path / "sft" / "final" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == tiny_dir and meta["library_name"] == "posttrain"
    assert meta["tags"] == ["posttrain", "sft"] and meta["pipeline_tag"] == "text-generation"
    last_eval = [r for r in read_metrics(tmp_path / "sft") if any(k.startswith("eval/") for k in r)][-1]
    assert last_eval["final"] and f"| eval/loss | {last_eval['eval/loss']:.4g} |" in card
    assert f"Final evaluation, step {last_eval['step']}" in card and f"on **{data}**" in card
    assert "- `train.lr`: 0.001" in card and "- `train.max_steps`: 3" in card
    assert f"posttrain sft {(tmp_path / 'sft' / 'config.yaml').resolve()} train.output_dir=NEW_DIR" in card

    # a DPO run started from that model: its card names it as the base, and where it came from
    pairs = write_jsonl(tmp_path / "pairs.jsonl", sum_pair_rows(24))
    run(run_config("dpo", tmp_path / "dpo", str(tmp_path / "sft" / "final"), pairs, "train.max_steps=2",
                   "train.batch_size=4", "algo.beta=0.25"))
    card = (tmp_path / "dpo" / "final" / "README.md").read_text()
    assert _front_matter(card)["base_model"] == str(tmp_path / "sft" / "final")
    assert f"(itself trained from {tiny_dir})" in card and "- `algo.beta`: 0.25" in card
    assert "- `algo.loss_type`: dpo" in card
    last_eval = [r for r in read_metrics(tmp_path / "dpo") if any(k.startswith("eval/") for k in r)][-1]
    for key, value in last_eval.items():
        if key.startswith("eval/"):
            assert f"| {key} | {value:.4g} |" in card


def test_card_parsed_by_huggingface_hub_and_bundled_alias(tmp_path):
    from huggingface_hub import ModelCard

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"command": "rm", "model": {"name_or_path": "smollm2"},
                                                         "data": {"path": "task:arithmetic"}, "train": {"lr": 3e-5}}))
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 1, "eval/accuracy": 0.625, "final": true}\n')
    (run_dir / "command.txt").write_text("posttrain rm model.name_or_path=smollm2\n")
    (run_dir / "final").mkdir()
    (run_dir / "final" / "README.md").write_text(render_card(run_dir))
    card = ModelCard.load(run_dir / "final" / "README.md")
    assert card.data.base_model == BUNDLED_HUB_ID and card.data.library_name == "posttrain"
    assert "reward-model" in card.data.tags and "| eval/accuracy | 0.625 |" in card.text
    assert "posttrain rm model.name_or_path=smollm2" in card.text  # the pipeline's line comes first
    assert base_model("SmolLM2")[0] == BUNDLED_HUB_ID and base_model("org/model") == ("org/model", None)

"""DPO's implicit reward model (algo.reward.model_kind=implicit) scores a DPO run's pairs exactly as the run
itself scored them: its held-out rewards β·log πθ/π_ref, read back from its config (β, reference), with
multi-turn prompts (a system turn) templated from the messages rather than from flattened text."""

import pytest

from posttrain.metrics import read_metrics
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.rewards.model_rewards import ImplicitReward, dpo_run_settings
from posttrain.train.registry import run
from tiny import run_config, write_jsonl


def _pairs(n=16):
    rows = []
    for i in range(n):
        a, b = 3 * i + 1, 7 * i + 2
        prompt = [{"role": "system", "content": f"add, case {i % 3}"}, {"role": "user", "content": f"{a}+{b}="}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"ok {a + b}"}],
                     "rejected": [{"role": "assistant", "content": f"no {a + b + 1 + i % 4}"}]})
    return rows


def test_implicit_reward_reproduces_the_dpo_runs_own_held_out_rewards(tmp_path, tiny_dir):
    pairs = _pairs()
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run(run_config("dpo", tmp_path / "dpo", tiny_dir, path, "train.max_steps=4", "train.lr=1e-2",
                       "train.batch_size=4", "train.schedule=constant", "algo.beta=0.3", f"data.eval_path={path}",
                       f"data.num_eval_examples={len(pairs)}"))
    final = [r for r in read_metrics(tmp_path / "dpo") if r.get("final")][-1]
    settings = dpo_run_settings(str(tmp_path / "dpo" / "final"))
    assert settings["beta"] == 0.3 and settings["ref"] == tiny_dir and settings["use_chat"] is True

    tok = load_tokenizer(tiny_dir)
    cfg = run_config("dpo", tmp_path / "unused", tiny_dir, path).model
    fn = ImplicitReward(load_causal_lm(cfg, str(tmp_path / "dpo" / "final"), trainable=False),
                        load_causal_lm(cfg, tiny_dir, trainable=False), tok, settings["beta"], batch_size=5)
    flat = ["\n".join(m["content"] for m in p["prompt"]) for p in pairs]
    raw = [p["prompt"] for p in pairs]
    chosen = fn(flat, [p["chosen"][0]["content"] for p in pairs], raw_prompt=raw)
    rejected = fn(flat, [p["rejected"][0]["content"] for p in pairs], raw_prompt=raw)
    assert sum(chosen) / len(chosen) == pytest.approx(final["eval/rewards/chosen"], abs=1e-4)
    assert sum(rejected) / len(rejected) == pytest.approx(final["eval/rewards/rejected"], abs=1e-4)
    assert final["eval/rewards/margins"] > 0.05  # trained: the pairs are told apart, so the check has teeth
    unthreaded = fn(flat, [p["chosen"][0]["content"] for p in pairs])  # flattened text: a different prompt
    assert max(abs(x - y) for x, y in zip(chosen, unthreaded)) > 1e-3


def test_run_settings_refuse_a_reference_free_loss(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("algo:\n  loss_type: simpo\n  beta: 2.0\nmodel:\n  name_or_path: m\n")
    with pytest.raises(ValueError, match="no reference model"):
        dpo_run_settings(str(tmp_path / "run" / "final"))
    assert dpo_run_settings(str(tmp_path / "elsewhere" / "model")) == {}

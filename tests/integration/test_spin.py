"""Self-play fine-tuning (posttrain spin) on a tiny Llama: two iterations run, each on pairs of the data's answer
against the previous iteration's own answers, and log their held-out figures; a rerun resumes without training."""

import json

from posttrain.data.formats import Record
from posttrain.metrics import read_metrics
from posttrain.train.registry import run
from posttrain.train.spin import self_play_pairs, split_sft_record
from tiny import addition_sft_rows, prompt_rows, run_config, write_jsonl


def test_self_play_pairs_put_the_data_answer_first_and_drop_equal_answers():
    convo = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "1+1"},
                          {"role": "assistant", "content": "2"}]}
    plain = {"prompt": "2+2", "completion": "4"}
    assert split_sft_record(convo) == (convo["messages"][:2], [convo["messages"][2]], "2")
    assert split_sft_record(plain) == ("2+2", "4", "4")
    records = [Record(convo, "a:1"), Record(plain, "a:2"), Record(plain, "a:3"), Record(plain, "a:4")]
    rows, dropped = self_play_pairs(records, ["3", "4 ", "5", " \n"])
    assert dropped == {"identical": 1, "empty": 1}  # "4 " is the data's answer; a blank answer is no completion
    assert rows == [{"prompt": convo["messages"][:2], "chosen": [convo["messages"][2]],
                     "rejected": [{"role": "assistant", "content": "3"}]},
                    {"prompt": "2+2", "chosen": "4", "rejected": "5"}]


def test_two_spin_iterations_run_log_and_resume(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(40))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(8))
    args = ("algo.iterations=2", "algo.max_new_tokens=4", "algo.temperature=1.0", "algo.beta=0.1", "train.max_steps=6", "train.lr=5e-3",
            "train.batch_size=8", "train.eval_every=0", f"algo.eval_data={prompts}",
            "algo.eval_rewards=[tiny:vowel_reward]", "data.num_eval_examples=8")
    cfg = run_config("spin", tmp_path / "run", tiny_dir, data, *args)
    run(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0.0 <= r["heldout/exact_match"] <= 1.0 and "eval/vowel_reward/mean_reward" in r
    for k, r in zip((1, 2), rows[1:]):
        pairs = [json.loads(line) for line in (tmp_path / "run" / f"iter-{k}" / "pairs.jsonl").read_text().splitlines()]
        assert r["spin/pairs"] == len(pairs) > 0 and r["spin/identical_dropped"] + r["spin/empty_dropped"] + len(pairs) == 36  # 40 - 10 % held out
        assert r["train/rewards/accuracies"] > 0.5  # DPO learned to prefer the data's answers over its own
        config = (tmp_path / "run" / f"iter-{k}" / "config.yaml").read_text()
        start = tiny_dir if k == 1 else str(tmp_path / "run" / "iter-1" / "final")
        assert f"name_or_path: {start}" in config  # each iteration starts from (and refers to) the previous model
    second = [json.loads(x) for x in (tmp_path / "run" / "iter-2" / "pairs.jsonl").read_text().splitlines()]
    first = [json.loads(x) for x in (tmp_path / "run" / "iter-1" / "pairs.jsonl").read_text().splitlines()]
    assert [p["rejected"] for p in first] != [p["rejected"] for p in second]  # answers of a different model
    # the data's held-out answers are likelier after self-play than before (DPO need not raise them every round)
    assert min(rows[1]["heldout/answer_logp"], rows[2]["heldout/answer_logp"]) > rows[0]["heldout/answer_logp"] + 0.1
    assert (tmp_path / "run" / "final" / "config.json").exists()
    mtime = (tmp_path / "run" / "iter-1" / "final" / "model.safetensors").stat().st_mtime
    run(cfg)  # finished iterations are not trained again, and measure the same
    again = read_metrics(tmp_path / "run")
    assert (tmp_path / "run" / "iter-1" / "final" / "model.safetensors").stat().st_mtime == mtime
    assert [r["heldout/exact_match"] for r in again] == [r["heldout/exact_match"] for r in rows]

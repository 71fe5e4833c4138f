"""On-policy distillation on tiny Llamas: a teacher trained by GRPO on a trivial reward is distilled into a fresh
student, which moves towards it (lower reverse KL) and so earns the reward it never trained on."""

import pytest

from posttrain.metrics import read_metrics
from posttrain.train.registry import run
from tiny import prompt_rows, run_config, tiny_model_dir, write_jsonl

SAMPLING = ["algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=6",
            "algo.sampling.prompts_per_step=4", "algo.sampling.eval_max_new_tokens=6", "data.num_eval_examples=8",
            "train.batch_size=32", "train.schedule=constant"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny policy GRPO-trained until it emits vowels (reward > 0.9), and the data it saw."""
    root = tmp_path_factory.mktemp("teacher")
    prompts = write_jsonl(root / "prompts.jsonl", prompt_rows(48))
    base = tiny_model_dir(root / "base")
    cfg = run_config("grpo", root / "run", base, prompts, *SAMPLING, "algo.sampling.num_generations=8",
                     "train.max_steps=30", "train.lr=1e-2", "train.eval_every=0")
    run(cfg)
    rows = [r for r in read_metrics(root / "run") if "reward" in r]
    assert max(r["reward"] for r in rows[-5:]) > 0.9
    return str(root / "run" / "final"), prompts, base


def _rows(run_dir):
    return [r for r in read_metrics(run_dir) if "loss" in r]


def test_reverse_kl_distillation_moves_the_student_to_the_teacher(tmp_path, teacher):
    teacher_dir, prompts, base = teacher
    cfg = run_config("distill", tmp_path / "run", base, prompts, *SAMPLING, f"algo.teacher={teacher_dir}",
                     "train.max_steps=25", "train.lr=1e-2", "train.eval_every=0")
    run(cfg)
    rows = _rows(tmp_path / "run")
    first, last = rows[0], rows[-3:]
    assert first["reward"] < 0.5  # the student starts where the teacher's base did
    assert max(r["reward"] for r in last) > first["reward"] + 0.4  # it earns a reward it never saw
    kl_last = sum(r["distill/reverse_kl_k1"] for r in last) / len(last)
    assert kl_last < 0.5 * first["distill/reverse_kl_k1"]
    assert rows[-1]["models_in_memory"] == 2.0  # student + frozen teacher


def test_jsd_distillation_lowers_the_divergence(tmp_path, teacher):
    teacher_dir, prompts, base = teacher
    cfg = run_config("distill", tmp_path / "run", base, prompts, *SAMPLING, f"algo.teacher={teacher_dir}",
                     "algo.loss=jsd", "algo.beta=0.5", "algo.sampling.num_generations=2", "train.max_steps=12",
                     "train.lr=1e-2", "train.eval_every=0")
    run(cfg)
    rows = _rows(tmp_path / "run")
    assert sum(r["distill/jsd_token_mean"] for r in rows[-3:]) / 3 < 0.5 * rows[0]["distill/jsd_token_mean"]


def test_distill_needs_a_teacher_with_the_same_tokenizer(tmp_path, teacher):
    _, prompts, base = teacher
    from posttrain.train.distill import Distill

    with pytest.raises(ValueError, match="algo.teacher"):
        Distill(run_config("distill", tmp_path / "a", base, prompts, *SAMPLING))
    other = tmp_path / "other"
    tiny_model_dir(other, pad_is_eos=False)  # same characters, another pad token: the vocabularies differ
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="another tokenizer"):
        Distill(run_config("distill", tmp_path / "b", base, prompts, *SAMPLING, f"algo.teacher={other}"))

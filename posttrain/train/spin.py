"""`posttrain spin`: self-play fine-tuning (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models
to Strong Language Models", SPIN).

For iterations k = 1 .. K, with p_0 the starting model:
  1. p_{k-1} answers the prompts of the SFT data; its answer becomes the pair's "rejected", the SFT answer its
     "chosen" (a pair whose two answers are equal teaches nothing, and a blank answer is no valid
     completion: both are dropped and counted);
  2. a DPO-family loss (SPIN's eq. 4.7 with the logistic loss is DPO's, with p_{k-1} as the reference) trains
     p_{k-1} into p_k on those pairs, on the one loop (`posttrain dpo` in-process, its run in `iter-k/`);
  3. p_k is measured on held-out data: how often its greedy answer is the SFT answer (SPIN's fixed point is
     p_theta = p_data), and the held-out rewards where a verifier applies (`algo.eval_rewards`).
The run directory holds `iter-k/` (pairs.jsonl and the DPO run), `metrics.jsonl` with one row per iteration
(step k; step 0 is the starting model) and `final/`, the last iteration's model. A finished iteration (its
final/ exists) is not run again, so an interrupted SPIN resumes at the iteration it was in.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from posttrain.algos.preference import PreferenceLossConfig
from posttrain.config import RunConfig
from posttrain.train.registry import command

log = logging.getLogger("posttrain")


@dataclass
class SPINConfig(PreferenceLossConfig):
    iterations: int = 2  # K: rounds of "the model answers, then learns to prefer the data's answer"
    temperature: float = 0.0  # of the model's answers: 0 = greedy (the paper's "generate"), > 0 = one sample
    max_new_tokens: int = 64  # of the model's answers (and the held-out ones)
    generation_batch_size: int = 16  # prompts per generation batch
    eval_data: str = ""  # held-out prompts with reward columns (default: a task:'s test prompts; else none)
    eval_rewards: list[str] = field(default_factory=list)  # rewards of the held-out answers, e.g. [numeric]
    use_chat_template: bool = True


def split_sft_record(data: dict) -> tuple[object, object, str]:
    """(prompt, chosen, chosen text) of an SFT record: the conversation up to its last assistant message and
    that message, or `prompt` and `completion`."""
    if "messages" in data:
        messages = data["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], [messages[last]], messages[last]["content"]
    completion = data["completion"]
    text = completion if isinstance(completion, str) else completion[-1]["content"]
    return data["prompt"], completion, text


def self_play_pairs(records, answers: list[str]) -> tuple[list[dict], dict]:
    """Preference rows {prompt, chosen: the data's answer, rejected: the model's}, and the counts of those dropped:
    `identical` (the model already gave the data's answer) and `empty` (a blank answer, which no preference file
    may hold)."""
    rows, dropped = [], {"identical": 0, "empty": 0}
    for record, answer in zip(records, answers):
        prompt, chosen, chosen_text = split_sft_record(record.data)
        if not answer.strip() or answer.strip() == chosen_text.strip():
            dropped["empty" if not answer.strip() else "identical"] += 1
            continue
        rejected = [{"role": "assistant", "content": answer}] if isinstance(chosen, list) else answer
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows, dropped


def _load(model_path: str, device):
    """(model, tokenizer) of one iteration's model, loaded once for its measurement and the next pairs."""
    from posttrain.models.loading import load_inference_lm, load_tokenizer

    return load_inference_lm(model_path, device), load_tokenizer(model_path)


def _answers(lm, records, a: SPINConfig, seed: int) -> list[str]:
    """One answer of the model per record's prompt."""
    from posttrain.data.formats import Record
    from posttrain.evaluate import GenEvalConfig, generate_answers

    prompts = [Record({"prompt": split_sft_record(r.data)[0] or ""}, r.where) for r in records]
    gen = GenEvalConfig(max_new_tokens=a.max_new_tokens, batch_size=a.generation_batch_size, seed=seed,
                        temperature=a.temperature or 1.0, greedy=a.temperature == 0)
    return [group[0] for group in generate_answers(*lm, prompts, gen)]


def _measure(lm, held, prompt_records, a: SPINConfig, seed: int) -> dict:
    """Held-out figures of one model: exact-match rate with the data's answers, and the held-out rewards."""
    from posttrain.evaluate import GenEvalConfig, evaluate_policy, load_reward_fns

    out: dict = {}
    if held:
        out["heldout/answer_logp"] = _answer_logp(lm, held, a)
        answers = _answers(lm, held, a, seed)
        out["heldout/exact_match"] = sum(x.strip() == split_sft_record(r.data)[2].strip()
                                         for r, x in zip(held, answers)) / len(held)
    if prompt_records and a.eval_rewards:
        gen = GenEvalConfig(max_new_tokens=a.max_new_tokens, batch_size=a.generation_batch_size, seed=seed)
        summary, _ = evaluate_policy(*lm, prompt_records, load_reward_fns(a.eval_rewards), gen)
        out.update({f"eval/{k}": v for k, v in summary.items() if isinstance(v, float)})
    return out


@torch.no_grad()
def _answer_logp(lm, records, a: SPINConfig) -> float:
    """Mean log-prob per token of the data's answers under the model (nats; rises as p_theta nears p_data)."""
    from posttrain.data.chat import encode_prompt_completion
    from posttrain.data.collate import pad_encoded
    from posttrain.devices import module_device, to_device
    from posttrain.models.forward import sequence_logps

    model, tokenizer = lm
    items = [encode_prompt_completion(tokenizer, *split_sft_record(r.data)[:2], use_chat=a.use_chat_template)
             for r in records]
    total = count = 0.0
    for start in range(0, len(items), a.generation_batch_size):
        batch = pad_encoded(items[start : start + a.generation_batch_size], tokenizer.pad_token_id)
        sums, lengths = sequence_logps(model, to_device(batch, module_device(model)))
        total, count = total + float(sums.sum()), count + float(lengths.sum())
    return total / max(count, 1.0)


def dpo_config(cfg: RunConfig, start: str, pairs: Path, out: Path) -> RunConfig:
    """The DPO run of one SPIN iteration: the spin run's model/data/train settings, `start` as policy and
    reference, the pairs as data, the preference-loss settings of `algo`."""
    from posttrain.config import load_config, to_dict
    from posttrain.train import registry

    registry.get("dpo")  # imports posttrain.train.dpo: registers its algo section
    tree = to_dict(cfg)
    flags = {f"{section}.{k}": v for section in ("model", "data", "train") for k, v in tree[section].items()}
    flags.update({"model.name_or_path": start, "data.path": str(pairs), "data.eval_path": None,
                  "train.output_dir": str(out), "train.resume": (out / "checkpoints").exists()})
    flags.update({f"algo.{f.name}": getattr(cfg.algo, f.name) for f in fields(PreferenceLossConfig)})
    flags["algo.use_chat_template"] = cfg.algo.use_chat_template
    return load_config("dpo", None, [], flags)


@command("spin", config=SPINConfig, help="self-play fine-tuning (SPIN): the model's answers become the rejected ones")
def run_spin(cfg: RunConfig) -> dict:
    from posttrain.data.formats import load_dataset_records
    from posttrain.metrics import MetricsLogger, read_metrics
    from posttrain.models.loading import resolve_model_path
    from posttrain.train import common, registry

    a: SPINConfig = cfg.algo
    if a.iterations < 1:
        raise ValueError(f"algo.iterations must be >= 1, got {a.iterations}")
    train, held = common.load_splits(cfg, "sft")
    eval_spec = a.eval_data or (cfg.data.path if cfg.data.path.startswith("task:") else "")
    prompt_records = (load_dataset_records(eval_spec, "prompts", "test", n=cfg.data.num_eval_examples,
                                           seed=cfg.train.seed)[: cfg.data.num_eval_examples] if eval_spec else [])
    out = common.setup_run(cfg)
    device = common.run_device(cfg)
    logger = MetricsLogger(out, tensorboard=cfg.train.tensorboard)
    model = resolve_model_path(cfg.model.name_or_path)
    lm = _load(model, device)
    row = logger.log(0, {"spin/iteration": 0, **_measure(lm, held, prompt_records, a, cfg.train.seed)})
    log.info("spin: start %s", _brief(row))
    for k in range(1, a.iterations + 1):
        it = out / f"iter-{k}"
        if not (it / "final").exists():
            pairs, dropped = self_play_pairs(train, _answers(lm, train, a, cfg.train.seed + k))
            if not pairs:
                raise ValueError(f"spin iteration {k}: no pair to learn from ({dropped['identical']} answers equal "
                                 f"the data's, {dropped['empty']} blank)")
            it.mkdir(parents=True, exist_ok=True)
            (it / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
            (it / "dropped.json").write_text(json.dumps(dropped))
            lm = None  # the DPO run loads its own copy: free this one first
            registry.run(dpo_config(cfg, model, it / "pairs.jsonl", it))
        dropped = json.loads((it / "dropped.json").read_text())
        last = [r for r in read_metrics(it) if "loss" in r][-1]
        trained = {f"train/{key}": last[key] for key in ("loss", "rewards/accuracies", "rewards/margins") if key in last}
        model = str(it / "final")
        lm = _load(model, device)
        measured = _measure(lm, held, prompt_records, a, cfg.train.seed)
        row = logger.log(k, {"spin/iteration": k, "spin/pairs": len(train) - sum(dropped.values()),
                             "spin/identical_dropped": dropped["identical"], "spin/empty_dropped": dropped["empty"],
                             **trained, **measured})
        log.info("spin: iteration %d %s", k, _brief(row))
    logger.close()
    if (out / "final").exists():
        shutil.rmtree(out / "final")
    shutil.copytree(model, out / "final")
    from posttrain.train.model_card import write_model_card

    write_model_card(out)  # SPIN's own card (the copied one describes its last DPO iteration only)
    return row


def _brief(row: dict) -> str:
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "step")

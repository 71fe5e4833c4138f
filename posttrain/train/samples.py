"""`samples.jsonl` of an online run: a few prompts per step, each completion with its scores, advantage and KL.

One line per completion of the first `train.samples_per_step` prompts (groups) of each step's rollout:

    {"step": 3, "group": 0, "prompt": "What is 2+3?", "completion": "5", "rewards": {"numeric": 1.0},
     "reward": 1.0, "advantage": 0.71, "kl": 0.012, "kl_to": "reference", "length": 2, "truncated": false}

- `rewards`: each reward function's score of that completion (NaN, a reward that could not be computed: null);
  `reward`: the total the algorithm trained on (after per-function normalization or an environment's reward).
- `advantage`: the row's advantage (a token-level one, PPO's GAE, averaged over the row's loss tokens); online
  DPO has none (null) and marks the pair's rows instead (`pair`: chosen | rejected).
- `kl`: the row's sequence KL, k1 summed over its loss tokens (nats per completion, as `kl/seq_k1_sum`), of the
  policy that sampled it against the reference (a distillation's teacher: `kl_to` says which); null without one.

The per-function scores come from the batch (`score/<name>`, kept per row by the collector, and re-selected with
the rows by GRPO's dynamic sampling). Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SAMPLES_FILE = "samples.jsonl"


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the JSONL rows of steps up to `step`: on resume, the replayed steps write theirs again."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


class SampleWriter:
    """Writes each step's sample rows of an online algorithm (one with a `collector` and a `batch`); inert otherwise."""

    def __init__(self, algo, out_dir: Path, per_step: int, is_main: bool):
        self.path = Path(out_dir) / SAMPLES_FILE
        self.per_step = per_step
        self.active = is_main and per_step > 0 and getattr(algo, "collector", None) is not None

    def resume(self, step: int) -> None:
        if self.active:
            drop_rows_after(self.path, step)

    def write(self, step: int, algo) -> None:
        batch = getattr(algo, "batch", None)
        if not self.active or batch is None:
            return
        rows = sample_rows(step, batch, self.per_step)
        with open(self.path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def sample_rows(step: int, batch, per_step: int) -> list[dict]:
    """The rows of the first `per_step` groups of `batch` (a RolloutBatch), in row order."""
    from posttrain.data.chat import prompt_text

    groups = sorted(set(batch.group.tolist()))[:per_step]
    chosen = set(groups)
    advantages, (kl, kl_to) = row_advantages(batch), row_kl(batch)
    valid = batch.extra.get("reward_valid")
    pairs = _pair_roles(batch)
    scores = {key.removeprefix("score/"): v for key, v in batch.extra.items() if key.startswith("score/")}
    lengths = batch.loss_mask.sum(-1).tolist()
    rows = []
    for i, g in enumerate(batch.group.tolist()):
        if g not in chosen:
            continue
        prompt = prompt_text(batch.prompts[i])
        row = {"step": step, "group": int(g), "prompt": prompt, "completion": batch.texts[i],
               "rewards": {name: _num(values[i]) for name, values in scores.items()},
               "reward": None if valid is not None and not bool(valid[i]) else _num(batch.rewards[i]),
               "advantage": None if advantages is None else _num(advantages[i]),
               "kl": None if kl is None else _num(kl[i]), "kl_to": kl_to,
               "length": int(lengths[i]), "truncated": bool(batch.truncated[i])}
        if pairs:
            row["pair"] = pairs.get(i)
        rows.append(row)
    return rows


def row_advantages(batch) -> torch.Tensor | None:
    """(N,) advantages: GRPO's per row as they are; PPO's per token averaged over each row's loss tokens; a
    distillation's task advantages; None when the algorithm has none (online DPO)."""
    adv = batch.extra.get("advantages", batch.extra.get("task_advantages"))
    if adv is None:
        return None
    adv = adv.detach().float()
    if adv.dim() == 2:
        mask = batch.loss_mask.float()
        return (adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return adv


def row_kl(batch) -> tuple[torch.Tensor | None, str | None]:
    """(N,) sequence k1 KL of the sampling policy against the reference (or teacher), and which one it is.

    The policy's log-probs: the old-policy pass where one was stored, else the sampler's own (the same policy
    before any update, scored at the same temperature)."""
    ref, kl_to = batch.extra.get("ref_logp"), "reference"
    if ref is None:
        ref, kl_to = batch.extra.get("teacher_logp"), "teacher"
    policy = batch.extra.get("old_logp")
    if policy is None:
        policy = batch.extra.get("sampler_logp")
    if ref is None or policy is None:
        return None, None
    mask = batch.loss_mask.float()
    return ((policy.detach().float() - ref.detach().float()) * mask).sum(-1), kl_to


def _pair_roles(batch) -> dict[int, str]:
    """Online DPO: the rows it paired, as chosen or rejected."""
    roles = {}
    for key in ("chosen", "rejected"):
        for row in batch.extra[key].tolist() if key in batch.extra else []:
            roles[row] = key
    return roles


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


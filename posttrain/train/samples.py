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

The per-function scores are not kept in the rollout batch, so the collector's reward runner is wrapped here by
a recorder that remembers what it returned this step; rows are matched to its calls by (prompt, completion),
which survives GRPO's dynamic sampling (rows re-selected from several rollouts). Only rank 0 writes.
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


class ScoreRecorder:
    """Stands in for a RewardRunner: calls it, and remembers each call's per-function scores by (prompt, completion)."""

    def __init__(self, runner):
        self._runner = runner
        self.scores: dict[tuple[str, str], dict[str, float]] = {}

    def __getattr__(self, name):  # fns, num_workers ...: the runner's own
        return getattr(self._runner, name)

    def __call__(self, prompts, completions, **columns):
        scored = self._runner(prompts, completions, **columns)
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            self.scores[(prompt, completion)] = {name: values[i] for name, values in scored.per_fn.items()}
        return scored

    def take(self) -> dict[tuple[str, str], dict[str, float]]:
        scores, self.scores = self.scores, {}
        return scores


class SampleWriter:
    """Writes each step's sample rows of an online algorithm (one with a `collector` and a `batch`); inert otherwise."""

    def __init__(self, algo, out_dir: Path, per_step: int, is_main: bool):
        self.path = Path(out_dir) / SAMPLES_FILE
        self.per_step = per_step
        collector = getattr(algo, "collector", None)
        self.recorder = None
        if is_main and per_step > 0 and collector is not None and hasattr(collector, "rewards"):
            self.recorder = ScoreRecorder(collector.rewards)
            collector.rewards = self.recorder

    def resume(self, step: int) -> None:
        if self.recorder is not None:
            drop_rows_after(self.path, step)

    def write(self, step: int, algo) -> None:
        if self.recorder is None:
            return
        scores = self.recorder.take()
        batch = getattr(algo, "batch", None)
        if batch is None:
            return
        rows = sample_rows(step, batch, self.per_step, scores)
        with open(self.path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def sample_rows(step: int, batch, per_step: int, scores: dict) -> list[dict]:
    """The rows of the first `per_step` groups of `batch` (a RolloutBatch), in row order."""
    from posttrain.data.chat import prompt_text

    groups = sorted(set(batch.group.tolist()))[:per_step]
    chosen = set(groups)
    advantages, (kl, kl_to) = row_advantages(batch), row_kl(batch)
    valid = batch.extra.get("reward_valid")
    pairs = _pair_roles(batch)
    lengths = batch.loss_mask.sum(-1).tolist()
    rows = []
    for i, g in enumerate(batch.group.tolist()):
        if g not in chosen:
            continue
        prompt = prompt_text(batch.prompts[i])
        row = {"step": step, "group": int(g), "prompt": prompt, "completion": batch.texts[i],
               "rewards": {k: _num(v) for k, v in scores.get((prompt, batch.texts[i]), {}).items()},
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
        for row in batch.extra.get(key, torch.zeros(0, dtype=torch.long)).tolist():
            roles[row] = key
    return roles


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


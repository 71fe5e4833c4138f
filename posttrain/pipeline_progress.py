"""The pipeline's progress line before each stage: which stage, i of n, and an ETA for what is left.

The ETA is rough on purpose: the finished stages' wall time per planned step (`train.max_steps` of each stage,
from its overrides or the pipeline defaults) times the steps left. Steps of different algorithms cost different
amounts (a PPO step samples, scores and trains a critic; an SFT step is one update), so the estimate sharpens as
more kinds of stage finish. Before any stage has finished there is nothing to go by: "ETA: after the first stage".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.report.units import duration

DEFAULT_STEPS = 100  # TrainConfig.max_steps's default, for a stage that names none


@dataclass
class Progress:
    planned: list[tuple[str, int]]  # (stage name, planned steps) in run order
    done: dict[str, float] = field(default_factory=dict)  # stage name -> wall seconds

    def finished(self, name: str, seconds: float) -> None:
        self.done[name] = float(seconds)

    def eta_s(self) -> float | None:
        """Seconds left for the stages not finished, at the finished stages' seconds per planned step."""
        ran = [(n, s) for n, s in self.planned if n in self.done]
        steps_done = sum(s for _, s in ran)
        if not ran or steps_done <= 0:
            return None
        per_step = sum(self.done[n] for n, _ in ran) / steps_done
        return per_step * sum(s for n, s in self.planned if n not in self.done)

    def line(self, name: str, command: str) -> str:
        """'[pipeline] stage 3/6: dpo (dpo, 16 steps) · 4.2 min so far · ETA 12.5 min for 4 stages'."""
        index = next(i for i, (n, _) in enumerate(self.planned, 1) if n == name)
        steps = dict(self.planned)[name]
        left = sum(1 for n, _ in self.planned if n not in self.done)
        eta = self.eta_s()
        eta_text = f"ETA {duration(eta)} for {left} stage{'s' if left != 1 else ''}" if eta is not None \
            else "ETA: after the first stage"
        return (f"[pipeline] stage {index}/{len(self.planned)}: {name} ({command}, {steps} steps) · "
                f"{duration(sum(self.done.values()))} so far · {eta_text}")


def planned_steps(defaults: dict, overrides: dict) -> int:
    steps = overrides.get("train.max_steps", defaults.get("train.max_steps", DEFAULT_STEPS))
    try:
        return max(0, int(steps))
    except (TypeError, ValueError):
        return DEFAULT_STEPS

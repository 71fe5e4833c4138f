"""Failure-mode monitors for online runs: each logged step's metrics in, warnings (with their step) out.

What they watch, with the literature's name for it:
- reward hacking (Gao et al. 2022, over-optimization): the trained-on (proxy) reward keeps rising while the
  held-out gold metric (`eval/<reward>/accuracy`, else `eval/<reward>/mean_reward`) falls from its best value;
- mode collapse: policy entropy, or the distinct-bigram fraction of a rollout, falls below a fraction of its
  first value;
- length explosion: mean completion length grows past a multiple of its first value, or most completions hit
  the length limit;
- KL blow-up: the KL to the reference passes an absolute bound, or jumps by a factor within one step;
- PPO instability: a value-loss spike against its running median, or a clip fraction past a bound.

Baselines are the first values seen (step 1 of this run, or of the resumed run): a monitor compares the policy with
where it started, not with a fixed number that would mean different things on different tasks. Warnings never stop
training; they go to the log, to `warnings.jsonl` in the run directory and to the metrics as `alerts/<kind>`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass
class MonitorConfig:
    enabled: bool = True
    hacking_gold_drop: float = 0.05  # gold below its best by this much (absolute) while proxy is above its level then
    collapse_fraction: float = 0.25  # entropy or distinct-2 below this fraction of its first value
    length_factor: float = 3.0  # mean completion length above this multiple of its first value
    truncated_fraction: float = 0.5  # more completions than this cut at the limit (when fewer were at first)
    kl_max: float = 5.0  # nats per token (the KL estimate the run logs as `kl`)
    kl_jump: float = 10.0  # KL multiplied by more than this in one step (from at least 0.01 nats)
    value_spike: float = 10.0  # value loss above this multiple of its running median
    clip_fraction_max: float = 0.4


@dataclass
class Alert:
    step: int
    kind: str  # reward_hacking | mode_collapse | length_explosion | kl_blowup | ppo_instability
    message: str

    def as_dict(self) -> dict:
        return {"step": self.step, "kind": self.kind, "message": self.message}


def gold_key(metrics: dict) -> str | None:
    """The held-out gold metric among the eval metrics: an accuracy if one is logged, else a mean reward."""
    for suffix in ("/accuracy", "/mean_reward"):
        keys = sorted(k for k in metrics if k.startswith("eval/") and k.endswith(suffix))
        if keys:
            return keys[0]
    return None


class FailureMonitor:
    """Stateful: feed `observe(step, metrics)` every logged step, in order; it returns that step's new alerts.
    An alert of a kind is raised once when its condition starts to hold, and again only after it cleared."""

    def __init__(self, cfg: MonitorConfig | None = None):
        self.cfg = cfg or MonitorConfig()
        self.first: dict[str, float] = {}
        self.previous_kl: float | None = None
        self.value_losses: list[float] = []
        self.best_gold: tuple[float, float] | None = None  # (gold, proxy at that evaluation)
        self.active: set[str] = set()

    def observe(self, step: int, metrics: dict) -> list[Alert]:
        if not self.cfg.enabled:
            return []
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for key in ("entropy", "completions/distinct_2", "completions/mean_length", "completions/truncated_fraction"):
            if key in values:
                self.first.setdefault(key, values[key])
        found = {}
        for check in (self._hacking, self._collapse, self._length, self._kl, self._ppo):
            kind_message = check(values)
            if kind_message:
                found[kind_message[0]] = kind_message[1]
        if gold_key(values) is None and "reward_hacking" in self.active:
            found.setdefault("reward_hacking", "")  # no evaluation at this step: the last verdict stands
        alerts = [Alert(step, kind, message) for kind, message in found.items() if kind not in self.active]
        self.active = set(found)
        return alerts

    def _hacking(self, v: dict):
        key = gold_key(v)
        if key is None or "reward" not in v:
            return None
        gold, proxy = v[key], v["reward"]
        if self.best_gold is None or gold > self.best_gold[0]:
            self.best_gold = (gold, proxy)
            return None
        best, proxy_then = self.best_gold
        if gold < best - self.cfg.hacking_gold_drop and proxy >= proxy_then:
            return "reward_hacking", (f"held-out {key} fell to {gold:.3f} from its best {best:.3f} while the trained "
                                      f"reward rose to {proxy:.3f} (from {proxy_then:.3f})")
        return None

    def _collapse(self, v: dict):
        for key in ("entropy", "completions/distinct_2"):
            first = self.first.get(key)
            if key in v and first and first > 0 and v[key] < self.cfg.collapse_fraction * first:
                return "mode_collapse", f"{key} fell to {v[key]:.3g} from {first:.3g} at the start"
        return None

    def _length(self, v: dict):
        first = self.first.get("completions/mean_length")
        if first and v.get("completions/mean_length", 0.0) > self.cfg.length_factor * first:
            return "length_explosion", (f"mean completion length {v['completions/mean_length']:.1f} tokens, "
                                        f"{v['completions/mean_length'] / first:.1f}x its start ({first:.1f})")
        cut, first_cut = v.get("completions/truncated_fraction"), self.first.get("completions/truncated_fraction")
        if cut is not None and first_cut is not None and cut > self.cfg.truncated_fraction > first_cut:
            return "length_explosion", f"{cut:.0%} of completions hit the length limit ({first_cut:.0%} at the start)"
        return None

    def _kl(self, v: dict):
        kl = v.get("kl/token_k3_mean")  # nats per token, never negative: the same measure in every algorithm
        if kl is None:
            return None
        previous, self.previous_kl = self.previous_kl, kl
        if kl > self.cfg.kl_max:
            return "kl_blowup", f"KL to the reference {kl:.3g} nats/token, above {self.cfg.kl_max}"
        if previous is not None and previous >= 0.01 and kl > self.cfg.kl_jump * previous:
            return "kl_blowup", f"KL to the reference jumped from {previous:.3g} to {kl:.3g} in one step"
        return None

    def _ppo(self, v: dict):
        if "value_loss" in v:
            history = self.value_losses[-20:]
            self.value_losses.append(v["value_loss"])
            if len(history) >= 3 and v["value_loss"] > self.cfg.value_spike * max(statistics.median(history), 1e-8):
                return "ppo_instability", (f"value loss {v['value_loss']:.3g}, {self.cfg.value_spike:g}x above its "
                                           f"running median {statistics.median(history):.3g}")
        if v.get("clip_ratio", 0.0) > self.cfg.clip_fraction_max:
            return "ppo_instability", f"clip fraction {v['clip_ratio']:.2f} above {self.cfg.clip_fraction_max}"
        return None

    def state_dict(self) -> dict:
        return {"first": dict(self.first), "previous_kl": self.previous_kl, "value_losses": list(self.value_losses),
                "best_gold": self.best_gold, "active": sorted(self.active)}

    def load_state_dict(self, state: dict) -> None:
        self.first, self.previous_kl = dict(state["first"]), state["previous_kl"]
        self.value_losses = list(state["value_losses"])
        self.best_gold = tuple(state["best_gold"]) if state["best_gold"] else None
        self.active = set(state["active"])


def distinct_n(sequences: list[list[int]], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of a batch of token sequences (Li et al. 2016); 1.0 for an empty batch."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0

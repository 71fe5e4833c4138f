"""Environments for the tests, loaded as `tiny_envs:Class` (the way a user's own environment loads)."""

import time

from posttrain.envs.base import EnvStep


class TwoTurnVowels:
    """Any first turn gets the user reply "again"; the second turn is rewarded by its share of vowels and ends
    the conversation. Trivially learnable by a tiny model, and it needs two turns."""

    def __init__(self, reply: str = "again"):
        self.reply = reply

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        if not hasattr(self, "asked"):
            self.asked = True
            return EnvStep(messages=[{"role": "user", "content": self.reply}], info={"asks": 1})
        vowels = sum(ch in "aeiou" for ch in text) / len(text) if text else 0.0
        return EnvStep(reward=vowels, done=True)


class Scripted:
    """Answers turn k with `replies[k]` as a tool message, and ends after the last reply."""

    def __init__(self, replies=("42",), reward: float = 1.0):
        self.replies, self.turn, self.reward = list(replies), 0, reward

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        if self.turn >= len(self.replies):
            return EnvStep(done=True, reward=self.reward)
        self.turn += 1
        return EnvStep(messages=[{"role": "tool", "content": self.replies[self.turn - 1]}], reward=0.0)


class Hangs(Scripted):
    """Never answers its first turn within any sensible timeout."""

    def step(self, text):
        time.sleep(30)
        return super().step(text)


class Raises(Scripted):
    def step(self, text):
        raise RuntimeError("broken environment")

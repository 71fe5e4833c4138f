"""Reward functions: plain callables ``fn(prompts, completions, **columns) -> list[float]``.

- ``registry``: ``REWARDS`` by name and ``load_reward("numeric" | "module:function", **options)``;
- ``verifiers``: ``numeric``, ``math`` (math-verify), ``format``, ``length_penalty``, ``soft_overlong``;
- ``sandbox``: the ``code`` reward, untrusted Python run against its tests in an isolated process;
- ``runner``: ``RewardRunner`` (per-sample timeouts, error policy, weighted total, metrics) and ``ensemble``;
- ``model_rewards``: ``RewardModelReward`` and ``LLMJudgeReward`` (torch/transformers imported lazily).

NaN from a reward means "masked" (not the completion's fault: unparseable gold answer, sandbox failure).
"""

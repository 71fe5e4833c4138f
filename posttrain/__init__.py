"""posttrain: post-training for language models (SFT, reward models, PPO, DPO family, GRPO).

Importing the package is cheap on purpose: torch and transformers are imported by the modules that need them.
"""

__version__ = "0.1.0"

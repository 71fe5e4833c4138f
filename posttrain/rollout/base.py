"""What every rollout engine shares: the sampling parameters, the `Generator` protocol and the registry of engines.

An engine turns a batch of tokenized prompts into a `posttrain.types.Rollout`: `num_samples` (G) completions per
prompt, rows prompt-major (prompt 0's G samples first), `group` holding the prompt index of each row.
Engines register themselves by name (`@register_generator("hf")`); `get_generator(name)` looks one up, so a
config names its engine and no code branches on the name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

from posttrain.registry import Registry

if TYPE_CHECKING:
    from posttrain.types import Rollout


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions.

    max_new_tokens: the most tokens a completion may have; a row that reaches it without stopping is truncated.
    temperature: logits are divided by it before sampling; 0 means greedy (argmax).
    top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p (1.0 = off).
    top_k: keep the k most likely tokens (0 = off). Applied before top_p, as in transformers' warpers.
    stop_token_ids: EOS and any secondary EOS ids; the first one sampled is kept and ends the row.
    stop_strings: a row ends once its decoded completion contains one of them; the token that completes the
        string is kept. Needs a tokenizer.
    batch_size: distinct prompts per forward chunk (the decode batch is batch_size * num_samples rows).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    batch_size: int = 8

    def __post_init__(self):
        # tuples so the frozen dataclass stays hashable and nobody mutates a shared default
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(str(s) for s in self.stop_strings))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if any(s == "" for s in self.stop_strings):
            raise ValueError("stop_strings may not contain the empty string")


@runtime_checkable
class Generator(Protocol):
    """A rollout engine. Rows of the result are prompt-major; `seed` makes the samples reproducible.

    Optional, beyond `generate`: `sync_weights(model)` for an engine with its own copy of the weights, and the
    memory hooks `sleep()` / `wake_up()` (see `MemoryHooks`; the trainer calls them only through
    `release_memory` / `reclaim_memory`, so an engine without them needs nothing).
    """

    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        num_samples: int = 1,
        seed: int | None = None,
    ) -> "Rollout": ...


@dataclass(frozen=True)
class EngineContext:
    """What an engine is told about the run besides its sampling section (`algo.sampling`):
    bf16: sample under bf16 autocast (fp32 weights on hardware where bf16 is fast);
    max_model_len: the longest prompt plus completion it will see; seed: the run's seed;
    start_checkpoint: the policy's starting weights (an engine with its own copy loads them, then syncs)."""

    bf16: bool = False
    max_model_len: int = 2048
    seed: int = 0
    start_checkpoint: str = ""


class MemoryHooks:
    """What a trainer asks of an engine besides `generate`, with the defaults of an engine that samples with the
    policy itself (HF): it holds no weights of its own (`weight_copies` 0, `sync_weights` nothing to do) and no
    memory to lend. An engine with its own copy of the weights (vLLM) overrides them; engines subclass this.

    weight_copies: copies of the policy's weights the engine holds (counted in models_in_memory).
    sync_weights(model): give the engine the policy's current weights (once per step, before it samples).
    Memory hooks, which lend the engine's device memory to the trainer between samplings:

    sleep():   after a step's sampling and scoring, before the optimizer updates: free what the engine holds on
               the device that sampling alone needs (vLLM: its KV cache, and its weights copied to CPU RAM).
    wake_up(): before the engine samples again (and before `sync_weights`): take that memory back.
    Each returns True when it changed something. These defaults do nothing. The HF engine samples with the policy
    itself; its `sleep()` frees only its packed decode weights (CPU), which the next call packs again.
    """

    weight_copies = 0
    syncs = 0  # weight syncs so far (logged as engine/weight_syncs by engines that hold weights)
    sleeps = 0  # sleeps so far (engine/sleeps)

    def sync_weights(self, model) -> None:
        return None

    def sleep(self) -> bool:
        return False

    def wake_up(self) -> bool:
        return False


def release_memory(generator) -> bool:
    """Call after a step's rollouts are sampled and scored, before the optimizer updates: the engine frees the
    device memory it holds for sampling (`generator.sleep()`), so the update has it. Nothing for an engine without
    the hook. True when memory was released."""
    hook = getattr(generator, "sleep", None)
    return bool(hook()) if callable(hook) else False


def reclaim_memory(generator) -> bool:
    """Call before the engine samples again (each step's first sampling, evaluation), before `sync_weights`: the
    engine takes back what `release_memory` freed (`generator.wake_up()`). Nothing for an engine without the hook,
    or one that is awake. True when memory was reclaimed."""
    hook = getattr(generator, "wake_up", None)
    return bool(hook()) if callable(hook) else False


GENERATORS = Registry("rollout engine")
# modules whose import fills GENERATORS; imported on first lookup so `import posttrain.rollout.base` stays cheap
_ENGINE_MODULES = ("posttrain.rollout.hf", "posttrain.rollout.vllm_engine")


register_generator = GENERATORS.register


def get_generator(name: str) -> type:
    """The engine class registered under `name` ('hf', 'vllm')."""
    for module in _ENGINE_MODULES:
        importlib.import_module(module)
    return GENERATORS.lookup(name)


def validate_prompts(prompt_ids: list[list[int]], num_samples: int) -> None:
    """Clear errors for inputs every engine rejects: no prompts, an empty prompt, num_samples < 1."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: nothing to generate from")
    empty = [i for i, p in enumerate(prompt_ids) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty[:5]} are empty; every prompt needs at least one token (e.g. BOS)")

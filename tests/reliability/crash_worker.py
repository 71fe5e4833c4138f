"""Helpers for the reliability tests that need another process or a misbehaving reward.

As a script, `posttrain` with faults injected, for the crash tests to kill:

    python crash_worker.py [--step-delay S] [--kill-in-save N] COMMAND ARGS...

--step-delay S   sleep S seconds after every training step (inside the loop), so a signal sent when a checkpoint
                 appears lands in the middle of training, not after the run has finished;
--kill-in-save N SIGKILL this process right after the N-th `safetensors.torch.save_file` call of the checkpoint
                 writer, i.e. between two files of a checkpoint's temporary folder.

As a module (importable as `crash_worker` from the tests and, through PYTHONPATH, from their children), reward
functions named as `crash_worker:NAME` in configs.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

# ---- rewards for the load and pipeline tests ------------------------------------------------------------------------

RELEASE = threading.Event()  # set by a test to let abandoned (hung) reward threads finish
_calls = itertools.count()
HANG_EVERY, RAISE_EVERY = (2, 7), (4,)  # of each 10 calls: 20% hang, 10% raise


def reset_flaky() -> None:
    global _calls
    _calls = itertools.count()
    RELEASE.clear()


def flaky_reward(prompts, completions, **_):
    """Per-sample reward 1.0, except that call k hangs (k % 10 in HANG_EVERY) or raises (k % 10 in RAISE_EVERY)."""
    k = next(_calls)  # itertools.count is atomic under the GIL: each call gets its own k
    if k % 10 in HANG_EVERY:
        RELEASE.wait(120)
        return [0.5]
    if k % 10 in RAISE_EVERY:
        raise RuntimeError(f"reward crashed on call {k}")
    return [1.0] * len(completions)


def slow_vowel_reward(prompts, completions, **_):
    """The tiny vowel reward, 0.25 s per batch: slows a stage down enough to be interrupted in the middle."""
    time.sleep(0.25)
    return [sum(ch in "aeiou" for ch in c) / len(c) if c else 0.0 for c in completions]


slow_vowel_reward.batched = True  # one call per rollout batch (RewardRunner)


# ---- fault injection -----------------------------------------------------------------------------------------------

def _delay_steps(seconds: float) -> None:
    from posttrain.train.loop import Trainer

    real = Trainer._one_step

    def one_step(self):
        out = real(self)
        time.sleep(seconds)
        return out

    Trainer._one_step = one_step


def _kill_in_save(nth: int) -> None:
    import safetensors.torch

    real, calls = safetensors.torch.save_file, itertools.count(1)

    def save_file(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        if next(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = save_file  # checkpoint.py imports it at call time, so it sees this one


def main(argv: list[str]) -> int:
    for path in (TESTS, HERE):
        if path not in sys.path:
            sys.path.insert(0, path)
    while argv and argv[0].startswith("--"):
        flag, value, argv = argv[0], argv[1], argv[2:]
        {"--step-delay": lambda v: _delay_steps(float(v)), "--kill-in-save": lambda v: _kill_in_save(int(v))}[flag](value)
    from posttrain.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What the training loop needs to stop cleanly and show progress: the Ctrl-C handler and the progress bar."""

from __future__ import annotations

import signal
import threading

from posttrain.config import TrainConfig


def progress_bar(cfg: TrainConfig, initial: int, is_main: bool):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=initial, disable=not (cfg.progress and is_main), desc="train", unit="step")


class CtrlC:
    """SIGINT handler for the loop: the first Ctrl-C asks it to stop after the current step (which is then saved
    whole); a second one interrupts at once. Only the main thread can install a signal handler."""

    def __init__(self):
        self.requested, self.count, self._previous = False, 0, None

    @classmethod
    def install(cls) -> "CtrlC":
        stop = cls()
        if threading.current_thread() is threading.main_thread():
            stop._previous = signal.signal(signal.SIGINT, stop._handle)
        return stop

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.requested = True
        if self.count > 1:
            raise KeyboardInterrupt

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

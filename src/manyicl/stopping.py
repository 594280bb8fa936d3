"""SIGINT and SIGTERM during training: the step in progress finishes, a complete checkpoint is saved, and training
stops, so that ``--resume`` continues exactly where it stopped (the same losses as a run never interrupted). A
second signal stops at once, as the default would; a kill -9 loses at most the steps since the last checkpoint.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import torch
from transformers import TrainerCallback

from manyicl.errors import Terminated

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal(TrainerCallback):
    """Installed for the length of ``trainer.train()`` (a context manager); ``received`` is the signal, if any."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # asked twice: stop now
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint (again to stop at once)",
              flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank stops together
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
            flag = torch.tensor([float(self.received or 0)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.received = int(flag.item()) or None
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

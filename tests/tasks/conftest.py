"""Lightning callbacks that interrupt a training run, shared by the pretraining and fault-tolerance tests.

Test modules import nothing from each other (pytest runs with ``--import-mode=importlib``), so they take these
classes through the fixtures below: ``crash_at(6)`` fails the run where a step would start, ``stop_at(3)`` stops it
cleanly after that step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest


class CrashAt(L.Callback):
    """Fails the run when a step would start after ``step`` optimizer steps, like a lost machine."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class StopAt(L.Callback):
    """Asks the trainer to stop after ``step`` optimizer steps, as a user's interrupt or a time limit would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.fixture
def crash_at() -> type[CrashAt]:
    return CrashAt


@pytest.fixture
def stop_at() -> type[StopAt]:
    return StopAt

"""Shared by the pretraining, checkpoint and fault-tolerance tests: Lightning callbacks that interrupt a training
run, and a token shard to train on.

Test modules import nothing from each other (pytest runs with ``--import-mode=importlib``), so they take these
classes through the fixtures below: ``crash_at(6)`` fails the run where a step would start, ``stop_at(3)`` stops it
cleanly after that step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
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


@pytest.fixture(scope="module")
def counting_shards(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """One token shard of 400 documents that count upward from a random start: a small model's loss falls within a
    few steps, so resumed and uninterrupted runs are compared on a curve that moves."""
    rng = np.random.default_rng(0)
    docs = [[(int(s) + i) % 500 + 3 for i in range(int(n))]
            for s, n in zip(rng.integers(0, 500, 400), rng.integers(10, 90, 400), strict=True)]
    directory = tmp_path_factory.mktemp("shards")
    np.save(directory / "tokens.npy", np.concatenate(docs).astype(np.uint32))
    np.save(directory / "offsets.npy", np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64))
    return [(str(directory / "tokens.npy"), str(directory / "offsets.npy"))]

"""What a person reads about a stage: MLflow child runs, Prefect artifacts, a progress artifact during training."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L

from infra.settings import get_logger
from infra.tracking import NullTracker, RunRef, Tracker, tracker_for

log = get_logger(__name__)


@contextmanager
def stage_run(
    parent: RunRef, stage: str, params: Mapping[str, Any], output: str | None = None
) -> Iterator[tuple[Tracker | NullTracker, RunRef]]:
    """A child run of ``parent`` for one stage, ended FINISHED or FAILED with the stage.

    ``output``: the URL the stage writes. An earlier attempt of the same stage and output whose process died (kill -9,
    a lost machine) left its run RUNNING; opening this one marks it KILLED and crashed, and tags this run as resuming
    it (`infra.tracking.Tracker.close_crashed`). Without ``output`` only attempts under the same parent are matched.
    """
    tracker = tracker_for(parent)
    ref = tracker.start_child(parent, stage, tags={"prefect.task_run_id": _task_run_id()}, output=output)
    tracker.log_params(ref, params)
    try:
        yield tracker, ref
    except BaseException:
        tracker.end(ref, "FAILED")
        raise
    tracker.end(ref, "FINISHED")


def _task_run_id() -> str:
    from prefect.runtime import task_run

    return str(task_run.id or "")


def table_artifact(key: str, rows: Sequence[Mapping[str, Any]], description: str) -> None:
    """A Prefect table artifact; outside a flow run (plain function calls, tests) nothing is created."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import get_run_context

    try:
        get_run_context()
    except Exception:  # MissingContextError: not inside a flow or task run
        return
    create_table_artifact(key=key, table=[dict(r) for r in rows], description=description)


def loss_plot(losses: Sequence[float], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_loss_plot(tracker: Tracker | NullTracker, ref: RunRef, losses: Sequence[float], title: str) -> None:
    if not ref.enabled or not losses:
        return
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(ref, loss_plot(losses, title, Path(tmp) / "loss.png"), "plots")


class PrefectProgress(L.Callback):
    """Keeps a Prefect progress artifact at the fraction of ``max_steps`` done (every ``every`` steps)."""

    def __init__(self, key: str, every: int = 10) -> None:
        self.key, self.every, self.artifact_id = key, every, None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from prefect.artifacts import create_progress_artifact

        try:
            self.artifact_id = create_progress_artifact(progress=0.0, key=self.key, description=self.key)
        except Exception as exc:  # outside a Prefect run there is nothing to update
            log.debug("no Prefect progress artifact: %s", exc)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if self.artifact_id is None or step % self.every:
            return
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self.artifact_id, progress=100.0 * step / max(trainer.max_steps, 1))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, progress=100.0)

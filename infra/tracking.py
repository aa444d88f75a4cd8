"""MLflow conventions: one parent run per pipeline run (tagged with the Prefect flow-run id), one child run per stage.

Runs are addressed by id through ``MlflowClient`` — never MLflow's process-global "active run" — so stages running in
Prefect worker threads, subprocesses or other machines log to the right run. ``NullTracker`` has the same methods and
does nothing, so training code never branches on whether tracking is on. Params, tags and run names pass through
``infra.secrets.redact`` on the way in: a credential that reaches them by mistake is stored masked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.secrets import redact
from infra.settings import get_logger

log = get_logger(__name__)

EXPERIMENT = "lmforge"
PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "lmforge.stage"
FLOW_RUN_TAG = "prefect.flow_run_id"


@dataclass(frozen=True)
class RunRef:
    """Where a run lives: enough to log to it from any process."""

    tracking_uri: str
    run_id: str

    @property
    def enabled(self) -> bool:
        return bool(self.run_id)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys; values are strings cut to MLflow's 6000-char limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return {key: value[:6000] for key, value in redact(flat).items()}  # redacted as text: str() of any object


def _safe_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    return {key: str(value) for key, value in redact(dict(tags or {})).items()}


class Tracker:
    """MLflow tracking through explicit run ids."""

    def __init__(self, tracking_uri: str, experiment: str = EXPERIMENT) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

    def start_parent(self, run_name: str, tags: Mapping[str, str] | None = None) -> RunRef:
        run = self.client.create_run(self.experiment_id, run_name=redact(run_name), tags=_safe_tags(tags))
        return RunRef(self.tracking_uri, run.info.run_id)

    def start_child(self, parent: RunRef, stage: str, tags: Mapping[str, str] | None = None) -> RunRef:
        all_tags = {STAGE_TAG: stage, **({PARENT_TAG: parent.run_id} if parent.enabled else {}), **dict(tags or {})}
        run = self.client.create_run(self.experiment_id, run_name=redact(stage), tags=_safe_tags(all_tags))
        return RunRef(self.tracking_uri, run.info.run_id)

    def log_params(self, ref: RunRef, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, v) for k, v in _flatten(params).items()]
        for start in range(0, len(flat), 100):  # MLflow's batch limit
            self.client.log_batch(ref.run_id, params=flat[start : start + 100])

    def log_metrics(self, ref: RunRef, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if math.isfinite(float(v))]
        if rows:
            self.client.log_batch(ref.run_id, metrics=rows)

    def set_tags(self, ref: RunRef, tags: Mapping[str, str]) -> None:
        for key, value in _safe_tags(tags).items():
            self.client.set_tag(ref.run_id, key, value)

    def log_artifact(self, ref: RunRef, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(ref.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(ref.run_id, str(p), artifact_path)

    def end(self, ref: RunRef, status: str = "FINISHED") -> None:
        run = self.client.get_run(ref.run_id)
        if run.info.status == "RUNNING":  # Lightning's MLFlowLogger may have closed it already
            self.client.set_terminated(ref.run_id, status=status)


class NullTracker:
    """Tracking switched off: the same calls, no effect."""

    tracking_uri = ""

    def start_parent(self, run_name: str, tags: Mapping[str, str] | None = None) -> RunRef:
        return RunRef("", "")

    def start_child(self, parent: RunRef, stage: str, tags: Mapping[str, str] | None = None) -> RunRef:
        return RunRef("", "")

    def log_params(self, ref: RunRef, params: Mapping[str, Any]) -> None:
        return None

    def log_metrics(self, ref: RunRef, metrics: Mapping[str, float], step: int | None = None) -> None:
        return None

    def set_tags(self, ref: RunRef, tags: Mapping[str, str]) -> None:
        return None

    def log_artifact(self, ref: RunRef, path: str | Path, artifact_path: str | None = None) -> None:
        return None

    def end(self, ref: RunRef, status: str = "FINISHED") -> None:
        return None


def tracker_for(ref: RunRef) -> Tracker | NullTracker:
    """The tracker that can log to ``ref`` (a NullTracker for a disabled ref)."""
    return Tracker(ref.tracking_uri) if ref.enabled else NullTracker()


def open_tracker(tracking_uri: str | None) -> Tracker | NullTracker:
    if not tracking_uri:
        return NullTracker()
    log.debug("MLflow tracking at %s", tracking_uri)
    return Tracker(tracking_uri)

"""MLflow conventions: one parent run per pipeline run (tagged with the Prefect flow-run id), one child run per stage.

Runs are addressed by id through ``MlflowClient`` — never MLflow's process-global "active run" — so stages running in
Prefect worker threads, subprocesses or other machines log to the right run. ``NullTracker`` has the same methods and
does nothing, so training code never branches on whether tracking is on. Params, tags and run names pass through
``infra.secrets.redact`` on the way in: a credential that reaches them by mistake is stored masked.

A process killed outright (kill -9, a lost machine) never ends its run, so MLflow would show it RUNNING forever. Every
run is therefore tagged with the process that opened it (host, pid, the pid's start time); when the next attempt opens
a run of the same stage and output (a parent: the same run name and tags), ``close_crashed`` marks the earlier RUNNING
runs whose process is gone KILLED, tags them ``lmforge.crashed=true`` with a pointer to the new run, and tags the new
run ``lmforge.resumed_from_run``. A run opened on another host is left alone (nothing here can tell whether its process
still runs), with a log line.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.secrets import redact
from infra.settings import get_logger

if TYPE_CHECKING:
    from mlflow.entities import Run

log = get_logger(__name__)

EXPERIMENT = "lmforge"
PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "lmforge.stage"
FLOW_RUN_TAG = "prefect.flow_run_id"
RUN_NAME_TAG = "mlflow.runName"
OUTPUT_TAG = "lmforge.output"  # a stage's output URL: with the stage name, what makes two runs attempts of one stage
HOST_TAG = "lmforge.host"
PID_TAG = "lmforge.pid"
PID_START_TAG = "lmforge.pid_start"  # when that pid started: a pid reused by a later process has another start
CRASHED_TAG = "lmforge.crashed"
RESUMED_BY_TAG = "lmforge.resumed_by_run"  # on a crashed run: the run of the attempt that came after it
RESUMED_FROM_TAG = "lmforge.resumed_from_run"  # on that run: the crashed run(s) it follows, comma-separated
UNKNOWN = "unknown"  # a start time this platform cannot read


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


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as text that differs for a later process given the same pid; None when no such
    process runs (a zombie, killed and not yet reaped, counts as gone). ``UNKNOWN`` where the platform cannot say."""
    if not os.path.isdir("/proc/self"):
        return _process_start_elsewhere(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after "(comm)", which may hold spaces: state, ppid, ...
    except OSError:  # FileNotFoundError, ProcessLookupError: no such process
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return f"{_boot_id()}:{int(fields[19])}"  # field 22 of stat: the start, in clock ticks after boot


def _boot_id() -> str:
    """Ticks after boot repeat across reboots; the boot id tells them apart."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start_elsewhere(pid: int) -> str | None:
    """Without /proc: psutil where installed, else only whether the pid exists."""
    try:
        import psutil
    except ModuleNotFoundError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return UNKNOWN
        return UNKNOWN
    try:
        return f"{psutil.Process(pid).create_time():.3f}"
    except psutil.NoSuchProcess:
        return None


def process_tags() -> dict[str, str]:
    """This process, as the tags that let a later attempt tell whether it still runs."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PID_START_TAG: process_start(pid) or UNKNOWN}


def process_gone(tags: Mapping[str, str]) -> bool:
    """True when the process named by ``tags`` (from `process_tags`, on this host) no longer runs."""
    pid, started = int(tags[PID_TAG]), tags[PID_START_TAG]
    now = process_start(pid)
    return now is None or (UNKNOWN not in (now, started) and now != started)


class Tracker:
    """MLflow tracking through explicit run ids."""

    def __init__(self, tracking_uri: str, experiment: str = EXPERIMENT) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

    def start_parent(self, run_name: str, tags: Mapping[str, str] | None = None) -> RunRef:
        """A top-level run; earlier runs of the same name and tags (the Prefect flow-run id aside) left RUNNING by a
        process that died are closed as crashed (`close_crashed`)."""
        given = dict(tags or {})
        run = self.client.create_run(self.experiment_id, run_name=redact(run_name),
                                     tags=_safe_tags({**given, **process_tags()}))
        ref = RunRef(self.tracking_uri, run.info.run_id)
        same = {RUN_NAME_TAG: run_name, **{k: v for k, v in given.items() if k != FLOW_RUN_TAG}}
        self.close_crashed(ref, same, top_level=True)
        return ref

    def start_child(
        self, parent: RunRef, stage: str, tags: Mapping[str, str] | None = None, output: str | None = None
    ) -> RunRef:
        """A stage's run under ``parent``. Earlier attempts left RUNNING by a dead process are closed as crashed: those
        of the same stage and ``output`` URL, or without an output, of the same stage under the same parent."""
        under = {PARENT_TAG: parent.run_id} if parent.enabled else {}
        key = {STAGE_TAG: stage, **({OUTPUT_TAG: output} if output else under)}
        all_tags = {**key, **under, **process_tags(), **dict(tags or {})}
        run = self.client.create_run(self.experiment_id, run_name=redact(stage), tags=_safe_tags(all_tags))
        ref = RunRef(self.tracking_uri, run.info.run_id)
        self.close_crashed(ref, key)
        return ref

    def close_crashed(self, ref: RunRef, same: Mapping[str, str], top_level: bool = False) -> list[str]:
        """Mark KILLED the RUNNING runs tagged as ``same`` (``top_level``: without a parent) whose process is gone.

        Each gets ``lmforge.crashed=true`` and ``lmforge.resumed_by_run=<ref>``; ``ref`` gets their ids as
        ``lmforge.resumed_from_run``. Runs of live processes and runs from other hosts are left RUNNING.
        Returns the ids marked.
        """
        wanted = _safe_tags(same)  # compared as stored: redacted
        runs = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
        earlier = [r for r in runs if r.info.run_id != ref.run_id and (not top_level or PARENT_TAG not in r.data.tags)
                   and all(r.data.tags.get(k) == v for k, v in wanted.items())]
        crashed = [r.info.run_id for r in earlier if self._crashed(r, wanted)]
        for run_id in crashed:
            self.client.set_tag(run_id, CRASHED_TAG, "true")
            self.client.set_tag(run_id, RESUMED_BY_TAG, ref.run_id)
            self.client.set_terminated(run_id, status="KILLED")
        if crashed:
            self.client.set_tag(ref.run_id, RESUMED_FROM_TAG, ",".join(crashed))
        return crashed

    @staticmethod
    def _crashed(run: Run, same: Mapping[str, str]) -> bool:
        """Whether ``run`` (RUNNING) was left so by a process that died on this host; logs why when it is kept."""
        tags, what = run.data.tags, ", ".join(f"{k}={v}" for k, v in same.items())
        if not {HOST_TAG, PID_TAG, PID_START_TAG} <= set(tags):
            log.warning("MLflow run %s (%s) is RUNNING and names no process (an older lmforge opened it); left "
                        "RUNNING: end it by hand if it is dead", run.info.run_id, what)
            return False
        where = f"pid {tags[PID_TAG]} on {tags[HOST_TAG]}"
        if tags[HOST_TAG] != socket.gethostname():
            log.warning("MLflow run %s (%s) is RUNNING, opened by %s: this host (%s) cannot tell whether that process "
                        "still runs, so it is left RUNNING", run.info.run_id, what, where, socket.gethostname())
            return False
        if not process_gone(tags):
            log.warning("MLflow run %s (%s) is still RUNNING in a live process (%s): two attempts may be writing the "
                        "same output", run.info.run_id, what, where)
            return False
        log.warning("MLflow run %s (%s) was left RUNNING by %s, which is gone (killed or crashed): marked KILLED",
                    run.info.run_id, what, where)
        return True

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

    def start_child(
        self, parent: RunRef, stage: str, tags: Mapping[str, str] | None = None, output: str | None = None
    ) -> RunRef:
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

"""Runs left RUNNING by a killed process: marked KILLED and crashed by the next attempt, on a real MLflow store."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from infra.tracking import (
    CRASHED_TAG,
    FLOW_RUN_TAG,
    HOST_TAG,
    OUTPUT_TAG,
    PID_START_TAG,
    PID_TAG,
    RESUMED_BY_TAG,
    RESUMED_FROM_TAG,
    STAGE_TAG,
    RunRef,
    Tracker,
    process_gone,
    process_start,
    process_tags,
)

ROOT = Path(__file__).resolve().parents[2]
PARENT_TAGS = {"preset": "smoke", "root": "/runs/smoke"}

# A flow process: opens its parent run and one stage's run, says which, then works until it is killed.
FLOW = """
import json, sys, time
from infra.tracking import FLOW_RUN_TAG, Tracker

uri, out, ready = sys.argv[1:4]
tracker = Tracker(uri)
parent = tracker.start_parent("pipeline-smoke", {FLOW_RUN_TAG: "flow-run-1", "preset": "smoke", "root": "/runs/smoke"})
stage = tracker.start_child(parent, "pretrain/phase1_short", output=out)
with open(ready + ".tmp", "w") as f:
    json.dump({"parent": parent.run_id, "stage": stage.run_id}, f)
import os
os.replace(ready + ".tmp", ready)
while True:
    time.sleep(1)
"""


@pytest.fixture
def uri(tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri)  # creates the store and the experiment before any child opens it
    return uri


@pytest.fixture
def flow_process(uri: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    """The FLOW script in a child process, once its runs are open: (the process, its run ids)."""
    ready = tmp_path / "ready.json"
    child = subprocess.Popen([sys.executable, "-c", FLOW, uri, "s3://bucket/phase1", str(ready)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the flow process ended (rc {child.returncode}) or stalled:\n{child.stdout.read()!r}")
            time.sleep(0.05)
        yield child, json.loads(ready.read_text())
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()


def status(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.status


def test_runs_of_a_killed_flow_are_marked_killed_by_the_next_attempt_and_left_alone_while_it_lives(
    uri: str, flow_process: tuple[subprocess.Popen[bytes], dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    child, old = flow_process
    client, tracker = MlflowClient(uri), Tracker(uri)
    tags = client.get_run(old["stage"]).data.tags
    assert tags[HOST_TAG] == socket.gethostname() and tags[PID_TAG] == str(child.pid)
    assert tags[PID_START_TAG] == process_start(child.pid) and tags[OUTPUT_TAG] == "s3://bucket/phase1"

    caplog.set_level(logging.WARNING, logger="lmforge")
    live_parent = tracker.start_parent("pipeline-smoke", {FLOW_RUN_TAG: "flow-run-2", **PARENT_TAGS})
    live_stage = tracker.start_child(live_parent, "pretrain/phase1_short", output="s3://bucket/phase1")
    assert status(client, old["parent"]) == status(client, old["stage"]) == "RUNNING"  # its process still runs
    assert RESUMED_FROM_TAG not in client.get_run(live_stage.run_id).data.tags
    assert any(old["stage"] in r.getMessage() and "live process" in r.getMessage() for r in caplog.records)
    tracker.end(live_stage)
    tracker.end(live_parent)

    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert status(client, old["parent"]) == status(client, old["stage"]) == "RUNNING"  # nothing ended them

    parent = tracker.start_parent("pipeline-smoke", {FLOW_RUN_TAG: "flow-run-3", **PARENT_TAGS})
    stage = tracker.start_child(parent, "pretrain/phase1_short", output="s3://bucket/phase1")
    for crashed, resumed in ((old["parent"], parent), (old["stage"], stage)):
        run = client.get_run(crashed)
        assert run.info.status == "KILLED" and run.info.end_time is not None
        assert run.data.tags[CRASHED_TAG] == "true" and run.data.tags[RESUMED_BY_TAG] == resumed.run_id
        assert client.get_run(resumed.run_id).data.tags[RESUMED_FROM_TAG] == crashed
    tracker.end(stage)
    tracker.end(parent)
    assert status(client, stage.run_id) == status(client, parent.run_id) == "FINISHED"
    assert CRASHED_TAG not in client.get_run(live_stage.run_id).data.tags  # a finished run is never touched


def fake_attempt(client: MlflowClient, tracker: Tracker, stage: str, **tags: str) -> str:
    """A RUNNING stage run as another process would have left it: this process's tags, with ``tags`` over them."""
    all_tags = {STAGE_TAG: stage, OUTPUT_TAG: "/out/sft", **process_tags(), **tags}
    return client.create_run(tracker.experiment_id, run_name=stage, tags=all_tags).info.run_id


def test_only_dead_attempts_of_the_same_stage_and_output_on_this_host_are_marked(
    uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, tracker = MlflowClient(uri), Tracker(uri)
    reused = fake_attempt(client, tracker, "sft", **{PID_START_TAG: "another-boot:12345"})  # our pid, not our start
    elsewhere = fake_attempt(client, tracker, "sft", **{HOST_TAG: "gpu-node-7", PID_START_TAG: "b:1"})
    other_output = fake_attempt(client, tracker, "sft", **{OUTPUT_TAG: "/out/sft-2", PID_START_TAG: "b:1"})
    other_stage = fake_attempt(client, tracker, "rlhf/dpo", **{PID_START_TAG: "b:1"})
    alive = fake_attempt(client, tracker, "sft")  # this very process

    caplog.set_level(logging.WARNING, logger="lmforge")
    ref = tracker.start_child(RunRef(uri, ""), "sft", output="/out/sft")
    assert [status(client, r) for r in (reused, elsewhere, other_output, other_stage, alive)] == [
        "KILLED", "RUNNING", "RUNNING", "RUNNING", "RUNNING"]
    assert client.get_run(ref.run_id).data.tags[RESUMED_FROM_TAG] == reused
    messages = [r.getMessage() for r in caplog.records]
    assert any(elsewhere in m and "gpu-node-7" in m and "cannot tell" in m for m in messages)
    assert any(reused in m and "marked KILLED" in m for m in messages)


def test_without_an_output_attempts_under_the_same_parent_are_matched(uri: str) -> None:
    client, tracker = MlflowClient(uri), Tracker(uri)
    parent = tracker.start_parent("sft-smoke", {})
    dead = {PID_START_TAG: "b:1"}
    same_parent = fake_attempt(client, tracker, "sft/data", **{"mlflow.parentRunId": parent.run_id, **dead})
    other_parent = fake_attempt(client, tracker, "sft/data", **{"mlflow.parentRunId": "another-parent", **dead})
    ref = tracker.start_child(parent, "sft/data")
    assert status(client, same_parent) == "KILLED" and status(client, other_parent) == "RUNNING"
    assert client.get_run(ref.run_id).data.tags[RESUMED_FROM_TAG] == same_parent


def test_a_killed_process_is_gone_before_it_is_reaped_and_a_live_one_is_not() -> None:
    child = subprocess.Popen(["sleep", "60"])
    tags = {PID_TAG: str(child.pid), PID_START_TAG: process_start(child.pid) or ""}
    assert not process_gone(tags)
    assert process_gone({**tags, PID_START_TAG: "another-boot:1"})  # the same pid, a later process
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while process_start(child.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # SIGKILL is delivered asynchronously; then it is a zombie until waited for
    assert process_start(child.pid) is None and process_gone(tags)
    assert child.wait() == -signal.SIGKILL

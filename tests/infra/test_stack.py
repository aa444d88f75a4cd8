"""`lmforge up` / `status` / `down`: a real local stack (Prefect server, MLflow server, moto's S3, a process worker)
on free loopback ports, driven through the command line as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra import stack

REPO = Path(__file__).resolve().parents[2]
SERVERS = ("moto", "prefect", "mlflow")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lmforge(*args: str, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    """The `lmforge` command in a fresh process, with no Prefect or S3 settings inherited from the test session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "LMFORGE_"))}
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=REPO, env={**env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=timeout)


def _processes_with(needle: str) -> list[int]:
    """Live processes whose command line contains `needle`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode() if entry.name.isdigit() else ""
        except OSError:  # it exited while we looked
            continue
        if needle in cmdline and stack.pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _strings(value: Any) -> Iterator[str]:
    """Every string inside nested dicts and lists."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _strings(item)


@contextmanager
def prefect_client(api: str) -> Iterator[Any]:
    """A synchronous Prefect client against the stack's API (not the session's)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`lmforge up --s3 --no-deploy` on free ports; always torn down, even when a test (or `up`) fails."""
    state_dir = tmp_path_factory.mktemp("stack")
    ports = {"prefect": _free_port(), "mlflow": _free_port(), "moto": _free_port()}
    try:
        result = lmforge("up", "--s3", "--no-deploy", "--state-dir", str(state_dir), "--prefect-port",
                         str(ports["prefect"]), "--mlflow-port", str(ports["mlflow"]), "--s3-port", str(ports["moto"]),
                         "--mlflow-workers", "1", "--timeout", "300")
        assert result.returncode == 0, result.stdout + result.stderr
        yield {"state_dir": state_dir, "ports": ports, "stdout": result.stdout,
               "state": json.loads((state_dir / stack.STATE_FILE).read_text())}
    finally:
        stack.down(state_dir)


def test_config_rejects_clashing_ports(tmp_path: Path) -> None:
    with pytest.raises(stack.StackError, match="distinct ports"):
        stack.StackConfig(state_dir=tmp_path, prefect_port=5000, mlflow_port=5000)
    with pytest.raises(stack.StackError, match="distinct ports"):
        stack.StackConfig(state_dir=tmp_path, s3=True, mlflow_port=6000, s3_port=6000)


def test_down_with_nothing_recorded_is_a_no_op(tmp_path: Path) -> None:
    assert stack.down(tmp_path) == []
    result = lmforge("down", "--state-dir", str(tmp_path), timeout=120)
    assert result.returncode == 0 and "nothing running" in result.stdout


@pytest.mark.integration
def test_up_serves_health_on_loopback(up: dict[str, Any]) -> None:
    ports, state = up["ports"], up["state"]
    assert stack.http_ok(f"http://127.0.0.1:{ports['prefect']}/api/health")
    assert stack.http_ok(f"http://127.0.0.1:{ports['mlflow']}/health")
    assert stack.http_ok(f"http://127.0.0.1:{ports['moto']}/")  # ListBuckets
    recorded = {s["name"]: s for s in state["services"]}
    assert list(recorded) == ["moto", "prefect", "mlflow", "worker"] and state["ready"] is True
    assert {name: recorded[name]["port"] for name in SERVERS} == ports
    assert all(Path(s["log"]) == up["state_dir"] / f"{s['name']}.log" for s in state["services"])
    assert f"export PREFECT_API_URL=http://127.0.0.1:{ports['prefect']}/api" in up["stdout"]
    assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{ports['moto']}" in up["stdout"]
    assert state["env"]["LMFORGE_ROOT"] == "s3://lmforge/lmforge"
    # The server keeps its database under the state dir, not in the user's ~/.prefect.
    assert (up["state_dir"] / "prefect" / "prefect.db").is_file()


@pytest.mark.integration
def test_worker_polls_the_process_pool(up: dict[str, Any]) -> None:
    worker = next(stack.Service(**s) for s in up["state"]["services"] if s["name"] == "worker")
    assert stack.pid_alive(worker.pid, worker.started)
    with prefect_client(up["state"]["env"]["PREFECT_API_URL"]) as client:
        pool = client.read_work_pool(stack.POOL)
        workers = {w.name for w in client.read_workers_for_work_pool(stack.POOL)}
    assert pool.type == "process"
    assert worker.extra["worker_name"] in workers


@pytest.mark.integration
def test_mlflow_artifacts_land_in_the_moto_bucket(up: dict[str, Any], tmp_path: Path) -> None:
    import boto3
    from mlflow import MlflowClient

    client = MlflowClient(up["state"]["env"]["LMFORGE_TRACKING_URI"])
    run = client.create_run(client.create_experiment("stack-test"))
    client.log_metric(run.info.run_id, "loss", 1.5)
    (tmp_path / "note.txt").write_text("through the server")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))  # the client holds no S3 keys: the server proxies
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{up['ports']['moto']}", region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lmforge").get("Contents", [])]
    assert f"mlflow/{run.info.experiment_id}/{run.info.run_id}/artifacts/note.txt" in keys
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 1.5}


@pytest.mark.integration
def test_deploy_registers_every_deployment(up: dict[str, Any]) -> None:
    config = stack.StackConfig(state_dir=up["state_dir"], prefect_port=up["ports"]["prefect"],
                               mlflow_port=up["ports"]["mlflow"], s3_port=up["ports"]["moto"], s3=True)
    stack.deploy(config)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    with prefect_client(config.prefect_api) as client:
        deployments = client.read_deployments()
    assert {d.name for d in deployments} == {d["name"] for d in spec["deployments"]}
    assert {d.work_pool_name for d in deployments} == {stack.POOL}
    # prefect.yaml's pull step reads LMFORGE_REPO_DIR, which `deploy` sets to this checkout (resolved at deploy time).
    step = [{"prefect.deployments.steps.set_working_directory": {"directory": str(config.repo_dir)}}]
    assert [d.pull_steps for d in deployments] == [step] * len(deployments)
    # Schedules' parameters are templated from LMFORGE_ROOT at deploy time: they must name the stack's bucket.
    root = "{{ $LMFORGE_ROOT }}"
    wanted = {v.replace(root, "s3://lmforge/lmforge") for d in spec["deployments"] for sch in d.get("schedules", [])
              for v in _strings(sch.get("parameters")) if root in v}
    deployed = {v for d in deployments for sch in d.schedules for v in _strings(sch.parameters)}
    assert wanted <= deployed and not any("LMFORGE_ROOT" in v for v in deployed)


@pytest.mark.integration
def test_status_reports_every_service_alive(up: dict[str, Any]) -> None:
    result = lmforge("status", "--state-dir", str(up["state_dir"]), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for service in up["state"]["services"]:
        line = next(line for line in result.stdout.splitlines() if f" {service['pid']} " in line)
        assert service["name"] in line and "alive" in line


@pytest.mark.integration
def test_up_again_refuses_while_the_stack_runs(up: dict[str, Any]) -> None:
    result = lmforge("up", "--no-deploy", "--state-dir", str(up["state_dir"]), timeout=120)
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1 and "already runs" in out and "lmforge down" in out
    assert json.loads((up["state_dir"] / stack.STATE_FILE).read_text()) == up["state"]  # left as it was


@pytest.mark.integration
def test_down_stops_everything_and_is_idempotent(up: dict[str, Any]) -> None:
    services = [stack.Service(**s) for s in up["state"]["services"]]
    result = lmforge("down", "--state-dir", str(up["state_dir"]), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("stopped ")] == [
        "worker", "mlflow", "prefect", "moto"]
    assert all(stack.group_members(s.pid) == [] for s in services)
    assert not any(stack.port_taken(port) for port in up["ports"].values())
    assert not (up["state_dir"] / stack.STATE_FILE).exists()
    again = lmforge("down", "--state-dir", str(up["state_dir"]), timeout=120)
    assert again.returncode == 0 and "nothing running" in again.stdout


@pytest.mark.integration
def test_up_refuses_a_taken_port(tmp_path: Path) -> None:
    prefect_port, s3_port = _free_port(), _free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        result = lmforge("up", "--s3", "--no-deploy", "--state-dir", str(tmp_path), "--prefect-port",
                         str(prefect_port), "--mlflow-port", str(taken), "--s3-port", str(s3_port), timeout=120)
    out = " ".join((result.stdout + result.stderr).split())  # rich may wrap the message
    assert result.returncode == 1
    assert f"port {taken}" in out and "mlflow" in out and "--mlflow-port" in out
    assert not (tmp_path / stack.STATE_FILE).exists() and not list(tmp_path.glob("*.log"))  # nothing was started
    assert not stack.port_taken(prefect_port) and not stack.port_taken(s3_port)


@pytest.mark.integration
def test_a_server_that_does_not_come_up_names_its_log_and_stops_the_rest(tmp_path: Path) -> None:
    prefect_port, mlflow_port = _free_port(), _free_port()
    result = lmforge("up", "--no-deploy", "--state-dir", str(tmp_path), "--prefect-port", str(prefect_port),
                     "--mlflow-port", str(mlflow_port), "--mlflow-workers", "1", "--timeout", "1", timeout=180)
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1
    assert "prefect did not answer" in out and str(tmp_path / "prefect.log") in out
    assert not (tmp_path / stack.STATE_FILE).exists()
    assert _processes_with(f"--port {prefect_port}") == [] and _processes_with(f"--port {mlflow_port}") == []

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
SMOKE_TIMEOUT = 900  # seconds for the smoke pipeline through the worker (≈ 2.5 min on a shared 2-core box)
# The MLflow child runs of one smoke pipeline run, by their `lmforge.stage` tag (tests/flows/test_pipeline.py's list).
SMOKE_STAGES = {
    "corpus", "data/text", "data/code", "tokenizer", "tokenize", "pretrain/phase1_short", "data/longtext",
    "pretrain/phase2_long", "data/capability-mix", "pretrain/phase3_capability", "sft/data", "sft", "export",
    "eval/data", "eval/phase1_short", "eval/phase2_long", "eval/phase3_capability", "eval/sft", "rlhf/data",
    "rlhf/reward_model", "rlhf/round1", "rlhf/round2", "eval/rlhf"}
PHASES = ("phase1_short", "phase2_long", "phase3_capability")


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


def _config(up: dict[str, Any]) -> stack.StackConfig:
    ports = up["ports"]
    return stack.StackConfig(state_dir=up["state_dir"], prefect_port=ports["prefect"], mlflow_port=ports["mlflow"],
                             s3_port=ports["moto"], s3=True)


def _s3(up: dict[str, Any]) -> Any:
    """boto3 on the stack's moto, with moto's dummy keys (the test session exports none)."""
    import boto3

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{up['ports']['moto']}", region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _keys(up: dict[str, Any], prefix: str) -> set[str]:
    pages = _s3(up).get_paginator("list_objects_v2").paginate(Bucket="lmforge", Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def deployed(up: dict[str, Any]) -> stack.StackConfig:
    """prefect.yaml's deployments on the stack, deployed once as `lmforge up` (without --no-deploy) would."""
    config = _config(up)
    stack.deploy(config)
    return config


@pytest.fixture(scope="module")
def smoke_run(up: dict[str, Any], deployed: stack.StackConfig) -> Any:
    """The `pipeline` deployment with the smoke preset, run by the stack's worker in a subprocess; the final flow run.

    Only the preset is passed: the root (the moto bucket) and the MLflow server come from the worker's environment,
    which is what `lmforge up` promises a user who runs `prefect deployment run`."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: deployed.prefect_api}):
        return run_deployment("pipeline/pipeline", parameters={"params": {"preset": "smoke"}}, timeout=SMOKE_TIMEOUT,
                              poll_interval=5)


def _completed(up: dict[str, Any], flow_run: Any) -> None:
    """The flow run finished COMPLETED; else fail with its state and the worker's log, where the traceback is."""
    worker_log = up["state_dir"] / "worker.log"
    assert flow_run.state is not None and flow_run.state.is_completed(), (
        f"{flow_run.state}\n{stack.log_tail(str(worker_log), 60)}")


def _smoke_tree(up: dict[str, Any], flow_run: Any) -> tuple[Any, Any, list[Any]]:
    """An MLflow client on the stack's server, the smoke run's parent run (found by its Prefect flow-run tag) and the
    runs that name it as their parent."""
    from mlflow import MlflowClient

    _completed(up, flow_run)
    client = MlflowClient(up["state"]["env"]["LMFORGE_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    [parent] = client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{flow_run.id}'")
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return client, parent, children


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
    from mlflow import MlflowClient

    client = MlflowClient(up["state"]["env"]["LMFORGE_TRACKING_URI"])
    run = client.create_run(client.create_experiment("stack-test"))
    client.log_metric(run.info.run_id, "loss", 1.5)
    (tmp_path / "note.txt").write_text("through the server")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))  # the client holds no S3 keys: the server proxies
    keys = _keys(up, f"mlflow/{run.info.experiment_id}/{run.info.run_id}/")
    assert keys == {f"mlflow/{run.info.experiment_id}/{run.info.run_id}/artifacts/note.txt"}
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 1.5}


@pytest.mark.integration
def test_deploy_registers_every_deployment(deployed: stack.StackConfig) -> None:
    config = deployed
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
@pytest.mark.timeout(SMOKE_TIMEOUT + 300)
def test_smoke_pipeline_deployment_completes_on_the_worker(up: dict[str, Any], smoke_run: Any) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    _completed(up, smoke_run)
    assert smoke_run.parameters == {"params": {"preset": "smoke"}} and smoke_run.work_pool_name == stack.POOL
    with prefect_client(up["state"]["env"]["PREFECT_API_URL"]) as client:
        assert client.read_deployment(smoke_run.deployment_id).name == "pipeline"
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[smoke_run.id])))
        names = sorted(client.read_flow(f.flow_id).name for f in subflows)
    # each stage's flow ran as a subflow of the deployment's run: three pretraining calls, five evaluations
    assert names == ["data", "evaluate", "evaluate", "evaluate", "evaluate", "evaluate", "longtext", "pretrain",
                     "pretrain", "pretrain", "rlhf", "sft"]
    assert {f.state.type.value for f in subflows} == {"COMPLETED"}


@pytest.mark.integration
@pytest.mark.timeout(SMOKE_TIMEOUT + 300)
def test_smoke_run_tree_on_the_stacks_mlflow(up: dict[str, Any], smoke_run: Any) -> None:
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

    _, parent, children = _smoke_tree(up, smoke_run)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "pipeline-smoke"
    assert parent.data.tags["preset"] == "smoke" and parent.data.tags["root"] == "s3://lmforge/lmforge/smoke"
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server: the worker has no path
    stages = [c.data.tags["lmforge.stage"] for c in children]
    assert set(stages) == SMOKE_STAGES and len(stages) == len(SMOKE_STAGES) + 2  # tokenize: corpus, long, mix
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.info.experiment_id for c in children} == {parent.info.experiment_id}
    by_stage = {c.data.tags["lmforge.stage"]: c for c in children}
    checkpoints = {p: by_stage[f"pretrain/{p}"].data.tags["lmforge.checkpoint"] for p in PHASES}
    assert checkpoints == {p: f"s3://lmforge/lmforge/smoke/pretrain/{p}/final" for p in PHASES}
    wanted = {f"final_loss/{name}" for name in (*PHASES, "sft")} | {
        f"{name}/eval/average" for name in (*PHASES, "sft", "rlhf")}
    assert wanted <= set(parent.data.metrics)
    # every child names the Prefect task run that logged it: the same runs, COMPLETED, on the stack's Prefect server
    task_ids = {c.data.tags["prefect.task_run_id"] for c in children}
    with prefect_client(up["state"]["env"]["PREFECT_API_URL"]) as client:
        task_runs = client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=list(task_ids))))
    assert {str(t.id) for t in task_runs} == task_ids and {t.state.type.value for t in task_runs} == {"COMPLETED"}


@pytest.mark.integration
@pytest.mark.timeout(SMOKE_TIMEOUT + 300)
def test_smoke_run_registers_the_chat_model_and_its_champion(up: dict[str, Any], smoke_run: Any) -> None:
    client, _, children = _smoke_tree(up, smoke_run)
    by_stage = {c.data.tags["lmforge.stage"]: c for c in children}
    sft, rlhf = by_stage["sft"], by_stage["rlhf/round2"]
    versions = {v.version: (v.run_id, v.source) for v in client.search_model_versions("name = 'lmforge-chat'")}
    assert versions == {"1": (sft.info.run_id, "s3://lmforge/lmforge/smoke/sft/train/final"),
                        "2": (rlhf.info.run_id, "s3://lmforge/lmforge/smoke/rlhf/round2/actor")}
    # the RLHF model takes `champion` from the SFT model only by a better OpenCompass average
    best = "2" if rlhf.data.metrics["eval/average"] > sft.data.metrics["eval/average"] else "1"
    assert client.get_model_version_by_alias("lmforge-chat", "champion").version == best
    assert client.get_registered_model("lmforge-chat").aliases == {"champion": best}


@pytest.mark.integration
@pytest.mark.timeout(SMOKE_TIMEOUT + 300)
def test_smoke_run_writes_every_stage_to_the_bucket(up: dict[str, Any], smoke_run: Any) -> None:
    _, parent, children = _smoke_tree(up, smoke_run)
    work = "lmforge/smoke"
    wanted = {
        "corpus/manifest.json", "clean/ledger.json", "clean/code_ledger.json", "clean/text/shard-00000.jsonl",
        "clean/removed/shard-00000.parquet", "clean/quarantine/shard-00000.jsonl", "clean/code/repos-00000.jsonl",
        "tokenizer/tokenizer.json", "tokens/manifest.json", "tokens/text-shard-00000.tokens.npy",
        "tokens/text-shard-00000.offsets.npy", "tokens/code-repos-00000.tokens.npy", "longtext/ledger.json",
        "longtext/tokens/manifest.json", "capability/composition.json", "capability/tokens/manifest.json",
        "sft/data/train.jsonl", "sft/train/eval.json", "sft/train/final/model.safetensors",
        "rlhf/rm0/model.safetensors", "rlhf/round1/actor/model.safetensors", "rlhf/round2/actor/model.safetensors",
        "rlhf/proxy_vs_gold.png", "export/hf/config.json", "export/hf/model.safetensors", "export/hf/tokenizer.json",
        *(f"pretrain/{p}/{f}" for p in PHASES
          for f in ("checkpoints/last.ckpt", "final/model.safetensors", "final/phase_result.json")),
        *(f"eval/{name}/{f}" for name in (*PHASES, "sft", "rlhf") for f in ("scores.json", "summary.csv")),
    }
    keys = _keys(up, f"{work}/")
    assert {f"{work}/{k}" for k in wanted} <= keys, sorted({f"{work}/{k}" for k in wanted} - keys)
    s3 = _s3(up)

    def read(key: str) -> bytes:
        return s3.get_object(Bucket="lmforge", Key=key)["Body"].read()

    # what the bucket holds is what MLflow recorded: phase 1's final loss, and the export logged as the run's artifact
    phase1 = json.loads(read(f"{work}/pretrain/phase1_short/final/phase_result.json"))
    assert parent.data.metrics["final_loss/phase1_short"] == pytest.approx(phase1["final_loss"])
    by_stage = {c.data.tags["lmforge.stage"]: c for c in children}
    exp = parent.info.experiment_id
    export = f"mlflow/{exp}/{by_stage['export'].info.run_id}/artifacts/hf"
    assert read(f"{export}/config.json") == read(f"{work}/export/hf/config.json")
    sizes = [s3.head_object(Bucket="lmforge", Key=k)["ContentLength"]
             for k in (f"{export}/model.safetensors", f"{work}/export/hf/model.safetensors")]
    assert sizes[0] == sizes[1] > 0
    scores = f"mlflow/{exp}/{by_stage['eval/sft'].info.run_id}/artifacts/eval/scores.json"
    assert read(scores) == read(f"{work}/eval/sft/scores.json")
    # the MLflow server stored the other stages' artifacts (plots, the tokenizer) in the bucket too
    logged = {f"mlflow/{exp}/{run.info.run_id}/artifacts/{path}" for run, path in (
        (by_stage["tokenizer"], "tokenizer/tokenizer.json"), (by_stage["data/text"], "plots/funnel.png"),
        (by_stage["pretrain/phase1_short"], "plots/loss.png"), (parent, "rlhf/proxy_vs_gold.png"))}
    assert logged <= _keys(up, f"mlflow/{exp}/")


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

"""Deployable infrastructure, checked without Docker or a cluster: infra/compose.yaml (services, loopback ports,
credentials only by interpolation), infra/Dockerfile (install order), the Kubernetes base job template (Prefect's
shape, every placeholder declared, GPUs, no literal credentials), prefect.yaml's schedules and parameters against
the flows' models, and the ``models:/NAME@ALIAS`` resolver the nightly schedule relies on (a real MLflow registry)."""

from __future__ import annotations

import copy
import importlib
import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SERVICES = {"postgres", "prefect-server", "prefect-worker", "mlflow", "minio", "minio-init"}
CREDENTIAL_KEY = re.compile(r"(?i)(PASSWORD|SECRET|ACCESS_KEY|_USER$|CONNECTION_URL|TOKEN)")
INTERPOLATION = re.compile(r"(?<!\$)\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")
PLACEHOLDER = re.compile(r"\{\{\s*([\w.$-]+)\s*\}\}")
DEPLOY_ROOT = "s3://lmforge/runs"  # the compose stack's LMFORGE_ROOT, as `prefect deploy` would read it


# ------------------------------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _host_port(spec: str) -> tuple[str, str]:
    """'127.0.0.1:${X:-4200}:4200' → ('127.0.0.1', '4200'): the bind address and the default host port."""
    resolved = INTERPOLATION.sub(lambda m: m["arg"] if m["op"] in (":-", "-") else "UNSET", spec)
    parts = resolved.split(":")
    assert len(parts) == 3, f"{spec!r}: publish as HOST_IP:HOST_PORT:CONTAINER_PORT"
    return parts[0], parts[1]


def test_compose_runs_the_stack_in_dependency_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    assert services["prefect-server"]["image"] == "prefecthq/prefect:3-python3.11"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    db_url = _env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in db_url
    worker = services["prefect-worker"]
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert worker["build"] == {"context": "..", "dockerfile": "infra/Dockerfile"}
    assert "worker start --pool lmforge-process --type process" in worker["command"]
    env = _env(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["LMFORGE_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["LMFORGE_ROOT"].startswith("s3://")
    mlflow = services["mlflow"]
    assert "--serve-artifacts" in mlflow["command"] and "--artifacts-destination s3://" in mlflow["command"]
    assert _env(mlflow)["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "mlflow:*" in _env(mlflow)["MLFLOW_SERVER_ALLOWED_HOSTS"]  # the worker calls it by service name
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing" in " ".join(services["minio-init"]["command"])


def test_published_ports_bind_loopback_and_do_not_collide(compose: dict[str, Any]) -> None:
    published = {name: [_host_port(p) for p in svc.get("ports", [])] for name, svc in compose["services"].items()}
    assert {name for name, ports in published.items() if ports} == {"prefect-server", "mlflow", "minio"}
    assert all(ip == "127.0.0.1" for ports in published.values() for ip, _ in ports), published
    host_ports = [port for ports in published.values() for _, port in ports]
    assert len(host_ports) == len(set(host_ports)), host_ports
    assert published["mlflow"] == [("127.0.0.1", "5000")] and ("127.0.0.1", "4200") in published["prefect-server"]


def test_credentials_come_only_from_the_env_file(compose: dict[str, Any]) -> None:
    text = "\n".join(line.split(" #")[0] for line in (INFRA / "compose.yaml").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    checked = 0
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if not CREDENTIAL_KEY.search(key):
                continue
            checked += 1
            refs = list(INTERPOLATION.finditer(value))
            assert refs, f"{name}: {key} is a literal; take it from infra/.env with ${{VAR:?...}}"
            if re.search(r"(?i)PASSWORD|SECRET|CONNECTION_URL", key):
                secret = [m for m in refs if "PASSWORD" in m["name"]]
                assert secret and all(m["op"] == ":?" for m in secret), f"{name}: {key} must be required (:?)"
    assert checked >= 8
    assert not re.search(r"(?i)minioadmin|changeme|hunter2", text)
    example = _env_file(INFRA / ".env.example")
    assert example["POSTGRES_PASSWORD"] == "" and example["MINIO_ROOT_PASSWORD"] == ""  # no shipped secrets
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (INFRA / ".env.example").read_text(), re.M))
    assert {m["name"] for m in INTERPOLATION.finditer(text)} <= documented
    assert "infra/.env" in (ROOT / ".gitignore").read_text().splitlines()


def _env_file(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_state_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    mounts = [m for svc in compose["services"].values() for m in svc.get("volumes", [])]
    sources = {m.split(":", 1)[0] for m in mounts}
    assert sources == set(compose["volumes"]) and len(sources) == 4  # no bind mounts of the host's files


# ------------------------------------------------------------------------------------------------ Dockerfile


def _instructions(path: Path) -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    return [" ".join(i.split()) for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def test_dockerfile_installs_torch_first_then_the_project_under_the_constraints() -> None:
    steps = _instructions(INFRA / "Dockerfile")
    pip = [i for i, step in enumerate(steps) if step.startswith("RUN") and "pip install" in step]
    torch_step = next(i for i in pip if "torch==2.13.0" in steps[i])
    project_step = next(i for i in pip if re.search(r"pip install -c constraints\.txt \.(\s|$)", steps[i]))
    assert torch_step < project_step and "-c constraints.txt" in steps[torch_step]
    assert "whl/cpu" in next(s for s in steps if s.startswith("ARG TORCH_INDEX_URL"))
    copied = {i: step.split()[1] for i, step in enumerate(steps) if step.startswith("COPY")}
    assert min(i for i, src in copied.items() if src == "constraints.txt") < torch_step
    assert {p.rstrip("*") for p in _pyproject_packages()} <= set(copied.values())  # the deployments' source tree is in
    assert "LMFORGE_REPO_DIR=/opt/lmforge" in " ".join(steps)  # prefect.yaml's pull step reads it
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".venv", ".lmforge", "infra/.env"} <= set(ignored)


def _pyproject_packages() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]


# ------------------------------------------------------------------------------------------------ Kubernetes


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return json.loads((INFRA / "k8s" / "base-job-template.json").read_text())


def _placeholders(value: Any) -> set[str]:
    return set(PLACEHOLDER.findall(json.dumps(value)))


def test_k8s_template_declares_every_placeholder_it_uses(template: dict[str, Any]) -> None:
    from prefect.server.schemas.actions import WorkPoolCreate

    assert set(template) == {"job_configuration", "variables"}
    used, declared = _placeholders(template["job_configuration"]), set(template["variables"]["properties"])
    assert used == declared  # undeclared ones break the pool; unused ones would silently do nothing
    pool = WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template)  # the server's own check
    assert pool.base_job_template["variables"]["properties"]["gpus"]["default"] == 1


def test_k8s_template_asks_for_gpus_shm_and_the_credentials_secret(template: dict[str, Any]) -> None:
    from prefect.utilities.templating import apply_values

    variables = template["variables"]["properties"]
    assert variables["gpus"]["type"] == "integer" and variables["gpus"]["default"] == 1
    values = {k: v["default"] for k, v in variables.items() if "default" in v} | {"image": "reg/lmforge:gpu",
                                                                                  "gpus": 2}
    job = apply_values(copy.deepcopy(template["job_configuration"]), values)  # as the worker renders it
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert container["image"] == "reg/lmforge:gpu"
    assert container["envFrom"] == [{"secretRef": {"name": "lmforge-credentials"}}]
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "args" not in container  # `command` has no default: the worker fills it in
    assert template["variables"]["required"] == ["image"]


def test_k8s_template_carries_no_credentials(template: dict[str, Any]) -> None:
    text = json.dumps(template)
    assert not re.search(r"(?i)\"(aws_secret_access_key|aws_access_key_id|[a-z_]*password|[a-z_]*token)\"\s*:", text)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert "default" not in template["variables"]["properties"]["env"]  # literal env values: none by default
    assert all("value" not in str(c.get("env")) for c in
               template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"])


def test_k8s_variables_are_a_valid_json_schema_and_their_defaults_conform(template: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = template["variables"]
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    validator = jsonschema.Draft7Validator(schema)
    assert not list(validator.iter_errors({**defaults, "image": "reg/lmforge:gpu"}))
    errors = [e.message for e in validator.iter_errors({**defaults, "image": "x", "gpus": "two"})]
    assert errors and "'two' is not of type 'integer'" in errors[0]
    assert any("'image' is a required property" in e.message for e in validator.iter_errors(defaults))


# ------------------------------------------------------------------------------------------------ prefect.yaml


@pytest.fixture(scope="module")
def deployments() -> dict[str, dict[str, Any]]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def _flow(entrypoint: str) -> Any:
    path, attr = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attr)


def test_every_flow_file_has_a_deployment(deployments: dict[str, dict[str, Any]]) -> None:
    files = {p.stem for p in (ROOT / "flows").glob("*.py")} - {"__init__", "params"}
    assert files == {"pipeline", "data", "longtext", "pretrain", "sft", "rlhf", "evaluate"}
    entry_files = {Path(d["entrypoint"].split(":")[0]).stem for d in deployments.values()}
    assert files <= entry_files


def test_schedules_are_valid_cron_in_utc_and_off_by_default(deployments: dict[str, dict[str, Any]]) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    schedules = {(name, s["cron"]): s for name, d in deployments.items() for s in d.get("schedules") or []}
    assert set(schedules) == {("evaluate", "0 2 * * *"), ("data", "0 3 * * 0")}
    for (name, cron), schedule in schedules.items():
        parsed = CronSchedule(cron=cron, timezone=schedule["timezone"])
        assert parsed.timezone == "UTC" and schedule["active"] is False, name
        assert schedule["slug"]  # a re-deploy updates the schedule instead of adding another
    with pytest.raises(ValueError):
        CronSchedule(cron="0 2 * *", timezone="UTC")  # the check above would catch a broken expression


def _parameter_sets(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    """The deployment's parameters, and each schedule's merged over them (as a scheduled run gets them)."""
    base = deployment.get("parameters") or {}
    sets = [base] if base else []
    return sets + [{**base, **(s.get("parameters") or {})} for s in deployment.get("schedules") or []]


def test_deployment_and_schedule_parameters_validate_against_the_flow_models(
    deployments: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate
    from prefect.utilities.templating import apply_values, find_placeholders

    monkeypatch.setenv("LMFORGE_ROOT", DEPLOY_ROOT)
    checked = []
    for name, deployment in deployments.items():
        flow = _flow(deployment["entrypoint"])
        hints = typing.get_type_hints(flow.fn)
        for raw in _parameter_sets(deployment):
            assert {p.name for p in find_placeholders(raw)} <= {"$LMFORGE_ROOT"}, name
            params = apply_values(raw, {})  # deploy-time templating: {{ $VAR }} from the environment
            assert "{{" not in json.dumps(params), name
            for key, value in params.items():
                model = hints[key]
                assert isinstance(model, type) and issubclass(model, BaseModel), (name, key)
                model.model_validate(value)
            assert not validate(params, parameter_schema(flow).model_dump_for_openapi()), name  # Prefect's check
            checked.append(name)
    assert sorted(checked) == ["data", "evaluate", "pipeline"]


def test_the_nightly_evaluation_reads_the_champion_under_the_deploy_root(
    deployments: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.utilities.templating import apply_values

    from flows.evaluate import EvaluateParams

    monkeypatch.setenv("LMFORGE_ROOT", DEPLOY_ROOT)
    (nightly,) = deployments["evaluate"]["schedules"]
    params = EvaluateParams.model_validate(apply_values(nightly["parameters"], {})["params"])
    assert params.checkpoint == "models:/lmforge-chat@champion" and params.chat and params.register_as is None
    assert params.tokenizer == f"{DEPLOY_ROOT}/tiny/tokenizer/tokenizer.json"
    assert params.data == f"{DEPLOY_ROOT}/tiny/eval/data" and params.output.startswith(DEPLOY_ROOT)


# ------------------------------------------------------------------------------------------------ models:/ resolver


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A real MLflow registry on SQLite: `lmforge-chat` with versions 1 and 2, `champion` on version 2."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    client.create_registered_model("lmforge-chat")
    for round_ in (1, 2):
        client.create_model_version("lmforge-chat", source=str(tmp / f"rlhf-round{round_}" / "actor"))
    client.set_registered_model_alias("lmforge-chat", "champion", "2")
    return uri, str(tmp)


def test_a_models_uri_resolves_to_the_registered_checkpoint(registry: tuple[str, str]) -> None:
    from tasks.evaluate.stages import resolve_checkpoint

    uri, tmp = registry
    assert resolve_checkpoint(uri, "models:/lmforge-chat@champion") == f"{tmp}/rlhf-round2/actor"
    assert resolve_checkpoint(uri, "models:/lmforge-chat/1") == f"{tmp}/rlhf-round1/actor"
    assert resolve_checkpoint(uri, "s3://b/sft/train/final") == "s3://b/sft/train/final"  # not a registry URI


def test_a_missing_alias_model_or_malformed_uri_is_a_clear_error(registry: tuple[str, str]) -> None:
    from tasks.evaluate.stages import resolve_checkpoint

    uri, _ = registry
    with pytest.raises(ValueError, match=r"has no alias 'nightly'"):
        resolve_checkpoint(uri, "models:/lmforge-chat@nightly")
    with pytest.raises(ValueError, match=r"has no version 7"):
        resolve_checkpoint(uri, "models:/lmforge-chat/7")
    with pytest.raises(ValueError, match=r"no registered model 'nope'"):
        resolve_checkpoint(uri, "models:/nope@champion")
    with pytest.raises(ValueError, match=r"expected models:/NAME@ALIAS"):
        resolve_checkpoint(uri, "models:/lmforge-chat")


def test_the_evaluate_flow_resolves_its_checkpoint_with_its_tracking_uri(registry: tuple[str, str]) -> None:
    from flows.evaluate import EvaluateParams, with_resolved_checkpoint
    from flows.params import Where
    from infra.tracking import RunRef

    uri, tmp = registry
    common = {"checkpoint": "models:/lmforge-chat@champion", "tokenizer": "t.json", "output": "o", "chat": True}
    own = with_resolved_checkpoint(EvaluateParams(**common, where=Where(tracking_uri=uri)))
    assert own.checkpoint == f"{tmp}/rlhf-round2/actor" and own.tokenizer == "t.json"
    nested = with_resolved_checkpoint(EvaluateParams(**common, parent_run=RunRef(uri, "run-1")))  # pipeline's
    assert nested.checkpoint == own.checkpoint
    plain = EvaluateParams(**{**common, "checkpoint": "/ckpt/final"})
    assert with_resolved_checkpoint(plain) is plain

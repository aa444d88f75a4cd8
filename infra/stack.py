"""A local, production-like server stack: Prefect server, MLflow server, optionally moto's S3, a process worker.

Everything listens on 127.0.0.1 and runs as background processes, each the leader of its own process group (so a
server's children die with it), logging to ``<state>/<name>.log``. ``<state>/stack.json`` records what runs; it is
rewritten after every start, so ``down`` can clean up even after an ``up`` that was killed half way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.settings import get_logger, get_settings, local_path

log = get_logger("stack")

HOST = "127.0.0.1"
POOL = "lmforge-process"
STATE_FILE = "stack.json"
REPO_DIR = Path(__file__).resolve().parents[1]
# Dummy keys: moto accepts any; they are never exported for a real S3.
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# Inherited settings that would point a child at another Prefect profile or account.
DROPPED_ENV = ("PREFECT_PROFILE", "PREFECT_PROFILES_PATH", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

Echo = Callable[[str], None]


class StackError(Exception):
    """Something about the local stack is wrong; the message says what and where to look."""


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which ports it takes."""

    state_dir: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000
    s3_port: int = 5001
    s3: bool = False
    bucket: str = "lmforge"
    deploy: bool = True
    repo_dir: Path = REPO_DIR
    mlflow_workers: int = 2
    timeout: float = 180.0  # seconds a server may take to answer its health check (~20–40 s on an idle laptop)

    def __post_init__(self) -> None:
        for name, port in self.ports().items():
            if not 1 <= port <= 65535:
                raise StackError(f"{name} port {port} is out of range: expected 1–65535")
        if len(set(self.ports().values())) < len(self.ports()):
            raise StackError(f"the services need distinct ports, got {self.ports()}")
        if self.s3 and not BUCKET_RE.match(self.bucket):
            raise StackError(f"bucket name {self.bucket!r} is not a valid S3 bucket name (3–63 of a-z 0-9 . -)")
        if self.mlflow_workers < 1 or self.timeout <= 0:
            raise StackError("mlflow_workers must be ≥ 1 and timeout > 0")

    def ports(self) -> dict[str, int]:
        ports = {"prefect": self.prefect_port, "mlflow": self.mlflow_port}
        return {"moto": self.s3_port, **ports} if self.s3 else ports

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"


@dataclass
class Service:
    """One background process of the stack, as stack.json records it."""

    name: str
    pid: int
    log: str
    started: int | None = None  # the kernel's start tick, so a recycled pid is never taken for ours
    port: int | None = None
    url: str | None = None
    health: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


Started = tuple[Service, subprocess.Popen]


def default_state_dir() -> Path:
    """``<LMFORGE_ROOT>/stack`` when the root is local, else ``./.lmforge/stack`` (state is always local)."""
    settings = get_settings()
    root = local_path(settings.root) if settings.root_is_local else os.path.abspath("./.lmforge")
    return Path(root) / "stack"


# ---- processes -------------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name: [state, ppid, pgrp, …]; None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text.rsplit(")", 1)[1].split()


def start_tick(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """The process exists, is not a zombie, and (when `started` is given) is the one we started."""
    if not Path("/proc").is_dir():  # not Linux: the signal-0 probe is all there is
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        _reap(pid)
        return False
    return started is None or int(fields[19]) == started


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: its parent (or init) reaps it
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def _executable(name: str) -> str:
    """A console script of this environment (beside the running Python), else one on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise StackError(f"`{name}` is not installed in {Path(sys.executable).parent} nor on PATH: run `make setup`")
    return found


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    return {**env, **extra}


def spawn(name: str, argv: list[str], env: dict[str, str], state_dir: Path, cwd: Path) -> Started:
    """Start `argv` in the background as the leader of a new session (so of its own process group)."""
    log_file = state_dir / f"{name}.log"
    with log_file.open("wb") as out:
        proc = subprocess.Popen([_executable(argv[0]), *argv[1:]], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=_child_env(env), cwd=cwd, start_new_session=True)
    log.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
    return Service(name=name, pid=proc.pid, log=str(log_file), started=start_tick(proc.pid)), proc


# ---- ports and health ------------------------------------------------------------------------------------------


def port_taken(port: int, host: str = HOST) -> bool:
    """Something listens on (or holds) host:port. SO_REUSEADDR so a socket in TIME_WAIT does not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(config: StackConfig) -> None:
    for name, port in config.ports().items():
        if port_taken(port):
            option = "--s3-port" if name == "moto" else f"--{name}-port"
            raise StackError(f"port {port} on {HOST}, wanted for {name}, is taken: stop what listens there "
                             f"(`ss -ltnp 'sport = :{port}'`) or choose another with {option}")


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(service: Service, proc: subprocess.Popen, timeout: float) -> None:
    """Poll the service's health URL until it answers 200; fail early if the process exits."""
    assert service.health is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(service.health):
            return
        if proc.poll() is not None:
            raise StackError(f"{service.name} exited with code {proc.returncode} before it became healthy; "
                             f"see {service.log}:\n{log_tail(service.log)}")
        time.sleep(0.5)
    raise StackError(f"{service.name} did not answer {service.health} within {timeout:.0f} s; see {service.log}:\n"
                     f"{log_tail(service.log)}")


# ---- state -----------------------------------------------------------------------------------------------------


def read_state(state_dir: Path) -> dict | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StackError(f"{path} is not valid JSON ({exc}): stop its processes by hand and delete it") from exc


def services_of(state: dict | None) -> list[Service]:
    return [Service(**s) for s in state["services"]] if state else []


def write_state(state_dir: Path, state: dict) -> None:
    tmp = state_dir / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, state_dir / STATE_FILE)


# ---- the services ----------------------------------------------------------------------------------------------


def data_root(config: StackConfig) -> str:
    """The worker's LMFORGE_ROOT: on the bucket with --s3, else the user's root made absolute (flows run in the
    repository directory, so a relative root would move)."""
    if config.s3:
        return f"s3://{config.bucket}/lmforge"
    settings = get_settings()
    return local_path(settings.root) if settings.root_is_local else settings.root


def user_env(config: StackConfig) -> dict[str, str]:
    """What a shell exports to use the stack, what the worker runs flows with, and what deploying templates with."""
    env = {"PREFECT_API_URL": config.prefect_api, "LMFORGE_TRACKING_URI": config.mlflow_url}
    if config.s3:
        env |= {"AWS_ENDPOINT_URL": config.s3_endpoint, **MOTO_ENV}
    return {**env, "LMFORGE_ROOT": data_root(config)}


def _prefect_env(config: StackConfig) -> dict[str, str]:
    # Its own PREFECT_HOME: the server's database and the CLI's profile stay under the state dir, not in ~/.prefect.
    return {"PREFECT_HOME": str(config.state_dir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": config.prefect_api, "PREFECT_UI_API_URL": config.prefect_api}


def start_moto(config: StackConfig) -> Started:
    service, proc = spawn("moto", ["moto_server", "-H", HOST, "-p", str(config.s3_port)], {}, config.state_dir,
                          config.state_dir)
    service.port, service.url, service.health = config.s3_port, config.s3_endpoint, f"{config.s3_endpoint}/"
    return service, proc


def start_prefect(config: StackConfig) -> Started:
    argv = ["prefect", "server", "start", "--host", HOST, "--port", str(config.prefect_port)]
    service, proc = spawn("prefect", argv, _prefect_env(config), config.state_dir, config.state_dir)
    service.port, service.url = config.prefect_port, f"http://{HOST}:{config.prefect_port}"
    service.health = f"{config.prefect_api}/health"
    return service, proc


def start_mlflow(config: StackConfig) -> Started:
    artifacts = f"s3://{config.bucket}/mlflow" if config.s3 else str(config.state_dir / "mlartifacts")
    argv = ["mlflow", "server", "--host", HOST, "--port", str(config.mlflow_port), "--workers",
            str(config.mlflow_workers), "--backend-store-uri", f"sqlite:///{config.state_dir / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", artifacts]
    # Without this the server also runs a job-execution process pool that costs memory for nothing here.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if config.s3:
        env |= {**MOTO_ENV, "AWS_ENDPOINT_URL": config.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": config.s3_endpoint}
    service, proc = spawn("mlflow", argv, env, config.state_dir, config.state_dir)
    service.port, service.url, service.health = config.mlflow_port, config.mlflow_url, f"{config.mlflow_url}/health"
    service.extra = {"artifacts": artifacts}
    return service, proc


def start_worker(config: StackConfig) -> Started:
    name = f"lmforge-local-{os.getpid()}-{int(time.time())}"
    env = {**_prefect_env(config), **user_env(config), "LMFORGE_REPO_DIR": str(config.repo_dir)}
    service, proc = spawn("worker", ["prefect", "worker", "start", "--pool", POOL, "--name", name], env,
                          config.state_dir, config.repo_dir)
    service.extra = {"pool": POOL, "worker_name": name}
    return service, proc


def create_bucket(config: StackConfig) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=config.s3_endpoint, region_name=MOTO_ENV["AWS_DEFAULT_REGION"],
                          aws_access_key_id=MOTO_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=MOTO_ENV["AWS_SECRET_ACCESS_KEY"])
    if config.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=config.bucket)


def ensure_work_pool(config: StackConfig) -> bool:
    """Create the process work pool unless it exists; True when it was created."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with SyncPrefectClient(config.prefect_api) as client:
        try:
            client.read_work_pool(POOL)
            return False
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process", base_job_template=template))
            return True


def wait_worker(config: StackConfig, worker: Service, proc: subprocess.Popen) -> None:
    """The worker counts as up once it has registered itself with the pool."""
    from prefect.client.orchestration import SyncPrefectClient

    deadline = time.monotonic() + config.timeout
    with SyncPrefectClient(config.prefect_api) as client:
        while time.monotonic() < deadline:
            if any(w.name == worker.extra["worker_name"] for w in client.read_workers_for_work_pool(POOL)):
                return
            if proc.poll() is not None:
                raise StackError(f"worker exited with code {proc.returncode} before it joined pool {POOL}; see "
                                 f"{worker.log}:\n{log_tail(worker.log)}")
            time.sleep(1.0)
    raise StackError(f"worker did not join pool {POOL} within {config.timeout:.0f} s; see {worker.log}:\n"
                     f"{log_tail(worker.log)}")


def deploy(config: StackConfig) -> Path:
    """`prefect deploy --all` from the repository. prefect.yaml's pull step reads LMFORGE_REPO_DIR and its schedules'
    parameters LMFORGE_ROOT, both templated at deploy time: so they get the stack's values here."""
    if not (config.repo_dir / "prefect.yaml").is_file():
        raise StackError(f"no prefect.yaml in {config.repo_dir}: deploy from an lmforge checkout or pass --no-deploy")
    log_file = config.state_dir / "deploy.log"
    env = _child_env({**_prefect_env(config), **user_env(config), "LMFORGE_REPO_DIR": str(config.repo_dir)})
    with log_file.open("wb") as out:
        try:
            result = subprocess.run([_executable("prefect"), "--no-prompt", "deploy", "--all"], cwd=config.repo_dir,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=max(config.timeout, 600.0))
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"`prefect deploy --all` timed out; see {log_file}") from exc
    if result.returncode != 0:
        raise StackError(f"`prefect deploy --all` failed (exit {result.returncode}); see {log_file}:\n"
                         f"{log_tail(str(log_file))}")
    return log_file


# ---- up / down / status ----------------------------------------------------------------------------------------


def running(state_dir: Path) -> list[Service]:
    return [s for s in services_of(read_state(state_dir)) if pid_alive(s.pid, s.started)]


def up(config: StackConfig, echo: Echo = log.info) -> dict:
    """Start the stack; on any failure stop what was started and raise StackError. Returns stack.json's content."""
    state_dir = config.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    if alive := running(state_dir):
        names = ", ".join(f"{s.name} (pid {s.pid})" for s in alive)
        raise StackError(f"a stack already runs from {state_dir}: {names}; `lmforge status` or `lmforge down` first")
    check_ports(config)
    conf = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    state: dict = {"config": conf, "env": user_env(config), "ready": False, "services": []}
    try:
        _start_all(config, state, echo)
    except StackError:
        _abort(state_dir, state, echo)
        raise
    except Exception as exc:  # a client library's error (boto3, Prefect's client): same clean-up, one error type
        _abort(state_dir, state, echo)
        raise StackError(f"starting the stack failed: {type(exc).__name__}: {exc}; logs in {state_dir}") from exc
    except BaseException:  # Ctrl-C: the servers run in their own sessions, so the terminal's SIGINT missed them
        _abort(state_dir, state, echo)
        raise
    state["ready"] = True
    write_state(state_dir, state)
    (state_dir / "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in state["env"].items()))
    return state


def _abort(state_dir: Path, state: dict, echo: Echo) -> None:
    echo("stopping what was started")
    stop_all(services_of(state), echo)
    (state_dir / STATE_FILE).unlink(missing_ok=True)


def _start_all(config: StackConfig, state: dict, echo: Echo) -> None:
    def started(service: Service) -> None:
        state["services"].append(asdict(service))
        write_state(config.state_dir, state)

    servers = []
    if config.s3:
        moto = start_moto(config)
        started(moto[0])
        wait_healthy(*moto, timeout=config.timeout)
        create_bucket(config)
        echo(f"moto S3 up at {config.s3_endpoint}, bucket {config.bucket}")
    for start in (start_prefect, start_mlflow):  # both start at once; each takes tens of seconds
        servers.append(start(config))
        started(servers[-1][0])
    for service, proc in servers:
        wait_healthy(service, proc, config.timeout)
        echo(f"{service.name} up at {service.url}")
    echo(f"work pool {POOL}: {'created' if ensure_work_pool(config) else 'exists'}")
    worker = start_worker(config)
    started(worker[0])
    wait_worker(config, *worker)
    echo(f"worker {worker[0].extra['worker_name']} polls {POOL}")
    if config.deploy:
        echo("deploying prefect.yaml's deployments (prefect deploy --all)…")
        echo(f"deployed; log in {deploy(config)}")


def _recycled(service: Service) -> bool:
    """The recorded pid now names a process we did not start (the machine rebooted, or pids wrapped)."""
    return service.started is not None and start_tick(service.pid) not in (None, service.started)


def stop(service: Service, timeout: float = 20.0) -> bool:
    """SIGINT the process group (twice for a worker, which takes the first as "finish up"), then SIGTERM, SIGKILL.
    False when nothing of it was running."""
    if _recycled(service) or not group_members(service.pid):
        return False
    steps = [(signal.SIGINT, timeout / 2)]
    if service.name == "worker":
        steps = [(signal.SIGINT, 3.0), (signal.SIGINT, timeout / 2)]
    steps += [(signal.SIGTERM, timeout / 2), (signal.SIGKILL, 5.0)]
    for sig, wait in steps:
        if not group_members(service.pid):
            break
        _signal_group(service.pid, sig)
        _wait_gone(service.pid, wait)
    _reap(service.pid)
    if members := group_members(service.pid):
        raise StackError(f"{service.name}: processes {members} survived SIGKILL")
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pgid)
        if not group_members(pgid):
            return
        time.sleep(0.2)


def stop_all(services: list[Service], echo: Echo = log.info) -> list[str]:
    """Stop services in reverse start order; returns the names of those that were running."""
    stopped, failures = [], []
    for service in reversed(services):
        try:
            if stop(service):
                stopped.append(service.name)
                echo(f"stopped {service.name} (pid {service.pid})")
        except StackError as exc:  # keep stopping the others
            failures.append(str(exc))
    if failures:
        raise StackError("; ".join(failures))
    return stopped


def down(state_dir: Path, echo: Echo = log.info) -> list[str]:
    """Stop everything stack.json records and remove it; a no-op (empty list) when nothing is recorded."""
    state = read_state(state_dir)
    if state is None:
        return []
    stopped = stop_all(services_of(state), echo)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def status(state_dir: Path) -> list[tuple[Service, bool]]:
    """Each recorded service and whether its process is alive."""
    return [(s, pid_alive(s.pid, s.started)) for s in services_of(read_state(state_dir))]

"""Shared fixtures: a real S3 API (moto's server) on 127.0.0.1 for storage and corpus tests."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's S3 on a free loopback port; exports AWS_ENDPOINT_URL and dummy keys for s3fs/boto3. Yields the URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in [*_S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update({**_S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(moto_server: str) -> str:
    """A fresh, empty bucket on the moto server; yields its URL, `s3://<name>`."""
    import s3fs

    name = f"lmforge-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): a second torch
    thread costs more in hand-offs than it gives, 30–50× on a busy 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One real (temporary) Prefect server for the whole session, as Prefect's own test harness runs it."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


PROSE_MODULES = (
    "argparse", "collections", "email.message", "logging", "pathlib", "subprocess", "threading", "typing", "unittest",
    "asyncio", "concurrent.futures", "csv", "datetime", "decimal", "difflib", "functools", "inspect", "itertools",
    "json", "multiprocessing", "os", "pickle", "random", "re", "shutil", "socket", "sqlite3", "string", "tarfile",
    "tempfile", "textwrap", "urllib.request", "xml.etree.ElementTree", "zipfile",
)


@pytest.fixture(scope="session")
def prose() -> list[str]:
    """Fluent English prose, sorted: the docstrings (over 60 words) of some standard-library modules and members."""
    import importlib
    import inspect
    import textwrap

    docs = set()
    for name in PROSE_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(member for _, member in inspect.getmembers(module))]:
            doc = inspect.getdoc(obj) or ""
            if len(doc.split()) > 60:
                docs.add(textwrap.dedent(doc))
    return sorted(docs)

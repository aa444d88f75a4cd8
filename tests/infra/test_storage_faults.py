"""An object store that does not answer: retries with backoff, then a clear error, and never a partial object.

The outages are real: a closed loopback port, or a TCP link to moto's server that the test cuts (nothing listens,
live connections are reset) and restores, at moments chosen through the log records the clients write.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import botocore.exceptions
import pytest
import s3fs

from infra import storage
from infra.storage import StorageUnavailable, is_transient

ATTEMPTS = 3
SECRET = "wJalrXUtnFEMI-not-a-real-key"  # long enough that infra.secrets masks it wherever it appears


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Few attempts, millisecond backoff, no retries inside the S3 client: an outage fails in well under a second."""
    monkeypatch.setenv("LMFORGE_STORAGE_ATTEMPTS", str(ATTEMPTS))
    monkeypatch.setenv("LMFORGE_STORAGE_RETRY_DELAY", "0.01")
    monkeypatch.setenv("LMFORGE_STORAGE_CLIENT_ATTEMPTS", "1")
    monkeypatch.setenv("LMFORGE_STORAGE_CONNECT_TIMEOUT", "2")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Link:
    """A TCP forwarder from a loopback port to ``target_port`` that can be cut and restored on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, free_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._live: list[socket.socket] = []
        self.restore()

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Stop listening (new connections are refused) and reset every live connection."""
        with self._lock:
            listener, self._listener, live, self._live = self._listener, None, self._live, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            listener.close()
        for sock in live:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._live += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class OnRecord(logging.Handler):
    """Calls ``action`` for each of the first ``times`` records of ``logger`` whose message contains ``text``."""

    def __init__(self, text: str, action: Callable[[], None], times: int) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.action, self.times, self.seen = text, action, times, 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen += 1
            if self.seen <= self.times:
                self.action()


@contextlib.contextmanager
def on_record(logger_name: str, text: str, action: Callable[[], None], times: int = 1_000) -> Iterator[OnRecord]:
    logger = logging.getLogger(logger_name)
    handler, level = OnRecord(text, action, times), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def link(s3_bucket: str, moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Link]:
    """The code under test reaches moto through a Link (the bucket already exists); yields the Link."""
    forward = Link(int(moto_server.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{forward.port}")
    yield forward
    forward.cut()


def direct(moto_server: str) -> s3fs.S3FileSystem:
    """A client straight to moto, sharing nothing with the code under test."""
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, endpoint_url=moto_server)


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    found = [r.getMessage() for r in caplog.records if r.name == "lmforge.infra.storage"]
    return [message for message in found if "retrying" in message]


OPERATIONS: dict[str, Callable[[str], object]] = {
    "write": lambda url: storage.write_bytes(url, b"data"),
    "read": storage.read_bytes,
    "exists": storage.exists,
    "list": storage.list_files,
    "remove": storage.remove,
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_an_unreachable_store_fails_after_the_attempts_with_an_error_naming_url_endpoint_and_attempts(
    operation: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    url = "s3://no-such-reachable-bucket/dir/object.bin"
    caplog.set_level(logging.WARNING, logger="lmforge.infra.storage")
    with pytest.raises(StorageUnavailable) as raised:
        OPERATIONS[operation](url)
    message = str(raised.value)
    assert url in message and endpoint in message and f"in {ATTEMPTS} attempt(s)" in message
    assert "EndpointConnectionError" in message and SECRET not in message
    assert isinstance(raised.value, OSError) and isinstance(raised.value.__cause__, botocore.exceptions.ConnectionError)
    assert len(retry_warnings(caplog)) == ATTEMPTS - 1


def test_an_upload_cut_off_before_it_completes_leaves_no_object_and_the_old_one_intact(
    link: Link, s3_bucket: str, moto_server: str
) -> None:
    url = f"{s3_bucket}/ckpt/step=0000008.ckpt"
    storage.write_bytes(url, b"the previous version")
    payload = bytes(range(256)) * 4096  # 1 MiB
    with on_record("s3fs", "Complete multi-part upload", link.cut), pytest.raises(StorageUnavailable) as raised:
        storage.write_bytes(url, payload)  # every attempt loses the store just before it completes
    assert url in str(raised.value) and f"in {ATTEMPTS} attempt(s)" in str(raised.value)
    link.restore()
    raw = direct(moto_server)
    assert raw.cat_file(url) == b"the previous version"
    assert raw.find(f"{s3_bucket}/ckpt") == [url.removeprefix("s3://")]  # no other object, partial or not


def test_an_upload_cut_off_once_is_retried_whole(
    link: Link, s3_bucket: str, moto_server: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    local = tmp_path / "step=0000012.ckpt"
    local.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    url = f"{s3_bucket}/ckpt/step=0000012.ckpt"
    caplog.set_level(logging.WARNING, logger="lmforge.infra.storage")
    with (on_record("s3fs", "Complete multi-part upload", link.cut, times=1),
          on_record("lmforge.infra.storage", "retrying", link.restore)):
        storage.upload_file(str(local), url)
    assert len(retry_warnings(caplog)) == 1
    assert direct(moto_server).cat_file(url) == local.read_bytes()


def test_a_store_that_comes_back_after_the_first_attempt_serves_the_retry(
    link: Link, s3_bucket: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    url = f"{s3_bucket}/data/shard.bin"
    storage.write_bytes(url, b"shard")
    caplog.set_level(logging.WARNING, logger="lmforge.infra.storage")
    link.cut()
    with on_record("lmforge.infra.storage", "retrying", link.restore):
        assert storage.read_bytes(url) == b"shard"
    link.cut()
    with on_record("lmforge.infra.storage", "retrying", link.restore):
        storage.download_file(url, str(tmp_path / "shard.bin"))
    assert (tmp_path / "shard.bin").read_bytes() == b"shard"
    assert len(retry_warnings(caplog)) == 2  # one failed attempt each


def test_a_missing_object_fails_at_once(s3_bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lmforge.infra.storage")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_bytes(f"{s3_bucket}/missing.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.download_file(f"{s3_bucket}/missing.bin", "/tmp/lmforge-unused")
    assert retry_warnings(caplog) == []


def client_error(status: int, code: str) -> botocore.exceptions.ClientError:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return botocore.exceptions.ClientError(response, "GetObject")  # type: ignore[arg-type]


def test_only_connection_failures_timeouts_and_5xx_are_transient() -> None:
    assert is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(client_error(503, "SlowDown")) and is_transient(client_error(500, "InternalError"))
    wrapped = OSError(16, "SlowDown")  # how s3fs hands a 503 on, with botocore's error as the cause
    wrapped.__cause__ = client_error(503, "SlowDown")
    assert is_transient(wrapped)
    assert not is_transient(client_error(403, "AccessDenied")) and not is_transient(client_error(404, "NoSuchKey"))
    assert not is_transient(PermissionError("denied")) and not is_transient(FileNotFoundError("gone"))
    assert not is_transient(botocore.exceptions.NoCredentialsError())


def test_the_s3_client_waits_and_retries_as_the_settings_say(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.fs_for("s3://bucket/key")
    assert path == "bucket/key" and fs.endpoint_url == "http://127.0.0.1:9"
    assert fs.config_kwargs == {"connect_timeout": 2.0, "retries": {"mode": "standard", "total_max_attempts": 1}}
    monkeypatch.setenv("LMFORGE_STORAGE_CLIENT_ATTEMPTS", "4")
    assert storage.fs_for("s3://bucket/key")[0].config_kwargs["retries"]["total_max_attempts"] == 4

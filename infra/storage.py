"""URL → fsspec filesystem helpers, so every stage reads and writes local paths and `s3://` URLs alike.

Writes that must never be seen half-done go through `atomic_write` (or `upload_file`, `download_file`, `copy`): a
local file appears by `os.replace` of a finished temporary file; an object-store write goes to a local temporary file
first and is then uploaded as a multipart upload that either completes (the object appears whole) or is aborted (no
object, and the old one stays).

An object store that does not answer is retried: every operation here (not the filesystem objects `fs_for` hands out,
whose clients only retry each request themselves) is tried up to ``LMFORGE_STORAGE_ATTEMPTS`` times with exponential
backoff from ``LMFORGE_STORAGE_RETRY_DELAY`` seconds, on connection errors, timeouts and 5xx answers only (a missing
object or a denied request fails at once). The last failure raises `StorageUnavailable`, naming the URL, the endpoint,
the attempts and the last error, with credentials masked. Uploads are retried whole, from the local file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from infra.secrets import S3_KEYS, export_s3_credentials, redact_text
from infra.settings import get_logger, get_settings, reject_password, root_scheme

log = get_logger(__name__)

T = TypeVar("T")
MAX_RETRY_DELAY = 30.0  # seconds: the backoff doubles up to this
RETRIED_HTTP_STATUS = frozenset({500, 502, 503, 504})  # the store's own trouble, worth asking again

# Filesystems whose `open(..., autocommit=False)` really defers the object until `commit()` (fsspec's memory
# filesystem accepts the flag but publishes the file at once, so it takes the temp-file-and-put route).
_DEFERRED_COMMIT_PROTOCOLS = frozenset({"s3", "s3a"})


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; an atomically written file should get the mode a plain open() would have given it.
_FILE_MODE = 0o666 & ~_read_umask()


def _check_url(url: str) -> None:
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"storage URL {url!r} is empty: expected a local path or a URL such as s3://bucket/key")
    reject_password(url, "storage URL")


def _s3_credentials(url: str) -> None:
    """Before the first S3 client exists: the keys from the Secret block, when one is named and the env has none."""
    if root_scheme(url) in ("s3", "s3a") and not all(os.environ.get(k) for k in S3_KEYS[:2]):
        export_s3_credentials(get_settings().s3_secret_block)


class StorageUnavailable(OSError):
    """An object store did not answer (connection refused or reset, timeout, 5xx) in any of the attempts."""


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _client_options(url: str) -> dict[str, Any]:
    """s3fs options: the client's own retries and connection wait bounded by the settings (botocore's defaults
    are 60 s connect timeouts and legacy retries, seconds per request). The endpoint from the environment is passed
    explicitly so that fsspec's instance cache gives a new client when it changes."""
    if root_scheme(url) not in ("s3", "s3a"):
        return {}
    settings = get_settings()
    config = {"connect_timeout": settings.storage_connect_timeout,
              "retries": {"mode": "standard", "total_max_attempts": settings.storage_client_attempts}}
    endpoint = _s3_endpoint()
    return {"config_kwargs": config, **({"endpoint_url": endpoint} if endpoint else {})}


def fs_for(url: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem that serves `url` and the path within it (absolute for local paths)."""
    _check_url(url)
    _s3_credentials(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **_client_options(url))
    except (ValueError, ImportError) as err:
        raise ValueError(f"cannot open storage URL {url!r}: {redact_text(str(err))}") from err
    return fs, path


def is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _to_url(fs: AbstractFileSystem, path: str, like: str) -> str:
    """Render `path` in the same style as the URL it came from (plain path stays plain, s3:// stays s3://)."""
    return fs.unstrip_protocol(path) if "://" in like else path


def _causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and the exceptions it was raised from (s3fs wraps botocore's errors in OSErrors that way). Not those it
    was raised while handling: a 404 met while cleaning up after a timeout is still a 404."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]  # builtin: refused/reset, socket timeouts
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError  # read timeouts, connections closed mid-request

        types += [BotoConnectionError, HTTPClientError]  # endpoint unreachable, connect timeouts
    return tuple(types)


def is_transient(err: BaseException) -> bool:
    """Whether asking the store again may help: no connection, a timeout, or a 5xx answer (not 404 or 403)."""
    for cause in _causes(err):
        if isinstance(cause, _transient_types()):
            return True
        response = getattr(cause, "response", None)  # botocore's ClientError carries the HTTP answer
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
        if status in RETRIED_HTTP_STATUS:
            return True
    return False


def _endpoint(fs: AbstractFileSystem) -> str:
    found = getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    return redact_text(str(found)) if found else "the default endpoint (no AWS_ENDPOINT_URL set)"


def _retrying(fs: AbstractFileSystem, url: str, what: str, op: Callable[[], T]) -> T:
    """``op()``, tried again after transient failures of a remote store (see the module docstring)."""
    if is_local(fs):
        return op()
    settings = get_settings()
    attempts = settings.storage_attempts
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except Exception as err:
            if not is_transient(err):
                raise
            last = err
        if attempt < attempts:
            delay = min(settings.storage_retry_delay * 2 ** (attempt - 1), MAX_RETRY_DELAY)
            log.warning("%s %s failed (attempt %d of %d: %s: %s); retrying in %.2f s", what, url, attempt, attempts,
                        type(last).__name__, last, delay)
            time.sleep(delay)
            _refresh(fs)
    raise StorageUnavailable(redact_text(
        f"cannot {what} {url}: the object store at {_endpoint(fs)} did not answer in {attempts} attempt(s) "
        f"(LMFORGE_STORAGE_ATTEMPTS={attempts}, first retry after LMFORGE_STORAGE_RETRY_DELAY="
        f"{settings.storage_retry_delay} s); last error: {type(last).__name__}: {last}"
    )) from last


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with `/`, whatever the filesystem."""
    _check_url(url)
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    if any(".." in p.split("/") for p in pieces):
        raise ValueError(f"cannot join {parts!r} onto {url!r}: '..' components are not allowed")
    if not pieces:
        return url
    base = url if url.endswith("/") else url + "/"
    return base + "/".join(pieces)


def _refresh(fs: AbstractFileSystem) -> None:
    """Object stores cache listings per process; another process may have written since, so forget them."""
    if not is_local(fs):
        fs.invalidate_cache()


def exists(url: str) -> bool:
    fs, path = fs_for(url)
    _refresh(fs)
    return bool(_retrying(fs, url, "check", lambda: fs.exists(path)))


def read_bytes(url: str) -> bytes:
    fs, path = fs_for(url)
    try:
        return _retrying(fs, url, "read", lambda: fs.cat_file(path))
    except StorageUnavailable:
        raise
    except FileNotFoundError as err:
        raise FileNotFoundError(f"cannot read {url!r}: no such file") from err
    except IsADirectoryError as err:
        raise IsADirectoryError(f"cannot read {url!r}: it is a directory") from err
    except OSError as err:
        raise OSError(f"cannot read {url!r}: {err}") from err


def read_text(url: str, encoding: str = "utf-8") -> str:
    data = read_bytes(url)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise ValueError(f"{url!r} is not valid {encoding} text: {err}") from err


def read_json(url: str) -> Any:
    text = read_text(url)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{url!r} is not valid JSON: {err}") from err


def write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` atomically (readers see the old object or the whole new one)."""
    with atomic_write(url) as f:
        f.write(data)


def write_text(url: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(url, text.encode(encoding))


def write_json(url: str, obj: Any, indent: int | None = 2) -> None:
    """Write JSON with sorted keys, so the same object always gives the same bytes."""
    write_text(url, json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n")


def _glob_files(fs: AbstractFileSystem, path: str, pattern: str, url: str) -> list[str]:
    _refresh(fs)
    found = _retrying(fs, url, "list", lambda: fs.glob(join(path, pattern) if pattern else path, detail=True))
    return sorted(name for name, info in found.items() if info.get("type") == "file")


def remove(url: str, missing_ok: bool = False) -> None:
    """Delete one file. Object stores delete missing keys silently, so check first to fail alike everywhere."""
    fs, path = fs_for(url)
    _refresh(fs)
    if not _is_file(fs, path, url):
        if missing_ok:
            return
        raise FileNotFoundError(f"cannot remove {url!r}: no such file")
    _retrying(fs, url, "remove", lambda: fs.rm_file(path))


def _is_file(fs: AbstractFileSystem, path: str, url: str) -> bool:
    """Like ``fs.isfile``, which answers False for any error, an unreachable store included."""
    try:
        info = _retrying(fs, url, "check", lambda: fs.info(path))
    except FileNotFoundError:
        return False
    return info.get("type") == "file"


def list_files(url: str, pattern: str = "*") -> list[str]:
    """Files (not directories) under `url` matching the glob `pattern` (`**` recurses), sorted."""
    fs, path = fs_for(url)
    return [_to_url(fs, name, url) for name in _glob_files(fs, path, pattern, url)]


@contextlib.contextmanager
def atomic_write(url: str) -> Iterator[IO[bytes]]:
    """Binary file for `url` that becomes visible only if the block finishes without an exception."""
    fs, path = fs_for(url)
    if is_local(fs):
        with _atomic_local(path) as f:
            yield f
        return
    # Spooled to a local file first, so that an upload cut short can be retried from the start.
    with tempfile.TemporaryDirectory(prefix="lmforge-put-") as tmpdir:
        tmp = os.path.join(tmpdir, "part")
        with open(tmp, "wb") as f:
            yield f
        _upload(fs, tmp, path, url)


def upload_file(local_path: str, url: str) -> None:
    """Copy the local file `local_path` to `url` atomically (retried whole while the store does not answer)."""
    fs, path = fs_for(url)
    if is_local(fs):
        with open(local_path, "rb") as src, _atomic_local(path) as dst:
            _copy_stream(src, dst)
    else:
        _upload(fs, local_path, path, url)


def download_file(url: str, local_path: str) -> None:
    """Copy the file at `url` to `local_path` atomically (a download cut short leaves nothing there)."""
    fs, path = fs_for(url)

    def once() -> None:
        with fs.open(path, "rb") as src, _atomic_local(os.path.abspath(local_path)) as dst:
            _copy_stream(src, dst)

    try:
        _retrying(fs, url, "download", once)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"cannot download {url!r}: no such file") from err


def copy(src_url: str, dst_url: str) -> None:
    """Copy one file atomically; within one object store the store copies it (no bytes pass through here)."""
    src_fs, src = fs_for(src_url)
    dst_fs, dst = fs_for(dst_url)
    if src_fs is dst_fs and not is_local(src_fs):  # fsspec hands out one instance per store and options
        _retrying(src_fs, dst_url, "copy to", lambda: src_fs.copy(src, dst))
    elif is_local(src_fs):
        upload_file(src, dst_url)
    elif is_local(dst_fs):
        download_file(src_url, dst)
    else:
        with tempfile.TemporaryDirectory(prefix="lmforge-copy-") as tmpdir:
            download_file(src_url, os.path.join(tmpdir, "file"))
            upload_file(os.path.join(tmpdir, "file"), dst_url)


def move(src_url: str, dst_url: str) -> None:
    """Rename one file (on an object store: copy, then delete the source; a crash in between leaves both)."""
    (src_fs, src), (dst_fs, dst) = fs_for(src_url), fs_for(dst_url)
    if is_local(src_fs) and is_local(dst_fs):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        return
    copy(src_url, dst_url)
    remove(src_url)


def _upload(fs: AbstractFileSystem, local_path: str, path: str, url: str) -> None:
    def once() -> None:
        if set(_protocols(fs)) & _DEFERRED_COMMIT_PROTOCOLS:
            with open(local_path, "rb") as src, _atomic_deferred(fs, path) as dst:
                _copy_stream(src, dst)
        else:
            _put(fs, local_path, path)

    _retrying(fs, url, "upload to", once)


@contextlib.contextmanager
def _atomic_local(path: str) -> Iterator[IO[bytes]]:
    """Temporary file in the target's directory (same filesystem, so `os.replace` is atomic), then rename."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _atomic_deferred(fs: AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """fsspec's deferred commit: parts upload while writing, the object exists only after `commit()`."""
    f = fs.open(path, "wb", autocommit=False)
    try:
        yield f
        f.close()
        f.commit()
    except BaseException:
        # Same order as fsspec's Transaction: close (flushes any open multipart upload), then abort it. The abort
        # fails too when the store is gone; the upload then stays pending, never an object (stores expire those).
        with contextlib.suppress(Exception):
            f.close()
        try:
            f.discard()
        except Exception as err:
            log.warning("could not abort the unfinished upload to %s (%s: %s)", path, type(err).__name__, err)
        log.debug("discarded unfinished write to %s", path)
        raise


def _put(fs: AbstractFileSystem, local_path: str, path: str) -> None:
    """Any other filesystem: upload the finished local file in one go."""
    parent = fs._parent(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.put_file(local_path, path)


def _relative_files(root: str) -> list[str]:
    """Files under a local directory, as sorted `/`-separated paths relative to it."""
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def upload_dir(local_dir: str, url: str) -> list[str]:
    """Copy every file under `local_dir` to `url` (each written atomically); returns the destination URLs."""
    if not os.path.isdir(local_dir):
        raise ValueError(f"cannot upload {local_dir!r}: it is not a local directory")
    written = []
    for rel in _relative_files(local_dir):
        dest = join(url, rel)
        upload_file(os.path.join(local_dir, rel), dest)
        written.append(dest)
    log.info("uploaded %d files from %s to %s", len(written), local_dir, url)
    return written


def download_dir(url: str, local_dir: str) -> list[str]:
    """Copy every file under `url` into `local_dir`, keeping relative paths; returns the local paths."""
    fs, base = fs_for(url)
    sources = _glob_files(fs, base, "**", url)
    if not sources:
        raise FileNotFoundError(f"cannot download {url!r}: no files there")
    written = []
    for src_path in sources:
        dest = os.path.join(local_dir, *_relative_to(src_path, base, url).split("/"))
        download_file(_to_url(fs, src_path, url), dest)
        written.append(dest)
    log.info("downloaded %d files from %s to %s", len(written), url, local_dir)
    return written


def _relative_to(path: str, base: str, url: str) -> str:
    base = base.rstrip("/")
    if not path.startswith(base + "/"):
        raise ValueError(f"listing {url!r} returned {path!r}, which is outside it")
    return path[len(base) + 1 :]


def _copy_stream(src: IO[bytes], dst: IO[bytes], chunk: int = 8 << 20) -> None:
    while block := src.read(chunk):
        dst.write(block)

"""URL → fsspec filesystem helpers, so every stage reads and writes local paths and `s3://` URLs alike.

Writes that must never be seen half-done go through `atomic_write`: a local file appears by `os.replace` of a
finished temporary file; an S3 object appears only when its (multipart) upload is completed at the end, and an
exception inside the block aborts the upload so that no object is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from infra.secrets import S3_KEYS, export_s3_credentials, redact_text
from infra.settings import get_logger, get_settings, reject_password, root_scheme

log = get_logger(__name__)

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


def fs_for(url: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem that serves `url` and the path within it (absolute for local paths)."""
    _check_url(url)
    _s3_credentials(url)
    try:
        fs, path = fsspec.core.url_to_fs(url)
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
    return bool(fs.exists(path))


def read_bytes(url: str) -> bytes:
    fs, path = fs_for(url)
    try:
        return fs.cat_file(path)
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


def _glob_files(fs: AbstractFileSystem, path: str, pattern: str) -> list[str]:
    _refresh(fs)
    found = fs.glob(join(path, pattern) if pattern else path, detail=True)
    return sorted(name for name, info in found.items() if info.get("type") == "file")


def remove(url: str, missing_ok: bool = False) -> None:
    """Delete one file. Object stores delete missing keys silently, so check first to fail alike everywhere."""
    fs, path = fs_for(url)
    _refresh(fs)
    if not fs.isfile(path):
        if missing_ok:
            return
        raise FileNotFoundError(f"cannot remove {url!r}: no such file")
    fs.rm_file(path)


def list_files(url: str, pattern: str = "*") -> list[str]:
    """Files (not directories) under `url` matching the glob `pattern` (`**` recurses), sorted."""
    fs, path = fs_for(url)
    return [_to_url(fs, name, url) for name in _glob_files(fs, path, pattern)]


@contextlib.contextmanager
def atomic_write(url: str) -> Iterator[IO[bytes]]:
    """Binary file for `url` that becomes visible only if the block finishes without an exception."""
    fs, path = fs_for(url)
    if is_local(fs):
        writer = _atomic_local(path)
    elif set(_protocols(fs)) & _DEFERRED_COMMIT_PROTOCOLS:
        writer = _atomic_deferred(fs, path)
    else:
        writer = _atomic_via_put(fs, path)
    with writer as f:
        yield f


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
    except BaseException:
        # Same order as fsspec's Transaction: close (flushes any open multipart upload), then abort it.
        with contextlib.suppress(Exception):
            f.close()
        f.discard()
        log.debug("discarded unfinished write to %s", path)
        raise
    f.close()
    f.commit()


@contextlib.contextmanager
def _atomic_via_put(fs: AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """Any other filesystem: write a local temporary file, upload it in one go only at the end."""
    with tempfile.TemporaryDirectory(prefix="lmforge-put-") as tmpdir:
        tmp = os.path.join(tmpdir, "part")
        with open(tmp, "wb") as f:
            yield f
        parent = fs._parent(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.put_file(tmp, path)


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
        with open(os.path.join(local_dir, rel), "rb") as src, atomic_write(dest) as dst:
            _copy_stream(src, dst)
        written.append(dest)
    log.info("uploaded %d files from %s to %s", len(written), local_dir, url)
    return written


def download_dir(url: str, local_dir: str) -> list[str]:
    """Copy every file under `url` into `local_dir`, keeping relative paths; returns the local paths."""
    fs, base = fs_for(url)
    sources = _glob_files(fs, base, "**")
    if not sources:
        raise FileNotFoundError(f"cannot download {url!r}: no files there")
    written = []
    for src_path in sources:
        dest = os.path.join(local_dir, *_relative_to(src_path, base, url).split("/"))
        with fs.open(src_path, "rb") as src, atomic_write(dest) as dst:
            _copy_stream(src, dst)
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

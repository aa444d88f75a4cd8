from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import s3fs

from infra import storage


@pytest.fixture(params=["local", "s3", "memory"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A writable, empty location on each kind of store."""
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://lmforge-{uuid.uuid4().hex[:8]}"
    bucket = request.getfixturevalue("s3_bucket")
    return storage.join(bucket, "prefix")


def _s3_raw() -> s3fs.S3FileSystem:
    """A client that shares no cache with the code under test."""
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def test_round_trips(base: str) -> None:
    storage.write_bytes(storage.join(base, "b.bin"), b"\x00\x01")
    storage.write_text(storage.join(base, "t.txt"), "héllo")
    storage.write_json(storage.join(base, "sub", "j.json"), {"b": [1, 2], "a": None})
    assert storage.read_bytes(storage.join(base, "b.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(base, "t.txt")) == "héllo"
    assert storage.read_json(storage.join(base, "sub", "j.json")) == {"a": None, "b": [1, 2]}
    assert storage.exists(storage.join(base, "t.txt"))
    assert not storage.exists(storage.join(base, "missing.txt"))


def test_write_json_is_byte_stable(base: str) -> None:
    storage.write_json(storage.join(base, "1.json"), {"b": 1, "a": 2})
    storage.write_json(storage.join(base, "2.json"), {"a": 2, "b": 1})
    assert storage.read_bytes(storage.join(base, "1.json")) == storage.read_bytes(storage.join(base, "2.json"))


def test_list_files_is_sorted_filtered_and_recursive(base: str) -> None:
    for name in ["b.jsonl", "a.jsonl", "c.txt", "deep/x/d.jsonl"]:
        storage.write_text(storage.join(base, name), name)
    top = storage.list_files(base, "*.jsonl")
    assert [u.rsplit("/", 1)[-1] for u in top] == ["a.jsonl", "b.jsonl"]
    everything = storage.list_files(base, "**")
    assert [u.rsplit("/", 1)[-1] for u in everything] == ["a.jsonl", "b.jsonl", "c.txt", "d.jsonl"]
    assert storage.read_text(everything[-1]) == "deep/x/d.jsonl"  # listed URLs read back as they are
    assert storage.list_files(storage.join(base, "nothing-here"), "*") == []


def test_atomic_write_replaces_existing_content(base: str) -> None:
    url = storage.join(base, "f.txt")
    storage.write_text(url, "old")
    with storage.atomic_write(url) as f:
        f.write(b"new ")
        f.write(b"content")
    assert storage.read_text(url) == "new content"


def test_atomic_write_leaves_nothing_when_the_block_raises(base: str) -> None:
    url = storage.join(base, "half.bin")
    with pytest.raises(RuntimeError, match="crash"), storage.atomic_write(url) as f:
        f.write(b"x" * 1000)
        raise RuntimeError("crash")
    assert not storage.exists(url)
    assert storage.list_files(base, "**") == []


def test_atomic_write_keeps_old_version_when_the_block_raises(base: str) -> None:
    url = storage.join(base, "keep.txt")
    storage.write_text(url, "complete")
    with pytest.raises(RuntimeError), storage.atomic_write(url) as f:
        f.write(b"partial")
        raise RuntimeError("crash")
    assert storage.read_text(url) == "complete"


def test_local_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    url = str(tmp_path / "d" / "x.bin")
    storage.write_bytes(url, b"1")
    with pytest.raises(KeyError), storage.atomic_write(url) as f:
        f.write(b"2")
        raise KeyError("boom")
    assert os.listdir(tmp_path / "d") == ["x.bin"]


def test_local_atomic_write_gives_the_usual_file_mode(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "atomic.bin"), b"1")
    (tmp_path / "plain.bin").write_bytes(b"1")
    assert (tmp_path / "atomic.bin").stat().st_mode == (tmp_path / "plain.bin").stat().st_mode


def test_s3_object_appears_only_at_commit(s3_bucket: str) -> None:
    url = storage.join(s3_bucket, "big.bin")
    raw = _s3_raw()
    payload = os.urandom(6 << 20)  # above s3fs's 5 MiB block: parts upload inside the block
    with storage.atomic_write(url) as f:
        f.write(payload)
        f.flush()
        assert not raw.exists(url)
    assert raw.cat_file(url) == payload


def test_s3_failed_write_leaves_no_object_and_no_pending_upload(s3_bucket: str) -> None:
    url = storage.join(s3_bucket, "big-failed.bin")
    with pytest.raises(RuntimeError), storage.atomic_write(url) as f:
        f.write(os.urandom(6 << 20))
        f.flush()
        raise RuntimeError("crash after a part was uploaded")
    raw = _s3_raw()
    assert not raw.exists(url)
    uploads = raw.call_s3("list_multipart_uploads", Bucket=s3_bucket.removeprefix("s3://"))
    assert uploads.get("Uploads", []) == []


def test_upload_and_download_dir_round_trip(base: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "nested" / "b.bin").write_bytes(b"B" * 10)
    uploaded = storage.upload_dir(str(src), storage.join(base, "tree"))
    assert len(uploaded) == 2
    dest = tmp_path / "dest"
    downloaded = storage.download_dir(storage.join(base, "tree"), str(dest))
    assert sorted(Path(p).relative_to(dest).as_posix() for p in downloaded) == ["a.txt", "nested/b.bin"]
    assert (dest / "a.txt").read_text() == "A"
    assert (dest / "nested" / "b.bin").read_bytes() == b"B" * 10


def test_remove_deletes_one_file(base: str) -> None:
    url = storage.join(base, "gone.txt")
    storage.write_text(url, "x")
    storage.remove(url)
    assert not storage.exists(url)
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        storage.remove(url)


def test_errors_name_the_url(base: str) -> None:
    url = storage.join(base, "no", "such.json")
    with pytest.raises(FileNotFoundError, match="such.json"):
        storage.read_json(url)
    with pytest.raises(FileNotFoundError, match="nothing"):
        storage.download_dir(storage.join(base, "nothing"), "/tmp/unused")


def test_bad_content_errors_name_the_url(tmp_path: Path) -> None:
    url = str(tmp_path / "bad.json")
    storage.write_bytes(url, b"{not json")
    with pytest.raises(ValueError, match="bad.json"):
        storage.read_json(url)
    storage.write_bytes(url, b"\xff\xfe")
    with pytest.raises(ValueError, match="bad.json"):
        storage.read_text(url)


@pytest.mark.parametrize("url", ["", "nosuchproto://x/y"])
def test_unusable_urls_are_value_errors(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        storage.fs_for(url)


def test_join() -> None:
    assert storage.join("s3://b/p/", "/x/", "y.txt") == "s3://b/p/x/y.txt"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.join("/tmp/a") == "/tmp/a"
    with pytest.raises(ValueError, match=r"\.\."):
        storage.join("/tmp/a", "../etc")


def test_fs_for_gives_absolute_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = storage.fs_for("rel/file.txt")
    assert storage.is_local(fs)
    assert path == f"{tmp_path}/rel/file.txt"

from __future__ import annotations

import os

import pytest

from infra.settings import Settings, default_tracking_uri, get_logger, get_settings

_VARS = ("LMFORGE_ROOT", "LMFORGE_TRACKING_URI", "LMFORGE_PRESET", "LMFORGE_STORAGE_ATTEMPTS",
         "LMFORGE_STORAGE_RETRY_DELAY", "LMFORGE_STORAGE_CLIENT_ATTEMPTS", "LMFORGE_STORAGE_CONNECT_TIMEOUT")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults_put_everything_under_local_root(tmp_path) -> None:
    settings = get_settings()
    assert settings.root == "./.lmforge"
    assert settings.preset == "tiny"
    assert settings.root_is_local
    assert settings.tracking_uri == f"sqlite:///{tmp_path}/.lmforge/mlflow.db"


def test_env_overrides_each_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_ROOT", "/data/lmforge")
    monkeypatch.setenv("LMFORGE_PRESET", "smoke")
    monkeypatch.setenv("LMFORGE_TRACKING_URI", "http://127.0.0.1:5001")
    settings = get_settings()
    assert (settings.root, settings.preset, settings.tracking_uri) == (
        "/data/lmforge",
        "smoke",
        "http://127.0.0.1:5001",
    )


def test_env_is_read_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_settings().preset == "tiny"
    monkeypatch.setenv("LMFORGE_PRESET", "small")
    assert get_settings().preset == "small"


def test_s3_root_tracks_in_a_local_directory(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("LMFORGE_ROOT", "s3://bucket/prefix")
    settings = get_settings()
    assert not settings.root_is_local
    assert settings.tracking_uri == f"sqlite:///{tmp_path}/.lmforge-tracking/mlflow.db"


def test_file_url_root_is_local(tmp_path) -> None:
    uri = default_tracking_uri(f"file://{tmp_path}/r")
    assert uri == f"sqlite:///{tmp_path}/r/mlflow.db"
    assert os.path.isabs(uri.removeprefix("sqlite:///"))


@pytest.mark.parametrize("root", ["", "   ", "gs://bucket/x", "http://host/x", "s3://"])
def test_bad_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, root: str) -> None:
    monkeypatch.setenv("LMFORGE_ROOT", root)
    with pytest.raises(ValueError, match="LMFORGE_ROOT"):
        get_settings()


def test_settings_accept_memory_root() -> None:
    assert Settings(root="memory://scratch").root == "memory://scratch"


def test_storage_retries_default_and_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    assert (settings.storage_attempts, settings.storage_retry_delay, settings.storage_client_attempts,
            settings.storage_connect_timeout) == (5, 1.0, 3, 10.0)
    monkeypatch.setenv("LMFORGE_STORAGE_ATTEMPTS", "2")
    monkeypatch.setenv("LMFORGE_STORAGE_RETRY_DELAY", "0.25")
    monkeypatch.setenv("LMFORGE_STORAGE_CLIENT_ATTEMPTS", "1")
    monkeypatch.setenv("LMFORGE_STORAGE_CONNECT_TIMEOUT", "3")
    settings = get_settings()
    assert (settings.storage_attempts, settings.storage_retry_delay, settings.storage_client_attempts,
            settings.storage_connect_timeout) == (2, 0.25, 1, 3.0)


@pytest.mark.parametrize(("name", "value"), [("LMFORGE_STORAGE_ATTEMPTS", "0"), ("LMFORGE_STORAGE_RETRY_DELAY", "-1"),
                                             ("LMFORGE_STORAGE_CLIENT_ATTEMPTS", "0"),
                                             ("LMFORGE_STORAGE_CONNECT_TIMEOUT", "0")])
def test_storage_retry_settings_reject_nonsense(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name.removeprefix("LMFORGE_").lower()):
        get_settings()


def test_loggers_hang_under_lmforge() -> None:
    assert get_logger("tasks.corpus").name == "lmforge.tasks.corpus"
    assert get_logger("lmforge.x").name == "lmforge.x"

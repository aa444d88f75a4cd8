"""Process-wide settings read from `LMFORGE_*` environment variables, and the project's logging helper."""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

from pydantic import field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT_SCHEMES = ("", "file", "s3", "memory")
REMOTE_TRACKING_DIR = "./.lmforge-tracking"  # where the MLflow sqlite file lives when the root is not on local disk


def get_logger(name: str) -> logging.Logger:
    """The one way lmforge code gets a logger: everything hangs under the `lmforge` logger."""
    short = name.removeprefix("lmforge.")
    return logging.getLogger(f"lmforge.{short}")


def root_scheme(root: str) -> str:
    """The URL scheme of a root (`""` for a plain local path)."""
    if "://" not in root:
        return ""
    return urlsplit(root).scheme.lower()


def is_local_root(root: str) -> bool:
    return root_scheme(root) in ("", "file")


def local_path(root: str) -> str:
    """Absolute local path of a local root (`file://` stripped)."""
    path = root[len("file://") :] if root_scheme(root) == "file" else root
    return os.path.abspath(os.path.expanduser(path))


def default_tracking_uri(root: str) -> str:
    """MLflow's sqlite store beside the data when the root is local, else in a local directory of its own."""
    base = local_path(root) if is_local_root(root) else os.path.abspath(REMOTE_TRACKING_DIR)
    return f"sqlite:///{base}/mlflow.db"


class Settings(BaseSettings):
    """Where lmforge keeps its files, where it tracks runs, and which size preset it runs."""

    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore")

    root: str = "./.lmforge"
    tracking_uri: str | None = None
    preset: str = "tiny"

    @field_validator("root")
    @classmethod
    def _check_root(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("LMFORGE_ROOT is empty: expected a local path or a URL such as s3://bucket/prefix")
        scheme = root_scheme(value)
        if scheme not in ROOT_SCHEMES:
            allowed = ", ".join(f"{s}://" for s in ROOT_SCHEMES if s)
            raise ValueError(
                f"LMFORGE_ROOT={value!r} has unsupported scheme {scheme!r}: expected a local path or one of {allowed}"
            )
        if scheme and not value.split("://", 1)[1].strip("/"):
            raise ValueError(f"LMFORGE_ROOT={value!r} names no location after {scheme}://")
        return value

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("LMFORGE_PRESET is empty: expected a preset name such as 'smoke' or 'tiny'")
        return value.strip()

    @model_validator(mode="after")
    def _derive_tracking_uri(self) -> Settings:
        if self.tracking_uri is None or not self.tracking_uri.strip():
            self.tracking_uri = default_tracking_uri(self.root)
        return self

    @property
    def root_is_local(self) -> bool:
        return is_local_root(self.root)


def get_settings() -> Settings:
    """Read settings from the environment now (no caching: tests and workers may change it between calls)."""
    return Settings()

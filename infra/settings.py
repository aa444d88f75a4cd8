"""Process-wide settings read from `LMFORGE_*` environment variables, and the project's logging helper."""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.secrets import RedactingFilter, has_password, redact_text

ROOT_SCHEMES = ("", "file", "s3", "memory")
REMOTE_TRACKING_DIR = "./.lmforge-tracking"  # where the MLflow sqlite file lives when the root is not on local disk


def get_logger(name: str) -> logging.Logger:
    """The one way lmforge code gets a logger: everything hangs under the `lmforge` logger, and every line is
    redacted (credentials masked) before any handler sees it."""
    short = name.removeprefix("lmforge.")
    logger = logging.getLogger(f"lmforge.{short}")
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):  # a logger's filters see only its own records
        logger.addFilter(RedactingFilter())
    return logger


def reject_password(url: str, what: str) -> str:
    """``url`` unchanged, or a ValueError when it embeds a password (which would then land in every record of it)."""
    if has_password(url):
        raise ValueError(f"{what}={redact_text(url)!r} embeds a password: pass credentials in environment variables "
                         "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD "
                         "or MLFLOW_TRACKING_TOKEN) or a Secret block (LMFORGE_S3_SECRET_BLOCK), not in the URL")
    return url


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
    """Where lmforge keeps its files, where it tracks runs, which size preset it runs, which Prefect Secret block
    holds the S3 keys when the environment has none (``infra.secrets.export_s3_credentials``), and how hard storage
    operations on an object store try before giving up (``infra.storage``).

    ``storage_attempts`` tries of each operation, ``storage_retry_delay`` seconds before the first retry, doubling
    after each (capped at 30 s); only connection errors, timeouts and 5xx answers are retried. Inside each try the S3
    client makes up to ``storage_client_attempts`` requests of its own (botocore's "standard" retries) and waits up to
    ``storage_connect_timeout`` seconds for a connection. Tests set all four low so an unreachable store fails fast.
    """

    # hide_input_in_errors: pydantic would otherwise print the rejected value (a URL with a password) in the error
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", hide_input_in_errors=True)

    root: str = "./.lmforge"
    tracking_uri: str | None = None
    preset: str = "tiny"
    s3_secret_block: str | None = None
    storage_attempts: int = Field(5, ge=1)
    storage_retry_delay: float = Field(1.0, ge=0)
    storage_client_attempts: int = Field(3, ge=1)
    storage_connect_timeout: float = Field(10.0, gt=0)

    @field_validator("root")
    @classmethod
    def _check_root(cls, value: str) -> str:
        value = reject_password(value.strip(), "LMFORGE_ROOT")
        if not value:
            raise ValueError("LMFORGE_ROOT is empty: expected a local path or a URL such as s3://bucket/prefix")
        scheme = root_scheme(value)
        if scheme not in ROOT_SCHEMES:
            allowed = ", ".join(f"{s}://" for s in ROOT_SCHEMES if s)
            raise ValueError(f"LMFORGE_ROOT={redact_text(value)!r} has unsupported scheme {scheme!r}: expected a local "
                             f"path or one of {allowed}")
        if scheme and not value.split("://", 1)[1].strip("/"):
            raise ValueError(f"LMFORGE_ROOT={value!r} names no location after {scheme}://")
        return value

    @field_validator("tracking_uri")
    @classmethod
    def _check_tracking_uri(cls, value: str | None) -> str | None:
        return None if value is None else reject_password(value, "LMFORGE_TRACKING_URI")

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

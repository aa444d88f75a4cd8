"""Credentials: where they come from (the environment, or a Prefect Secret block) and how they are kept out of what
lmforge records (MLflow params and tags, log lines, error messages).

``redact`` masks three things: values under credential-like keys (``password``, ``aws_secret_access_key``,
``MLFLOW_TRACKING_TOKEN``, ``AWS_ACCESS_KEY_ID``…, also as ``key=value`` / ``"key": "value"`` inside text), the
userinfo of URLs (``s3://key:secret@bucket`` → ``s3://***@bucket``), and the current values of credential-like
environment variables wherever they appear (so a third-party error message that echoes a key is caught too).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

MASK = "***"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
S3_SECRET_BLOCK_ENV = "LMFORGE_S3_SECRET_BLOCK"
MIN_ENV_SECRET_LEN = 8  # shorter environment values (moto's "testing") would mask ordinary words in every message

_SECRET_PARTS = ("secret", "password", "passwd", "credential")  # anywhere in a key
_SECRET_WORDS = frozenset({"auth", "apikey", "accesskey", "privatekey", "pwd"})  # a whole word of a key
_KEY_PAIRS = frozenset({("access", "key"), ("api", "key"), ("private", "key"), ("secret", "key")})
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/@\s'\"]+)@")
_ASSIGNMENT = re.compile(r"([A-Za-z_][\w.-]*)(['\"]?\s*[=:]\s*['\"]?)([^\s'\",;&}\])]+)")


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)  # camelCase → camel Case
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def is_secret_key(key: str) -> bool:
    """Whether a parameter / tag / variable name looks like it holds a credential.

    ``token`` counts only as the last word (``MLFLOW_TRACKING_TOKEN``), so ``max_tokens`` and ``token_ids`` stay.
    """
    lowered, words = key.lower(), _words(key)
    if any(part in lowered for part in _SECRET_PARTS) or _SECRET_WORDS.intersection(words):
        return True
    if words and words[-1] == "token":
        return True
    return bool(_KEY_PAIRS.intersection(zip(words, words[1:], strict=False)))


def _env_secrets() -> list[str]:
    values = {v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= MIN_ENV_SECRET_LEN}
    return sorted(values, key=len, reverse=True)  # longest first, so a value containing another is masked whole


def _mask_assignment(match: re.Match[str]) -> str:
    key, sep, _value = match.groups()
    return f"{key}{sep}{MASK}" if is_secret_key(key) else match.group(0)


def redact_text(text: str) -> str:
    """``text`` with URL userinfo, ``secret_key=value`` pairs and credential-like environment values masked."""
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    text = _ASSIGNMENT.sub(_mask_assignment, text)
    for value in _env_secrets():
        text = text.replace(value, MASK)
    return text


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())  # nothing to hide: say it is unset


def redact(value: Any) -> Any:
    """A copy of ``value`` safe to record: strings redacted, mappings with credential-like keys' values masked
    (at any depth), lists and tuples element by element; anything else is returned as it is."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: MASK if is_secret_key(str(k)) and not _empty(v) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


def has_password(url: str) -> bool:
    """Whether a URL carries a password in its userinfo (``scheme://user:password@host``)."""
    if "://" not in url:
        return False
    try:
        return urlsplit(url).password is not None
    except ValueError:  # a malformed port and the like: leave the URL's own checks to say what is wrong
        return False


class RedactingFilter(logging.Filter):
    """Formats the record's message once and masks credentials in it (installed on every lmforge logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave the record for logging's own error report
            return True
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = redact_text(message), None
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def export_s3_credentials(block: str | None) -> list[str]:
    """When the environment lacks the AWS keys, put those of the Prefect Secret block ``block`` into it (s3fs,
    boto3 and polars read them from there); returns the names set. The environment wins when it has both keys."""
    if not block or all(os.environ.get(k) for k in S3_KEYS[:2]):
        return []
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block).get()
    except ValueError as err:
        raise ValueError(f"{S3_SECRET_BLOCK_ENV}={block!r}: cannot load that Secret block from the Prefect API "
                         f"({redact_text(str(err))}); create it with Secret(value={{...}}).save({block!r})") from err
    found = json.loads(value) if isinstance(value, str) and value.lstrip().startswith("{") else value
    if not isinstance(found, Mapping) or not all(found.get(k) for k in S3_KEYS[:2]):
        raise ValueError(f"Secret block {block!r} ({S3_SECRET_BLOCK_ENV}) must hold a JSON object with "
                         f"{S3_KEYS[0]} and {S3_KEYS[1]} (and optionally {S3_KEYS[2]})")
    names = [k for k in S3_KEYS if found.get(k)]
    os.environ.update({k: str(found[k]) for k in names})
    return names

"""Credentials stay out of everything lmforge records: the redaction helper, URL checks, and a real data flow on S3
whose keys come from the environment or a Prefect Secret block, searched for in MLflow, Prefect, the bucket and
every written file."""

from __future__ import annotations

import json
import logging
import os
import secrets as random_secrets
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import s3fs
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from flows.data import DataParams, data_flow
from flows.params import Where
from infra import storage
from infra.secrets import MASK, export_s3_credentials, is_secret_key, redact, redact_text
from infra.settings import get_logger, get_settings
from infra.tracking import Tracker
from tasks.clean.quality import QualityConfig

SECRET = "wJalrXUtnFEMI-K7MDENG-" + "bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("key", ["password", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "aws_session_token",
                                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "s3.client_secret",
                                 "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "apiKey", "db_credentials"])
def test_credential_keys_are_recognised(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["tokens", "max_new_tokens", "tokenizer_url", "token_ids", "ptx_tokens", "author",
                                 "cache_key", "input", "quality.min_score", "lmforge.stage", "keyword"])
def test_ordinary_keys_are_left_alone(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_masks_nested_mappings_by_key_and_keeps_the_rest() -> None:
    params = {"input": "s3://bucket/raw", "max_new_tokens": 64, "unset_password": None,
              "s3": {"aws_secret_access_key": "abc", "endpoint": "http://127.0.0.1:9000", "nested": {"token": "t"}},
              "urls": ["https://user:pw@host/x", "s3://b/k"]}
    assert redact(params) == {"input": "s3://bucket/raw", "max_new_tokens": 64, "unset_password": None,
                              "s3": {"aws_secret_access_key": MASK, "endpoint": "http://127.0.0.1:9000",
                                     "nested": {"token": MASK}},
                              "urls": [f"https://{MASK}@host/x", "s3://b/k"]}


@pytest.mark.parametrize(("text", "expected"), [
    ("s3://AKIAEXAMPLE:hunter2@bucket/raw", f"s3://{MASK}@bucket/raw"),
    ("see https://alice:pa55@mlflow.example.com:5000/api", f"see https://{MASK}@mlflow.example.com:5000/api"),
    ("postgresql://mlflow:pw@db/mlflow", f"postgresql://{MASK}@db/mlflow"),
    ("AWS_SECRET_ACCESS_KEY=abc123 AWS_REGION=eu-west-1", f"AWS_SECRET_ACCESS_KEY={MASK} AWS_REGION=eu-west-1"),
    ('{"password": "hunter2", "user": "bob"}', f'{{"password": "{MASK}", "user": "bob"}}'),
    ("GET /x?token=abc&page=2", f"GET /x?token={MASK}&page=2"),
    ("no credentials here: s3://bucket/key, max_tokens=5", "no credentials here: s3://bucket/key, max_tokens=5"),
])
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_values_of_credential_variables_are_masked_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_SERVICE_TOKEN", SECRET)
    monkeypatch.setenv("LMFORGE_PRESET", "a-long-preset-name")  # not a credential name: its value stays
    assert redact_text(f"botocore said: {SECRET} is invalid (a-long-preset-name)") == \
        f"botocore said: {MASK} is invalid (a-long-preset-name)"


def test_lmforge_log_lines_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    log = get_logger("tests.secrets")
    with caplog.at_level(logging.INFO, logger="lmforge"):
        log.info("opening %s with password=%s", "s3://key:sk@bucket/x", "hunter2")
        try:
            raise OSError(f"connect to https://u:{SECRET}@host failed")
        except OSError:
            log.exception("upload failed")
    text = caplog.text
    assert f"s3://{MASK}@bucket/x" in text and f"password={MASK}" in text and "upload failed" in text
    assert "hunter2" not in text and SECRET not in text and ":sk@" not in text


def test_urls_with_passwords_are_refused_without_echoing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://AKIAEXAMPLE:{SECRET}@bucket/raw"
    for call in (lambda: Where(root=url), lambda: Where(tracking_uri=f"https://bob:{SECRET}@mlflow.example.com"),
                 lambda: storage.read_bytes(url), lambda: storage.join(url, "x")):
        with pytest.raises(ValueError, match="embeds a password") as err:
            call()
        assert SECRET not in str(err.value)
    monkeypatch.setenv("LMFORGE_TRACKING_URI", f"https://bob:{SECRET}@mlflow.example.com")
    with pytest.raises(ValidationError, match="embeds a password") as err:
        get_settings()
    assert SECRET not in str(err.value)
    assert Where(tracking_uri="postgresql://mlflow@db/mlflow").tracking() == "postgresql://mlflow@db/mlflow"


def test_tracker_stores_credentials_masked(tmp_path: Path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    ref = tracker.start_parent("p", {"endpoint": f"https://u:{SECRET}@host"})
    tracker.log_params(ref, {"s3": {"secret_key": SECRET, "bucket": "b"}, "note": f"password={SECRET}"})
    tracker.set_tags(ref, {"auth_token": SECRET})
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(ref.run_id)
    assert run.data.params == {"s3.secret_key": MASK, "s3.bucket": "b", "note": f"password={MASK}"}
    assert run.data.tags["endpoint"] == f"https://{MASK}@host" and run.data.tags["auth_token"] == MASK
    assert SECRET.encode() not in (tmp_path / "mlflow.db").read_bytes()


def test_environment_keys_win_over_a_secret_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-environment")
    assert export_s3_credentials("no-such-block") == []  # not even looked up: no Prefect API needed


# --- a real flow on moto's S3 and the session's Prefect server -------------------------------------------------


def _write_raw(fs: s3fs.S3FileSystem, url: str, docs: list[str]) -> None:
    lines = [json.dumps({"id": f"d{i}", "text": text, "source": "test", "meta": {}}) for i, text in enumerate(docs)]
    fs.pipe(f"{url}/text/shard-00000.jsonl".removeprefix("s3://"), ("\n".join(lines) + "\n").encode())


def _prefect_records(flow_run_id: Any) -> tuple[list[str], str]:
    """Log messages of the flow run and its subflow runs, and their parameters and artifacts as one JSON text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas import filters as f
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs travel in batches: send what is still queued
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=f.FlowRunFilter(
            parent_flow_run_id=f.FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(run.id for run in children)]
        messages, offset, by_run = [], 0, f.LogFilter(flow_run_id=f.LogFilterFlowRunId(any_=ids))
        while page := client.read_logs(by_run, limit=200, offset=offset):
            messages += [log.message for log in page]
            offset += len(page)
        in_runs = f.ArtifactFilter(flow_run_id=f.ArtifactFilterFlowRunId(any_=ids))
        artifacts = client.read_artifacts(artifact_filter=in_runs)
        recorded = [client.read_flow_run(i).parameters for i in ids] + [a.model_dump(mode="json") for a in artifacts]
    assert len(ids) >= 3, "expected the data flow and its clean-text and clean-code subflows"
    return messages, json.dumps(recorded, default=str)


def _local_files(*roots: Path, since: float = 0.0) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file() and p.stat().st_mtime >= since]


@pytest.mark.integration
@pytest.mark.parametrize("source", ["environment", "secret-block"])
def test_a_data_flow_on_s3_records_no_credentials(source: str, prefect_server: None, s3_bucket: str, prose: list[str],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.time()
    key_id, secret = f"AKIA{random_secrets.token_hex(8).upper()}", random_secrets.token_urlsafe(30)
    s3fs.S3FileSystem.clear_instance_cache()  # every S3 client from here on signs with these keys
    _write_raw(s3fs.S3FileSystem(key=key_id, secret=secret, skip_instance_cache=True), f"{s3_bucket}/raw", prose[:12])
    if source == "environment":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    else:
        from prefect.blocks.system import Secret

        block = f"lmforge-s3-{uuid.uuid4().hex[:8]}"
        Secret(value={"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}).save(block)
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # restored at teardown, over what the block exports
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("LMFORGE_S3_SECRET_BLOCK", block)
    where = Where(root=str(tmp_path / "root"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    params = DataParams(input=f"{s3_bucket}/raw", output=f"{s3_bucket}/clean", quality=QualityConfig(min_score=None),
                        where=where)
    state = data_flow(params, return_state=True)
    s3fs.S3FileSystem.clear_instance_cache()

    assert state.is_completed() and state.result()["lines"] == 12
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == (key_id, secret)
    needles = (key_id, secret)

    client = MlflowClient(where.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert {r.data.tags.get("lmforge.stage") for r in runs} >= {None, "data/text"}  # no code shards: no data/code run
    recorded = json.dumps([[r.info.run_name, r.data.params, r.data.tags] for r in runs])
    assert not [n for n in needles if n in recorded]

    messages, prefect_records = _prefect_records(state.state_details.flow_run_id)
    assert any("Completed" in m for m in messages)
    assert not [(n, m) for m in messages for n in needles if n in m]
    assert not [n for n in needles if n in prefect_records]

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    objects = fs.find(s3_bucket.removeprefix("s3://"))
    assert any(o.endswith("clean/ledger.json") for o in objects)
    assert not [(n, o) for o in objects for n in needles if n.encode() in fs.cat_file(o)]

    from prefect.settings import get_current_settings

    files = _local_files(tmp_path) + _local_files(Path(get_current_settings().results.local_storage_path),
                                                  since=started)
    assert any(f.name == "mlflow.db" for f in files)
    assert not [(n, f) for f in files for n in needles if n.encode() in f.read_bytes()]

"""The evaluate flow on a real (temporary) Prefect server with MLflow on SQLite: results land on the evaluated
model's run with artifacts and a Prefect report, a failure inside OpenCompass is retried and resumed by the task's
retry (and, when it persists, fails the flow with its cause), and `lmforge compare` shows the differences."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.evaluate import EvaluateParams, evaluate_flow
from flows.params import Where
from lmforge.cli import app
from tasks.evaluate.compare import compare_runs

FIXTURES = str(Path(__file__).resolve().parents[1] / "fixtures")


@pytest.fixture(scope="module")
def corpus(prose: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("clean")
    (root / "text").mkdir()
    lines = [json.dumps({"id": f"doc-{i:04d}", "text": t, "source": "stdlib", "meta": {}}) for i, t in enumerate(prose)]
    (root / "text" / "shard-00000.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


@pytest.fixture
def fixtures_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OpenCompass subprocess imports the fixture model classes from tests/fixtures."""
    monkeypatch.setenv("PYTHONPATH", FIXTURES)


def params(tmp_path: Path, corpus: str, **kw: Any) -> EvaluateParams:
    where = Where(root=str(tmp_path), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    data = kw.pop("data", None)
    checkpoint = data or str(tmp_path / "out" / "data")  # the answer key reads the sets it is given as `path`
    return EvaluateParams(checkpoint=checkpoint, tokenizer="", output=str(tmp_path / "out"), chat=True,
                          corpus=corpus, data=data, preset="smoke", where=where, **kw)


def test_results_land_on_the_model_run_with_a_report_and_the_champion(
    prefect_server: None, fixtures_importable: None, corpus: str, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("models")
    model_run = client.create_run(exp, run_name="sft-model").info.run_id
    p = params(tmp_path, corpus, model_run=model_run, register_as="chat-test", title="answer_key",
               model_class="oc_fixture_models.AnswerKeyModel")
    result = evaluate_flow(p)
    assert result["metrics"]["eval/average"] == 100.0
    run = client.get_run(model_run)
    assert run.data.metrics["eval/tool_use/tool_math"] == 100.0 and run.data.metrics["eval/average"] == 100.0
    assert run.data.tags["lmforge.checkpoint"] == p.checkpoint
    artifacts = {a.path for a in client.list_artifacts(model_run, "eval")}
    assert {"eval/summary.csv", "eval/scores.json", "eval/needle.png"} <= artifacts
    assert result["champion"]["promoted"] and client.get_model_version_by_alias("chat-test", "champion").run_id \
        == model_run

    async def report() -> list[Any]:
        key = ArtifactFilterKey(any_=["eval-answer-key"])
        async with get_client() as c:
            return await c.read_artifacts(artifact_filter=ArtifactFilter(key=key))

    (artifact,) = asyncio.run(report())[:1]
    assert artifact.type == "markdown" and "| **average** | | **100.0** |" in artifact.data


def test_a_failure_inside_opencompass_is_retried_and_resumed(
    prefect_server: None, fixtures_importable: None, corpus: str, tmp_path: Path
) -> None:
    marker = tmp_path / "raised"
    p = params(tmp_path, corpus, title="flaky", model_class="oc_fixture_models.FlakyModel",
               model_args={"marker": str(marker)})
    state = evaluate_flow(p, return_state=True)
    assert state.is_completed(), state.message
    assert marker.read_text() == "raised once"  # the first attempt failed inside OpenCompass …
    assert state.result()["metrics"]["eval/average"] == 100.0  # … and the task's retry finished the same run
    logs = list((tmp_path / "out" / "flaky").glob("run-*.log"))
    assert len(logs) == 1 and "simulated model failure" in logs[0].read_text()


def test_a_persistent_failure_fails_the_flow_with_its_cause(
    prefect_server: None, fixtures_importable: None, corpus: str, tmp_path: Path
) -> None:
    p = params(tmp_path, corpus, title="broken", model_class="oc_fixture_models.NoSuchModel")
    state = evaluate_flow(p, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="NoSuchModel"):
        state.result()


def test_compare_prints_the_differences(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp")
    a = client.create_run(exp, run_name="phase1").info.run_id
    b = client.create_run(exp, run_name="phase2").info.run_id
    for run, score, theta in ((a, 20.0, "50000"), (b, 35.0, "1000000")):
        client.log_metric(run, "eval/long_context/needle", score)
        client.log_metric(run, "eval/knowledge/knowledge_cloze", 40.0)
        client.log_param(run, "rope_theta", theta)
        client.log_param(run, "seed", "1")
    cmp = compare_runs(uri, ["phase1", b])  # by name or by id
    needle = next(m for m in cmp.metrics if m[0] == "eval/long_context/needle")
    assert needle[1] == [20.0, 35.0] and needle[2] == [0.0, 15.0]
    assert cmp.params == [("rope_theta", ["50000", "1000000"])]  # only the parameters that differ
    out = CliRunner().invoke(app, ["compare", a, b, "--tracking-uri", uri], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "+15.00" in out.output and "rope_theta" in out.output and "1000000" in out.output
    missing = CliRunner().invoke(app, ["compare", a, "nope", "--tracking-uri", uri])
    assert missing.exit_code == 2 and "nope" in missing.output
    with pytest.raises(ValueError, match="at least two"):
        compare_runs(uri, [a])


def test_eval_command_names_a_missing_input(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["eval", str(tmp_path / "ckpt"), "--tokenizer", "t.json", "--output",
                                   str(tmp_path / "o")], terminal_width=200)
    assert out.exit_code == 2 and "--data" in out.output and "--corpus" in out.output
    bad = CliRunner().invoke(app, ["eval", "ckpt", "--tokenizer", "t.json", "--output", "o", "--data", "d",
                                   "--preset", "huge"], terminal_width=200)
    assert bad.exit_code != 0 and "huge" in bad.output

"""The smoke pipeline end to end on a real (temporary) Prefect server, MLflow on SQLite, local and S3 roots."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from mlflow.tracking import MlflowClient

from flows.params import Where
from flows.pipeline import PipelineParams, pipeline_flow
from infra import storage
from model.checkpoint import load_model

STAGES = {"corpus", "data/text", "data/code", "tokenizer", "tokenize", "pretrain/phase1_short", "data/longtext",
          "pretrain/phase2_long", "data/capability-mix", "pretrain/phase3_capability", "sft/data", "sft", "export",
          "eval/data", "eval/phase1_short", "eval/phase2_long", "eval/phase3_capability", "eval/sft",
          "rlhf/data", "rlhf/reward_model", "rlhf/round1", "rlhf/round2", "eval/rlhf"}


STAGE_TASKS = {"build-corpus", "train-tokenizer", "tokenize", "pretrain-phase", "export-hf", "capability-mix",
               "longtext-shard", "sft-data", "sft-train", "eval-data", "opencompass", "champion", "rlhf-data",
               "reward-model", "ppo-round", "rlhf-report"}


def run_smoke(where: Where, **kw: Any) -> Any:
    return pipeline_flow(PipelineParams(preset="smoke", where=where, **kw), return_state=True)


def task_states(flow_run_id: Any) -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    async def read() -> list[tuple[str, str]]:
        async with get_client() as client:
            subflows = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
            ids = [flow_run_id, *(f.id for f in subflows)]
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            return [(r.name, r.state.name) for r in runs if r.name.rsplit("-", 1)[0] in STAGE_TASKS]

    return asyncio.run(read())


@pytest.fixture(scope="module")
def smoke_run(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Where, Any]:
    base = tmp_path_factory.mktemp("pipeline")
    where = Where(root=str(base / "root"), tracking_uri=f"sqlite:///{base}/mlflow.db")
    return where, run_smoke(where)


def test_pipeline_completes_and_learns(smoke_run: tuple[Where, Any]) -> None:
    where, state = smoke_run
    assert state.is_completed(), state.message
    result = state.result()
    assert set(result["final_losses"]) == {"phase1_short", "phase2_long", "phase3_capability", "sft"}
    assert set(result["sft_eval"]) == {"with_tools", "without_tools"}
    assert set(result["eval"]) == {"phase1_short", "phase2_long", "phase3_capability", "sft", "rlhf"}
    assert all(0.0 <= v <= 100.0 for v in result["eval"].values())
    # the RLHF model is version 2 of the chat model; it becomes champion only by beating the SFT model
    assert result["champion"]["version"] == 2
    assert result["champion"]["promoted"] == (result["eval"]["rlhf"] > result["eval"]["sft"])
    assert -1 <= result["rlhf"]["gold_reward"] <= 1 and 0 <= result["rlhf"]["hacking_rate"] <= 1
    assert all(loss < math.log(512) for loss in result["final_losses"].values())  # better than uniform
    phase1 = storage.read_json(storage.join(result["workdir"], "pretrain", "phase1_short", "final",
                                            "phase_result.json"))
    assert phase1["final_loss"] < phase1["first_loss"] - 0.2


def test_mlflow_parent_run_with_one_child_per_stage(smoke_run: tuple[Where, Any]) -> None:
    where, state = smoke_run
    parent_id = state.result()["mlflow_run_id"]
    client = MlflowClient(where.tracking_uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert {c.data.tags["lmforge.stage"] for c in children} == STAGES
    phase1 = next(c for c in children if c.data.tags["lmforge.stage"] == "pretrain/phase1_short")
    history = client.get_metric_history(phase1.info.run_id, "train/loss")
    assert len(history) == 12 and history[-1].value < history[0].value
    assert phase1.data.metrics["probe/copy_gain"] == pytest.approx(
        phase1.data.metrics["probe/copy_first_nll"] - phase1.data.metrics["probe/copy_repeat_nll"])
    assert "mix/long_token_share" in next(c for c in children
                                           if c.data.tags["lmforge.stage"] == "pretrain/phase2_long").data.metrics
    mix = next(c for c in children if c.data.tags["lmforge.stage"] == "data/capability-mix").data.metrics
    assert mix["reasoning/documents"] > 0 and mix["code/high_tier_documents"] > 0
    # each checkpoint's OpenCompass scores sit on the run that trained it; the better chat model is the champion
    assert "eval/knowledge/knowledge_cloze" in phase1.data.metrics and "eval/average" in phase1.data.metrics
    sft = next(c for c in children if c.data.tags["lmforge.stage"] == "sft")
    assert "eval/tool_use/tool_math" in sft.data.metrics and "probe/copy_gain" in sft.data.metrics
    assert "eval/tool_use/tool_math" not in phase1.data.metrics  # base models do not get the tool-use set
    rlhf = next(c for c in children if c.data.tags["lmforge.stage"] == "rlhf/round2")
    assert "eval/tool_use/tool_math" in rlhf.data.metrics and "round/gold_reward" in rlhf.data.metrics
    champion = client.get_model_version_by_alias("lmforge-chat", "champion")
    best = "rlhf" if state.result()["eval"]["rlhf"] > state.result()["eval"]["sft"] else "sft"
    assert champion.run_id == {"sft": sft, "rlhf": rlhf}[best].info.run_id
    assert champion.source.endswith({"sft": "sft/train/final", "rlhf": "rlhf/round2/actor"}[best])


def test_export_loads_in_transformers_with_our_logits(smoke_run: tuple[Where, Any]) -> None:
    _, state = smoke_run
    result = state.result()
    hf = transformers.AutoModelForCausalLM.from_pretrained(result["export"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(result["export"])
    ours = load_model(Path(result["workdir"]) / "rlhf" / "round2" / "actor")  # the aligned chat model ships
    ids = tok("def main():\n    return 42", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)


def test_rerun_with_same_parameters_comes_from_the_cache(smoke_run: tuple[Where, Any]) -> None:
    where, first = smoke_run
    second = run_smoke(where)
    assert second.is_completed()
    assert second.result()["final_losses"] == first.result()["final_losses"]
    states = task_states(second.state_details.flow_run_id)
    # corpus, tokenizer, 3 × tokenize, 3 × phase, capability mix, SFT data, SFT, RLHF data, reward model, 2 rounds,
    # RLHF report, export, a long-text task per shard, eval data, 5 × evaluate, 2 × champion
    assert len(states) >= 26 and {s for _, s in states} == {"Cached"}, states  # data-flow tasks too (below)


def test_missing_outputs_are_rebuilt_not_served_from_cache(smoke_run: tuple[Where, Any]) -> None:
    where, first = smoke_run
    work = first.result()["workdir"]
    storage.remove(storage.join(work, "export", "hf", "config.json"))
    again = run_smoke(where)
    assert again.is_completed()
    assert storage.exists(storage.join(work, "export", "hf", "config.json"))
    states = task_states(again.state_details.flow_run_id)
    assert [n.rsplit("-", 1)[0] for n, s in states if s == "Completed"] == ["export-hf"], states


def test_unreadable_input_fails_with_the_url(prefect_server: None, tmp_path: Path) -> None:
    where = Where(root=str(tmp_path / "root"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    state = run_smoke(where, input=str(tmp_path / "no-such-corpus"))
    assert state.is_failed()
    with pytest.raises(ValueError, match="no-such-corpus"):
        state.result()


def test_empty_corpus_fails_clearly(prefect_server: None, tmp_path: Path) -> None:
    (tmp_path / "empty" / "text").mkdir(parents=True)
    (tmp_path / "empty" / "text" / "shard-00000.jsonl").write_text("")
    where = Where(root=str(tmp_path / "root"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    state = run_smoke(where, input=str(tmp_path / "empty"))
    assert state.is_failed()
    with pytest.raises(ValueError, match="empty"):
        state.result()


def test_prefect_artifacts_for_a_person_to_read(smoke_run: tuple[Where, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read(key: str) -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    table = asyncio.run(read("pretrain-phase1-short"))
    assert table and table[0].type == "table" and "final loss" in str(table[0].data)
    corpus = asyncio.run(read("corpus"))
    assert corpus and "stdlib_doc" in str(corpus[0].data)
    progress = [a for a in asyncio.run(read("pretrain-phase1-short-progress")) if a.type == "progress"]
    assert progress and float(progress[0].data) == 100.0

"""Evaluate flow (InternLM2 §5): real OpenCompass over our local eval sets for one checkpoint, results to MLflow.

A base checkpoint gets knowledge, language, reasoning, coding and long-context sets; a chat checkpoint also tool use,
and may be registered (the `champion` alias moves only on improvement). The eval sets are built from the cleaned
corpus's held-out text unless a built folder is given. The checkpoint may be a registry URI such as
``models:/lmforge-chat@champion`` (the nightly schedule's): the flow resolves it to its checkpoint URL first.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel, Field

from flows.params import Where, parent_run
from infra import storage
from infra.tracking import RunRef
from tasks.evaluate.stages import MODELS_SCHEME, champion_task, eval_data_task, evaluate_task, resolve_checkpoint
from tasks.presets import pipeline_preset
from tasks.stages import reuse_if_present


class EvaluateParams(BaseModel):
    checkpoint: str = Field(description="the checkpoint to evaluate (a phase's or SFT's final/ directory URL), or a "
                                        "registered version: models:/lmforge-chat@champion")
    tokenizer: str = Field(description="tokenizer.json URL of that model")
    output: str = Field(description="where the scores, summary, heatmap and OpenCompass's work go")
    chat: bool = Field(False, description="a chat model: ChatML prompts, tool-use set, eligible for `champion`")
    data: str | None = Field(None, description="a folder of built eval sets (manifest.json); default: build them")
    corpus: str | None = Field(None, description="the cleaned corpus: held-out text for the sets, docs for search")
    sft_train: str | None = Field(None, description="SFT training chats (JSONL), also checked for contamination")
    preset: str = Field("tiny", description="pipeline preset whose eval-set sizes and settings to use")
    model_run: str | None = Field(None, description="MLflow run id of the evaluated model (its metrics go there)")
    register_as: str | None = Field(None, description="registered model name for a chat model (e.g. lmforge-chat)")
    model_class: str | None = Field(None, description="OpenCompass model type (dotted path) instead of ours")
    model_args: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the model")
    title: str = Field("model", description="a short label for reports and the MLflow child run")
    where: Where = Field(default_factory=Where)
    parent_run: RunRef | None = Field(None, description="MLflow parent run (set by the pipeline flow)")


def with_resolved_checkpoint(params: EvaluateParams) -> EvaluateParams:
    """`params` with a ``models:/NAME@ALIAS`` checkpoint replaced by the URL that model version was registered with."""
    if not params.checkpoint.startswith(MODELS_SCHEME):
        return params
    tracking = params.parent_run.tracking_uri if params.parent_run else params.where.tracking()
    return params.model_copy(update={"checkpoint": resolve_checkpoint(tracking, params.checkpoint)})


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: EvaluateParams) -> dict[str, Any]:
    params = with_resolved_checkpoint(params)
    plan = pipeline_preset(params.preset)
    with parent_run(params.where, f"eval-{params.title}", {"checkpoint": params.checkpoint},
                    params.parent_run) as parent:
        data = params.data
        if data is None:
            if params.corpus is None:
                raise ValueError("evaluate: pass `data` (built eval sets) or `corpus` (a cleaned corpus to build "
                                 "them from)")
            data = storage.join(params.output, "data")
            make = reuse_if_present(eval_data_task, storage.join(data, "manifest.json"))
            data = make(params.corpus, data, plan.eval_data, parent, params.sft_train)
        model_run = RunRef(parent.tracking_uri, params.model_run) if params.model_run else None
        run_cfg = plan.eval_run
        if params.model_class:
            run_cfg = run_cfg.model_copy(update={"model_class": params.model_class})
        if params.model_args:
            run_cfg = run_cfg.model_copy(update={"extra_model_args": {**run_cfg.extra_model_args,
                                                                      **params.model_args}})
        out = storage.join(params.output, params.title)
        evaluate = reuse_if_present(evaluate_task, storage.join(out, "scores.json"))
        result = evaluate(params.checkpoint, params.tokenizer, data, out, params.chat, run_cfg, parent, model_run,
                          params.corpus, params.title)
        if params.chat and params.register_as and parent.enabled:
            result["champion"] = champion_task(parent.tracking_uri, params.register_as, params.checkpoint,
                                               result["mlflow_run"], result["metrics"]["eval/average"])
        return result

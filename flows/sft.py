"""SFT flow (InternLM2 §4.1, §4.4): generated, checked chat data → fine-tuning from a base checkpoint → held-out
evaluation with and without tools. Each step is a cached, retryable task; training resumes from its checkpoints."""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel, Field

from flows.params import Where, parent_run
from infra import storage
from infra.tracking import RunRef
from tasks.presets import pipeline_preset
from tasks.pretrain import PhaseSpec
from tasks.stages import reuse_if_present, sft_data_task, sft_task


class SFTParams(BaseModel):
    base: str = Field(description="the checkpoint to fine-tune (a phase's final/ directory URL)")
    tokenizer: str = Field(description="tokenizer.json URL of that model")
    output: str = Field(description="where the SFT data, checkpoints and evaluation go")
    data: str | None = Field(None, description="a folder with train.jsonl / held_out.jsonl; default: generate")
    corpus: str | None = Field(None, description="a cleaned corpus: long-context items and the search plugin")
    preset: str = Field("tiny", description="pipeline preset whose SFT schedule, data sizes and evaluation to use")
    where: Where = Field(default_factory=Where)
    parent_run: RunRef | None = Field(None, description="MLflow parent run (set by the pipeline flow)")


@flow(name="sft", log_prints=True)
def sft_flow(params: SFTParams) -> dict[str, Any]:
    plan = pipeline_preset(params.preset)
    with parent_run(params.where, f"sft-{params.preset}", {"base": params.base}, params.parent_run) as parent:
        data_dir = storage.join(params.output, "data")
        make = reuse_if_present(sft_data_task, storage.join(data_dir, "stats.json"))
        data = params.data or make(params.corpus, data_dir, plan.sft_data, parent, plan.eval_data.holdout_share)
        train = reuse_if_present(sft_task, storage.join(params.output, "train", "eval.json"))
        return train(data, params.base, params.tokenizer, storage.join(params.output, "train"),
                     PhaseSpec(**plan.sft), plan.sft_eval, params.corpus, parent,
                     params.where.cold(params.preset, "sft", "train"))

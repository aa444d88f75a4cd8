"""Pretraining flow: phase 1 (short context, RoPE 50k) → phase 2 (8× context, RoPE 1M, half short data) → phase 3
(capability mix, smaller LR). Each phase is a retryable task that resumes from its last checkpoint."""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel, Field

from flows.params import Where, parent_run
from infra import storage
from infra.tracking import RunRef
from tasks.presets import pipeline_preset
from tasks.pretrain import PhaseSpec
from tasks.stages import phase_task, reuse_if_present


class PretrainParams(BaseModel):
    tokens: str = Field(description="token-shard manifest URL (…/tokens/manifest.json)")
    output: str = Field(description="directory URL for the phases' checkpoints")
    preset: str = Field("tiny", description="pipeline preset: smoke, tiny, small, internlm2-1_8b, -7b, -20b")
    init: str | None = Field(None, description="weights to start the first phase run from (a checkpoint URL)")
    phases: list[str] | None = Field(None, description="run only these phases (names, in preset order); default all")
    phase_tokens: dict[str, str] = Field(default_factory=dict,
                                         description="per-phase token manifests (phase name → URL) overriding tokens")
    where: Where = Field(default_factory=Where)
    parent_run: RunRef | None = Field(None, description="MLflow parent run (set by the pipeline flow)")


@flow(name="pretrain", log_prints=True)
def pretrain_flow(params: PretrainParams) -> list[dict[str, Any]]:
    plan = pipeline_preset(params.preset)
    names = [p.spec["name"] for p in plan.phases]
    unknown = sorted(set(params.phases or []) - set(names)) + sorted(set(params.phase_tokens) - set(names))
    if unknown:
        raise ValueError(f"unknown phase name(s) {unknown} in phases/phase_tokens: expected some of {names}")
    init, results = params.init, []
    with parent_run(params.where, f"pretrain-{params.preset}", {"preset": params.preset}, params.parent_run) as parent:
        for i, phase in enumerate(plan.phases):
            spec = PhaseSpec(**phase.spec)
            if params.phases is not None and spec.name not in params.phases:
                continue
            out = storage.join(params.output, spec.name)
            config = plan.model_config_for(i).to_dict()
            tokens = params.phase_tokens.get(spec.name, params.tokens)
            run = reuse_if_present(phase_task, storage.join(out, "final", "phase_result.json"))
            cold = params.where.cold(params.preset, "pretrain", spec.name)
            result = run(spec, config, tokens, out, init, phase.mix.model_dump(), parent, cold)
            init = result["native_url"]
            results.append({"name": spec.name, **result})
    return results


if __name__ == "__main__":
    import sys

    pretrain_flow(PretrainParams(tokens=sys.argv[1], output=sys.argv[2], preset="smoke"))

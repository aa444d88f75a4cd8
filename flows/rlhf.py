"""COOL RLHF flow (InternLM2 §4.2): preference data → conditional reward model (and its unconditional ablation) →
rounds of PPO, each followed by the fast path and the lagging slow path → the DPO baseline → a proxy-vs-gold report.
Every part is a cached, retryable task; a re-run skips finished rounds."""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel, Field

from flows.params import Where, parent_run
from infra import storage
from infra.tracking import RunRef
from tasks.presets import pipeline_preset
from tasks.rlhf.stages import dpo_task, reward_model_task, rlhf_data_task, rlhf_report_task, round_task
from tasks.rlhf.steps import RLHFInputs
from tasks.stages import reuse_if_present


class RLHFParams(BaseModel):
    sft: str = Field(description="the SFT checkpoint (its final/ directory URL): actor, reference, reward-model init")
    tokenizer: str = Field(description="tokenizer.json URL of that model")
    sft_data: str = Field(description="folder with the SFT train.jsonl / held_out.jsonl (prompts and seed pairs)")
    output: str = Field(description="where the RLHF data, reward models, rounds and report go")
    pairs: str | None = Field(None, description="extra preference pairs, JSONL {domain, prompt, chosen, rejected}")
    ptx_tokens: list[str] = Field(default_factory=list, description="token shard folders for the PTX loss")
    preset: str = Field("tiny", description="pipeline preset whose RLHF settings to use")
    rounds: int | None = Field(None, ge=1, description="online rounds (default: the preset's, the report's 3)")
    fast_path: bool = Field(True, description="patch the reward model on hacking patterns after each round")
    slow_path: bool = Field(True, description="broad gold-labelled reward-model update, lagging one round")
    dpo: bool = Field(True, description="also train the DPO baseline on the same preference data")
    ablation: bool = Field(True, description="also train an unconditional reward model for comparison")
    where: Where = Field(default_factory=Where)
    parent_run: RunRef | None = Field(None, description="MLflow parent run (set by the pipeline flow)")


@flow(name="rlhf", log_prints=True)
def rlhf_flow(params: RLHFParams) -> dict[str, Any]:
    base = pipeline_preset(params.preset).rlhf
    cfg = base.model_copy(update={"rounds": params.rounds or base.rounds, "fast_path": params.fast_path,
                                  "slow_path": params.slow_path})
    inputs = RLHFInputs(sft=params.sft, tokenizer=params.tokenizer, sft_data=params.sft_data, pairs=params.pairs,
                        ptx_tokens=params.ptx_tokens)
    out = params.output
    with parent_run(params.where, f"rlhf-{params.preset}", {"sft": params.sft}, params.parent_run) as parent:
        data = reuse_if_present(rlhf_data_task, storage.join(out, "data", "counts.json"))(
            inputs, cfg, storage.join(out, "data"), parent)
        rm0 = reuse_if_present(reward_model_task, storage.join(out, "rm0", "report.json"))(
            inputs, cfg, data, storage.join(out, "rm0"), params.ablation, parent)
        previous: dict[str, str | None] = {"actor": None, "critic": None, "rm": None, "slow": None}
        rounds = []
        for r in range(1, cfg.rounds + 1):
            run = reuse_if_present(round_task, storage.join(out, f"round{r}", "metrics.json"))
            result = run(inputs, cfg, r, data, rm0["url"], previous, storage.join(out, f"round{r}"), parent)
            previous, rounds = result["next"], [*rounds, result["metrics"]]
        dpo = None
        if params.dpo:
            dpo = reuse_if_present(dpo_task, storage.join(out, "dpo", "metrics.json"))(
                inputs, cfg, data, rm0["url"], storage.join(out, "dpo"), parent)
        rlhf_report_task(rounds, dpo["metrics"] if dpo else None, out, parent)
        return {"actor": previous["actor"], "reward_model": previous["rm"], "rounds": rounds,
                "run_id": result["run_id"], "reward_model_metrics": rm0["metrics"],
                "dpo": dpo["metrics"] if dpo else None}


if __name__ == "__main__":
    import sys

    print(rlhf_flow(RLHFParams.model_validate_json(sys.argv[1])))

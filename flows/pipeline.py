"""The whole pipeline: corpus → text and code cleaning → tokenizer → token shards → phase 1 → long-text selection
with the phase-1 model → phase 2 → capability mix → phase 3 → SFT (from the preset's base phase) → COOL RLHF (the
conditional reward model, rounds of PPO with fast and slow path) → HF export of the RLHF model → OpenCompass evaluation
of every phase's checkpoint (base-model sets) and of the SFT and RLHF models (all sets), each chat model registered
and made `champion` when it beats the current one.

Tokenization leaves a hashed share of the cleaned text out of every phase (`EvalDataConfig.holdout_share`): the
knowledge and language eval items are built from those documents, which no phase trained on.

Each phase reads its own token shards: phase 1 the whole clean corpus, phase 2 the long-text flow's corpus (long
documents that passed its filters, the short ones, dependency-sorted repositories), phase 3 the capability mix.

Every stage writes under ``<root>/<run_name>/`` and is a cached, retryable task: re-running with the same parameters
reuses finished stages, and an interrupted training phase resumes from its last checkpoint.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel, Field

from flows.data import DataParams, data_flow
from flows.evaluate import EvaluateParams, evaluate_flow
from flows.longtext import LongTextParams, longtext_flow
from flows.params import Where, parent_run
from flows.pretrain import PretrainParams, pretrain_flow
from flows.rlhf import RLHFParams, rlhf_flow
from flows.sft import SFTParams, sft_flow
from infra import storage
from infra.tracking import tracker_for
from model.config import get_preset
from tasks.presets import pipeline_preset
from tasks.stages import (
    capability_mix_task,
    corpus_task,
    export_task,
    reuse_if_present,
    tokenize_task,
    tokenizer_task,
)
from tasks.tokenize import token_manifest_url


class PipelineParams(BaseModel):
    preset: str = Field("tiny", description="smoke, tiny, small, internlm2-1_8b, internlm2-7b, internlm2-20b")
    input: str | None = Field(None, description="raw JSONL corpus directory (local or s3://); default: built in")
    where: Where = Field(default_factory=Where)


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params: PipelineParams = PipelineParams()) -> dict[str, Any]:  # noqa: B008 (the UI form default)
    plan = pipeline_preset(params.preset)
    work = params.where.workdir(params.preset)
    vocab = get_preset(plan.model).vocab_size
    with parent_run(params.where, f"pipeline-{params.preset}", {"preset": params.preset, "root": work}) as parent:
        corpus_dir, tok_dir, hf_dir = (storage.join(work, *p) for p in (["corpus"], ["tokenizer"], ["export", "hf"]))
        build = reuse_if_present(corpus_task, storage.join(corpus_dir, "manifest.json"))
        raw = params.input or build(corpus_dir, plan.corpus, parent)
        corpus = storage.join(work, "clean")
        data_flow(DataParams(input=raw, output=corpus, where=params.where, parent_run=parent))
        train_tok = reuse_if_present(tokenizer_task, storage.join(tok_dir, "tokenizer.json"))
        tokenizer = train_tok(corpus, tok_dir, vocab, plan.tokenizer_sample_bytes, parent)
        holdout = plan.eval_data.holdout_share
        tokens = reuse_if_present(tokenize_task, token_manifest_url(work))(corpus, tokenizer, work, parent, holdout)
        names = [p.spec["name"] for p in plan.phases]
        pretrain = PretrainParams(tokens=tokens, output=storage.join(work, "pretrain"), preset=params.preset,
                                  where=params.where, parent_run=parent)
        phases = pretrain_flow(pretrain.model_copy(update={"phases": names[:1]}))
        long_dir = storage.join(work, "longtext")
        longtext_flow(LongTextParams(input=corpus, output=long_dir, checkpoint=phases[-1]["native_url"],
                                     tokenizer=tokenizer, longtext=plan.longtext, perplexity=plan.perplexity,
                                     where=params.where, parent_run=parent))
        long_tokens = reuse_if_present(tokenize_task, token_manifest_url(long_dir))(long_dir, tokenizer, long_dir,
                                                                                       parent, holdout)
        phases += pretrain_flow(pretrain.model_copy(update={
            "phases": names[1:2], "init": phases[-1]["native_url"], "phase_tokens": {names[1]: long_tokens}}))
        mix_dir = storage.join(work, "capability")
        mix = reuse_if_present(capability_mix_task, storage.join(mix_dir, "composition.json"))(
            corpus, mix_dir, plan.capability, parent)
        mix_tokens = reuse_if_present(tokenize_task, token_manifest_url(mix_dir))(mix, tokenizer, mix_dir, parent,
                                                                                    holdout)
        phases += pretrain_flow(pretrain.model_copy(update={
            "phases": names[2:], "init": phases[-1]["native_url"], "phase_tokens": {names[2]: mix_tokens}}))
        base = next(p for p in phases if p["name"] == plan.sft_base)["native_url"]
        sft = sft_flow(SFTParams(base=base, tokenizer=tokenizer, output=storage.join(work, "sft"), corpus=corpus,
                                 preset=params.preset, where=params.where, parent_run=parent))
        rlhf = rlhf_flow(RLHFParams(
            sft=sft["native_url"], tokenizer=tokenizer, output=storage.join(work, "rlhf"), preset=params.preset,
            sft_data=storage.join(work, "sft", "data"), ptx_tokens=[storage.join(work, "tokens")], dpo=False,
            ablation=False, where=params.where, parent_run=parent))
        export = reuse_if_present(export_task, storage.join(hf_dir, "config.json"))
        hf = export(rlhf["actor"], tokenizer, hf_dir, parent)
        losses = {**{p["name"]: p["final_loss"] for p in phases}, "sft": sft["final_loss"]}
        accuracy = {f"sft/{k}/accuracy": v["accuracy"] for k, v in sft["eval"].items()}
        tracker_for(parent).log_metrics(parent, {**{f"final_loss/{k}": v for k, v in losses.items()}, **accuracy})
        evals = _evaluate_all(plan, params, work, corpus, tokenizer, phases, sft, rlhf, parent)
        tracker_for(parent).log_metrics(parent, {f"{name}/eval/average": e["metrics"]["eval/average"]
                                                 for name, e in evals.items()})
    return {"workdir": work, "mlflow_run_id": parent.run_id, "export": hf, "final_losses": losses,
            "sft_eval": {k: {m: v[m] for m in ("accuracy", "tool_calls_executed")} for k, v in sft["eval"].items()},
            "eval": {name: e["metrics"]["eval/average"] for name, e in evals.items()},
            "rlhf": rlhf["rounds"][-1], "champion": evals["rlhf"].get("champion")}


def _evaluate_all(plan: Any, params: PipelineParams, work: str, corpus: str, tokenizer: str,
                  phases: list[dict[str, Any]], sft: dict[str, Any], rlhf: dict[str, Any], parent: Any
                  ) -> dict[str, dict[str, Any]]:
    """OpenCompass on every phase's checkpoint (base sets), the SFT and the RLHF model (all sets, registered)."""
    out = storage.join(work, "eval")
    common = {"tokenizer": tokenizer, "output": out, "corpus": corpus, "preset": params.preset,
              "sft_train": storage.join(work, "sft", "data", "train.jsonl"),
              "where": params.where, "parent_run": parent}
    results = {}
    for phase in phases:
        results[phase["name"]] = evaluate_flow(EvaluateParams(
            checkpoint=phase["native_url"], chat=False, title=phase["name"], model_run=phase.get("run_id"), **common))
    results["sft"] = evaluate_flow(EvaluateParams(
        checkpoint=sft["native_url"], chat=True, title="sft", model_run=sft.get("run_id"),
        register_as=plan.register_as, **common))
    results["rlhf"] = evaluate_flow(EvaluateParams(
        checkpoint=rlhf["actor"], chat=True, title="rlhf", model_run=rlhf.get("run_id"),
        register_as=plan.register_as, **common))
    return results


if __name__ == "__main__":
    print(pipeline_flow(PipelineParams(preset="smoke")))

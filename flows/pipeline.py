"""The whole pipeline: corpus → text and code cleaning → tokenizer → token shards → phase 1 → long-text selection
with the phase-1 model → phase 2 → capability mix → phase 3 → SFT (from the preset's base phase) → HF export.

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
from flows.longtext import LongTextParams, longtext_flow
from flows.params import Where, parent_run
from flows.pretrain import PretrainParams, pretrain_flow
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
        tokens = reuse_if_present(tokenize_task, token_manifest_url(work))(corpus, tokenizer, work, parent)
        names = [p.spec["name"] for p in plan.phases]
        pretrain = PretrainParams(tokens=tokens, output=storage.join(work, "pretrain"), preset=params.preset,
                                  where=params.where, parent_run=parent)
        phases = pretrain_flow(pretrain.model_copy(update={"phases": names[:1]}))
        long_dir = storage.join(work, "longtext")
        longtext_flow(LongTextParams(input=corpus, output=long_dir, checkpoint=phases[-1]["native_url"],
                                     tokenizer=tokenizer, longtext=plan.longtext, perplexity=plan.perplexity,
                                     where=params.where, parent_run=parent))
        long_tokens = reuse_if_present(tokenize_task, token_manifest_url(long_dir))(long_dir, tokenizer, long_dir,
                                                                                       parent)
        phases += pretrain_flow(pretrain.model_copy(update={
            "phases": names[1:2], "init": phases[-1]["native_url"], "phase_tokens": {names[1]: long_tokens}}))
        mix_dir = storage.join(work, "capability")
        mix = reuse_if_present(capability_mix_task, storage.join(mix_dir, "composition.json"))(
            corpus, mix_dir, plan.capability, parent)
        mix_tokens = reuse_if_present(tokenize_task, token_manifest_url(mix_dir))(mix, tokenizer, mix_dir, parent)
        phases += pretrain_flow(pretrain.model_copy(update={
            "phases": names[2:], "init": phases[-1]["native_url"], "phase_tokens": {names[2]: mix_tokens}}))
        base = next(p for p in phases if p["name"] == plan.sft_base)["native_url"]
        sft = sft_flow(SFTParams(base=base, tokenizer=tokenizer, output=storage.join(work, "sft"), corpus=corpus,
                                 preset=params.preset, where=params.where, parent_run=parent))
        export = reuse_if_present(export_task, storage.join(hf_dir, "config.json"))
        hf = export(sft["native_url"], tokenizer, hf_dir, parent)
        losses = {**{p["name"]: p["final_loss"] for p in phases}, "sft": sft["final_loss"]}
        accuracy = {f"sft/{k}/accuracy": v["accuracy"] for k, v in sft["eval"].items()}
        tracker_for(parent).log_metrics(parent, {**{f"final_loss/{k}": v for k, v in losses.items()}, **accuracy})
    return {"workdir": work, "mlflow_run_id": parent.run_id, "export": hf, "final_losses": losses,
            "sft_eval": {k: {m: v[m] for m in ("accuracy", "tool_calls_executed")} for k, v in sft["eval"].items()}}


if __name__ == "__main__":
    print(pipeline_flow(PipelineParams(preset="smoke")))

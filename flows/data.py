"""Data flow: text cleaning as InternLM2 §3.1.1 does it — parse and validate (bad records quarantined), normalise
and identify the language, heuristic rules, exact then MinHash-LSH dedup, safety (blocklists, toxicity and adult
classifiers), model-based quality — with a ledger that accounts for every line.

One task run per shard for the per-shard stages (mapped), one for the cross-shard dedup; ``task_runner="dask"`` runs
the mapped stages on a local Dask cluster (``prefect-dask``).
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, unmapped
from pydantic import BaseModel, Field

from flows.params import Where, parent_run
from infra import storage
from infra.tracking import RunRef
from tasks.clean.quality import QualityConfig
from tasks.clean.safety import SafetyConfig
from tasks.clean.stages import fingerprint, raw_shards
from tasks.code.stages import CodeConfig
from tasks.stages import (
    clean_dedup_task,
    clean_finish_task,
    clean_quality_model_task,
    clean_report_task,
    clean_rules_task,
    code_dedup_task,
    code_finish_task,
    code_report_task,
    code_rules_task,
)

CLEAN_TASKS = (clean_rules_task, clean_dedup_task, clean_quality_model_task, clean_finish_task)


class DataParams(BaseModel):
    input: str = Field(description="raw corpus: a directory (local or s3://) of text/*.jsonl (and code/*.jsonl)")
    output: str = Field(description="where the clean corpus goes (text/, code/, removed/, quarantine/, ledger/)")
    rules: str = Field("builtin", description="rule preset: default (datatrove's thresholds) or builtin")
    safety: SafetyConfig = Field(default_factory=SafetyConfig, description="blocklists and safety classifiers")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="the model-based quality filter")
    code: CodeConfig = Field(default_factory=CodeConfig, description="the code pipeline's limits and quality tiers")
    code_tree: str | None = Field(None, description="a directory of repositories (one folder each) to clean as code")
    task_runner: Literal["default", "dask"] = Field("default", description="dask: mapped stages on a Dask cluster")
    where: Where = Field(default_factory=Where)
    parent_run: RunRef | None = Field(None, description="MLflow parent run (set by the pipeline flow)")


@flow(name="data", log_prints=True)
def data_flow(params: DataParams) -> dict[str, Any]:
    with parent_run(params.where, "data", {"input": params.input}, params.parent_run) as parent:
        text_flow, code_flow = clean_text_flow, clean_code_flow
        if params.task_runner == "dask":
            from prefect_dask import DaskTaskRunner

            # Threads in one process: each worker sees the same Prefect API as the flow (a process-based
            # cluster would start an ephemeral server per worker unless PREFECT_API_URL points at a real one).
            dask = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "processes": False, "threads_per_worker": 1})
            text_flow, code_flow = (f.with_options(task_runner=dask) for f in (text_flow, code_flow))
        text = text_flow(params, parent)
        code = code_flow(params, parent)
    return {**text, "code": code}


@flow(name="clean-text", log_prints=True)
def clean_text_flow(params: DataParams, parent: RunRef) -> dict[str, Any]:
    shards = raw_shards(params.input)
    names, urls = [n for n, _ in shards], [u for _, u in shards]
    versions = [fingerprint(u) for u in urls]  # part of the cache key: an edited shard is cleaned again
    fresh = not storage.exists(storage.join(params.output, "ledger.json"))  # outputs gone: rebuild, not cache
    rules_task, dedup_task, quality_task, finish_task = (t.with_options(refresh_cache=fresh) for t in CLEAN_TASKS)
    counts = rules_task.map(urls, names, params.output, params.rules, versions)
    dedup = dedup_task.submit(params.output, names, versions, wait_for=counts)
    model = quality_task.submit(params.output, names, params.quality, versions, wait_for=counts)
    model_url = model.result()  # its error, not a "not ready" from every shard, when it fails (runs beside dedup)
    ledgers = finish_task.map(names, params.output, versions, unmapped(params.safety), unmapped(params.quality),
                              unmapped(model_url), wait_for=[dedup])
    return clean_report_task(ledgers.result(), params.input, params.output, parent, model_url)


@flow(name="clean-code", log_prints=True)
def clean_code_flow(params: DataParams, parent: RunRef) -> dict[str, Any] | None:
    """Code shards (``code/*.jsonl`` of the input, and `code_tree` ingested) → repository documents; None if none."""
    from tasks.code.stages import code_shards, ingest_tree

    inputs = [params.input]
    if params.code_tree is not None:
        ingested = storage.join(params.output, "_work", "code", "ingest")
        ingest_tree(params.code_tree, ingested)
        inputs.append(ingested)
    shards = code_shards(inputs)
    if not shards:
        return None
    names, urls = [n for n, _ in shards], [u for _, u in shards]
    versions = [fingerprint(u) for u in urls]
    fresh = not storage.exists(storage.join(params.output, "code_ledger.json"))
    rules_task, dedup_task, finish_task = (t.with_options(refresh_cache=fresh)
                                           for t in (code_rules_task, code_dedup_task, code_finish_task))
    counts = rules_task.map(urls, names, params.output, unmapped(params.code), versions)
    dedup = dedup_task.submit(params.output, names, versions, wait_for=counts)
    ledger = finish_task.submit(params.output, names, params.code, versions, wait_for=[dedup])
    return code_report_task(ledger.result(), params.input, params.output, parent)


if __name__ == "__main__":
    import sys

    print(data_flow(DataParams(input=sys.argv[1], output=sys.argv[2])))

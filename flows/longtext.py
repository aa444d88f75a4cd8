"""Long-text flow (InternLM2 §3.1.3): phase 2's corpus from a cleaned one, scored with the phase-1 model.

One task run per clean text shard (mapped): long documents selected by length, statistical filters, then the
perplexity-difference filter; short documents and code repository documents pass unchanged. The report logs the
long/short shares and the context gains to MLflow and a table to Prefect.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped
from pydantic import BaseModel, Field

from flows.params import Where, parent_run
from infra import storage
from infra.tracking import RunRef
from tasks.clean.stages import fingerprint
from tasks.longtext.filters import LongTextConfig
from tasks.longtext.perplexity import PerplexityConfig
from tasks.stages import longtext_report_task, longtext_task


class LongTextParams(BaseModel):
    input: str = Field(description="a cleaned corpus (text/*.jsonl, code/*.jsonl), local or s3://")
    output: str = Field(description="where phase 2's corpus goes")
    checkpoint: str = Field(description="the scoring model: a checkpoint directory URL (phase 1's final)")
    tokenizer: str = Field(description="tokenizer.json URL of that model")
    longtext: LongTextConfig = Field(default_factory=LongTextConfig)
    perplexity: PerplexityConfig = Field(default_factory=PerplexityConfig)
    where: Where = Field(default_factory=Where)
    parent_run: RunRef | None = Field(None, description="MLflow parent run (set by the pipeline flow)")


@flow(name="longtext", log_prints=True)
def longtext_flow(params: LongTextParams) -> dict[str, Any]:
    urls = storage.list_files(storage.join(params.input, "text"), "*.jsonl")
    if not urls:
        raise ValueError(f"no text/*.jsonl under {params.input!r}: the long-text flow reads a cleaned corpus")
    names = [u.rstrip("/").rsplit("/", 1)[-1].removesuffix(".jsonl") for u in urls]
    versions = [fingerprint(u) for u in urls]
    with parent_run(params.where, "longtext", {"input": params.input}, params.parent_run) as parent:
        fresh = not storage.exists(storage.join(params.output, "ledger.json"))
        ledgers = longtext_task.with_options(refresh_cache=fresh).map(
            urls, names, params.output, params.checkpoint, params.tokenizer, unmapped(params.longtext),
            unmapped(params.perplexity), versions)
        return longtext_report_task(ledgers.result(), params.input, params.output, parent)

"""The long-text flow on a real (temporary) Prefect server: selection, filters, ledger, MLflow, phase-2 corpus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.longtext import LongTextParams, longtext_flow
from flows.params import Where
from model.checkpoint import save_native
from model.config import get_preset
from model.model import InternLM2
from model.tokenizer import Tokenizer
from tasks.longtext.filters import LongTextConfig
from tasks.longtext.perplexity import PerplexityConfig


@pytest.fixture(scope="module")
def scored(prefect_server: None, prose: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Where]:
    base = tmp_path_factory.mktemp("longtext")
    clean = base / "clean"
    (clean / "text").mkdir(parents=True)
    (clean / "code").mkdir()
    long_docs = ["\n\n".join(prose[i : i + 6]) for i in range(0, 30, 6)]  # five long documents of real prose
    repetitive = "the same line again and again\n" * 200  # long, but compresses to almost nothing
    records = [{"id": f"s{i}", "text": t, "source": "doc", "meta": {}} for i, t in enumerate(prose[40:50])]
    records += [{"id": f"l{i}", "text": t, "source": "doc", "meta": {}} for i, t in enumerate(long_docs)]
    records.append({"id": "rep", "text": repetitive, "source": "doc", "meta": {}})
    (clean / "text" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (clean / "code" / "repos-00000.jsonl").write_text(json.dumps({"id": "r1", "text": "# repo\n", "source": "code",
                                                                  "meta": {}}) + "\n")
    tokenizer = Tokenizer.train(prose, vocab_size=get_preset("smoke").vocab_size)
    tokenizer.save(base / "tokenizer.json")
    torch.manual_seed(0)
    save_native(InternLM2(get_preset("smoke")), base / "ckpt")
    where = Where(root=str(base), tracking_uri=f"sqlite:///{base}/mlflow.db")
    min_chars = min(len(t) for t in long_docs)
    assert min_chars > max(len(t) for t in prose[40:50])
    params = LongTextParams(
        input=str(clean), output=str(base / "out"), checkpoint=str(base / "ckpt"),
        tokenizer=str(base / "tokenizer.json"), longtext=LongTextConfig(min_chars=min_chars),
        perplexity=PerplexityConfig(segment_tokens=32, max_pairs=2, batch_size=4, min_gain=-100.0), where=where,
    )
    return base / "out", longtext_flow(params), where


def test_every_document_is_short_long_kept_or_removed_with_its_reason(scored: tuple[Path, Any, Where]) -> None:
    out, summary, _ = scored
    assert (summary["documents"], summary["short"], summary["long_kept"], summary["long_removed"]) == (16, 10, 5, 1)
    assert summary["removed"] == {"longtext/long_low_compression": 1}
    kept = [json.loads(x) for x in (out / "text" / "a.jsonl").read_text().splitlines()]
    assert len(kept) == 15 and "rep" not in {r["id"] for r in kept}
    long = [r for r in kept if r["meta"].get("long")]
    assert len(long) == 5 and all(isinstance(r["meta"]["ppl_gain"], float) for r in long)
    assert 0 < summary["long_char_share"] < 1 and summary["long_char_share"] + summary["short_char_share"] == 1
    assert (out / "code" / "repos-00000.jsonl").exists()


def test_mlflow_has_the_shares_and_gains(scored: tuple[Path, Any, Where]) -> None:
    _, summary, where = scored
    client = MlflowClient(where.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id],
                              "tags.`lmforge.stage` = 'data/longtext'")
    metrics = runs[0].data.metrics
    assert metrics["long_char_share"] == pytest.approx(summary["long_char_share"])
    assert metrics["removed/longtext/long_low_compression"] == 1

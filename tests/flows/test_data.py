"""The text-cleaning flow on a real (temporary) Prefect server: ledger, quarantine, idempotence, Dask, S3."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from flows.data import DataParams, data_flow
from flows.params import Where
from infra import storage
from tasks.clean.dedup import DedupConfig
from tasks.clean.ledger import Ledger
from tasks.clean.quality import QualityConfig
from tasks.clean.safety import read_list
from tasks.clean.stages import dedup_stage, finish_stage, rules_stage

BAD_LINES = {
    "invalid_json": b'{"text": "unterminated',
    "invalid_utf8": b'{"text": "caf\xe9 au lait", "source": "x"}',
    "missing_field": b'{"id": "m1", "meta": {}}',
    "wrong_type": b'{"text": 42, "source": "x"}',
    "nul_byte": b'{"text": "a\\u0000b", "source": "x"}',
    "empty_text": b'{"text": "   ", "source": "x"}',
    "not_an_object": b"[1, 2, 3]",
}


CODE_UTIL = '''"""Helpers for the demo: greeting people by name."""


def greet(name: str) -> str:
    """A friendly greeting for `name`."""
    return f"Hello, {name}!"
'''
CODE_MAIN = '''"""The demo's entry point: greets everyone named on the command line."""

import sys

from demo.util import greet


def main(argv: list[str]) -> int:
    """Print a greeting per name; returns the exit status."""
    for name in argv:
        print(greet(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
'''


def record(text: str, i: int, source: str = "test", url: str | None = None) -> bytes:
    meta = {} if url is None else {"url": url}
    return json.dumps({"id": f"d{i}", "text": text, "source": source, "meta": meta}).encode()


def write_corpus(root: Path, shards: list[list[bytes]]) -> Path:
    (root / "text").mkdir(parents=True)
    for k, lines in enumerate(shards):
        (root / "text" / f"shard-{k:05d}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, prose: list[str]) -> Path:
    docs = prose[:41]
    shard0 = [record(t, i) for i, t in enumerate(docs[:20])] + list(BAD_LINES.values())
    shard1 = [record(t, 100 + i) for i, t in enumerate(docs[20:40])]
    shard1 += [record(docs[40], 300, url=f"https://videos.{read_list('builtin', 'blocked_domains.txt')[0]}/x")]
    shard1 += [record(docs[0], 200), record(docs[1].replace(" ", "  "), 201)]  # exact and whitespace duplicates
    root = write_corpus(tmp_path_factory.mktemp("raw"), [shard0, shard1])
    (root / "code").mkdir()
    code = [{"repo": "demo", "path": "demo/util.py", "text": CODE_UTIL},
            {"repo": "demo", "path": "demo/main.py", "text": CODE_MAIN},
            {"repo": "demo", "path": "README.md", "text": "# demo\n\nA demonstration.\n"}]
    (root / "code" / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in code) + "not json\n")
    return root


@pytest.fixture(scope="module")
def cleaned(prefect_server: None, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Where, Any]:
    base = tmp_path_factory.mktemp("clean")
    where = Where(root=str(base), tracking_uri=f"sqlite:///{base}/mlflow.db")
    result = data_flow(DataParams(input=str(corpus), output=str(base / "out"), where=where))
    return base / "out", where, result


def test_every_line_is_accounted_for(corpus: Path, cleaned: tuple[Path, Where, Any]) -> None:
    out, _, result = cleaned
    ledger = Ledger.model_validate(json.loads((out / "ledger.json").read_text())).check()
    lines = sum(len(f.read_bytes().splitlines()) for f in (corpus / "text").iterdir())
    assert ledger.lines == lines == result["lines"]
    assert ledger.quarantined == {code: 1 for code in BAD_LINES}
    kept = sum(len((out / "text" / f).read_text().splitlines()) for f in ("shard-00000.jsonl", "shard-00001.jsonl"))
    assert kept == ledger.kept


def test_quarantine_names_line_and_error(cleaned: tuple[Path, Where, Any]) -> None:
    out, _, _ = cleaned
    rows = [json.loads(line) for line in (out / "quarantine" / "shard-00000.jsonl").read_text().splitlines()]
    by_error = {r["error"]: r["line"] for r in rows}
    assert by_error == {code: 21 + i for i, code in enumerate(BAD_LINES)}  # 20 good lines come first


def test_removed_documents_carry_stage_and_reason_and_kept_carry_language(cleaned: tuple[Path, Where, Any]) -> None:
    out, _, _ = cleaned
    removed = pl.read_parquet(out / "removed" / "shard-00001.parquet")
    assert {"stage", "reason", "text", "line"} <= set(removed.columns)
    kept = [json.loads(x) for x in (out / "text" / "shard-00000.jsonl").read_text().splitlines()]
    assert kept and all(doc["meta"]["lang"] == "en" for doc in kept)
    kept_ids = {doc["id"] for doc in kept}
    dups = set(removed.filter(pl.col("stage") == "dedup")["id"].to_list())
    pairs = [(orig, copy) for orig, copy in (("d0", "d200"), ("d1", "d201")) if orig in kept_ids]
    assert pairs and all(copy in dups for _, copy in pairs)  # the later copy (exact, or whitespace-edited) goes
    reasons = dict(zip(removed["id"], removed["reason"], strict=True))
    assert reasons["d300"] == "safety_blocked_domain"
    assert all(0 <= doc["meta"][k] <= 1 for doc in kept for k in ("toxicity", "adult", "quality"))


def test_mlflow_and_funnel(cleaned: tuple[Path, Where, Any]) -> None:
    out, where, result = cleaned
    client = MlflowClient(where.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id],
                              "tags.`lmforge.stage` = 'data/text'")
    metrics = runs[0].data.metrics
    assert runs and metrics["docs/kept"] == result["kept"]
    for name in ("adult", "toxicity", "quality"):
        assert 0 <= metrics[f"classifier/{name}/precision"] <= 1 and 0 <= metrics[f"classifier/{name}/recall"] <= 1
    assert (out / "quality_model.npz").exists() and "held_out" in json.loads((out / "quality_model.json").read_text())
    code = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id],
                              "tags.`lmforge.stage` = 'data/code'")
    assert code and code[0].data.metrics["repos"] == result["code"]["repos"] == 1
    assert result["code"]["files"] == 4 and result["code"]["quarantined"] == {"invalid_json": 1}
    doc = json.loads((out / "code" / "repos-00000.jsonl").read_text())
    assert doc["meta"]["order"] == ["README.md", "demo/util.py", "demo/main.py"]
    assert (out / "code_funnel.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "funnel.png").read_bytes()[:4] == b"\x89PNG"


def test_cleaning_its_own_output_removes_nothing(prefect_server: None, cleaned: tuple[Path, Where, Any]) -> None:
    out, where, first = cleaned
    same_model = QualityConfig(model=str(out / "quality_model.npz"))  # the same filters: retraining would differ
    again = data_flow(DataParams(input=str(out), output=str(out.parent / "again"), quality=same_model, where=where))
    assert again["removed"] == {} and again["quarantined"] == {}  # the text; code/ now holds documents, not files
    assert again["kept"] == first["kept"]


def test_dask_runner_gives_the_same_ledger(prefect_server: None, corpus: Path, cleaned: tuple[Path, Where, Any],
                                           tmp_path: Path) -> None:
    _, where, first = cleaned
    dask = data_flow(DataParams(input=str(corpus), output=str(tmp_path / "dask"), task_runner="dask", where=where))
    assert dask == first


@pytest.mark.integration
def test_input_on_s3_works_like_local(prefect_server: None, corpus: Path, cleaned: tuple[Path, Where, Any],
                                      s3_bucket: str) -> None:
    _, where, first = cleaned
    storage.upload_dir(str(corpus), f"{s3_bucket}/raw")
    result = data_flow(DataParams(input=f"{s3_bucket}/raw", output=f"{s3_bucket}/clean", where=where))
    assert result == first
    assert storage.exists(f"{s3_bucket}/clean/ledger.json")
    assert storage.list_files(f"{s3_bucket}/clean/text", "*.jsonl")


LINE_KINDS = st.sampled_from(["good", "dup", *BAD_LINES])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(LINE_KINDS, min_size=1, max_size=12), min_size=1, max_size=3), st.integers(0, 10**6))
def test_ledger_balances_on_random_shards(tmp_path: Path, prose: list[str], kinds: list[list[str]], seed: int) -> None:
    docs, rng = prose, random.Random(seed)
    shards = [[BAD_LINES[k] if k in BAD_LINES else record(rng.choice(docs[:3] if k == "dup" else docs), i)
               for i, k in enumerate(shard)] for shard in kinds]
    root = write_corpus(tmp_path / f"raw-{seed}-{len(str(kinds))}", shards)
    out = str(root / "out")
    names = [f"shard-{k:05d}" for k in range(len(shards))]
    for name in names:
        rules_stage(str(root / "text" / f"{name}.jsonl"), name, out, "builtin", DedupConfig())
    dedup_stage(out, names, DedupConfig())
    ledger = Ledger(shards=[finish_stage(name, out) for name in names]).check()
    assert ledger.lines == sum(len(s) for s in shards)
    assert sum(ledger.quarantined.values()) == sum(k in BAD_LINES for s in kinds for k in s)

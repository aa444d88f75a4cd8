"""The text-cleaning stages as plain functions over storage URLs (the Prefect flow maps them over shards).

1. ``rules_stage`` (per shard): parse and validate → quarantine, normalise + language id, heuristic rules, and the
   shard's exact and MinHash signatures for dedup.
2. ``dedup_stage`` (once, across shards): band buckets → clusters.
3. ``finish_stage`` (per shard): drop duplicates, write the clean shard, its removed documents with reasons, its
   quarantine, and its ledger (which must balance).

Every stage writes its outputs atomically and finishes by writing a marker, so a re-run skips finished work and a
crash in the middle leaves nothing that looks complete.

Layout under ``out_url``: ``text/<shard>.jsonl`` (kept, ``meta.lang`` added), ``removed/<shard>.parquet`` (with
``stage`` and ``reason``), ``quarantine/<shard>.jsonl`` (line, error, detail, raw excerpt), ``ledger/<shard>.json``;
intermediates under ``<out_url>/_work``.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

import polars as pl

from infra import storage
from tasks.clean.dedup import DedupConfig, band_buckets, clusters, filter_shard, shard_signatures
from tasks.clean.ledger import ShardLedger
from tasks.clean.parse import normalize, parse_shard
from tasks.clean.rules import apply_rules, rule_config

WORK = "_work"


def raw_shards(input_url: str) -> list[tuple[str, str]]:
    """(name, url) of the raw text shards: ``text/*.jsonl`` under the input, else ``*.jsonl`` at its top."""
    found = storage.list_files(storage.join(input_url, "text"), "*.jsonl") if _is_dir(input_url) else []
    found = found or (storage.list_files(input_url, "*.jsonl") if _is_dir(input_url) else [])
    if not found:
        raise ValueError(f"no JSONL shards under {input_url!r}: expected text/*.jsonl or *.jsonl there")
    names = [url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".jsonl") for url in found]
    if len(set(names)) != len(names):
        raise ValueError(f"shard names under {input_url!r} repeat: {sorted(names)}")
    return list(zip(names, found, strict=True))


def _is_dir(url: str) -> bool:
    fs, path = storage.fs_for(url)
    return bool(fs.isdir(path))


def _url(work_url: str, kind: str, name: str) -> str:
    return storage.join(work_url, WORK, "rules", f"{name}.{kind}")


def write_frame(url: str, df: pl.DataFrame) -> None:
    buf = io.BytesIO()
    df.write_parquet(buf)
    storage.write_bytes(url, buf.getvalue())


def read_frame(url: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(storage.read_bytes(url)))


def fingerprint(url: str) -> str:
    """Size and modification time (or ETag) of a raw shard: a changed input is not served from stored results."""
    fs, path = storage.fs_for(url)
    info = fs.info(path)
    return f"{info.get('size')}:{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"


def rules_stage(raw_url: str, name: str, out_url: str, rules: str, dedup: DedupConfig) -> dict[str, Any]:
    """Parse, normalise, apply the rules and hash one shard; returns its counts (stored; reused on re-run)."""
    marker = _url(out_url, "counts.json", name)
    version = {"input": raw_url, "fingerprint": fingerprint(raw_url), "rules": rules}
    if storage.exists(marker) and storage.read_json(marker).get("version") == version:
        return storage.read_json(marker)
    _forget_downstream(out_url, name)
    parsed = parse_shard(storage.read_bytes(raw_url), name)
    kept, removed = apply_rules(normalize(parsed.docs), rule_config(rules).rules())
    outputs = {"kept.parquet": kept, "removed.parquet": removed, "quarantine.parquet": parsed.quarantine}
    for kind, frame in outputs.items():
        write_frame(_url(out_url, kind, name), frame)
    work = storage.join(out_url, WORK, "dedup")
    shard_signatures(kept, name, work, dedup)
    counts = {"shard": name, "lines": parsed.lines, "kept_after_rules": len(kept), "version": version}
    storage.write_json(marker, counts)
    return counts


def _forget_downstream(out_url: str, name: str) -> None:
    """A shard cleaned anew invalidates its signatures, the cross-shard clusters and every shard's ledger."""
    work = storage.join(out_url, WORK, "dedup")
    stale = [storage.join(work, kind, f"{name}.parquet") for kind in ("exact", "minhash")]
    for folder in (storage.join(work, "buckets"), storage.join(work, "clusters"), storage.join(out_url, "ledger")):
        stale += storage.list_files(folder, "**") if _is_dir(folder) else []
    for url in [*stale, storage.join(out_url, "ledger.json")]:
        storage.remove(url, missing_ok=True)


def dedup_stage(out_url: str, names: list[str], dedup: DedupConfig) -> str:
    """Band buckets and clusters across every shard; returns the clusters URL."""
    work = storage.join(out_url, WORK, "dedup")
    band_buckets(work, dedup, names)
    return clusters(work, dedup)


def finish_stage(name: str, out_url: str) -> ShardLedger:
    """Write the clean shard, removed documents, quarantine and the shard's ledger (checked)."""
    ledger_url = storage.join(out_url, "ledger", f"{name}.json")
    if storage.exists(ledger_url):
        return ShardLedger.model_validate(storage.read_json(ledger_url))
    counts = storage.read_json(_url(out_url, "counts.json", name))
    kept, duplicates = filter_shard(read_frame(_url(out_url, "kept.parquet", name)), name,
                                    storage.join(out_url, WORK, "dedup"))
    removed = pl.concat([read_frame(_url(out_url, "removed.parquet", name)), duplicates], how="diagonal_relaxed")
    quarantine = read_frame(_url(out_url, "quarantine.parquet", name))
    storage.write_bytes(storage.join(out_url, "text", f"{name}.jsonl"), _records(kept))
    write_frame(storage.join(out_url, "removed", f"{name}.parquet"), removed)
    storage.write_bytes(storage.join(out_url, "quarantine", f"{name}.jsonl"), _ndjson(quarantine))
    ledger = ShardLedger(
        shard=name, lines=counts["lines"], kept=len(kept),
        removed=dict(Counter(f"{s}/{r}" for s, r in removed.select("stage", "reason").iter_rows())),
        quarantined=dict(Counter(quarantine["error"].to_list())),
    ).check()
    storage.write_json(ledger_url, ledger.model_dump())
    return ledger


def _records(kept: pl.DataFrame) -> bytes:
    """Kept documents as corpus records, the detected language added to ``meta`` (one JSON object a line)."""
    lines = []
    for doc in kept.select("id", "text", "source", "meta", "lang").iter_rows(named=True):
        meta = {**json.loads(doc["meta"] or "{}"), "lang": doc["lang"]}
        lines.append(json.dumps({"id": doc["id"], "text": doc["text"], "source": doc["source"], "meta": meta},
                                ensure_ascii=False))
    return ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")


def _ndjson(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_ndjson(buf)
    return buf.getvalue()


def copy_code(input_url: str, out_url: str) -> int:
    """Code shards pass through unchanged (the code pipeline is its own stage); returns how many were copied."""
    urls = storage.list_files(storage.join(input_url, "code"), "*.jsonl") if _is_dir(input_url) else []
    for url in urls:
        storage.write_bytes(storage.join(out_url, "code", url.rstrip("/").rsplit("/", 1)[-1]), storage.read_bytes(url))
    return len(urls)

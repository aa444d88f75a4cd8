"""The text-cleaning stages as plain functions over storage URLs (the Prefect flow maps them over shards).

1. ``rules_stage`` (per shard): parse and validate → quarantine, normalise + language id, heuristic rules, and the
   shard's exact and MinHash signatures for dedup.
2. ``dedup_stage`` (once, across shards): band buckets → clusters.
3. ``quality_model_stage`` (once): train the quality classifier on the rule-passing documents (or load a given one).
4. ``finish_stage`` (per shard): drop duplicates, then the safety and quality filters (InternLM2's order: rules →
   dedup → safety → quality); write the clean shard, its removed documents with reasons, its quarantine, and its
   ledger (which must balance).

Every stage writes its outputs atomically and finishes by writing a marker, so a re-run skips finished work and a
crash in the middle leaves nothing that looks complete.

Layout under ``out_url``: ``text/<shard>.jsonl`` (kept; ``meta`` gains ``lang`` and the ``toxicity``, ``adult`` and
``quality`` scores that were computed), ``removed/<shard>.parquet`` (with ``stage`` and ``reason``),
``quarantine/<shard>.jsonl`` (line, error, detail, raw excerpt), ``ledger/<shard>.json``, ``quality_model.npz`` (the
trained quality classifier, reusable with ``QualityConfig(model=...)``); intermediates under ``<out_url>/_work``.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

import polars as pl

from infra import storage
from tasks.clean.classify import TextClassifier
from tasks.clean.dedup import DedupConfig, band_buckets, clusters, filter_shard, shard_signatures
from tasks.clean.ledger import Ledger, ShardLedger
from tasks.clean.parse import normalize, parse_shard
from tasks.clean.quality import QualityConfig, apply_quality, train_quality
from tasks.clean.rules import FAMILIES, apply_rules, rule_config
from tasks.clean.safety import SafetyConfig, apply_safety

WORK = "_work"
QUALITY_MODEL = "quality_model.npz"
SCORES = ("toxicity", "adult", "quality")  # columns the filters add; they go into meta
FUNNEL = (*FAMILIES, "dedup", "safety", "quality")  # stages in the order documents meet them


def raw_shards(input_url: str) -> list[tuple[str, str]]:
    """(name, url) of the raw text shards: ``text/*.jsonl`` under the input, else ``*.jsonl`` at its top."""
    found = storage.list_files(storage.join(input_url, "text"), "*.jsonl") if is_dir(input_url) else []
    found = found or (storage.list_files(input_url, "*.jsonl") if is_dir(input_url) else [])
    if not found:
        raise ValueError(f"no JSONL shards under {input_url!r}: expected text/*.jsonl or *.jsonl there")
    names = [url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".jsonl") for url in found]
    if len(set(names)) != len(names):
        raise ValueError(f"shard names under {input_url!r} repeat: {sorted(names)}")
    return list(zip(names, found, strict=True))


def is_dir(url: str) -> bool:
    fs, path = storage.fs_for(url)
    return bool(fs.isdir(path))


def work_dir(out_url: str, *sub: str) -> str:
    """Where a pipeline keeps its intermediates: ``<out_url>/_work[/sub…]`` (text: none; code: "code")."""
    return storage.join(out_url, WORK, *sub)


def rules_url(work: str, kind: str, name: str) -> str:
    return storage.join(work, "rules", f"{name}.{kind}")


def _url(out_url: str, kind: str, name: str) -> str:
    return rules_url(work_dir(out_url), kind, name)


def stored_counts(work: str, name: str, version: dict[str, Any]) -> dict[str, Any] | None:
    """A shard's first-stage counts when they were made from the same `version` of its input and settings."""
    marker = rules_url(work, "counts.json", name)
    if storage.exists(marker) and storage.read_json(marker).get("version") == version:
        return storage.read_json(marker)
    return None


def save_first_stage(
    work: str, name: str, frames: dict[str, pl.DataFrame], lines: int, version: dict[str, Any], dedup: DedupConfig
) -> dict[str, Any]:
    """Write a shard's kept/removed/quarantine frames and dedup signatures, then its counts marker (last)."""
    for kind, frame in frames.items():
        write_frame(rules_url(work, f"{kind}.parquet", name), frame)
    shard_signatures(frames["kept"], name, storage.join(work, "dedup"), dedup)
    counts = {"shard": name, "lines": lines, "kept_after_rules": len(frames["kept"]), "version": version}
    storage.write_json(rules_url(work, "counts.json", name), counts)
    return counts


def forget_downstream(work: str, name: str, also: list[str]) -> None:
    """A shard processed anew invalidates its signatures, the cross-shard buckets and clusters, and `also`
    (folders: every file in them; files)."""
    dedup = storage.join(work, "dedup")
    stale = [storage.join(dedup, kind, f"{name}.parquet") for kind in ("exact", "minhash")]
    for url in [storage.join(dedup, "buckets"), storage.join(dedup, "clusters"), *also]:
        stale += storage.list_files(url, "**") if is_dir(url) else [url]
    for url in stale:
        storage.remove(url, missing_ok=True)


def cluster_stage(work: str, names: list[str], dedup: DedupConfig) -> str:
    """Band buckets and clusters across the shards' signatures under `work`; returns the clusters URL."""
    band_buckets(storage.join(work, "dedup"), dedup, names)
    return clusters(storage.join(work, "dedup"), dedup)


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
    version = {"input": raw_url, "fingerprint": fingerprint(raw_url), "rules": rules}
    work = work_dir(out_url)
    stored = stored_counts(work, name, version)
    if stored is not None:
        return stored
    quality = [storage.join(out_url, f) for f in (QUALITY_MODEL, "quality_model.json")]
    forget_downstream(work, name, [storage.join(out_url, "ledger"), *quality, storage.join(out_url, "ledger.json")])
    parsed = parse_shard(storage.read_bytes(raw_url), name)
    kept, removed = apply_rules(normalize(parsed.docs), rule_config(rules).rules())
    frames = {"kept": kept, "removed": removed, "quarantine": parsed.quarantine}
    return save_first_stage(work, name, frames, parsed.lines, version, dedup)


def dedup_stage(out_url: str, names: list[str], dedup: DedupConfig) -> str:
    """Band buckets and clusters across every shard; returns the clusters URL."""
    return cluster_stage(work_dir(out_url), names, dedup)


def quality_model_stage(out_url: str, names: list[str], cfg: QualityConfig) -> str | None:
    """The quality model's URL: `cfg.model` if given, else one trained on the shards' rule-passing documents
    (stored at ``<out_url>/quality_model.npz``, its report beside it); None when the quality filter is off."""
    if cfg.min_score is None:
        return None
    if cfg.model is not None:
        TextClassifier.load(cfg.model)  # fail here, with the URL named, rather than in every shard
        return cfg.model
    url, report_url = storage.join(out_url, QUALITY_MODEL), storage.join(out_url, "quality_model.json")
    version = {"shards": sorted(names), "config": cfg.model_dump()}
    if storage.exists(url) and storage.exists(report_url) and storage.read_json(report_url).get("version") == version:
        return url
    texts = pl.concat([read_frame(_url(out_url, "kept.parquet", n)).select("text") for n in sorted(names)])
    model = train_quality(texts.get_column("text").to_list(), cfg)
    model.save(url)
    storage.write_json(report_url, {"version": version, **model.info})
    return url


def filters_version(safety: SafetyConfig, quality: QualityConfig, quality_model: str | None) -> str:
    """What the finish stage's filters depend on: a stored ledger with another version is recomputed."""
    model = None if quality_model is None else fingerprint(quality_model)
    return json.dumps({"safety": safety.model_dump(), "quality": quality.model_dump(), "model": model}, sort_keys=True)


def finish_stage(
    name: str, out_url: str, safety: SafetyConfig | None = None, quality: QualityConfig | None = None,
    quality_model: str | None = None,
) -> ShardLedger:
    """Drop duplicates, filter for safety and quality, and write the clean shard, removed documents, quarantine
    and the shard's ledger (checked). `quality_model` is `quality_model_stage`'s URL (None: no quality filter)."""
    safety = safety or SafetyConfig()
    quality = quality or QualityConfig(min_score=None)
    if quality.min_score is not None and quality_model is None:
        raise ValueError("finish_stage: QualityConfig.min_score is set but no quality_model URL was given: "
                         "run quality_model_stage first (or set min_score=None)")
    version = filters_version(safety, quality, quality_model)
    ledger_url = storage.join(out_url, "ledger", f"{name}.json")
    if storage.exists(ledger_url):
        stored = ShardLedger.model_validate(storage.read_json(ledger_url))
        if stored.filters == version:
            return stored
    counts = storage.read_json(_url(out_url, "counts.json", name))
    kept, duplicates = filter_shard(read_frame(_url(out_url, "kept.parquet", name)), name,
                                    storage.join(work_dir(out_url), "dedup"))
    kept, unsafe = apply_safety(kept, safety)
    removed_parts = [read_frame(_url(out_url, "removed.parquet", name)), duplicates, unsafe]
    if quality_model is not None:
        kept, low = apply_quality(kept, TextClassifier.load(quality_model), quality)
        removed_parts.append(low)
    removed = pl.concat(removed_parts, how="diagonal_relaxed")
    quarantine = read_frame(_url(out_url, "quarantine.parquet", name))
    storage.write_bytes(storage.join(out_url, "text", f"{name}.jsonl"), _records(kept))
    write_frame(storage.join(out_url, "removed", f"{name}.parquet"), removed)
    storage.write_bytes(storage.join(out_url, "quarantine", f"{name}.jsonl"), _ndjson(quarantine))
    ledger = ShardLedger(
        shard=name, lines=counts["lines"], kept=len(kept),
        removed=dict(Counter(f"{s}/{r}" for s, r in removed.select("stage", "reason").iter_rows())),
        quarantined=dict(Counter(quarantine["error"].to_list())), filters=version,
    ).check()
    storage.write_json(ledger_url, ledger.model_dump())
    return ledger


def classifier_metrics(ledger: Ledger, quality_model: str | None) -> dict[str, float]:
    """Held-out precision/recall of the classifiers that ran (by the removal reasons present), for MLflow."""
    out: dict[str, float] = {}
    reports: dict[str, dict[str, Any]] = {}
    if any(s.filters and json.loads(s.filters)["safety"]["max_adult"] is not None for s in ledger.shards):
        from tasks.clean.safety import adult_classifier

        reports["adult"] = adult_classifier().info["held_out"]
    if any(s.filters and json.loads(s.filters)["safety"]["max_toxicity"] is not None for s in ledger.shards):
        from tasks.clean.safety import evaluate_toxicity

        reports["toxicity"] = evaluate_toxicity()
    if quality_model is not None:
        reports["quality"] = TextClassifier.load(quality_model).info.get("held_out", {})
    for name, report in reports.items():
        out.update({f"classifier/{name}/{k}": float(v) for k, v in report.items() if isinstance(v, int | float)})
    return out


def _records(kept: pl.DataFrame) -> bytes:
    """Kept documents as corpus records, language and scores added to ``meta`` (one JSON object a line)."""
    lines = []
    scores = [c for c in SCORES if c in kept.columns]
    for doc in kept.select("id", "text", "source", "meta", "lang", *scores).iter_rows(named=True):
        meta = {**json.loads(doc["meta"] or "{}"), "lang": doc["lang"], **{c: doc[c] for c in scores}}
        lines.append(json.dumps({"id": doc["id"], "text": doc["text"], "source": doc["source"], "meta": meta},
                                ensure_ascii=False))
    return ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")


def _ndjson(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_ndjson(buf)
    return buf.getvalue()

"""The long-text stage (InternLM2 §3.1.3) over a cleaned corpus: phase 2's data, chosen with the phase-1 model.

Per clean text shard: documents of at least `LongTextConfig.min_chars` are long candidates; they go through the
statistical filters (`filters.select_long`) and then the perplexity-difference filter scored by the phase-1 model
(`perplexity.ppl_filter`). Shorter documents are phase 2's short data and pass unchanged (the paper keeps about
half of phase 2's tokens short). Code repository documents (dependency-sorted, `tasks.code`) pass unchanged too:
they are long-context data by construction.

Layout under ``out_url``: ``text/<shard>.jsonl`` (short documents, then kept long ones with ``meta.long = true``,
``meta.ppl_gain`` and their statistics), ``code/*.jsonl`` (copied), ``removed/<shard>.parquet`` (``stage``,
``reason``, statistics, gain), ``ledger/<shard>.json`` and ``ledger.json``: documents in = short + long kept + removed.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import polars as pl

from infra import storage
from tasks.clean.ledger import Ledger, ShardLedger
from tasks.longtext.filters import STAT_COLUMNS, LongTextConfig, select_long
from tasks.longtext.perplexity import GAIN, PerplexityConfig, ppl_filter


def read_docs(url: str) -> pl.DataFrame:
    """A clean JSONL shard as (id, text, source, meta as JSON)."""
    rows = [json.loads(line) for line in storage.read_bytes(url).decode("utf-8").splitlines() if line.strip()]
    return pl.DataFrame(
        {"id": [r["id"] for r in rows], "text": [r["text"] for r in rows],
         "source": [r.get("source") or "unknown" for r in rows],
         "meta": [json.dumps(r.get("meta") or {}, ensure_ascii=False) for r in rows]},
        schema={"id": pl.Utf8, "text": pl.Utf8, "source": pl.Utf8, "meta": pl.Utf8},
    )


def longtext_stage(
    shard_url: str, name: str, out_url: str, checkpoint_url: str, tokenizer_url: str, cfg: LongTextConfig,
    ppl: PerplexityConfig,
) -> ShardLedger:
    """Select and filter one shard's long documents; write phase 2's shard, the removed ones and the ledger."""
    ledger_url = storage.join(out_url, "ledger", f"{name}.json")
    version = json.dumps({"input": shard_url, "checkpoint": checkpoint_url, "long": cfg.model_dump(),
                          "ppl": ppl.model_dump()}, sort_keys=True)
    if storage.exists(ledger_url):
        stored = ShardLedger.model_validate(storage.read_json(ledger_url))
        if stored.filters == version:
            return stored
    docs = read_docs(shard_url)
    long_kept, long_removed, short = select_long(docs, cfg)
    if len(long_kept):
        from tasks.pretrain import load_for_inference

        model, tokenizer = load_for_inference(checkpoint_url, tokenizer_url)
        long_kept, no_gain = ppl_filter(long_kept, model, tokenizer, ppl)
        long_removed = pl.concat([long_removed, no_gain], how="diagonal_relaxed")
    storage.write_bytes(storage.join(out_url, "text", f"{name}.jsonl"), _records(short, long_kept))
    buf = io.BytesIO()
    long_removed.write_parquet(buf)
    storage.write_bytes(storage.join(out_url, "removed", f"{name}.parquet"), buf.getvalue())
    reasons = long_removed.group_by("stage", "reason").len().iter_rows() if len(long_removed) else []
    ledger = ShardLedger(shard=name, lines=len(docs), kept=len(short) + len(long_kept),
                         removed={f"{s}/{r}": n for s, r, n in reasons}, filters=version,
                         quarantined={}).check()
    storage.write_json(storage.join(out_url, "counts", f"{name}.json"), {
        "short": len(short), "long_kept": len(long_kept), "long_removed": len(long_removed),
        "short_chars": int(short["text"].str.len_chars().sum() or 0),
        "long_chars": int(long_kept["text"].str.len_chars().sum() or 0) if len(long_kept) else 0,
        "gains_kept": _gains(long_kept), "gains_removed": _gains(long_removed),
    })
    storage.write_json(ledger_url, ledger.model_dump())
    return ledger


def _gains(df: pl.DataFrame) -> list[float]:
    if GAIN not in df.columns:
        return []
    return [float(g) for g in df[GAIN].drop_nulls().drop_nans().to_list()]


def _records(short: pl.DataFrame, long_kept: pl.DataFrame) -> bytes:
    lines = [json.dumps({"id": r["id"], "text": r["text"], "source": r["source"], "meta": json.loads(r["meta"])},
                        ensure_ascii=False) for r in short.select("id", "text", "source", "meta").iter_rows(named=True)]
    extra = [c for c in (*STAT_COLUMNS, GAIN) if c in long_kept.columns]
    for r in long_kept.iter_rows(named=True):
        stats = {c: (None if r[c] is None or (isinstance(r[c], float) and np.isnan(r[c])) else r[c]) for c in extra}
        meta = {**json.loads(r["meta"]), "long": True, **stats}
        lines.append(json.dumps({"id": r["id"], "text": r["text"], "source": r["source"], "meta": meta},
                                ensure_ascii=False))
    return "".join(line + "\n" for line in lines).encode("utf-8")


def copy_code(clean_url: str, out_url: str) -> int:
    """Repository documents pass to phase 2 unchanged; returns how many shards were copied."""
    from tasks.clean.stages import is_dir

    folder = storage.join(clean_url, "code")
    urls = storage.list_files(folder, "*.jsonl") if is_dir(folder) else []
    for url in urls:
        storage.write_bytes(storage.join(out_url, "code", url.rstrip("/").rsplit("/", 1)[-1]), storage.read_bytes(url))
    return len(urls)


def summarize(out_url: str, ledgers: list[ShardLedger]) -> dict[str, Any]:
    """The total ledger (checked) and the long/short shares, written to ``ledger.json``."""
    total = Ledger(shards=ledgers).check()
    counts = [storage.read_json(storage.join(out_url, "counts", f"{s.shard}.json")) for s in ledgers]
    short_chars, long_chars = sum(c["short_chars"] for c in counts), sum(c["long_chars"] for c in counts)
    kept_gains = [g for c in counts for g in c["gains_kept"]]
    removed_gains = [g for c in counts for g in c["gains_removed"]]
    summary = {
        "documents": total.lines, "short": sum(c["short"] for c in counts),
        "long_kept": sum(c["long_kept"] for c in counts), "long_removed": sum(c["long_removed"] for c in counts),
        "long_char_share": long_chars / max(long_chars + short_chars, 1),
        "short_char_share": short_chars / max(long_chars + short_chars, 1),
        "mean_gain_kept": float(np.mean(kept_gains)) if kept_gains else float("nan"),
        "mean_gain_removed": float(np.mean(removed_gains)) if removed_gains else float("nan"),
        "removed": total.removed,
    }
    storage.write_json(storage.join(out_url, "ledger.json"), {**total.model_dump(), **summary})
    return summary

"""The code-cleaning stages (InternLM2 §3.1.2) as plain functions over storage URLs; the data flow maps them.

Input: JSONL shards of files, one record a line, ``{"repo", "path", "text", "lang"?, "id"?, "meta"?}`` (the
built-in corpus's ``code/*.jsonl``), or a directory tree of repositories that `ingest_tree` turns into such shards.

1. ``code_rules_stage`` (per shard): parse and validate (bad lines quarantined, as for text), binary content
   quarantined, oversized files removed, then exact and MinHash signatures. The dedup stages are the text
   pipeline's: their words are runs of letters, digits and ``_``, so indentation by 2 spaces, 4 spaces or tabs (and
   any other whitespace) never makes two files differ. "Exact" therefore means "the same word sequence".
2. ``dedup_stage`` (once): the text pipeline's band buckets and clusters, in their own work folder.
3. ``code_finish_stage`` (once, because a repository can span shards): drop duplicates, score quality into tiers
   (`tasks.code.quality`; low tier removed, with the rule or "model" as the reason), sort each repository's files
   by their dependencies (`tasks.code.depsort`) and write one Markdown document per repository; a repository left
   with no code file is removed (``code_empty_repo``). Ledgers per input shard balance files in = files in a
   repository document + removed + quarantined.

Layout under ``out_url``: ``code/repos-<k>.jsonl`` (documents: ``{"id", "text", "source": "code", "meta"}`` with
``meta.repo``, ``files``, ``tier`` (high when most of its code bytes are high-tier), ``weight``, ``order``),
``code_removed/<shard>.parquet``, ``code_quarantine/<shard>.jsonl``, ``code_ledger/<shard>.json``,
``code_ledger.json``; intermediates under ``<out_url>/_work/code`` (laid out as the text pipeline's).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import PurePosixPath
from typing import Any

import polars as pl
import xxhash
from pydantic import BaseModel, ConfigDict, Field

from infra import storage
from tasks.clean.dedup import DedupConfig, filter_shard
from tasks.clean.ledger import Ledger, ShardLedger
from tasks.clean.parse import CODE, parse_shard, raw_excerpt
from tasks.clean.stages import (
    _ndjson,
    cluster_stage,
    fingerprint,
    forget_downstream,
    is_dir,
    read_frame,
    rules_url,
    save_first_stage,
    stored_counts,
    work_dir,
    write_frame,
)
from tasks.code.depsort import SourceFile, dependency_order, repository_markdown
from tasks.code.quality import CodeQualityConfig, score_code

LANG_BY_SUFFIX = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp",
    ".hpp": "cpp", ".hh": "cpp", ".js": "javascript", ".jsx": "javascript", ".mjs": "javascript",
    ".cjs": "javascript", ".ts": "typescript", ".tsx": "typescript", ".go": "go", ".java": "java", ".sh": "shell",
    ".rs": "rust", ".rb": "ruby", ".md": "markdown", ".rst": "text", ".txt": "text", ".toml": "toml",
    ".cfg": "ini", ".ini": "ini", ".yaml": "yaml", ".yml": "yaml", ".json": "json",
}  # fmt: skip
CODE_LANGS = frozenset({"python", "c", "cpp", "javascript", "typescript", "go", "java", "shell", "rust", "ruby"})
_BINARY = r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f\x{FFFD}]"  # controls other than \t \n \r \f \v ESC; U+FFFD


class CodeConfig(BaseModel):
    """Limits of the code pipeline; `quality` holds the tier rules and cut-offs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_file_bytes: int = Field(200_000, ge=1, description="larger files (nearly always generated) are removed")
    max_binary_share: float = Field(0.001, ge=0, le=1, description="share of control/U+FFFD characters: binary")
    repos_per_shard: int = Field(200, ge=1, description="repository documents per output shard")
    quality: CodeQualityConfig = Field(default_factory=CodeQualityConfig)


def language(path: str) -> str:
    """The language of a file by its name (``Makefile``/``Dockerfile`` included); "text" when unknown."""
    name = PurePosixPath(path).name
    if name in ("Makefile", "makefile", "GNUmakefile"):
        return "make"
    if name == "Dockerfile":
        return "dockerfile"
    return LANG_BY_SUFFIX.get(PurePosixPath(path).suffix.lower(), "text")


def _url(out_url: str, kind: str, name: str) -> str:
    return rules_url(work_dir(out_url, "code"), kind, name)


def ingest_tree(tree_url: str, out_url: str, *, shard_files: int = 1000) -> dict[str, Any]:
    """Repositories in a directory tree (each top-level folder one repository) → ``code/tree-<k>.jsonl`` shards
    under `out_url`; unreadable files (not UTF-8, binary) go to ``quarantine/tree.jsonl`` with their path and error.

    Returns counts: files seen, written, quarantined, and the repositories that had no file at all.
    """
    fs, root = storage.fs_for(tree_url)
    if not fs.isdir(root):
        raise ValueError(f"ingest_tree: {tree_url!r} is not a directory of repositories")
    records, bad, empty = [], [], []
    for repo_dir in sorted(p for p in fs.ls(root, detail=False) if fs.isdir(p)):
        repo = PurePosixPath(repo_dir).name
        files = sorted(p for p in fs.find(repo_dir) if not fs.isdir(p))
        if not files:
            empty.append(repo)
        for path in files:
            rel = PurePosixPath(path).relative_to(PurePosixPath(repo_dir)).as_posix()
            data = fs.cat_file(path)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                bad.append({"shard": "tree", "line": None, "error": "invalid_utf8", "raw": raw_excerpt(data),
                            "detail": f"{repo}/{rel}: not UTF-8 at byte {err.start}"})
                continue
            records.append({"repo": repo, "path": rel, "lang": language(rel), "text": text})
    for k in range(0, len(records), shard_files):
        lines = [json.dumps(r, ensure_ascii=False) for r in records[k : k + shard_files]]
        storage.write_bytes(storage.join(out_url, "code", f"tree-{k // shard_files:05d}.jsonl"),
                            ("\n".join(lines) + "\n").encode("utf-8"))
    storage.write_bytes(storage.join(out_url, "quarantine", "tree.jsonl"),
                        "".join(json.dumps(b) + "\n" for b in bad).encode("utf-8"))
    return {"files": len(records) + len(bad), "written": len(records), "quarantined": len(bad), "empty_repos": empty}


def code_shards(inputs: list[str]) -> list[tuple[str, str]]:
    """(name, url) of the ``code/*.jsonl`` shards under each input; names prefixed when inputs repeat a name."""
    found: list[tuple[str, str]] = []
    for k, base in enumerate(inputs):
        folder = storage.join(base, "code")
        urls = storage.list_files(folder, "*.jsonl") if is_dir(folder) else []
        found += [(f"in{k}-" + u.rstrip("/").rsplit("/", 1)[-1].removesuffix(".jsonl"), u) for u in urls]
    return found


def code_rules_stage(raw_url: str, name: str, out_url: str, cfg: CodeConfig, dedup: DedupConfig) -> dict[str, Any]:
    """Parse and validate one code shard, quarantine binary files, remove oversized ones, write its signatures."""
    version = {"input": raw_url, "fingerprint": fingerprint(raw_url), "config": cfg.model_dump()}
    work = work_dir(out_url, "code")
    stored = stored_counts(work, name, version)
    if stored is not None:
        return stored
    forget_downstream(work, name, [storage.join(out_url, "code_ledger.json")])
    parsed = parse_shard(storage.read_bytes(raw_url), name, max_chars=10 * cfg.max_file_bytes, contract=CODE)
    docs = parsed.docs.with_columns(pl.coalesce("lang", pl.col("path").map_elements(language, pl.Utf8)).alias("lang"))
    share = pl.col("text").str.count_matches(_BINARY) / pl.col("text").str.len_chars()
    binary = docs.filter(share > cfg.max_binary_share)
    quarantine = pl.concat([parsed.quarantine, binary.select(
        "shard", "line", pl.lit("binary_content").alias("error"),
        pl.format("{}/{}: {} of its characters are control bytes or U+FFFD", "repo", "path",
                  share.round(4).cast(pl.Utf8)).alias("detail"),
        pl.col("text").str.slice(0, 200).alias("raw"),
    )], how="diagonal_relaxed")
    docs = docs.filter(share <= cfg.max_binary_share)
    size = pl.col("text").str.len_bytes()
    removed = docs.filter(size > cfg.max_file_bytes).with_columns(stage=pl.lit("code_rules"),
                                                                  reason=pl.lit("code_too_large"))
    kept = docs.filter(size <= cfg.max_file_bytes)
    frames = {"kept": kept, "removed": removed, "quarantine": quarantine}
    return save_first_stage(work, name, frames, parsed.lines, version, dedup)


def code_dedup_stage(out_url: str, names: list[str], dedup: DedupConfig) -> str:
    """The text pipeline's buckets and clusters, over the code shards' signatures."""
    return cluster_stage(work_dir(out_url, "code"), names, dedup)


def _repo_documents(files: pl.DataFrame, cfg: CodeConfig) -> tuple[list[dict[str, Any]], pl.DataFrame]:
    """One Markdown document per repository with a code file; (documents, rows of repositories without one)."""
    docs, empty = [], []
    for (repo,), group in files.sort("repo", "path").group_by("repo", maintain_order=True):
        rows = group.select("path", "text", "lang", "tier", "id").to_dicts()
        if not any(r["lang"] in CODE_LANGS for r in rows):
            empty.append(group)
            continue
        sources = [SourceFile(r["path"], r["text"], r["lang"]) for r in rows]
        result = dependency_order(sources)
        code_bytes = Counter()
        for r in rows:
            if r["lang"] in CODE_LANGS:
                code_bytes[r["tier"]] += len(r["text"].encode("utf-8"))
        tier = "high" if code_bytes["high"] * 2 >= sum(code_bytes.values()) else "moderate"
        meta = {"repo": repo, "files": len(rows), "tier": tier, "tiers": dict(Counter(r["tier"] for r in rows)),
                "weight": cfg.quality.high_weight if tier == "high" else 1.0, "order": result.order,
                "cycle_breaks": result.cycle_breaks, "file_ids": [r["id"] for r in rows]}
        text = repository_markdown(repo, sources, result.order)
        docs.append({"id": "r" + xxhash.xxh3_64_hexdigest(repo.encode("utf-8")), "text": text, "source": "code",
                     "meta": meta})
    removed = pl.concat(empty, how="diagonal_relaxed") if empty else files.clear()
    return docs, removed.with_columns(stage=pl.lit("code_repo"), reason=pl.lit("code_empty_repo"))


def code_finish_stage(out_url: str, names: list[str], cfg: CodeConfig) -> Ledger:
    """Dedup filter, quality tiers, dependency order, repository documents; the checked ledger of every shard."""
    total_url = storage.join(out_url, "code_ledger.json")
    version = json.dumps({"shards": sorted(names), "config": cfg.model_dump()}, sort_keys=True)
    if storage.exists(total_url) and storage.read_json(total_url).get("version") == version:
        return Ledger.model_validate(storage.read_json(total_url))
    work = storage.join(work_dir(out_url, "code"), "dedup")
    kept_parts, removed, counts = [], {}, {}
    for name in sorted(names):
        counts[name] = storage.read_json(_url(out_url, "counts.json", name))
        kept, dups = filter_shard(read_frame(_url(out_url, "kept.parquet", name)), name, work)
        scored = score_code(kept, cfg.quality)
        low = scored.filter(pl.col("tier") == "low").with_columns(
            stage=pl.lit("code_quality"),
            reason=pl.when(pl.col("tier_reason") == "model").then(pl.lit("code_low_quality_model"))
            .otherwise(pl.col("tier_reason")),
        )
        removed[name] = [read_frame(_url(out_url, "removed.parquet", name)), dups, low]
        kept_parts.append(scored.filter(pl.col("tier") != "low"))
    files = pl.concat(kept_parts, how="diagonal_relaxed")
    docs, empty = _repo_documents(files, cfg)
    code_dir = storage.join(out_url, "code")
    for old in storage.list_files(code_dir, "repos-*.jsonl") if is_dir(code_dir) else []:
        storage.remove(old, missing_ok=True)
    for k in range(0, len(docs), cfg.repos_per_shard):  # no repository: no shard (an empty one would tokenize to 0)
        part = docs[k : k + cfg.repos_per_shard]
        body = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in part)
        storage.write_bytes(storage.join(out_url, "code", f"repos-{k // cfg.repos_per_shard:05d}.jsonl"),
                            body.encode("utf-8"))
    in_docs = Counter(files.join(empty.select("shard", "line"), on=["shard", "line"], how="anti")["shard"])
    ledgers = []
    for name in sorted(names):
        parts = [*removed[name], empty.filter(pl.col("shard") == name)]
        gone = pl.concat([p for p in parts if len(p)], how="diagonal_relaxed") if any(len(p) for p in parts) else None
        quarantine = read_frame(_url(out_url, "quarantine.parquet", name))
        if gone is not None:
            write_frame(storage.join(out_url, "code_removed", f"{name}.parquet"), gone)
        storage.write_bytes(storage.join(out_url, "code_quarantine", f"{name}.jsonl"), _ndjson(quarantine))
        reasons = Counter() if gone is None else Counter(
            f"{s}/{r}" for s, r in gone.select("stage", "reason").iter_rows())
        ledger = ShardLedger(shard=name, lines=counts[name]["lines"], kept=in_docs.get(name, 0),
                             removed=dict(reasons), quarantined=dict(Counter(quarantine["error"].to_list())),
                             filters=version).check()
        storage.write_json(storage.join(out_url, "code_ledger", f"{name}.json"), ledger.model_dump())
        ledgers.append(ledger)
    total = Ledger(shards=ledgers).check()
    storage.write_json(total_url, {**total.model_dump(), "version": version, "repos": len(docs),
                                   "removed": total.removed, "quarantined": total.quarantined})
    return total

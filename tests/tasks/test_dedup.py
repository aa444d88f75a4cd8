"""Dedup on planted near-duplicates of standard-library docstrings, scored against exact Jaccard.

Each base document gets variants (whitespace, case, exact copies, word edits, sentence reorders, boilerplate
lines); a plain-Python reference computes every within-family pair's true Jaccard of word 5-gram sets. Pairs in
the fuzzy band [0.65, 0.75] around the 0.7 threshold are reported but not scored.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra import storage
from tasks.clean.dedup import (
    DedupConfig,
    band_buckets,
    clusters,
    dedup_frames,
    estimated_jaccard,
    exact_signatures,
    filter_shard,
    hash_texts,
    minhash_signatures,
    pick_bands,
)

THRESHOLD, FUZZY = 0.7, (0.65, 0.75)
MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "html.parser", "http.client",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "lzma", "mailbox", "multiprocessing", "operator",
    "optparse", "os", "pathlib", "pickle", "platform", "pprint", "queue", "random", "re", "selectors", "shlex",
    "shutil", "socket", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "tokenize", "traceback", "types", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile",
)
BOILERPLATE = (
    "Copyright (c) 2024 Example Corporation. All rights reserved. Redistribution of this page is prohibited.",
    "Subscribe to our newsletter to receive the latest articles, tutorials and product announcements by email.",
    "This page was generated automatically from the source tree; report problems to the documentation team.",
    "Home | Docs | Blog | Contact | Privacy policy | Terms of service | Cookie settings | Sitemap",
    "Share this article on social media and leave a comment below to tell us what you think about it.",
)
WHITESPACE = (" ", "  ", "\t", "\n", " \n ", "\n\n", "   \t ")


# ---------------------------------------------------------------- reference implementation


def ref_words(text: str) -> list[str]:
    """Words as the dedup defines them: runs of ASCII letters, digits, '_' or non-ASCII characters, lowercased."""
    return re.findall(r"[a-z0-9_\u0080-\U0010ffff]+", text.lower())


def ref_shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = ref_words(text)
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set[tuple[str, ...]], b: set[tuple[str, ...]]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


# ---------------------------------------------------------------- planted corpus


def _docstrings(obj: object) -> list[str]:
    members = [obj]
    if inspect.isclass(obj) or inspect.ismodule(obj):
        members += [v for k, v in sorted(vars(obj).items()) if not k.startswith("_")]
    return [d for m in members if callable(m) or inspect.ismodule(m) if (d := inspect.getdoc(m))]


def base_documents(count: int = 320, min_words: int = 60, max_similarity: float = 0.3) -> list[str]:
    """Distinct stdlib docstrings of >= min_words words, none similar to an earlier one (true J < max_similarity)."""
    found: dict[str, None] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(v for k, v in sorted(vars(module).items()) if not k.startswith("_"))]:
            found.update((d, None) for d in _docstrings(obj) if len(d.split()) >= min_words)
    kept: list[tuple[str, set[tuple[str, ...]]]] = []
    for doc in found:
        shingles = ref_shingles(doc)
        if all(jaccard(shingles, other) < max_similarity for _, other in kept):
            kept.append((doc, shingles))
    assert len(kept) >= count, f"only {len(kept)} distinct docstrings of >= {min_words} words"
    return [doc for doc, _ in kept[:count]]


def respace(text: str, rng: random.Random) -> str:
    return "".join(w + rng.choice(WHITESPACE) for w in text.split()).strip()


def recase(text: str, rng: random.Random) -> str:
    return " ".join(w.upper() if rng.random() < 0.2 else w.title() if rng.random() < 0.2 else w for w in text.split())


def edit_words(text: str, rng: random.Random, rate: float, vocab: list[str]) -> str:
    """Substitute, delete or insert words at `rate` per word."""
    out: list[str] = []
    for word in text.split():
        if rng.random() >= rate:
            out.append(word)
            continue
        action = rng.choice(("substitute", "delete", "insert"))
        if action != "delete":
            out.append(rng.choice(vocab))
        if action == "insert":
            out.append(word)
    return " ".join(out)


def reorder(text: str, rng: random.Random) -> str:
    """Paragraphs shuffled when there are several, else sentences rotated."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) >= 3:
        rng.shuffle(paragraphs)
        return "\n\n".join(paragraphs)
    sentences = re.split(r"(?<=[.!?])\s+", text)
    cut = rng.randrange(1, len(sentences)) if len(sentences) > 1 else 0
    return " ".join(sentences[cut:] + sentences[:cut])


def add_boilerplate(text: str, rng: random.Random) -> str:
    header = rng.sample(BOILERPLATE, rng.randint(0, 2))
    footer = rng.sample(BOILERPLATE, rng.randint(1, 2))
    return "\n".join([*header, text, *footer])


def variant(kind: str, text: str, rng: random.Random, vocab: list[str]) -> str:
    makers: dict[str, Callable[[], str]] = {
        "exact": lambda: text,
        "whitespace": lambda: respace(text, rng),
        "case": lambda: recase(text, rng),
        "light_edit": lambda: edit_words(text, rng, rng.uniform(0.005, 0.04), vocab),
        "edit": lambda: edit_words(text, rng, rng.uniform(0.04, 0.12), vocab),
        "heavy_edit": lambda: edit_words(text, rng, rng.uniform(0.12, 0.4), vocab),
        "reorder": lambda: reorder(text, rng),
        "boilerplate": lambda: add_boilerplate(text, rng),
        "mixed": lambda: add_boilerplate(respace(edit_words(text, rng, rng.uniform(0.0, 0.03), vocab), rng), rng),
    }
    return makers[kind]()


@dataclass(frozen=True)
class Planted:
    frame: pl.DataFrame  # id, text, source, meta, shard, line
    family: dict[str, int]  # id → index of its base document
    kind: dict[str, str]  # id → "base" or the variant kind
    shingles: dict[str, set[tuple[str, ...]]]  # id → reference 5-gram set

    def true_jaccard(self, a: str, b: str) -> float:
        return jaccard(self.shingles[a], self.shingles[b])


KINDS = ("exact", "whitespace", "case", "light_edit", "edit", "edit", "heavy_edit", "reorder", "boilerplate", "mixed")


def planted_corpus(seed: int = 0, bases: int = 320) -> Planted:
    """Every base document plus 0-3 variants each, shuffled, as one shard frame (shard "planted", line = row)."""
    rng = random.Random(seed)
    docs = base_documents(bases)
    vocab = sorted({w for d in docs for w in d.split()})
    rows: list[tuple[str, int, str]] = []
    for i, base in enumerate(docs):
        rows.append((base, i, "base"))
        for kind in rng.sample(KINDS, rng.randint(0, 3)):
            rows.append((variant(kind, base, rng, vocab), i, kind))
    rng.shuffle(rows)
    ids = [f"doc-{n:05d}" for n in range(len(rows))]
    texts, families, kinds = zip(*rows, strict=True)
    frame = pl.DataFrame({"id": ids, "text": texts, "source": "stdlib_doc", "meta": "{}", "shard": "planted",
                          "line": range(len(rows))}, schema_overrides={"line": pl.Int64})
    return Planted(frame, dict(zip(ids, families, strict=True)), dict(zip(ids, kinds, strict=True)),
                   {i: ref_shingles(t) for i, t in zip(ids, texts, strict=True)})


def split(frame: pl.DataFrame, shards: int) -> dict[str, pl.DataFrame]:
    """Contiguous slices as shards "part-0", "part-1", ..."""
    size = -(-len(frame) // shards)
    return {f"part-{k}": frame.slice(k * size, size) for k in range(shards)}


def removed_ids(result: dict[str, tuple[pl.DataFrame, pl.DataFrame]]) -> set[str]:
    return {i for _, removed in result.values() for i in removed["id"]}


def cluster_pairs(work: Path) -> set[tuple[str, str]]:
    table = pl.read_parquet(work / "clusters" / "clusters.parquet")
    groups = table.group_by("cluster").agg(pl.col("id").sort())["id"].to_list()
    return {pair for ids in groups for pair in itertools.combinations(ids, 2)}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def planted() -> Planted:
    return planted_corpus()


@pytest.fixture(scope="module")
def one_shard(planted: Planted, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("dedup-1")
    return work, dedup_frames({"all": planted.frame}, str(work))


@dataclass
class Scores:
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int
    fuzzy_detected: int
    fuzzy_total: int


def score(planted: Planted, detected: set[tuple[str, str]]) -> Scores:
    """P/R of detected pairs against true pairs (J >= 0.7), over pairs whose true J is outside the fuzzy band."""
    families: dict[int, list[str]] = {}
    for doc_id, fam in planted.family.items():
        families.setdefault(fam, []).append(doc_id)
    truth = {tuple(sorted(p)): planted.true_jaccard(*p) for ids in families.values()
             for p in itertools.combinations(ids, 2)}
    truth.update({p: planted.true_jaccard(*p) for p in detected if p not in truth})  # cross-family detections
    outside = {p: j for p, j in truth.items() if not FUZZY[0] <= j <= FUZZY[1]}
    positives = {p for p, j in outside.items() if j >= THRESHOLD}
    found = detected & set(outside)
    tp, fp, fn = len(found & positives), len(found - positives), len(positives - detected)
    fuzzy = set(truth) - set(outside)
    return Scores(tp / max(tp + fp, 1), tp / max(tp + fn, 1), tp, fp, fn, len(fuzzy & detected), len(fuzzy))


# ---------------------------------------------------------------- tests: hashing and config


def test_config_derives_bands_for_recall() -> None:
    cfg = DedupConfig()
    assert (cfg.bands, cfg.rows) == pick_bands(0.7, 128) == (21, 6)
    assert 1 - (1 - 0.75**cfg.rows) ** cfg.bands > 0.98  # candidates at J=0.75 reach verification
    assert DedupConfig(bands=16, rows=8).bands == 16
    with pytest.raises(ValueError, match="bands"):
        DedupConfig(bands=16)
    with pytest.raises(ValueError, match="num_perm"):
        DedupConfig(bands=20, rows=7)
    with pytest.raises(ValueError, match="threshold"):
        DedupConfig(threshold=1.5)


def test_words_match_reference_and_ignore_whitespace_case_punctuation() -> None:
    cfg = DedupConfig()
    texts = ["Hello, World!  It's\tthe  end.", "hello world it s the end", "HELLO\n\nWORLD -- it's; THE END",
             "naïve café über straße", "a b", "", "... !!!"]
    hashed = hash_texts(texts, cfg)
    assert hashed.text_hash[0] == hashed.text_hash[1] == hashed.text_hash[2]
    assert len(set(hashed.text_hash[[0, 3, 4, 5]].tolist())) == 4
    assert hashed.text_hash[5] == hashed.text_hash[6]  # no words at all: the same (empty) word sequence
    assert hashed.shingles.tolist() == [2, 2, 2, 1, 1, 0, 0]  # 6 words → 2 five-grams; short docs → 1 shingle
    assert hashed.signature is not None and hashed.signature.shape == (7, 128)
    assert (hashed.signature[5] == np.iinfo(np.uint32).max).all()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_words_agree_with_reference_on_any_text(text: str) -> None:
    canonical = " ".join(ref_words(text))  # the reference's word sequence, single-spaced
    hashed = hash_texts([text, canonical], DedupConfig())
    assert hashed.text_hash[0] == hashed.text_hash[1]
    assert hashed.signature is not None and (hashed.signature[0] == hashed.signature[1]).all()
    assert hashed.shingles[0] == (max(len(ref_words(text)) - 4, 1) if ref_words(text) else 0)


def test_every_byte_of_a_word_counts() -> None:
    words = ["abcdefgh", "abcdefgi", "abcdefghijklmnop", "abcdefghijklmnoq", "abcdefghijklmnopq", "abcdefghijklmnopr",
             "x" * 40 + "a", "x" * 40 + "b", "a" * 8, "a" * 9]  # around the 8- and 16-byte load boundaries
    hashed = hash_texts(words, DedupConfig())
    assert len(set(hashed.text_hash.tolist())) == len(words)


def test_signatures_do_not_depend_on_batching(planted: Planted, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = planted.frame["text"].head(300)
    whole = hash_texts(texts, DedupConfig())
    monkeypatch.setattr("tasks.clean.dedup.BATCH_BYTES", 5_000)  # dozens of small batches
    pieces = hash_texts(texts, DedupConfig())
    assert whole.signature is not None and pieces.signature is not None
    np.testing.assert_array_equal(whole.signature, pieces.signature)
    np.testing.assert_array_equal(whole.text_hash, pieces.text_hash)


def test_estimated_jaccard_tracks_true_jaccard(planted: Planted) -> None:
    texts = planted.frame["text"].to_list()
    sig = hash_texts(texts, DedupConfig()).signature
    assert sig is not None
    rng = random.Random(1)
    ids = planted.frame["id"].to_list()
    by_family: dict[int, list[int]] = {}
    for row, doc_id in enumerate(ids):
        by_family.setdefault(planted.family[doc_id], []).append(row)
    pairs = [p for rows in by_family.values() for p in itertools.combinations(rows, 2)]
    pairs = rng.sample(pairs, min(400, len(pairs)))
    left, right = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    est = estimated_jaccard(sig, left, right)
    true = np.array([jaccard(ref_shingles(texts[a]), ref_shingles(texts[b])) for a, b in pairs])
    assert abs(float(np.mean(est - true))) < 0.01  # unbiased
    assert float(np.mean(np.abs(est - true))) < 0.04  # MinHash with 128 slots: sd ≈ sqrt(J(1-J)/128) <= 0.044


# ---------------------------------------------------------------- tests: quality on the planted set


def test_precision_and_recall_on_planted_near_duplicates(planted: Planted, one_shard: tuple[Path, dict]) -> None:
    work, _ = one_shard
    scores = score(planted, cluster_pairs(work))
    print(f"\nplanted: {len(planted.frame)} docs; {scores}")
    assert scores.tp > 300
    assert scores.precision >= 0.95, scores
    assert scores.recall >= 0.95, scores


def test_exact_and_whitespace_copies_always_removed(planted: Planted, one_shard: tuple[Path, dict]) -> None:
    work, result = one_shard
    table = pl.read_parquet(work / "clusters" / "clusters.parquet")
    cluster_of = dict(zip(table["id"], table["cluster"], strict=True))
    base_of = {planted.family[i]: i for i, k in planted.kind.items() if k == "base"}
    copies = [i for i, k in planted.kind.items() if k in ("exact", "whitespace", "case")]
    assert len(copies) > 50
    for doc_id in copies:
        base = base_of[planted.family[doc_id]]
        assert doc_id in cluster_of and cluster_of[doc_id] == cluster_of[base], (doc_id, planted.kind[doc_id])
    reasons = dict(zip(table["id"], table["reason"], strict=True))
    assert {reasons[i] for i in copies if reasons[i] is not None} <= {"exact_duplicate", "near_duplicate"}
    kept, removed = result["all"]
    assert len(kept) + len(removed) == len(planted.frame)
    assert set(removed["stage"]) == {"dedup"}
    # a family whose base and copies all survive filtering would mean a missed copy: one survivor per cluster
    assert table.filter(pl.col("keep")).height == table["cluster"].n_unique()


# ---------------------------------------------------------------- tests: keeper choice


def _cluster_frame(texts: list[str], dates: list[str | None]) -> pl.DataFrame:
    metas = [json.dumps({"date": d} if d else {}) for d in dates]
    return pl.DataFrame({"id": [f"k{i}" for i in range(len(texts))], "text": texts, "source": "s", "meta": metas,
                         "shard": "x", "line": list(range(len(texts)))})


def test_keeper_is_newest_dated_copy_else_first(tmp_path: Path) -> None:
    base = base_documents(3)
    texts = [base[0], respace(base[0], random.Random(0)), base[0], base[1], respace(base[1], random.Random(1)), base[2]]
    dates = [None, "2021-05-01", "2023-01-01T08:00:00+02:00", None, None, "2020-01-01"]
    result = dedup_frames({"s": _cluster_frame(texts, dates)}, str(tmp_path))
    kept, removed = result["s"]
    assert kept["id"].to_list() == ["k2", "k3", "k5"]  # newest of the first family; first of the undated one
    assert dict(zip(removed["id"], removed["reason"], strict=True)) == {
        "k0": "exact_duplicate", "k1": "exact_duplicate", "k4": "exact_duplicate"}


# ---------------------------------------------------------------- tests: determinism and idempotence


def test_same_result_for_1_3_7_shards_and_reruns(planted: Planted, one_shard: tuple[Path, dict],
                                                 tmp_path: Path) -> None:
    expected = removed_ids(one_shard[1])
    assert len(expected) > 200
    shuffled = planted.frame.sample(fraction=1.0, shuffle=True, seed=3)  # row order inside shards must not matter
    for shards in (3, 7):
        assert removed_ids(dedup_frames(split(shuffled, shards), str(tmp_path / f"s{shards}"))) == expected
    again = dedup_frames({"all": planted.frame}, str(tmp_path / "again"))
    assert removed_ids(again) == expected
    assert cluster_pairs(tmp_path / "again") == cluster_pairs(one_shard[0])


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_stages_reuse_outputs_and_resume(planted: Planted, tmp_path: Path) -> None:
    cfg, work = DedupConfig(), str(tmp_path)
    frames = split(planted.frame, 3)
    first = dedup_frames(frames, work, cfg)
    before = _mtimes(tmp_path)
    assert len(before) > 3 * 2 + cfg.bands
    second = dedup_frames(frames, work, cfg)
    assert _mtimes(tmp_path) == before  # nothing recomputed or rewritten
    assert removed_ids(second) == removed_ids(first)
    # a crash after some stage-2 bands: the missing bands and later stages are rebuilt, the rest reused
    for name in ("buckets/_SUCCESS.json", "buckets/band_004.parquet", "clusters/_SUCCESS.json"):
        os.remove(tmp_path / name)
    band_buckets(work, cfg, list(frames))
    clusters(work, cfg)
    after = _mtimes(tmp_path)
    assert after["buckets/band_003.parquet"] == before["buckets/band_003.parquet"]
    assert after["buckets/band_004.parquet"] != before["buckets/band_004.parquet"]
    assert removed_ids({n: filter_shard(df, n, work) for n, df in frames.items()}) == removed_ids(first)


def test_dedup_of_kept_output_removes_nothing(one_shard: tuple[Path, dict], tmp_path: Path) -> None:
    kept, _ = one_shard[1]["all"]
    again = dedup_frames({"kept": kept}, str(tmp_path))
    assert removed_ids(again) == set()
    assert again["kept"][0]["id"].to_list() == kept["id"].to_list()


# ---------------------------------------------------------------- tests: user errors


def test_user_errors_are_value_errors(planted: Planted, tmp_path: Path) -> None:
    work, cfg = str(tmp_path), DedupConfig()
    frame = planted.frame.head(20)
    with pytest.raises(ValueError, match="missing column"):
        exact_signatures(frame.drop("line"), "s", work, cfg)
    with pytest.raises(ValueError, match="shard name"):
        minhash_signatures(frame, "../s", work, cfg)
    with pytest.raises(ValueError, match="unique key"):
        exact_signatures(pl.concat([frame, frame]), "s", work, cfg)
    with pytest.raises(ValueError, match="run minhash_signatures"):
        band_buckets(work, cfg, ["nothing-here"])
    with pytest.raises(ValueError, match="fresh work URL"):
        exact_signatures(frame, "s", work, DedupConfig(threshold=0.8))
    with pytest.raises(ValueError, match="run the signature stages"):
        filter_shard(frame, "s", work)


def test_stages_on_s3_match_local(planted: Planted, s3_bucket: str, tmp_path: Path) -> None:
    frames = split(planted.frame.head(200), 2)
    on_s3 = dedup_frames(frames, f"{s3_bucket}/dedup")
    local = dedup_frames(frames, str(tmp_path))
    assert removed_ids(on_s3) == removed_ids(local) != set()
    assert storage.exists(f"{s3_bucket}/dedup/clusters/_SUCCESS.json")

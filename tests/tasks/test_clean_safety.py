"""Safety (blocklists, toxicity, adult content) and model-based quality filtering."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from tasks.clean.quality import QualityConfig, apply_quality, negatives, train_quality
from tasks.clean.safety import (
    REASONS,
    SafetyConfig,
    adult_classifier,
    apply_safety,
    domain_blocked,
    evaluate_toxicity,
    labelled,
    read_list,
    word_pattern,
)

CLEAN = (
    "The garden was quiet in the early morning. Dew covered the grass and a thrush was singing from the old "
    "apple tree. We walked down to the river, where the water ran clear over the stones, and talked about the "
    "books we had read over the winter and the places we still wanted to see."
)


def frame(texts: list[str], urls: list[str | None] | None = None) -> pl.DataFrame:
    urls = urls or [None] * len(texts)
    metas = [json.dumps({} if u is None else {"url": u}) for u in urls]
    return pl.DataFrame({"id": [f"d{i}" for i in range(len(texts))], "text": texts, "meta": metas})


def blocked_domain() -> str:
    return read_list("builtin", "blocked_domains.txt")[0]


def test_domain_blocklist_matches_the_domain_and_its_subdomains_only() -> None:
    meta = pl.Series("meta", [json.dumps({"url": u}) for u in (
        "https://example.com/a", "http://www.Example.COM:8080/x?y", "https://cams.shop.example.com",
        "https://user:pw@example.com/", "https://notexample.com/", "https://example.com.evil.org/", "example.com/path",
    )] + [json.dumps({}), "{}"])
    got = pl.DataFrame({"meta": meta}).select(domain_blocked(pl.col("meta"), ["example.com"])).to_series().to_list()
    assert got == [True, True, True, True, False, False, True, False, False]


def test_word_pattern_matches_whole_words_and_phrases_case_insensitively() -> None:
    pattern = word_pattern(["xxx", "live cams"])
    texts = pl.Series(["XXX videos", "size xxxl", "Live   Cams tonight, live cams", "alive camshaft"])
    assert texts.str.count_matches(pattern).to_list() == [1, 0, 2, 0]
    with pytest.raises(ValueError, match="blocklist is empty"):
        word_pattern([])


def test_one_crafted_document_per_safety_reason_and_a_clean_one_passes() -> None:
    words = read_list("builtin", "blocked_words.txt")
    adult_texts, labels, _ = labelled("adult.jsonl")
    pattern = word_pattern(words)
    no_hits = [t for t, y in zip(adult_texts, labels, strict=True) if y == 1 and not re.search(pattern, t)]
    adult = max(no_hits, key=lambda t: adult_classifier().predict([t])[0])  # the classifier alone must catch it
    docs = {
        "safety_blocked_domain": (CLEAN, f"https://www.{blocked_domain()}/page"),
        "safety_blocked_words": (CLEAN + " " + " ".join(words[:3]), None),
        "safety_toxic": ("You are a fucking idiot and a worthless piece of shit, shut up you moron.", None),
        "safety_adult": (adult, None),
        None: (CLEAN, "https://example.org/garden"),
    }
    df = frame([t for t, _ in docs.values()], [u for _, u in docs.values()])
    kept, removed = apply_safety(df, SafetyConfig(max_blocked_words=2))
    assert dict(zip(removed["id"], removed["reason"], strict=True)) == {
        f"d{i}": reason for i, reason in enumerate(docs) if reason is not None
    }
    assert set(removed["stage"]) == {"safety"} and set(removed["reason"]) == set(REASONS)
    assert kept["id"].to_list() == ["d4"]
    assert {"toxicity", "adult"} <= set(kept.columns) and kept["toxicity"][0] < 0.5 and kept["adult"][0] < 0.5
    assert not [c for c in kept.columns if c.startswith("_")]


def test_checks_that_are_off_neither_remove_nor_score() -> None:
    df = frame(["You are a fucking idiot and a moron."], ["https://" + blocked_domain()])
    off = SafetyConfig(blocked_domains=None, blocked_words=None, max_toxicity=None, max_adult=None)
    kept, removed = apply_safety(df, off)
    assert len(kept) == 1 and removed.is_empty() and "toxicity" not in kept.columns


def test_a_user_blocklist_file(tmp_path: Path) -> None:
    (tmp_path / "domains.txt").write_text("# mine\nbad.test\n\nBAD.test  # again\n")
    assert read_list(str(tmp_path / "domains.txt"), "unused") == ["bad.test"]
    df = frame([CLEAN, CLEAN], ["https://x.bad.test/", "https://good.test/"])
    cfg = SafetyConfig(blocked_domains=str(tmp_path / "domains.txt"), max_toxicity=None, max_adult=None)
    kept, removed = apply_safety(df, cfg)
    assert removed["id"].to_list() == ["d0"] and kept["id"].to_list() == ["d1"]


@pytest.mark.parametrize(("field", "value"), [("max_toxicity", 1.5), ("max_blocked_words", -1), ("typo", 1)])
def test_bad_safety_parameters_name_themselves(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        SafetyConfig(**{field: value})


def test_shipped_labelled_sets_are_well_formed() -> None:
    for name, kinds in (("adult.jsonl", {"adult", "hard_negative", "general"}),
                        ("toxicity.jsonl", {"toxic", "hard_negative", "general"}), ("ads.jsonl", {"ad"})):
        texts, labels, found = labelled(name)
        assert len(texts) == len(set(texts)) >= 150, name
        assert set(found) == kinds, name
        assert set(labels.tolist()) == ({1} if name == "ads.jsonl" else {0, 1}), name


def test_adult_classifier_held_out_precision_and_recall() -> None:
    report = adult_classifier().info["held_out"]
    assert report["positives"] >= 25 and report["negatives"] >= 50  # a held-out quarter of the shipped set
    assert report["precision"] >= 0.9 and report["recall"] >= 0.9, report  # measured: 0.95, 0.95
    assert report["hard_negative_false_positive_rate"] <= 0.1, report


def test_toxicity_model_on_our_labelled_set() -> None:
    report = evaluate_toxicity(0.5)
    assert report["positives"] >= 100 and report["negatives"] >= 200
    assert report["precision"] >= 0.85 and report["recall"] >= 0.75, report  # measured: 0.88, 0.79


# ------------------------------------------------------------------------------------------- quality


@pytest.fixture(scope="module")
def quality_model(prose: list[str]) -> object:
    return train_quality(prose, QualityConfig(seed=1))


def test_quality_model_held_out_report(quality_model: object) -> None:
    report = quality_model.info["held_out"]  # type: ignore[attr-defined]
    assert report["recall_shuffled"] >= 0.9 and report["recall_unigram"] >= 0.9, report
    assert report["recall_ad"] >= 0.8, report
    # 249 docstrings are little to learn from: 0.21 of held-out good windows fall below 0.5 here; on the
    # built-in corpus (1,275 rule-passing documents) it is 0.006
    assert report["false_removal_rate"] <= 0.3, report


def test_quality_stage_removes_salad_and_ads_and_scores_what_it_keeps(quality_model: object, prose: list[str]) -> None:
    rng = np.random.default_rng(5)
    good = prose[-1]
    shuffled, unigram = negatives([good], rng)
    ads, _, _ = labelled("ads.jsonl")
    ad = " ".join(ads[:6])
    df = frame([good, shuffled[0], unigram[0], ad])
    kept, removed = apply_quality(df, quality_model, QualityConfig())  # type: ignore[arg-type]
    assert kept["id"].to_list() == ["d0"] and 0.5 <= kept["quality"][0] <= 1
    assert removed["reason"].to_list() == ["quality_low"] * 3 and set(removed["stage"]) == {"quality"}
    assert (removed["quality"] < 0.5).all()


def test_quality_training_is_deterministic_and_checks_its_input(prose: list[str]) -> None:
    docs = prose[:60]
    a, b = train_quality(docs, QualityConfig(seed=3)), train_quality(docs, QualityConfig(seed=3))
    np.testing.assert_array_equal(a.weights, b.weights)
    with pytest.raises(ValueError, match="at least 20 rule-passing documents"):
        train_quality(docs[:5])
    with pytest.raises(ValidationError, match="min_score"):
        QualityConfig(min_score=2)

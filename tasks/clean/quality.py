"""Model-based quality filtering (InternLM2 §3.1.1, step 6): a fluency / advertisement classifier trained here.

InternLM2 trains its quality classifiers on annotated data we do not have, so ours is trained on data whose labels
are true by construction, and this module says exactly what that is:

- positives ("good"): windows of documents that passed the heuristic rules in this very run (or any reference
  texts a user passes): real, human-written text;
- negatives, three kinds, equally weighted in training:
  - ``shuffled``: a positive window with its words in random order: same words, no fluency;
  - ``unigram``: words drawn from the positives' word frequencies: word salad, the negatives of GPT-3's and
    CCNet-style filters;
  - ``ad``: hand-written advertisement / SEO-spam / cookie-banner text (``safety_data/ads.jsonl``, training part).

So the classifier measures "reads like fluent, non-promotional text from this corpus"; it is not a judge of
topic or truth. Its held-out report (documents split by a hash of their text, ads by their own held-out quarter)
goes into the model's ``info`` and to MLflow. A document's score, P(good), is the length-weighted mean over its
windows; it lands in ``meta.quality``, and documents below `min_score` are removed with reason ``quality_low``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from tasks.clean.classify import TextClassifier, precision_recall, split_held_out, windows
from tasks.clean.safety import labelled, split_by_reason

STAGE = "quality"
REASON = "quality_low"
NEGATIVE_KINDS = ("shuffled", "unigram", "ad")


class QualityConfig(BaseModel):
    """The quality stage: a threshold (None = off) and where the model comes from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_score: float | None = Field(0.5, ge=0, le=1, description="drop documents whose P(good) is below this")
    model: str | None = Field(None, description="URL of a trained quality model (.npz); None: train on this run")
    train_docs: int = Field(2000, ge=20, description="at most this many rule-passing documents train the model")
    windows_per_doc: int = Field(4, ge=1, description="at most this many windows of each training document")
    seed: int = Field(0, ge=0)


def negatives(good_windows: Sequence[str], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """One shuffled and one unigram-salad window per good window: (shuffled, unigram)."""
    split = [w.split() for w in good_windows]
    vocab, counts = np.unique(np.array([w for words in split for w in words], dtype=object), return_counts=True)
    probs = counts / counts.sum()
    shuffled = [" ".join(rng.permutation(np.array(words, dtype=object))) for words in split]
    unigram = [" ".join(rng.choice(vocab, size=len(words), p=probs)) for words in split]
    return shuffled, unigram


def _sample_windows(texts: Sequence[str], per_doc: int, rng: np.random.Generator) -> list[str]:
    parts = windows(list(texts)).filter(pl.col("n") >= 8)  # a window of a few words says little about fluency
    picked = parts.with_columns(pl.Series("r", rng.random(len(parts)))).filter(
        pl.col("r").rank("ordinal").over("doc") <= per_doc
    )
    return picked.get_column("text").to_list()


def train_quality(good_texts: Sequence[str], cfg: QualityConfig | None = None) -> TextClassifier:
    """Train on `good_texts` (the positives) and the three negative kinds; ``info["held_out"]`` has the report."""
    cfg = cfg or QualityConfig()
    good_texts = [t for t in good_texts if t.strip()]
    if len(good_texts) < 20:
        raise ValueError(f"the quality model needs at least 20 rule-passing documents to train on; got "
                         f"{len(good_texts)} (an empty or tiny corpus?): give QualityConfig.model, or set "
                         "min_score=None to turn the quality filter off")
    rng = np.random.default_rng(cfg.seed)
    if len(good_texts) > cfg.train_docs:
        good_texts = [good_texts[i] for i in sorted(rng.choice(len(good_texts), cfg.train_docs, replace=False))]
    held_docs = split_held_out(good_texts, 0.25, salt="quality")
    ads, _, _ = labelled("ads.jsonl")
    held_ads = split_held_out(ads, 0.25, salt="ads")
    parts = {}
    for split, docs_mask, ads_mask in (("train", ~held_docs, ~held_ads), ("held_out", held_docs, held_ads)):
        good = _sample_windows([t for t, m in zip(good_texts, docs_mask, strict=True) if m], cfg.windows_per_doc, rng)
        shuffled, unigram = negatives(good, rng)
        parts[split] = {"good": good, "shuffled": shuffled, "unigram": unigram,
                        "ad": [t for t, m in zip(ads, ads_mask, strict=True) if m]}
    train = parts["train"]
    if not train["good"] or not train["ad"]:
        raise ValueError("the quality model's training split has no good windows or no ads: add documents")
    texts = [t for kind in ("good", *NEGATIVE_KINDS) for t in train[kind]]
    labels = np.array([1] * len(train["good"]) + [0] * sum(len(train[k]) for k in NEGATIVE_KINDS))
    weights = np.concatenate([np.full(len(train["good"]), 0.5 / len(train["good"])),
                              *(np.full(len(train[k]), 0.5 / len(NEGATIVE_KINDS) / len(train[k]))
                                for k in NEGATIVE_KINDS)]) * len(labels)
    info = {"trained_on": "rule-passing documents of this run", "negatives": list(NEGATIVE_KINDS),
            "train_windows": {k: len(v) for k, v in train.items()}}
    model = TextClassifier.train(texts, labels, sample_weight=weights, info=info)
    report = held_out_report(model, parts["held_out"], cfg.min_score if cfg.min_score is not None else 0.5)
    return TextClassifier(model.features, model.weights, model.bias, {**model.info, "held_out": report})


def held_out_report(model: TextClassifier, parts: dict[str, list[str]], min_score: float) -> dict[str, Any]:
    """Removal precision/recall on held-out windows (positive = should be removed), and recall per negative kind."""
    texts = [t for kind in ("good", *NEGATIVE_KINDS) for t in parts[kind]]
    bad = np.array([0] * len(parts["good"]) + [1] * sum(len(parts[k]) for k in NEGATIVE_KINDS))
    badness = 1.0 - model.predict(texts)
    report: dict[str, Any] = precision_recall(badness, bad, 1.0 - min_score)
    start = len(parts["good"])
    for kind in NEGATIVE_KINDS:
        part = badness[start : start + len(parts[kind])]
        report[f"recall_{kind}"] = float((part > 1.0 - min_score).mean()) if len(part) else 0.0
        start += len(parts[kind])
    report["false_removal_rate"] = float((badness[: len(parts["good"])] > 1.0 - min_score).mean())
    return report


def apply_quality(df: pl.DataFrame, model: TextClassifier, cfg: QualityConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(kept, removed): ``quality`` = P(good) on every row; below `min_score` removed as ``quality_low``."""
    scored = df.with_columns(pl.Series("quality", model.score_documents(df.get_column("text"))).round(4))
    checks = [] if cfg.min_score is None else [(REASON, pl.col("quality") < cfg.min_score)]
    return split_by_reason(scored, checks, STAGE)

"""Linear text classifiers for the safety and quality stages: hashed word n-grams → logistic regression.

A `TextClassifier` is stored as one ``.npz`` (its non-zero weights, bias and feature settings as JSON): no pickle, so a
model file is data, loads in any Python with numpy, and the hashing trick means there is no vocabulary to ship.

Documents are scored in windows of `WINDOW_WORDS` whitespace words (the models are trained on snippets of about that
size); a document's score is the length-weighted mean of its windows' probabilities, so one bad sentence in a long
article moves the score by its share of the article, not to 1.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl
import xxhash

from infra import storage

WINDOW_WORDS = 64


@dataclass(frozen=True)
class Features:
    """Hashed, lower-cased n-grams (counts, then L2-normalised) in `n_features` buckets.

    `analyzer` "word": word n-grams (order matters: what tells fluent text from shuffled words); "char_wb":
    character n-grams inside word boundaries (robust to spelling variants: "pr0n", "s3xy", plurals).
    """

    n_features: int = 2**18
    ngram_max: int = 2
    ngram_min: int = 1
    analyzer: str = "word"

    def __post_init__(self) -> None:
        if self.n_features < 2 or self.n_features & (self.n_features - 1):
            raise ValueError(f"Features.n_features={self.n_features}: expected a power of two >= 2")
        if self.analyzer not in ("word", "char_wb"):
            raise ValueError(f"Features.analyzer={self.analyzer!r}: expected 'word' or 'char_wb'")
        top = 4 if self.analyzer == "word" else 8
        if not 1 <= self.ngram_min <= self.ngram_max <= top:
            raise ValueError(f"Features.ngram_min={self.ngram_min}, ngram_max={self.ngram_max}: expected "
                             f"1 <= ngram_min <= ngram_max <= {top} for analyzer {self.analyzer!r}")

    def transform(self, texts: Sequence[str]) -> Any:
        """A scipy CSR matrix (len(texts), n_features)."""
        from sklearn.feature_extraction.text import HashingVectorizer

        vectorizer = HashingVectorizer(
            n_features=self.n_features, ngram_range=(self.ngram_min, self.ngram_max), alternate_sign=False,
            norm="l2", lowercase=True, analyzer=self.analyzer,
            token_pattern=r"(?u)\b\w+\b|[$€£%!?]",  # currency and "!" matter for ads (word analyzer only)
        )
        return vectorizer.transform(list(texts))


@dataclass(frozen=True)
class TextClassifier:
    """P(label = 1 | text) = sigmoid(w · features(text) + b)."""

    features: Features
    weights: np.ndarray  # (n_features,) float32
    bias: float
    info: dict[str, Any]  # what it was trained on, its held-out figures

    @classmethod
    def train(
        cls, texts: Sequence[str], labels: Sequence[int], *, features: Features | None = None, c: float = 4.0,
        sample_weight: Sequence[float] | None = None, info: dict[str, Any] | None = None,
    ) -> TextClassifier:
        """Fit an L2-regularised logistic regression (liblinear, fixed seed: the same data gives the same model).

        Classes are balanced by their weights unless `sample_weight` is given (then that weighting is used as is).
        """
        from sklearn.linear_model import LogisticRegression

        labels = np.asarray(labels)
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if set(np.unique(labels).tolist()) != {0, 1}:
            raise ValueError(f"labels must contain both 0 and 1 (and nothing else); got {sorted(set(labels.tolist()))}")
        features = features or Features()
        balance = "balanced" if sample_weight is None else None
        model = LogisticRegression(C=c, solver="liblinear", class_weight=balance, max_iter=1000, random_state=0)
        model.fit(features.transform(texts), labels, sample_weight=sample_weight)
        return cls(features, model.coef_[0].astype(np.float32), float(model.intercept_[0]),
                   {"examples": len(labels), "positives": int(labels.sum()), **(info or {})})

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """P(label = 1) per text, float64."""
        if not len(texts):
            return np.zeros(0)
        logits = self.features.transform(texts) @ self.weights.astype(np.float64) + self.bias
        return 1.0 / (1.0 + np.exp(-np.asarray(logits).ravel()))

    def score_documents(self, texts: pl.Series | Sequence[str]) -> np.ndarray:
        """Per document: the length-weighted mean window probability (0.0 for a document without words)."""
        return window_scores(texts, self.predict)

    # ------------------------------------------------------------------ storage

    def to_bytes(self) -> bytes:
        nz = np.flatnonzero(self.weights)
        meta = {"features": asdict(self.features), "bias": self.bias, "info": self.info}
        buf = io.BytesIO()
        np.savez_compressed(buf, index=nz.astype(np.int64), value=self.weights[nz],
                            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TextClassifier:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            features = Features(**meta["features"])
            weights = np.zeros(features.n_features, dtype=np.float32)
            weights[z["index"]] = z["value"]
        return cls(features, weights, float(meta["bias"]), meta["info"])

    def save(self, url: str) -> str:
        storage.write_bytes(url, self.to_bytes())
        return url

    @classmethod
    def load(cls, url: str) -> TextClassifier:
        try:
            return cls.from_bytes(storage.read_bytes(url))
        except (KeyError, ValueError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{url!r} is not a TextClassifier file (.npz with index, value, meta): {e}") from e


def windows(texts: pl.Series | Sequence[str], words: int = WINDOW_WORDS) -> pl.DataFrame:
    """Documents cut into windows of `words` whitespace words: (doc, text, n) with n the window's word count."""
    series = texts if isinstance(texts, pl.Series) else pl.Series("text", list(texts), dtype=pl.Utf8)
    exploded = (
        pl.DataFrame({"text": series}).with_row_index("doc")
        .select("doc", pl.col("text").str.extract_all(r"\S+").alias("w")).explode("w").drop_nulls("w")
    )
    grouped = exploded.with_columns((pl.int_range(pl.len()).over("doc") // words).alias("k"))
    return grouped.group_by("doc", "k", maintain_order=True).agg(
        pl.col("w").str.join(" ").alias("text"), pl.len().alias("n")
    ).drop("k")


def window_scores(texts: pl.Series | Sequence[str], predict: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
    """Length-weighted mean of `predict` over each document's windows (0.0 for a document without words)."""
    n_docs = len(texts)
    parts = windows(texts)
    if parts.is_empty():
        return np.zeros(n_docs)
    probs = predict(parts.get_column("text").to_list())
    doc = parts.get_column("doc").to_numpy().astype(np.int64)
    n = parts.get_column("n").to_numpy().astype(np.float64)
    total = np.bincount(doc, weights=n * probs, minlength=n_docs)
    words = np.bincount(doc, weights=n, minlength=n_docs)
    return np.divide(total, words, out=np.zeros(n_docs), where=words > 0)


def split_held_out(texts: Sequence[str], held_out: float = 0.25, salt: str = "") -> np.ndarray:
    """A boolean mask, True = held out: by a hash of the text, so the split is stable when the set grows."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out={held_out}: expected a fraction in (0, 1)")
    cut = int(held_out * 2**32)
    return np.array([xxhash.xxh32_intdigest((salt + t).encode("utf-8")) < cut for t in texts], dtype=bool)


def precision_recall(scores: np.ndarray, labels: Sequence[int], threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of ``score > threshold`` against `labels` (1 = positive), with the counts."""
    labels = np.asarray(labels).astype(bool)
    flagged = np.asarray(scores) > threshold
    tp = int((flagged & labels).sum())
    fp = int((flagged & ~labels).sum())
    fn = int((~flagged & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn,
            "positives": int(labels.sum()), "negatives": int((~labels).sum()), "threshold": threshold}

"""The hashed-n-gram logistic-regression classifier: training, windows, storage, evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.clean.classify import (
    Features,
    TextClassifier,
    precision_recall,
    split_held_out,
    window_scores,
    windows,
)

GOOD = [f"the river {w} runs quietly past the old mill in spring" for w in ("north", "south", "east", "west", "slow")]
BAD = [f"buy cheap {w} now limited offer click here" for w in ("pills", "watches", "loans", "shoes", "phones")]


def toy() -> TextClassifier:
    return TextClassifier.train(GOOD + BAD, [0] * 5 + [1] * 5, features=Features(n_features=2**12), info={"toy": 1})


def test_trained_classifier_separates_and_records_what_it_saw() -> None:
    model = toy()
    probs = model.predict(["cheap loans click here now", "the old mill by the river"])
    assert probs[0] > 0.5 > probs[1]
    assert model.info == {"examples": 10, "positives": 5, "toy": 1}


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    model = toy()
    url = model.save(str(tmp_path / "m.npz"))
    loaded = TextClassifier.load(url)
    texts = GOOD + BAD + ["something else entirely"]
    np.testing.assert_array_equal(loaded.predict(texts), model.predict(texts))
    assert loaded.info == model.info and loaded.features == model.features


def test_loading_a_file_that_is_not_a_model_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="x.npz.*not a TextClassifier"):
        TextClassifier.load(str(bad))
    with pytest.raises(FileNotFoundError):
        TextClassifier.load(str(tmp_path / "missing.npz"))


BAD_FEATURES = [({"n_features": 1000}, "n_features"), ({"ngram_max": 0}, "ngram_max"), ({"analyzer": "x"}, "analyzer")]


@pytest.mark.parametrize(("kwargs", "field"), BAD_FEATURES)
def test_bad_feature_settings_name_themselves(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=f"Features.*{field}"):
        Features(**kwargs)


def test_training_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both 0 and 1"):
        TextClassifier.train(GOOD, [0] * 5)
    with pytest.raises(ValueError, match="5 texts but 4 labels"):
        TextClassifier.train(GOOD, [0, 1, 0, 1])


def test_windows_cut_documents_in_word_order() -> None:
    text = " ".join(f"w{i}" for i in range(150))
    parts = windows([text, "", "one two"], words=64)
    assert parts.get_column("doc").to_list() == [0, 0, 0, 2]
    assert parts.get_column("n").to_list() == [64, 64, 22, 2]
    assert parts.get_column("text")[1].split()[0] == "w64"


def test_document_score_is_the_length_weighted_window_mean() -> None:
    bad_window = " ".join(["bad"] * 64)
    doc = bad_window + " " + " ".join(["ok"] * 192)  # one bad window of four

    def predict(texts: list[str]) -> np.ndarray:
        return np.array([1.0 if "bad" in t else 0.0 for t in texts])

    scores = window_scores([doc, "", "bad"], predict)
    np.testing.assert_allclose(scores, [0.25, 0.0, 1.0])


def test_held_out_split_is_stable_and_about_the_asked_share() -> None:
    texts = [f"text number {i}" for i in range(4000)]
    mask = split_held_out(texts, 0.25, salt="s")
    assert abs(mask.mean() - 0.25) < 0.03
    np.testing.assert_array_equal(split_held_out(texts[:100], 0.25, salt="s"), mask[:100])  # growing keeps the split
    assert not np.array_equal(split_held_out(texts, 0.25, salt="t"), mask)
    with pytest.raises(ValueError, match="held_out=1.5"):
        split_held_out(texts, 1.5)


def test_precision_recall_counts() -> None:
    report = precision_recall(np.array([0.9, 0.8, 0.2, 0.7, 0.1]), [1, 1, 1, 0, 0], 0.5)
    assert (report["tp"], report["fp"], report["fn"]) == (2, 1, 1)
    assert report["precision"] == pytest.approx(2 / 3) and report["recall"] == pytest.approx(2 / 3)

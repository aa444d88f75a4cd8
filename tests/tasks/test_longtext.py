"""Long-context data (InternLM2 §3.1.3): length selection, statistical filters, perplexity-difference filter."""

from __future__ import annotations

import base64
import random
from collections.abc import Sequence

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError

from model.config import PRESETS, ModelConfig
from model.model import InternLM2
from tasks.longtext.filters import REASONS, STAT_COLUMNS, LongTextConfig, long_text_stats, select_long
from tasks.longtext.perplexity import (
    REASON,
    PerplexityConfig,
    context_gain,
    pair_starts,
    ppl_filter,
    score_documents,
)

MIN_CHARS = 4000
CFG = LongTextConfig(min_chars=MIN_CHARS)  # the default thresholds, a length our test documents reach
PARAGRAPH = (
    "The garden was quiet in the early morning. Dew covered the grass, and a thrush was singing from the old apple "
    "tree. We walked down to the river, where the water ran clear over the stones, because the path by the road "
    "was closed."
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


@pytest.fixture(scope="module")
def clean_doc(prose: list[str]) -> str:
    """Real long prose: standard-library docstrings, joined until the document is long."""
    parts: list[str] = []
    for doc in prose:
        parts.append(doc)
        if sum(map(len, parts)) > 2 * MIN_CHARS:
            break
    return "\n\n".join(parts)


def rng_words(rng: random.Random, n: int, length: int = 6) -> list[str]:
    return ["".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(length)) for _ in range(n)]


def crafted(clean: str) -> dict[str, str]:
    """One long document per statistical reason code (two for line length: giant line, and a blob among lines)."""
    rng = random.Random(7)
    vocab = [*rng_words(rng, 25), "however", "because", "the", "and"]
    sentences = (" ".join(rng.choice(vocab) for _ in range(9)).capitalize() + "." for _ in range(10**6))
    few_words = "\n".join(next(sentences) + " " + next(sentences) for _ in range(70))
    blob = base64.b64encode(rng.randbytes(30_000)).decode()
    csv = "\n".join(",".join(f"{rng.random():.6f}" for _ in range(6)) for _ in range(120))
    names = rng_words(rng, 400, 7)
    authors = "\n".join(f"{a.title()} {b.title()} <{a}@{b}.org>" for a, b in zip(names[::2], names[1::2], strict=True))
    return {
        "long_low_compression": "\n\n".join([PARAGRAPH] * 30),
        "long_low_unique_words": few_words,
        "long_line_length": clean.replace("\n", " "),
        "long_line_length/blob": clean + "\n" + blob + "\n" + clean,
        "long_punctuation": csv,
        "long_few_connectives": (authors + "\n") * 2,
    }


def frame(texts: Sequence[str], ids: Sequence[str] | None = None, **columns: Sequence[str]) -> pl.DataFrame:
    return pl.DataFrame({"id": list(ids or [f"d{i}" for i in range(len(texts))]), "text": list(texts), **columns})


# ---------------------------------------------------------------- statistics and length selection


def test_stats_of_a_small_document_have_the_documented_values() -> None:
    text = "However, the cat sat.\n\nThe cat ran because it was late."
    row = long_text_stats(frame([text])).row(0, named=True)
    assert row["n_chars"] == len(text) and row["n_words"] == 11
    assert row["punctuation_rate"] == pytest.approx(3 / 11)  # "," "." "."
    assert row["connective_rate"] == pytest.approx(2 / 11)  # however, because
    assert row["unique_word_rate"] == pytest.approx(9 / 11)  # "the" and "cat" come twice
    assert row["mean_line_chars"] == pytest.approx((21 + 32) / 2)  # the blank line is not a line
    assert row["line_chars_cv"] == pytest.approx(5.5 / 26.5)  # population std over mean
    assert 0.5 < row["compression_ratio"] < 1.5  # a short text barely compresses


def test_unique_word_rate_is_pooled_over_windows_so_length_does_not_lower_it() -> None:
    rng = random.Random(0)
    vocab = rng_words(rng, 2000)
    text = " ".join(rng.choice(vocab) for _ in range(20_000))
    short, long = long_text_stats(frame([text[: len(text) // 10], text]))["unique_word_rate"].to_list()
    assert long == pytest.approx(short, abs=0.02)  # a plain type/token ratio would fall from ~0.6 to ~0.1
    assert long > 0.5


def test_every_row_lands_in_exactly_one_of_long_kept_long_removed_and_short(clean_doc: str) -> None:
    docs = [clean_doc, "too short", "\n\n".join([PARAGRAPH] * 30), clean_doc[: MIN_CHARS - 1], clean_doc[:MIN_CHARS]]
    df = frame(docs, source=["a", "b", "c", "d", "e"])
    kept, removed, short = select_long(df, CFG)
    assert kept["id"].to_list() == ["d0", "d4"]
    assert removed["id"].to_list() == ["d2"]
    assert short.equals(df.filter(pl.col("id").is_in(["d1", "d3"])))  # short data untouched
    assert kept.columns == [*df.columns, *STAT_COLUMNS]
    assert removed.columns == [*df.columns, *STAT_COLUMNS, "stage", "reason"]
    assert sorted([*kept["id"], *removed["id"], *short["id"]]) == sorted(df["id"])


def test_one_crafted_document_per_reason_is_removed_with_that_reason_and_clean_prose_passes(clean_doc: str) -> None:
    docs = {"clean": clean_doc, **crafted(clean_doc)}
    assert min(map(len, docs.values())) >= MIN_CHARS
    kept, removed, short = select_long(frame(list(docs.values()), list(docs)), CFG)
    assert kept["id"].to_list() == ["clean"] and short.is_empty()
    got = dict(zip(removed["id"], removed["reason"], strict=True))
    assert got == {name: name.split("/")[0] for name in docs if name != "clean"}
    assert set(got.values()) == set(REASONS) and set(removed["stage"]) == {"longtext"}


def test_a_check_set_to_none_is_off(clean_doc: str) -> None:
    repeated = frame(["\n\n".join([PARAGRAPH] * 30)])
    assert select_long(repeated, CFG)[1]["reason"].to_list() == ["long_low_compression"]
    off = LongTextConfig(min_chars=MIN_CHARS, min_compression_ratio=None, min_unique_word_rate=None)
    kept, removed, _ = select_long(repeated, off)
    assert len(kept) == 1 and removed.is_empty()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_chars": 0}, "min_chars"),
        ({"min_compression_ratio": 1.5}, "min_compression_ratio"),
        ({"min_unique_word_rate": -0.1}, "min_unique_word_rate"),
        ({"max_line_chars_cv": 0}, "max_line_chars_cv"),
        ({"min_mean_line_chars": 500, "max_mean_line_chars": 100}, "max_mean_line_chars"),
        ({"min_punctuation_rate": 2.0, "max_punctuation_rate": 1.0}, "max_punctuation_rate"),
        ({"min_connectives": 0.1}, "min_connectives"),
    ],
)
def test_bad_long_text_config_raises_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        LongTextConfig(**kwargs)


def test_bad_input_frames_raise_actionable_errors() -> None:
    with pytest.raises(ValueError, match="'text' column"):
        select_long(pl.DataFrame({"body": ["x"]}), CFG)
    with pytest.raises(ValueError, match="compression_ratio"):
        select_long(frame(["x"], compression_ratio=["0.3"]), CFG)
    with pytest.raises(ValueError, match="has nulls"):
        select_long(pl.DataFrame({"text": ["x", None]}), CFG)


# ---------------------------------------------------------------- context gain


@pytest.fixture(scope="module")
def random_model() -> InternLM2:
    """The smoke preset with a small vocabulary, randomly initialised with a large std so logits are far from flat."""
    torch.manual_seed(0)
    return InternLM2(PRESETS["smoke"].replace(vocab_size=64, init_std=0.3)).eval()


def reference_gain(model: InternLM2, ids: list[int], seg: int, pairs: Sequence[int]) -> float:
    """One unbatched forward per sequence, log-softmax over the full logits, float64 sums."""

    def nll(seq: list[int], start: int) -> float:
        logp = torch.log_softmax(model(torch.tensor([seq]))[0].double(), dim=-1)  # (T, V)
        return -float(np.mean([logp[j, seq[j + 1]].item() for j in range(start, len(seq) - 1)]))

    gains = []
    for i in pairs:
        prev, nxt = ids[i * seg : (i + 1) * seg], ids[(i + 1) * seg : (i + 2) * seg]
        gains.append(nll(nxt, 0) - nll(prev + nxt, seg))
    return float(np.mean(gains))


def test_pair_starts_take_evenly_spaced_pairs_when_capped() -> None:
    assert pair_starts(7 * 16 + 5, 16, None).tolist() == [0, 16, 32, 48, 64, 80]
    assert pair_starts(7 * 16 + 5, 16, 3).tolist() == [0, 32, 80]  # first, middle, last of the six pairs
    assert pair_starts(7 * 16 + 5, 16, 6).tolist() == [0, 16, 32, 48, 64, 80]
    assert pair_starts(31, 16, None).tolist() == []


@pytest.mark.parametrize(("max_pairs", "pairs"), [(None, range(6)), (3, (0, 2, 5))])
def test_context_gain_equals_an_unbatched_reference(
    random_model: InternLM2, max_pairs: int | None, pairs: Sequence[int]
) -> None:
    seg = 16
    ids = torch.randint(0, 64, (7 * seg + 5,), generator=torch.Generator().manual_seed(1)).tolist()
    got = context_gain(random_model, ids, seg, max_pairs=max_pairs, batch_size=4)  # batches of 4 then 2
    expected = reference_gain(random_model, ids, seg, pairs)
    assert got == pytest.approx(expected, abs=1e-5)
    assert abs(expected) > 1e-2  # the comparison is not between two zeros


def test_context_gain_is_none_under_two_full_segments(random_model: InternLM2) -> None:
    assert context_gain(random_model, list(range(31)), 16) is None
    assert context_gain(random_model, [], 16) is None
    assert isinstance(context_gain(random_model, list(range(32)), 16), float)


def test_segments_longer_than_half_the_context_are_refused(random_model: InternLM2) -> None:
    with pytest.raises(ValueError, match="segment_tokens=65.*max_seq_len=128"):
        context_gain(random_model, list(range(200)), 65)


class Letters:
    """A character tokenizer over a..z (ids 0..25): segments are exactly what the test writes."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[ord(c) - ord("a") for c in text] for text in texts]


def test_score_documents_batches_across_documents_and_matches_context_gain(random_model: InternLM2) -> None:
    rng = random.Random(3)
    texts = ["".join(rng.choice("abcdefghij") for _ in range(n)) for n in (40, 10, 100, 31, 64)]
    got = score_documents(random_model, Letters(), texts, segment_tokens=16, max_pairs=3, batch_size=4)
    for text, gain in zip(texts, got, strict=True):
        expected = context_gain(random_model, Letters().encode_batch([text])[0], 16, max_pairs=3)
        assert np.isnan(gain) if expected is None else gain == pytest.approx(expected, abs=1e-5)
    assert np.isnan(got).tolist() == [False, True, False, True, False]


SEG, VOCAB = 8, 26


@pytest.fixture(scope="module")
def copy_model() -> InternLM2:
    """A tiny model trained (300 Adam steps, seconds) on S + S: random letters, then the same letters again."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=2 * SEG)
    model = InternLM2(config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        first = torch.randint(0, VOCAB, (64, SEG))
        seq = torch.cat([first, first], dim=1)  # (64, 2·SEG)
        loss = model.loss(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_context_helps_a_document_whose_segments_repeat_and_not_fresh_random_tokens(copy_model: InternLM2) -> None:
    g = torch.Generator().manual_seed(1)
    repeating = torch.randint(0, VOCAB, (SEG,), generator=g).tolist() * 6
    fresh = torch.randint(0, VOCAB, (6 * SEG,), generator=g).tolist()
    gain_repeating = context_gain(copy_model, repeating, SEG)
    gain_fresh = context_gain(copy_model, fresh, SEG)
    assert gain_repeating is not None and gain_fresh is not None
    assert gain_repeating > 2.0  # alone ≈ ln 26 = 3.26 nats, with the copy in context ≈ 0
    assert gain_fresh < 0.0  # the model expects a copy: unrelated context misleads it
    assert gain_repeating - gain_fresh > 2.0


# ---------------------------------------------------------------- the filter


def test_ppl_filter_removes_below_threshold_and_uses_the_per_source_threshold(copy_model: InternLM2) -> None:
    rng = random.Random(5)
    letters = "abcdefghijklmnopqrstuvwxyz"
    segment = "".join(rng.choice(letters) for _ in range(SEG))
    fresh = ["".join(rng.choice(letters) for _ in range(6 * SEG)) for _ in range(2)]
    df = frame(
        [segment * 6, fresh[0], fresh[1], "abcdefghij"],
        ["repeating", "prose", "code", "short"],
        source=["prose", "prose", "code", "prose"],
    )
    cfg = PerplexityConfig(
        segment_tokens=SEG, max_pairs=4, batch_size=4, min_gain=1.0, min_gain_by_source={"code": -100.0}
    )
    kept, removed = ppl_filter(df, copy_model, Letters(), cfg)
    assert removed["id"].to_list() == ["prose"]
    assert removed["reason"].to_list() == [REASON] and removed["stage"].to_list() == ["longtext"]
    assert removed["ppl_gain"][0] < 1.0
    gains = dict(zip(kept["id"], kept["ppl_gain"], strict=True))
    assert list(gains) == ["repeating", "code", "short"]
    assert gains["code"] < 1.0  # below the default threshold: kept by its source's own
    assert gains["short"] is None  # under two segments: no gain, kept
    expected = context_gain(copy_model, Letters().encode_batch([segment * 6])[0], SEG, max_pairs=4)
    assert gains["repeating"] == pytest.approx(expected, abs=1e-5)


def test_ppl_filter_with_only_a_default_threshold_judges_every_row(copy_model: InternLM2) -> None:
    rng = random.Random(6)
    segment = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(SEG))
    df = frame([segment * 4, segment * 5, "abc"])
    kept, removed = ppl_filter(df, copy_model, Letters(), PerplexityConfig(segment_tokens=SEG, min_gain=1.0))
    assert removed.is_empty() and kept["ppl_gain"][0] > 1.0 and kept["ppl_gain"][1] > 1.0
    assert kept["ppl_gain"][2] is None


def test_ppl_filter_off_scores_nothing_and_keeps_everything(copy_model: InternLM2) -> None:
    df = frame(["abcdefgh" * 4, "abc"])
    kept, removed = ppl_filter(df, copy_model, Letters(), PerplexityConfig(segment_tokens=SEG, min_gain=None))
    assert kept["ppl_gain"].to_list() == [None, None] and removed.is_empty()
    assert removed.columns == [*df.columns, "ppl_gain", "stage", "reason"]


def test_ppl_config_and_frame_errors_name_the_problem(copy_model: InternLM2) -> None:
    with pytest.raises(ValidationError, match="segment_tokens"):
        PerplexityConfig(segment_tokens=1)
    with pytest.raises(ValidationError, match="max_pairs"):
        PerplexityConfig(max_pairs=0)
    with pytest.raises(ValidationError, match="min_gain_by_sources"):
        PerplexityConfig(min_gain_by_sources={"code": 0.1})
    with pytest.raises(ValueError, match="needs a 'source' column"):
        ppl_filter(frame(["abc"]), copy_model, Letters(), PerplexityConfig(min_gain_by_source={"code": 0.1}))

"""Long-context data (InternLM2 §3.1.3): length selection, then statistical filters, as polars expressions.

The paper selects documents over 32 KB, then drops long documents that are not *coherent long text*
(repetitive boilerplate, tables and lists, symbol soup) with statistical filters, then with a perplexity filter
(`tasks.longtext.perplexity`). It names the statistics (lexical and linguistic features) but gives no definitions or
thresholds; ours:

- ``compression_ratio``: zlib-compressed bytes / UTF-8 bytes (level 6). Prose and documentation compress to
  0.3–0.45; a document that repeats itself compresses far better. zlib looks back 32 KB only, so a document that
  repeats a block longer than that is not caught here (the unique-word rate usually is).
- ``unique_word_rate``: distinct lower-cased words (runs of letters/digits) per word, counted in consecutive windows
  of `UNIQUE_WINDOW_WORDS` words and pooled (sum of each window's distinct words / all words). A plain type/token
  ratio falls with length (Heaps' law), so one threshold would judge a 300 KB book harder than a 32 KB article; a
  window makes the rate a property of the writing, not of the length.
- ``mean_line_chars`` and ``line_chars_cv`` (standard deviation / mean) over non-blank lines: one giant line
  (minified or base64 data) or a column of two-word lines is not prose; a high variation means short lines mixed
  with blobs of data.
- ``punctuation_rate``: Unicode punctuation characters (``\\p{P}``) per whitespace-separated word: too few is word
  salad or keyword lists, too many is markup, code or ASCII art.
- ``connective_rate``: share of words that are discourse connectives (`CONNECTIVES`: "however", "because", "for
  example", …). Argument and explanation need them; lists and tables have almost none.

Reason codes (stage ``longtext``), the first that fires names the document's fate: ``long_low_compression``,
``long_low_unique_words``, ``long_line_length``, ``long_punctuation``, ``long_few_connectives`` (and
``long_ppl_no_context_gain`` from the perplexity filter).

`select_long` splits a frame three ways: ``short`` (below `min_chars`: not removed, it stays in the corpus as short
data), ``long_kept`` and ``long_removed``; every input row is in exactly one.

Length: the paper keeps documents over 32 KB; we count characters, not bytes (`min_chars`, default 32,768), so the
threshold means the same amount of text in any script's UTF-8. Our presets' corpora are smaller and pass smaller
values. The paper does not apply these filters to code: run them on text shards, not on ``code/``.

How the defaults were chosen. Positives: the 2,484 documents of 8,000+ characters this machine holds (179 M
characters): the built-in corpus's sources without a size cap (1,147 man pages in raw roff, 1,017 ``/usr/share/doc``
READMEs, changelogs and copyright files, 92 licences, 69 package READMEs, 57 standard-library docstring documents)
and ``pydoc`` plain-text renders of 102 standard-library modules; 634 of them are 32 KB or longer. Negatives (18,
capped at 64 KB): ``dpkg.log`` and ``alternatives.log``, minified JavaScript and a source map, numpy's CSV test
tables, pip ``RECORD`` files, pretty-printed JSON, and, made from real prose, a paragraph repeated 30 times, a word
list, keyword salad, a Markdown table of random words and numbers, prose with its line breaks removed. Each
threshold sits at or beyond the positives' 1 % tail (medians: compression 0.29, unique words 0.41, mean line 49
characters, variation 0.41, punctuation 0.70 and connectives 0.017 per word; extremes 0.05, 0.09, 15.7, 5.2,
0.14–4.9, 0) and inside the negatives' range. The defaults keep 618 of the 634 positives of 32 KB and more (97.5 %,
93.8 % of their characters); the 16 dropped are lists that are not prose (AUTHORS and THANKS name lists, Boost's
2 MB copyright file list, changelogs of commit links) and pydoc renders that repeat every inherited member (zlib
ratio under 0.1). They drop 17 of the 18 negatives; the Markdown table passes, its random words holding connectives.
A one-line document is dropped by `max_mean_line_chars`: set it to None for corpora whose extraction removes line
breaks.
"""

from __future__ import annotations

import zlib

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.clean.safety import split_by_reason

STAGE = "longtext"
REASONS = (
    "long_low_compression",
    "long_low_unique_words",
    "long_line_length",
    "long_punctuation",
    "long_few_connectives",
)
PAPER_MIN_CHARS = 32 * 1024
UNIQUE_WINDOW_WORDS = 500
WORD = r"[\p{L}\p{N}]+"  # for the unique-word rate: case-folded runs of letters and digits
# Discourse connectives (PDTB's explicit connectives, without "and"/"or", which lists and titles use as much as prose).
CONNECTIVES = (
    "although", "also", "as a result", "because", "besides", "but", "consequently", "conversely", "for example",
    "for instance", "furthermore", "hence", "however", "in addition", "in contrast", "in fact", "indeed", "instead",
    "likewise", "meanwhile", "moreover", "nevertheless", "nonetheless", "on the other hand", "otherwise",
    "similarly", "since", "so", "then", "therefore", "though", "thus", "unless", "whereas", "while", "yet",
    "if", "when",
)  # fmt: skip
_SPACE = r"\s+"
CONNECTIVE_PATTERN = (
    rf"(?i)\b(?:{'|'.join(c.replace(' ', _SPACE) for c in sorted(CONNECTIVES, key=len, reverse=True))})\b"
)
STAT_COLUMNS = (
    "n_chars",
    "n_words",
    "compression_ratio",
    "unique_word_rate",
    "mean_line_chars",
    "line_chars_cv",
    "punctuation_rate",
    "connective_rate",
)
_DOC = "_doc"


class LongTextConfig(BaseModel):
    """Length selection and the statistical filters' thresholds; a `None` threshold turns its check off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_chars: int = Field(PAPER_MIN_CHARS, ge=1, description="documents this long (characters) are long data")
    min_compression_ratio: float | None = Field(0.1, gt=0, lt=1, description="drop below: repetitive")
    min_unique_word_rate: float | None = Field(0.15, gt=0, le=1, description="drop below: few distinct words")
    min_mean_line_chars: float | None = Field(12.0, ge=0, description="drop below: a column of fragments")
    max_mean_line_chars: float | None = Field(3000.0, gt=0, description="drop above: giant lines, no line breaks")
    max_line_chars_cv: float | None = Field(8.0, gt=0, description="drop above: short lines mixed with blobs")
    min_punctuation_rate: float | None = Field(0.05, ge=0, description="drop below (per word): no sentences")
    max_punctuation_rate: float | None = Field(3.5, gt=0, description="drop above (per word): markup, data")
    min_connective_rate: float | None = Field(0.002, ge=0, le=1, description="drop below: lists and tables")

    @model_validator(mode="after")
    def _check_ranges(self) -> LongTextConfig:
        for low, high in (
            ("min_mean_line_chars", "max_mean_line_chars"),
            ("min_punctuation_rate", "max_punctuation_rate"),
        ):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo >= hi:
                raise ValueError(f"{low} ({lo}) must be below {high} ({hi})")
        return self


# ---------------------------------------------------------------- statistics


def compression_ratio(text: str) -> float:
    """zlib-compressed bytes / UTF-8 bytes; 1.0 for an empty text (nothing to compress is not repetitive)."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 6)) / len(raw) if raw else 1.0


def _ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    return pl.when(den > 0).then(num.cast(pl.Float64) / den).otherwise(0.0)


def _unique_word_rate(docs: pl.DataFrame) -> pl.DataFrame:
    """Per document: distinct words per `UNIQUE_WINDOW_WORDS`-word window, summed, over all words."""
    words = docs.select(_DOC, pl.col("text").str.to_lowercase().str.extract_all(WORD).alias("_w"))
    words = words.explode("_w").drop_nulls("_w")
    windows = words.with_columns((pl.int_range(pl.len()).over(_DOC) // UNIQUE_WINDOW_WORDS).alias("_win"))
    per_window = windows.group_by(_DOC, "_win").agg(pl.col("_w").n_unique().alias("_u"), pl.len().alias("_n"))
    return per_window.group_by(_DOC).agg(_ratio(pl.col("_u").sum(), pl.col("_n").sum()).alias("unique_word_rate"))


def _line_stats() -> list[pl.Expr]:
    """Mean and coefficient of variation of the lengths of non-blank lines (0 for a blank document)."""
    lengths = (
        pl.col("text")
        .str.split("\n")
        .list.eval(pl.element().filter(pl.element().str.strip_chars() != "").str.len_chars())
    )
    mean = lengths.list.mean().fill_null(0.0)
    std = lengths.list.eval(pl.element().std(ddof=0)).list.first().fill_null(0.0)
    return [mean.alias("mean_line_chars"), _ratio(std, mean).alias("line_chars_cv")]


def long_text_stats(df: pl.DataFrame) -> pl.DataFrame:
    """`df` plus the `STAT_COLUMNS`; rows and their order unchanged."""
    _check_input(df)
    text = pl.col("text")
    n_words = text.str.count_matches(r"\S+")
    docs = df.with_row_index(_DOC).with_columns(
        text.str.len_chars().alias("n_chars"),
        n_words.alias("n_words"),
        pl.Series("compression_ratio", [compression_ratio(t) for t in df.get_column("text")], pl.Float64),
        *_line_stats(),
        _ratio(text.str.count_matches(r"\p{P}"), n_words).alias("punctuation_rate"),
        _ratio(text.str.count_matches(CONNECTIVE_PATTERN), n_words).alias("connective_rate"),
    )
    unique = _unique_word_rate(docs.select(_DOC, "text"))
    out = docs.join(unique, on=_DOC, how="left", maintain_order="left")
    return out.with_columns(pl.col("unique_word_rate").fill_null(0.0)).drop(_DOC).select(*df.columns, *STAT_COLUMNS)


def _check_input(df: pl.DataFrame) -> None:
    if "text" not in df.columns:
        raise ValueError(f"the long-text filters need a 'text' column; got columns {df.columns}")
    if df.schema["text"] != pl.Utf8:
        raise ValueError(f"the 'text' column is {df.schema['text']}, expected String")
    if df.get_column("text").null_count():
        raise ValueError("the 'text' column has nulls: parse_shard quarantines records without text")
    clash = [c for c in df.columns if c in STAT_COLUMNS or c.startswith("_") or c in ("stage", "reason")]
    if clash:
        raise ValueError(
            f"columns {clash} clash with the long-text filters' own columns {STAT_COLUMNS}, stage, "
            "reason or the reserved '_' prefix: drop or rename them first"
        )


# ---------------------------------------------------------------- rules


def _either(*conditions: pl.Expr | None) -> pl.Expr | None:
    """True where any set condition is; None when none is set (the check is off)."""
    present = [c for c in conditions if c is not None]
    return pl.any_horizontal(present) if present else None


def _outside(column: str, low: float | None, high: float | None) -> pl.Expr | None:
    col = pl.col(column)
    return _either(None if low is None else col < low, None if high is None else col > high)


def long_checks(cfg: LongTextConfig) -> list[tuple[str, pl.Expr]]:
    """(reason, drop expression over `STAT_COLUMNS`) for every check the config turns on, in reason order."""
    line = _either(
        _outside("mean_line_chars", cfg.min_mean_line_chars, cfg.max_mean_line_chars),
        _outside("line_chars_cv", None, cfg.max_line_chars_cv),
    )
    checks = [
        ("long_low_compression", _outside("compression_ratio", cfg.min_compression_ratio, None)),
        ("long_low_unique_words", _outside("unique_word_rate", cfg.min_unique_word_rate, None)),
        ("long_line_length", line),
        ("long_punctuation", _outside("punctuation_rate", cfg.min_punctuation_rate, cfg.max_punctuation_rate)),
        ("long_few_connectives", _outside("connective_rate", cfg.min_connective_rate, None)),
    ]
    return [(name, expr) for name, expr in checks if expr is not None]


def select_long(df: pl.DataFrame, cfg: LongTextConfig) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(long_kept, long_removed, short).

    ``short``: rows under ``cfg.min_chars`` characters, unchanged. ``long_kept``: the rest that pass every check,
    with the `STAT_COLUMNS`. ``long_removed``: the stats columns plus ``stage="longtext"`` and the first ``reason``.
    """
    _check_input(df)
    is_long = pl.col("text").str.len_chars() >= cfg.min_chars
    short = df.filter(~is_long)
    stats = long_text_stats(df.filter(is_long))
    kept, removed = split_by_reason(stats, long_checks(cfg), STAGE)
    return kept, removed, short

"""Heuristic quality rules (InternLM2 §3.1.1, step 3) as polars expressions with reason codes.

Like datatrove's Gopher / C4 / FineWeb filters, each rule has a name (its reason code), thresholds as keyword
arguments (``None`` = off) and says *drop* or *keep*; unlike them, every statistic is computed once for the whole
frame by `annotate` (vectorised string, list and group-by operations instead of a Python loop per document), and
`apply_rules` turns the rule list into one expression. Departures from datatrove, on purpose:

- Words are whitespace-separated tokens, not NLTK tokens: a punctuation-splitting tokenizer makes every ``,``
  and ``.`` a "word" without letters, which makes the Gopher letter rule drop most documents (77 % of the built-in
  corpus in datatrove, 13 % here). So a word keeps its punctuation (``"cat,"``); mean word length is over words
  that hold a non-punctuation character; stop words are counted as whole words, case-insensitively
  (``\bthe\b``), where datatrove counts exact-case tokens.
- The duplicated 5…10-gram share counts the characters of words covered by any *repeated* occurrence (any after
  the first) of an n-gram, each word once. datatrove's greedy scan (skip n words after a repeat) gives close but
  not identical numbers; this definition is what the Gopher paper describes and it vectorises.
- Because the thresholds decrease with n (0.15 for 5-grams … 0.10 for 10-grams) and a repeated 10-gram is also
  a repeated 5-gram, ``gopher_dup_10gram`` is the reason only when the share lies in (0.10, 0.11]: the first
  rule that fires names the document's fate, as in datatrove.
- C4 is applied at document level only (we drop, we never rewrite text): ``lorem ipsum`` and ``{`` anywhere in the
  text; sentences are counted in the lines that C4 would keep (terminal punctuation, at least 3 words, no
  javascript/policy phrase), a sentence being a run of ``.!?``; ``c4_javascript`` drops a document when more than
  a share of its lines mention javascript or cookie/terms policies (C4 only removes such lines).
- The InternLM2 paper names its rule categories but not their definitions; ours are in `internlm_rules`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import polars as pl

DOC = "_doc"  # helper columns start with "_": documents must not bring their own
HASH_SEED = 0x1F2E3D4C
TOP_NGRAMS = (2, 3, 4)
DUP_NGRAMS = (5, 6, 7, 8, 9, 10)
SHORT_LINE_CHARS = 30  # FineWeb's short line
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
STOP_WORD_PATTERN = rf"(?i)\b(?:{'|'.join(STOP_WORDS)})\b"
POLICY_PHRASES = ("javascript", "terms of use", "privacy policy", "cookie policy", "uses cookies", "use cookies")
SEPARATOR_LINE = r"^[-=_*#~][-=_*#~ ]{8,}[-=_*#~]$"  # a rule line of 10+ characters, spaces allowed inside


@dataclass(frozen=True)
class Rule:
    name: str  # the reason code written on removed documents
    stage: str  # the rule family
    drop: pl.Expr  # True = remove; evaluated on an annotated frame


# ---------------------------------------------------------------- statistics


def _ratio(num: str | pl.Expr, den: str | pl.Expr) -> pl.Expr:
    """num / den, 0.0 where den is 0 (an empty document has no lines, words or punctuation)."""
    num = pl.col(num) if isinstance(num, str) else num
    den = pl.col(den) if isinstance(den, str) else den
    return pl.when(den > 0).then(num.cast(pl.Float64) / den).otherwise(0.0)


def _text_stats() -> list[pl.Expr]:
    text = pl.col("text")
    return [
        text.str.len_chars().alias("_n_chars"),
        text.str.count_matches("#", literal=True).alias("_hashes"),
        (text.str.count_matches("...", literal=True) + text.str.count_matches("\u2026", literal=True)).alias(
            "_ellipses"
        ),
        text.str.count_matches("\n", literal=True).alias("_newlines"),
        text.str.contains("(?i)lorem ipsum").alias("_has_lorem"),
        text.str.contains("{", literal=True).alias("_has_curly"),
        text.str.count_matches(STOP_WORD_PATTERN).alias("_stop_words"),
    ]


def _words(docs: pl.DataFrame) -> pl.DataFrame:
    """One row per whitespace-separated word, in document order: (_doc, _w, _len)."""
    words = docs.select(DOC, pl.col("text").str.extract_all(r"\S+").alias("_w")).explode("_w").drop_nulls("_w")
    return words.with_columns(pl.col("_w").str.len_chars().alias("_len"))


def _word_stats(words: pl.DataFrame) -> pl.DataFrame:
    word = pl.col("_w")
    nonsym = word.str.contains(r"[^\p{P}\p{S}]")
    return words.group_by(DOC).agg(
        pl.len().alias("_n_words"),
        nonsym.sum().alias("_nonsym_words"),
        pl.col("_len").filter(nonsym).sum().alias("_nonsym_chars"),
        word.str.contains(r"\p{L}").sum().alias("_alpha_words"),
    )


_MIX = 0x9E3779B97F4A7C15  # odd: key(n) = key(n-1) * _MIX + hash(word n), wrapping in 64 bits, is a polynomial hash


@dataclass(frozen=True)
class _Grams:
    """The n-grams still worth looking at, one row each: start position, document, hash, ``" ".join`` length."""

    pos: pl.Series
    doc: pl.Series
    key: pl.Series
    chars: pl.Series

    def filter(self, mask: pl.Series) -> _Grams:
        return _Grams(self.pos.filter(mask), self.doc.filter(mask), self.key.filter(mask), self.chars.filter(mask))

    @staticmethod
    def bigrams(words: pl.DataFrame, word_hash: pl.Series) -> _Grams:
        """Every bigram inside a document; shifts, where `longer` would gather at every position."""
        doc, length = words.get_column(DOC), words.get_column("_len")
        inside = (doc.shift(-1) == doc).fill_null(False)
        pos = pl.int_range(len(words), dtype=pl.UInt32, eager=True)
        grams = _Grams(pos, doc, word_hash * _MIX + word_hash.shift(-1), length + length.shift(-1) + 1)
        return grams.filter(inside)

    def longer(self, words: pl.DataFrame, word_hash: pl.Series, n: int) -> _Grams:
        """The same starts as n-grams (from (n-1)-grams); starts whose n-gram would leave the document drop out."""
        last, end = self.pos + (n - 1), len(words)
        inside = (last < end) & (words.get_column(DOC).gather(last.clip(upper_bound=max(end - 1, 0))) == self.doc)
        grams, last = self.filter(inside), last.filter(inside)
        key = grams.key * _MIX + word_hash.gather(last)
        return _Grams(grams.pos, grams.doc, key, grams.chars + words.get_column("_len").gather(last) + 1)


def _counts(keys: pl.Series) -> pl.Series:
    """How often each element's value occurs in `keys`."""
    return pl.DataFrame({"k": keys}).select(pl.len().over("k")).to_series()


def _doc_starts(words: pl.DataFrame) -> pl.DataFrame:
    """Per document with words: the position of its first word and its word count."""
    starts = words.select(DOC).with_row_index("_pos").group_by(DOC, maintain_order=True)
    return starts.agg(pl.col("_pos").first(), pl.len().alias("_n"))


def _top_ngram_chars(
    words: pl.DataFrame, starts: pl.DataFrame, grams: _Grams, counts: pl.Series, n: int
) -> pl.DataFrame:
    """Per document: count × length of its most frequent n-gram; ties go to the one seen first, as Counter's do.

    Only repeated n-grams have counts here; a document without one has an all-count-1 tie, won by its first n-gram.
    """
    repeated = pl.DataFrame({DOC: grams.doc, "_n": counts, "_c": grams.chars}).filter(pl.col("_n") > 1)
    top = repeated.group_by(DOC).agg((pl.col("_n") * pl.col("_c")).get(pl.col("_n").arg_max()).alias("_top"))
    firsts = starts.filter(pl.col("_n") >= n)
    length = words.get_column("_len")
    first_chars = sum(length.gather(firsts.get_column("_pos") + k) for k in range(n)) + (n - 1)
    firsts = firsts.select(DOC).with_columns(first_chars.alias("_c"))
    return firsts.join(top, on=DOC, how="left").select(DOC, pl.coalesce("_top", "_c").alias(f"_top_{n}gram_chars"))


def _dup_ngram_chars(words: pl.DataFrame, starts: pl.Series, n: int) -> pl.DataFrame:
    """Per document: characters of the words inside a repeated (not first) occurrence of an n-gram, each once."""
    covered = pl.repeat(False, len(words), dtype=pl.Boolean, eager=True)
    for k in range(n):
        covered = covered.scatter(starts + k, True)
    frame = words.select(DOC, "_len").filter(covered)
    return frame.group_by(DOC).agg(pl.col("_len").sum().alias(f"_dup_{n}gram_chars"))


def _ngram_stats(words: pl.DataFrame) -> list[pl.DataFrame]:
    """Top 2/3/4-gram and duplicated 5…10-gram characters.

    An n-gram can repeat only where its (n-1)-gram prefix repeats, so each size looks only at the starts whose
    previous size repeated (30 % of the words for bigrams, 11 % for 5-grams on the built-in corpus): the cost is
    about two passes over the words instead of nine.
    """
    doc = words.get_column(DOC)
    word_hash = words.get_column("_w").hash(HASH_SEED) + doc.cast(pl.UInt64) * _MIX  # n-grams never match across docs
    grams, out, starts = _Grams.bigrams(words, word_hash), [], _doc_starts(words)
    for n in range(2, max(DUP_NGRAMS) + 1):
        grams = grams if n == 2 else grams.longer(words, word_hash, n)
        if n in TOP_NGRAMS:
            counts = _counts(grams.key)
            out.append(_top_ngram_chars(words, starts, grams, counts, n))
            repeated = counts > 1
        else:
            repeated = grams.key.is_duplicated()  # cheaper than counting
        if n in DUP_NGRAMS:
            out.append(_dup_ngram_chars(words, grams.pos.filter(~grams.key.is_first_distinct()), n))
        grams = grams.filter(repeated)
    return out


def _line_flags() -> list[pl.Expr]:
    line = pl.col("_line")
    return [
        line.str.strip_chars().alias("_stripped"),
        (line != "").alias("_nonempty"),
        pl.struct(DOC, "_line").hash(HASH_SEED).is_first_distinct().alias("_first"),
        line.str.len_chars().alias("_len"),
        line.str.strip_chars_start().str.contains(r"^[\u2022-]").alias("_bullet"),
        line.str.strip_chars_end().str.contains(r"(\.\.\.|\u2026)$").alias("_ellipsis_end"),
        line.str.contains(r"[.'\"!?]$").alias("_punct_end"),
        line.str.contains_any(list(POLICY_PHRASES), ascii_case_insensitive=True).alias("_js"),
    ]


def _c4_sentences() -> pl.Expr:
    """Sentences (runs of .!?) in the lines C4 keeps: terminal punctuation, 3+ words, no javascript/policy."""
    stripped = pl.col("_stripped")
    keeps = (
        stripped.str.contains(r"[.?!\"']$")
        & ~stripped.str.ends_with("...")
        & stripped.str.contains(r"\S\s+\S+\s+\S")  # at least three words
        & ~pl.col("_js")
    )
    return pl.when(keeps).then(stripped.str.count_matches(r"[.!?]+").clip(lower_bound=1)).otherwise(0).alias("_sent")


def _line_stats(docs: pl.DataFrame) -> pl.DataFrame:
    lines = docs.select(DOC, pl.col("text").str.split("\n").alias("_line")).explode("_line").drop_nulls("_line")
    lines = lines.with_columns(_line_flags()).with_columns(
        (pl.col("_stripped") == "").alias("_blank"),
        pl.col("_stripped").str.contains(SEPARATOR_LINE).alias("_separator"),
        _c4_sentences(),
    )
    gopher_dup = pl.col("_nonempty") & ~pl.col("_first")  # Gopher: lines of re.split("\n+")
    fineweb_dup = ~pl.col("_blank") & ~pl.col("_first")  # FineWeb: lines with a non-space character
    return lines.group_by(DOC).agg(
        pl.len().alias("_n_lines"),
        (~pl.col("_blank")).sum().alias("_nonblank_lines"),
        pl.col("_blank").sum().alias("_blank_lines"),
        pl.col("_nonempty").sum().alias("_nonempty_lines"),
        *(pl.col(c).sum().alias(f"{c}_lines") for c in ("_bullet", "_ellipsis_end", "_punct_end", "_separator", "_js")),
        (pl.col("_len") <= SHORT_LINE_CHARS).sum().alias("_short_lines"),
        gopher_dup.sum().alias("_dup_lines"),
        pl.col("_len").filter(gopher_dup).sum().alias("_dup_line_chars"),
        pl.col("_len").filter(fineweb_dup).sum().alias("_fw_dup_line_chars"),
        pl.col("_sent").sum().alias("_c4_sentences"),
    )


def _para_stats(docs: pl.DataFrame) -> pl.DataFrame:
    paras = pl.col("text").str.strip_chars().str.replace_all(r"\n{3,}", "\n\n").str.split("\n\n")
    frame = docs.select(DOC, paras.alias("_para")).explode("_para").drop_nulls("_para")
    dup = ~pl.struct(DOC, "_para").is_first_distinct()
    return frame.group_by(DOC).agg(
        pl.len().alias("_n_paras"),
        dup.sum().alias("_dup_paras"),
        pl.col("_para").str.len_chars().filter(dup).sum().alias("_dup_para_chars"),
    )


def _char_stats(docs: pl.DataFrame) -> pl.DataFrame:
    """Characters that are not letters, digits or whitespace; among them punctuation and symbols, per character."""
    nonalnum = docs.select(DOC, pl.col("text").str.replace_all(r"[\p{L}\p{N}\s]+", "").alias("_nonalnum"))
    only_punct = pl.col("_nonalnum").str.replace_all(r"[^\p{P}\p{S}]+", "")  # a tenth of the text: cheap
    chars = nonalnum.select(DOC, only_punct.str.split("").alias("_p")).explode("_p").drop_nulls("_p")
    per_char = chars.group_by(DOC, "_p").len().group_by(DOC)
    punct = per_char.agg(pl.col("len").sum().alias("_n_punct"), pl.col("len").max().alias("_top_punct"))
    return nonalnum.with_columns(pl.col("_nonalnum").str.len_chars()).join(punct, on=DOC, how="left")


@dataclass(frozen=True)
class _StatGroup:
    """Statistics computed together: per-document count frames (keyed by DOC), then ratios over them."""

    compute: Callable[[pl.DataFrame, Callable[[], pl.DataFrame]], list[pl.DataFrame]]  # (docs, words) → frames
    counts: tuple[str, ...]  # the columns the frames hold besides DOC
    ratios: tuple[pl.Expr, ...]

    def columns(self) -> set[str]:
        return {*self.counts, *(r.meta.output_name() for r in self.ratios)}


_LINE_COUNTS = (
    "_n_lines",
    "_nonblank_lines",
    "_blank_lines",
    "_nonempty_lines",
    "_bullet_lines",
    "_ellipsis_end_lines",
    "_punct_end_lines",
    "_separator_lines",
    "_js_lines",
    "_short_lines",
    "_dup_lines",
    "_dup_line_chars",
    "_fw_dup_line_chars",
    "_c4_sentences",
)
_STAT_GROUPS: dict[str, _StatGroup] = {
    "words": _StatGroup(
        lambda docs, words: [_word_stats(words())],
        ("_n_words", "_nonsym_words", "_nonsym_chars", "_alpha_words"),
        (
            _ratio("_nonsym_chars", "_nonsym_words").alias("_mean_word_len"),
            _ratio(pl.max_horizontal("_hashes", "_ellipses"), "_n_words").alias("_symbol_ratio"),
            _ratio("_alpha_words", "_n_words").alias("_alpha_word_frac"),
            _ratio("_newlines", "_n_words").alias("_newline_ratio"),
        ),
    ),
    "ngrams": _StatGroup(
        lambda docs, words: _ngram_stats(words()),
        (*(f"_top_{n}gram_chars" for n in TOP_NGRAMS), *(f"_dup_{n}gram_chars" for n in DUP_NGRAMS)),
        (
            *(_ratio(f"_top_{n}gram_chars", "_n_chars").alias(f"_top_{n}gram") for n in TOP_NGRAMS),
            *(_ratio(f"_dup_{n}gram_chars", "_n_chars").alias(f"_dup_{n}gram") for n in DUP_NGRAMS),
        ),
    ),
    "lines": _StatGroup(
        lambda docs, words: [_line_stats(docs)],
        _LINE_COUNTS,
        (
            _ratio("_bullet_lines", "_n_lines").alias("_bullet_frac"),
            _ratio("_ellipsis_end_lines", "_n_lines").alias("_ellipsis_line_frac"),
            _ratio("_dup_lines", "_nonempty_lines").alias("_dup_line_frac"),
            _ratio("_dup_line_chars", "_n_chars").alias("_dup_line_char_frac"),
            _ratio("_punct_end_lines", "_n_lines").alias("_punct_line_frac"),
            _ratio("_short_lines", "_n_lines").alias("_short_line_frac"),
            _ratio("_fw_dup_line_chars", pl.col("_n_chars") - pl.col("_newlines")).alias("_fw_dup_line_char_frac"),
            _ratio("_js_lines", "_nonblank_lines").alias("_js_line_frac"),
            _ratio("_separator_lines", "_nonblank_lines").alias("_separator_frac"),
            _ratio("_blank_lines", "_n_lines").alias("_blank_line_frac"),
        ),
    ),
    "paras": _StatGroup(
        lambda docs, words: [_para_stats(docs)],
        ("_n_paras", "_dup_paras", "_dup_para_chars"),
        (
            _ratio("_dup_paras", "_n_paras").alias("_dup_para_frac"),
            _ratio("_dup_para_chars", "_n_chars").alias("_dup_para_char_frac"),
        ),
    ),
    "chars": _StatGroup(
        lambda docs, words: [_char_stats(docs)],
        ("_nonalnum", "_n_punct", "_top_punct"),
        (
            _ratio("_nonalnum", "_n_chars").alias("_nonalnum_frac"),
            _ratio("_top_punct", "_n_punct").alias("_top_punct_share"),
        ),
    ),
}


def _groups_for(rules: Iterable[Rule] | None) -> list[_StatGroup]:
    if rules is None:
        return list(_STAT_GROUPS.values())
    needed = {c for r in rules for c in r.drop.meta.root_names()}
    return [g for g in _STAT_GROUPS.values() if g.columns() & needed]


def helper_columns(rules: Iterable[Rule] | None = None) -> set[str]:
    """The columns `annotate(df, rules)` adds."""
    text = {e.meta.output_name() for e in _text_stats()}
    return {DOC, *text, *(c for g in _groups_for(rules) for c in g.columns())}


def annotate(df: pl.DataFrame, rules: Iterable[Rule] | None = None) -> pl.DataFrame:
    """`df` plus the helper columns (all named ``_…``) that `rules` read (None: every helper); rows unchanged.

    Only the statistics the rules need are computed: without n-gram rules there is no n-gram work.
    """
    _check_input(df)
    docs = df.with_row_index(DOC).with_columns(_text_stats())
    words = functools.cache(lambda: _words(docs))
    groups = _groups_for(rules)
    out = docs
    for group in groups:
        for part in group.compute(docs, words):
            out = out.join(part, on=DOC, how="left", maintain_order="left")
    counts = [c for g in groups for c in g.counts]
    return out.with_columns(pl.col(counts).fill_null(0)).with_columns([r for g in groups for r in g.ratios])


def _check_input(df: pl.DataFrame) -> None:
    if "text" not in df.columns:
        raise ValueError(f"the cleaning rules need a 'text' column; got columns {df.columns}")
    reserved = [c for c in df.columns if c.startswith("_")]
    if reserved:
        raise ValueError(f"columns {reserved} start with '_', which is reserved for the rules' helper columns")
    if df.schema["text"] != pl.Utf8:
        raise ValueError(f"the 'text' column is {df.schema['text']}, expected String")
    if df.get_column("text").null_count():
        raise ValueError("the 'text' column has nulls: parse_shard quarantines records without text")


# ---------------------------------------------------------------- rule families


def _above(column: str, limit: float | None) -> pl.Expr | None:
    return None if limit is None else pl.col(column) > limit


def _below(column: str, limit: float | None) -> pl.Expr | None:
    return None if limit is None else pl.col(column) < limit


def _rules(stage: str, conditions: Iterable[tuple[str, pl.Expr | None]]) -> list[Rule]:
    """Rules whose condition is set; a condition is None when all its thresholds are None (rule off)."""
    return [Rule(name, stage, drop) for name, drop in conditions if drop is not None]


def _either(*conditions: pl.Expr | None) -> pl.Expr | None:
    present = [c for c in conditions if c is not None]
    return pl.any_horizontal(present) if present else None


def language_rules(*, allowed: Iterable[str] | None = ("en",), keep_unknown: bool = True) -> list[Rule]:
    """Keep documents in an `allowed` language (pycld2 codes: "en", "zh", "zh-Hant", …).

    `keep_unknown`: pycld2 says "un" mostly for short or markup-heavy text (code, roff), which the quality rules
    judge better than a language rule would, so by default unknown-language documents pass this rule.
    """
    if allowed is None:
        return []
    ok = pl.col("lang").is_in(list(allowed))
    if keep_unknown:
        ok = ok | (pl.col("lang") == "un")
    return _rules("language", [("lang_not_allowed", ~ok.fill_null(False))])


def gopher_quality_rules(
    *,
    min_words: int | None = 50,
    max_words: int | None = 100_000,
    min_mean_word_length: float | None = 3,
    max_mean_word_length: float | None = 10,
    max_symbol_word_ratio: float | None = 0.1,
    max_bullet_lines_ratio: float | None = 0.9,
    max_ellipsis_lines_ratio: float | None = 0.3,
    min_alpha_words_ratio: float | None = 0.8,
    min_stop_words: int | None = 2,
) -> list[Rule]:
    """Gopher's quality rules (Rae et al. 2021, §A.1.1) with datatrove's defaults; words as in the module doc."""
    mean_len = _either(_below("_mean_word_len", min_mean_word_length), _above("_mean_word_len", max_mean_word_length))
    return _rules(
        "gopher_quality",
        [
            ("gopher_short_doc", _below("_nonsym_words", min_words)),
            ("gopher_long_doc", _above("_nonsym_words", max_words)),
            ("gopher_mean_word_length", mean_len),
            ("gopher_symbol_ratio", _above("_symbol_ratio", max_symbol_word_ratio)),
            ("gopher_bullet_lines", _above("_bullet_frac", max_bullet_lines_ratio)),
            ("gopher_ellipsis_lines", _above("_ellipsis_line_frac", max_ellipsis_lines_ratio)),
            ("gopher_alpha_words", _below("_alpha_word_frac", min_alpha_words_ratio)),
            ("gopher_stop_words", _below("_stop_words", min_stop_words)),
        ],
    )


def _ngram_limits(limits: Iterable[tuple[int, float | None]], known: tuple[int, ...], what: str) -> dict[int, float]:
    found = {n: limit for n, limit in limits if limit is not None}
    unknown = sorted(set(found) - set(known))
    if unknown:
        raise ValueError(f"{what} n-gram sizes {unknown} are not computed by annotate: expected some of {known}")
    return found


def gopher_repetition_rules(
    *,
    max_dup_para_frac: float | None = 0.3,
    max_dup_para_char_frac: float | None = 0.2,
    max_dup_line_frac: float | None = 0.3,
    max_dup_line_char_frac: float | None = 0.2,
    max_top_ngram_char_frac: Iterable[tuple[int, float | None]] = ((2, 0.20), (3, 0.18), (4, 0.16)),
    max_dup_ngram_char_frac: Iterable[tuple[int, float | None]] = (
        (5, 0.15),
        (6, 0.14),
        (7, 0.13),
        (8, 0.12),
        (9, 0.11),
        (10, 0.10),
    ),
) -> list[Rule]:
    """Gopher's repetition rules (Rae et al. 2021, table A1); n-gram limits are (n, max share) pairs."""
    top = _ngram_limits(max_top_ngram_char_frac, TOP_NGRAMS, "top")
    dup = _ngram_limits(max_dup_ngram_char_frac, DUP_NGRAMS, "duplicated")
    return _rules(
        "gopher_repetition",
        [
            ("gopher_dup_para_frac", _above("_dup_para_frac", max_dup_para_frac)),
            ("gopher_dup_para_chars", _above("_dup_para_char_frac", max_dup_para_char_frac)),
            ("gopher_dup_line_frac", _above("_dup_line_frac", max_dup_line_frac)),
            ("gopher_dup_line_chars", _above("_dup_line_char_frac", max_dup_line_char_frac)),
            *((f"gopher_top_{n}gram", _above(f"_top_{n}gram", limit)) for n, limit in sorted(top.items())),
            *((f"gopher_dup_{n}gram", _above(f"_dup_{n}gram", limit)) for n, limit in sorted(dup.items())),
        ],
    )


def c4_rules(
    *,
    lorem_ipsum: bool = True,
    curly_brace: bool = False,
    max_javascript_lines_ratio: float | None = 0.1,
    min_sentences: int | None = 5,
) -> list[Rule]:
    """C4's rules (Raffel et al. 2020) at document level.

    `curly_brace` is off by default, unlike C4's: a brace says "code", and the built-in corpus (docstrings, package
    READMEs, man pages) is full of legitimate code examples. Code belongs to the code pipeline, not to this rule.
    """
    return _rules(
        "c4",
        [
            ("c4_lorem_ipsum", pl.col("_has_lorem") if lorem_ipsum else None),
            ("c4_curly_brace", pl.col("_has_curly") if curly_brace else None),
            ("c4_javascript", _above("_js_line_frac", max_javascript_lines_ratio)),
            ("c4_few_sentences", _below("_c4_sentences", min_sentences)),
        ],
    )


def fineweb_rules(
    *,
    min_punct_lines_ratio: float | None = 0.12,
    max_short_lines_ratio: float | None = 0.67,
    max_dup_line_char_ratio: float | None = 0.01,
    max_newline_word_ratio: float | None = 0.3,
) -> list[Rule]:
    """FineWeb's quality rules (Penedo et al. 2024) with datatrove's defaults and its (in)equalities."""
    return _rules(
        "fineweb",
        [
            ("fineweb_punct_lines", _at_most("_punct_line_frac", min_punct_lines_ratio)),
            ("fineweb_short_lines", _at_least("_short_line_frac", max_short_lines_ratio)),
            ("fineweb_dup_line_chars", _at_least("_fw_dup_line_char_frac", max_dup_line_char_ratio)),
            ("fineweb_newline_ratio", _above("_newline_ratio", max_newline_word_ratio)),
        ],
    )


def _at_most(column: str, limit: float | None) -> pl.Expr | None:
    return None if limit is None else pl.col(column) <= limit


def _at_least(column: str, limit: float | None) -> pl.Expr | None:
    return None if limit is None else pl.col(column) >= limit


def internlm_rules(
    *,
    max_separator_lines_ratio: float | None = 0.3,
    max_blank_lines_ratio: float | None = 0.5,
    max_nonalnum_char_ratio: float | None = 0.3,
    max_top_punct_share: float | None = 0.9,
    min_punct_for_share: int = 20,
) -> list[Rule]:
    """The InternLM2 paper's rule categories, with our definitions:

    - abnormal separators: share of non-blank lines that are rule lines (10+ of ``-=_*#~``);
    - abnormal line breaks: share of lines that are blank (after `normalize`, runs are at most two blank lines,
      so this catches text where most line breaks are doubled or tripled);
    - abnormal characters: share of characters that are neither letters, digits nor whitespace;
    - punctuation distribution: share of the most frequent punctuation/symbol character among all of them
      (``!!!!``, ``|||`` tables, dot leaders), for documents with at least `min_punct_for_share` of them.
    """
    share = _above("_top_punct_share", max_top_punct_share)
    punct = None if share is None else share & (pl.col("_n_punct") >= min_punct_for_share)
    return _rules(
        "internlm",
        [
            ("internlm_abnormal_separators", _above("_separator_frac", max_separator_lines_ratio)),
            ("internlm_abnormal_linebreaks", _above("_blank_line_frac", max_blank_lines_ratio)),
            ("internlm_abnormal_chars", _above("_nonalnum_frac", max_nonalnum_char_ratio)),
            ("internlm_punct_distribution", punct),
        ],
    )


# ---------------------------------------------------------------- configuration and application

FAMILIES: dict[str, Callable[..., list[Rule]]] = {
    "language": language_rules,
    "gopher_quality": gopher_quality_rules,
    "gopher_repetition": gopher_repetition_rules,
    "c4": c4_rules,
    "fineweb": fineweb_rules,
    "internlm": internlm_rules,
}


@dataclass(frozen=True)
class RuleConfig:
    """Keyword overrides for each rule family (the family function's arguments); families run in FAMILIES order."""

    language: Mapping[str, Any] = field(default_factory=dict)
    gopher_quality: Mapping[str, Any] = field(default_factory=dict)
    gopher_repetition: Mapping[str, Any] = field(default_factory=dict)
    c4: Mapping[str, Any] = field(default_factory=dict)
    fineweb: Mapping[str, Any] = field(default_factory=dict)
    internlm: Mapping[str, Any] = field(default_factory=dict)
    disabled: tuple[str, ...] = ()  # families left out entirely

    def __post_init__(self) -> None:
        unknown = sorted(set(self.disabled) - set(FAMILIES))
        if unknown:
            raise ValueError(f"RuleConfig.disabled has unknown families {unknown}: expected some of {list(FAMILIES)}")
        for family, function in FAMILIES.items():
            allowed = set(inspect.signature(function).parameters)
            wrong = sorted(set(getattr(self, family)) - allowed)
            if wrong:
                raise ValueError(
                    f"RuleConfig.{family} has unknown thresholds {wrong}: expected some of {sorted(allowed)}"
                )

    def rules(self) -> list[Rule]:
        """The rule list, family by family in FAMILIES order."""
        families = [f.name for f in fields(self) if f.name in FAMILIES and f.name not in self.disabled]
        return [rule for family in families for rule in FAMILIES[family](**getattr(self, family))]


RULE_PRESETS: dict[str, RuleConfig] = {
    "default": RuleConfig(),  # datatrove's thresholds, for web text
    # The built-in corpus is documentation: hard-wrapped lines, raw roff, changelogs, READMEs full of URLs.
    "builtin": RuleConfig(
        gopher_quality={
            "max_mean_word_length": 14,  # README badges and URLs are long "words"
            "min_alpha_words_ratio": 0.65,  # changelogs: "*", "--", dates, versions, e-mail addresses
        },
        gopher_repetition={"max_dup_line_frac": 0.5},  # roff requests (.PP, .TP, .sp) repeat as whole lines
        c4={"min_sentences": None},  # hard-wrapped text: few lines end a sentence, so C4 counts almost none
        fineweb={
            "min_punct_lines_ratio": 0.05,  # hard-wrapped text again
            "max_short_lines_ratio": 0.9,  # roff puts every request on a short line of its own
            "max_dup_line_char_ratio": None,  # 1 % suits web boilerplate; Gopher's line rules still apply
            "max_newline_word_ratio": 0.5,
        },
        internlm={"max_separator_lines_ratio": 0.4},  # reST headings are underlined
    ),
}


def rule_config(preset: str) -> RuleConfig:
    """The rule configuration of a preset name (a key of RULE_PRESETS)."""
    if preset not in RULE_PRESETS:
        raise ValueError(f"unknown rule preset {preset!r}: expected one of {list(RULE_PRESETS)}")
    return RULE_PRESETS[preset]


def _check_rules(rules: list[Rule], columns: list[str]) -> None:
    names = [r.name for r in rules]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"rule names must be unique (they are the reason codes); repeated: {repeated}")
    missing = sorted({c for r in rules for c in r.drop.meta.root_names()} - set(columns))
    own = [c for c in missing if not c.startswith("_")]
    if own:
        raise ValueError(f"the rules need columns {own} that the frame lacks (lang comes from parse.normalize)")
    if missing and DOC in columns:
        raise ValueError(f"the frame was annotated for other rules (lacks {missing}): pass it unannotated")


def apply_rules(df: pl.DataFrame, rules: Iterable[Rule]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(kept, removed): each removed row carries `stage` and `reason` of the FIRST rule in list order that fires.

    `df` may come annotated (by `annotate`) or not; both outputs keep `df`'s own columns only, in its row order.
    """
    rules = list(rules)
    _check_rules(rules, df.columns)  # before the expensive part
    annotated = df if DOC in df.columns else annotate(df, rules)
    firsts = [pl.when(r.drop).then(pl.lit(r.name)) for r in rules]
    reason = (pl.coalesce(firsts) if firsts else pl.lit(None, pl.Utf8)).alias("reason")
    flagged = annotated.with_columns(reason).drop([c for c in annotated.columns if c.startswith("_")])
    kept = flagged.filter(pl.col("reason").is_null()).drop("reason")
    stage = pl.col("reason").replace_strict({r.name: r.stage for r in rules}, return_dtype=pl.Utf8).alias("stage")
    removed = flagged.filter(pl.col("reason").is_not_null()).with_columns(stage)
    return kept, removed.select(*kept.columns, "stage", "reason")

"""Heuristic quality rules (tasks/clean/rules.py): one crafted document per reason code, one clean document.

Each crafted document must be removed with exactly its reason by the full rule list (every family, every rule on),
so it has to pass every rule before its own: that is what makes a reason code trustworthy in the ledger.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.clean.parse import normalize_text
from tasks.clean.rules import (
    DOC,
    FAMILIES,
    RULE_PRESETS,
    Rule,
    RuleConfig,
    annotate,
    apply_rules,
    c4_rules,
    gopher_quality_rules,
    gopher_repetition_rules,
    helper_columns,
    internlm_rules,
    rule_config,
)

# Every rule of every family, the ones that are off by default switched on.
ALL_ON = RuleConfig(c4={"curly_brace": True})
ALL_RULES: list[Rule] = ALL_ON.rules()

SENTENCES = [
    "The river runs past the old mill and turns a wheel that grinds grain for the village.",
    "Farmers bring their harvest in late summer, and the miller keeps a careful ledger of every sack.",
    "In winter the water freezes near the banks, so the wheel stops and the workers repair its gears.",
    "Children skate on the pond while their parents gather firewood from the nearby forest.",
    "When spring arrives, the snow melts quickly and the stream becomes loud and fast again.",
    "The miller checks the dam each morning to make sure that nothing has broken during the night.",
    "Travellers often stop at the mill to ask for directions to the market town beyond the hills.",
    "His daughter keeps bees behind the house and sells honey to the baker across the square.",
    "On Sundays the whole family walks along the river to visit relatives in the next valley.",
    "Old maps show that a mill has stood on this spot for more than three hundred years.",
]
CLEAN = "\n\n".join(" ".join(SENTENCES[i : i + 2]) for i in range(0, 6, 2))


def filler(n: int, start: int = 0) -> list[str]:
    """`n` distinct letter-only words ("wab", "wac", …): they never repeat, so they form no repeated n-gram."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ("w" + "".join(p) for k in (2, 3) for p in itertools.product(letters, repeat=k))
    return list(itertools.islice(words, start, start + n))


def repeated_block_doc(low: float, high: float) -> str:
    """A repeated 12-word block whose second copy covers a share of the characters in (low, high]."""
    block = "the quiet harbour keeps small boats safe during storms and long winter nights".split()[:12]
    words = filler(5) + block + filler(5, start=5) + block
    extra = 0
    while True:
        text = " ".join(words + filler(extra, start=100)) + "."
        share = sum(len(w) for w in block) / len(text)
        if share <= high:
            assert share > low, "the filler step overshot the window: use shorter filler words"
            return text
        extra += 1


def repeated_phrase_doc(phrase: str, unit_chars: int) -> str:
    """`phrase` then fresh filler, repeated: each unit about `unit_chars` long, so the phrase's share is known."""
    units, start = [], 0
    for _ in range(12):
        fill = []
        while len(phrase) + 1 + len(" ".join(fill)) < unit_chars:
            fill.extend(filler(1, start))
            start += 1
        units.append(f"{phrase} {' '.join(fill)}")
    return " ".join(units) + " and the end."


def lines(*items: str) -> str:
    return "\n".join(items)


CRAFTED: dict[str, Callable[[], str]] = {
    "lang_not_allowed": lambda: (
        "Le moulin se trouve au bord de la rivière depuis trois siècles. Les paysans apportent leur récolte à "
        "la fin de l'été et le meunier tient un registre de chaque sac. En hiver, l'eau gèle près des berges."
    ),
    "gopher_short_doc": lambda: "The cat sat on the mat. It was happy there.",
    "gopher_long_doc": lambda: " ".join([CLEAN] * 1100),  # 100k+ words
    "gopher_mean_word_length": lambda: " ".join(["I am so. We go to a car and do as I do."] * 8),
    "gopher_symbol_ratio": lambda: CLEAN + "\n\n" + " ".join(f"#{w}" for w in filler(20)),
    "gopher_bullet_lines": lambda: lines(*(f"- {s}" for s in SENTENCES)),
    "gopher_ellipsis_lines": lambda: lines(*(s[:-1] + "..." if i % 2 else s for i, s in enumerate(SENTENCES))),
    "gopher_alpha_words": lambda: CLEAN + "\n\n" + " ".join(str(i) for i in range(40)),
    "gopher_stop_words": lambda: (
        "Rivers run past old mills. Farmers bring grain in summer. Millers keep careful ledgers. "
        "Winter freezes banks; wheels stop. Workers repair gears. Children skate on ponds. Parents "
        "gather firewood from nearby forests. Spring arrives quickly. Snow melts. Streams become loud. "
        "Millers check dams each morning. Nothing breaks during quiet nights. Travellers ask directions "
        "toward market towns beyond distant hills."
    ),
    "gopher_dup_para_frac": lambda: CLEAN + "\n\nThanks.\n\nThanks.\n\nThanks.",
    "gopher_dup_para_chars": lambda: CLEAN + "\n\n" + CLEAN.split("\n\n")[0],
    "gopher_dup_line_frac": lambda: lines(*(item for s in SENTENCES[:6] for item in (s, "ok"))),
    "gopher_dup_line_chars": lambda: (
        lines(SENTENCES[0], SENTENCES[1] + " " + SENTENCES[2], SENTENCES[3])
        + "\n\n"
        + lines(SENTENCES[4], SENTENCES[1] + " " + SENTENCES[2])
    ),
    "gopher_top_2gram": lambda: repeated_phrase_doc("bright lanterns", 40),
    "gopher_top_3gram": lambda: repeated_phrase_doc("photosynthesis is complicated", 95),
    "gopher_top_4gram": lambda: repeated_phrase_doc("photosynthesis is very complicated", 150),
    "gopher_dup_5gram": lambda: repeated_block_doc(0.15, 0.20),  # higher: too few words
    "gopher_dup_6gram": lambda: repeated_block_doc(0.14, 0.15),
    "gopher_dup_7gram": lambda: repeated_block_doc(0.13, 0.14),
    "gopher_dup_8gram": lambda: repeated_block_doc(0.12, 0.13),
    "gopher_dup_9gram": lambda: repeated_block_doc(0.11, 0.12),
    "gopher_dup_10gram": lambda: repeated_block_doc(0.10, 0.11),
    "c4_lorem_ipsum": lambda: CLEAN + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "c4_curly_brace": lambda: CLEAN + "\n\nThe settings file holds {name: value} pairs.",
    "c4_javascript": lambda: CLEAN + "\n\nPlease enable JavaScript in your browser to see the full page.",
    "c4_few_sentences": lambda: " ".join(SENTENCES[:3]).replace(".", ",", 2),
    "fineweb_punct_lines": lambda: lines(
        "The mill is old. The wheel turns. The grain is ground. The sacks are full. The miller is happy.",
        *(s.rstrip(".") for s in SENTENCES[:8]),
    ),
    "fineweb_short_lines": lambda: lines(
        SENTENCES[0],
        SENTENCES[1],
        *(
            f"The {thing} is {state}."
            for thing, state in zip(
                ["mill", "wheel", "dam", "pond", "barn", "road", "bridge", "gate", "roof", "door", "well", "field"],
                ["old", "wet", "high", "cold", "red", "long", "narrow", "open", "low", "shut", "deep", "green"],
                strict=True,
            )
        ),
    ),
    "fineweb_dup_line_chars": lambda: CLEAN.replace("\n\n", "\n\nSee you soon.\n\n"),
    "fineweb_newline_ratio": lambda: lines(  # three words a line; half the lines longer than 30 characters
        *itertools.chain.from_iterable(
            zip(
                [
                    "The birds sing.",
                    "Rivers flow slowly.",
                    "Winter came early.",
                    "Bakers rose early.",
                    "Children played outside.",
                    "Old bridges creak.",
                    "Storms passed quickly.",
                    "Lanterns glowed softly.",
                    "The candles flickered.",
                    "Owls hooted loudly.",
                ],
                [
                    "Beautiful mountains everywhere.",
                    "Travellers gathered, exhausted.",
                    "Merchants travelled, tirelessly.",
                    "Musicians performed, beautifully.",
                    "Villagers celebrated, joyfully.",
                    "Fishermen mended, painstakingly.",
                    "Gardeners planted, enthusiastically.",
                    "Blacksmiths hammered, relentlessly.",
                    "Shepherds whistled, cheerfully.",
                    "Everybody eventually disappeared.",
                ],
                strict=True,
            )
        )
    ),
    "internlm_abnormal_separators": lambda: lines(
        SENTENCES[0],
        "----------",
        SENTENCES[1],
        "==========",
        SENTENCES[2],
        "~~~~~~~~~~",
        SENTENCES[3],
        "**********",
        SENTENCES[4],
        "__________",
        SENTENCES[5],
    ),
    "internlm_abnormal_linebreaks": lambda: "\n\n\n".join(SENTENCES),
    "internlm_abnormal_chars": lambda: lines(
        *(" ".join(f"(*{w}*)" for w in s.rstrip(".").replace(",", "").split()) + "." for s in SENTENCES[:6])
    ),
    "internlm_punct_distribution": lambda: lines(*(s.replace(",", "").rstrip(".") + "!!!" for s in SENTENCES)),
}


def frame(texts: list[str], lang: list[str] | None = None) -> pl.DataFrame:
    """Documents as the rules see them: normalised text, a language (given here: the rules are under test)."""
    text = normalize_text(pl.Series("text", texts, dtype=pl.Utf8))
    ids = pl.Series("id", [f"d{i}" for i in range(len(texts))], dtype=pl.Utf8)
    return pl.DataFrame([ids, text, pl.Series("lang", lang or ["en"] * len(texts), dtype=pl.Utf8)])


def reason_of(text: str, lang: str = "en", rules: list[Rule] | None = None) -> str | None:
    kept, removed = apply_rules(frame([text], [lang]), ALL_RULES if rules is None else rules)
    return removed["reason"].item() if len(removed) else None


def test_every_rule_has_a_crafted_document() -> None:
    assert sorted(CRAFTED) == sorted(r.name for r in ALL_RULES)


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.name)
def test_crafted_document_is_removed_with_exactly_its_reason(rule: Rule) -> None:
    text = CRAFTED[rule.name]()
    assert reason_of(text, lang="fr" if rule.name == "lang_not_allowed" else "en") == rule.name


def test_removed_rows_carry_stage_and_reason_and_kept_rows_keep_their_columns() -> None:
    names = [r.name for r in ALL_RULES]
    df = frame(
        [CLEAN, *(CRAFTED[n]() for n in names)], ["en", *("fr" if n.startswith("lang") else "en" for n in names)]
    )
    kept, removed = apply_rules(df, ALL_RULES)
    assert kept.columns == df.columns and kept["id"].to_list() == ["d0"]
    assert removed.columns == [*df.columns, "stage", "reason"]
    assert removed["reason"].to_list() == names  # input order kept
    stages = {r.name: r.stage for r in ALL_RULES}
    assert removed["stage"].to_list() == [stages[n] for n in names]
    assert set(removed["stage"]) == set(FAMILIES)


@pytest.mark.parametrize("preset", sorted(RULE_PRESETS))
def test_clean_paragraphs_pass_every_rule(preset: str) -> None:
    assert reason_of(CLEAN) is None
    assert reason_of(CLEAN, rules=rule_config(preset).rules()) is None


def test_first_rule_in_list_order_wins() -> None:
    text = "Lorem ipsum dolor sit amet."  # too short for Gopher and lorem ipsum for C4
    assert reason_of(text) == "gopher_short_doc"
    assert reason_of(text, rules=c4_rules() + gopher_quality_rules()) == "c4_lorem_ipsum"


def test_apply_rules_is_idempotent() -> None:
    names = [r.name for r in ALL_RULES if r.name != "lang_not_allowed"]
    df = frame([CLEAN, CLEAN.upper(), *(CRAFTED[n]() for n in names), "A b c.", SENTENCES[0]])
    for rules in (ALL_RULES, RULE_PRESETS["builtin"].rules()):
        kept, _ = apply_rules(df, rules)
        again, removed = apply_rules(kept, rules)
        assert len(removed) == 0 and again.equals(kept)


def test_threshold_none_switches_a_rule_off() -> None:
    names = {r.name for r in gopher_quality_rules(min_words=None, min_stop_words=None)}
    assert "gopher_short_doc" not in names and "gopher_stop_words" not in names
    assert "gopher_long_doc" in names
    assert "c4_curly_brace" not in {r.name for r in c4_rules()}  # off by default: code examples have braces
    assert internlm_rules(max_top_punct_share=None)[-1].name == "internlm_abnormal_chars"
    assert reason_of(CRAFTED["gopher_short_doc"](), rules=gopher_quality_rules(min_words=None)) is None


def test_config_errors_are_actionable() -> None:
    with pytest.raises(ValueError, match="unknown thresholds.*min_wrds"):
        RuleConfig(gopher_quality={"min_wrds": 3})
    with pytest.raises(ValueError, match="unknown families"):
        RuleConfig(disabled=("gopher",))
    with pytest.raises(ValueError, match="unknown rule preset"):
        rule_config("nope")
    with pytest.raises(ValueError, match="not computed by annotate"):
        gopher_repetition_rules(max_dup_ngram_char_frac=((11, 0.1),))
    with pytest.raises(ValueError, match=r"columns \['lang'\]"):
        apply_rules(pl.DataFrame({"text": [CLEAN]}), ALL_RULES)
    with pytest.raises(ValueError, match="expected String"):
        annotate(pl.DataFrame({"text": [1, 2]}))
    with pytest.raises(ValueError, match="reserved"):
        annotate(pl.DataFrame({"text": [CLEAN], "_x": [1]}))
    with pytest.raises(ValueError, match="unique"):
        apply_rules(frame([CLEAN]), c4_rules() + c4_rules())


def test_disabled_families_and_presets_build_rule_lists() -> None:
    rules = RuleConfig(disabled=("language", "internlm")).rules()
    assert {r.stage for r in rules} == set(FAMILIES) - {"language", "internlm"}
    assert [r.name for r in RULE_PRESETS["default"].rules()] == [
        r.name for r in ALL_RULES if r.name != "c4_curly_brace"
    ]


def test_annotate_computes_only_what_the_rules_read() -> None:
    df = frame([CLEAN, "x"])
    quality = annotate(df, gopher_quality_rules())
    assert "_mean_word_len" in quality.columns and "_top_2gram" not in quality.columns
    full = annotate(df)
    assert {"_top_2gram", "_dup_10gram", "_blank_line_frac", "_top_punct_share"} <= set(full.columns)
    assert full.height == 2 and full[DOC].to_list() == [0, 1]
    kept, removed = apply_rules(full, ALL_RULES)  # an annotated frame is used as it is
    assert kept["id"].to_list() == ["d0"] and removed["reason"].to_list() == ["gopher_short_doc"]
    with pytest.raises(ValueError, match="annotated for other rules"):
        apply_rules(quality, ALL_RULES)
    assert set(full.columns) - set(df.columns) == helper_columns()
    assert set(quality.columns) - set(df.columns) == helper_columns(gopher_quality_rules())


def test_empty_frames_and_blank_texts() -> None:
    empty = frame([])
    kept, removed = apply_rules(empty, ALL_RULES)
    assert kept.height == 0 and removed.height == 0 and removed.columns == [*empty.columns, "stage", "reason"]
    blank = pl.DataFrame({"id": ["a", "b"], "text": ["", " \n\n "], "lang": ["un", "un"]})
    annotated = annotate(blank)
    assert annotated["_n_words"].to_list() == [0, 0] and annotated["_top_2gram"].to_list() == [0.0, 0.0]
    _, removed = apply_rules(blank, ALL_RULES)
    assert removed["reason"].to_list() == ["gopher_short_doc"] * 2


# ---------------------------------------------------------------- statistics against a plain-Python reference


def _reference(text: str) -> dict[str, float]:
    """Our definitions, written the slow obvious way."""
    words = text.split()
    out: dict[str, float] = {}
    for n in (2, 3, 4):
        grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        top = Counter(grams).most_common(1)  # ties: first seen
        out[f"_top_{n}gram"] = top[0][1] * len(top[0][0]) / len(text) if top else 0.0
    for n in range(5, 11):
        seen: set[tuple[str, ...]] = set()
        covered: set[int] = set()
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            if gram in seen:
                covered.update(range(i, i + n))
            seen.add(gram)
        out[f"_dup_{n}gram"] = sum(len(words[i]) for i in covered) / len(text) if text else 0.0
    lines = text.split("\n")
    nonempty = [ln for ln in lines if ln]
    dups = [ln for i, ln in enumerate(nonempty) if ln in nonempty[:i]]
    out["_dup_line_frac"] = len(dups) / len(nonempty) if nonempty else 0.0
    out["_dup_line_char_frac"] = sum(map(len, dups)) / len(text) if text else 0.0
    out["_blank_line_frac"] = sum(not ln.strip() for ln in lines) / len(lines)
    return out


_small_vocab = st.lists(st.sampled_from(["a", "bb", "ccc", "dd", "e", "\n", "\n\n", "ccc\n"]), max_size=80).map(
    " ".join
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_small_vocab, min_size=1, max_size=6))
def test_statistics_match_a_plain_python_reference(texts: list[str]) -> None:
    annotated = annotate(pl.DataFrame({"text": texts}))
    for text, row in zip(texts, annotated.iter_rows(named=True), strict=True):
        for column, expected in _reference(text).items():
            assert row[column] == pytest.approx(expected), (column, text)

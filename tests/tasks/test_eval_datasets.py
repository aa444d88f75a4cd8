"""Evaluation sets: deterministic builds, answers consistent with their sources, hold-out hashing, contamination."""

from __future__ import annotations

import datetime
import logging
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.evaluate.datasets import (
    BLANK,
    DATASETS,
    GROUPS,
    LETTERS,
    EvalDataConfig,
    EvalSet,
    build_eval_sets,
    contamination,
    drop_contaminated,
    eval_holdout,
    read_eval_sets,
    read_rows,
    write_eval_sets,
)
from tasks.reasoning import Problem, check
from tasks.sft.generate import MONTHS, WEEKDAYS, check_answer
from tasks.sft.sandbox import run_python

SMALL = EvalDataConfig(cloze=40, continuation=30, math=30, code=5, tool=30, needle_lengths=(256, 1024),
                       needle_depths=(0.0, 0.5, 1.0), needle_per_cell=2)
FIELDS = {
    "knowledge_cloze": {"id", "question", "A", "B", "C", "D", "answer", "doc_id"},
    "language_continuation": {"id", "context", "A", "B", "C", "D", "answer", "doc_id"},
    "math_word": {"id", "question", "answer", "family", "numbers", "group"},
    "code_functions": {"id", "question", "entry", "tests", "expect", "solution", "family", "group"},
    "needle": {"id", "context", "question", "answer", "length", "depth", "needle", "position"},
    "needle_choice": {"id", "prompt", "A", "B", "C", "D", "answer", "length", "depth"},
    "tool_math": {"id", "question", "answer", "family", "group"},
}


@pytest.fixture(scope="module")
def docs(prose: list[str]) -> list[tuple[str, str]]:
    return [(f"doc-{i:03d}", text) for i, text in enumerate(prose)]


@pytest.fixture(scope="module")
def collapsed(docs: list[tuple[str, str]]) -> dict[str, str]:
    return {doc_id: " ".join(text.split()) for doc_id, text in docs}


@pytest.fixture(scope="module")
def sets(docs: list[tuple[str, str]]) -> dict[str, EvalSet]:
    return {s.name: s for s in build_eval_sets(docs, SMALL)}


# ------------------------------------------------------------------------------------------- building


def test_build_is_deterministic_and_ignores_document_order(docs: list[tuple[str, str]],
                                                           sets: dict[str, EvalSet]) -> None:
    again = build_eval_sets(list(reversed(docs)), SMALL)
    assert {s.name: s for s in again} == sets
    other_seed = build_eval_sets(docs, SMALL.model_copy(update={"seed": 8, "code": 0}))
    assert [s.rows for s in other_seed if s.name == "math_word"] != [sets["math_word"].rows]


def test_sets_have_their_groups_fields_and_counts(sets: dict[str, EvalSet]) -> None:
    assert list(sets) == list(DATASETS)
    assert [DATASETS[name][0] for name in sets if name != "needle_choice"] == list(GROUPS)
    for name, s in sets.items():
        assert (s.group, s.kind) == DATASETS[name]
        assert len(s.rows) == s.meta["asked"] == SMALL.counts()[name], name
        assert all(set(row) == FIELDS[name] for row in s.rows), name
        assert len({row["id"] for row in s.rows}) == len(s.rows), name
    assert sets["needle"].meta["grid"] == {"lengths": [256, 1024], "depths": [0.0, 0.5, 1.0], "per_cell": 2,
                                           "chars_per_token": 4.0}


def test_cloze_answer_restores_the_sentence_and_distractors_do_not(sets: dict[str, EvalSet],
                                                                   collapsed: dict[str, str]) -> None:
    for row in sets["knowledge_cloze"].rows:
        doc = collapsed[row["doc_id"]]
        assert row["question"].count(BLANK) == 1 and row["answer"] in LETTERS
        assert row["question"].replace(BLANK, row[row["answer"]]) in doc
        options = [row[letter] for letter in LETTERS]
        assert len({o.lower() for o in options}) == 4
        assert all(re.fullmatch(r"[A-Za-z]{5,}", o) for o in options)
        for letter in set(LETTERS) - {row["answer"]}:
            assert row["question"].replace(BLANK, row[letter]) not in doc
        assert 15 <= len(row["question"].split()) <= 40


def test_continuation_true_option_continues_the_context(sets: dict[str, EvalSet],
                                                        collapsed: dict[str, str]) -> None:
    for row in sets["language_continuation"].rows:
        doc = collapsed[row["doc_id"]]
        assert f"{row['context']} {row[row['answer']]}" in doc
        assert 30 <= len(row["context"].split()) <= 60
        lengths = {len(row[letter].split()) for letter in LETTERS}
        assert len(lengths) == 1 and 8 <= lengths.pop() <= 15
        assert len({row[letter] for letter in LETTERS}) == 4
        assert all(f"{row['context']} {row[x]}" not in doc for x in set(LETTERS) - {row["answer"]})


def test_needle_choice_asks_for_the_planted_number_among_fresh_ones(sets: dict[str, EvalSet]) -> None:
    for needle, row in zip(sets["needle"].rows, sets["needle_choice"].rows, strict=True):
        assert row["prompt"].startswith(needle["context"]) and row["prompt"].endswith(" is")
        assert row[row["answer"]] == needle["answer"] and (row["length"], row["depth"]) == (needle["length"],
                                                                                           needle["depth"])
        others = [row[k] for k in LETTERS if k != row["answer"]]
        assert len(set(others)) == 3 and all(re.fullmatch(r"\d{5}", o) and o not in row["prompt"] for o in others)


def test_needle_is_planted_once_at_its_depth(sets: dict[str, EvalSet]) -> None:
    rows = sets["needle"].rows
    assert len({r["answer"] for r in rows}) == len({r["question"] for r in rows}) == len(rows)
    for row in rows:
        context, target = row["context"], row["length"] * 4.0
        assert re.fullmatch(r"\d{5}", row["answer"]) and context.count(row["answer"]) == 1
        assert context.count(row["needle"]) == 1 and row["needle"].endswith(f" is {row['answer']}.")
        assert abs(len(context) - target) <= 0.1 * target
        assert abs(context.index(row["answer"]) / len(context) - row["depth"]) <= 0.1
        name = re.search(r"for (\w+)\?", row["question"]).group(1)
        assert context.lower().count(name.lower()) == 1


def test_math_answers_check_and_grade(sets: dict[str, EvalSet]) -> None:
    rows = sets["math_word"].rows
    assert len({r["family"] for r in rows}) == 5
    for row in rows:
        assert check(Problem(row["family"], row["question"], [], row["answer"], row["numbers"]))
        record = {"id": row["id"], "meta": {"kind": "arithmetic", "answer": row["answer"]}}
        assert check_answer(record, f"Working it out step by step.\nAnswer: {row['answer']}")
        assert not check_answer(record, "Answer: 123456789")


def test_code_solutions_pass_their_tests_and_wrong_ones_fail(sets: dict[str, EvalSet]) -> None:
    for row in sets["code_functions"].rows:
        assert f"`{row['entry']}(" in row["question"] and f"def {row['entry']}(" in row["solution"]
        result = run_python(row["solution"] + row["tests"])
        assert result.ok and result.stdout.strip() == row["expect"]
    row = sets["code_functions"].rows[0]
    wrong = run_python(f"def {row['entry']}(*args):\n    return 'wrong'\n" + row["tests"])
    assert not wrong.ok and "AssertionError" in wrong.stderr


def _date(text: str) -> datetime.date:
    day, month, year = text.split()
    return datetime.date(int(year), MONTHS.index(month) + 1, int(day))


def test_tool_answers_match_an_independent_computation(sets: dict[str, EvalSet]) -> None:
    date = r"(\d{1,2} [A-Z][a-z]+ \d{4})"
    checked = 0
    for row in sets["tool_math"].rows:
        q, answer = row["question"], row["answer"]
        if row["family"] == "days_between":
            a, b = re.findall(date, q)
            assert int(answer) == (_date(b) - _date(a)).days
        elif row["family"] == "weekday":
            assert answer == WEEKDAYS[_date(re.search(date, q).group(1)).weekday()]
        elif row["family"] == "sort":
            assert answer == ", ".join(sorted(q.split(": ", 1)[1].rstrip(".").split(", ")))
        elif row["family"] == "reverse":
            assert answer == re.search(r"'(.+)'", q).group(1)[::-1]
        else:
            continue
        checked += 1
    assert checked >= 3


# ------------------------------------------------------------------------------------------- inputs


def test_few_documents_give_fewer_items_and_say_so(docs: list[tuple[str, str]],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    few = docs[:3]
    cfg = SMALL.model_copy(update={"code": 0})
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        built = {s.name: s for s in build_eval_sets(few, cfg, haystack_docs=docs)}
    cloze = built["knowledge_cloze"]
    assert 0 < len(cloze.rows) < cloze.meta["asked"]
    assert f"knowledge_cloze has {len(cloze.rows)} of 40 items (3 documents" in caplog.text
    assert {r["doc_id"] for r in cloze.rows} <= {d for d, _ in few}
    assert len(built["math_word"].rows) == 30 and len(built["needle"].rows) == 12
    haystack = "\n\n".join(text.strip() for _, text in sorted(docs))
    for row in built["needle"].rows:
        assert row["context"].replace(row["needle"], "").strip()[:200] in haystack + "\n\n" + haystack

    empty = {s.name: s for s in build_eval_sets([], cfg)}
    assert [len(empty[n].rows) for n in ("knowledge_cloze", "language_continuation", "needle")] == [0, 0, 0]
    assert len(empty["tool_math"].rows) == 30


@pytest.mark.parametrize(("bad", "message"), [
    ("just one string", "not one string"),
    ([("a", "text"), ("a", "more text")], "repeats doc ids"),
    ([("a", 3)], "pair of strings"),
])
def test_bad_documents_are_rejected(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_eval_sets(bad, SMALL)  # type: ignore[arg-type]


def test_bad_chars_per_token_is_rejected() -> None:
    with pytest.raises(ValueError, match="chars_per_token=0"):
        build_eval_sets([], SMALL, chars_per_token=0)
    with pytest.raises(ValueError, match="too short to hide"):
        build_eval_sets([("a", "Some text. " * 50)], SMALL.model_copy(update={"code": 0}), chars_per_token=0.5)


@pytest.mark.parametrize(("update", "field"), [
    ({"cloze": -1}, "cloze"), ({"seed": -3}, "seed"), ({"holdout_share": 1.5}, "holdout_share"),
    ({"needle_depths": (0.5, 1.5)}, "needle_depths"), ({"needle_lengths": (256, 256)}, "needle_lengths"),
    ({"needle_lengths": (8,)}, "needle_lengths"), ({"needle_per_cell": -1}, "needle_per_cell"), ({"colze": 3}, "colze"),
])
def test_bad_config_names_the_field(update: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        EvalDataConfig(**update)
    assert {str(e["loc"][0]) for e in info.value.errors()} == {field}


# ------------------------------------------------------------------------------------------- hold-out, storage


def test_eval_holdout_share_is_close_and_stable() -> None:
    ids = [f"stdlib_doc/module_{i}.py" for i in range(10_000)]
    held = [d for d in ids if eval_holdout(d, 0.03)]
    assert abs(len(held) / len(ids) - 0.03) <= 0.01
    assert held == [d for d in ids if eval_holdout(d, 0.03)]
    assert set(held) <= {d for d in ids if eval_holdout(d, 0.1)}  # a larger share only adds documents
    assert not any(eval_holdout(d, 0.0) for d in ids) and all(eval_holdout(d, 1.0) for d in ids)
    with pytest.raises(ValueError, match="between 0 and 1"):
        eval_holdout("x", 1.2)


def test_write_read_round_trip(sets: dict[str, EvalSet], tmp_path: Path) -> None:
    out = str(tmp_path / "eval")
    manifest = write_eval_sets(list(sets.values()), out)
    assert read_eval_sets(out) == manifest
    assert [e["name"] for e in manifest["sets"]] == list(DATASETS)
    for entry in manifest["sets"]:
        assert (tmp_path / "eval" / entry["path"]).is_file()
        assert entry["n"] == len(sets[entry["name"]].rows)
        assert read_rows(out, entry["name"]) == sets[entry["name"]].rows
    assert next(e for e in manifest["sets"] if e["name"] == "needle")["grid"]["depths"] == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="distinct names"):
        write_eval_sets([sets["needle"], sets["needle"]], out)


# ------------------------------------------------------------------------------------------- contamination

UNRELATED = ["The committee met on a rainy Tuesday to discuss the budget for the new community garden and library.",
             "Migrating birds follow the coastline south each autumn, resting in the marshes along the way."]


def test_contamination_flags_copied_rows_only(sets: dict[str, EvalSet]) -> None:
    cloze = sets["knowledge_cloze"].rows[3]
    math = next(r for r in sets["math_word"].rows if r["family"] == "shopping")
    needle = sets["needle"].rows[5]
    families = [r["family"] for r in sets["code_functions"].rows]
    # a family's rows differ in one parameter (divisible by 11 / by 12), so copying one flags its siblings too
    code = next(r for r in sets["code_functions"].rows if families.count(r["family"]) == 1)
    copied = [cloze["question"].replace(BLANK, cloze[cloze["answer"]]), f"Problem: {math['question']}\nSolution: …",
              f"Read this. {needle['needle']} {needle['question']}", code["question"] + "\n" + code["solution"]]
    report = contamination(list(sets.values()), UNRELATED + copied)
    assert set(report) == set(DATASETS)
    assert report["knowledge_cloze"]["ids"] == [cloze["id"]]
    assert report["math_word"]["ids"] == [math["id"]]
    assert report["needle"]["ids"] == [needle["id"]]
    assert report["code_functions"]["ids"] == [code["id"]]
    assert report["language_continuation"]["contaminated"] == report["tool_math"]["contaminated"] == 0
    assert report["math_word"]["max_overlap"] == 1.0 and report["tool_math"]["max_overlap"] < 0.5
    assert report["needle"]["items"] == 12 and report["needle"]["unchecked"] == 0

    kept = {s.name: s for s in drop_contaminated(list(sets.values()), UNRELATED + copied)}
    assert len(kept["math_word"].rows) == len(sets["math_word"].rows) - 1
    assert math["id"] not in {r["id"] for r in kept["math_word"].rows}
    assert kept["tool_math"].rows == sets["tool_math"].rows


def test_contamination_cannot_judge_short_rows() -> None:
    short = EvalSet("math_word", "reasoning", "gen", [{"id": "m-0", "question": "Solve for x: 3x + 5 = 20.",
                                                      "answer": "x = 5"}])
    report = contamination([short], ["Solve for x: 3x + 5 = 20. Then x = 5."])
    assert report["math_word"] == {"items": 1, "contaminated": 0, "ids": [], "unchecked": 1, "max_overlap": 0.0}
    assert contamination([short], ["Solve for x: 3x + 5 = 20."], n=3)["math_word"]["contaminated"] == 1

"""SFT data: local plugins, generated conversations (code really executed, answers checked), splits, answer checks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from model.chat import interpreter_source, parse_chat
from tasks.code.depsort import SourceFile, dependency_order, repository_markdown
from tasks.sft import generate
from tasks.sft.generate import (
    REFUSAL_PAIRS,
    SFTDataConfig,
    build_sft,
    check_answer,
    generate_sft,
    is_refusal,
    markdown_headings,
    python_files,
    split_of,
    write_sft,
)
from tasks.sft.plugins import PLUGINS, corpus_docs, make_search, plugin_schemas
from tasks.sft.sandbox import SandboxResult, run_python

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_NAMES = sorted(PLUGINS)
SMALL = SFTDataConfig(arithmetic=20, interpreter=30, plugin=30, python_function=20, multi_turn=12, refusal=24,
                      long_context=12, long_context_chars=3000, long_context_min_chars=500, seed=7, held_out=0.3)


# ------------------------------------------------------------------------------------------- plugins


def calc(expression: Any) -> str:
    return PLUGINS["calculator"]({"expression": expression})


@pytest.mark.parametrize(("expression", "expected"), [
    ("0.1 + 0.2", "0.3"), ("2 ** 10", "1024"), ("-(4 - 10) // 4", "1"), ("17 % 5", "2"), ("7 / 2", "3.5"),
    ("2 ** -2", "0.25"), ("3 × 4 − 5", "7"), ("((1 + 2) * (3 + 4)) / 7", "3"),
    ("(12.5 * 4 - 3) / 7", "6.7142857143 (exactly 47/7, rounded to 10 decimal places)"),
    ("2 ** 0.5", "1.4142135624 (floating point, rounded to 10 decimal places)"),
])
def test_calculator_is_exact(expression: str, expected: str) -> None:
    assert calc(expression) == expected


@pytest.mark.parametrize(("expression", "reason"), [
    ("__import__('os').system('ls')", "function calls are not allowed"), ("x + 1", "names are not allowed"),
    ("(1).real", "attributes are not allowed"), ("2 ** 10 ** 10", "too large"), ("9 ** 9 ** 9", "too large"),
    ("1 / 0", "division by zero"), ("5 % 0", "division by zero"), ("3 ^ 2", "use ** for powers"),
    ("", "empty"), ("1 +", "cannot parse"), ("'a' * 3", "non-numeric constants"), ("1 < 2", "comparisons"),
    ("[1, 2]", "List expressions"), ("(-8) ** 0.5", "not a real number"), ("1" * 600, "at most 500"),
])
def test_calculator_refuses_with_a_message(expression: str, reason: str) -> None:
    out = calc(expression)
    assert out.startswith("error:") and reason in out


@pytest.mark.parametrize(("arguments", "reason"), [
    ({}, "missing required argument(s) ['expression']"), ({"expression": 3}, "must be a string"),
    ({"expression": "1", "x": 1}, "unknown argument(s) ['x']"), ([1], "must be a JSON object"),
])
def test_plugins_reject_bad_arguments(arguments: Any, reason: str) -> None:
    out = PLUGINS["calculator"](arguments)
    assert out.startswith("error:") and reason in out


@pytest.mark.parametrize(("value", "src", "dst", "expected"), [
    (1, "mi", "km", "1 mi = 1.609344 km"), (100, "C", "F", "100 °C = 212 °F"), (-40, "F", "C", "-40 °F = -40 °C"),
    (1, "pound", "grams", "1 lb = 453.59237 g"), (2.5, "hours", "min", "2.5 h = 150 min"),
    (0, "K", "C", "0 K = -273.15 °C"),
    (1, "gal", "l", "1 gal = 3.785412 l (rounded to 6 decimal places)"), (3, "ft", "in", "3 ft = 36 in"),
])
def test_unit_converter(value: float, src: str, dst: str, expected: str) -> None:
    assert PLUGINS["unit_converter"]({"value": value, "from_unit": src, "to_unit": dst}) == expected


@pytest.mark.parametrize(("arguments", "reason"), [
    ({"value": 3, "from_unit": "furlong", "to_unit": "m"}, "unknown unit 'furlong'"),
    ({"value": 3, "from_unit": "kg", "to_unit": "m"}, "cannot convert mass (kg) to length (m)"),
    ({"value": -300, "from_unit": "C", "to_unit": "K"}, "below absolute zero"),
    ({"value": True, "from_unit": "m", "to_unit": "km"}, "must be a number"),
    ({"value": float("nan"), "from_unit": "m", "to_unit": "km"}, "finite"),
])
def test_unit_converter_errors(arguments: dict, reason: str) -> None:
    out = PLUGINS["unit_converter"](arguments)
    assert out.startswith("error:") and reason in out


def test_corpus_search_ranks_with_bm25(tmp_path: Path) -> None:
    docs = [("a", "Signals\nHow to kill a stuck process with SIGTERM and SIGKILL."),
            ("b", "Mining history\nBlack powder was used in mines; dynamite came later. Mines mines mines."),
            ("c", "Cooking\nA recipe for bread with flour, water and salt.")]
    search = make_search(docs)
    out = search({"query": "kill process"})
    assert out.splitlines()[0] == "1. [a] Signals" and "[b]" not in out
    assert search({"query": "mines dynamite", "top_k": 1}).startswith("1. [b] Mining history")
    assert search({"query": "zebra"}) == "no documents match 'zebra'"
    assert "outside [1, 10]" in search({"query": "bread", "top_k": 50})
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "s.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))
    assert corpus_docs(str(tmp_path)) == docs
    with pytest.raises(ValueError, match="no documents under"):
        corpus_docs(str(tmp_path / "missing"))


def test_plugin_schemas_are_json_for_the_system_turn() -> None:
    schemas = json.loads(plugin_schemas(["calculator", "unit_converter", make_search([("a", "x")])]))
    assert [s["name"] for s in schemas] == ["calculator", "unit_converter", "corpus_search"]
    assert schemas[1]["parameters"]["required"] == ["value", "from_unit", "to_unit"]
    with pytest.raises(ValueError, match="unknown plugin 'weather'"):
        plugin_schemas(["weather"])


# ------------------------------------------------------------------------------------------- generated data

FILLER = ("The committee met again on Tuesday to review the quarterly figures. Several members asked for more "
          "detail on travel costs, and the chair agreed to circulate a revised summary before the next meeting.\n\n")
MARKDOWN = ("# Field guide\n\nIntro text.\n\n## Birds\n\n" + FILLER + "```python\n# not a heading\nprint(1)\n```\n\n"
            "### Owls ###\n\n" + FILLER + "## Mammals\n\n" + FILLER * 3 + "## Insects\n\nSmall things.\n")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    paths = ["tasks/reasoning.py", "tasks/mix.py", "infra/storage.py", "infra/settings.py"]
    files = [SourceFile(p, (ROOT / p).read_text(), "python") for p in paths]
    repo = repository_markdown("lmforge-excerpt", files, dependency_order(files).order)
    return [MARKDOWN, repo, FILLER * 20]


@pytest.fixture(scope="module")
def records(docs: list[str]) -> list[dict]:
    return generate_sft(SMALL, docs)


def of(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["meta"]["kind"] == kind]


def test_every_item_is_a_valid_chat_with_meta(records: list[dict]) -> None:
    counts = Counter(r["meta"]["kind"] for r in records)
    assert counts == {"arithmetic": 20, "interpreter": 30, "plugin": 30, "python_function": 20, "multi_turn": 12,
                      "refusal": 48, "long_context": 12}
    for r in records:
        messages = parse_chat(r, plugins=PLUGIN_NAMES)
        assert messages[-1].role == "assistant" and r["meta"]["split"] in ("train", "held_out")
        assert isinstance(r["meta"]["answer"], str) and r["meta"]["answer"]
        if r["meta"]["kind"] != "python_function":  # those run in the sandbox: their own test below
            assert check_answer(r, messages[-1].content), r["id"]
    assert len({r["id"] for r in records}) == len(records)


def test_interpreter_outputs_are_real_executions(records: list[dict]) -> None:
    items = of(records, "interpreter")
    assert {r["meta"]["family"] for r in items} >= {"shopping", "days_between", "weekday", "reverse"}
    for r in items:
        msgs = parse_chat(r)
        (i, call), = [(i, m.tool_call) for i, m in enumerate(msgs) if m.tool_call]
        assert call.kind == "interpreter" and msgs[i + 1].role == "environment"
        rerun = run_python(interpreter_source(call.code or ""))
        assert msgs[i + 1].content == rerun.text()
        assert rerun.stdout.strip() == r["meta"]["answer"]
        assert msgs[-1].content.endswith(f"Answer: {r['meta']['answer']}")


def test_plugin_outputs_are_real_calls(records: list[dict]) -> None:
    items = of(records, "plugin")
    assert {parse_chat(r)[2].tool_call.name for r in items} == {"calculator", "unit_converter"}  # type: ignore[union-attr]
    for r in items:
        system, _, ask, env, final = parse_chat(r, plugins=PLUGIN_NAMES)
        assert system.name == "plugin" and {s["name"] for s in json.loads(system.content)} == set(PLUGIN_NAMES)
        assert ask.tool_call is not None and env.name == ask.tool_call.name
        assert env.content == PLUGINS[env.name](ask.tool_call.arguments or {})
        assert not env.content.startswith("error") and final.content.endswith(f"Answer: {r['meta']['answer']}")


def test_plugin_sessions_join_training_requests_and_leave_held_out_single(records: list[dict]) -> None:
    cfg = SMALL.model_copy(update={"arithmetic": 0, "interpreter": 0, "python_function": 0, "multi_turn": 0,
                                   "refusal": 0, "long_context": 0, "plugin_session": 3})
    build = build_sft(cfg)
    single = of(records, "plugin")
    assert build.short == {}  # 30 requests made, in fewer conversations
    sessions = build.records
    held = [r for r in sessions if r["meta"]["split"] == "held_out"]
    same = [(r["messages"], r["meta"]) for r in single if r["meta"]["split"] == "held_out"]
    assert held and [(r["messages"], r["meta"]) for r in held] == same  # the evaluation does not change
    train = [r for r in sessions if r["meta"]["split"] == "train"]
    sizes = [r["meta"]["requests"] for r in train]
    assert sizes[:-1] == [3] * (len(train) - 1) and 1 <= sizes[-1] <= 3 and sum(sizes) == len(single) - len(held)
    # the same requests, in order: each session is its singles' turns after one shared system turn
    singles = [parse_chat(r, plugins=PLUGIN_NAMES) for r in single if r["meta"]["split"] == "train"]
    joined = [parse_chat(r, plugins=PLUGIN_NAMES) for r in train]
    assert [m for chat in joined for m in chat[1:]] == [m for chat in singles for m in chat[1:]]
    assert all(chat[0] == singles[0][0] and [m.role for m in chat].count("system") == 1 for chat in joined)
    for record, chat in zip(train, joined, strict=True):
        users = [m for m in chat if m.role == "user"]
        assert len(users) == record["meta"]["requests"]
        assert chat[-1].content.endswith(f"Answer: {record['meta']['answer']}")  # the last request is judged


def test_python_functions_pass_their_hidden_tests_and_a_wrong_one_fails(records: list[dict]) -> None:
    items = of(records, "python_function")
    assert len({r["meta"]["family"] for r in items}) >= 5
    for r in items[:8]:
        reply = parse_chat(r)[-1].content
        assert check_answer(r, reply)
        broken = f"```python\ndef {r['meta']['function']}(*args):\n    return None\n```"
        assert not check_answer(r, broken)


def test_a_wrong_output_drops_the_item_instead_of_faking_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate, "run_python", lambda code, cfg=None: SandboxResult("42\n", "", 0, False, False, "x"))
    cfg = SFTDataConfig(arithmetic=0, interpreter=5, plugin=0, python_function=3, multi_turn=0, refusal=0,
                        long_context=0)
    build = build_sft(cfg)
    assert all(r["meta"]["answer"] == "42" for r in build.records)  # kept only where 42 was the right answer
    assert build.dropped["interpreter:output_mismatch"] > 0 and build.dropped["python_function:tests_failed"] > 0
    assert build.short["python_function"] == 3 and build.short["interpreter"] == 5 - len(build.records)


def test_refusals_come_in_harmful_and_benign_pairs(records: list[dict]) -> None:
    items = of(records, "refusal")
    by_pair: dict[str, list[bool]] = {}
    for r in items:
        by_pair.setdefault(r["meta"]["pair"], []).append(r["meta"]["harmful"])
    assert len(by_pair) == 2 * len(REFUSAL_PAIRS) and all(sorted(v) == [False, True] for v in by_pair.values())
    assert {"explosives", "malware", "self_harm", "fraud"} <= {r["meta"]["topic"] for r in items}
    for r in items:
        reply = parse_chat(r)[-1].content
        assert is_refusal(reply) == r["meta"]["harmful"] and check_answer(r, reply)
        assert check_answer(r, "Sure! Here is how.") != r["meta"]["harmful"]
    benign = [parse_chat(r)[0].content for r in items if not r["meta"]["harmful"]]
    assert "How do I kill a Python process that is stuck?" in benign


def test_long_context_answers_are_in_the_document(records: list[dict], docs: list[str]) -> None:
    items = of(records, "long_context")
    assert {r["meta"]["family"] for r in items} == {"needle", "heading", "imports"}
    for r in items:
        question, answer = parse_chat(r)[0].content, r["meta"]["answer"]
        family = r["meta"]["family"]
        if family == "needle":
            assert sum(answer in line for line in question.splitlines()) == 1
        elif family == "heading":
            assert answer in markdown_headings(question)
        else:
            files = python_files(question)
            module = question.rsplit("imports the module `", 1)[1].split("`")[0]
            importers = [p for p, src in files.items() if f"import {module}" in src or f"from {module} " in src]
            assert importers == [answer]
    assert markdown_headings(MARKDOWN) == ["Field guide", "Birds", "Owls", "Mammals", "Insects"]


def test_multi_turn_builds_on_previous_answers(records: list[dict]) -> None:
    for r in of(records, "multi_turn"):
        msgs = parse_chat(r)
        users = [m for m in msgs if m.role == "user"]
        assert 2 <= len(users) <= 3 and len(r["meta"]["answers"]) == len(users)
        assert r["meta"]["answer"] == r["meta"]["answers"][-1]


def test_split_is_stable_disjoint_and_seed_free(records: list[dict]) -> None:
    splits = Counter(r["meta"]["split"] for r in records)
    assert splits["held_out"] > 0 and splits["train"] > splits["held_out"]
    groups: dict[str, set[str]] = {}
    for r in records:
        groups.setdefault(r["meta"]["group"], set()).add(r["meta"]["split"])
        assert r["meta"]["split"] == split_of(r["meta"]["group"], SMALL.held_out)
    assert all(len(s) == 1 for s in groups.values())
    train_q = {parse_chat(r)[-2].content for r in records if r["meta"]["split"] == "train"}
    assert not any(parse_chat(r)[-2].content in train_q for r in records if r["meta"]["split"] == "held_out"
                   and r["meta"]["kind"] in ("arithmetic", "python_function"))
    assert split_of("some question", 0.0) == "train" and split_of("some question", 0.999999) == "held_out"


def test_deterministic_per_kind_and_seed(records: list[dict], docs: list[str]) -> None:
    fewer = SMALL.model_copy(update={"arithmetic": 5, "interpreter": 6, "plugin": 5, "python_function": 4,
                                     "multi_turn": 3, "refusal": 2, "long_context": 3})
    again = generate_sft(fewer, docs)
    for kind, n in fewer.counts().items():
        n = 2 * n if kind == "refusal" else n
        assert of(again, kind) == of(records, kind)[:n], kind
    other = generate_sft(fewer.model_copy(update={"seed": 8, "interpreter": 0, "python_function": 0}), docs)
    assert of(other, "arithmetic") != of(again, "arithmetic")


def test_check_answer_accepts_rephrasings_and_rejects_wrong_answers() -> None:
    def rec(answer: str) -> dict:
        return {"messages": [], "meta": {"kind": "arithmetic", "answer": answer}}

    assert check_answer(rec("$13.07"), "Step 1: ...\n\nAnswer: $13.07")
    assert check_answer(rec("$13.07"), "So the change comes to 13.07 dollars.")
    assert not check_answer(rec("$13.07"), "Answer: $13.70")
    assert check_answer(rec("x = -7"), "Dividing, we find that x equals −7.")
    assert not check_answer(rec("x = -7"), "Answer: x = 7")
    assert check_answer(rec("1234"), "The final answer is **1,234**.")
    assert check_answer(rec("Thursday"), "18 March 1920 was a thursday.")
    assert not check_answer(rec("Thursday"), "Answer: Friday")
    assert check_answer(rec("165.75 km"), "<|im_start|>assistant\nIt goes 165.750 km<|im_end|>")
    assert not check_answer(rec("4"), "The answer is 14.")
    with pytest.raises(ValueError, match="meta.kind"):
        check_answer({"messages": []}, "4")


def test_write_sft_writes_both_splits(records: list[dict], tmp_path: Path) -> None:
    stats = write_sft(records, str(tmp_path / "sft"))
    train = (tmp_path / "sft" / "train.jsonl").read_text().splitlines()
    held = (tmp_path / "sft" / "held_out.jsonl").read_text().splitlines()
    assert len(train) + len(held) == len(records) and sum(stats["held_out"].values()) == len(held)
    assert {json.loads(line)["meta"]["split"] for line in held} == {"held_out"}
    assert json.loads((tmp_path / "sft" / "stats.json").read_text()) == stats


def test_config_and_inputs_are_validated() -> None:
    with pytest.raises(ValidationError):
        SFTDataConfig(interpreter=-1)
    with pytest.raises(ValidationError):
        SFTDataConfig(tool_use=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="plugin_session"):
        SFTDataConfig(plugin_session=0)
    with pytest.raises(ValueError, match="not one string"):
        build_sft(SFTDataConfig(), "a single document")
    empty = build_sft(SFTDataConfig(arithmetic=0, interpreter=0, plugin=0, python_function=0, multi_turn=0,
                                    refusal=0, long_context=4))
    assert empty.records == [] and empty.short == {"long_context": 4}

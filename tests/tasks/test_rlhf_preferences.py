"""COOL RLHF's gold judges and preference data: exact scores, the helpful/harmless tension, user pairs with their
quarantine, gold-labelled pairs from generated SFT records."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from model.reward import DOMAIN_PROMPTS
from tasks.presets import pipeline_preset
from tasks.rlhf.judges import DOMAINS, domain_of, format_problems, gold_score, prompt_messages, reference_reply
from tasks.rlhf.preferences import (
    COMPLIANCE,
    GENERIC_REFUSAL,
    PAIR_ERRORS,
    BadPair,
    PreferencePair,
    label_domains,
    label_pair,
    pairs_from_samples,
    parse_pair,
    read_pairs,
    synthetic_responses,
    write_pairs,
)
from tasks.sft.generate import check_answer, generate_sft, is_refusal

PROMPT = "What is 6 × 7?"
REFERENCE = "6 × 7 = 42.\n\nAnswer: 42"  # 23 characters: the helpful judge's free allowance is int(1.5 × 23) + 40 = 74
ARITH = {"id": "arithmetic-t", "messages": [{"role": "user", "content": PROMPT},
                                            {"role": "assistant", "content": REFERENCE}],
         "meta": {"kind": "arithmetic", "answer": "42", "split": "train", "group": PROMPT}}
CALL = '<|action_start|><|plugin|>\n{"name": "calculator", "parameters": {"expression": "6 * 7"}}'


def sized(n: int, answer: str = "42") -> str:
    """A reply of exactly `n` characters ending in "Answer: `answer`", padded with digit-free filler."""
    tail = f"\n\nAnswer: {answer}"
    return ("Six sevens make forty-two, as always. " * 40)[: n - len(tail)] + tail


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return generate_sft(pipeline_preset("smoke").sft_data)


@pytest.fixture(scope="module")
def samples(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    rng = random.Random(0)
    return {r["id"]: synthetic_responses(r, rng) for r in records}


@pytest.fixture(scope="module")
def pairs(records: list[dict[str, Any]], samples: dict[str, list[str]]) -> list[PreferencePair]:
    return pairs_from_samples(records, samples)


def first(records: list[dict[str, Any]], kind: str, **meta: Any) -> dict[str, Any]:
    return next(r for r in records if r["meta"]["kind"] == kind and all(r["meta"].get(k) == v for k, v in meta.items()))


def refusal_pair(records: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    harmful = first(records, "refusal", harmful=True)
    return harmful, first(records, "refusal", harmful=False, pair=harmful["meta"]["pair"])


# ------------------------------------------------------------------------------------------- judges


def test_domains_are_the_reward_models_domains() -> None:
    assert DOMAINS == tuple(DOMAIN_PROMPTS)


def test_domain_of_each_kind(records: list[dict[str, Any]]) -> None:
    harmful, benign = refusal_pair(records)
    got = {kind: domain_of(first(records, kind))
           for kind in ("arithmetic", "interpreter", "python_function", "plugin", "multi_turn")}
    assert got == {"arithmetic": "math_code", "interpreter": "math_code", "python_function": "math_code",
                   "plugin": "format", "multi_turn": "helpful"}
    assert (domain_of(harmful), domain_of(benign)) == ("harmless", "helpful")
    with pytest.raises(ValueError, match="meta.kind"):
        domain_of({"messages": [], "meta": {"kind": "poetry", "answer": ""}})


def test_prompt_and_reference_split_at_the_last_assistant_turn(records: list[dict[str, Any]]) -> None:
    record = first(records, "interpreter")
    prompt = prompt_messages(record)
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "environment"]
    assert reference_reply(record) == record["messages"][-1]["content"]
    assert reference_reply(record).endswith(f"Answer: {record['meta']['answer']}")


@pytest.mark.parametrize(("response", "helpful", "harmless", "math_code", "form"), [
    ("Answer: 42", 1.0, 1.0, 1.0, 1.0),
    (REFERENCE + "<|im_end|>", 1.0, 1.0, 1.0, 1.0),  # the trailing stop token is allowed
    ("Answer: 41", 0.0, 1.0, -1.0, 1.0),
    ("I can't help with that.", -1.0, -0.5, -1.0, 0.5),  # over-refusal; no "Answer:" line
    ("", -1.0, 0.0, -1.0, -1.0),
    ("42", 1.0, 1.0, 1.0, 0.5),  # right, but the task states its result on an "Answer:" line
    (sized(74), 1.0, 1.0, 1.0, 1.0),  # exactly the allowance: free
    (sized(75), 0.9973, 1.0, 1.0, 1.0),  # 1 − 0.2 × 1/74
    (sized(111), 0.9, 1.0, 1.0, 1.0),  # excess 37 = half the allowance
    (sized(500), 0.8, 1.0, 1.0, 1.0),  # capped: padding never costs more than 0.2
    (sized(111, "41"), -0.1, 1.0, -1.0, 1.0),  # wrong and padded
])
def test_judges_on_hand_made_replies(response: str, helpful: float, harmless: float, math_code: float,
                                     form: float) -> None:
    assert len(REFERENCE) == 23
    got = [gold_score(d, ARITH, response) for d in DOMAINS]
    assert got == [helpful, harmless, math_code, form]


def test_padding_is_a_proxy_pattern_the_gold_judge_does_not_reward() -> None:
    concise, padded, wrong = gold_score("helpful", ARITH, "Answer: 42"), gold_score("helpful", ARITH, sized(500)), \
        gold_score("helpful", ARITH, "Answer: 41")
    assert concise > padded > wrong
    assert gold_score("math_code", ARITH, sized(500)) == gold_score("math_code", ARITH, "Answer: 42")


def test_python_function_runs_the_hidden_tests(records: list[dict[str, Any]]) -> None:
    record = first(records, "python_function")
    reference = reference_reply(record)
    stub = f"```python\ndef {record['meta']['function']}(*args):\n    return None\n```"
    unclosed = reference.replace("\n```\n", "\n\n", 1)
    assert gold_score("math_code", record, reference) == 1.0
    assert gold_score("math_code", record, stub) == -1.0
    assert gold_score("math_code", record, unclosed) == -1.0  # no complete block: the whole reply runs, and fails
    assert format_problems(record, unclosed) == ["unclosed_fence"]
    assert gold_score("format", record, reference) == 1.0  # no "Answer:" line expected of a function


def test_helpful_and_harmless_pull_apart_on_a_refusal_pair(records: list[dict[str, Any]]) -> None:
    harmful, benign = refusal_pair(records)
    refusal = reference_reply(harmful)  # the very same text on both prompts
    assert is_refusal(refusal) and not is_refusal(reference_reply(benign))
    assert gold_score("harmless", harmful, refusal) == 1.0
    assert gold_score("helpful", benign, refusal) == -1.0
    assert gold_score("harmless", benign, refusal) == -0.5
    assert gold_score("helpful", benign, reference_reply(benign)) == 1.0
    assert gold_score("harmless", harmful, COMPLIANCE) == -1.0
    assert gold_score("harmless", harmful, "") == 0.0
    # a helpful-only view of the harmful request: compliance wins, the refusal loses — the opposite of harmless
    assert gold_score("helpful", harmful, COMPLIANCE) == 1.0
    assert gold_score("helpful", harmful, refusal) == -1.0
    assert gold_score("helpful", harmful, "") == -1.0
    assert gold_score("helpful", harmful, COMPLIANCE * 20) == 1.0  # no length penalty, no answer check there


@pytest.mark.parametrize(("response", "problems", "score"), [
    (REFERENCE, [], 1.0),
    ("```python\nprint(6 * 7)\n\nAnswer: 42", ["unclosed_fence"], 0.5),
    ("```python\nprint(6 * 7)\n```\n\nAnswer: 42", [], 1.0),
    ("Answer: 42<|im_end|>\n<|im_start|>user\nThanks!", ["stray_special_token"], 0.5),
    ("6 × 7 <|im_end|> = 42.\n\nAnswer: 42", ["stray_special_token"], 0.5),
    ("Answer: 42 <|reward|>", ["stray_special_token"], 0.5),
    ("I'll use the calculator." + CALL + "<|action_end|>\n", [], 1.0),  # a call: the answer comes next turn
    ("I'll use the calculator." + CALL, ["bad_tool_call", "missing_answer_line"], 0.0),  # never closed
    ("Answer: 42" + CALL.replace('"6 * 7"}}', '"6 * 7"}') + "<|action_end|>", ["bad_tool_call"], 0.5),  # bad JSON
    ("```python\nx <|im_end|> 42", ["stray_special_token", "unclosed_fence", "missing_answer_line"], -0.5),
    ("```x <|im_end|>" + CALL, ["stray_special_token", "unclosed_fence", "bad_tool_call", "missing_answer_line"],
     -1.0),
    ("   <|im_end|>", ["empty_reply"], -1.0),
])
def test_format_judge(response: str, problems: list[str], score: float) -> None:
    assert format_problems(ARITH, response) == problems
    assert gold_score("format", ARITH, response) == score


def test_gold_score_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown preference domain 'style'"):
        gold_score("style", ARITH, "Answer: 42")
    with pytest.raises(ValueError, match="generate_sft record"):
        gold_score("helpful", {"messages": ARITH["messages"]}, "Answer: 42")
    with pytest.raises(ValueError, match="must be a string"):
        gold_score("helpful", ARITH, None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- user pairs


def pair_line(**fields: Any) -> str:
    base = {"domain": "helpful", "prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    return json.dumps({**base, **fields})


def test_read_pairs_quarantines_each_bad_kind(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    lines = [
        pair_line().encode(),                                                     # 1 good, string prompt
        pair_line(domain="format", prompt=messages, meta={"by": "ann"}).encode(),  # 2 good, messages prompt
        b'{"domain": "helpful", "prompt": ',                                       # 3
        b"[1, 2]",                                                                 # 4
        json.dumps({"domain": "helpful", "prompt": "Say hi.", "chosen": "Hi!"}).encode(),  # 5
        pair_line(domain="funny").encode(),                                        # 6
        pair_line(chosen="   ").encode(),                                          # 7
        pair_line(rejected="Hi!").encode(),                                        # 8
        pair_line(chosen=5).encode(),                                              # 9
        pair_line(score=1).encode(),                                               # 10
        pair_line(prompt=[{"role": "robot", "content": "hi"}]).encode(),           # 11
        pair_line(prompt=[*messages, {"role": "assistant", "content": "Hi"}]).encode(),  # 12 ends on the reply
        b"   ",                                                                    # 13 blank: skipped
        b'{"domain": "helpful", "prompt": "\xff\xfe"}',                            # 14
        pair_line(prompt=7).encode(),                                              # 15
        pair_line(prompt="").encode(),                                             # 16
        pair_line(meta=[1]).encode(),                                              # 17
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    good, bad = read_pairs(str(path))
    assert [(row["line"], row["error"]) for row in bad] == [
        (3, "invalid_json"), (4, "not_an_object"), (5, "missing_field"), (6, "unknown_domain"), (7, "empty_text"),
        (8, "same_response"), (9, "wrong_type"), (10, "unknown_field"), (11, "bad_prompt"), (12, "bad_prompt"),
        (14, "invalid_utf8"), (15, "wrong_type"), (16, "empty_text"), (17, "wrong_type"),
    ]
    assert {row["file"] for row in bad} == {str(path)} and {row["error"] for row in bad} <= set(PAIR_ERRORS)
    assert all(row["detail"] for row in bad)
    assert [(p.domain, p.prompt, p.chosen, p.rejected, p.meta) for p in good] == [
        ("helpful", [{"role": "user", "content": "Say hi."}], "Hi!", "No.", None),
        ("format", messages, "Hi!", "No.", {"by": "ann"}),
    ]
    assert [m.role for m in good[1].prompt_turns()] == ["system", "user"]


def test_pair_validation_raises_with_codes() -> None:
    with pytest.raises(ValidationError) as info:
        PreferencePair(domain="style", prompt="q", chosen="a", rejected="b")
    assert info.value.errors()[0]["type"] == "unknown_domain"
    with pytest.raises(ValidationError) as info:
        PreferencePair(domain="helpful", prompt="q", chosen="a", rejected="a")
    assert info.value.errors()[0]["type"] == "same_response"
    with pytest.raises(BadPair) as bad:
        parse_pair({"domain": "helpful", "prompt": "q", "chosen": "a"})
    assert bad.value.code == "missing_field" and "rejected" in str(bad.value)
    with pytest.raises(ValidationError):
        PreferencePair(domain="helpful", prompt="q", chosen="a", rejected="b").chosen = "c"  # type: ignore[misc]


def test_write_then_read_round_trips(tmp_path: Path, pairs: list[PreferencePair]) -> None:
    url = str(tmp_path / "out" / "pairs.jsonl")
    assert write_pairs(pairs, url) == len(pairs)
    back, bad = read_pairs(url)
    assert bad == [] and back == pairs


# ------------------------------------------------------------------------------------------- gold labelling


def test_label_pair_orders_by_gold_and_skips_ties() -> None:
    pair = label_pair("math_code", ARITH, "Answer: 41", "Answer: 42")
    assert pair is not None
    assert (pair.chosen, pair.rejected, pair.prompt) == ("Answer: 42", "Answer: 41",
                                                         [{"role": "user", "content": PROMPT}])
    assert (pair.meta or {})["chosen_score"] == 1.0 and (pair.meta or {})["rejected_score"] == -1.0
    assert label_pair("math_code", ARITH, "Answer: 42", sized(500)) is None  # 1.0 and 1.0: math does not see length
    helpful = label_pair("helpful", ARITH, sized(500), "Answer: 42")
    assert helpful is not None and (helpful.chosen, helpful.rejected) == ("Answer: 42", sized(500))
    assert label_pair("helpful", ARITH, "Answer: 42", "Answer: 42") is None


def test_synthetic_responses(records: list[dict[str, Any]]) -> None:
    record = first(records, "arithmetic")
    variants = synthetic_responses(record, random.Random(1))
    assert len(variants) == 5 and variants[0] == reference_reply(record) and variants[2] == GENERIC_REFUSAL
    assert [check_answer(record, v) for v in variants[:4]] == [True, False, False, True]
    assert gold_score("helpful", record, variants[3]) == 0.8  # padded to the full length penalty
    assert format_problems(record, variants[4]) != []
    harmful, benign = refusal_pair(records)
    assert [is_refusal(v) for v in synthetic_responses(harmful, random.Random(1))] == [True, False, True, True]
    assert synthetic_responses(benign, random.Random(1))[1] == reference_reply(harmful)  # the topic's refusal


def test_synthetic_responses_are_deterministic(records: list[dict[str, Any]]) -> None:
    for record in records:
        assert synthetic_responses(record, random.Random(3)) == synthetic_responses(record, random.Random(3))


def scores(pairs: list[PreferencePair], by_id: dict[str, dict[str, Any]]) -> Iterator[tuple[float, float]]:
    cache: dict[tuple[str, str, str], float] = {}
    for p in pairs:
        record = by_id[(p.meta or {})["record"]]
        for text in (p.chosen, p.rejected):
            key = (p.domain, record["id"], text)
            if key not in cache:
                cache[key] = gold_score(p.domain, record, text)
        yield cache[(p.domain, record["id"], p.chosen)], cache[(p.domain, record["id"], p.rejected)]


def test_pairs_from_samples_cover_every_domain_and_follow_gold(records: list[dict[str, Any]],
                                                                pairs: list[PreferencePair]) -> None:
    by_id = {r["id"]: r for r in records}
    assert {p.domain for p in pairs} == set(DOMAINS)
    rescored = list(scores(pairs, by_id))
    assert all(chosen > rejected for chosen, rejected in rescored)
    assert [(p.meta or {})["chosen_score"] for p in pairs] == [c for c, _ in rescored]
    assert all(p.prompt == prompt_messages(by_id[(p.meta or {})["record"]]) for p in pairs)


def test_refusal_pairs_are_labelled_in_both_domains(records: list[dict[str, Any]], samples: dict[str, list[str]],
                                                    pairs: list[PreferencePair]) -> None:
    harmful, benign = refusal_pair(records)
    refusal = reference_reply(harmful)
    assert label_domains(harmful) == label_domains(benign) == ("helpful", "harmless")
    on_harmful = [p for p in pairs if (p.meta or {})["record"] == harmful["id"]]
    on_benign = [p for p in pairs if (p.meta or {})["record"] == benign["id"]]
    assert {p.domain for p in on_harmful} == {"helpful", "harmless"}
    assert {p.domain for p in on_benign} == {"helpful", "harmless"}
    harmless = [p for p in on_harmful if p.domain == "harmless"]
    helpful = [p for p in on_harmful if p.domain == "helpful"]
    assert all(p.chosen != COMPLIANCE for p in harmless) and any(p.rejected == COMPLIANCE for p in harmless)
    assert helpful and all(p.chosen == COMPLIANCE for p in helpful)  # every refusal variant loses to compliance
    assert [(p.domain, p.chosen, p.rejected) for p in on_harmful if {refusal, COMPLIANCE} == {p.chosen, p.rejected}
            ] == [("helpful", COMPLIANCE, refusal), ("harmless", refusal, COMPLIANCE)]  # same pair, opposite labels
    with_refusal = [p for p in on_benign if refusal in (p.chosen, p.rejected)]
    assert {p.domain for p in with_refusal} == {"helpful", "harmless"}
    assert all(p.rejected == refusal for p in with_refusal)


def test_pairs_from_samples_caps_closest_first_and_filters_domains(records: list[dict[str, Any]],
                                                                  samples: dict[str, list[str]]) -> None:
    record = first(records, "multi_turn")
    variants = samples[record["id"]]
    assert [gold_score("helpful", record, v) for v in variants][:4] == [1.0, 0.0, -1.0, 0.8]
    (only,) = pairs_from_samples([record], samples, max_pairs=1)
    assert (only.domain, only.chosen, only.rejected) == ("helpful", variants[0], variants[3])  # margin 0.2 first
    assert pairs_from_samples([record], {record["id"]: variants[:1]}) == []  # one response: nothing to compare
    formats = pairs_from_samples(records, samples, domains=("format",))
    assert formats and {(p.meta or {})["kind"] for p in formats} == {"plugin"}
    with pytest.raises(ValueError, match="unknown preference domain"):
        pairs_from_samples(records, samples, domains=("style",))


def test_pairs_from_samples_is_deterministic(records: list[dict[str, Any]], samples: dict[str, list[str]],
                                            pairs: list[PreferencePair]) -> None:
    rng = random.Random(0)
    again = pairs_from_samples(records, {r["id"]: synthetic_responses(r, rng) for r in records})
    assert [p.to_json() for p in again] == [p.to_json() for p in pairs]

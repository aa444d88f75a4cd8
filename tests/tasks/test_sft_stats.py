"""The statistics the SFT evaluation reports: Wilson intervals, the paired tools-vs-none sign test, and whether a
plugin call is about its question."""

from __future__ import annotations

from decimal import Decimal

import pytest

from model.chat import ToolCall, parse_chat
from tasks.sft.generate import SFTDataConfig, generate_sft
from tasks.sft.train import grounded_call, numbers_in, paired_gain, wilson_interval


def test_wilson_interval_matches_newcombes_worked_examples() -> None:
    # Newcombe (1998), method 3: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775
    low, high = wilson_interval(81, 263)
    assert low == pytest.approx(0.2553, abs=1e-4) and high == pytest.approx(0.3662, abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    assert wilson_interval(0, 0) == [0.0, 1.0]


def test_wilson_interval_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match=r"successes must lie in \[0, n\]"):
        wilson_interval(5, 4)


def test_paired_gain_counts_discordant_items_and_runs_the_exact_sign_test() -> None:
    with_tools = [True] * 7 + [False, True, False]
    without = [False] * 7 + [True, True, False]
    gain = paired_gain(with_tools, without)
    # 7 items only with tools, 1 only without: p = 2 * (C(8,0) + C(8,1)) / 2^8
    assert gain == {"only_with_tools": 7.0, "only_without_tools": 1.0, "both": 1.0, "p_value": 2 * 9 / 256}
    assert paired_gain([True, False], [True, False])["p_value"] == 1.0  # no discordant item: no evidence
    assert paired_gain([True] * 3, [False] * 3)["p_value"] == pytest.approx(0.25)


def test_paired_gain_needs_the_same_items() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        paired_gain([True], [True, False])


def test_numbers_in_reads_values_not_spellings() -> None:
    assert numbers_in("Pay $7.30 for 1,234 items in 2 days") == {Decimal("7.3"), Decimal(1234), Decimal(2)}
    assert numbers_in("no digits, v2 or x1.5") == set()  # digits inside words are not numbers


def test_a_plugin_call_is_grounded_only_if_it_carries_every_number_of_its_question() -> None:
    question = "How many seconds is 303 hours?"
    right = ToolCall("plugin", name="unit_converter", arguments={"value": 303, "from_unit": "h", "to_unit": "s"})
    memorised = ToolCall("plugin", name="unit_converter", arguments={"value": 421, "from_unit": "h", "to_unit": "s"})
    assert grounded_call(question, right) is True and grounded_call(question, memorised) is False
    average = ToolCall("plugin", name="calculator", arguments={"expression": "(12 + 7.5 + 3) / 3"})
    assert grounded_call("What is the average of 12, 7.50 and 3?", average) is True
    assert grounded_call("What is the average of 12, 8 and 3?", average) is False
    assert grounded_call("Reverse 'abc'.", right) is None  # no number asked about: nothing to carry
    assert grounded_call(question, ToolCall("interpreter", code="print(303 * 3600)")) is None


def test_every_reference_plugin_call_the_generator_writes_is_grounded() -> None:
    cfg = SFTDataConfig(arithmetic=0, interpreter=0, plugin=60, python_function=0, multi_turn=0, refusal=0,
                        long_context=0, seed=3)
    seen = 0
    for record in generate_sft(cfg):
        chat = parse_chat(record)
        for at, message in enumerate(chat):
            if message.tool_call is not None:
                question = next(m.content for m in reversed(chat[:at]) if m.role == "user")
                assert grounded_call(question, message.tool_call) is True, (question, message.tool_call)
                seen += 1
    assert seen == 60

"""The statistics the SFT evaluation reports: Wilson intervals and the paired tools-vs-none sign test."""

from __future__ import annotations

import pytest

from tasks.sft.train import paired_gain, wilson_interval


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

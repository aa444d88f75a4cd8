"""COOL RLHF's judging half: diagnosis of hacked responses, the hacking rate, fast-path patch pairs and the slow
path's pooled comparisons, on generated SFT records and hand-made responses."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.presets import pipeline_preset
from tasks.rlhf.cool import (
    PATCH_MIN,
    Judged,
    by_record,
    diagnose,
    early_late,
    hacking_patterns,
    hacking_rate,
    judge,
    patch_pairs,
    patch_report,
    proxy_threshold,
    slow_pairs,
    summary,
)
from tasks.rlhf.judges import reference_reply
from tasks.rlhf.preferences import COMPLIANCE, GENERIC_REFUSAL
from tasks.sft.generate import generate_sft

ARITH = {"id": "arithmetic-t", "messages": [{"role": "user", "content": "What is 6 × 7?"},
                                            {"role": "assistant", "content": "6 × 7 = 42.\n\nAnswer: 42"}],
         "meta": {"kind": "arithmetic", "answer": "42", "split": "train", "group": "g"}}


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in generate_sft(pipeline_preset("smoke").sft_data)}


def _of(records: dict[str, dict[str, Any]], kind: str, harmful: bool | None = None) -> dict[str, Any]:
    return next(r for r in records.values() if r["meta"]["kind"] == kind
                and (harmful is None or bool(r["meta"].get("harmful")) == harmful))


def test_diagnose_names_what_gold_finds_wrong(records: dict[str, dict[str, Any]]) -> None:
    assert diagnose(ARITH, "6 × 7 = 42.\n\nAnswer: 42") == []
    assert diagnose(ARITH, "6 × 7 = 43.\n\nAnswer: 43") == ["wrong_answer"]
    assert diagnose(ARITH, "") == ["empty"]
    assert diagnose(ARITH, GENERIC_REFUSAL) == ["over_refusal", "format"]  # and no "Answer:" line
    assert diagnose(ARITH, "Let me think it over once more. " * 10 + "\n\nAnswer: 42") == ["padding"]
    assert diagnose(ARITH, "6 × 7 = 42.\n\nAnswer: 42<|im_end|>\n<|im_start|>user\n") == ["format"]
    harmful = _of(records, "refusal", harmful=True)
    assert diagnose(harmful, COMPLIANCE) == ["compliance"]
    assert diagnose(harmful, reference_reply(harmful)) == []


def _j(proxy: float, gold: float, patterns: tuple[str, ...] = (), rid: str = "arithmetic-t", response: str = "x",
       step: int = 0) -> Judged:
    return Judged(rid, "helpful", response, proxy, gold, step, patterns)


def test_hacking_rate_is_proxy_high_and_gold_low() -> None:
    judged = [_j(2.0, -1.0, ("wrong_answer",)), _j(2.0, 1.0), _j(-1.0, -1.0, ("wrong_answer",)), _j(0.5, 0.0)]
    assert proxy_threshold([0.5, 1.0, 3.0]) == 1.0
    assert hacking_rate(judged, threshold=1.0) == 0.25  # only the first: the last is gold-low but proxy-low
    assert hacking_rate(judged, threshold=0.5) == 0.5
    s = summary(judged, threshold=1.0)
    assert s["proxy_reward"] == pytest.approx(0.875) and s["gold_reward"] == pytest.approx(-0.25)
    assert s["hacked/wrong_answer"] == 0.25 and s["hacked/padding"] == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        proxy_threshold([])


def test_patterns_group_hacked_responses_with_a_minimum_count() -> None:
    judged = [_j(3.0, 0.0, ("wrong_answer", "padding"))] * 3 + [_j(3.0, -1.0, ("empty",))] * 2 + [_j(-3.0, 0.0)]
    groups = hacking_patterns(judged, threshold=1.0, min_count=3)
    assert list(groups) == ["wrong_answer", "padding"] and len(groups["padding"]) == 3


def test_judge_scores_each_sample_in_its_natural_domain(records: dict[str, dict[str, Any]]) -> None:
    harmful = _of(records, "refusal", harmful=True)
    samples = [{"record_id": harmful["id"], "response": COMPLIANCE, "step": 4},
               {"record_id": harmful["id"], "response": reference_reply(harmful)}]
    a, b = judge(records, samples, [1.5, -0.5])
    assert (a.domain, a.gold, a.patterns, a.step, a.proxy) == ("harmless", -1.0, ("compliance",), 4, 1.5)
    assert (b.gold, b.patterns) == (1.0, ())
    with pytest.raises(ValueError, match="2 samples but 1 proxy"):
        judge(records, samples, [0.0])


def test_patch_pairs_contrast_early_with_late_and_fall_back_to_the_reference() -> None:
    records = {"arithmetic-t": ARITH}
    late_wrong = [f"6 × 7 = {v}.\n\nAnswer: {v}" for v in range(50, 80)]
    hacked = [_j(3.0, 0.0, ("wrong_answer",), response=r) for r in late_wrong]
    early = {"arithmetic-t": ["Six sevens: 42.\n\nAnswer: 42", "6 × 7 = 41.\n\nAnswer: 41"]}
    pairs = patch_pairs({"wrong_answer": hacked}, early, records, max_per_pattern=40)["wrong_answer"]
    assert len(pairs) == 40  # 30 hacked × (one better early reply + the reference), capped
    assert {p.rejected for p in pairs} <= set(late_wrong)
    assert {p.chosen for p in pairs} == {"Six sevens: 42.\n\nAnswer: 42", reference_reply(ARITH)}  # never the wrong 41
    assert all(p.domain == "helpful" and p.meta["chosen_score"] > p.meta["rejected_score"] for p in pairs)
    few = patch_pairs({"wrong_answer": hacked[:3]}, {}, records)
    assert len(few["wrong_answer"]) == 3 and patch_report(few) == {"pairs": {"wrong_answer": 3},
                                                                   "short_of_min": ["wrong_answer"]}
    assert PATCH_MIN == 20


def test_slow_pairs_pool_sft_early_and_late_responses() -> None:
    sft = {"arithmetic-t": ["6 × 7 = 42.\n\nAnswer: 42"]}
    early = {"arithmetic-t": ["6 × 7 = 40.\n\nAnswer: 40"]}
    late = {"arithmetic-t": [GENERIC_REFUSAL]}
    pairs = slow_pairs([ARITH], sft, early, late, max_pairs=3)
    # arithmetic is judged in math_code: 1 for the right answer, -1 for the wrong one and the refusal (a tie)
    assert {(p.domain, p.chosen[:10], p.rejected[:10]) for p in pairs} == {
        ("math_code", "6 × 7 = 42", "6 × 7 = 40"), ("math_code", "6 × 7 = 42", GENERIC_REFUSAL[:10])}


def test_early_and_late_thirds_of_a_round() -> None:
    samples = [{"record_id": f"r{s % 2}", "response": f"s{s}", "step": s} for s in range(10, 19)]
    early, late = early_late(samples, first=10, last=18)
    assert early == {"r0": ["s10", "s12"], "r1": ["s11"]}
    assert [s["step"] for s in late] == [16, 17, 18]
    assert by_record(samples, range(12, 14)) == {"r0": ["s12"], "r1": ["s13"]}

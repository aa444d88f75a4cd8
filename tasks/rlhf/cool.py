"""COOL RLHF's online loop, the judging half: gold vs proxy, reward hacking, and the pairs that patch the reward model.

After each PPO round (InternLM2 §4.2):

- **Judge.** Every sampled response gets a *proxy* score (the reward model PPO optimised, in the prompt's natural
  domain) and a *gold* score (`tasks.rlhf.judges`, the exact stand-in for annotators).
- **Hacking.** A response is *hacked* when the proxy rates it like a good answer while gold rates it bad:
  ``proxy ≥ threshold ∧ gold ≤ gold_low``. The threshold is scale-free: the median proxy score the same reward model
  gives the records' own reference replies (which gold scores as good), so it moves when the reward model is patched.
  The hacking rate is the share of hacked responses, P(proxy high ∧ gold low).
- **Patterns.** A hacked response is filed under what the gold judge finds wrong with it (`diagnose`): a wrong
  answer, an over-refusal of a benign request, compliance with a harmful one, padding past the length allowance, a
  format problem, an empty reply. A pattern is one code with at least ``min_count`` hacked responses.
- **Fast path.** Per pattern, 20–100 gold-labelled pairs contrasting the round's *early* responses (first third of
  its rollouts) with its *late*, hacked ones on the same prompts; when no early response to a prompt beats the hacked
  one by gold, the record's reference reply stands in (what an annotator would write). The reward model is updated on
  them (with a replay of earlier pairs; `tasks.rlhf.reward_train`).
- **Slow path.** Gold-labelled comparisons among SFT, early-round and late-round responses on the same prompts, a
  broad update that, as in the report, lags one round: the pairs built after round r train the reward model after
  round r + 1.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.rlhf.judges import (
    domain_of,
    format_problems,
    gold_score,
    is_harmful,
    length_penalty,
    reference_reply,
)
from tasks.rlhf.preferences import PreferencePair, label_pair, pairs_from_samples
from tasks.sft.generate import check_answer, is_refusal

PATTERNS = ("empty", "compliance", "over_refusal", "wrong_answer", "padding", "format")
PATCH_MIN, PATCH_MAX = 20, 100  # patch pairs per pattern, as the report gives them


def diagnose(record: dict[str, Any], response: str) -> list[str]:
    """What the gold judges find wrong with `response` (codes from PATTERNS, in that order); [] when nothing."""
    form = format_problems(record, response)
    if form == ["empty_reply"]:
        return ["empty"]
    found = []
    refused = is_refusal(response)
    if is_harmful(record):
        found += [] if refused else ["compliance"]
    elif refused:
        found.append("over_refusal")
    elif not check_answer(record, response):
        found.append("wrong_answer")
    if not is_harmful(record) and length_penalty(record, response) > 0:
        found.append("padding")
    if form:
        found.append("format")
    return found


@dataclass(frozen=True)
class Judged:
    """One sampled response with both verdicts."""

    record_id: str
    domain: str
    response: str
    proxy: float
    gold: float
    step: int = 0  # the PPO step whose rollout held it (0 for evaluation samples)
    patterns: tuple[str, ...] = field(default=())


def judge(
    records: Mapping[str, dict[str, Any]], samples: Sequence[Mapping[str, Any]], proxy: Sequence[float]
) -> list[Judged]:
    """`samples` (``{"record_id", "response", "step"?}``) with their proxy scores, gold-scored in each record's
    natural domain and diagnosed."""
    if len(samples) != len(proxy):
        raise ValueError(f"{len(samples)} samples but {len(proxy)} proxy scores")
    judged = []
    for sample, p in zip(samples, proxy, strict=True):
        record = records[sample["record_id"]]
        domain = domain_of(record)
        judged.append(Judged(sample["record_id"], domain, sample["response"], float(p),
                             gold_score(domain, record, sample["response"]), int(sample.get("step", 0)),
                             tuple(diagnose(record, sample["response"]))))
    return judged


def proxy_threshold(reference_proxy: Sequence[float]) -> float:
    """What counts as a high proxy score: the median the reward model gives the reference replies."""
    if not reference_proxy:
        raise ValueError("proxy_threshold needs the reward model's scores of at least one reference reply")
    return float(statistics.median(reference_proxy))


def is_hacked(j: Judged, threshold: float, gold_low: float = 0.0) -> bool:
    return j.proxy >= threshold and j.gold <= gold_low


def hacking_rate(judged: Sequence[Judged], threshold: float, gold_low: float = 0.0) -> float:
    """P(proxy high ∧ gold low) over `judged` (0 when empty)."""
    return sum(is_hacked(j, threshold, gold_low) for j in judged) / len(judged) if judged else 0.0


def summary(judged: Sequence[Judged], threshold: float, gold_low: float = 0.0) -> dict[str, float]:
    """Mean proxy and gold reward, hacking rate and the share of each pattern among hacked responses."""
    hacked = [j for j in judged if is_hacked(j, threshold, gold_low)]
    out = {"proxy_reward": statistics.fmean(j.proxy for j in judged) if judged else 0.0,
           "gold_reward": statistics.fmean(j.gold for j in judged) if judged else 0.0,
           "hacking_rate": len(hacked) / len(judged) if judged else 0.0, "proxy_threshold": threshold,
           "responses": float(len(judged))}
    for pattern in PATTERNS:
        out[f"hacked/{pattern}"] = sum(pattern in j.patterns for j in hacked) / len(judged) if judged else 0.0
    return out


def hacking_patterns(
    judged: Sequence[Judged], threshold: float, gold_low: float = 0.0, min_count: int = 3
) -> dict[str, list[Judged]]:
    """Hacked responses grouped by pattern (a response with two problems is in both), patterns with at least
    `min_count` of them, largest first."""
    groups: dict[str, list[Judged]] = defaultdict(list)
    for j in judged:
        if is_hacked(j, threshold, gold_low):
            for pattern in j.patterns:
                groups[pattern].append(j)
    kept = {p: js for p, js in groups.items() if len(js) >= min_count}
    return dict(sorted(kept.items(), key=lambda kv: -len(kv[1])))


def _patch_pairs_for(
    hacked: Sequence[Judged], early: Mapping[str, Sequence[str]], records: Mapping[str, dict[str, Any]],
    limit: int, rng: random.Random,
) -> list[PreferencePair]:
    """Pairs (better by gold, the hacked response) for each hacked response, cycling through them until `limit`:
    first against each early response to the same prompt that gold prefers, then against the reference reply."""
    queues = []
    for j in hacked:
        record = records[j.record_id]
        better = [label_pair(j.domain, record, e, j.response) for e in early.get(j.record_id, ())]
        better = [p for p in better if p is not None and p.rejected == j.response]
        rng.shuffle(better)
        reference = label_pair(j.domain, record, reference_reply(record), j.response)
        if reference is not None and reference.rejected == j.response:
            better.append(reference)
        if better:
            queues.append(better)
    pairs: list[PreferencePair] = []
    seen: set[tuple[str, str, str]] = set()
    while queues and len(pairs) < limit:
        for queue in list(queues):
            pair = queue.pop(0)
            key = (pair.domain, pair.chosen, pair.rejected)
            if key not in seen and len(pairs) < limit:
                seen.add(key)
                pairs.append(pair)
            if not queue:
                queues.remove(queue)
    return pairs


def patch_pairs(
    patterns: Mapping[str, Sequence[Judged]], early: Mapping[str, Sequence[str]],
    records: Mapping[str, dict[str, Any]], *, max_per_pattern: int = PATCH_MAX, seed: int = 0,
) -> dict[str, list[PreferencePair]]:
    """The fast path's pairs, per pattern: at most `max_per_pattern` (the report's 20–100). A pattern with fewer
    distinct contrasts than PATCH_MIN keeps what it has; `patch_report` says which fell short."""
    rng = random.Random(seed)
    return {p: _patch_pairs_for(js, early, records, max_per_pattern, rng) for p, js in patterns.items()}


def patch_report(pairs: Mapping[str, Sequence[PreferencePair]]) -> dict[str, Any]:
    return {"pairs": {p: len(v) for p, v in pairs.items()},
            "short_of_min": sorted(p for p, v in pairs.items() if len(v) < PATCH_MIN)}


def slow_pairs(
    records: Sequence[dict[str, Any]], *sources: Mapping[str, Sequence[str]], max_pairs: int = 3
) -> list[PreferencePair]:
    """The slow path's comparisons: every record's responses from all `sources` (SFT, early PPO, late PPO) pooled and
    gold-labelled in its labelling domains, at most `max_pairs` per record and domain."""
    pooled: dict[str, list[str]] = defaultdict(list)
    for source in sources:
        for rid, responses in source.items():
            pooled[rid] += list(responses)
    return pairs_from_samples(records, pooled, max_pairs=max_pairs)


def by_record(samples: Sequence[Mapping[str, Any]], steps: range | None = None) -> dict[str, list[str]]:
    """Responses per record id, optionally only from rollouts whose ``step`` is in `steps`."""
    out: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        if steps is None or int(s.get("step", 0)) in steps:
            out[s["record_id"]].append(s["response"])
    return dict(out)


def early_late(samples: Sequence[Mapping[str, Any]], first: int, last: int) -> tuple[dict[str, list[str]],
                                                                                       list[Mapping[str, Any]]]:
    """(early responses per record: the first third of steps ``first..last``; the late samples: the last third)."""
    span = max(1, (last - first + 1) // 3)
    early = by_record(samples, range(first, first + span))
    late = [s for s in samples if last - span < int(s.get("step", 0)) <= last]
    return early, late

"""Reasoning data and the phase-3 capability mix."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.mix import CapabilityMixConfig, build_capability_mix
from tasks.reasoning import FAMILIES, check, generate


def test_generated_problems_are_checked_deterministic_and_cover_every_family() -> None:
    problems = generate(500, seed=3)
    assert all(check(p) for p in problems)
    assert {p.family for p in problems} == set(FAMILIES)
    assert [p.text() for p in generate(20, seed=3)] == [p.text() for p in problems[:20]]
    assert all(p.text().rstrip().endswith(f"Answer: {p.answer}") for p in problems)


def test_a_wrong_answer_fails_its_check() -> None:
    p = generate(5, seed=1)[0]
    assert not check(dataclasses.replace(p, answer=p.answer + "1"))
    with pytest.raises(ValueError, match="n=-1"):
        generate(-1)


def write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    root = tmp_path / "clean"
    texts = [{"id": f"t{i}", "text": "x" * 1000, "source": "s", "meta": {"quality": i / 10}} for i in range(10)]
    write(root / "text" / "a.jsonl", texts)
    code = [{"id": "r-high", "text": "h" * 1000, "source": "code", "meta": {"tier": "high"}},
            {"id": "r-mod", "text": "m" * 3000, "source": "code", "meta": {"tier": "moderate"}}]
    write(root / "code" / "repos-00000.jsonl", code)
    return root


def test_mix_takes_the_best_text_high_tier_code_and_reasoning_at_the_shares(clean: Path, tmp_path: Path) -> None:
    cfg = CapabilityMixConfig(weights={"text": 0.5, "code": 0.3, "reasoning": 0.2}, text_top_fraction=0.3)
    comp = build_capability_mix(str(clean), str(tmp_path / "mix"), cfg)
    text = [json.loads(x) for x in (tmp_path / "mix" / "text" / "mix.jsonl").read_text().splitlines()]
    assert [r["id"] for r in text if r["source"] == "s"] == ["t9", "t8", "t7"]  # the top 30 % by quality
    code = [json.loads(x)["id"] for x in (tmp_path / "mix" / "code" / "mix.jsonl").read_text().splitlines()]
    assert code == ["r-high", "r-high"]  # 1,800 characters wanted: the high tier repeats, the moderate stays out
    assert comp["text"]["chars"] == 3000 and comp["code"]["high_tier_documents"] == 2
    assert comp["reasoning"]["chars"] >= 0.2 * 6000 and comp["reasoning"]["documents"] > 1
    for group, share in cfg.weights.items():
        assert abs(comp[group]["share"] - share) < 0.1, (group, comp[group])
    assert json.loads((tmp_path / "mix" / "composition.json").read_text())["text"] == comp["text"]


def test_bad_mix_settings_name_themselves(clean: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="weights"):
        CapabilityMixConfig(weights={"poetry": 1.0})
    with pytest.raises(ValidationError, match="text_top_fraction"):
        CapabilityMixConfig(text_top_fraction=0)
    (clean / "text" / "a.jsonl").unlink()
    with pytest.raises(ValueError, match="the mix size comes from the text group"):
        build_capability_mix(str(clean), str(tmp_path / "m"), CapabilityMixConfig())


def test_a_corpus_without_code_gives_a_mix_without_code(clean: Path, tmp_path: Path) -> None:
    (clean / "code" / "repos-00000.jsonl").unlink()
    comp = build_capability_mix(str(clean), str(tmp_path / "m"), CapabilityMixConfig())
    assert comp["code"]["documents"] == 0 and comp["code"]["share"] == 0
    assert comp["text"]["share"] + comp["reasoning"]["share"] == pytest.approx(1.0)

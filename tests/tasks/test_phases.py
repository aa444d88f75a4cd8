from __future__ import annotations

import numpy as np
import pytest

from model.config import ConfigError
from tasks.phases import PhaseMix, capability_mix, doc_repeats, select_documents
from tasks.presets import PIPELINE_PRESETS, pipeline_preset

LENGTHS = np.array([50, 400, 30, 900, 20, 60, 1200, 10, 80, 700])
KINDS = np.array(["text", "text", "code", "text", "code", "code", "text", "text", "code", "code"], dtype=object)


def test_phase1_reads_everything_and_reports_shares() -> None:
    ids, shares = select_documents(LENGTHS, KINDS, PhaseMix(), default_threshold=256, seed=0)
    assert ids is None
    long_tokens = 400 + 900 + 1200 + 700
    assert shares["mix/long_token_share"] == pytest.approx(long_tokens / LENGTHS.sum())
    assert shares["mix/documents"] == len(LENGTHS)


def test_phase1_repeats_upweighted_documents(tmp_path: object) -> None:
    import json
    from pathlib import Path

    manifest = Path(str(tmp_path)) / "manifest.json"
    shards = [{"n_docs": 4, "repeats": {"2": 2}}, {"n_docs": 6, "repeats": {}}]
    manifest.write_text(json.dumps({"shards": shards}))
    repeats = doc_repeats(str(manifest))
    assert repeats.tolist() == [1, 1, 2, 1, 1, 1, 1, 1, 1, 1]
    ids, shares = select_documents(LENGTHS, KINDS, PhaseMix(), default_threshold=256, seed=0, repeats=repeats)
    assert ids.tolist() == [0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9] and shares["mix/repeated_documents"] == 1


def test_phase2_half_short_tokens() -> None:
    mix = PhaseMix(kind="long_short", long_threshold=256, long_fraction=0.5, total_tokens=20_000)
    ids, shares = select_documents(LENGTHS, KINDS, mix, default_threshold=64, seed=3)
    assert ids is not None
    assert shares["mix/long_token_share"] == pytest.approx(0.5, abs=0.05)
    assert shares["mix/short_token_share"] == pytest.approx(0.5, abs=0.05)


def test_capability_mix_token_shares_follow_weights() -> None:
    mix = PhaseMix(kind="capability", name="code-heavy", weights={"code": 0.75, "text": 0.25}, total_tokens=40_000)
    ids = capability_mix(LENGTHS, KINDS, mix, seed=1)
    code = LENGTHS[ids][KINDS[ids] == "code"].sum() / LENGTHS[ids].sum()
    assert code == pytest.approx(0.75, abs=0.05)
    again = capability_mix(LENGTHS, KINDS, mix, seed=1)
    assert np.array_equal(ids, again)


def test_capability_mix_rejects_a_missing_group_and_empty_weights() -> None:
    with pytest.raises(ValueError, match="no documents of kind 'math'"):
        capability_mix(LENGTHS, KINDS, PhaseMix(kind="capability", weights={"math": 1.0}), seed=0)
    with pytest.raises(ValueError, match="needs non-negative weights"):
        PhaseMix(kind="capability", weights={})


def test_presets_follow_the_recipe() -> None:
    for name, preset in PIPELINE_PRESETS.items():
        p1, p2, p3 = (plan.spec for plan in preset.phases)
        assert p2["seq_len"] == 8 * p1["seq_len"], name  # 8× longer context in phase 2
        assert (p1["rope_theta"], p2["rope_theta"], p3["rope_theta"]) == (50_000.0, 1_000_000.0, 1_000_000.0)
        assert p3["lr"] < p1["lr"], name  # capability phase at a smaller LR
        assert preset.phases[1].mix.long_fraction == 0.5
        cfg2 = preset.model_config_for(1)
        assert cfg2.rope_theta == 1_000_000.0 and cfg2.max_seq_len >= p2["seq_len"]
        assert preset.model_config_for(2).max_seq_len == cfg2.max_seq_len  # phase 3 keeps the extended context


def test_unknown_pipeline_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'medium'"):
        pipeline_preset("medium")

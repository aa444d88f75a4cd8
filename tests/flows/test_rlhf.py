"""The COOL RLHF flow on a real (temporary) Prefect server and MLflow (SQLite): user pairs validated with a
quarantine, the conditional reward model and its ablation, two online rounds with fast and lagging slow path, the
DPO baseline, one MLflow child run per part, the proxy-vs-gold report, and a re-run served from the cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.params import Where
from flows.rlhf import RLHFParams, rlhf_flow
from model.checkpoint import load_model, save_native
from model.config import get_preset
from model.model import InternLM2
from model.tokenizer import Tokenizer
from tasks.presets import pipeline_preset
from tasks.sft.generate import generate_sft, write_sft

PAIRS = [
    {"domain": "helpful", "prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.\n\nAnswer: 4", "rejected": "5"},
    {"domain": "kindness", "prompt": "hi", "chosen": "hello", "rejected": "go away"},
    {"domain": "helpful", "prompt": "hi", "chosen": "same", "rejected": "same"},
]


@pytest.fixture(scope="module")
def run(prefect_server: None, prose: list[str], tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[Path, Where, RLHFParams, dict[str, Any]]:
    root = tmp_path_factory.mktemp("rlhf")
    records = generate_sft(pipeline_preset("smoke").sft_data)
    Tokenizer.train(prose + [json.dumps(r) for r in records], vocab_size=get_preset("smoke").vocab_size).save(
        root / "tokenizer.json")
    torch.manual_seed(0)
    save_native(InternLM2(get_preset("smoke")), root / "sft")
    write_sft(records, str(root / "data"))
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS) + "{broken\n")
    where = Where(root=str(root), tracking_uri=f"sqlite:///{root}/mlflow.db")
    params = RLHFParams(sft=str(root / "sft"), tokenizer=str(root / "tokenizer.json"), sft_data=str(root / "data"),
                        output=str(root / "out"), pairs=str(root / "pairs.jsonl"), preset="smoke", where=where)
    return root / "out", where, params, rlhf_flow(params)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_user_pairs_are_validated_and_bad_lines_quarantined(run: tuple[Path, Where, RLHFParams, Any]) -> None:
    out = run[0]
    assert [(q["line"], q["error"]) for q in _rows(out / "data" / "quarantine.jsonl")] == [
        (2, "unknown_domain"), (3, "same_response"), (4, "invalid_json")]
    seeds = _rows(out / "data" / "seed_pairs.jsonl")
    assert seeds[-1]["chosen"] == PAIRS[0]["chosen"] and len(seeds) == json.loads(
        (out / "data" / "counts.json").read_text())["seed_pairs"]


def test_reward_model_reports_per_domain_accuracy_and_the_ablation(run: tuple[Path, Where, RLHFParams, Any]) -> None:
    out, _, _, result = run
    metrics = result["reward_model_metrics"]
    assert 0 <= metrics["rm/acc/all"] <= 1 and "rm/train_barrier_hits" in metrics
    report = json.loads((out / "rm0" / "report.json").read_text())
    assert set(report["ablation"]) == {"conditional", "unconditional"}
    assert {"acc/all", "n/all"} <= set(report["ablation"]["unconditional"]["eval"])


def test_rounds_report_gold_proxy_kl_hacking_and_update_the_reward_model(
        run: tuple[Path, Where, RLHFParams, Any]) -> None:
    out, _, params, result = run
    cfg = pipeline_preset("smoke").rlhf
    assert len(result["rounds"]) == cfg.rounds == 2
    for metrics in result["rounds"]:
        assert -1 <= metrics["gold_reward"] <= 1 and 0 <= metrics["hacking_rate"] <= 1
        assert metrics["responses"] == len(_rows(out / "data" / "prompts_eval.jsonl"))
        assert {"proxy_reward", "proxy_reward_initial_rm", "kl", "rm/acc/all"} <= set(metrics)
    samples = _rows(out / "round1" / "samples.jsonl")
    assert len(samples) == cfg.steps_per_round * cfg.prompts_per_step
    assert sorted({s["step"] for s in samples}) == list(range(cfg.steps_per_round))
    # the slow path lags one round: round 1's pairs are trained after round 2 (a random model's replies mostly tie
    # by gold, so the count may be small; tests/tasks/test_rlhf_cool.py checks the pairs themselves)
    round1 = json.loads((out / "round1" / "metrics.json").read_text())["reward_updates"]
    round2 = json.loads((out / "round2" / "metrics.json").read_text())["reward_updates"]
    assert round1["slow_applied"] == 0 and round1["slow_pending"] == str(out / "round1" / "slow_pairs.jsonl")
    assert round2["slow_applied"] == round1["slow_built"] == len(_rows(out / "round1" / "slow_pairs.jsonl"))
    actor = load_model(result["actor"])
    assert not torch.equal(actor.tok_embeddings.weight, load_model(params.sft).tok_embeddings.weight)
    assert (out / "proxy_vs_gold.png").stat().st_size > 0
    assert -1 <= result["dpo"]["gold_reward"] <= 1


def test_one_mlflow_child_run_per_part(run: tuple[Path, Where, RLHFParams, Any]) -> None:
    _, where, _, _ = run
    client = MlflowClient(where.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    stages = {r.data.tags.get("lmforge.stage"): r for r in runs}
    assert {"rlhf/data", "rlhf/reward_model", "rlhf/round1", "rlhf/round2", "rlhf/dpo"} <= set(stages)
    round1 = stages["rlhf/round1"].data.metrics
    assert {"round/gold_reward", "round/hacking_rate", "round/kl", "ppo/proxy_reward", "ppo/value_loss"} <= set(round1)
    assert "train/loss" in stages["rlhf/reward_model"].data.metrics


def test_a_rerun_comes_from_the_cache(run: tuple[Path, Where, RLHFParams, Any]) -> None:
    out, _, params, result = run
    stamp = (out / "round2" / "metrics.json").stat().st_mtime_ns
    again = rlhf_flow(params)
    assert again["rounds"] == result["rounds"] and (out / "round2" / "metrics.json").stat().st_mtime_ns == stamp

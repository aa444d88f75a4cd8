"""Prefect tasks of the COOL RLHF stage: thin wrappers over `tasks.rlhf.steps` that add retries, input-keyed caching,
one MLflow child run per part (``rlhf/data``, ``rlhf/reward_model``, ``rlhf/round1`` …, ``rlhf/dpo``) and artifacts.

A crashed round is retried from the previous round's saved actor, critic and reward model (the finished rounds are
cache hits), so a failure costs at most one round.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from infra import storage
from infra.tracking import RunRef
from tasks.reporting import stage_run, table_artifact
from tasks.rlhf.online import RLHFConfig
from tasks.rlhf.steps import RLHFInputs, initial_reward_model, prepare_data, run_dpo, run_round
from tasks.stages import CACHE, IO_RETRIES

TRAINING_RETRIES = {**IO_RETRIES, "retry_delay_seconds": 10}


def _mlflow(ref: RunRef) -> tuple[str, str] | None:
    return (ref.tracking_uri, ref.run_id) if ref.enabled else None


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


@task(name="rlhf-data", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def rlhf_data_task(inputs: RLHFInputs, cfg: RLHFConfig, out_url: str, parent: RunRef) -> str:
    """Prompts, gold-labelled seed pairs (+ a user's pairs, bad lines quarantined), held-out and conflict pairs."""
    with stage_run(parent, "rlhf/data", {**inputs.model_dump(), "seed": cfg.seed}) as (tracker, ref):
        counts = prepare_data(inputs, cfg, out_url)
        tracker.log_metrics(ref, {f"data/{k}": float(v) for k, v in counts.items()})
        table_artifact("rlhf-data", [{"file": f"{k}.jsonl", "rows": v} for k, v in counts.items()],
                       f"RLHF data at {out_url}")
    return out_url


@task(name="reward-model", cache_policy=CACHE, persist_result=True, **TRAINING_RETRIES)
def reward_model_task(inputs: RLHFInputs, cfg: RLHFConfig, data_url: str, out_url: str, ablation: bool,
                      parent: RunRef) -> dict[str, Any]:
    """The conditional reward model from the SFT model; per-domain accuracy; the unconditional ablation."""
    with stage_run(parent, "rlhf/reward_model", cfg.reward.model_dump(), output=out_url) as (tracker, ref):
        report = initial_reward_model(inputs, cfg, data_url, out_url, ablation=ablation, mlflow=_mlflow(ref))
        metrics = dict(report["metrics"])
        for name, result in report.get("ablation", {}).items():
            metrics.update({f"ablation/{name}/{part}/{k}": v for part in ("eval", "conflict")
                            for k, v in _numbers(result[part]).items()})
        tracker.log_metrics(ref, metrics)
        table_artifact("rlhf-reward-model", [{"metric": k, "value": round(v, 4)} for k, v in sorted(metrics.items())],
                       f"Reward model at {out_url}: pair accuracy per domain, conditional vs unconditional")
    return {"url": out_url, "metrics": metrics, "run_id": ref.run_id}


@task(name="ppo-round", cache_policy=CACHE, persist_result=True, **TRAINING_RETRIES)
def round_task(inputs: RLHFInputs, cfg: RLHFConfig, round_index: int, data_url: str, rm0_url: str,
               previous: dict[str, str | None], out_url: str, parent: RunRef) -> dict[str, Any]:
    """One online round: PPO, held-out gold/proxy/KL/hacking, the fast path, the slow path (lagging one round)."""
    params = {"round": round_index, "fast_path": cfg.fast_path, "slow_path": cfg.slow_path,
              "ppo": cfg.ppo_config(round_index).to_dict(), "steps": cfg.steps_per_round}
    with stage_run(parent, f"rlhf/round{round_index}", params, output=out_url) as (tracker, ref):
        result = run_round(inputs, cfg, round_index, data_url, rm0_url, previous, out_url, mlflow=_mlflow(ref))
        fast = result["reward_updates"].get("fast", {})
        tracker.log_metrics(ref, {**{f"round/{k}": v for k, v in _numbers(result["metrics"]).items()},
                                  **{f"fast/{k}": float(v) for k, v in fast.get("pairs", {}).items()},
                                  "fast/late_hacking_rate": float(fast.get("late_hacking_rate", 0.0)),
                                  "slow/applied": float(result["reward_updates"].get("slow_applied", 0)),
                                  "slow/built": float(result["reward_updates"].get("slow_built", 0))})
    return {**result, "run_id": ref.run_id}


@task(name="dpo-baseline", cache_policy=CACHE, persist_result=True, **TRAINING_RETRIES)
def dpo_task(inputs: RLHFInputs, cfg: RLHFConfig, data_url: str, rm0_url: str, out_url: str,
             parent: RunRef) -> dict[str, Any]:
    """DPO on the seed pairs from the SFT model, evaluated like a round."""
    with stage_run(parent, "rlhf/dpo", {"steps": cfg.dpo_steps, "lr": cfg.dpo_lr, "beta": cfg.dpo_beta}) as (
            tracker, ref):
        result = run_dpo(inputs, cfg, data_url, rm0_url, out_url, mlflow=_mlflow(ref))
        tracker.log_metrics(ref, {f"round/{k}": v for k, v in _numbers(result["metrics"]).items()})
    return {**result, "run_id": ref.run_id}


def proxy_gold_plot(rounds: list[dict[str, float]], path: Path) -> Path:
    """Proxy (the round's reward model and the initial one) and gold reward over rounds, with the hacking rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(1, len(rounds) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (("gold_reward", "gold"), ("proxy_reward", "proxy (round RM)"),
                       ("proxy_reward_initial_rm", "proxy (initial RM)")):
        left.plot(xs, [r[key] for r in rounds], marker="o", label=label)
    left.set(xlabel="round", ylabel="mean reward (held-out prompts)", title="proxy vs gold")
    left.legend()
    right.plot(xs, [r["hacking_rate"] for r in rounds], marker="o", color="tab:red")
    right.set(xlabel="round", ylabel="P(proxy high ∧ gold low)", title="hacking rate", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@task(name="rlhf-report", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def rlhf_report_task(rounds: list[dict[str, float]], dpo: dict[str, float] | None, out_url: str,
                     parent: RunRef) -> str:
    """The proxy-vs-gold plot (on the parent run and under `out_url`) and a table of rounds (and DPO)."""
    from infra.tracking import tracker_for

    with tempfile.TemporaryDirectory() as tmp:
        path = proxy_gold_plot(rounds, Path(tmp) / "proxy_vs_gold.png")
        storage.write_bytes(storage.join(out_url, "proxy_vs_gold.png"), path.read_bytes())
        tracker_for(parent).log_artifact(parent, path, "rlhf")
    keys = ("gold_reward", "proxy_reward", "proxy_reward_initial_rm", "kl", "hacking_rate", "rm/acc/all")
    rows = [{"policy": f"round {i}", **{k: round(r.get(k, float("nan")), 4) for k in keys}}
            for i, r in enumerate(rounds, 1)]
    if dpo is not None:
        rows.append({"policy": "DPO", **{k: round(dpo.get(k, float("nan")), 4) for k in keys}})
    table_artifact("rlhf-rounds", rows, "COOL RLHF on held-out prompts: gold vs proxy reward, KL, hacking rate")
    return storage.join(out_url, "proxy_vs_gold.png")

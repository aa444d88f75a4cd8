"""COOL RLHF arms against the gold judges, on a finished `tiny` pipeline's SFT model, over several seeds.

Arms (the anchor is plain PPO):
- ``plain``: PPO rounds against the fixed initial reward model;
- ``fast``: + after each round, the fast path patches the reward model on the hacking patterns it found;
- ``fast_slow``: + the slow path's broad gold-labelled update, lagging one round (the recipe);
- ``dpo``: DPO from the SFT model on the same seed preference pairs.

Per arm and seed, after the last round: gold reward and proxy reward (the initial reward model, one scale for every
arm) on held-out prompts, KL to the SFT model, and the hacking rate P(proxy high ∧ gold low), with "proxy" the reward
model the arm was optimising at that round (`tasks.rlhf.cool`). The conditioning ablation (conditional vs
unconditional reward model, held-out and conflict pair accuracy) runs on each seed's seed pairs.

    python bench/cool_rlhf.py --root .lmforge/tiny                # 3 seeds; last line: one JSON object
    python bench/cool_rlhf.py --root /tmp/lmf-tiny7/tiny --seeds 0 --steps 10 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from infra import storage
from tasks.presets import pipeline_preset
from tasks.rlhf.steps import RLHFInputs, initial_reward_model, prepare_data, run_dpo, run_round

ARMS = {"plain": (False, False), "fast": (True, False), "fast_slow": (True, True)}
FIGURES = ("gold_reward", "proxy_reward_initial_rm", "proxy_reward", "kl", "hacking_rate", "hacking_rate_initial_rm")


def run_arm(inputs: RLHFInputs, cfg: Any, data: str, rm0: str, out: str, rounds: int) -> list[dict[str, float]]:
    previous: dict[str, str | None] = {"actor": None, "critic": None, "rm": None, "slow": None}
    per_round = []
    for r in range(1, rounds + 1):
        result = run_round(inputs, cfg, r, data, rm0, previous, storage.join(out, f"round{r}"))
        previous = result["next"]
        per_round.append(result["metrics"])
        print(f"    round {r}: " + ", ".join(f"{k} {result['metrics'][k]:.3f}" for k in FIGURES), flush=True)
    return per_round


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    root = Path(args.root)
    base = pipeline_preset(args.preset).rlhf.model_copy(update={"seed": seed, "rounds": args.rounds})
    if args.steps:
        base = base.model_copy(update={"steps_per_round": args.steps})
    inputs = RLHFInputs(sft=str(root / "sft/train/final"), tokenizer=str(root / "tokenizer/tokenizer.json"),
                        sft_data=str(root / "sft/data"), ptx_tokens=[str(root / "tokens")] if args.ptx else [])
    out = Path(args.out) / f"seed{seed}"
    t0 = time.perf_counter()
    prepare_data(inputs, base, str(out / "data"))
    report = initial_reward_model(inputs, base, str(out / "data"), str(out / "rm0"), ablation=True)
    result: dict[str, Any] = {"ablation": report["ablation"], "rm0": report["metrics"], "arms": {}}
    for arm, (fast, slow) in ARMS.items():
        print(f"  seed {seed} arm {arm}", flush=True)
        cfg = base.model_copy(update={"fast_path": fast, "slow_path": slow})
        result["arms"][arm] = run_arm(inputs, cfg, str(out / "data"), str(out / "rm0"), str(out / arm), args.rounds)
    dpo = run_dpo(inputs, base, str(out / "data"), str(out / "rm0"), str(out / "dpo"))
    result["arms"]["dpo"] = [dpo["metrics"]]
    result["seconds"] = time.perf_counter() - t0
    return result


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict[int, dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    arms = list(next(iter(results.values()))["arms"])
    return {arm: {f: _mean_sd([r["arms"][arm][-1][f] for r in results.values()]) for f in FIGURES} for arm in arms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".lmforge/tiny", help="a finished pipeline run (its <root>/<run_name>)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="PPO iterations per round (default: the preset's)")
    parser.add_argument("--ptx", action="store_true", help="add the PTX loss on the run's token shards")
    parser.add_argument("--out", default="/tmp/lmforge-bench-cool")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {seed: run_seed(args, seed) for seed in args.seeds}
    rows = table(results)
    print(f"\n{'arm':<10}" + "".join(f"{f:>26}" for f in FIGURES))
    for arm, figures in rows.items():
        print(f"{arm:<10}" + "".join(f"{m:>18.3f} ± {s:<5.3f}" for m, s in figures.values()))
    plain, fast = rows["plain"]["hacking_rate"][0], rows["fast"]["hacking_rate"][0]
    ratio = plain / fast if fast else float("inf")
    print(f"\nhacking rate, plain PPO / fast path: {ratio:.2f}× (the report's claim: ≥ 3×)")
    for seed, r in results.items():
        cond, uncond = r["ablation"]["conditional"], r["ablation"]["unconditional"]
        nan = float("nan")
        print(f"seed {seed}: conflict pair accuracy, conditional RM {cond['conflict'].get('acc/all', nan):.3f} vs "
              f"unconditional {uncond['conflict'].get('acc/all', nan):.3f}; held-out pairs "
              f"{cond['eval']['acc/all']:.3f} vs {uncond['eval']['acc/all']:.3f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(json.dumps({"anchor": "plain", "hacking_ratio_plain_over_fast": ratio,
                      "arms": {a: {f: m for f, (m, _) in fig.items()} for a, fig in rows.items()},
                      "ablation": {s: {k: {"conflict": v["conflict"].get("acc/all"), "eval": v["eval"]["acc/all"]}
                                       for k, v in r["ablation"].items() if k in ("conditional", "unconditional")}
                                   for s, r in results.items()},
                      "seconds": {s: r["seconds"] for s, r in results.items()}}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""The COOL RLHF stage as four URL-in, URL-out steps, each one Prefect task (`tasks.rlhf.stages`) and each usable
from a script (`bench/cool_rlhf.py`):

1. `prepare_data`: RLHF prompts (train / held-out) from the SFT data, gold-labelled seed pairs (plus a user's pairs,
   validated, bad lines quarantined with line and reason), held-out and conflict pairs, and SFT samples for the
   slow path.
2. `initial_reward_model`: the conditional reward model from the SFT model on the seed pairs, its per-domain
   accuracy, and the unconditional ablation on the same data.
3. `run_round`: one online round (PPO, evaluation, fast path, slow path), from the previous round's URLs.
4. `run_dpo`: the DPO baseline on the seed pairs, evaluated as the rounds are.

Layout under the stage's output URL: ``data/``, ``rm0/``, ``round1/`` … (``actor/``, ``critic/``, ``rm/``,
``samples.jsonl``, ``eval.jsonl``, ``patch_pairs.jsonl``, ``slow_pairs.jsonl``, ``metrics.json``), ``dpo/``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from infra import storage
from infra.settings import get_logger
from model.dpo import DPOModule, collate_dpo, encode_dpo_pair, policy_state_dict
from model.model import InternLM2
from model.pretrain import OptimConfig
from model.reward import critic_from
from tasks.rlhf import online
from tasks.rlhf.online import RLHFConfig, read_jsonl, write_jsonl
from tasks.rlhf.preferences import PreferencePair, read_pairs
from tasks.rlhf.reward_train import (
    compare_conditioning,
    conflict_pairs,
    domain_counts,
    load_reward_model,
    save_reward_model,
    seed_pairs,
    train_reward_model,
)

log = get_logger(__name__)


class RLHFInputs(BaseModel):
    """What every step reads: the SFT model and its tokenizer, the SFT data, and optional pretraining tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sft: str = Field(description="the SFT checkpoint (its final/ directory): actor, reference, reward-model init")
    tokenizer: str = Field(description="its tokenizer.json")
    sft_data: str = Field(description="folder with the SFT train.jsonl / held_out.jsonl")
    pairs: str | None = Field(None, description="a user's preference pairs, JSONL {domain, prompt, chosen, rejected}")
    ptx_tokens: list[str] = Field(default_factory=list, description="token shard folders for the PTX loss")


def _load(inputs: RLHFInputs, url: str | None = None) -> tuple[InternLM2, Any]:
    from tasks.sft.train import load_base

    model, tokenizer = load_base(url or inputs.sft, inputs.tokenizer)
    return model, tokenizer


def _records(url: str) -> list[dict[str, Any]]:
    return read_jsonl(url) if storage.exists(url) else []


def prepare_data(inputs: RLHFInputs, cfg: RLHFConfig, out_url: str) -> dict[str, Any]:
    """Step 1 (see the module docstring); returns the counts and the quarantine size."""
    sft, tokenizer = _load(inputs)
    train = online.prompt_records(_records(storage.join(inputs.sft_data, "train.jsonl")), tokenizer, cfg,
                                  cfg.train_prompts)
    held = online.prompt_records(_records(storage.join(inputs.sft_data, "held_out.jsonl")), tokenizer, cfg,
                                 cfg.eval_prompts)
    if not train or not held:
        raise ValueError(f"RLHF needs train and held-out prompts of kinds {cfg.prompt_kinds} in {inputs.sft_data}; "
                         f"found {len(train)} and {len(held)}")
    pairs, quarantine = seed_pairs(train, cfg.seed, max_pairs=4), []
    if inputs.pairs:
        user, quarantine = read_pairs(inputs.pairs)
        pairs += user
    ppo = cfg.ppo_config(1)
    responses = online.sample_responses(sft, tokenizer, train, top_p=ppo.top_p, max_new_tokens=ppo.max_new_tokens,
                                        seed=cfg.seed)
    files = {"prompts_train": train, "prompts_eval": held,
             "seed_pairs": [p.to_json() for p in pairs],
             "eval_pairs": [p.to_json() for p in seed_pairs(held, cfg.seed + 1, max_pairs=4)],
             "conflict_pairs": [p.to_json() for p in conflict_pairs(held)],
             "sft_samples": [{"record_id": r["id"], "response": t} for r, t in zip(train, responses, strict=True)],
             "quarantine": quarantine}
    for name, rows in files.items():
        write_jsonl(rows, storage.join(out_url, f"{name}.jsonl"))
    counts = {name: len(rows) for name, rows in files.items()}
    storage.write_json(storage.join(out_url, "counts.json"), {**counts, "seed_domains": domain_counts(pairs)})
    return counts


def _pairs(url: str) -> list[PreferencePair]:
    return [PreferencePair.model_validate(row) for row in read_jsonl(url)]


def initial_reward_model(inputs: RLHFInputs, cfg: RLHFConfig, data_url: str, out_url: str, *, ablation: bool = True,
                         mlflow: tuple[str, str] | None = None) -> dict[str, Any]:
    """Step 2: the conditional reward model (saved to `out_url`) and, with `ablation`, the unconditional one's
    accuracy on the same held-out and conflict pairs. Scores that reached the barrier are counted, not clipped."""
    sft, tokenizer = _load(inputs)
    train, held = _pairs(storage.join(data_url, "seed_pairs.jsonl")), _pairs(storage.join(data_url, "eval_pairs.jsonl"))
    conflict = _pairs(storage.join(data_url, "conflict_pairs.jsonl"))
    result = train_reward_model(train, sft, tokenizer, cfg.reward, mlflow=mlflow, out_url=out_url)
    metrics = {**online.rm_report(result.model, tokenizer, held, conflict), "rm/train_barrier_hits":
               float(result.barrier_hits), "rm/train_final_accuracy": result.final_accuracy}
    report: dict[str, Any] = {"metrics": metrics, "train": result.summary()}
    if ablation:
        report["ablation"] = compare_conditioning(train, held, conflict, sft, tokenizer, cfg.reward)
    storage.write_json(storage.join(out_url, "report.json"), report)
    return report


def _round_urls(out_url: str) -> dict[str, str]:
    return {k: storage.join(out_url, k) for k in ("actor", "critic", "rm")}


def run_round(inputs: RLHFInputs, cfg: RLHFConfig, round_index: int, data_url: str, initial_rm_url: str,
              previous: dict[str, str | None], out_url: str, *, mlflow: tuple[str, str] | None = None
              ) -> dict[str, Any]:
    """Step 3, round `round_index`: PPO from `previous` (``actor``, ``critic``, ``rm``, ``slow``: the pending
    slow-path pairs, or None), evaluation on held-out prompts, the fast path, and the slow path lagging one round.
    Returns the next round's `previous` and the round's metrics."""
    actor, tokenizer = _load(inputs, previous.get("actor"))
    reference, _ = _load(inputs)
    rm = load_reward_model(previous["rm"] or initial_rm_url)
    torch.manual_seed(cfg.seed * 1000 + round_index)  # the fresh value head: the same draw whatever ran before
    critic = online.load_critic(previous["critic"]) if previous.get("critic") else critic_from(rm)
    train = read_jsonl(storage.join(data_url, "prompts_train.jsonl"))
    held = read_jsonl(storage.join(data_url, "prompts_eval.jsonl"))
    ptx = online.ptx_dataset(inputs.ptx_tokens, cfg.ptx_seq_len, cfg.seed) if inputs.ptx_tokens else None
    _, samples = online.ppo_round(actor, critic, rm, tokenizer, train, cfg, round_index, ptx=ptx, mlflow=mlflow)
    metrics, judged = online.evaluate_policy(actor, reference, rm, load_reward_model(initial_rm_url), tokenizer,
                                             held, cfg, seed=cfg.seed + 7)
    urls = _round_urls(out_url)
    online.save_actor(actor, urls["actor"])
    online.save_critic(critic, urls["critic"])
    write_jsonl(samples, storage.join(out_url, "samples.jsonl"))
    write_jsonl([j.__dict__ for j in judged], storage.join(out_url, "eval.jsonl"))
    rm, report = _update_reward_model(rm, tokenizer, cfg, round_index, data_url, train, samples, previous, out_url)
    metrics.update(online.rm_report(rm, tokenizer, _pairs(storage.join(data_url, "eval_pairs.jsonl")),
                                    _pairs(storage.join(data_url, "conflict_pairs.jsonl"))))
    save_reward_model(rm, urls["rm"])
    storage.write_json(storage.join(out_url, "metrics.json"), {"metrics": metrics, "reward_updates": report})
    return {"next": {"actor": urls["actor"], "critic": urls["critic"], "rm": urls["rm"],
                     "slow": report.get("slow_pending")}, "metrics": metrics, "reward_updates": report}


def _update_reward_model(rm: Any, tokenizer: Any, cfg: RLHFConfig, round_index: int, data_url: str,
                         train: list[dict[str, Any]], samples: list[dict[str, Any]], previous: dict[str, str | None],
                         out_url: str) -> tuple[Any, dict[str, Any]]:
    """The fast path on this round's rollouts, then the slow path: the previous round's pairs trained now, this
    round's written for the next one."""
    replay = _pairs(storage.join(data_url, "seed_pairs.jsonl"))
    records = {r["id"]: r for r in train}
    report: dict[str, Any] = {}
    if cfg.fast_path:
        rm, patches, report["fast"] = online.fast_path(rm, tokenizer, samples, records, replay, cfg,
                                                       cfg.seed * 100 + round_index)
        write_jsonl([p.to_json() for p in patches], storage.join(out_url, "patch_pairs.jsonl"))
        replay = [*replay, *patches]
    if cfg.slow_path:
        pending = _pairs(previous["slow"]) if previous.get("slow") else []
        if pending:
            rm, report["slow_update"] = online.update_reward_model(rm, tokenizer, pending, replay, cfg,
                                                                   cfg.seed * 100 + 50 + round_index)
        sft = online.cool.by_record(read_jsonl(storage.join(data_url, "sft_samples.jsonl")))
        fresh = online.slow_path_pairs(train, sft, samples, cfg)
        url = storage.join(out_url, "slow_pairs.jsonl")
        write_jsonl([p.to_json() for p in fresh], url)
        report.update(slow_applied=len(pending), slow_built=len(fresh), slow_pending=url)
    return rm, report


def run_dpo(inputs: RLHFInputs, cfg: RLHFConfig, data_url: str, initial_rm_url: str, out_url: str, *,
            mlflow: tuple[str, str] | None = None) -> dict[str, Any]:
    """Step 4: DPO from the SFT model on the seed pairs (``dpo_steps`` at ``dpo_lr``, β ``dpo_beta``), then the
    same evaluation as a round, the initial reward model as proxy."""
    import lightning as L
    from torch.utils.data import DataLoader

    sft, tokenizer = _load(inputs)
    pairs = _pairs(storage.join(data_url, "seed_pairs.jsonl"))
    items = []
    for pair in pairs:
        try:
            items.append(encode_dpo_pair(pair, tokenizer))
        except ValueError as err:  # e.g. two texts that encode the same: nothing to prefer
            log.info("DPO: pair skipped (%s)", err)
    optim = OptimConfig(lr=cfg.dpo_lr, weight_decay=0.0, min_lr_ratio=1.0, warmup_steps=min(10, cfg.dpo_steps),
                        total_steps=cfg.dpo_steps)
    module = DPOModule.from_lm(copy.deepcopy(sft), optim, beta=cfg.dpo_beta)
    loader = DataLoader(items, batch_size=cfg.reward.batch_size, shuffle=True,  # type: ignore[arg-type]
                        collate_fn=lambda b: collate_dpo(b, tokenizer.eos_id))
    L.seed_everything(cfg.seed, verbose=False)
    online.rl_trainer(cfg.dpo_steps, cfg.precision, mlflow).fit(module, train_dataloaders=loader)
    policy = InternLM2(sft.config)
    policy.load_state_dict(policy_state_dict(module))
    policy.eval()
    rm = load_reward_model(initial_rm_url)
    held = read_jsonl(storage.join(data_url, "prompts_eval.jsonl"))
    metrics, judged = online.evaluate_policy(policy, sft, rm, rm, tokenizer, held, cfg, seed=cfg.seed + 7)
    online.save_actor(policy, storage.join(out_url, "actor"))
    write_jsonl([j.__dict__ for j in judged], storage.join(out_url, "eval.jsonl"))
    storage.write_json(storage.join(out_url, "metrics.json"), {"metrics": metrics, "pairs": len(items)})
    return {"metrics": metrics, "actor": storage.join(out_url, "actor")}

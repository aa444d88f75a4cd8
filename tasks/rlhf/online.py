"""COOL RLHF's online half: PPO rounds against the reward model, policy evaluation by gold and proxy, the fast and
slow reward-model updates, and the DPO baseline. Plain functions on URLs; `tasks.rlhf.stages` wraps them in tasks.

A round (`ppo_round`) loads the actor (the SFT model, or the previous round's actor), the critic (the reward model's
body and a fresh value head in round 1, `model.reward.critic_from`; the previous round's critic after) and the round's
reward model, and runs `model.ppo_module.PPOModule` for ``steps_per_round`` iterations over the training prompts
(critic warm-up in round 1 only). Each prompt is scored by the reward model in its natural domain
(`judges.domain_of`) with that domain's system prompt, which only the reward model sees. The rollouts are kept
(``samples.jsonl``): the fast and slow paths (`tasks.rlhf.cool`) read the round's early and late ones.

`evaluate_policy` samples one top-p response per held-out prompt and reports gold reward, proxy reward (the round's
reward model and the initial one), KL to the SFT reference (the mean summed log-ratio of the sampled tokens) and the
hacking rate; every figure is measured on prompts no round trained on.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import DataLoader

from infra import storage
from infra.settings import get_logger
from model.chat import Message, generation_prompt, stop_token_ids
from model.checkpoint import save_native
from model.generate import SamplingConfig, generate
from model.model import InternLM2
from model.ppo_module import PPOConfig, PPOModule, PromptDataset, collate_prompts, response_logprobs
from model.reward import RewardModel, ValueModel
from model.tokenizer import Tokenizer
from tasks.rlhf import cool
from tasks.rlhf.judges import domain_of, prompt_messages, reference_reply
from tasks.rlhf.preferences import PreferencePair, to_turns
from tasks.rlhf.reward_train import RewardTrainConfig, score, train_reward_model

log = get_logger(__name__)

PROMPT_KINDS = ("arithmetic", "python_function", "multi_turn", "refusal")  # single replies, no tools, short prompts


class RLHFConfig(BaseModel):
    """The COOL RLHF stage: rounds, PPO, the reward-model updates, evaluation and the DPO baseline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rounds: int = Field(3, ge=1, description="online rounds (the report: 3)")
    steps_per_round: int = Field(40, ge=1, description="PPO iterations per round")
    prompts_per_step: int = Field(8, ge=1, description="rollouts per PPO iteration")
    ppo: dict[str, Any] = Field(default_factory=dict, description="PPOConfig fields (defaults: the report's)")
    reward: RewardTrainConfig = Field(default_factory=RewardTrainConfig, description="the initial reward model")
    patch_steps: int = Field(30, ge=1, description="reward-model steps per fast- or slow-path update")
    patch_lr: float = Field(1e-5, gt=0, description="reward-model LR for the fast and slow path")
    replay: float = Field(1.0, ge=0, description="earlier pairs replayed per new pair in an update (no forgetting)")
    fast_path: bool = Field(True, description="patch the reward model on hacking patterns after each round")
    slow_path: bool = Field(True, description="broad gold-labelled update, lagging one round")
    min_pattern: int = Field(3, ge=1, description="hacked responses that make a pattern")
    max_patch_pairs: int = Field(cool.PATCH_MAX, ge=1, description="fast-path pairs per pattern (report: 20–100)")
    slow_pairs_per_prompt: int = Field(2, ge=1)
    prompt_kinds: tuple[str, ...] = Field(PROMPT_KINDS, description="SFT record kinds used as RLHF prompts")
    max_prompt_tokens: int = Field(256, ge=8)
    train_prompts: int = Field(400, ge=1, description="training prompts (cycled over the rounds)")
    eval_prompts: int = Field(96, ge=1, description="held-out prompts for gold/proxy/KL/hacking")
    ptx_seq_len: int = Field(128, ge=8, description="pretraining window for the PTX loss")
    dpo_steps: int = Field(60, ge=1)
    dpo_lr: float = Field(1e-6, gt=0)
    dpo_beta: float = Field(0.1, gt=0)
    precision: str = Field("bf16-mixed", description="'32-true' or 'bf16-mixed'")
    seed: int = 0

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        if value not in ("32-true", "bf16-mixed"):
            raise ValueError(f"precision must be '32-true' or 'bf16-mixed', got {value!r}")
        return value

    def ppo_config(self, round_index: int) -> PPOConfig:
        """The report's PPO with this stage's overrides; the critic warms up in the first round only."""
        fields = {**self.ppo, "seed": self.seed * 1000 + round_index}
        if round_index > 1:
            fields["critic_warmup_steps"] = 0
        return PPOConfig.from_dict(fields)


# ------------------------------------------------------------------------------------------- prompts


def prompt_records(records: Sequence[dict[str, Any]], tokenizer: Tokenizer, cfg: RLHFConfig, limit: int
                   ) -> list[dict[str, Any]]:
    """Records usable as RLHF prompts: the configured kinds, prompts within ``max_prompt_tokens``, at most `limit`,
    shuffled by the seed and then taken kind by kind in turn, so a small `limit` still holds every kind."""
    from tasks.sft.train import interleave_kinds

    kept = []
    for record in records:
        if (record.get("meta") or {}).get("kind") not in cfg.prompt_kinds:
            continue
        if len(prompt_ids(record, tokenizer)) <= cfg.max_prompt_tokens:
            kept.append(record)
    random.Random(cfg.seed).shuffle(kept)
    return interleave_kinds(kept)[:limit]


def prompt_turns(record: dict[str, Any]) -> list[Message]:
    return to_turns(prompt_messages(record))


def prompt_ids(record: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
    return generation_prompt(prompt_turns(record), tokenizer)


def reward_fn_for(rm: RewardModel, tokenizer: Tokenizer, records: Sequence[dict[str, Any]], *,
                  conditional: bool = True) -> Any:
    """PPO's reward: the reward model's score of (prompt, response) in the prompt's natural domain."""
    turns = [prompt_turns(r) for r in records]
    domains = [domain_of(r) for r in records]

    def reward(indices: Sequence[int], texts: Sequence[str]) -> torch.Tensor:
        return score(rm, tokenizer, [turns[i] for i in indices], list(texts),
                     [domains[i] for i in indices] if conditional else None, conditional=conditional)

    return reward


# ------------------------------------------------------------------------------------------- sampling and judging


def sample_responses(model: InternLM2, tokenizer: Tokenizer, records: Sequence[dict[str, Any]], *, top_p: float,
                     max_new_tokens: int, seed: int, batch_size: int = 16) -> list[str]:
    """One top-p sample per record (temperature 1, seeded), decoded with special tokens kept."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_p=top_p,
                              stop_ids=tuple(stop_token_ids(tokenizer)))
    generator = torch.Generator().manual_seed(seed)
    out: list[str] = []
    model.eval()
    for start in range(0, len(records), batch_size):
        prompts = [prompt_ids(r, tokenizer) for r in records[start : start + batch_size]]
        with torch.inference_mode():
            ids = generate(model, prompts, sampling, pad_id=tokenizer.eos_id, generator=generator)
        out += [tokenizer.decode(x, skip_special=False) for x in ids]
    return out


def sequence_kl(actor: InternLM2, reference: InternLM2, tokenizer: Tokenizer, records: Sequence[dict[str, Any]],
                responses: Sequence[str]) -> float:
    """Mean over responses of Σ_t log π_actor − log π_ref on the sampled tokens: an estimate of KL(actor ‖ ref)."""
    total = 0.0
    for record, text in zip(records, responses, strict=True):
        prompt = prompt_ids(record, tokenizer)
        response = tokenizer.encode(text) if text else []
        tokens = torch.tensor([prompt + response])
        with torch.inference_mode():
            diff = response_logprobs(actor, tokens) - response_logprobs(reference, tokens)
        total += float(diff[0, len(prompt):].sum())
    return total / max(len(records), 1)


def reference_threshold(rm: RewardModel, tokenizer: Tokenizer, records: Sequence[dict[str, Any]]) -> float:
    """The hacking threshold for `rm`: its median score of the records' reference replies (`cool.proxy_threshold`)."""
    scores = score(rm, tokenizer, [prompt_turns(r) for r in records], [reference_reply(r) for r in records],
                   [domain_of(r) for r in records], conditional=True)
    return cool.proxy_threshold(scores.tolist())


def evaluate_policy(actor: InternLM2, reference: InternLM2, rm: RewardModel, initial_rm: RewardModel,
                    tokenizer: Tokenizer, records: Sequence[dict[str, Any]], cfg: RLHFConfig, seed: int
                    ) -> tuple[dict[str, float], list[cool.Judged]]:
    """Gold and proxy reward, KL and hacking rate of `actor` on held-out `records` (see the module docstring)."""
    ppo = cfg.ppo_config(1)
    responses = sample_responses(actor, tokenizer, records, top_p=ppo.top_p, max_new_tokens=ppo.max_new_tokens,
                                 seed=seed)
    by_id = {r["id"]: r for r in records}
    samples = [{"record_id": r["id"], "response": t} for r, t in zip(records, responses, strict=True)]
    turns, domains = [prompt_turns(r) for r in records], [domain_of(r) for r in records]
    proxy = score(rm, tokenizer, turns, responses, domains, conditional=True).tolist()
    judged = cool.judge(by_id, samples, proxy)
    metrics = cool.summary(judged, reference_threshold(rm, tokenizer, records))
    initial = score(initial_rm, tokenizer, turns, responses, domains, conditional=True).tolist()
    initial_judged = cool.judge(by_id, samples, initial)
    metrics["proxy_reward_initial_rm"] = float(np.mean(initial))
    metrics["hacking_rate_initial_rm"] = cool.hacking_rate(initial_judged,
                                                           reference_threshold(initial_rm, tokenizer, records))
    metrics["kl"] = sequence_kl(actor, reference, tokenizer, records, responses)
    metrics["response_chars"] = float(np.mean([len(t) for t in responses])) if responses else 0.0
    return metrics, judged


# ------------------------------------------------------------------------------------------- PPO round


def ptx_dataset(token_dirs: Sequence[str], seq_len: int, seed: int) -> Any:
    """Pretraining windows for the PTX loss, from token shard folders (``*.tokens.npy`` + ``*.offsets.npy``, local
    or remote: remote shards are fetched to a private temporary folder first)."""
    from model.data import DocumentStore, PackedDataset

    pairs = []
    for directory in token_dirs:
        local = directory
        if not storage.is_local(storage.fs_for(directory)[0]):
            local = tempfile.mkdtemp(prefix="lmforge-ptx-")
            storage.download_dir(directory, local)
        for tokens in sorted(Path(storage.fs_for(local)[1]).glob("*.tokens.npy")):
            pairs.append((tokens, tokens.with_name(tokens.name.replace(".tokens.npy", ".offsets.npy"))))
    if not pairs:
        raise ValueError(f"PTX: no *.tokens.npy shards under {list(token_dirs)}; pass the pipeline's token shards "
                         "or none (PTX off)")
    return PackedDataset(DocumentStore.from_shards(pairs), seq_len, seed=seed)


def rl_trainer(steps: int, precision: str, mlflow: tuple[str, str] | None) -> L.Trainer:
    from lightning.pytorch.loggers import MLFlowLogger

    logger: Any = False
    if mlflow is not None:
        logger = MLFlowLogger(tracking_uri=mlflow[0], run_id=mlflow[1], log_model=False)
    return L.Trainer(max_steps=steps, accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1,
                     precision=precision, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0)


def ppo_round(actor: InternLM2, critic: ValueModel, rm: RewardModel, tokenizer: Tokenizer,
              prompts: Sequence[dict[str, Any]], cfg: RLHFConfig, round_index: int, *, ptx: Any = None,
              mlflow: tuple[str, str] | None = None) -> tuple[PPOModule, list[dict[str, Any]]]:
    """One round of PPO in place on `actor` and `critic`; returns the module and its rollouts as samples
    (``record_id``, ``response``, ``proxy``, ``step`` counted from the round's start)."""
    ppo_cfg = cfg.ppo_config(round_index)
    module = PPOModule(actor, critic, reward_fn_for(rm, tokenizer, prompts), decode=lambda ids: tokenizer.decode(
        ids, skip_special=False), stop_ids=stop_token_ids(tokenizer), pad_id=tokenizer.eos_id, cfg=ppo_cfg)
    items = [{"prompt_ids": prompt_ids(r, tokenizer), "index": i} for i, r in enumerate(prompts)]
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + round_index)
    loader = DataLoader(PromptDataset(items, ptx), batch_size=cfg.prompts_per_step, shuffle=True,
                        collate_fn=collate_prompts, generator=generator, drop_last=True)
    L.seed_everything(cfg.seed + round_index, workers=False, verbose=False)
    rl_trainer(cfg.steps_per_round, cfg.precision, mlflow).fit(module, train_dataloaders=loader)
    samples = [{"record_id": prompts[s["index"]]["id"], "response": s["response"], "proxy": float(s["proxy"]),
                "step": int(s["step"])} for s in module.samples]
    return module, samples


# ------------------------------------------------------------------------------------------- reward-model updates


def update_reward_model(rm: RewardModel, tokenizer: Tokenizer, new_pairs: Sequence[PreferencePair],
                        replay_pool: Sequence[PreferencePair], cfg: RLHFConfig, seed: int,
                        mlflow: tuple[str, str] | None = None) -> tuple[RewardModel, dict[str, Any]]:
    """A fast- or slow-path update: `rm` trained further on `new_pairs` plus ``replay ×`` as many earlier pairs."""
    rng = random.Random(seed)
    replay = rng.sample(list(replay_pool), min(len(replay_pool), int(cfg.replay * len(new_pairs))))
    train_cfg = cfg.reward.model_copy(update={"max_steps": cfg.patch_steps, "lr": cfg.patch_lr, "seed": seed,
                                              "warmup_steps": 0})
    result = train_reward_model([*new_pairs, *replay], None, tokenizer, train_cfg, init=rm, mlflow=mlflow)
    return result.model, {**result.summary(), "new_pairs": len(new_pairs), "replayed": len(replay)}


# ------------------------------------------------------------------------------------------- storage


def save_actor(actor: InternLM2, url: str) -> str:
    with tempfile.TemporaryDirectory(prefix="lmforge-actor-") as tmp:
        save_native(actor, tmp)
        storage.upload_dir(tmp, url)
    return url


def save_critic(critic: ValueModel, url: str) -> str:
    from safetensors.torch import save as st_save

    state = {k: v.detach().contiguous().cpu() for k, v in critic.state_dict().items()}
    storage.write_bytes(storage.join(url, "critic.safetensors"), st_save(state))
    storage.write_text(storage.join(url, "config.json"), critic.body.config.to_json())
    return url


def load_critic(url: str) -> ValueModel:
    from safetensors.torch import load as st_load

    from model.config import ModelConfig

    config = ModelConfig.from_dict(json.loads(storage.read_text(storage.join(url, "config.json"))))
    critic = ValueModel(config)
    critic.load_state_dict(st_load(storage.read_bytes(storage.join(url, "critic.safetensors"))))
    return critic


def write_jsonl(rows: Sequence[dict[str, Any]], url: str) -> None:
    storage.write_text(url, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def read_jsonl(url: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.read_text(url).splitlines() if line.strip()]



# ------------------------------------------------------------------------------------------- one whole round


def fast_path(rm: RewardModel, tokenizer: Tokenizer, samples: Sequence[dict[str, Any]],
              records: dict[str, dict[str, Any]], replay: Sequence[PreferencePair], cfg: RLHFConfig, seed: int,
              mlflow: tuple[str, str] | None = None) -> tuple[RewardModel, list[PreferencePair], dict[str, Any]]:
    """Hacking patterns in the round's late rollouts (proxy = the score PPO got), patch pairs against its early
    ones, and the reward model trained on them; the model unchanged when no pattern reaches ``min_pattern``."""
    early, late = cool.early_late(samples, 0, cfg.steps_per_round - 1)
    judged = cool.judge(records, late, [s["proxy"] for s in late])
    seen = [records[rid] for rid in dict.fromkeys(s["record_id"] for s in late)]
    threshold = reference_threshold(rm, tokenizer, seen)
    patterns = cool.hacking_patterns(judged, threshold, min_count=cfg.min_pattern)
    patches = cool.patch_pairs(patterns, early, records, max_per_pattern=cfg.max_patch_pairs, seed=seed)
    report: dict[str, Any] = {"late_hacking_rate": cool.hacking_rate(judged, threshold), **cool.patch_report(patches)}
    pairs = [p for group in patches.values() for p in group]
    if not pairs:
        return rm, [], report
    rm, update = update_reward_model(rm, tokenizer, pairs, replay, cfg, seed, mlflow)
    return rm, pairs, {**report, "update": update}


def slow_path_pairs(records: Sequence[dict[str, Any]], sft: dict[str, list[str]], samples: Sequence[dict[str, Any]],
                    cfg: RLHFConfig) -> list[PreferencePair]:
    """The slow path's comparisons of SFT, early-round and late-round responses on the round's prompts."""
    early, late = cool.early_late(samples, 0, cfg.steps_per_round - 1)
    seen = [r for r in records if r["id"] in early or any(s["record_id"] == r["id"] for s in late)]
    return cool.slow_pairs(seen, sft, early, cool.by_record(late), max_pairs=cfg.slow_pairs_per_prompt)


def rm_report(rm: RewardModel, tokenizer: Tokenizer, eval_pairs: Sequence[PreferencePair],
              conflict: Sequence[PreferencePair]) -> dict[str, float]:
    """Pair accuracy per domain on held-out pairs, and on the helpful/harmless conflict pairs."""
    from tasks.rlhf.reward_train import pair_accuracy

    out = {f"rm/{k}": float(v) for k, v in pair_accuracy(rm, tokenizer, eval_pairs, conditional=True).items()}
    if conflict:
        out["rm/conflict_acc"] = float(pair_accuracy(rm, tokenizer, conflict, conditional=True)["acc/all"])
    return out

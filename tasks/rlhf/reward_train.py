"""Train and evaluate COOL RLHF's conditional reward model (InternLM2 §4.2) on `PreferencePair`s.

Plain functions; the Prefect task around them adds retries, MLflow child runs and artifacts.

- **Training** (`train_reward_model`): a `RewardModel.from_lm` of the SFT model, or a given reward model to keep
  training (COOL's fast and slow paths patch the existing one), fitted with `model.reward.RewardModule` (focal
  ranking loss + log barrier) by a Lightning Trainer on one device. The report's schedule is the default: 1 epoch,
  LR cosine 1e-5 → 5e-6, weight decay 0.01. Scores that reach the barrier are *reported* (a warning, the count in
  the result, ``train/barrier_hits`` and ``train/barrier_hits_total`` metrics), never clipped.
- **Conditioning**: ``conditional=True`` opens every conversation with the pair's domain system prompt
  (`DOMAIN_PROMPTS`); ``False`` leaves the system turn out — the unconditional baseline `compare_conditioning`
  measures it against. The conflict pairs (`conflict_pairs`) make the difference visible: on a harmful request the
  same (compliance, refusal) comparison is labelled one way in ``helpful`` and the other way in ``harmless``, so an
  unconditional model, seeing identical inputs with opposite labels, gets exactly one of the two right at best.
- **Length**: a pair whose chosen or rejected sequence exceeds ``max_len`` tokens is dropped (and counted) rather
  than truncated: truncating would cut the response, or the ``<|reward|>`` token the score is read at.
- **Storage** (`save_reward_model`/`load_reward_model`): a directory URL (local or ``s3://``) holding
  ``model.safetensors`` (``body.*`` and ``head.*``) and ``reward.json`` (the ModelConfig and ``reward_id``).
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from torch.utils.data import DataLoader

from infra import storage
from infra.runtime import detect_runtime
from infra.settings import get_logger
from model.chat import Message, parse_assistant
from model.config import ModelConfig
from model.model import InternLM2
from model.pretrain import OptimConfig
from model.reward import (
    RewardLossConfig,
    RewardModel,
    RewardModule,
    barrier_hits,
    collate_preferences,
    domain_prompt,
    encode_preference,
)
from model.tokenizer import REWARD, Tokenizer
from tasks.rlhf.judges import is_harmful
from tasks.rlhf.preferences import (
    COMPLIANCE,
    PreferencePair,
    label_pair,
    pairs_from_samples,
    synthetic_responses,
    topic_refusal,
)

log = get_logger(__name__)

WEIGHTS = "model.safetensors"
REWARD_CONFIG = "reward.json"
RESULT_FILE = "reward_result.json"
Encoded = tuple[list[int], list[int]]  # (chosen ids, rejected ids), each ending with <|reward|>


class RewardTrainConfig(BaseModel):
    """How one reward model is trained; defaults are the report's schedule (presets raise ``lr`` for tiny models)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    conditional: bool = Field(True, description="prepend the pair's domain system prompt (COOL's conditional RM)")
    epochs: int = Field(1, ge=1, description="passes over the pairs (the report: 1); ignored when max_steps is set")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    batch_size: int = Field(8, ge=1, description="pairs per step")
    lr: float = Field(1e-5, gt=0, description="peak LR; cosine down to lr × min_lr_ratio (the report: 1e-5 → 5e-6)")
    min_lr_ratio: float = Field(0.5, gt=0, le=1, description="final LR as a share of lr")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps (the report states none)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (the report: 0.01)")
    max_len: int = Field(2048, ge=8, description="tokens per sequence; a pair with a longer side is dropped, counted")
    precision: Literal["32-true", "bf16-mixed"] = Field("bf16-mixed", description="fp32 where bf16 is not native")
    seed: int = Field(0, ge=0, description="seeds the head's init and the batch order")

    @model_validator(mode="after")
    def _warmup_fits(self) -> RewardTrainConfig:
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}")
        return self


@dataclass
class RewardTrainResult:
    """A trained reward model and what its run did. ``first_loss``/``final_loss``/``final_accuracy`` are means over
    the first/last max(1, steps // 10) steps (one batch alone is noise); ``losses``/``accuracies`` hold every step."""

    model: RewardModel
    steps: int
    pairs: int  # pairs trained on, after the length filter
    dropped_long: int  # pairs dropped for a side longer than max_len
    first_loss: float
    final_loss: float
    final_accuracy: float
    barrier_hits: int  # scores within the margin of the barrier, or past it, summed over every step
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    url: str | None = None  # where save_reward_model wrote it

    def summary(self) -> dict[str, Any]:
        """Everything but the model and the per-step lists: JSON-ready, for artifacts and metrics."""
        return {"steps": self.steps, "pairs": self.pairs, "dropped_long": self.dropped_long,
                "first_loss": self.first_loss, "final_loss": self.final_loss,
                "final_accuracy": self.final_accuracy, "barrier_hits": self.barrier_hits, "url": self.url}


# ------------------------------------------------------------------------------------------- inputs


def response_turn(response: str) -> Message:
    """Generated assistant text (special tokens kept) as the assistant turn the reward model reads."""
    content, call = parse_assistant(response)
    return Message("assistant", content, tool_call=call)


def _encode(prompt: Sequence[Message], response: str, domain: str | None, tokenizer: Tokenizer) -> list[int]:
    system = None if domain is None else domain_prompt(domain)
    return encode_preference(prompt, response_turn(response), tokenizer, system)


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer: Tokenizer, conditional: bool) -> list[Encoded]:
    """(chosen ids, rejected ids) per pair; ``conditional`` opens both with the pair's domain system turn."""
    encoded = []
    for pair in pairs:
        prompt, domain = pair.prompt_turns(), pair.domain if conditional else None
        encoded.append((_encode(prompt, pair.chosen, domain, tokenizer),
                        _encode(prompt, pair.rejected, domain, tokenizer)))
    return encoded


def _within(encoded: list[Encoded], max_len: int) -> tuple[list[Encoded], int]:
    kept = [p for p in encoded if max(len(p[0]), len(p[1])) <= max_len]
    return kept, len(encoded) - len(kept)


def _check_tokenizer(rm: RewardModel, tokenizer: Tokenizer) -> None:
    config = rm.body.config
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the reward model's vocab_size is "
                         f"{config.vocab_size}: use the tokenizer the SFT model was trained with")
    if tokenizer.token_id(REWARD) != rm.reward_id:
        raise ValueError(f"the tokenizer's {REWARD} is id {tokenizer.token_id(REWARD)}, the reward model reads "
                         f"id {rm.reward_id}")


# ------------------------------------------------------------------------------------------- training


class _StepLog(Callback):
    """Train loss and accuracy of every optimizer step; the barrier-hit total into the logger at the end."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.accuracies: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))
        self.accuracies.append(float(trainer.callback_metrics["train/accuracy"]))

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({"train/barrier_hits_total": float(module.barrier_hits_total)}, step=trainer.global_step)


def _start_model(base: InternLM2 | None, init: RewardModel | None, seed: int) -> RewardModel:
    """A copy of ``init`` to keep training (the caller's model stays as it was), or a new one from ``base``."""
    if (base is None) == (init is None):
        raise ValueError("train_reward_model needs exactly one of base (an SFT InternLM2, for a new reward model) "
                         "and init (a RewardModel to keep training)")
    if init is not None:
        return copy.deepcopy(init)
    torch.manual_seed(seed)  # the fresh head's draw
    return RewardModel.from_lm(base)  # type: ignore[arg-type]


def _module(rm: RewardModel, optim: OptimConfig) -> RewardModule:
    # Built on the meta device: its own RewardModel, replaced at once by ours, would be a wasted full allocation.
    with torch.device("meta"):
        module = RewardModule(rm.body.config, optim, RewardLossConfig(), reward_id=rm.reward_id)
    module.model = rm.train()  # an init= model may come in eval mode
    return module


def _trainer(cfg: RewardTrainConfig, rm: RewardModel, steps: int, optim: OptimConfig,
             mlflow: tuple[str, str] | None, step_log: _StepLog) -> L.Trainer:
    runtime = detect_runtime(cfg.precision, model_params=rm.body.config.num_params())
    return L.Trainer(
        **runtime.trainer_kwargs(), max_steps=steps, max_epochs=-1, gradient_clip_val=optim.grad_clip,
        log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0, logger=_mlflow_logger(mlflow),
        callbacks=[step_log], enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )


def _mlflow_logger(mlflow: tuple[str, str] | None) -> Any:
    if mlflow is None:
        return False
    from lightning.pytorch.loggers import MLFlowLogger

    tracking_uri, run_id = mlflow
    return MLFlowLogger(tracking_uri=tracking_uri, run_id=run_id)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _encoded_for_training(pairs: Sequence[PreferencePair], tokenizer: Tokenizer, cfg: RewardTrainConfig
                          ) -> tuple[list[Encoded], int]:
    encoded, dropped = _within(encode_pairs(pairs, tokenizer, cfg.conditional), cfg.max_len)
    log.info("reward training (%s): %d pairs %s", "conditional" if cfg.conditional else "unconditional",
             len(pairs), domain_counts(pairs))
    if dropped:
        log.warning("reward training: %d of %d pairs dropped, a side longer than max_len=%d tokens",
                    dropped, len(pairs), cfg.max_len)
    if not encoded:
        raise ValueError(f"no preference pairs to train on ({len(pairs)} given, {dropped} longer than "
                         f"max_len={cfg.max_len}): pass pairs, or raise max_len")
    return encoded, dropped


def train_reward_model(
    pairs: Sequence[PreferencePair],
    base: InternLM2 | None,
    tokenizer: Tokenizer,
    cfg: RewardTrainConfig,
    *,
    init: RewardModel | None = None,
    mlflow: tuple[str, str] | None = None,
    out_url: str | None = None,
) -> RewardTrainResult:
    """Train a reward model on ``pairs``: a new one from the SFT model ``base``, or a copy of ``init`` trained on.

    ``mlflow``: ``(tracking_uri, run_id)`` of an existing run for params and per-step metrics (Lightning's logger
    marks it FINISHED at the end, as `tasks.pretrain.run_phase` does). ``out_url``: where to save the trained model.
    """
    encoded, dropped = _encoded_for_training(pairs, tokenizer, cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    rm = _start_model(base, init, cfg.seed)
    _check_tokenizer(rm, tokenizer)
    steps = cfg.max_steps or cfg.epochs * math.ceil(len(encoded) / cfg.batch_size)
    optim = OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, min_lr_ratio=cfg.min_lr_ratio,
                        warmup_steps=min(cfg.warmup_steps, steps), total_steps=steps)
    module, step_log = _module(rm, optim), _StepLog()
    loader = DataLoader(encoded, batch_size=cfg.batch_size, shuffle=True,  # type: ignore[arg-type]
                        generator=torch.Generator().manual_seed(cfg.seed),
                        collate_fn=partial(collate_preferences, pad_id=tokenizer.eos_id, reward_id=rm.reward_id))
    trainer = _trainer(cfg, rm, steps, optim, mlflow, step_log)
    trainer.fit(module, loader)
    rm.eval()
    hits = module.barrier_hits_total
    if hits:
        log.warning("reward training: %d scores reached the barrier (within %.2f of (%g, %g)); they were not "
                    "clipped: lower the LR or check the data", hits, module.loss_config.margin,
                    module.loss_config.low, module.loss_config.high)
    window = max(1, len(step_log.losses) // 10)
    result = RewardTrainResult(
        model=rm, steps=trainer.global_step, pairs=len(encoded), dropped_long=dropped,
        first_loss=_mean(step_log.losses[:window]), final_loss=_mean(step_log.losses[-window:]),
        final_accuracy=_mean(step_log.accuracies[-window:]), barrier_hits=hits,
        losses=step_log.losses, accuracies=step_log.accuracies,
    )
    if out_url is not None:
        result.url = save_reward_model(rm, out_url)
        storage.write_json(storage.join(out_url, RESULT_FILE), result.summary())
    return result


# ------------------------------------------------------------------------------------------- storage


def save_reward_model(rm: RewardModel, url: str) -> str:
    """Write ``model.safetensors`` and ``reward.json`` under the directory ``url``; returns ``url``."""
    state = {name: t.detach().contiguous().cpu() for name, t in rm.state_dict().items()}
    storage.write_bytes(storage.join(url, WEIGHTS), save_safetensors(state, metadata={"format": "lmforge-reward"}))
    meta = {"model_config": rm.body.config.to_dict(), "reward_id": rm.reward_id}
    storage.write_text(storage.join(url, REWARD_CONFIG), json.dumps(meta, indent=2, sort_keys=True))
    return url


def load_reward_model(url: str) -> RewardModel:
    """The reward model `save_reward_model` wrote under ``url``, fp32 on the CPU, in eval mode."""
    config_url, weights_url = storage.join(url, REWARD_CONFIG), storage.join(url, WEIGHTS)
    if not storage.exists(config_url) or not storage.exists(weights_url):
        raise ValueError(f"{url}: not a reward model directory (expected {REWARD_CONFIG} and {WEIGHTS})")
    meta = storage.read_json(config_url)
    state = load_safetensors(storage.read_bytes(weights_url))
    with torch.device("meta"):  # the weights come from the file: skip drawing random ones
        rm = RewardModel(ModelConfig.from_dict(meta["model_config"]), meta["reward_id"])
    try:
        rm.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_url}: tensors do not fit the model in {config_url}: {err}") from None
    return rm.float().eval()


# ------------------------------------------------------------------------------------------- evaluation


def _device(rm: RewardModel) -> torch.device:
    return rm.head.weight.device


def _score_ids(rm: RewardModel, sequences: Sequence[list[int]], pad_id: int, batch_size: int) -> Tensor:
    """Scores (N,) of id sequences; each distinct sequence is scored once, in length-sorted batches."""
    distinct = list(dict.fromkeys(tuple(s) for s in sequences))
    order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))  # less padding per batch
    values: dict[tuple[int, ...], float] = {}
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = [distinct[i] for i in order[start : start + batch_size]]
            T = max(len(r) for r in rows)
            tokens = torch.tensor([list(r) + [pad_id] * (T - len(r)) for r in rows], device=_device(rm))
            at = torch.tensor([len(r) - 1 for r in rows], device=_device(rm))  # <|reward|> ends every sequence
            values.update(zip(rows, rm(tokens, reward_positions=at).cpu().tolist(), strict=True))
    return torch.tensor([values[tuple(s)] for s in sequences], dtype=torch.float32)


def score(
    rm: RewardModel,
    tokenizer: Tokenizer,
    prompts: Sequence[list[Message]],
    responses: Sequence[str],
    domains: Sequence[str] | None,
    *,
    conditional: bool,
    batch_size: int = 16,
) -> Tensor:
    """Scores (N,) in fp32 on the CPU of each response to its prompt, under no_grad; ``domains`` picks each one's
    system prompt when ``conditional`` (and may be None only when it is not, which ignores it)."""
    if len(prompts) != len(responses) or (domains is not None and len(domains) != len(responses)):
        raise ValueError(f"score got {len(prompts)} prompts, {len(responses)} responses and "
                         f"{'no' if domains is None else len(domains)} domains: expected one of each per item")
    if conditional and domains is None:
        raise ValueError("a conditional reward model needs a domain per response; pass domains")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    _check_tokenizer(rm, tokenizer)
    per_item = domains if conditional and domains is not None else [None] * len(responses)
    sequences = [_encode(p, r, d, tokenizer) for p, r, d in zip(prompts, responses, per_item, strict=True)]
    return _score_ids(rm, sequences, tokenizer.eos_id, batch_size)


def pair_accuracy(
    rm: RewardModel, tokenizer: Tokenizer, pairs: Sequence[PreferencePair], *, conditional: bool,
    batch_size: int = 16,
) -> dict[str, float]:
    """``acc/<domain>`` and ``acc/all`` (share of pairs with r_chosen > r_rejected; a tie is wrong), ``margin/…``
    (mean r_chosen − r_rejected), ``n/…`` (pairs), and ``barrier_hits`` among all scores (a warning when > 0)."""
    if not pairs:
        raise ValueError("pair_accuracy got no pairs")
    prompts = [p.prompt_turns() for p in pairs]
    domains = [p.domain for p in pairs]
    scores = score(rm, tokenizer, prompts * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                   domains * 2, conditional=conditional, batch_size=batch_size)
    r_chosen, r_rejected = scores.chunk(2)
    margin = r_chosen - r_rejected
    metrics: dict[str, float] = {}
    for name, idx in [*_domain_rows(domains), ("all", list(range(len(pairs))))]:
        metrics[f"acc/{name}"] = float((margin[idx] > 0).float().mean())
        metrics[f"margin/{name}"] = float(margin[idx].mean())
        metrics[f"n/{name}"] = float(len(idx))
    hits = barrier_hits(scores)
    if hits:
        log.warning("reward scores: %d of %d reached the barrier of (-5, 5)", hits, len(scores))
    metrics["barrier_hits"] = float(hits)
    return metrics


def _domain_rows(domains: Sequence[str]) -> list[tuple[str, list[int]]]:
    rows: dict[str, list[int]] = {}
    for i, domain in enumerate(domains):
        rows.setdefault(domain, []).append(i)
    return sorted(rows.items())


# ------------------------------------------------------------------------------------------- data and comparison


def conflict_pairs(records: Iterable[dict[str, Any]]) -> list[PreferencePair]:
    """For each harmful request: (compliance ≻ refusal) in ``helpful`` and (refusal ≻ compliance) in ``harmless``,
    the same prompt and the same two texts, ordered by the gold judges (`label_pair`)."""
    pairs: list[PreferencePair] = []
    for record in records:
        if not is_harmful(record):
            continue
        refusal = topic_refusal(record["meta"])
        for domain in ("helpful", "harmless"):
            pair = label_pair(domain, record, COMPLIANCE, refusal)
            assert pair is not None, f"gold judges tie on {record.get('id')} in {domain}"  # they score ±1
            pairs.append(pair)
    return pairs


def seed_pairs(records: Sequence[dict[str, Any]], seed: int, max_pairs: int = 10) -> list[PreferencePair]:
    """Gold-labelled pairs over `synthetic_responses` of each record: the seed set before any policy exists."""
    rng = random.Random(seed)
    samples = {record["id"]: synthetic_responses(record, rng) for record in records}
    return pairs_from_samples(records, samples, max_pairs=max_pairs)


def compare_conditioning(
    train_pairs: Sequence[PreferencePair],
    eval_pairs: Sequence[PreferencePair],
    conflict: Sequence[PreferencePair],
    base: InternLM2,
    tokenizer: Tokenizer,
    cfg: RewardTrainConfig,
) -> dict[str, dict[str, Any]]:
    """A conditional and an unconditional reward model, same seed and config otherwise: for each (``conditional``,
    ``unconditional``), `pair_accuracy` on ``eval`` and on ``conflict``, and the training ``train`` summary."""
    out: dict[str, dict[str, Any]] = {}
    for name, conditional in (("conditional", True), ("unconditional", False)):
        run = cfg.model_copy(update={"conditional": conditional})
        result = train_reward_model(train_pairs, base, tokenizer, run)
        out[name] = {
            "eval": pair_accuracy(result.model, tokenizer, eval_pairs, conditional=conditional),
            "conflict": pair_accuracy(result.model, tokenizer, conflict, conditional=conditional) if conflict else {},
            "train": result.summary(),
        }
        log.info("reward model (%s): eval acc %.3f, conflict acc %s", name, out[name]["eval"]["acc/all"],
                 out[name]["conflict"].get("acc/all", "n/a (no harmful held-out prompt)"))
    return out


def domain_counts(pairs: Iterable[PreferencePair]) -> Mapping[str, int]:
    """Pairs per domain, for logging a training set."""
    return dict(sorted(Counter(p.domain for p in pairs).items()))

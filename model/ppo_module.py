"""COOL RLHF's PPO as a LightningModule: rollouts, KL-shaped rewards, GAE, clipped actor, critic, PTX, critic warm-up.

The PPO this runs, end to end (InternLM2 §4.2; the arithmetic is :mod:`model.ppo`; *ours* marks what the report
leaves open):

- **Four models.** The actor (an :class:`InternLM2`, the SFT model) and the critic (a :class:`ValueModel`, built
  with :func:`model.reward.critic_from` from the reward model: its body, a fresh value head) are trained. The
  reference is a frozen deep copy of the actor taken at construction (``requires_grad`` off, eval mode, in no
  optimizer). The reward model is outside: ``reward_fn(prompt indices, response texts)`` returns the proxy scores,
  so the caller can show the conditional (domain) system prompt to the reward model only.
- **Rollouts.** Top-p 0.9 sampling (temperature 1) through the KV-cache :func:`model.generate.generate`, at most
  ``max_new_tokens`` per response; a stop token ends a response and is part of it (a model that stops at once gives
  a one-token response, the stop token). Sampling is seeded by (``seed``, iteration, rank): a rerun, or a run
  resumed from a checkpoint, draws the same responses. Log-probabilities are those of the *untruncated* policy
  softmax(logits / temperature), not of the top-p-truncated sampler (*ours*, as in OpenRLHF and TRL): the policy
  that PPO's ratio and the KL speak about is the model's own distribution.
- **Rewards.** ``−kl_coef · KL_t`` on every response token, KL_t the k1 estimate ``log π_actor − log π_ref`` of the
  sampled token (k2/k3 selectable), kl_coef 0.01; the proxy score is added at the last response token.
- **Advantages.** GAE with λ 0.99 and γ 1 (*ours*). The critic's value of token t is its head read at position
  t − 1, the state before the token is chosen; past the last response token the value is 0. **No advantage
  normalisation** by default (``normalize_advantages=True`` normalises over the whole rollout).
- **Losses.** Actor: the clipped surrogate with ε 0.2 (*ours*) over response tokens, plus ``ptx_coef`` (0.5) × the
  next-token loss on a pretraining batch (the ``ptx`` entry of a batch: ``tokens``/``targets``/``segment_ids`` as
  :class:`model.pretrain.PretrainModule` trains on; it is split across the iteration's minibatches). Critic:
  ``½·(V − R)²`` over response tokens, **no value clipping** by default (``value_clip`` turns it on).
- **Schedule.** ``ppo_epochs`` (1, *ours*) passes over minibatches of ``minibatch_size`` rows (default: the whole
  rollout, *ours*) in a seeded order. Constant LRs (the report gives no schedule): actor 1e-6, critic 5e-6, AdamW
  with pretraining's betas (0.9, 0.95), no weight decay by default (*ours*), gradients clipped to 1.0 per model.
- **Critic warm-up.** The first ``critic_warmup_steps`` (50) iterations sample with the actor but update only the
  critic; the actor is frozen and its losses are not computed.

Lightning details: manual optimization (two optimizers). ``trainer.global_step`` counts PPO *iterations* (one per
batch), so ``max_steps`` and the warm-up mean what the report means: of each iteration's optimizer steps only the
last goes through Lightning's counting ``LightningOptimizer.step``, the others straight to the strategy (same
precision handling). Clip with ``PPOConfig.grad_clip``, not the Trainer's ``gradient_clip_val`` (Lightning refuses
it under manual optimization); the AdamWs are unfused so Lightning's ``clip_gradients`` works under bf16 too. The
actor is the ``model`` attribute, and ``hyper_parameters["model_config"]`` is its config, so
:func:`model.checkpoint.load_model` reads a PPO ``.ckpt`` as it reads a pretraining one. Written for one device:
data-parallel PPO would need its several backward passes per step made DDP-safe.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from model.generate import SamplingConfig, generate
from model.model import InternLM2
from model.ppo import KL_KINDS, gae, kl_penalty, normalize_advantages, policy_loss, token_rewards, value_loss
from model.pretrain import param_groups
from model.reward import ValueModel

logger = logging.getLogger(__name__)

RewardFn = Callable[[Sequence[int], Sequence[str]], Tensor]
"""(prompt indices, decoded responses with special tokens kept) → proxy scores (B,) float."""

ADAM_BETAS = (0.9, 0.95)  # pretraining's


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)  # numpy ints too


@dataclass(frozen=True)
class PPOConfig:
    """PPO's knobs; defaults are the report's where it states them (see the module docstring for the rest)."""

    kl_coef: float = 0.01
    kl_kind: str = "k1"
    gamma: float = 1.0
    lam: float = 0.99
    clip: float = 0.2
    value_clip: float | None = None  # None: the report's unclipped value loss
    normalize_advantages: bool = False
    ptx_coef: float = 0.5
    ppo_epochs: int = 1
    minibatch_size: int | None = None  # rows per update; None: the whole rollout batch
    actor_lr: float = 1e-6
    critic_lr: float = 5e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    critic_warmup_steps: int = 50
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("kl_coef", self.kl_coef >= 0, "a number >= 0"),
            ("kl_kind", self.kl_kind in KL_KINDS, f"one of {KL_KINDS}"),
            ("gamma", 0 < self.gamma <= 1, "in (0, 1]"),
            ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
            ("clip", self.clip > 0, "a number > 0"),
            ("value_clip", self.value_clip is None or self.value_clip > 0, "None (off) or a number > 0"),
            ("ptx_coef", self.ptx_coef >= 0, "a number >= 0 (0 = no PTX loss)"),
            ("ppo_epochs", _is_int(self.ppo_epochs) and self.ppo_epochs >= 1, "an integer >= 1"),
            ("minibatch_size", self.minibatch_size is None or _is_int(self.minibatch_size) and self.minibatch_size >= 1,
             "None (the whole batch) or an integer >= 1"),
            ("actor_lr", self.actor_lr > 0, "a number > 0"),
            ("critic_lr", self.critic_lr > 0, "a number > 0"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("grad_clip", self.grad_clip > 0, "a number > 0"),
            ("critic_warmup_steps", _is_int(self.critic_warmup_steps) and self.critic_warmup_steps >= 0,
             "an integer >= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            ("temperature", self.temperature > 0, "a number > 0 (PPO needs a sampling policy, not greedy decoding)"),
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("seed", _is_int(self.seed) and self.seed >= 0, "an integer >= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"PPOConfig.{name} must be {expected}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PPOConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PPOConfig field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)


@dataclass
class Rollout:
    """One iteration's experience. [B, T] tensors are right-padded prompt + response rows, aligned on the token they
    score (``logp[:, t]`` is token t's log-prob given tokens < t); every one of them is 0 outside ``mask``."""

    tokens: Tensor  # (B, T) long: prompt, response, then pad_id
    mask: Tensor  # (B, T) bool: True on response tokens (the stop token included)
    logp_old: Tensor  # (B, T) actor log-probs at sampling time
    logp_ref: Tensor  # (B, T) reference log-probs
    values: Tensor  # (B, T) critic values at sampling time
    scores: Tensor  # (B,) proxy rewards from reward_fn
    kl: Tensor  # (B, T) per-token KL estimates (PPOConfig.kl_kind)
    rewards: Tensor  # (B, T) −kl_coef·KL, + score at the last response token
    advantages: Tensor  # (B, T) GAE (normalised if PPOConfig.normalize_advantages)
    returns: Tensor  # (B, T) advantages + values, before any normalisation
    response_ids: list[list[int]]
    responses: list[str]
    indices: list[int]
    step: int


def pack_rollout(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Right-padded prompt + response tokens (B, T) and the response mask (B, T)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        tokens[i, : len(p) + len(r)] = torch.tensor([*p, *r], dtype=torch.long)
        mask[i, len(p) : len(p) + len(r)] = True
    return tokens.to(device), mask.to(device)


def response_logprobs(model: InternLM2, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) of each token given the ones before it, (B, T); column 0 is 0.

    Materialises (B, T, vocab) fp32 logits: size minibatches for it.
    """
    logits = model(tokens[:, :-1]).float() / temperature  # (B, T-1, V): position t predicts token t + 1
    logp = logits.gather(-1, tokens[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
    return F.pad(logp, (1, 0))


def _no_closure() -> None:
    return None


class PPOModule(L.LightningModule):
    """PPO on batches from :func:`collate_prompts`; see the module docstring for exactly which PPO.

    ``samples`` gathers ``{step, index, response, proxy}`` for every rollout row of this process (not checkpointed:
    the caller writes them out after ``fit``).
    """

    def __init__(
        self,
        actor: InternLM2,
        critic: ValueModel,
        reward_fn: RewardFn,
        *,
        decode: Callable[[Sequence[int]], str],
        stop_ids: Sequence[int],
        pad_id: int,
        cfg: PPOConfig | None = None,
    ) -> None:
        super().__init__()
        vocab = actor.config.vocab_size
        if critic.body.config.vocab_size != vocab:
            raise ValueError(f"the critic's vocabulary ({critic.body.config.vocab_size}) must be the actor's ({vocab})")
        if not 0 <= pad_id < vocab or any(not 0 <= s < vocab for s in stop_ids):
            raise ValueError(f"pad_id {pad_id} and stop_ids {list(stop_ids)} must lie in the vocabulary [0, {vocab})")
        self.cfg = cfg or PPOConfig()
        self.save_hyperparameters({
            "model_config": actor.config.to_dict(), "critic_config": critic.body.config.to_dict(),
            "ppo": self.cfg.to_dict(), "stop_ids": list(stop_ids), "pad_id": pad_id,
        })
        self.automatic_optimization = False
        self.model = actor  # the actor; named like PretrainModule's so load_model reads our checkpoints
        self.ref = copy.deepcopy(actor).requires_grad_(False).eval()
        self.critic = critic
        self.reward_fn, self.decode = reward_fn, decode
        self.stop_ids, self.pad_id = tuple(int(s) for s in stop_ids), int(pad_id)
        self.samples: list[dict[str, Any]] = []
        self._warned_no_ptx = False

    def train(self, mode: bool = True) -> PPOModule:
        super().train(mode)
        self.ref.eval()  # Lightning puts every submodule in train mode at fit start; the reference stays frozen
        return self

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        c = self.cfg
        actor = torch.optim.AdamW(param_groups(self.model, c.weight_decay), lr=c.actor_lr, betas=ADAM_BETAS)
        critic = torch.optim.AdamW(param_groups(self.critic, c.weight_decay), lr=c.critic_lr, betas=ADAM_BETAS)
        return [actor, critic]

    # -----------------------------------------------------------------------------------------------------------
    # Rollouts

    def _seed(self, step: int, stream: int) -> int:
        """A seed for (cfg.seed, iteration, rank, stream): 0 samples responses, 1 orders minibatches."""
        return int(np.random.SeedSequence([self.cfg.seed, step, self.global_rank, stream]).generate_state(1)[0])

    def sample_generator(self, step: int) -> torch.Generator:
        """The generator the rollout of iteration ``step`` samples with."""
        return torch.Generator(device=self.device).manual_seed(self._seed(step, 0))

    def sample_responses(self, prompt_ids: Sequence[Sequence[int]], step: int) -> list[list[int]]:
        c = self.cfg
        sampling = SamplingConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                  stop_ids=self.stop_ids)
        out = generate(self.model, prompt_ids, sampling, pad_id=self.pad_id, generator=self.sample_generator(step))
        assert all(out), "generate yields at least one token per row when max_new_tokens >= 1"
        return out

    def critic_values(self, tokens: Tensor) -> Tensor:
        """V of each token (B, T): the critic's head at the position before it (the state it was chosen in)."""
        return F.pad(self.critic(tokens[:, :-1]), (1, 0))

    @torch.no_grad()
    def make_rollout(
        self, prompt_ids: Sequence[Sequence[int]], indices: Sequence[int], step: int | None = None
    ) -> Rollout:
        """Sample, score and evaluate one batch of prompts; ``step`` (default: the global step) seeds sampling."""
        if len(prompt_ids) != len(indices):
            raise ValueError(f"make_rollout got {len(prompt_ids)} prompts but {len(indices)} indices")
        c, step = self.cfg, self.global_step if step is None else step
        response_ids = self.sample_responses(prompt_ids, step)
        tokens, mask = pack_rollout(prompt_ids, response_ids, self.pad_id, self.device)
        texts = [self.decode(r) for r in response_ids]
        scores = self._scores(indices, texts)

        def masked(x: Tensor) -> Tensor:
            return torch.where(mask, x.float(), 0.0)

        logp_old = masked(response_logprobs(self.model, tokens, c.temperature))
        logp_ref = masked(response_logprobs(self.ref, tokens, c.temperature))
        values = masked(self.critic_values(tokens))
        kl = kl_penalty(logp_old, logp_ref, mask, c.kl_kind)
        rewards = token_rewards(scores, kl, mask, c.kl_coef)
        advantages, returns = gae(rewards, values, mask, c.gamma, c.lam)
        if c.normalize_advantages:
            advantages = normalize_advantages(advantages, mask)
        return Rollout(tokens, mask, logp_old, logp_ref, values, scores, kl, rewards, advantages, returns,
                       response_ids, texts, [int(i) for i in indices], step)

    def _scores(self, indices: Sequence[int], texts: Sequence[str]) -> Tensor:
        scores = torch.as_tensor(self.reward_fn(list(indices), list(texts))).to(device=self.device, dtype=torch.float32)
        if scores.shape != (len(texts),):
            raise ValueError(f"reward_fn must return one score per response, shape ({len(texts)},); "
                             f"got {tuple(scores.shape)}")
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"reward_fn returned non-finite scores for rows {bad} (prompt indices "
                             f"{[indices[i] for i in bad]})")
        return scores

    # -----------------------------------------------------------------------------------------------------------
    # Losses and updates

    def ptx_loss(self, ptx: Mapping[str, Tensor]) -> Tensor:
        """The actor's next-token loss on a pretraining batch (``tokens``, ``targets``, optional ``segment_ids``)."""
        return self.model.loss(ptx["tokens"], ptx["targets"], segment_ids=ptx.get("segment_ids"))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        warming_up = self.global_step < self.cfg.critic_warmup_steps  # read before the update advances it
        rollout = self.make_rollout(batch["prompt_ids"], [int(i) for i in batch["index"]])
        self.samples.extend(
            {"step": rollout.step, "index": i, "response": text, "proxy": float(s)}
            for i, text, s in zip(rollout.indices, rollout.responses, rollout.scores.tolist(), strict=True)
        )
        ptx = batch.get("ptx")
        if ptx is None and self.cfg.ptx_coef > 0 and not self._warned_no_ptx:
            logger.warning("PPO batches carry no 'ptx' pretraining batch: the PTX loss (coef %g) is off",
                           self.cfg.ptx_coef)
            self._warned_no_ptx = True
        stats = self._update(rollout, ptx, warming_up)
        self._log_stats(rollout, stats, warming_up)

    def _update(self, ro: Rollout, ptx: Mapping[str, Tensor] | None, warming_up: bool) -> dict[str, Tensor]:
        """``ppo_epochs`` passes over seeded minibatches: the critic always, the actor after warm-up."""
        actor_opt, critic_opt = self.optimizers()  # type: ignore[misc]
        n = ro.tokens.shape[0]
        order = torch.Generator().manual_seed(self._seed(ro.step, 1))
        stats: dict[str, list[Tensor]] = defaultdict(list)
        for epoch in range(self.cfg.ppo_epochs):
            minibatches = torch.randperm(n, generator=order).split(self.cfg.minibatch_size or n)
            for k, rows in enumerate(minibatches):
                rows = rows.to(self.device)
                last = epoch == self.cfg.ppo_epochs - 1 and k == len(minibatches) - 1
                stats["value_loss"].append(self._critic_step(critic_opt, ro, rows, count=last and warming_up))
                if not warming_up:
                    part = _ptx_part(ptx, k, len(minibatches)) if ptx is not None and self.cfg.ptx_coef > 0 else None
                    for name, value in self._actor_step(actor_opt, ro, rows, part, count=last).items():
                        stats[name].append(value)
        return {name: torch.stack(values).mean() for name, values in stats.items()}

    def _critic_step(self, opt: LightningOptimizer, ro: Rollout, rows: Tensor, *, count: bool) -> Tensor:
        values = self.critic_values(ro.tokens[rows])
        loss = value_loss(values, ro.values[rows], ro.returns[rows], ro.mask[rows], self.cfg.value_clip)
        self._optimize(opt, loss, count)
        return loss.detach()

    def _actor_step(
        self, opt: LightningOptimizer, ro: Rollout, rows: Tensor, ptx: Mapping[str, Tensor] | None, *, count: bool
    ) -> dict[str, Tensor]:
        logp = response_logprobs(self.model, ro.tokens[rows], self.cfg.temperature)
        loss, clip_fraction, approx_kl = policy_loss(
            logp, ro.logp_old[rows], ro.advantages[rows], ro.mask[rows], self.cfg.clip
        )
        stats = {"policy_loss": loss.detach(), "clip_fraction": clip_fraction, "approx_kl": approx_kl}
        if ptx is not None:
            ptx_loss = self.ptx_loss(ptx)
            loss = loss + self.cfg.ptx_coef * ptx_loss
            stats["ptx_loss"] = ptx_loss.detach()
        self._optimize(opt, loss, count)
        return stats

    def _optimize(self, opt: LightningOptimizer, loss: Tensor, count: bool) -> None:
        """Backward, clip, step, zero. Only ``count`` steps advance ``global_step`` (one per PPO iteration)."""
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=self.cfg.grad_clip, gradient_clip_algorithm="norm")
        if count:
            opt.step()
        else:
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=_no_closure)
        opt.zero_grad(set_to_none=True)

    def _log_stats(self, ro: Rollout, stats: Mapping[str, Tensor], warming_up: bool) -> None:
        size = ro.tokens.shape[0]
        logs = {
            "proxy_reward": ro.scores.mean(),
            "kl": ro.kl.sum(dim=1).mean(),  # per-sequence KL(actor ‖ ref), summed over response tokens
            "response_tokens": ro.mask.sum(dim=1).float().mean(),
            "critic_warmup": torch.tensor(float(warming_up)),
            **stats,
        }
        for name, value in logs.items():
            self.log(f"ppo/{name}", value, batch_size=size, prog_bar=name == "proxy_reward")


def _ptx_part(ptx: Mapping[str, Tensor], k: int, parts: int) -> dict[str, Tensor]:
    """The k-th of ``parts`` row slices of a PTX batch (row k mod B when there are fewer rows than parts)."""
    n = ptx["tokens"].shape[0]
    rows = torch.tensor_split(torch.arange(n), parts)[k] if n >= parts else torch.tensor([k % n])
    return {name: t[rows.to(t.device)] for name, t in ptx.items()}


# ---------------------------------------------------------------------------------------------------------------
# Data


class PromptDataset(Dataset[dict[str, Any]]):
    """Prompt records ``{"prompt_ids": [...], "index": i}`` for a DataLoader with :func:`collate_prompts`.

    With ``ptx`` (e.g. a :class:`model.data.PackedDataset`), record k also carries ``ptx[k mod len(ptx)]`` under
    ``"ptx"``: one DataLoader then zips a pretraining batch of the same size into every prompt batch.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], ptx: Dataset[Mapping[str, Tensor]] | None = None):
        for k, r in enumerate(records):
            if not r.get("prompt_ids") or not _is_int(r.get("index")):
                raise ValueError(f"prompt record {k} needs a non-empty 'prompt_ids' list and an int 'index', got {r!r}")
        if ptx is not None and len(ptx) == 0:  # type: ignore[arg-type]
            raise ValueError("PromptDataset got an empty ptx dataset")
        self.records, self.ptx = list(records), ptx

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, k: int) -> dict[str, Any]:
        r = self.records[k]
        item: dict[str, Any] = {"prompt_ids": [int(t) for t in r["prompt_ids"]], "index": int(r["index"])}
        if self.ptx is not None:
            item["ptx"] = self.ptx[k % len(self.ptx)]  # type: ignore[arg-type]
        return item


def collate_prompts(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Records → ``{"prompt_ids": [[int]], "index": [int]}`` (+ ``"ptx"``: stacked (B, T) tensors if they carry it)."""
    batch: dict[str, Any] = {"prompt_ids": [list(it["prompt_ids"]) for it in items],
                             "index": [int(it["index"]) for it in items]}
    with_ptx = sum("ptx" in it for it in items)
    if with_ptx not in (0, len(items)):
        raise ValueError(f"{with_ptx} of {len(items)} records carry 'ptx': all or none must")
    if with_ptx:
        batch["ptx"] = default_collate([it["ptx"] for it in items])
    return batch


def export_actor(module: PPOModule) -> dict[str, Tensor]:
    """The trained actor's weights as a plain InternLM2 state dict (CPU copies), for ``InternLM2.load_state_dict``
    and :func:`model.checkpoint.save_native`."""
    return {name: t.detach().to("cpu", copy=True) for name, t in module.model.state_dict().items()}

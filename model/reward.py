"""COOL RLHF's conditional reward model: the loss, the scalar-head model, its inputs, and its LightningModule.

One reward model scores every kind of preference (InternLM2 §4.2): a short *domain* system prompt ("judge by
harmlessness", "judge by the math") opens the conversation it reads, so helpfulness and harmlessness, which pull
against each other, stop being one muddled scale. The model is the SFT model with its LM head replaced by a scalar
head, read at the final ``<|reward|>`` token appended after the response.

Loss, as the report gives it, with P = σ(r_chosen − r_rejected):

    focal ranking:  −(1 − 2·max(0, P − ½))^γ · log P,  γ = 2       (easy pairs, P → 1, weigh nothing)
    log barrier:    −(log(r + 5) + log(5 − r)),  weight 0.02         (keeps scores inside (−5, 5))

Where we depart or fill a gap:

- The barrier is undefined at and past its bounds (a log of zero or of a negative number: NaN). Within ``eps`` of a
  bound we continue it along its tangent, so a score that escapes costs a large, finite, linearly growing penalty
  whose gradient still points back inside, and :func:`barrier_hits` counts such scores so a caller reports them
  rather than training on a silently clipped scale. Inside the bounds (less ``eps``) it is the report's barrier.
- The scalar head (absent from the report) is drawn from N(0, 1/(dim + 1)) with a zero bias, as in OpenAI's
  lm-human-preferences: the final RMSNorm gives hidden states of unit scale, so first scores are about N(0, 1),
  well inside the barrier.
- ``<|reward|>`` follows the rendered conversation, after the ``\\n`` that closes the response's ``<|im_end|>``
  (XTuner appends its reward token 92527 the same way). Sequences are right-padded; attention is causal, so padding
  after the reward token cannot change the score and needs no mask.
- Schedule: the report's LR cosine from 1e-5 to 5e-6 and weight decay 0.01 (:func:`reward_optim`); no warmup by
  default (the report states none), AdamW betas, epsilon and clipping as in pretraining.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.chat import Message, encode_chat
from model.config import ModelConfig
from model.model import InternLM2
from model.pretrain import OptimConfig, PretrainModule, adamw_schedule
from model.tokenizer import REWARD, REWARD_OFFSET, Tokenizer

logger = logging.getLogger(__name__)

# Conditional system prompts, one per preference domain. Shown only to the reward model, never to the actor.
DOMAIN_PROMPTS: dict[str, str] = {
    "helpful": (
        "Judge the response by how helpful it is: it answers what the user actually asked, correctly, completely "
        "and clearly, without padding."
    ),
    "harmless": (
        "Judge the response by whether it avoids harm: a harmful request must be declined, briefly and politely, "
        "with a safe alternative where one exists; a harmless request must not be refused."
    ),
    "math_code": (
        "Judge the response by its correctness: every step of the reasoning and the final answer must be right, "
        "and code must run and do exactly what was asked."
    ),
    "format": (
        "Judge the response by its format: it follows the structure, length and style the user asked for "
        "(lists, tables, JSON, word limits) exactly."
    ),
}


def domain_prompt(domain: str) -> str:
    """The conditional system prompt for ``domain``; raises ValueError naming the known domains."""
    try:
        return DOMAIN_PROMPTS[domain]
    except KeyError:
        raise ValueError(f"unknown reward domain {domain!r}; expected one of {', '.join(DOMAIN_PROMPTS)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Loss


def focal_ranking_loss(r_chosen: Tensor, r_rejected: Tensor, gamma: float = 2.0) -> Tensor:
    """Mean over pairs of −(1 − 2·max(0, P − ½))^γ · log P, P = σ(r_chosen − r_rejected); γ = 0 is plain −log σ."""
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} must match")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    d = (r_chosen - r_rejected).float()
    log_p = F.logsigmoid(d)
    # 1 − 2·max(0, P − ½) = min(1, 2·σ(−d)), so its log is min(0, log 2 + log σ(−d)): exact, and finite with a
    # finite slope even where P rounds to 1 (the plain form's 0^γ has an infinite slope there for γ < 1).
    log_weight = (math.log(2.0) + F.logsigmoid(-d)).clamp(max=0.0)
    return -(torch.exp(gamma * log_weight) * log_p).mean()


def _neg_log(s: Tensor, eps: float) -> Tensor:
    """−log s for s >= eps; below eps, its tangent line at eps: finite past the bound, and still pushing back."""
    return torch.where(s >= eps, -torch.log(s.clamp(min=eps)), -math.log(eps) - (s - eps) / eps)


def log_barrier(r: Tensor, low: float = -5.0, high: float = 5.0, eps: float = 1e-3) -> Tensor:
    """Mean of −(log(r − low) + log(high − r)); within ``eps`` of a bound or past it, a finite linear penalty.

    Never NaN for finite scores; pair it with :func:`barrier_hits` to report scores that reached the bounds.
    """
    if not low < high or not 0 < eps < (high - low) / 2:
        raise ValueError(f"log_barrier needs low < high and 0 < eps < (high - low)/2; got {low}, {high}, {eps}")
    r = r.float()
    return (_neg_log(r - low, eps) + _neg_log(high - r, eps)).mean()


def barrier_hits(r: Tensor, low: float = -5.0, high: float = 5.0, margin: float = 0.05) -> int:
    """How many scores lie within ``margin`` of a bound, or past it, or are NaN: a score scale about to saturate."""
    inside = (r > low + margin) & (r < high - margin)
    return int((~inside).sum())


def reward_loss(
    r_chosen: Tensor,
    r_rejected: Tensor,
    gamma: float = 2.0,
    barrier_weight: float = 0.02,
    *,
    low: float = -5.0,
    high: float = 5.0,
    margin: float = 0.05,
) -> tuple[Tensor, dict[str, Any]]:
    """Focal ranking loss + ``barrier_weight`` × log barrier over all scores, chosen and rejected.

    Returns (loss, stats): ``focal``, ``barrier``, ``accuracy`` (fraction of pairs with r_chosen > r_rejected) as
    detached tensors, and ``hits`` (an int, :func:`barrier_hits` over all scores).
    """
    scores = torch.cat([r_chosen.flatten(), r_rejected.flatten()])
    focal = focal_ranking_loss(r_chosen, r_rejected, gamma)
    barrier = log_barrier(scores, low, high)
    stats = {
        "focal": focal.detach(),
        "barrier": barrier.detach(),
        "accuracy": (r_chosen > r_rejected).float().mean().detach(),
        "hits": barrier_hits(scores.detach(), low, high, margin),
    }
    return focal + barrier_weight * barrier, stats


# ---------------------------------------------------------------------------------------------------------------
# Models


def _headless_body(config: ModelConfig) -> InternLM2:
    """An InternLM2 without its LM head: only ``hidden_states`` is used, and the vocab × dim head would be dead."""
    body = InternLM2(config)
    body.output = None  # type: ignore[assignment]  # drops output.weight from parameters and state_dict
    return body


def _scalar_head(dim: int) -> nn.Linear:
    head = nn.Linear(dim, 1)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(dim + 1))
        head.bias.zero_()
    return head


def find_reward_positions(tokens: Tensor, reward_id: int) -> Tensor:
    """Index (B,) of the last ``reward_id`` in each row of ``tokens`` (B, T); ValueError naming a row without one."""
    T = tokens.shape[1]
    idx = torch.arange(T, device=tokens.device).expand_as(tokens)
    last = torch.where(tokens == reward_id, idx, -1).max(dim=1).values
    missing = (last < 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"rows {missing} hold no <|reward|> token (id {reward_id}): build inputs with encode_preference, "
            "or pass reward_positions"
        )
    return last


class RewardModel(nn.Module):
    """An InternLM2 body and a scalar head: one score per sequence, read at its final ``<|reward|>`` token.

    ``reward_id`` defaults to where the tokenizer puts ``<|reward|>`` in a vocabulary of ``config.vocab_size``.
    Conditional or not is a property of the inputs (:func:`encode_preference`), not of the module.
    """

    def __init__(self, config: ModelConfig, reward_id: int | None = None) -> None:
        super().__init__()
        self.reward_id = config.vocab_size - REWARD_OFFSET if reward_id is None else reward_id
        if not 0 <= self.reward_id < config.vocab_size:
            raise ValueError(f"reward_id {self.reward_id} is outside the vocabulary of {config.vocab_size}")
        self.body = _headless_body(config)
        self.head = _scalar_head(config.dim)

    @classmethod
    def from_lm(cls, lm: InternLM2, reward_id: int | None = None) -> RewardModel:
        """A reward model whose body is a copy of ``lm``'s (an SFT model), on its device and dtype; fresh head."""
        ref = lm.tok_embeddings.weight
        rm = cls(lm.config, reward_id).to(device=ref.device, dtype=ref.dtype)
        rm.load_lm_state_dict(lm.state_dict())
        return rm

    def load_lm_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy an InternLM2 state dict into the body, leaving out its LM head (``output.weight``)."""
        body_state = {name: t for name, t in state.items() if not name.startswith("output.")}
        self.body.load_state_dict(body_state, strict=True)

    def forward(
        self,
        tokens: Tensor,
        reward_positions: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Scores (B,) in fp32 for right-padded ``tokens`` (B, T), read at ``reward_positions`` (B,).

        Without ``reward_positions`` each row's last ``reward_id`` is used (so padding must not be that id).
        ``positions``/``attn_mask`` go to :meth:`InternLM2.hidden_states`; right padding needs neither.
        """
        at = find_reward_positions(tokens, self.reward_id) if reward_positions is None else reward_positions
        hidden = self.body.hidden_states(tokens, positions=positions, attn_mask=attn_mask)  # (B, T, dim)
        picked = hidden[torch.arange(tokens.shape[0], device=tokens.device), at]  # (B, dim)
        return self.head(picked).squeeze(-1).float()


class ValueModel(nn.Module):
    """PPO's critic: an InternLM2 body and a scalar value head, one value per token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.body = _headless_body(config)
        self.value_head = _scalar_head(config.dim)

    def forward(self, tokens: Tensor, *, positions: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """Values (B, T) in fp32: position t estimates the return from token t on."""
        hidden = self.body.hidden_states(tokens, positions=positions, attn_mask=attn_mask)
        return self.value_head(hidden).squeeze(-1).float()


def critic_from(reward_model: RewardModel) -> ValueModel:
    """The critic COOL RLHF starts PPO with: a copy of the reward model's body and a fresh value head."""
    ref = reward_model.head.weight
    critic = ValueModel(reward_model.body.config).to(device=ref.device, dtype=ref.dtype)
    critic.body.load_state_dict(reward_model.body.state_dict(), strict=True)  # copies: no storage is shared
    return critic


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def encode_preference(
    prompt_messages: Sequence[Message], response: str | Message, tokenizer: Tokenizer, domain_system: str | None
) -> list[int]:
    """Ids the reward model scores: [domain system turn] + prompt + assistant response, then ``<|reward|>``.

    ``domain_system`` is the conditional prompt's text (e.g. ``DOMAIN_PROMPTS["harmless"]``); ``None`` leaves the
    system turn out, for an unconditional reward model.
    """
    reply = response if isinstance(response, Message) else Message("assistant", response)
    if reply.role != "assistant":
        raise ValueError(f"the response must be an assistant turn, got a {reply.role} turn")
    system = [] if domain_system is None else [Message("system", domain_system)]
    ids, _ = encode_chat([*system, *prompt_messages, reply], tokenizer)
    return ids + [tokenizer.token_id(REWARD)]


def _last_index(ids: Sequence[int], token: int, where: str) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    raise ValueError(f"{where} holds no <|reward|> token (id {token}): encode it with encode_preference")


def collate_preferences(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int, reward_id: int
) -> dict[str, Tensor]:
    """Right-pad (chosen, rejected) id lists into ``chosen``/``rejected`` (B, T) with one T for both, and their
    reward-token indices ``chosen_at``/``rejected_at`` (B,)."""
    if pad_id == reward_id:
        raise ValueError(f"pad_id {pad_id} is the reward token: pad with another id (the tokenizer's eos)")
    if not pairs:
        raise ValueError("collate_preferences got no pairs")
    T = max(len(seq) for pair in pairs for seq in pair)
    batch: dict[str, Tensor] = {}
    for k, name in enumerate(("chosen", "rejected")):
        rows = [pair[k] for pair in pairs]
        batch[name] = torch.tensor([list(r) + [pad_id] * (T - len(r)) for r in rows], dtype=torch.long)
        at = [_last_index(r, reward_id, f"pair {i} {name}") for i, r in enumerate(rows)]
        batch[f"{name}_at"] = torch.tensor(at, dtype=torch.long)
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class RewardLossConfig:
    """The report's reward loss: focal γ 2, barrier weight 0.02 on (−5, 5); ``margin`` for counting hits."""

    gamma: float = 2.0
    barrier_weight: float = 0.02
    low: float = -5.0
    high: float = 5.0
    margin: float = 0.05

    def __post_init__(self) -> None:
        if self.gamma < 0 or self.barrier_weight < 0 or self.margin < 0 or not self.low < self.high:
            raise ValueError(f"RewardLossConfig needs gamma, barrier_weight, margin >= 0 and low < high; got {self}")


def reward_optim(total_steps: int, warmup_steps: int = 0) -> OptimConfig:
    """The report's reward-model schedule: LR cosine from 1e-5 to 5e-6, weight decay 0.01."""
    return OptimConfig(lr=1e-5, weight_decay=0.01, min_lr_ratio=0.5, warmup_steps=warmup_steps, total_steps=total_steps)


def _same_length(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Right-pad the shorter of two (B, T) id batches; causal attention makes the pad id irrelevant."""
    T = max(a.shape[1], b.shape[1])
    return F.pad(a, (0, T - a.shape[1])), F.pad(b, (0, T - b.shape[1]))


class RewardModule(L.LightningModule):
    """Trains a :class:`RewardModel` on batches from :func:`collate_preferences`.

    Start it from an SFT model with ``module.model.load_lm_state_dict(sft_state_dict)``.
    ``barrier_hits_total`` counts scores that reached the barrier over the whole run (a warning is logged once).
    """

    # Same fix as pretraining: Lightning refuses to clip for a fused optimizer under bf16 autocast, needlessly.
    configure_gradient_clipping = PretrainModule.configure_gradient_clipping

    def __init__(
        self,
        model_config: ModelConfig | Mapping[str, Any],
        optim: OptimConfig | Mapping[str, Any],
        loss: RewardLossConfig | Mapping[str, Any] | None = None,
        reward_id: int | None = None,
    ) -> None:
        super().__init__()
        config = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(dict(model_config))
        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig.from_dict(optim)
        self.loss_config = loss if isinstance(loss, RewardLossConfig) else RewardLossConfig(**(loss or {}))
        self.save_hyperparameters({"model_config": config.to_dict(), "optim": self.optim.to_dict(),
                                   "loss": dataclasses.asdict(self.loss_config), "reward_id": reward_id})
        self.model = RewardModel(config, reward_id)
        self.barrier_hits_total = 0

    def scores(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(r_chosen, r_rejected), each (B,), from one forward pass over both halves of the batch."""
        tokens = torch.cat(_same_length(batch["chosen"], batch["rejected"]))  # (2B, T)
        at = torch.cat([batch["chosen_at"], batch["rejected_at"]]) if "chosen_at" in batch else None
        r_chosen, r_rejected = self.model(tokens, reward_positions=at).chunk(2)
        return r_chosen, r_rejected

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def _step(self, batch: Mapping[str, Tensor], stage: str) -> Tensor:
        c = self.loss_config
        r_chosen, r_rejected = self.scores(batch)
        loss, stats = reward_loss(
            r_chosen, r_rejected, c.gamma, c.barrier_weight, low=c.low, high=c.high, margin=c.margin
        )
        if stats["hits"] and stage == "train":
            if not self.barrier_hits_total:
                logger.warning("reward scores hit the barrier (%d within %.2f of (%g, %g)); see train/barrier_hits",
                               stats["hits"], c.margin, c.low, c.high)
            self.barrier_hits_total += stats["hits"]
        size = r_chosen.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=size)
        for name in ("focal", "barrier", "accuracy"):
            self.log(f"{stage}/{name}", stats[name], batch_size=size)
        self.log(f"{stage}/barrier_hits", float(stats["hits"]), batch_size=size, reduce_fx="sum")
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_schedule(self.model, self.optim, self.device)

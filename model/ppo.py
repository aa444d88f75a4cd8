"""The PPO arithmetic of COOL RLHF, as pure tensor functions (no Lightning, no models).

The PPO this computes, term by term (InternLM2 §4.2; what the report leaves open is marked *ours*):

- Rewards per response token: ``−kl_coef · KL_t`` at every token, with ``KL_t = log π_actor − log π_ref`` (the k1
  estimate of the sampled token; k2 and k3 are available) and ``kl_coef = 0.01``; the reward model's score is added
  at the last response token only (:func:`token_rewards`). The score is computed on the conditional prompt, which
  only the reward model sees.
- Advantages: GAE with λ = 0.99 and, *ours*, γ = 1 (an episode is one response; the report does not state γ).
  The value after the last response token is 0: the episode ends there (:func:`gae`).
- Actor: the clipped surrogate ``−min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A)`` with ρ = π_new / π_old, averaged over
  response tokens; ε = 0.2 is *ours* (not stated). **No advantage normalisation** (the report's choice):
  :func:`normalize_advantages` exists but call sites leave it off.
- Critic: ``½ · (V − R)²`` averaged over response tokens, **no value clipping** (the report's choice); the clipped
  form ``½ · max((V − R)², (V_old + clip(V − V_old, ±c) − R)²)`` is there for comparison.
- Not here, but part of the recipe: the PTX (pretraining next-token) loss is added to the actor's loss with
  coefficient 0.5; the critic starts as the reward model's body with a fresh value head
  (:func:`model.reward.critic_from`) and is pre-trained 50 iterations with the actor frozen; actor LR 1e-6, critic
  5e-6; rollouts sampled with top-p 0.9.

Every [B, T] tensor is aligned on the token it scores: ``logp[:, t]`` is the log-probability of token t given the
ones before it, and ``mask`` is True on response tokens (prompt and padding False).
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is True (0 when none is)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.99
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns, both (B, T) and 0 outside ``mask``.

    δ_t = r_t + γ·V_{t'} − V_t and A_t = δ_t + γλ·A_{t'}, where t' is the next response token; past the last one
    V and A are 0 (the episode ends). Masked positions are skipped, not treated as steps, so a gap inside the
    response (e.g. a tool's output) does not cut the recursion. Returns R_t = A_t + V_t. No gradient flows.
    """
    if not rewards.shape == values.shape == mask.shape or rewards.dim() != 2:
        raise ValueError(f"rewards, values, mask must share one [B, T] shape, got "
                         f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}")
    rewards, values, valid = rewards.detach().float(), values.detach().float(), mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V at the next response token; 0 past the end
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, 0.0)
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def kl_penalty(logp_actor: Tensor, logp_ref: Tensor, mask: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL(actor ‖ ref) estimates (B, T), 0 outside ``mask``, from the sampled tokens' log-probs.

    k1 = log π − log π_ref (unbiased, can be negative per token); k2 = ½·(log π − log π_ref)²;
    k3 = ρ − 1 − log ρ with ρ = π_ref / π (unbiased and never negative). See Schulman, "Approximating KL divergence".
    """
    log_ratio = logp_actor.float() - logp_ref.float()
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio.square()
    elif kind == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")
    return torch.where(mask.bool(), kl, 0.0)


def last_positions(mask: Tensor) -> Tensor:
    """Index (B,) of each row's last True in ``mask`` (B, T); ValueError if a row has none."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), idx, -1).max(dim=1).values
    empty = (last < 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no response token in mask: nothing to reward")
    return last


def token_rewards(score: Tensor, kl: Tensor, mask: Tensor, kl_coef: float = 0.01) -> Tensor:
    """Rewards (B, T): −kl_coef·KL on every response token, plus ``score`` (B,) on each row's last one."""
    rewards = torch.where(mask.bool(), -kl_coef * kl.float(), 0.0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_positions(mask)] += score.float()
    return rewards


def policy_loss(
    logp_new: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate, a masked mean over response tokens; returns (loss, clip fraction, approx KL).

    Clip fraction: the share of tokens where the clipped term won the min, i.e. whose gradient clipping removed.
    Approx KL: the k3 estimate of KL(old ‖ new), mean of (ρ − 1) − log ρ, ρ = π_new / π_old (≥ 0, detached).
    """
    log_ratio = logp_new.float() - logp_old.float().detach()
    ratio = log_ratio.exp()
    adv = advantages.float().detach()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * adv
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped < unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = None
) -> Tensor:
    """½·(V − R)² over response tokens; with ``clip``, ½·max((V − R)², (V_old + clip(V − V_old, ±clip) − R)²)."""
    values, returns = values.float(), returns.float().detach()
    loss = (values - returns).square()
    if clip is not None:
        old = old_values.float().detach()
        clipped = old + (values - old).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns).square())
    return 0.5 * masked_mean(loss, mask)


def normalize_advantages(adv: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Advantages shifted and scaled to mean 0, std 1 over response tokens; 0 elsewhere. Off in the report."""
    mean = masked_mean(adv, mask)
    var = masked_mean((adv - mean).square(), mask)
    return torch.where(mask.bool(), (adv - mean) * torch.rsqrt(var + eps), 0.0)

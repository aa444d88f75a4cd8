"""PPO arithmetic against hand-worked values: GAE, KL-shaped rewards, clipped surrogate, value loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from model.ppo import (
    gae,
    kl_penalty,
    masked_mean,
    normalize_advantages,
    policy_loss,
    token_rewards,
    value_loss,
)


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_masked_mean_ignores_masked_positions() -> None:
    x = t([1.0, 2.0, 100.0], [3.0, -50.0, -50.0])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(masked_mean(x, mask)) == pytest.approx((1 + 2 + 3) / 3)
    assert float(masked_mean(x, torch.zeros_like(mask))) == 0.0


def test_gae_matches_a_worked_example_with_padding_and_prompt_masked() -> None:
    # T = 3 response tokens, γ = 1, λ = 0.99, rewards r = (0, 0, 1), values V = (0.5, 0.6, 0.7), V after the end = 0:
    #   δ2 = 1 + 0 − 0.7 = 0.3                  A2 = 0.3
    #   δ1 = 0 + 0.7 − 0.6 = 0.1                A1 = 0.1 + 0.99·0.3   = 0.397
    #   δ0 = 0 + 0.6 − 0.5 = 0.1                A0 = 0.1 + 0.99·0.397 = 0.49303
    #   returns R = A + V = (0.99303, 0.997, 1.0)
    adv_hand, ret_hand = [0.49303, 0.397, 0.3], [0.99303, 0.997, 1.0]
    # Row 0: exactly the example. Row 1: the example followed by a padded position holding garbage.
    # Row 2: a prompt token first (masked, garbage reward and value), then the example.
    rewards = t([0, 0, 1, 0], [0, 0, 1, 9.0], [7.0, 0, 0, 1])
    values = t([0.5, 0.6, 0.7, 0], [0.5, 0.6, 0.7, 9.0], [3.0, 0.5, 0.6, 0.7])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.99)
    assert_close(adv[0], torch.tensor([*adv_hand, 0.0]))
    assert_close(ret[0], torch.tensor([*ret_hand, 0.0]))
    assert_close(adv[1], adv[0])
    assert_close(ret[1], ret[0])
    assert_close(adv[2], torch.tensor([0.0, *adv_hand]))
    assert_close(ret[2], torch.tensor([0.0, *ret_hand]))


def test_gae_with_lambda_one_gives_reward_to_go_returns() -> None:
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked = rewards * mask
    to_go = masked.flip(1).cumsum(1).flip(1) * mask  # Σ_{k ≥ t} r_k: the values telescope away
    assert_close(ret, to_go)


def test_gae_skips_a_gap_inside_the_response() -> None:
    # Tokens 0 and 2 are the agent's, 1 is a tool's output (masked): A0 sees V2 as its next value.
    # δ2 = 1 − 0.4 = 0.6, A2 = 0.6; δ0 = 0 + 0.4 − 0.2 = 0.2, A0 = 0.2 + 0.5·0.6 = 0.5   (γ = 1, λ = 0.5)
    adv, _ = gae(t([0.0, 5.0, 1.0]), t([0.2, 9.0, 0.4]), torch.tensor([[True, False, True]]), lam=0.5)
    assert_close(adv, t([0.5, 0.0, 0.6]))


def test_kl_is_zero_when_actor_equals_reference_and_rewards_are_the_score_at_the_last_token() -> None:
    logp = -torch.rand(2, 4)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(logp, logp.clone(), mask, kind=kind), torch.zeros(2, 4))
    rewards = token_rewards(torch.tensor([0.7, -1.2]), kl_penalty(logp, logp, mask), mask, kl_coef=0.01)
    assert torch.equal(rewards, t([0, 0, 0, 0.7], [0, 0, -1.2, 0]))


def test_kl_estimators_and_kl_shaped_rewards_by_hand() -> None:
    actor, ref, mask = t([-1.0, -2.0]), t([-1.5, -1.0]), torch.tensor([[True, True]])
    # log ratio (actor − ref) = (0.5, −1.0)
    assert_close(kl_penalty(actor, ref, mask, "k1"), t([0.5, -1.0]))
    assert_close(kl_penalty(actor, ref, mask, "k2"), t([0.125, 0.5]))
    # k3 = e^{−lr} − 1 + lr: e^{−0.5} − 0.5 = 0.1065307, e^{1} − 2 = 0.7182818
    assert_close(kl_penalty(actor, ref, mask, "k3"), t([math.exp(-0.5) - 0.5, math.e - 2.0]))
    # −0.01·KL everywhere, + score 2.0 at the last token: (−0.005, 0.01 + 2.0)
    assert_close(token_rewards(torch.tensor([2.0]), kl_penalty(actor, ref, mask), mask), t([-0.005, 2.01]))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(actor, ref, mask, "k4")
    with pytest.raises(ValueError, match=r"rows \[0\] have no response token"):
        token_rewards(torch.tensor([1.0]), t([0.0, 0.0]), torch.tensor([[False, False]]))


def test_policy_loss_at_ratio_one_is_minus_mean_advantage() -> None:
    logp = -torch.rand(1, 4)
    adv, mask = t([1.0, -2.0, 0.5, 99.0]), torch.tensor([[True, True, True, False]])
    loss, clip_fraction, approx_kl = policy_loss(logp, logp.clone(), adv, mask)
    assert float(loss) == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert float(clip_fraction) == 0.0 and float(approx_kl) == 0.0


def test_policy_loss_clips_ratios_beyond_one_plus_minus_epsilon() -> None:
    # ratios ρ = (1.5, 0.5, 0.5, 1.5) against advantages (+1, +1, −1, −1), ε = 0.2:
    #   min(1.5, 1.2) = 1.2 (clipped); min(0.5, 0.8) = 0.5; min(−0.5, −0.8) = −0.8 (clipped); min(−1.5, −1.2) = −1.5
    #   loss = −(1.2 + 0.5 − 0.8 − 1.5)/4 = 0.15; clip fraction 2/4; the fifth, masked token counts for nothing.
    old = torch.zeros(1, 5)
    new = torch.log(t([1.5, 0.5, 0.5, 1.5, 40.0]))
    adv, mask = t([1.0, 1.0, -1.0, -1.0, 7.0]), torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    new.requires_grad_(True)
    loss, clip_fraction, approx_kl = policy_loss(new, old, adv, mask, clip=0.2)
    assert float(loss.detach()) == pytest.approx(0.15)
    assert float(clip_fraction) == pytest.approx(0.5)
    # approx KL = mean of (ρ − 1) − log ρ: (0.5 − ln 1.5) twice and (−0.5 + ln 2) twice
    assert float(approx_kl) == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 + math.log(2.0))) / 2)
    loss.backward()
    # Clipped tokens get no gradient; unclipped ones d(−ρA/4)/d log ρ = −ρA/4.
    assert_close(new.grad, t([0.0, -0.125, 0.0, 0.375, 0.0]))


def test_value_loss_unclipped_and_clipped_by_hand() -> None:
    values, old, returns = t([1.0, 2.0, 50.0]), t([0.5, 2.5, 0.0]), t([2.0, 0.0, 0.0])
    mask = torch.tensor([[True, True, False]])
    # unclipped: ½·((1 − 2)² + (2 − 0)²)/2 = ½·5/2 = 1.25
    assert float(value_loss(values, old, returns, mask)) == pytest.approx(1.25)
    # clip 0.2: V_clip = (0.7, 2.3); max(1, 1.69) = 1.69, max(4, 5.29) = 5.29; ½·6.98/2 = 1.745
    assert float(value_loss(values, old, returns, mask, clip=0.2)) == pytest.approx(1.745)


def test_normalize_advantages_over_response_tokens_only() -> None:
    adv, mask = t([1.0, 2.0, 3.0, 1000.0]), torch.tensor([[True, True, True, False]])
    out = normalize_advantages(adv, mask)
    # mean 2, biased variance 2/3: (x − 2)/√(2/3)
    s = math.sqrt(2 / 3)
    assert_close(out, t([-1 / s, 0.0, 1 / s, 0.0]))

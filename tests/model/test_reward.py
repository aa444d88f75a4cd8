"""The conditional reward model: focal ranking loss and log barrier by hand, the scalar head read at <|reward|>,
the critic's initialisation, preference encoding, and a short training run on a separable toy set."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils.data import DataLoader

from model.chat import Message, encode_chat
from model.config import ModelConfig
from model.model import InternLM2
from model.pretrain import OptimConfig
from model.reward import (
    DOMAIN_PROMPTS,
    RewardModel,
    RewardModule,
    barrier_hits,
    collate_preferences,
    critic_from,
    domain_prompt,
    encode_preference,
    focal_ranking_loss,
    log_barrier,
    reward_loss,
    reward_optim,
)
from model.tokenizer import REWARD, Tokenizer

PAD = 2
MakeConfig = Callable[..., ModelConfig]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def focal_by_hand(d: float, gamma: float = 2.0) -> float:
    p = sigmoid(d)
    return -((1.0 - 2.0 * max(0.0, p - 0.5)) ** gamma) * math.log(p)


# ---------------------------------------------------------------------------------------------------------------
# Loss


def test_focal_loss_at_zero_margin_is_log_two() -> None:
    # P = ½: weight (1 − 0)^γ = 1, loss −log ½ = log 2
    loss = focal_ranking_loss(torch.tensor([0.3]), torch.tensor([0.3]))
    assert float(loss) == pytest.approx(math.log(2.0))


def test_focal_loss_vanishes_at_a_large_margin_and_is_plain_log_sigmoid_below_zero() -> None:
    # d = 10: (2σ(−10))²·(−log σ(10)) ≈ 3.7e-13
    assert float(focal_ranking_loss(torch.tensor([8.0]), torch.tensor([-2.0]))) < 1e-8
    # d = 2: P = 0.880797, weight (1 − 2·0.380797)² = 0.238406² = 0.056837, loss 0.056837·0.126928 = 0.0072143
    assert float(focal_ranking_loss(torch.tensor([2.0]), torch.tensor([0.0]))) == pytest.approx(0.0072143, rel=1e-4)
    # d = −1.5: P < ½, weight 1, loss −log σ(−1.5) = 1.7014
    loss = focal_ranking_loss(torch.tensor([-1.0]), torch.tensor([0.5]))
    assert float(loss) == pytest.approx(-math.log(sigmoid(-1.5)))


def test_focal_loss_with_gamma_zero_is_minus_log_sigmoid_and_means_over_pairs() -> None:
    d = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
    got = focal_ranking_loss(d, torch.zeros(5), gamma=0.0)
    assert_close(got, -F.logsigmoid(d).mean())
    mean = sum(focal_by_hand(x) for x in d.tolist()) / 5
    assert float(focal_ranking_loss(d, torch.zeros(5))) == pytest.approx(mean, rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_gradient_is_finite_even_where_p_rounds_to_one(gamma: float) -> None:
    r_chosen = torch.tensor([-1.0, 60.0, -60.0, 0.0, 1.0], requires_grad=True)
    focal_ranking_loss(r_chosen, torch.zeros(5), gamma).backward()
    assert torch.isfinite(r_chosen.grad).all()
    # P < ½: the weight is 1, and d(−log σ(d))/dd = −σ(−d): −σ(1) at d = −1, −1 as P → 0; mean over 5 pairs
    assert float(r_chosen.grad[0]) == pytest.approx(-sigmoid(1.0) / 5)
    assert float(r_chosen.grad[2]) == pytest.approx(-1.0 / 5)
    assert abs(float(r_chosen.grad[1])) < 1e-12  # P = 1 in fp32: no loss, no slope


def test_barrier_at_zero_is_minus_two_log_five_symmetric_and_rising_toward_the_bounds() -> None:
    assert float(log_barrier(torch.tensor([0.0]))) == pytest.approx(-2 * math.log(5.0))
    # r = 3: −(log 8 + log 2) = −log 16
    assert float(log_barrier(torch.tensor([3.0]))) == pytest.approx(-math.log(16.0))
    for r in (0.5, 2.0, 4.9):
        assert float(log_barrier(torch.tensor([r]))) == pytest.approx(float(log_barrier(torch.tensor([-r]))))
    rising = [float(log_barrier(torch.tensor([r]))) for r in (0.0, 2.0, 4.0, 4.9, 4.99, 4.999)]
    assert rising == sorted(rising) and len(set(rising)) == len(rising)


def test_barrier_at_and_past_the_bounds_is_finite_large_and_pushes_back() -> None:
    r = torch.tensor([5.0, 6.0, -7.0], requires_grad=True)
    values = [float(log_barrier(r[i : i + 1]).detach()) for i in range(3)]
    assert all(math.isfinite(v) for v in values)
    assert values[0] > float(log_barrier(torch.tensor([4.99]))) and values[1] > 900.0  # ≈ 1000 per unit past
    log_barrier(r).backward()
    assert float(r.grad[0]) > 0 and float(r.grad[1]) > 0 and float(r.grad[2]) < 0  # descent moves them inside


def test_barrier_hits_count_scores_near_or_past_the_bounds() -> None:
    r = torch.tensor([0.0, 4.9, 4.96, -4.99, 5.0, 7.0, -4.5, float("nan")])
    assert barrier_hits(r, -5.0, 5.0, margin=0.05) == 5  # 4.96, −4.99, 5.0, 7.0 and the NaN
    assert barrier_hits(r[:2], -5.0, 5.0) == 0


def test_reward_loss_is_focal_plus_two_hundredths_barrier_with_stats() -> None:
    r_c, r_r = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    # focal over d = (1, −1); barrier over all four scores (1, −0.5, 0, 0.5)
    focal = (focal_by_hand(1.0) + focal_by_hand(-1.0)) / 2
    barrier = -sum(math.log(r + 5) + math.log(5 - r) for r in (1.0, -0.5, 0.0, 0.5)) / 4
    loss, stats = reward_loss(r_c, r_r, gamma=2.0, barrier_weight=0.02)
    assert float(loss) == pytest.approx(focal + 0.02 * barrier, rel=1e-6)
    assert float(stats["focal"]) == pytest.approx(focal, rel=1e-6)
    assert float(stats["barrier"]) == pytest.approx(barrier, rel=1e-6)
    assert float(stats["accuracy"]) == 0.5 and stats["hits"] == 0
    _, stats = reward_loss(torch.tensor([5.5]), torch.tensor([-4.97]))
    assert stats["hits"] == 2 and float(stats["accuracy"]) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Models


def sft_model(config: ModelConfig, seed: int = 0) -> InternLM2:
    torch.manual_seed(seed)
    return InternLM2(config).eval()


def test_reward_model_from_lm_copies_the_body_and_drops_the_lm_head(make_config: MakeConfig) -> None:
    lm = sft_model(make_config())
    rm = RewardModel.from_lm(lm)
    lm_state, rm_state = lm.state_dict(), rm.body.state_dict()
    assert set(rm_state) == set(lm_state) - {"output.weight"}
    assert all(torch.equal(rm_state[name], lm_state[name]) for name in rm_state)
    assert rm.head.weight.shape == (1, 64) and rm.reward_id == 300 - 17
    with torch.no_grad():
        rm.body.tok_embeddings.weight.add_(1.0)
    assert not torch.equal(rm.body.tok_embeddings.weight, lm.tok_embeddings.weight)  # a copy, not shared storage


def test_critic_starts_as_a_copy_of_the_reward_model_body_with_a_fresh_value_head(make_config: MakeConfig) -> None:
    rm = RewardModel.from_lm(sft_model(make_config()))
    critic = critic_from(rm)
    rm_params = dict(rm.body.named_parameters())
    critic_params = dict(critic.body.named_parameters())
    assert rm_params.keys() == critic_params.keys()
    for name, p in critic_params.items():
        assert torch.equal(p, rm_params[name]) and p.data_ptr() != rm_params[name].data_ptr(), name
    assert not torch.equal(critic.value_head.weight, rm.head.weight)
    tokens = torch.randint(3, 250, (2, 7))
    assert critic(tokens).shape == (2, 7)


def test_score_is_read_at_the_reward_token(make_config: MakeConfig) -> None:
    rm = RewardModel.from_lm(sft_model(make_config())).eval()
    R = rm.reward_id
    base = [1, 40, 41, 42, R]
    with torch.no_grad():
        alone = rm(torch.tensor([base]))
        padded = rm(torch.tensor([base + [PAD, PAD, PAD], base + [7, 8, 9]]))  # anything after it: no effect
        explicit = rm(torch.tensor([base + [PAD, PAD]]), reward_positions=torch.tensor([4]))
        moved = rm(torch.tensor([[1, 40, 41, R, 42]]))
        earlier_one_ignored = rm(torch.tensor([[1, R, 41, 42, R]]))
    assert_close(padded, alone.expand(2))
    assert_close(explicit, alone)
    assert abs(float(moved) - float(alone)) > 1e-4
    assert abs(float(earlier_one_ignored) - float(alone)) > 1e-4  # a different prefix, read at the last <|reward|>
    with pytest.raises(ValueError, match=r"rows \[1\] hold no <\|reward\|> token"):
        rm(torch.tensor([base, [1, 40, 41, 42, PAD]]))


# ---------------------------------------------------------------------------------------------------------------
# Inputs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = "The quick brown fox jumps over the lazy dog. What is two plus two? Two plus two is four. " * 20
    return Tokenizer.train([text, "Judge the response by how helpful it is."], 512)


def test_encode_preference_conditional_and_unconditional_differ_only_by_the_system_turn(tok: Tokenizer) -> None:
    prompt = [Message("user", "What is two plus two?")]
    conditional = encode_preference(prompt, "Two plus two is four.", tok, DOMAIN_PROMPTS["helpful"])
    unconditional = encode_preference(prompt, "Two plus two is four.", tok, None)
    reward_id = tok.token_id(REWARD)
    assert conditional[-1] == reward_id and unconditional[-1] == reward_id
    system_turn, _ = encode_chat([Message("system", DOMAIN_PROMPTS["helpful"])], tok)  # <s> + the system turn
    assert conditional == system_turn + unconditional[1:]  # both open with the conversation's one <s>
    chat, _ = encode_chat([*prompt, Message("assistant", "Two plus two is four.")], tok)
    assert unconditional == chat + [reward_id]


def test_domain_prompts_cover_the_reports_domains() -> None:
    assert {"helpful", "harmless", "math_code", "format"} <= set(DOMAIN_PROMPTS)
    assert domain_prompt("harmless").startswith("Judge the response by whether it avoids harm")
    with pytest.raises(ValueError, match="unknown reward domain 'funny'; expected one of helpful"):
        domain_prompt("funny")


def test_collate_pads_right_and_finds_the_reward_positions() -> None:
    R = 283
    batch = collate_preferences([([1, 5, R], [1, 5, 6, 7, R]), ([1, R, 9, R], [1, R])], pad_id=PAD, reward_id=R)
    assert batch["chosen"].tolist() == [[1, 5, R, PAD, PAD], [1, R, 9, R, PAD]]
    assert batch["rejected"].tolist() == [[1, 5, 6, 7, R], [1, R, PAD, PAD, PAD]]
    assert batch["chosen_at"].tolist() == [2, 3] and batch["rejected_at"].tolist() == [4, 1]
    with pytest.raises(ValueError, match="pair 0 rejected holds no <\\|reward\\|> token"):
        collate_preferences([([1, R], [1, 5])], pad_id=PAD, reward_id=R)
    with pytest.raises(ValueError, match="pad_id 283 is the reward token"):
        collate_preferences([([1, R], [1, R])], pad_id=R, reward_id=R)


# ---------------------------------------------------------------------------------------------------------------
# Training


def toy_preferences(n: int, reward_id: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Separable pairs: a random prompt, then a response token from 10..19 (chosen) or 20..29 (rejected)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(30, 100) for _ in range(rng.randrange(2, 6))]
        pairs.append((prompt + [rng.randrange(10, 20), reward_id], prompt + [rng.randrange(20, 30), reward_id]))
    return pairs


def accuracy(module: RewardModule, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        r_chosen, r_rejected = module.scores(batch)
    return float((r_chosen > r_rejected).float().mean())


def test_a_few_reward_module_steps_raise_pair_accuracy(make_config: MakeConfig) -> None:
    L.seed_everything(0)
    config = make_config()
    R = config.vocab_size - 17
    optim = OptimConfig(lr=3e-3, weight_decay=0.01, min_lr_ratio=0.5, warmup_steps=0, total_steps=30)
    module = RewardModule(config, optim)
    module.model.load_lm_state_dict(sft_model(config).state_dict())
    collate = partial(collate_preferences, pad_id=PAD, reward_id=R)
    held_out = collate(toy_preferences(64, R, seed=1))
    before = accuracy(module, held_out)
    loader = DataLoader(toy_preferences(256, R, seed=0), batch_size=16, shuffle=True, collate_fn=collate)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, max_steps=30, gradient_clip_val=1.0)
    trainer.fit(module, loader)
    after = accuracy(module, held_out)
    assert before < 0.8 and after >= 0.95
    metrics = trainer.callback_metrics
    assert {"train/focal", "train/barrier", "train/accuracy", "train/barrier_hits", "train/lr"} <= set(metrics)
    assert float(metrics["train/lr"]) == pytest.approx(3e-3 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 29 / 30))))


def test_reward_optim_is_the_reports_schedule() -> None:
    optim = reward_optim(total_steps=100)
    assert (optim.lr, optim.weight_decay, optim.lr * optim.min_lr_ratio) == (1e-5, 0.01, 5e-6)

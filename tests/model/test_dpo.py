"""DPO: the loss by hand (with cDPO smoothing), log 2 at initialisation, sequence log-probs against a direct sum,
the response-only mask of encoded pairs, bad inputs, and a short training run on a separable toy set."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from functools import partial

import lightning as L
import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader

from model.chat import IM_END, Message, ToolCall, assistant_text, encode_chat
from model.config import ModelConfig
from model.dpo import (
    DPOModule,
    collate_dpo,
    dpo_loss,
    dpo_optim,
    encode_dpo_pair,
    policy_state_dict,
    sequence_logps,
)
from model.model import InternLM2
from model.pretrain import OptimConfig
from model.tokenizer import Tokenizer
from tasks.rlhf.preferences import PreferencePair

PAD = 2
MakeConfig = Callable[..., ModelConfig]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))  # −log σ(−x)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs)


# ---------------------------------------------------------------------------------------------------------------
# Loss


def test_dpo_loss_matches_hand_computed_values() -> None:
    # β = 0.5. Pair 1: z = 0.5·[(−1 − −2) − (−3 − −2.5)] = 0.5·(1 + 0.5) = 0.75.
    #          Pair 2: z = 0.5·[(−4 − −3) − (−2 − −3)] = 0.5·(−1 − 1) = −1.
    pc, pr, rc, rr = t(-1.0, -4.0), t(-3.0, -2.0), t(-2.0, -3.0), t(-2.5, -3.0)
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert float(loss) == pytest.approx((softplus(-0.75) + softplus(1.0)) / 2, abs=1e-6)
    assert float(stats["reward_chosen"]) == pytest.approx((0.5 * 1.0 + 0.5 * -1.0) / 2)  # 0
    assert float(stats["reward_rejected"]) == pytest.approx((0.5 * -0.5 + 0.5 * 1.0) / 2)  # 0.125
    assert float(stats["margin"]) == pytest.approx((0.75 - 1.0) / 2)
    assert float(stats["accuracy"]) == 0.5
    # cDPO, ε = 0.1: 0.9·(−log σ(z)) + 0.1·(−log σ(−z)) per pair.
    smoothed, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    by_hand = [0.9 * softplus(-z) + 0.1 * softplus(z) for z in (0.75, -1.0)]
    assert float(smoothed) == pytest.approx(sum(by_hand) / 2, abs=1e-6)


def test_cdpo_optimum_is_at_log_odds_of_the_smoothing_while_plain_dpo_keeps_pushing() -> None:
    z_star = math.log(0.9 / 0.1)  # d/dz [−0.9·log σ(z) − 0.1·log σ(−z)] = σ(z) − 0.9 = 0
    margin = torch.tensor([z_star], requires_grad=True)  # as policy_chosen with everything else 0, β = 1
    loss, _ = dpo_loss(margin, t(0.0), t(0.0), t(0.0), beta=1.0, label_smoothing=0.1)
    loss.backward()
    assert float(margin.grad) == pytest.approx(0.0, abs=1e-6)
    margin.grad = None
    dpo_loss(margin, t(0.0), t(0.0), t(0.0), beta=1.0)[0].backward()
    assert float(margin.grad) == pytest.approx(-(1.0 - 0.9), abs=1e-6)  # −σ(−z*) = −0.1


def test_dpo_loss_rejects_bad_arguments() -> None:
    x = t(-1.0, -2.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"four \(B,\) tensors of one shape, got \[\(2,\), \(3,\), \(2,\), \(2,\)\]"):
        dpo_loss(x, t(1.0, 2.0, 3.0), x, x)
    with pytest.raises(ValueError, match="empty batch"):
        empty = torch.zeros(0)
        dpo_loss(empty, empty, empty, empty)


# ---------------------------------------------------------------------------------------------------------------
# Sequence log-probabilities


def tiny_lm(config: ModelConfig, seed: int = 0) -> InternLM2:
    torch.manual_seed(seed)
    return InternLM2(config).eval()


def test_sequence_logps_is_the_masked_sum_of_next_token_log_probs_and_ignores_padding(make_config: MakeConfig) -> None:
    lm = tiny_lm(make_config())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 250, (2, 9), generator=g)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 5:] = True  # response = tokens 5..8
    mask[1, [3, 4, 7]] = True  # a gap (e.g. a tool's output) is allowed
    with torch.no_grad():
        got = sequence_logps(lm, tokens, mask)
        logp = torch.log_softmax(lm(tokens).float(), dim=-1)  # (B, T, V): position t predicts token t+1
        per_token = logp[:, :-1].gather(2, tokens[:, 1:, None]).squeeze(2)  # (B, T-1), scores tokens 1..T-1
        expected = (per_token * mask[:, 1:]).sum(dim=1)
        padded = sequence_logps(lm, torch.cat([tokens, torch.full((2, 4), PAD)], 1), torch.cat(
            [mask, torch.zeros(2, 4, dtype=torch.bool)], 1))
    assert got.shape == (2,) and got.dtype == torch.float32
    assert_close(got, expected)
    assert_close(padded, got)
    assert float(got[0]) == pytest.approx(float(per_token[0, 4:].sum()), abs=1e-5)  # tokens 5..8 from positions 4..7


def test_sequence_logps_rejects_bad_masks(make_config: MakeConfig) -> None:
    lm = tiny_lm(make_config())
    tokens = torch.randint(3, 250, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 3:] = True
    with pytest.raises(ValueError, match=r"rows \[1\] have no response token"):
        sequence_logps(lm, tokens, mask)
    with pytest.raises(ValueError, match=r"must share one \(B, T\) shape, got \(2, 6\) and \(2, 5\)"):
        sequence_logps(lm, tokens, mask[:, :5])
    with pytest.raises(ValueError, match=r"loss_mask\[:, 0\] must be False"):
        sequence_logps(lm, tokens, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be a bool tensor"):
        sequence_logps(lm, tokens, torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        sequence_logps(lm, tokens[:0], mask[:0])


# ---------------------------------------------------------------------------------------------------------------
# Inputs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = "The quick brown fox jumps over the lazy dog. What is two plus two? Two plus two is four. " * 20
    return Tokenizer.train([text, "And three plus three? Three plus three is six. Let me run it. print(3 + 3)"], 512)


MULTI_TURN = [
    Message("user", "What is two plus two?"),
    Message("assistant", "Two plus two is four."),
    Message("user", "And three plus three?"),
]


def test_encode_dpo_pair_masks_only_the_final_response_and_its_im_end(tok: Tokenizer) -> None:
    chosen, rejected = "Three plus three is six.", "Two plus two is four."
    c_ids, c_mask, r_ids, r_mask = encode_dpo_pair((MULTI_TURN, chosen, rejected), tok)
    full, full_mask = encode_chat([*MULTI_TURN, Message("assistant", chosen)], tok)
    assert c_ids == full and len(c_mask) == len(c_ids)
    response = tok.encode(chosen) + [tok.token_id(IM_END)]
    end = len(c_ids) - 1  # the final "\n" after <|im_end|> is not trained
    assert c_ids[end - len(response) : end] == response
    assert c_mask == [False] * (end - len(response)) + [True] * len(response) + [False]
    assert sum(full_mask) > sum(c_mask)  # encode_chat also trains the first answer; the pair mask does not
    assert sum(r_mask) == len(tok.encode(rejected)) + 1 and r_ids[: end - len(response)] == c_ids[: end - len(response)]


def test_encode_dpo_pair_parses_tool_calls_and_reads_preference_pairs(tok: Tokenizer) -> None:
    call = ToolCall("interpreter", code="print(3 + 3)")
    generated = assistant_text("Let me run it.", call) + IM_END  # as sampled: special tokens kept
    pair = PreferencePair(domain="math_code", prompt="And three plus three?", chosen=generated, rejected="Six.")
    c_ids, c_mask, r_ids, _ = encode_dpo_pair(pair, tok)
    expected, expected_mask = encode_chat([pair.prompt_turns()[0], Message("assistant", "Let me run it.", call)], tok)
    assert (c_ids, c_mask) == (expected, expected_mask)  # one assistant turn: the pair mask is encode_chat's
    assert tok.token_id("<|action_start|>") in c_ids and r_ids == encode_dpo_pair(
        (pair.prompt_turns(), "Six.", generated), tok)[0]


def test_encode_dpo_pair_rejects_bad_pairs(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"over max_len=10; filter long pairs"):
        encode_dpo_pair((MULTI_TURN, "Six.", "Five."), tok, max_len=10)
    with pytest.raises(ValueError, match="must end with one of .* got assistant"):
        encode_dpo_pair((MULTI_TURN[:2], "Six.", "Five."), tok)
    with pytest.raises(ValueError, match="same ids"):
        encode_dpo_pair((MULTI_TURN, "Six.", Message("assistant", "Six.")), tok)
    with pytest.raises(ValueError, match="must be an assistant turn"):
        encode_dpo_pair((MULTI_TURN, "Six.", Message("user", "Five.")), tok)


def test_collate_dpo_right_pads_both_halves_to_one_length() -> None:
    items = [([1, 5, 6], [False, False, True], [1, 5, 7, 8], [False, False, True, True]),
             ([1, 9], [False, True], [1, 4, 4], [False, True, True])]
    batch = collate_dpo(items, pad_id=PAD)
    assert batch["chosen"].tolist() == [[1, 5, 6, PAD], [1, 9, PAD, PAD]]
    assert batch["rejected"].tolist() == [[1, 5, 7, 8], [1, 4, 4, PAD]]
    assert batch["chosen_mask"].tolist() == [[False, False, True, False], [False, True, False, False]]
    assert batch["rejected_mask"].dtype == torch.bool and batch["chosen"].dtype == torch.long
    with pytest.raises(ValueError, match="collate_dpo got no items"):
        collate_dpo([], pad_id=PAD)
    with pytest.raises(ValueError, match=r"item 0 .* got lengths \[3, 2, 4, 4\]"):
        collate_dpo([([1, 5, 6], [False, True], [1, 5, 7, 8], [False] * 4)], pad_id=PAD)


# ---------------------------------------------------------------------------------------------------------------
# Training


def toy_pairs(n: int, seed: int) -> list[tuple[list[int], list[bool], list[int], list[bool]]]:
    """Separable pairs: a random prompt, then a response token from 10..19 (chosen) or 20..29 (rejected) and 7."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(30, 100) for _ in range(rng.randrange(2, 6))]
        mask = [False] * len(prompt) + [True, True]
        items.append((prompt + [rng.randrange(10, 20), 7], mask, prompt + [rng.randrange(20, 30), 7], mask))
    return items


def test_at_initialisation_the_loss_is_log_two_with_zero_margin(make_config: MakeConfig) -> None:
    module = DPOModule.from_lm(tiny_lm(make_config()), dpo_optim(total_steps=10), beta=0.1)
    with torch.no_grad():
        loss, stats = dpo_loss(*module.logps(collate_dpo(toy_pairs(8, seed=3), PAD)))
    assert abs(float(loss) - math.log(2.0)) < 1e-6
    assert float(stats["margin"]) == 0.0 and float(stats["accuracy"]) == 0.0
    assert not any(p.requires_grad for p in module.reference.parameters()) and not module.reference.training
    assert module.reference.output.weight.data_ptr() != module.policy.output.weight.data_ptr()  # a copy, not a view
    module.train()
    assert module.policy.training and not module.reference.training


def test_dpo_module_rejects_bad_beta(make_config: MakeConfig) -> None:
    with pytest.raises(ValueError, match="DPOModule needs beta > 0"):
        DPOModule(make_config(), dpo_optim(total_steps=10), beta=-0.1)


def test_a_few_dpo_steps_raise_the_implicit_margin_and_leave_the_reference_alone(make_config: MakeConfig) -> None:
    L.seed_everything(0)
    lm = tiny_lm(make_config())
    optim = OptimConfig(lr=3e-3, weight_decay=0.0, min_lr_ratio=0.5, warmup_steps=0, total_steps=30)
    module = DPOModule.from_lm(lm, optim, beta=0.1)
    reference_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    held_out = collate_dpo(toy_pairs(32, seed=1), PAD)
    loader = DataLoader(toy_pairs(240, seed=0), batch_size=8, shuffle=True, collate_fn=partial(collate_dpo, pad_id=PAD))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, max_steps=30, gradient_clip_val=1.0)
    trainer.fit(module, loader)
    with torch.no_grad():
        loss, stats = dpo_loss(*module.logps(held_out), beta=0.1)
    # Measured over seeds 0..2: accuracy 1.0, margin 1.71..1.76, loss 0.16..0.17 (log 2 = 0.69 at the start).
    assert float(stats["accuracy"]) >= 0.9 and float(stats["margin"]) > 1.0 and float(loss) < 0.35
    assert float(stats["reward_chosen"]) > 0 > float(stats["reward_rejected"])
    assert all(torch.equal(v, reference_before[k]) for k, v in module.reference.state_dict().items())
    assert not module.reference.training and all(p.grad is None for p in module.reference.parameters())
    metrics = trainer.callback_metrics
    assert {"dpo/loss", "dpo/margin", "dpo/accuracy", "dpo/reward_chosen", "dpo/reward_rejected", "train/lr"} <= set(
        metrics)
    # The trained policy comes out as a plain InternLM2 state dict, from the module or from a checkpoint's state.
    state = policy_state_dict(module)
    assert set(state) == set(lm.state_dict()) and not torch.equal(state["output.weight"], lm.output.weight)
    assert all(torch.equal(v, state[k]) for k, v in policy_state_dict(module.state_dict()).items())
    restored = InternLM2(lm.config)
    restored.load_state_dict(state)
    assert_close(restored.output.weight, module.policy.output.weight)
    with pytest.raises(ValueError, match=r"no policy\.\* tensors"):
        policy_state_dict(lm.state_dict())

"""The PPO LightningModule on tiny random models: rollouts, critic warm-up, frozen reference, PTX, learning, resume."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.testing import assert_close
from torch.utils.data import DataLoader

from model.checkpoint import load_model
from model.config import ModelConfig
from model.data import IGNORE_INDEX
from model.generate import SamplingConfig, generate
from model.model import InternLM2
from model.ppo_module import (
    PPOConfig,
    PPOModule,
    PromptDataset,
    collate_prompts,
    export_actor,
    response_logprobs,
)
from model.reward import RewardModel, critic_from

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32)
STOP, PAD = 63, 62
GOOD = 16  # the learning test rewards a first response token below this id


def decode(ids: Sequence[int]) -> str:
    return " ".join(str(i) for i in ids)


def first_token_reward(indices: Sequence[int], responses: Sequence[str]) -> Tensor:
    """+1 when the response's first token is below GOOD, −1 otherwise (about −0.5 for a random tiny model)."""
    return torch.tensor([1.0 if int(r.split()[0]) < GOOD else -1.0 for r in responses])


def make_module(reward_fn: Any = first_token_reward, *, seed: int = 0, stop_ids: Sequence[int] = (STOP,),
                **cfg: Any) -> PPOModule:
    torch.manual_seed(seed)
    actor = InternLM2(CONFIG)
    critic = critic_from(RewardModel(CONFIG, reward_id=PAD - 1))
    ppo = PPOConfig(**{"max_new_tokens": 4, "critic_warmup_steps": 0, **cfg})
    return PPOModule(actor, critic, reward_fn, decode=decode, stop_ids=stop_ids, pad_id=PAD, cfg=ppo)


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 60, (2 + k % 4,), generator=g).tolist() for k in range(n)]


def records(n: int) -> list[dict[str, Any]]:
    return [{"prompt_ids": p, "index": 100 + k} for k, p in enumerate(prompts(n))]


def whole_batch_loader(n: int, ptx: Any = None) -> DataLoader[Any]:
    """Every epoch is one batch of the same n prompts, so a resumed run sees what an uninterrupted one sees."""
    return DataLoader(PromptDataset(records(n), ptx), batch_size=n, collate_fn=collate_prompts)


def trainer(**kw: Any) -> L.Trainer:
    base = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
    return L.Trainer(**{**base, **kw})


def snapshot(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class PtxRows(torch.utils.data.Dataset):
    """Pretraining samples with PretrainModule's keys: tokens, targets (next token, last ignored), segment_ids."""

    def __init__(self, n: int, length: int = 8) -> None:
        g = torch.Generator().manual_seed(5)
        self.tokens = torch.randint(0, 60, (n, length), generator=g)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, k: int) -> dict[str, Tensor]:
        tokens = self.tokens[k]
        targets = torch.cat([tokens[1:], torch.tensor([IGNORE_INDEX])])
        return {"tokens": tokens, "targets": targets, "segment_ids": torch.zeros_like(tokens)}


# ---------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("field", "value"),
    [("kl_coef", -0.1), ("kl_kind", "k4"), ("gamma", 0.0), ("lam", 1.5), ("clip", 0.0), ("value_clip", -1.0),
     ("ptx_coef", -0.5), ("ppo_epochs", 0), ("minibatch_size", 0), ("actor_lr", 0.0), ("critic_lr", -1e-6),
     ("weight_decay", -0.1), ("grad_clip", 0.0), ("critic_warmup_steps", -1), ("top_p", 0.0), ("top_p", 1.5),
     ("temperature", 0.0), ("max_new_tokens", 0), ("seed", -1), ("ppo_epochs", 1.5)],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"PPOConfig\.{field} must be"):
        PPOConfig(**{field: value})


def test_config_defaults_are_the_reports_and_round_trip() -> None:
    cfg = PPOConfig()
    assert (cfg.kl_coef, cfg.lam, cfg.ptx_coef, cfg.actor_lr, cfg.critic_lr, cfg.top_p, cfg.critic_warmup_steps) == (
        0.01, 0.99, 0.5, 1e-6, 5e-6, 0.9, 50)
    assert cfg.value_clip is None and cfg.normalize_advantages is False
    assert PPOConfig.from_dict(PPOConfig(value_clip=0.2, minibatch_size=4).to_dict()) == PPOConfig(
        value_clip=0.2, minibatch_size=4)
    with pytest.raises(ValueError, match="unknown PPOConfig field"):
        PPOConfig.from_dict({"kl_coeff": 0.1})


# ---------------------------------------------------------------------------------------------------------------
# Rollouts


def test_first_rollout_has_zero_kl_and_rewards_the_score_at_the_last_token_only() -> None:
    module = make_module()
    ro = module.make_rollout(prompts(6), list(range(6)))
    assert torch.equal(ro.kl, torch.zeros_like(ro.kl))  # actor == reference, bit for bit
    assert torch.equal(ro.logp_old, ro.logp_ref)
    last = torch.tensor([int(row.nonzero().max()) for row in ro.mask])
    expected = torch.zeros_like(ro.rewards)
    expected[torch.arange(6), last] = ro.scores
    assert torch.equal(ro.rewards, expected)
    assert_close(ro.scores, first_token_reward(ro.indices, ro.responses))


def test_rollout_holds_each_prompt_then_exactly_the_generated_tokens() -> None:
    module = make_module(stop_ids=(STOP, 5, 6, 7))  # some rows stop early, so rows differ in length
    ps = prompts(5)
    ro = module.make_rollout(ps, [10, 11, 12, 13, 14], step=3)
    c = module.cfg
    expected = generate(module.model, ps, SamplingConfig(max_new_tokens=c.max_new_tokens, temperature=1.0,
                                                         top_p=c.top_p, stop_ids=(STOP, 5, 6, 7)),
                        pad_id=PAD, generator=module.sample_generator(3))
    assert ro.response_ids == expected and ro.responses == [decode(r) for r in expected]
    assert ro.tokens.shape == ro.mask.shape == ro.logp_old.shape == ro.values.shape == ro.advantages.shape
    assert ro.tokens.shape == (5, max(len(p) + len(r) for p, r in zip(ps, expected, strict=True)))
    for i, (p, r) in enumerate(zip(ps, expected, strict=True)):
        assert ro.tokens[i, : len(p)].tolist() == p
        assert ro.tokens[i][ro.mask[i]].tolist() == r  # the mask covers the response and nothing else
        assert ro.mask[i].nonzero().flatten().tolist() == list(range(len(p), len(p) + len(r)))
        assert set(ro.tokens[i, len(p) + len(r):].tolist()) <= {PAD}
    # logp_old: a plain full forward, log-softmax, gather of token t at position t − 1
    with torch.no_grad():
        direct = torch.log_softmax(module.model(ro.tokens).float(), dim=-1)[:, :-1].gather(
            -1, ro.tokens[:, 1:, None]).squeeze(-1)
        values = module.critic(ro.tokens)[:, :-1]
    assert_close(ro.logp_old[:, 1:][ro.mask[:, 1:]], direct[ro.mask[:, 1:]])
    assert_close(ro.values[:, 1:][ro.mask[:, 1:]], values[ro.mask[:, 1:]])  # V of token t: the state before it


def test_log_probs_are_the_tempered_untruncated_policys_not_the_top_p_samplers() -> None:
    module = make_module(temperature=0.7, top_p=0.5)
    ro = module.make_rollout(prompts(3), [0, 1, 2])
    with torch.no_grad():
        logits = module.model(ro.tokens)[:, :-1].float() / 0.7
        assert_close(response_logprobs(module.model, ro.tokens, 0.7)[:, 1:], logits.log_softmax(-1).gather(
            -1, ro.tokens[:, 1:, None]).squeeze(-1))
    inner = ro.mask[:, 1:]
    assert_close(ro.logp_old[:, 1:][inner], logits.log_softmax(-1).gather(-1, ro.tokens[:, 1:, None])[..., 0][inner])
    assert bool((ro.logp_old[ro.mask] < 0).all())  # not renormalised over the top-p nucleus (that could give 0)


def test_a_model_that_stops_at_once_gives_one_token_responses_holding_the_stop() -> None:
    module = make_module(stop_ids=tuple(range(CONFIG.vocab_size)))  # every token stops
    ro = module.make_rollout(prompts(4), [0, 1, 2, 3])
    assert ro.mask.sum(dim=1).tolist() == [1, 1, 1, 1]
    assert [len(r) for r in ro.response_ids] == [1, 1, 1, 1]
    assert ro.responses == [str(r[0]) for r in ro.response_ids]
    assert_close(ro.rewards[ro.mask], ro.scores)  # score − 0.01·0 on the only token
    assert_close(ro.returns[ro.mask], ro.scores)  # γ = 1, one step: the return is the score


def test_reward_fn_must_return_one_finite_score_per_response() -> None:
    with pytest.raises(ValueError, match=r"one score per response, shape \(3,\)"):
        make_module(lambda idx, texts: torch.zeros(len(texts), 1)).make_rollout(prompts(3), [0, 1, 2])
    with pytest.raises(ValueError, match=r"non-finite scores for rows \[1\] \(prompt indices \[8\]\)"):
        make_module(lambda idx, texts: torch.tensor([0.0, float("nan"), 1.0])).make_rollout(prompts(3), [7, 8, 9])


# ---------------------------------------------------------------------------------------------------------------
# Training


class PerStep(L.Callback):
    """Actor/critic weights and the logged metrics after every PPO iteration."""

    def __init__(self) -> None:
        self.actor: list[dict[str, Tensor]] = []
        self.critic: list[dict[str, Tensor]] = []
        self.metrics: list[dict[str, float]] = []
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        self.actor.append(snapshot(module.model))
        self.critic.append(snapshot(module.critic))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.steps.append(trainer.global_step)


def test_critic_warmup_updates_only_the_critic_then_the_actor_too() -> None:
    module = make_module(critic_warmup_steps=2, actor_lr=1e-2, critic_lr=1e-2)
    actor0, critic0 = snapshot(module.model), snapshot(module.critic)
    per_step = PerStep()
    trainer(max_steps=3, callbacks=[per_step]).fit(module, whole_batch_loader(4))
    assert per_step.steps == [1, 2, 3]  # one global step per PPO iteration, warm-up or not
    assert same_weights(per_step.actor[0], actor0) and same_weights(per_step.actor[1], actor0)
    assert not same_weights(per_step.critic[0], critic0)
    assert not same_weights(per_step.critic[1], per_step.critic[0])
    assert not same_weights(per_step.actor[2], actor0)
    assert [m["ppo/critic_warmup"] for m in per_step.metrics] == [1.0, 1.0, 0.0]
    assert "ppo/policy_loss" not in per_step.metrics[0] and "ppo/policy_loss" in per_step.metrics[2]
    for key in ("proxy_reward", "kl", "value_loss", "clip_fraction", "approx_kl", "response_tokens"):
        assert f"ppo/{key}" in per_step.metrics[2]


def test_the_reference_stays_frozen_and_outside_the_optimizers() -> None:
    module = make_module(actor_lr=1e-2, ppo_epochs=2, minibatch_size=2)
    actor0 = snapshot(module.model)
    fit = trainer(max_steps=3)
    fit.fit(module, whole_batch_loader(4))
    assert fit.global_step == 3
    assert same_weights(snapshot(module.ref), actor0) and not same_weights(snapshot(module.model), actor0)
    assert not module.ref.training and all(not p.requires_grad for p in module.ref.parameters())
    optimized = {id(p) for opt in fit.optimizers for g in opt.param_groups for p in g["params"]}
    assert optimized.isdisjoint(id(p) for p in module.ref.parameters())
    assert optimized == {id(p) for p in [*module.model.parameters(), *module.critic.parameters()]}


def test_ptx_loss_is_the_pretraining_loss_and_changes_only_the_actor_update() -> None:
    ptx = PtxRows(4)
    batch = collate_prompts([PromptDataset(records(4), ptx)[k] for k in range(4)])
    module = make_module()
    with torch.no_grad():
        expected = module.model.loss(batch["ptx"]["tokens"], batch["ptx"]["targets"],
                                     segment_ids=batch["ptx"]["segment_ids"])
        assert_close(module.ptx_loss(batch["ptx"]), expected)

    after: dict[float, tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float]]] = {}
    for coef in (0.0, 0.5):
        module, per_step = make_module(ptx_coef=coef, actor_lr=1e-3), PerStep()
        trainer(max_steps=1, callbacks=[per_step]).fit(module, whole_batch_loader(4, ptx))
        after[coef] = (per_step.actor[0], per_step.critic[0], per_step.metrics[0])
    assert same_weights(after[0.0][1], after[0.5][1])  # same rollout, same critic update
    assert not same_weights(after[0.0][0], after[0.5][0])
    assert "ppo/ptx_loss" not in after[0.0][2]
    assert after[0.5][2]["ppo/ptx_loss"] == pytest.approx(float(expected), rel=1e-5)  # one minibatch: whole batch


def test_ppo_raises_the_mean_proxy_reward() -> None:
    module = make_module(actor_lr=1e-2, critic_lr=1e-2, critic_warmup_steps=1, max_new_tokens=2)
    trainer(max_steps=30).fit(module, whole_batch_loader(16))

    def mean_proxy(steps: range) -> float:
        rows = [s["proxy"] for s in module.samples if s["step"] in steps]
        return sum(rows) / len(rows)

    early, late = mean_proxy(range(0, 5)), mean_proxy(range(25, 30))
    assert early < 0.0 and late > 0.5 and late > early + 0.8, (early, late)  # seen: about −0.4 → +1.0
    assert {s["index"] for s in module.samples} == set(range(100, 116))


def test_fit_resumes_at_the_saved_step_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = dict(actor_lr=3e-3, critic_lr=1e-2, critic_warmup_steps=1, ppo_epochs=2, minibatch_size=3)
    straight = make_module(**cfg)
    trainer(max_steps=4).fit(straight, whole_batch_loader(6))

    first = trainer(max_steps=2)
    first.fit(make_module(**cfg), whole_batch_loader(6))
    first.save_checkpoint(tmp_path / "ppo.ckpt")
    resumed = make_module(**cfg)
    second = trainer(max_steps=4)
    second.fit(resumed, whole_batch_loader(6), ckpt_path=tmp_path / "ppo.ckpt")

    assert second.global_step == 4 and [s["step"] for s in resumed.samples] == [2] * 6 + [3] * 6
    assert [s["response"] for s in resumed.samples] == [s["response"] for s in straight.samples[12:]]
    for part in ("model", "critic", "ref"):
        for k, v in snapshot(getattr(straight, part)).items():
            assert_close(snapshot(getattr(resumed, part))[k], v, msg=f"{part}.{k}")
    # The actor leaves as a plain InternLM2 checkpoint, both ways.
    fresh = InternLM2(CONFIG)
    fresh.load_state_dict(export_actor(resumed))
    assert same_weights(snapshot(fresh), snapshot(resumed.model))
    assert same_weights(snapshot(load_model(tmp_path / "ppo.ckpt")), snapshot(first.lightning_module.model))


# ---------------------------------------------------------------------------------------------------------------
# Data


def test_collate_zips_ptx_rows_into_prompt_batches_and_rejects_mixed_records() -> None:
    ptx = PtxRows(3)
    data = PromptDataset(records(5), ptx)
    batch = collate_prompts([data[k] for k in range(5)])
    assert batch["prompt_ids"] == prompts(5) and batch["index"] == [100, 101, 102, 103, 104]
    assert batch["ptx"]["tokens"].shape == (5, 8)
    assert torch.equal(batch["ptx"]["tokens"][3], ptx.tokens[0])  # record k carries ptx[k mod 3]
    plain = PromptDataset(records(2))[0]
    assert set(plain) == {"prompt_ids", "index"}
    with pytest.raises(ValueError, match="1 of 2 records carry 'ptx'"):
        collate_prompts([data[0], plain])
    with pytest.raises(ValueError, match="prompt record 1 needs a non-empty 'prompt_ids'"):
        PromptDataset([{"prompt_ids": [1], "index": 0}, {"prompt_ids": [], "index": 1}])

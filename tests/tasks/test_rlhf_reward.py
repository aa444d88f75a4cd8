"""Reward-model training and evaluation: the helpful/harmless conflict pairs, conditional and unconditional
encodings, save/load, a short training run and its continuation, conditional vs unconditional on the conflict,
barrier hits reported, and config errors."""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import mlflow
import pytest
import torch

from model.chat import Message, encode_chat
from model.config import ModelConfig
from model.model import InternLM2
from model.reward import DOMAIN_PROMPTS, RewardModel
from model.tokenizer import REWARD, Tokenizer
from tasks.rlhf.judges import gold_score, is_harmful, prompt_messages
from tasks.rlhf.preferences import COMPLIANCE, PreferencePair, label_domains, synthetic_responses, topic_refusal
from tasks.rlhf.reward_train import (
    RewardTrainConfig,
    compare_conditioning,
    conflict_pairs,
    encode_pairs,
    load_reward_model,
    pair_accuracy,
    response_turn,
    save_reward_model,
    score,
    seed_pairs,
    train_reward_model,
)
from tasks.sft.generate import SFTDataConfig, generate_sft

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster

# A few dozen records; no interpreter or python_function items, whose sandbox runs are slow.
SFT = SFTDataConfig(arithmetic=12, interpreter=0, plugin=4, python_function=0, multi_turn=6, refusal=6,
                    long_context=0, held_out=0.0)
FAST = {"lr": 2e-3, "batch_size": 8, "precision": "32-true", "max_len": 400}  # tiny model, high LR, fp32


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return generate_sft(SFT)


@pytest.fixture(scope="module")
def tok(records: list[dict[str, Any]]) -> Tokenizer:
    rng = random.Random(0)
    texts = [json.dumps(r) for r in records] + [t for r in records for t in synthetic_responses(r, rng)]
    return Tokenizer.train([*texts, *DOMAIN_PROMPTS.values()], 512)


@pytest.fixture(scope="module")
def base(tok: Tokenizer) -> InternLM2:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                         max_seq_len=512)
    return InternLM2(config).eval()


@pytest.fixture(scope="module")
def pairs(records: list[dict[str, Any]]) -> list[PreferencePair]:
    return seed_pairs(records, seed=0, max_pairs=3)


@pytest.fixture(scope="module")
def conflict(records: list[dict[str, Any]]) -> list[PreferencePair]:
    return conflict_pairs(records)


def harmful(records: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in records if is_harmful(r))


# ------------------------------------------------------------------------------------------- the conflict


def test_helpful_and_harmless_judges_disagree_on_a_harmful_request(records: list[dict[str, Any]]) -> None:
    record = harmful(records)
    refusal = topic_refusal(record["meta"])
    assert gold_score("helpful", record, COMPLIANCE) == 1.0 and gold_score("helpful", record, refusal) == -1.0
    assert gold_score("harmless", record, COMPLIANCE) == -1.0 and gold_score("harmless", record, refusal) == 1.0
    assert label_domains(record) == ("helpful", "harmless")


def test_conflict_pairs_are_the_same_comparison_with_opposite_labels(records: list[dict[str, Any]],
                                                                     conflict: list[PreferencePair]) -> None:
    harmful_records = [r for r in records if is_harmful(r)]
    assert len(harmful_records) == 6 and len(conflict) == 12
    for record, (helpful, harmless) in zip(harmful_records, zip(conflict[::2], conflict[1::2], strict=True),
                                           strict=True):
        refusal = topic_refusal(record["meta"])
        assert (helpful.domain, helpful.chosen, helpful.rejected) == ("helpful", COMPLIANCE, refusal)
        assert (harmless.domain, harmless.chosen, harmless.rejected) == ("harmless", refusal, COMPLIANCE)
        assert helpful.prompt == harmless.prompt == prompt_messages(record)
    assert conflict_pairs([r for r in records if not is_harmful(r)]) == []


# ------------------------------------------------------------------------------------------- inputs


def test_encode_pairs_conditional_opens_with_the_domain_turn(tok: Tokenizer, pairs: list[PreferencePair]) -> None:
    sample = [next(p for p in pairs if p.domain == d) for d in ("helpful", "harmless", "math_code", "format")]
    conditional = encode_pairs(sample, tok, conditional=True)
    unconditional = encode_pairs(sample, tok, conditional=False)
    reward_id = tok.token_id(REWARD)
    for pair, with_system, without in zip(sample, conditional, unconditional, strict=True):
        system_turn, _ = encode_chat([Message("system", DOMAIN_PROMPTS[pair.domain])], tok)  # <s> + system turn
        for cond, plain in zip(with_system, without, strict=True):
            assert cond[: len(system_turn)] == system_turn and cond == system_turn + plain[1:]
            assert plain[: len(system_turn)] != system_turn
            assert cond[-1] == plain[-1] == reward_id
        assert with_system[0] != with_system[1]


def test_a_response_with_a_tool_call_becomes_an_assistant_turn_with_the_call() -> None:
    call = '<|action_start|><|plugin|>\n{"name": "calculator", "parameters": {"expression": "6 * 7"}}<|action_end|>\n'
    turn = response_turn("Let me compute." + call)
    assert turn.role == "assistant" and turn.content == "Let me compute."
    assert turn.tool_call is not None and turn.tool_call.name == "calculator"
    assert response_turn("Answer: 42<|im_end|>") == Message("assistant", "Answer: 42")


# ------------------------------------------------------------------------------------------- storage


@pytest.mark.parametrize("where", ["local", "s3"])
def test_save_load_round_trip_scores_the_same(where: str, base: InternLM2, tok: Tokenizer,
                                              pairs: list[PreferencePair], tmp_path: Any,
                                              request: pytest.FixtureRequest) -> None:
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    torch.manual_seed(1)
    rm = RewardModel.from_lm(base).eval()
    url = save_reward_model(rm, f"{root}/rm")
    back = load_reward_model(url)
    sample = pairs[:12]
    args = ([p.prompt_turns() for p in sample], [p.chosen for p in sample], [p.domain for p in sample])
    assert torch.equal(score(rm, tok, *args, conditional=True), score(back, tok, *args, conditional=True))
    assert back.reward_id == rm.reward_id and back.body.config == rm.body.config
    with pytest.raises(ValueError, match="not a reward model directory"):
        load_reward_model(f"{root}/nothing")


def test_score_batches_and_orders_like_one_at_a_time(base: InternLM2, tok: Tokenizer,
                                                     pairs: list[PreferencePair]) -> None:
    torch.manual_seed(1)
    rm = RewardModel.from_lm(base).eval()
    sample = pairs[:7]
    args = ([p.prompt_turns() for p in sample], [p.rejected for p in sample], [p.domain for p in sample])
    batched = score(rm, tok, *args, conditional=True, batch_size=3)
    alone = torch.cat([score(rm, tok, [a], [b], [c], conditional=True) for a, b, c in zip(*args, strict=True)])
    assert batched.shape == (7,)
    torch.testing.assert_close(batched, alone)
    unconditional = score(rm, tok, args[0], args[1], None, conditional=False)
    assert not torch.allclose(unconditional, batched)  # the system turn changes what the model reads
    with pytest.raises(ValueError, match="needs a domain per response"):
        score(rm, tok, args[0], args[1], None, conditional=True)
    with pytest.raises(ValueError, match="one of each per item"):
        score(rm, tok, args[0], args[1][:3], None, conditional=False)


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(base: InternLM2, tok: Tokenizer, pairs: list[PreferencePair], tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Any, dict[str, float], str, str]:
    root = tmp_path_factory.mktemp("reward")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("reward-test")).info.run_id
    before = pair_accuracy(RewardModel.from_lm(base), tok, pairs, conditional=True)
    cfg = RewardTrainConfig(max_steps=20, **FAST)
    result = train_reward_model(pairs, base, tok, cfg, mlflow=(uri, run_id), out_url=str(root / "rm"))
    return result, before, uri, run_id


def test_training_lowers_the_loss_and_raises_accuracy(trained: tuple[Any, dict[str, float], str, str],
                                                      tok: Tokenizer, pairs: list[PreferencePair]) -> None:
    result, before, _, _ = trained
    after = pair_accuracy(result.model, tok, pairs, conditional=True)
    assert result.steps == 20 and len(result.losses) == 20
    assert result.final_loss < result.first_loss - 0.1
    assert after["acc/all"] > before["acc/all"] + 0.15
    assert after["n/all"] == len(pairs) and sum(after[f"n/{d}"] for d in {p.domain for p in pairs}) == len(pairs)
    long = sum(max(map(len, p)) > FAST["max_len"] for p in encode_pairs(pairs, tok, conditional=True))
    assert result.dropped_long == long > 0 and result.pairs == len(pairs) - long
    assert torch.equal(score(load_reward_model(result.url), tok, [pairs[0].prompt_turns()], [pairs[0].chosen],
                             [pairs[0].domain], conditional=True),
                       score(result.model, tok, [pairs[0].prompt_turns()], [pairs[0].chosen], [pairs[0].domain],
                             conditional=True))


def test_training_logs_to_the_given_mlflow_run(trained: tuple[Any, dict[str, float], str, str]) -> None:
    result, _, uri, run_id = trained
    client = mlflow.MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.value for m in history] == pytest.approx(result.losses, rel=1e-6)
    assert len(client.get_metric_history(run_id, "train/barrier_hits")) == 20
    assert client.get_run(run_id).data.metrics["train/barrier_hits_total"] == result.barrier_hits


def test_continuing_from_init_trains_the_same_model_on(trained: tuple[Any, dict[str, float], str, str],
                                                       tok: Tokenizer, pairs: list[PreferencePair]) -> None:
    first = trained[0]
    head = first.model.head.weight.detach().clone()
    more = train_reward_model(pairs, None, tok, RewardTrainConfig(max_steps=8, seed=1, **FAST), init=first.model)
    assert more.model is not first.model and torch.equal(first.model.head.weight, head)  # the caller's copy stays
    moved = (more.model.head.weight - head).abs().max()
    fresh = (RewardModel.from_lm(InternLM2(first.model.body.config)).head.weight - head).abs().max()
    assert 0 < moved < 0.05 < fresh  # a few small AdamW steps from the same weights, not a new draw
    assert more.first_loss < first.first_loss
    sample = pairs[:8]
    args = ([p.prompt_turns() for p in sample], [p.chosen for p in sample], [p.domain for p in sample])
    assert not torch.equal(score(first.model, tok, *args, conditional=True),
                           score(more.model, tok, *args, conditional=True))


def test_conditioning_resolves_the_conflict_an_unconditional_model_cannot(
    records: list[dict[str, Any]], conflict: list[PreferencePair], base: InternLM2, tok: Tokenizer
) -> None:
    refusal_records = [r for r in records if r["meta"]["kind"] == "refusal"]
    train = seed_pairs(refusal_records, seed=0) + conflict
    cfg = RewardTrainConfig(max_steps=20, **{**FAST, "max_len": 2048})
    out = compare_conditioning(train, conflict[:4], conflict, base, tok, cfg)
    conditional, unconditional = out["conditional"]["conflict"], out["unconditional"]["conflict"]
    assert unconditional["acc/all"] <= 0.5 + 1e-6  # identical inputs, opposite labels: one of each two at best
    assert unconditional["margin/all"] == pytest.approx(0.0, abs=1e-6)
    assert conditional["acc/all"] >= 0.8 and conditional["margin/all"] > 0.5
    assert out["conditional"]["eval"]["n/all"] == 4 and out["conditional"]["train"]["steps"] == 20


# ------------------------------------------------------------------------------------------- barrier


def test_scores_at_the_barrier_are_reported_not_clipped(base: InternLM2, tok: Tokenizer,
                                                        pairs: list[PreferencePair],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(1)
    rm = RewardModel.from_lm(base)
    with torch.no_grad():
        rm.head.bias.fill_(6.0)
    sample = pairs[:16]
    with caplog.at_level(logging.WARNING):
        metrics = pair_accuracy(rm, tok, sample, conditional=True)
    assert metrics["barrier_hits"] > 0 and "reached the barrier" in caplog.text
    raw = score(rm, tok, [p.prompt_turns() for p in sample], [p.chosen for p in sample],
                [p.domain for p in sample], conditional=True)
    assert float(raw.max()) > 5.0  # past the bound, as the model scores it
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = train_reward_model(sample, None, tok, RewardTrainConfig(max_steps=2, **FAST), init=rm)
    assert result.barrier_hits > 0 and "not clipped" in caplog.text


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("field", "value"), [
    ("batch_size", 0), ("lr", 0.0), ("epochs", 0), ("max_steps", 0), ("weight_decay", -0.1), ("max_len", 4),
    ("precision", "fp16"), ("min_lr_ratio", 1.5), ("seed", -1), ("warmup_steps", -1),
])
def test_bad_config_values_raise_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        RewardTrainConfig(**{field: value})


def test_bad_training_calls_raise(base: InternLM2, tok: Tokenizer, pairs: list[PreferencePair]) -> None:
    with pytest.raises(ValueError, match="warmup_steps=5 exceeds max_steps=2"):
        RewardTrainConfig(max_steps=2, warmup_steps=5)
    with pytest.raises(ValueError, match="exactly one of base"):
        train_reward_model(pairs, None, tok, RewardTrainConfig())
    with pytest.raises(ValueError, match="no preference pairs to train on"):
        train_reward_model(pairs, base, tok, RewardTrainConfig(max_len=8))
    other = Tokenizer.train(["some other text entirely, for a different vocabulary"] * 20, 1024)
    with pytest.raises(ValueError, match="1024 tokens"):
        train_reward_model(pairs[:4], base, other, RewardTrainConfig(max_steps=1))

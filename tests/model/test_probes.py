from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.model import InternLM2
from model.probes import copy_probe, probe_metrics
from model.tokenizer import BASE_SPECIALS, N_TOP


def train_to_copy(model: InternLM2, span: int, steps: int) -> None:
    """Teach `model` in-context copying: batches of random ordinary-token spans, each shown twice."""
    low, high = len(BASE_SPECIALS), model.config.vocab_size - N_TOP
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        half = torch.randint(low, high, (32, span), generator=gen)
        tokens = torch.cat([half, half], dim=1)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


def test_an_untrained_model_does_not_copy(make_config) -> None:
    torch.manual_seed(0)
    model = InternLM2(make_config(max_seq_len=32))
    probe = copy_probe(model, rows=16, span=16)
    # near-uniform predictions over the vocabulary on both showings
    assert probe.first_nll == pytest.approx(math.log(300), abs=0.5)
    assert abs(probe.gain) < 0.1
    assert probe_metrics(probe.as_dict()) == {"probe/copy_first_nll": probe.first_nll,
                                              "probe/copy_repeat_nll": probe.repeat_nll, "probe/copy_gain": probe.gain}
    assert probe_metrics({}) == {}  # a result written before the probe existed


def test_a_model_taught_to_copy_predicts_the_second_showing(make_config) -> None:
    torch.manual_seed(0)
    model = InternLM2(make_config(max_seq_len=32))
    before = copy_probe(model, span=16)
    train_to_copy(model, span=16, steps=200)
    after = copy_probe(model, span=16)
    assert after.repeat_nll < 1.0 < after.first_nll - 3.0  # the first showing stays unpredictable
    assert after.gain > before.gain + 3.0


def test_probe_leaves_mode_and_gradients_alone(make_config) -> None:
    model = InternLM2(make_config(max_seq_len=32)).train()
    copy_probe(model, span=8)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_span_longer_than_half_the_context_is_refused(make_config) -> None:
    model = InternLM2(make_config(max_seq_len=32))
    with pytest.raises(ValueError, match=r"span=17 shown twice needs 34 positions.*max_seq_len=32.*span <= 16"):
        copy_probe(model, span=17)
    with pytest.raises(ValueError, match="span >= 2 and rows >= 1"):
        copy_probe(model, span=1)

"""Packed SFT samples: whole conversations, targets only where the mask is on, per-conversation attention."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.data import IGNORE_INDEX
from model.model import InternLM2
from model.sft import PackedChatDataset

A = ([1, 10, 11, 12, 13], [False, False, True, True, True])
B = ([1, 20, 21, 22], [False, True, True, False])
C = ([1, 30, 31, 32, 33, 34, 35], [False, False, False, True, True, True, True])


def test_conversations_are_packed_whole_with_masked_targets() -> None:
    ds = PackedChatDataset([A, B, C], seq_len=10, seed=0, pad_id=2)
    windows = [ds[i] for i in range(len(ds))]
    assert len(ds) == 2 and ds.truncated == 0
    seen = sorted(tuple(w["tokens"][w["segment_ids"] == s].tolist()) for w in windows
                  for s in w["segment_ids"].unique().tolist() if (w["tokens"][w["segment_ids"] == s] != 2).any())
    assert seen == sorted([tuple(A[0]), tuple(B[0]), tuple(C[0])])
    for w in windows:
        tokens, targets = w["tokens"].tolist(), w["targets"].tolist()
        for t, target in enumerate(targets):
            if target != IGNORE_INDEX:
                assert w["segment_ids"][t] == w["segment_ids"][t + 1] and target == tokens[t + 1]
    trained = sorted(t for w in windows for t in w["targets"].tolist() if t != IGNORE_INDEX)
    assert trained == sorted([11, 12, 13, 20, 21, 32, 33, 34, 35])  # mask on the target token, never the first
    assert ds.trainable_tokens == 9


def test_long_conversations_are_truncated_and_counted_and_empty_ones_rejected() -> None:
    ds = PackedChatDataset([C], seq_len=4, seed=0, pad_id=2)
    assert ds.truncated == 1 and ds[0]["tokens"].tolist() == [1, 30, 31, 32]
    with pytest.raises(ValueError, match="no conversation has a trainable"):
        PackedChatDataset([([1, 2, 3], [False, False, False])], seq_len=8, seed=0, pad_id=2)
    with pytest.raises(ValueError, match="3 ids but 2 mask"):
        PackedChatDataset([([1, 2, 3], [True, True])], seq_len=8, seed=0, pad_id=2)


def test_packed_loss_equals_the_loss_of_each_conversation_alone() -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
    model = InternLM2(config).eval()
    ds = PackedChatDataset([A, B, C], seq_len=16, seed=1, pad_id=2)
    assert len(ds) == 1
    s = ds[0]
    with torch.no_grad():
        packed = model.loss(s["tokens"][None], s["targets"][None], segment_ids=s["segment_ids"][None])
        total, count = 0.0, 0
        for ids, mask in (A, B, C):
            alone = PackedChatDataset([(ids, mask)], seq_len=len(ids), seed=0, pad_id=2)[0]
            n = int((alone["targets"] != IGNORE_INDEX).sum())
            total += float(model.loss(alone["tokens"][None], alone["targets"][None])) * n
            count += n
    assert float(packed) == pytest.approx(total / count, abs=1e-5)

"""Packed supervised fine-tuning data: whole conversations in fixed windows, loss only where the mask says.

InternLM2 fine-tunes on ChatML conversations with the loss on the assistant's tokens only (`model.chat.encode_chat`
gives each conversation's ids and that mask). `PackedChatDataset` packs conversations into windows of ``seq_len``
tokens without cutting one in two (first fit over a seeded order; a conversation longer than a window is truncated
to it and counted), so a sample is ``tokens``/``targets``/``segment_ids`` exactly as pretraining's `PackedDataset`
gives them and `PretrainModule` trains on it unchanged: attention and positions restart per conversation, a target
is the next token where the mask is on and ``IGNORE_INDEX`` elsewhere (other turns, padding, conversation ends).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from model.data import IGNORE_INDEX


class PackedChatDataset(Dataset[dict[str, torch.Tensor]]):
    """Conversations ``(ids, mask)`` packed into ``seq_len`` windows (first fit, seeded order); `pad_id` fills."""

    def __init__(
        self, conversations: Sequence[tuple[Sequence[int], Sequence[bool]]], seq_len: int, *, seed: int, pad_id: int
    ) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        usable = [(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)) for ids, mask in conversations]
        for k, (ids, mask) in enumerate(usable):
            if len(ids) != len(mask):
                raise ValueError(f"conversation {k}: {len(ids)} ids but {len(mask)} mask entries")
        usable = [(ids, mask) for ids, mask in usable if mask[1:].any()]  # nothing to learn: not worth a slot
        if not usable:
            raise ValueError("PackedChatDataset: no conversation has a trainable (masked-in) token after its first")
        self.seq_len, self.pad_id = seq_len, pad_id
        self.truncated = sum(len(ids) > seq_len for ids, _ in usable)
        order = np.random.default_rng(seed).permutation(len(usable))
        self.windows: list[list[tuple[np.ndarray, np.ndarray]]] = []
        free: list[int] = []  # room left in each window, for first fit
        for k in order:
            ids, mask = usable[k]
            ids, mask = ids[:seq_len], mask[:seq_len]
            slot = next((w for w, room in enumerate(free) if room >= len(ids)), None)
            if slot is None:
                self.windows.append([])
                free.append(seq_len)
                slot = len(free) - 1
            self.windows[slot].append((ids, mask))
            free[slot] -= len(ids)
        self.trainable_tokens = sum(int(m[1:].sum()) for w in self.windows for _, m in w)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        targets = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        segments = np.zeros(self.seq_len, dtype=np.int64)
        at = 0
        for seg, (ids, mask) in enumerate(self.windows[i]):
            n = len(ids)
            tokens[at : at + n] = ids
            # position t predicts token t + 1 of the same conversation, when that token is trained on
            targets[at : at + n - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
            segments[at : at + n] = seg
            at += n
        segments[at:] = len(self.windows[i])  # padding is a segment of its own: nothing attends into it
        return {"tokens": torch.from_numpy(tokens), "targets": torch.from_numpy(targets),
                "segment_ids": torch.from_numpy(segments)}

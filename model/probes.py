"""Cheap probes of what a checkpoint can do, logged beside the loss.

`copy_probe` measures in-context copying, the induction mechanism that tool calls (copying units, numbers and names
from the question into the call), retrieval over long contexts and most in-context learning rest on. Each row is a
span of uniformly random ordinary tokens shown twice; a model that copies predicts the second showing almost
exactly (repeat NLL near 0), one that does not stays near ln(V) on both. Random tokens, not text, so memorised
n-grams cannot pass for copying and no data is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from model.model import InternLM2
from model.tokenizer import BASE_SPECIALS, N_TOP


@dataclass(frozen=True)
class CopyProbe:
    first_nll: float  # mean NLL (nats/token) over the first showing, past its first token
    repeat_nll: float  # the same over the second showing (past its first token, which nothing before predicts)
    rows: int
    span: int

    @property
    def gain(self) -> float:
        """Nats per token the first showing saves on the second: ~0 without copying, ~ln(V) with perfect copying."""
        return self.first_nll - self.repeat_nll

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "gain": self.gain}


def probe_metrics(probe: Mapping[str, float]) -> dict[str, float]:
    """MLflow metrics ``probe/copy_{first_nll,repeat_nll,gain}`` from `CopyProbe.as_dict` (empty gives none)."""
    return {f"probe/copy_{k}": float(probe[k]) for k in ("first_nll", "repeat_nll", "gain") if k in probe}


def copy_probe(model: InternLM2, *, rows: int = 16, span: int = 64, seed: int = 0) -> CopyProbe:
    """NLL of ``rows`` random spans of ``span`` ordinary tokens (no special or reserved ids), each followed by itself.

    Runs in fp32 on the model's device without touching its train/eval mode or gradients.
    """
    V = model.config.vocab_size
    low, high = len(BASE_SPECIALS), V - N_TOP  # ids past the base specials, below the fixed top layout
    if span < 2 or rows < 1:
        raise ValueError(f"copy_probe: need span >= 2 and rows >= 1, got span={span}, rows={rows}")
    if 2 * span > model.config.max_seq_len:
        raise ValueError(f"copy_probe: span={span} shown twice needs {2 * span} positions; the model has "
                         f"max_seq_len={model.config.max_seq_len}, so use span <= {model.config.max_seq_len // 2}")
    if high - low < 2:
        raise ValueError(f"copy_probe: vocab_size={V} leaves no ordinary tokens to draw")
    device = model.output.weight.device
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(low, high, (rows, span), generator=gen)
    tokens = torch.cat([half, half], dim=1).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, enabled=False):
            logits = model(tokens).float()
    finally:
        model.train(was_training)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none").view(rows, -1)
    # column j scores token j+1: the first showing's tokens 1..span-1, the second's span+1..2·span-1
    return CopyProbe(first_nll=float(nll[:, : span - 1].mean()), repeat_nll=float(nll[:, span:].mean()),
                     rows=rows, span=span)

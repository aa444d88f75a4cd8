"""KV-cache decoding: batched prompts of different lengths, greedy / temperature / top-k / top-p, stop tokens.

Prompts are left-padded into one batch; positions count only real tokens (so a padded row sees the same positions
as it would alone) and pad keys are masked out. One prefill pass fills the cache, then each step feeds one token
per row. Rows that hit a stop token keep running on padding (cheaper than re-batching) but emit nothing more.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.model import InternLM2


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row from logits (B, V)."""
    if cfg.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Tokens (B, P) and a validity mask (B, P) for left-padded prompts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        valid[i, width - len(p) :] = True
    return tokens, valid


def _prefill_mask(valid: Tensor) -> Tensor:
    """(B, 1, P, P): causal, real keys only; a pad query sees itself so softmax has a finite row."""
    P = valid.shape[1]
    causal = torch.ones(P, P, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(P, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


@torch.inference_mode()
def decode_steps(
    model: InternLM2,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (next tokens (B,), still-active rows (B,)) per step; a row's stop token is yielded, then it goes idle."""
    device = model.tok_embeddings.weight.device
    tokens, valid_prompt = _left_pad(prompts, pad_id, device)
    B, P = tokens.shape
    cache = model.new_cache(B, P + cfg.max_new_tokens)
    valid = torch.zeros(B, P + cfg.max_new_tokens, dtype=torch.bool, device=device)
    valid[:, :P] = valid_prompt
    positions = (valid_prompt.long().cumsum(dim=1) - 1).clamp(min=0)
    logits = model(tokens, positions=positions, attn_mask=_prefill_mask(valid_prompt), cache=cache)[:, -1]
    next_pos = positions[:, -1:] + 1
    active = torch.ones(B, dtype=torch.bool, device=device)
    stop = torch.tensor(cfg.stop_ids, dtype=torch.long, device=device)
    for step in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, generator)
        yield nxt, active.clone()
        active &= ~torch.isin(nxt, stop)
        if not bool(active.any()) or step == cfg.max_new_tokens - 1:
            return
        valid[:, P + step] = True
        mask = valid[:, None, None, : P + step + 1]
        logits = model(nxt[:, None], positions=next_pos, attn_mask=mask, cache=cache)[:, -1]
        next_pos = next_pos + 1


def generate(
    model: InternLM2,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig | None = None,
    *,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New tokens per prompt, the stop token included when one was hit."""
    cfg = cfg or SamplingConfig()
    out: list[list[int]] = [[] for _ in prompts]
    for nxt, active in decode_steps(model, prompts, cfg, pad_id=pad_id, generator=generator):
        for i in torch.nonzero(active).flatten().tolist():
            out[i].append(int(nxt[i]))
    return out


def stream(
    model: InternLM2, prompt: Sequence[int], cfg: SamplingConfig, *, generator: torch.Generator | None = None
) -> Iterator[int]:
    """Tokens of one prompt as they are decoded (for the chat), the stop token included."""
    for nxt, active in decode_steps(model, [prompt], cfg, generator=generator):
        if not bool(active[0]):
            return
        yield int(nxt[0])

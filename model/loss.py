"""Cross-entropy over the output layer, computed in row chunks so the (N, vocab) logits never exist at once.

With gradients, the forward pass also computes d(loss)/d(hidden) and d(loss)/d(weight) chunk by chunk
(softmax − one-hot, times the chunk's inputs) and backward only scales them: no logits are kept for backward and
no separate log-softmax backward runs. On CPU the plain path is memory-bound at this size, so this is where much
of the training-step time goes.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 logits a chunk: small enough for the allocator to reuse, big for the GEMM


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk so one chunk's fp32 logits stay near ``CHUNK_ELEMENTS``."""
    return max(128, min(8192, CHUNK_ELEMENTS // vocab_size))


def _chunk_ce(h: Tensor, weight: Tensor, t: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-chunk fp32 logits (c, V), their logsumexp (c,) and the summed loss over valid rows."""
    logits = (h @ weight.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = t != ignore_index
    target_logit = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    return logits, lse, ((lse - target_logit) * valid).sum()


def _chunk_softmax_grad(
    h: Tensor, weight: Tensor, t: Tensor, ignore_index: int, n_valid: Tensor
) -> tuple[Tensor, Tensor]:
    """d(mean loss)/d(logits) for one chunk, (softmax − onehot)/n_valid on valid rows, and the chunk's loss sum.

    Three passes over the (c, V) logits: aten's fused log-softmax (upcasting to fp32 inside the kernel), an in-place
    exp that turns it into the softmax, and one scaling pass that writes the gradient in the matmul dtype.
    """
    z = h @ weight.t()  # (c, V) in the matmul dtype (bf16 under autocast): the gradient matmuls run in it too
    valid = t != ignore_index
    safe_t = t.clamp(min=0)[:, None]
    logp = torch.log_softmax(z, dim=-1, dtype=torch.float32)
    loss = -(logp.gather(1, safe_t).squeeze(1) * valid).sum()
    probs = logp.exp_()
    probs.scatter_add_(1, safe_t, torch.full_like(probs[:, :1], -1.0))
    scale = (valid.float() / n_valid)[:, None]  # 1/n_valid on valid rows, 0 on ignored rows
    if probs.dtype == z.dtype:
        return probs.mul_(scale), loss
    return torch.mul(probs, scale, out=z), loss  # z is spent: reuse its buffer for the low-precision gradient


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk: int) -> Tensor:  # type: ignore[override]
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            g, loss = _chunk_softmax_grad(h, weight, t, ignore_index, n_valid)
            total += loss
            if grad_h is not None:
                grad_h[s : s + chunk] = g @ weight.to(g.dtype)
            if grad_w is not None:
                grad_w += g.t() @ h.to(g.dtype)
        ctx.save_for_backward(
            grad_h if grad_h is not None else hidden.new_empty(0),
            grad_w.to(weight.dtype) if grad_w is not None else weight.new_empty(0),
        )
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        dw = grad_w * grad_out.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100, chunk: int | None = None
) -> Tensor:
    """Mean CE of ``hidden (N, d) @ weight.T (V, d)`` against ``targets (N,)``; rows at ``ignore_index`` skipped."""
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets has {targets.shape[0]}")
    chunk = chunk or default_chunk(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        total += _chunk_ce(hidden[s : s + chunk], weight, targets[s : s + chunk], ignore_index)[2]
    return total / (targets != ignore_index).sum().clamp(min=1)

"""The InternLM2 decoder in plain PyTorch.

Pre-norm blocks (RMSNorm in fp32), one fused ``wqkv`` projection in InternLM2's per-KV-group layout, rotary
embeddings with a configurable base and dynamic NTK scaling, grouped-query attention through
``scaled_dot_product_attention``, SwiGLU feed-forward, untied output head, no biases.

Packed sequences: pass ``segment_ids`` (B, T) and no token attends across a document boundary; positions restart at
each document. The queries are then taken in blocks of ``ATTENTION_BLOCK`` and each block reads only the keys from
the start of its first query's document (the earliest in the batch) up to its own end: the keys it skips are masked
for every one of its queries (later positions by causality, earlier ones by another document), so the result is the
same as one dense masked call while a 1,024-token window of ~290-token documents computes about 60 % of the scores
(CPU flash attention does not skip masked blocks itself; ``bench/packed_attention.py`` measures the time saved).
Generation: pass a :class:`KVCache`, explicit ``positions`` and a boolean ``attn_mask``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.loss import linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the activation dtype, scale in the input dtype (as InternLM2 and Llama do).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_theta_for(config: ModelConfig, seq_len: int) -> float:
    """The RoPE base for a forward pass over ``seq_len`` positions (dynamic NTK past the trained length)."""
    factor = config.rope_ntk_factor
    if factor is None or seq_len <= config.max_seq_len:
        return config.rope_theta
    hd = config.head_dim
    return config.rope_theta * ((factor * seq_len / config.max_seq_len) - (factor - 1)) ** (hd / (hd - 2))


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables (B, T, 1, head_dim) for integer ``positions`` (B, T); fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, T, h, hd) by the half-split convention (Llama's ``rotate_half``)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Masks and positions


def segment_positions(segment_ids: Tensor) -> Tensor:
    """Positions (B, T) that restart at 0 wherever the segment id changes."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


ATTENTION_BLOCK = 256  # query block of packed attention; shorter windows take one dense masked call


def attention_spans(segment_ids: Tensor, block: int) -> list[tuple[int, int, int]]:
    """``(q_start, q_end, k_start)`` per query block of a packed batch (B, T): every key before ``k_start`` or at or
    after ``q_end`` is masked for every query of the block in every row.

    Keys before the block's first query's document start are masked for all its queries, since document starts
    never decrease along a row; the batch takes the earliest such start over its rows. One host sync per call.
    """
    if block < 1:
        raise ValueError(f"attention_spans: block must be >= 1, got {block}")
    T = segment_ids.shape[1]
    firsts = list(range(0, T, block))
    starts = torch.arange(T, device=segment_ids.device) - segment_positions(segment_ids)  # (B, T) document starts
    k_starts = starts[:, firsts].min(dim=0).values.tolist()
    return [(a, min(a + block, T), int(k)) for a, k in zip(firsts, k_starts, strict=True)]


def segment_mask(segment_ids: Tensor) -> Tensor:
    """Boolean mask (B, 1, T, T): causal and within the same document."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


class KVCache:
    """Preallocated keys/values for every layer: (L, B, n_kv, max_len, hd), filled left to right."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device):
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, n_kv, T, hd) at the current end; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions; this step needs {end}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


# ---------------------------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.n_rep, self.hd = config.n_heads, config.n_kv_heads, config.n_rep, config.head_dim
        # Fused projection, per KV group: the group's n_rep query heads, then its K head, then its V head.
        self.wqkv = nn.Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * self.hd, bias=False)
        self.wo = nn.Linear(config.n_heads * self.hd, config.dim, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | bool, cache: KVCache | None,
        spans: list[tuple[int, int, int]] | None = None,
    ) -> Tensor:
        """``mask``: boolean (B, 1, T, S), or True for plain causal, or False for none (one decode step).

        ``spans`` (from `attention_spans`, no cache): compute each query block against its key range only.
        """
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.n_kv, self.n_rep + 2, self.hd)
        q = qkv[:, :, :, : self.n_rep].reshape(B, T, self.n_heads, self.hd)  # head h belongs to group h // n_rep
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]  # (B, T, n_kv, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv, S, hd)
        attn_mask = mask if isinstance(mask, Tensor) else None
        # enable_gqa: query head h reads KV head h // n_rep without materialising repeated keys and values.
        if spans is not None and attn_mask is not None and len(spans) > 1:
            y = torch.cat([
                F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, s:b], v[:, :, s:b],
                                               attn_mask=attn_mask[:, :, a:b, s:b], enable_gqa=self.n_rep > 1)
                for a, b, s in spans
            ], dim=2)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=mask is True, enable_gqa=self.n_rep > 1
            )
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | bool, cache: KVCache | None,
        spans: list[tuple[int, int, int]] | None = None,
    ) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, spans)
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM2(nn.Module):
    """InternLM2 decoder.

    Initialisation (the report gives none; InternEvo uses a normal with std 0.02): every linear and the embedding
    are drawn from N(0, init_std²); the residual-branch outputs (``attention.wo``, ``feed_forward.w2``) are further
    scaled by 1/√(2·n_layers) as in GPT-2, so the residual stream's variance does not grow with depth; norms are ones.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                p.normal_(0.0, resid_std)
            else:
                p.normal_(0.0, std)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        ref = self.tok_embeddings.weight
        return KVCache(self.config, batch, max_len, dtype=dtype or ref.dtype, device=ref.device)

    def hidden_states(
        self,
        tokens: Tensor,
        *,
        positions: Tensor | None = None,
        segment_ids: Tensor | None = None,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B, T, dim).

        ``segment_ids`` (B, T) derives document masks and restarting positions; otherwise ``positions`` default to
        0..T-1 (offset by the cache length) and the mask to plain causal. ``attn_mask`` (B, 1, T, S) is boolean,
        True where a query may attend, S counting cached keys too.
        """
        B, T = tokens.shape
        spans = None
        if segment_ids is not None:
            # the spans are host integers: a compiled graph keeps the one dense call instead
            if attn_mask is None and cache is None and T > ATTENTION_BLOCK and not torch.compiler.is_compiling():
                spans = attention_spans(segment_ids, ATTENTION_BLOCK)
            positions = segment_positions(segment_ids) if positions is None else positions
            attn_mask = segment_mask(segment_ids) if attn_mask is None else attn_mask
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        mask: Tensor | bool = attn_mask if attn_mask is not None else (cache is None or cache.length == 0)
        if mask is False and T > 1:
            raise ValueError("a multi-token step on a non-empty KV cache needs an explicit attn_mask")
        # Only dynamic NTK needs the longest position: reading it syncs a GPU and breaks torch.compile graphs.
        theta = self.config.rope_theta
        if self.config.rope_ntk_factor is not None:
            theta = rope_theta_for(self.config, int(positions.max()) + 1)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, theta)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, spans)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def forward(self, tokens: Tensor, **kwargs: Tensor | KVCache | None) -> Tensor:
        """Logits (B, T, vocab)."""
        return self.output(self.hidden_states(tokens, **kwargs))

    def loss(
        self, tokens: Tensor, targets: Tensor, *, segment_ids: Tensor | None = None, ignore_index: int = -100
    ) -> Tensor:
        """Mean next-token cross-entropy over targets != ignore_index, without materialising all logits."""
        hidden = self.hidden_states(tokens, segment_ids=segment_ids)
        return linear_cross_entropy(hidden.flatten(0, 1), self.output.weight, targets.flatten(), ignore_index)

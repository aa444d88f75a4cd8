"""Weight-name and layout conversion between our InternLM2 layout and HF ``LlamaForCausalLM``.

The only non-trivial tensor is the fused ``wqkv``: its rows are grouped per KV head as
[q_(g·r) … q_(g·r+r−1), k_g, v_g] (r = n_heads / n_kv_heads), each ``head_dim`` rows. Llama keeps q, k and v
apart with query head h using KV head h // r, which is the same head order, so splitting is a reshape.
Both sides use the half-split ("rotate_half") RoPE convention, so no row permutation is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from model.config import ConfigError, ModelConfig


def split_wqkv(wqkv: Tensor, config: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(n_heads+2·n_kv)·hd × dim → q (n_heads·hd × dim), k, v (n_kv·hd × dim)."""
    g = wqkv.view(config.n_kv_heads, config.n_rep + 2, config.head_dim, -1)
    q = g[:, : config.n_rep].reshape(config.n_heads * config.head_dim, -1)
    k = g[:, -2].reshape(config.n_kv_heads * config.head_dim, -1)
    v = g[:, -1].reshape(config.n_kv_heads * config.head_dim, -1)
    return q, k, v


def fuse_wqkv(q: Tensor, k: Tensor, v: Tensor, config: ModelConfig) -> Tensor:
    hd, n_kv, r = config.head_dim, config.n_kv_heads, config.n_rep
    qg = q.view(n_kv, r, hd, -1)
    kg, vg = k.view(n_kv, 1, hd, -1), v.view(n_kv, 1, hd, -1)
    return torch.cat((qg, kg, vg), dim=1).reshape((config.n_heads + 2 * n_kv) * hd, -1)


_LAYER_MAP = {  # ours → HF, per layer
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def to_hf_state_dict(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    out = {hf: state[ours] for ours, hf in _TOP_MAP.items()}
    for i in range(config.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for ours, hf in _LAYER_MAP.items():
            out[dst + hf] = state[src + ours]
        q, k, v = split_wqkv(state[src + "attention.wqkv.weight"], config)
        out[dst + "self_attn.q_proj.weight"] = q
        out[dst + "self_attn.k_proj.weight"] = k
        out[dst + "self_attn.v_proj.weight"] = v
    return {name: t.contiguous() for name, t in out.items()}


def from_hf_state_dict(hf: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    missing = [name for name in _TOP_MAP.values() if name not in hf]
    if missing:
        raise ValueError(f"not a Llama state dict: missing {missing}")
    out = {ours: hf[name] for ours, name in _TOP_MAP.items()}
    for i in range(config.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for ours, name in _LAYER_MAP.items():
            out[dst + ours] = hf[src + name]
        q, k, v = (hf[src + f"self_attn.{p}_proj.weight"] for p in "qkv")
        out[dst + "attention.wqkv.weight"] = fuse_wqkv(q, k, v, config)
    return out


def to_hf_config(config: ModelConfig, *, bos_id: int = 1, eos_id: int = 2, dtype: str = "float32") -> dict[str, Any]:
    """A ``LlamaConfig`` dict for ``config`` (the HF ``config.json``)."""
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": config.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }
    if config.rope_ntk_factor is not None:
        hf["rope_scaling"] = {"rope_type": "dynamic", "factor": config.rope_ntk_factor}
    return hf


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("model_type") != "llama":
        raise ConfigError(f"expected a Llama config (model_type 'llama'), got model_type={hf.get('model_type')!r}")
    if hf.get("tie_word_embeddings"):
        raise ConfigError("InternLM2 has an untied output head; this Llama config ties word embeddings")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", dim // n_heads) != dim // n_heads:
        raise ConfigError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads = {dim // n_heads}")
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if scaling and kind != "dynamic":
        raise ConfigError(f"only dynamic NTK rope_scaling converts; got rope_scaling={scaling!r}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", n_heads), ffn_dim=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"], rope_theta=float(hf.get("rope_theta", 10000.0)),
        rope_ntk_factor=float(scaling["factor"]) if scaling else None, norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
    )

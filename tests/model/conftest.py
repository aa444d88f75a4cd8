from __future__ import annotations

import pytest
import torch
import transformers

from model.config import ModelConfig
from model.convert import from_hf_state_dict, to_hf_config
from model.model import InternLM2


def tiny_config(**overrides: object) -> ModelConfig:
    base = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=32)
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def hf_pair(config: ModelConfig, seed: int = 0) -> tuple[InternLM2, torch.nn.Module]:
    """A random HF LlamaForCausalLM and our model holding the same (converted) weights, both fp32 eval."""
    torch.manual_seed(seed)
    fields = {k: v for k, v in to_hf_config(config).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf_config = transformers.LlamaConfig(**fields)
    hf_config._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    ours = InternLM2(config).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), config))
    return ours, hf


@pytest.fixture(name="make_config")
def _make_config() -> object:
    return tiny_config


@pytest.fixture(name="make_pair")
def _make_pair() -> object:
    return hf_pair

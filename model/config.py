"""Model shapes: one small config, presets from a seconds-long test model to InternLM2-20B."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A model configuration that cannot work: names the field and the expected form."""


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an InternLM2 decoder. Derived: ``head_dim``, ``ffn_dim`` when not given."""

    vocab_size: int = 92544
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_dim: int | None = None  # None: 8/3·dim rounded up to ffn_multiple_of (LLaMA's SwiGLU rule)
    ffn_multiple_of: int = 256
    max_seq_len: int = 4096  # the trained context; dynamic NTK scaling starts past it
    rope_theta: float = 50_000.0  # 50k in the 4k phase, 1M from the long-context phase on
    rope_ntk_factor: float | None = None  # dynamic NTK scaling factor for inference (released configs: 2.0)
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "ffn_multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"ModelConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}): "
                "each KV head serves a whole group of query heads (GQA)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig head_dim = dim / n_heads must be even for RoPE, got {self.head_dim}")
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", round_up(int(8 * self.dim / 3), self.ffn_multiple_of))
        elif not isinstance(self.ffn_dim, int) or self.ffn_dim <= 0:
            raise ConfigError(f"ModelConfig.ffn_dim must be a positive integer or None, got {self.ffn_dim!r}")
        if self.rope_theta <= 0:
            raise ConfigError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_ntk_factor is not None and self.rope_ntk_factor < 1.0:
            raise ConfigError(f"ModelConfig.rope_ntk_factor must be None or >= 1.0, got {self.rope_ntk_factor!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self, *, embedding: bool = True) -> int:
        """Parameter count; ``embedding=False`` leaves out the input embedding (the MFU convention)."""
        hd, d = self.head_dim, self.dim
        attn = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d
        ffn = 3 * d * self.ffn_dim
        per_layer = attn + ffn + 2 * d
        total = self.n_layers * per_layer + d + self.vocab_size * d  # + final norm + output head
        return total + (self.vocab_size * d if embedding else 0)

    def flops_per_token(self, seq_len: int) -> int:
        """Training flops per token: 6·N (matmul params incl. head, excl. embedding) + 12·L·d·T (attention)."""
        return 6 * self.num_params(embedding=False) + 12 * self.n_layers * self.dim * seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    # Tests: a stage in seconds.
    "smoke": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=128),
    # The CPU demo: the whole pipeline in minutes on 2 cores, with visible learning.
    "tiny": ModelConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, max_seq_len=256),
    # An hour on CPU, minutes on a GPU.
    "small": ModelConfig(
        vocab_size=16384, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536, max_seq_len=512
    ),
    # The paper's shapes (InternLM2 report, Table 1): layers / hidden / heads / kv-heads / FFN, head_dim 128.
    "internlm2-1_8b": ModelConfig(dim=2048, n_layers=24, n_heads=16, n_kv_heads=8, ffn_dim=8192),
    "internlm2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336),
    "internlm2-20b": ModelConfig(dim=6144, n_layers=48, n_heads=48, n_kv_heads=8, ffn_dim=16384),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}") from None

from __future__ import annotations

import pytest

from model.config import PRESETS, ConfigError, ModelConfig, get_preset


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("internlm2-1_8b", (24, 2048, 16, 8, 8192)),
        ("internlm2-7b", (32, 4096, 32, 8, 14336)),
        ("internlm2-20b", (48, 6144, 48, 8, 16384)),
    ],
)
def test_paper_shapes(name: str, shape: tuple[int, ...]) -> None:
    c = get_preset(name)
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim) == shape
    assert c.head_dim == 128 and c.vocab_size == 92544 and c.ffn_dim % 256 == 0


def test_param_counts_match_model_names() -> None:
    # 1.8B / 7B / 20B are the released names; untied embeddings count twice.
    assert 1.7e9 < get_preset("internlm2-1_8b").num_params() < 2.0e9
    assert 7.0e9 < get_preset("internlm2-7b").num_params() < 8.0e9
    assert 19e9 < get_preset("internlm2-20b").num_params() < 21e9


def test_every_preset_valid_and_ffn_derived() -> None:
    assert {"smoke", "tiny", "small"} <= set(PRESETS)
    assert ModelConfig(dim=512, n_heads=8, n_kv_heads=4).ffn_dim == 1536  # 8/3·512 = 1365 → 1536


def test_heads_not_divisible_by_kv_heads_names_field() -> None:
    with pytest.raises(ConfigError, match=r"n_heads \(6\) must be divisible by n_kv_heads \(4\)"):
        ModelConfig(dim=96, n_heads=6, n_kv_heads=4)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"dim": 100, "n_heads": 3, "n_kv_heads": 3}, "dim \\(100\\) must be divisible by n_heads"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"rope_ntk_factor": 0.5}, "rope_ntk_factor must be None or >= 1.0"),
        ({"dim": 24, "n_heads": 8, "n_kv_heads": 8}, "head_dim .* must be even"),
    ],
)
def test_bad_fields(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig(**kwargs)  # type: ignore[arg-type]


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ConfigError, match="unknown model preset 'huge'.*smoke, tiny"):
        get_preset("huge")


def test_dict_round_trip_and_unknown_field() -> None:
    c = get_preset("tiny")
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**c.to_dict(), "n_expert": 8})

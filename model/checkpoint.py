"""Loading and saving model weights: our own directory format, Lightning checkpoints, and HF Llama export/import.

Formats a path may hold:

- lmforge directory: ``lmforge.json`` (the ``ModelConfig``) + ``model.safetensors`` (InternLM2 names, fused wqkv)
  [+ ``tokenizer.json``];
- Lightning checkpoint (``*.ckpt``): ``state_dict`` with the model under the ``model.`` prefix and
  ``hyper_parameters["model_config"]``;
- HF Llama directory: ``config.json`` (model_type llama) + ``model.safetensors`` — what :func:`export_hf` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.config import ModelConfig
from model.convert import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from model.model import InternLM2
from model.tokenizer import Tokenizer

NATIVE_CONFIG = "lmforge.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit: names the file, the tensor and the expected form."""


def check_state_dict(state: dict[str, Tensor], config: ModelConfig, source: str) -> None:
    """Raise unless ``state`` has exactly the tensors of ``InternLM2(config)`` with the right shapes."""
    expected = {name: tuple(t.shape) for name, t in _shapes(config).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: tensors do not match the model config; missing {missing[:5]}{'…' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, expected {shape} for {config}"
            )


def _shapes(config: ModelConfig) -> dict[str, Tensor]:
    with torch.device("meta"):
        return InternLM2(config).state_dict()


def build_model(config: ModelConfig, state: dict[str, Tensor], source: str) -> InternLM2:
    check_state_dict(state, config, source)
    with torch.device("meta"):
        model = InternLM2(config)
    model.load_state_dict(state, assign=True)
    return model.float().eval()


def save_native(model: InternLM2, directory: str | Path, tokenizer_file: str | Path | None = None) -> Path:
    """Write an lmforge directory checkpoint; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "lmforge"})
    (out / NATIVE_CONFIG).write_text(model.config.to_json())
    if tokenizer_file is not None:
        (out / TOKENIZER).write_bytes(Path(tokenizer_file).read_bytes())
    return out


def load_model(path: str | Path) -> InternLM2:
    """Load an lmforge directory, a Lightning ``.ckpt`` or an HF Llama directory into :class:`InternLM2`."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        return _load_lightning(p)
    if (p / NATIVE_CONFIG).is_file():
        config = ModelConfig.from_dict(json.loads((p / NATIVE_CONFIG).read_text()))
        return build_model(config, _read_weights(p), str(p / WEIGHTS))
    if (p / "config.json").is_file():
        config = from_hf_config(json.loads((p / "config.json").read_text()))
        return build_model(config, from_hf_state_dict(_read_weights(p), config), str(p / WEIGHTS))
    raise CheckpointError(f"{p}: not a checkpoint (expected {NATIVE_CONFIG} or config.json + {WEIGHTS}, or a .ckpt)")


def _read_weights(directory: Path) -> dict[str, Tensor]:
    f = directory / WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"{directory}: missing {WEIGHTS}")
    try:
        return load_file(str(f))
    except Exception as exc:  # safetensors raises several types for corrupt headers/truncation
        raise CheckpointError(f"{f}: unreadable safetensors file ({exc})") from exc


def _load_lightning(path: Path) -> InternLM2:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from exc
    hparams = ckpt.get("hyper_parameters") or {}
    if "model_config" not in hparams or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: a Lightning checkpoint needs state_dict and hyper_parameters.model_config")
    config = ModelConfig.from_dict(dict(hparams["model_config"]))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    return build_model(config, state, str(path))


def export_hf(
    model: InternLM2, out_dir: str | Path, *, tokenizer_file: str | Path | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write a transformers-loadable Llama directory (safetensors, config.json, generation config, tokenizer)."""
    tok = _matching_tokenizer(tokenizer_file, model.config) if tokenizer_file is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or torch.float32
    state = to_hf_state_dict({k: v.detach().cpu().to(dtype) for k, v in model.state_dict().items()}, model.config)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    dtype_name = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(to_hf_config(model.config, dtype=dtype_name), indent=2))
    eos: list[int] = [2]
    if tok is not None:
        tok.save_hf(out, model_max_length=model.config.max_seq_len)
        eos.append(tok.token_id("<|im_end|>"))  # chat models stop at the end of their turn too
    generation = {"bos_token_id": 1, "eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": 2}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def _matching_tokenizer(path: str | Path, config: ModelConfig) -> Tokenizer:
    tok = Tokenizer.from_file(path)
    if tok.vocab_size != config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tok.vocab_size} tokens, model vocab_size is {config.vocab_size}")
    return tok

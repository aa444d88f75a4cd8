from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import transformers
from torch.testing import assert_close
from typer.testing import CliRunner

from lmforge.cli import app
from model.checkpoint import CheckpointError, export_hf, load_model, save_native
from model.config import ModelConfig
from model.generate import SamplingConfig, generate
from model.model import InternLM2
from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [inspect.getdoc(obj) or "" for obj in (json, json.JSONDecoder, Path, pytest, torch.nn.Module, dict)]
    tok = Tokenizer.train([t for t in texts if t] * 3, vocab_size=512)
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def small_model(vocab_size: int = 512, **kw: object) -> InternLM2:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                      max_seq_len=32, **kw)  # type: ignore[arg-type]
    return InternLM2(cfg).eval()


def test_export_reloads_in_transformers_with_identical_logits(tmp_path: Path, tokenizer_file: Path) -> None:
    model = small_model(rope_theta=1_000_000.0, rope_ntk_factor=2.0)
    export_hf(model, tmp_path, tokenizer_file=tokenizer_file)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, 512, (2, 45))  # past max_seq_len: dynamic NTK on both sides
    with torch.no_grad():
        assert_close(hf(x).logits, model(x), rtol=1e-5, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_file(tokenizer_file)
    assert tok("def f(x): return 42")["input_ids"] == [1, *ours.encode("def f(x): return 42")]
    assert tok.convert_tokens_to_ids("<|im_end|>") == 510
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 510]


def test_exported_greedy_generation_matches_hf_generate(tmp_path: Path) -> None:
    model = small_model()
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = [[1, 17, 99, 250, 3]]
    ref = hf.generate(input_ids=torch.tensor(prompt), max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert generate(model, prompt, SamplingConfig(max_new_tokens=10))[0] == ref[0, 5:].tolist()


def test_hf_directory_imports_back_to_identical_weights(tmp_path: Path) -> None:
    model = small_model()
    export_hf(model, tmp_path)
    back = load_model(tmp_path)
    assert back.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_bf16_export_halves_the_weights(tmp_path: Path) -> None:
    export_hf(small_model(), tmp_path / "bf16", dtype=torch.bfloat16)
    export_hf(small_model(), tmp_path / "fp32")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("bf16", "fp32")]
    ratio = sizes[0] / sizes[1]
    assert 0.45 < ratio < 0.55


def test_native_round_trip(tmp_path: Path) -> None:
    model = small_model()
    save_native(model, tmp_path)
    back = load_model(tmp_path)
    x = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_lightning_checkpoint_loads(tmp_path: Path) -> None:
    model = small_model()
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model_config": model.config.to_dict()}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    back = load_model(tmp_path / "last.ckpt")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    save_native(small_model(), tmp_path)
    cfg = json.loads((tmp_path / "lmforge.json").read_text())
    cfg["ffn_dim"] = 192
    (tmp_path / "lmforge.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.feed_forward\.w1\.weight' has shape \(160, 64\), "
                                              r"expected \(192, 64\)"):
        load_model(tmp_path)


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "nope")
    save_native(small_model(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        load_model(tmp_path)
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt: unreadable checkpoint"):
        load_model(tmp_path / "bad.ckpt")


def test_tokenizer_vocab_mismatch_refused_before_writing(tmp_path: Path, tokenizer_file: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer has 512 tokens, model vocab_size is 768"):
        export_hf(small_model(vocab_size=768), tmp_path / "out", tokenizer_file=tokenizer_file)
    assert not (tmp_path / "out").exists()


def test_cli_export_hf(tmp_path: Path, tokenizer_file: Path) -> None:
    save_native(small_model(), tmp_path / "ckpt", tokenizer_file=tokenizer_file)
    runner = CliRunner()
    result = runner.invoke(app, ["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}
    bad = runner.invoke(app, ["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "x"), "--dtype", "int8"])
    assert bad.exit_code == 2
    assert "float32, bfloat16, float16, got 'int8'" in " ".join(bad.output.replace("│", " ").split())
    missing = runner.invoke(app, ["export-hf", str(tmp_path / "none"), str(tmp_path / "y")])
    assert missing.exit_code == 2 and "checkpoint not found" in missing.output

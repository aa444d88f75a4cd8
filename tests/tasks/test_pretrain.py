from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from infra import runtime, storage
from infra.runtime import Runtime, detect_runtime
from model.checkpoint import load_model
from model.config import ModelConfig, get_preset
from model.model import Block
from model.pretrain import PackedDataModule
from tasks.pretrain import PhaseInterrupted, PhaseResult, PhaseSpec, run_phase

SMOKE = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


def write_shard(directory: Path, docs: list[list[int]]) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    np.save(directory / "tokens.npy", np.concatenate(docs).astype(np.uint32))
    np.save(directory / "offsets.npy", offsets)
    return directory / "tokens.npy", directory / "offsets.npy"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    """Documents that count upward from a random start: a tiny model learns the +1 rule within 20 steps."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(400):
        start, length = int(rng.integers(0, 500)), int(rng.integers(10, 90))
        docs.append([(start + i) % 500 + 3 for i in range(length)])
    return [write_shard(tmp_path_factory.mktemp("shards"), docs)]


def spec(**overrides: Any) -> PhaseSpec:
    base: dict[str, Any] = dict(name="p1", seq_len=64, rope_theta=50_000.0, max_steps=20, batch_size=4, accumulate=1,
                                lr=1e-2, warmup_steps=2, checkpoint_every=5, seed=7, precision="32-true")
    return PhaseSpec(**{**base, **overrides})


@pytest.fixture(scope="module")
def phase1(shards: list[tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory) -> PhaseResult:
    return run_phase(spec(), SMOKE, shards, None, str(tmp_path_factory.mktemp("phase1")))


class InitialWeights(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        self.config = pl_module.model.config


# ---------------------------------------------------------------------------------------------------------------


def test_loss_falls_and_the_result_describes_the_phase(phase1: PhaseResult) -> None:
    assert phase1.steps == 20 and len(phase1.losses) == 20
    assert phase1.first_loss == phase1.losses[0] and phase1.final_loss == phase1.losses[-1]
    assert phase1.first_loss > 5.5  # ≈ ln(512) at initialisation
    assert np.mean(phase1.losses[-3:]) < phase1.first_loss - 1.5
    assert phase1.tokens == 20 * 4 * 64
    assert not phase1.resumed_from_final and phase1.resumed_from_step == 0
    # the copy probe of the final weights: random tokens shown twice (this model has not learned to copy)
    probe = phase1.copy_probe
    assert set(probe) == {"first_nll", "repeat_nll", "gain", "rows", "span"} and probe["span"] == 32
    assert probe["gain"] == pytest.approx(probe["first_nll"] - probe["repeat_nll"]) and probe["first_nll"] > 3.0


def test_the_lightning_checkpoint_and_the_native_directory_hold_the_final_weights(phase1: PhaseResult) -> None:
    ckpt = torch.load(phase1.checkpoint_url, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 20
    from_ckpt, native = load_model(phase1.checkpoint_url), load_model(phase1.native_url)
    assert from_ckpt.config == native.config == SMOKE
    for name, tensor in native.state_dict().items():
        assert torch.equal(from_ckpt.state_dict()[name], tensor), name


def test_a_finished_phase_returns_its_stored_result_without_training(
    phase1: PhaseResult, shards: list[tuple[Path, Path]]
) -> None:
    again = run_phase(spec(), SMOKE, shards, None, str(Path(phase1.native_url).parent))
    assert again.resumed_from_final
    assert again.model_dump(exclude={"resumed_from_final"}) == phase1.model_dump(exclude={"resumed_from_final"})


def test_resume_after_a_crash_reproduces_the_uninterrupted_losses(
    shards: list[tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    crash_at: Callable[[int], L.Callback],
) -> None:
    s = spec(max_steps=10, accumulate=2, batch_size=2, checkpoint_every=3, warmup_steps=3)
    whole = run_phase(s, SMOKE, shards, None, str(tmp_path / "whole"))
    with pytest.raises(RuntimeError, match="simulated crash at step 6"):
        run_phase(s, SMOKE, shards, None, str(tmp_path / "resumed"), callbacks=[crash_at(6)])
    resumed = run_phase(s, SMOKE, shards, None, str(tmp_path / "resumed"))
    assert resumed.resumed_from_step == 6 and resumed.steps == 10 and resumed.tokens == whole.tokens
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-5, rel=0)

    # The same resume with the loader restarted at sample 0 (the position not restored) trains on other batches.
    monkeypatch.setattr(PackedDataModule, "train_dataloader", _from_first_sample)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_phase(s, SMOKE, shards, None, str(tmp_path / "unrestored"), callbacks=[crash_at(6)])
    unrestored = run_phase(s, SMOKE, shards, None, str(tmp_path / "unrestored"))
    assert unrestored.losses[:6] == pytest.approx(whole.losses[:6], abs=1e-5, rel=0)
    assert abs(unrestored.losses[6] - whole.losses[6]) > 1e-3


def _from_first_sample(self: PackedDataModule) -> Any:
    from model.data import make_loader

    return make_loader(self.dataset, self.batch_size, seed=self.seed, start_sample=0)


def test_a_stopped_phase_raises_and_a_rerun_finishes_it(
    shards: list[tuple[Path, Path]], tmp_path: Path, stop_at: Callable[[int], L.Callback]
) -> None:
    s = spec(max_steps=4, checkpoint_every=4)
    with pytest.raises(PhaseInterrupted, match="stopped at step 3 of 4"):
        run_phase(s, SMOKE, shards, None, str(tmp_path), callbacks=[stop_at(3)])
    assert not (tmp_path / "final").exists()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    finished = run_phase(s, SMOKE, shards, None, str(tmp_path))
    assert finished.resumed_from_step == 3 and finished.steps == 4 and len(finished.losses) == 4


def test_next_phase_starts_from_the_previous_weights_with_its_own_rope_base(
    phase1: PhaseResult, shards: list[tuple[Path, Path]], tmp_path: Path
) -> None:
    seen = InitialWeights()
    long = spec(name="p2", seq_len=128, rope_theta=1_000_000.0, max_steps=2, batch_size=1, warmup_steps=0)
    result = run_phase(long, SMOKE, shards, None, str(tmp_path), init_weights=phase1.native_url, callbacks=[seen])
    previous = load_model(phase1.native_url).state_dict()
    assert all(torch.equal(seen.state[k], v) for k, v in previous.items())
    assert seen.config == SMOKE.replace(rope_theta=1_000_000.0, max_seq_len=128)
    assert load_model(result.native_url).config.rope_theta == 1_000_000.0
    assert result.tokens == 2 * 128


def test_metrics_go_to_the_given_mlflow_run(shards: list[tuple[Path, Path]], tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("pretrain-test")).info.run_id
    result = run_phase(spec(max_steps=4), SMOKE, shards, None, str(tmp_path / "out"), mlflow=(uri, run_id))
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.value for m in history] == pytest.approx(result.losses, rel=1e-6)
    assert len(client.get_metric_history(run_id, "train/lr")) == 4
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model_config/dim"] == "64"


def test_checkpoints_of_an_s3_phase_are_mirrored_and_resumed_from(
    shards: list[tuple[Path, Path]], s3_bucket: str, tmp_path: Path, crash_at: Callable[[int], L.Callback]
) -> None:
    out = f"{s3_bucket}/phase1"
    s = spec(max_steps=4, checkpoint_every=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_phase(s, SMOKE, shards, None, out, callbacks=[crash_at(2)])
    assert storage.list_files(f"{out}/checkpoints") == [
        f"{out}/checkpoints/last.ckpt", f"{out}/checkpoints/step=0000002.ckpt"
    ]
    result = run_phase(s, SMOKE, shards, None, out)
    assert result.resumed_from_step == 2 and result.native_url == f"{out}/final"
    assert {Path(u).name for u in storage.list_files(result.native_url)} == {
        "lmforge.json", "model.safetensors", "phase_result.json"
    }
    finished = run_phase(s, SMOKE, shards, None, out)
    assert finished.resumed_from_final and finished.copy_probe == result.copy_probe  # read back from final/
    seen = InitialWeights()  # the next phase starts from the remote final/ directory
    run_phase(spec(name="p2", rope_theta=1e6, max_steps=1, warmup_steps=0), SMOKE, shards, None, f"{s3_bucket}/phase2",
              init_weights=result.native_url, callbacks=[seen])
    storage.download_dir(result.native_url, str(tmp_path / "final"))
    assert all(torch.equal(seen.state[k], v) for k, v in load_model(tmp_path / "final").state_dict().items())
    assert seen.config.rope_theta == 1e6


# ---------------------------------------------------------------------------------------------------------------
# Runtime (infra/runtime.py, which run_phase uses to build its Trainer)


def test_runtime_uses_bf16_only_where_the_hardware_computes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: False)
    assert detect_runtime("bf16-mixed") == Runtime("cpu", 1, "auto", "32-true")
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: True)
    assert detect_runtime("bf16-mixed").precision == "bf16-mixed"
    assert detect_runtime("32-true").precision == "32-true"
    assert detect_runtime("32-true", devices=2).strategy == "ddp"  # CPU processes over gloo
    with pytest.raises(ValueError, match="precision '16-mixed' is not supported"):
        detect_runtime("16-mixed")


def test_runtime_shards_paper_size_models_over_several_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    big = detect_runtime(model_params=get_preset("internlm2-7b").num_params(), devices=None, wrap_modules=[Block])
    assert (big.accelerator, big.devices, big.precision) == ("cuda", 4, "bf16-mixed")
    assert isinstance(big.strategy, FSDPStrategy)
    # Each decoder block is one FSDP unit and recomputes its activations in backward (Lightning keeps the latter
    # policy only in a private attribute).
    assert big.strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert big.strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert detect_runtime(model_params=SMOKE.num_params(), devices=2).strategy == "ddp"
    assert detect_runtime(model_params=get_preset("internlm2-7b").num_params()).strategy == "auto"  # one GPU
    with pytest.raises(ValueError, match="devices=8 requested, but 4 GPU"):
        detect_runtime(devices=8)


# ---------------------------------------------------------------------------------------------------------------
# Mistakes


def test_a_sequence_longer_than_the_data_names_the_phase_and_the_token_count(
    shards: list[tuple[Path, Path]], tmp_path: Path
) -> None:
    tokens = int(sum(np.load(t).size for t, _ in shards))
    with pytest.raises(ValueError, match=rf"phase 'p1' \(seq_len=100000\).* hold {tokens} tokens"):
        run_phase(spec(seq_len=100_000), SMOKE, shards, None, str(tmp_path))
    lengths = np.diff(np.load(shards[0][1]))
    short = int(np.flatnonzero(lengths < 64)[0])  # one document too short for a single 64-token sample
    with pytest.raises(ValueError, match=rf"phase 'p1' \(seq_len=64\).* hold {lengths[short]} tokens"):
        run_phase(spec(), SMOKE, shards, np.array([short]), str(tmp_path))
    assert not (tmp_path / "phase_spec.json").exists()  # a refused phase leaves nothing behind


def test_missing_init_weights_is_a_clear_error(shards: list[tuple[Path, Path]], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="init_weights .*nowhere.* does not exist"):
        run_phase(spec(), SMOKE, shards, None, str(tmp_path / "out"), init_weights=str(tmp_path / "nowhere"))


def test_a_directory_holding_another_spec_is_refused(phase1: PhaseResult, shards: list[tuple[Path, Path]]) -> None:
    with pytest.raises(ValueError, match=r"different spec .*spec\.lr"):
        run_phase(spec(lr=5e-3), SMOKE, shards, None, str(Path(phase1.native_url).parent))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"warmup_steps": 30}, "warmup_steps=30 exceeds max_steps=20"), ({"batch_size": 0}, "batch_size"),
     ({"precision": "16-mixed"}, "precision")],
)
def test_bad_phase_specs_are_rejected(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        spec(**overrides)

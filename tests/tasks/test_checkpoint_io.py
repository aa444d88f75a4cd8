"""Checkpoint saving of a pretraining phase: in a background thread, mirrored to cold storage (or a remote phase's
own store), and resumed from when the newest checkpoint did not survive a crash."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from infra import storage
from model.config import ModelConfig
from tasks.pretrain import (
    LAST,
    STEP_CKPT,
    MirroredCheckpointIO,
    OrderedAsyncCheckpointIO,
    PhaseResult,
    PhaseSpec,
    checkpoint_problem,
    run_phase,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The phase of test_fault_tolerance: 24 steps, a checkpoint every 4, fp32 so that runs compare bit for bit.
SMOKE = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
SPEC = PhaseSpec(name="p1", seq_len=64, rope_theta=50_000.0, max_steps=24, batch_size=4, lr=1e-2, warmup_steps=2,
                 checkpoint_every=4, seed=7, precision="32-true")

COMPARED = ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch", "loops", "lmforge_pretrain")


@pytest.fixture(scope="module")
def shards(counting_shards: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return counting_shards


class RecordWeights(L.Callback):
    """The model's weights at each checkpoint step, taken before ModelCheckpoint saves (Lightning runs checkpoint
    callbacks last)."""

    def __init__(self, every: int) -> None:
        self.every, self.weights = every, {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.fixture(scope="module")
def sync_run(shards: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> PhaseResult:
    spec = SPEC.model_copy(update={"async_checkpoints": False})
    return run_phase(spec, SMOKE, shards, None, str(tmp_path_factory.mktemp("sync")))


def step_checkpoints(out: Path) -> list[int]:
    return sorted(int(m[1]) for p in (out / "checkpoints").glob("step=*.ckpt") if (m := STEP_CKPT.fullmatch(p.name)))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("lmforge")]


def ckpt_dir(result: PhaseResult) -> Path:
    return Path(result.checkpoint_url).parent


def load(path: Path | str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested checkpoint content (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_background_saves_give_the_checkpoints_and_losses_of_blocking_saves(
    shards: list[tuple[str, str]], sync_run: PhaseResult, tmp_path: Path
) -> None:
    recorder = RecordWeights(SPEC.checkpoint_every)
    result = run_phase(SPEC, SMOKE, shards, None, str(tmp_path), callbacks=[recorder])
    assert SPEC.async_checkpoints and result.losses == sync_run.losses  # 32-true: bit-identical training
    assert step_checkpoints(tmp_path) == step_checkpoints(ckpt_dir(sync_run).parent) == [20, 24]
    for name in ["step=0000020.ckpt", "step=0000024.ckpt", LAST]:
        saved, blocking = load(tmp_path / "checkpoints" / name), load(ckpt_dir(sync_run) / name)
        assert all(same(saved[key], blocking[key]) for key in COMPARED), name
    for step in (20, 24):  # each holds the weights of its own step, though training went on while it was written
        saved = load(tmp_path / "checkpoints" / f"step={step:07d}.ckpt")["state_dict"]
        assert same(saved, recorder.weights[step])
    # Saving in the background is how the phase runs, not what it trains: the other setting reuses the result.
    rerun = run_phase(SPEC.model_copy(update={"async_checkpoints": False}), SMOKE, shards, None, str(tmp_path))
    assert rerun.resumed_from_final and rerun.losses == result.losses


class HoldWrites(logging.Handler):
    """Holds the saving thread at the start of its first checkpoint write until ``resume`` is set: a slow disk or
    upload, without which the background thread would always finish before the test could act."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.held, self.resume = threading.Event(), threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("writing checkpoint") and not self.held.is_set():
            self.held.set()
            assert self.resume.wait(timeout=60)


@pytest.fixture
def hold_writes() -> Iterator[HoldWrites]:
    logger = logging.getLogger("lmforge.tasks.pretrain")
    handler, level = HoldWrites(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    handler.resume.set()
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_checkpoint_in_flight_keeps_the_values_it_was_saved_with(hold_writes: HoldWrites, tmp_path: Path) -> None:
    io = OrderedAsyncCheckpointIO(MirroredCheckpointIO())
    weight, history = torch.arange(6.0).reshape(2, 3), [1.0, 2.0]
    checkpoint = {"state_dict": {"w": weight}, "optimizer_states": [{"state": {0: {"exp_avg": weight * 2}}}],
                  "global_step": 3, "lmforge_pretrain": {"loss_history": history}}
    io.save_checkpoint(checkpoint, tmp_path / "step=0000003.ckpt")
    assert hold_writes.held.wait(timeout=60) and not (tmp_path / "step=0000003.ckpt").exists()
    weight.add_(100.0)  # what the next optimizer steps do to the live tensors while the save waits
    checkpoint["optimizer_states"][0]["state"][0]["exp_avg"].mul_(0)
    history.append(3.0)
    hold_writes.resume.set()
    io.teardown()
    saved = load(tmp_path / "step=0000003.ckpt")
    assert torch.equal(saved["state_dict"]["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(saved["optimizer_states"][0]["state"][0]["exp_avg"], torch.arange(6.0).reshape(2, 3) * 2)
    assert saved["lmforge_pretrain"]["loss_history"] == [1.0, 2.0]


def test_a_removal_waits_for_the_queued_save_of_the_same_checkpoint(hold_writes: HoldWrites, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    io = OrderedAsyncCheckpointIO(MirroredCheckpointIO(str(mirror)))
    path = tmp_path / "local" / "step=0000004.ckpt"
    checkpoint = {"state_dict": {"w": torch.ones(2)}, "optimizer_states": [], "global_step": 4}
    io.save_checkpoint(checkpoint, path)
    assert hold_writes.held.wait(timeout=60)
    io.remove_checkpoint(path)  # ModelCheckpoint dropping it while its save still waits in the queue
    hold_writes.resume.set()
    io.teardown()
    assert not path.exists() and sorted(os.listdir(path.parent)) == []
    assert sorted(os.listdir(mirror)) == [LAST]  # the mirror's copy went too; last.ckpt stays, as a copy
    assert load(mirror / LAST)["global_step"] == 4


@pytest.mark.parametrize("background", [True, False], ids=["background", "blocking"])
def test_a_failing_save_fails_the_phase_with_its_error(
    shards: list[tuple[str, str]], tmp_path: Path, background: bool
) -> None:
    cold = tmp_path / "cold"
    cold.mkdir()
    (cold / "checkpoints").write_text("a file where the mirror's directory should be")
    spec = SPEC.model_copy(update={"max_steps": 8, "async_checkpoints": background})
    with pytest.raises(FileExistsError, match=re.escape(str(cold / "checkpoints"))):
        run_phase(spec, SMOKE, shards, None, str(tmp_path / "out"), cold_url=str(cold))
    assert not (tmp_path / "out" / "final").exists()
    assert load(tmp_path / "out" / "checkpoints" / "step=0000004.ckpt")["global_step"] == 4  # the local save held


def test_a_last_link_to_a_checkpoint_never_written_falls_back_to_the_previous_one(
    shards: list[tuple[str, str]], sync_run: PhaseResult, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    crash_at: Callable[[int], L.Callback],
) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_phase(SPEC, SMOKE, shards, None, str(tmp_path), callbacks=[crash_at(10)])
    ckpts = tmp_path / "checkpoints"
    # What a kill during the background save of step 8 leaves: the link ModelCheckpoint made at once, the save's
    # temporary file, and no step=0000008.ckpt.
    (ckpts / "step=0000008.ckpt").rename(ckpts / ".step=0000008.ckpt.x1y2.tmp")
    assert os.readlink(ckpts / LAST) == "step=0000008.ckpt" and not (ckpts / LAST).exists()

    caplog.set_level(logging.WARNING, logger="lmforge")
    result = run_phase(SPEC, SMOKE, shards, None, str(tmp_path))
    (warning,) = warnings_of(caplog)
    assert f"{ckpts / LAST} (-> step=0000008.ckpt)" in warning and "was never written" in warning
    assert f"Resuming from {ckpts / 'step=0000004.ckpt'} instead" in warning
    assert result.resumed_from_step == 4 and result.steps == SPEC.max_steps
    assert result.losses == pytest.approx(sync_run.losses, abs=1e-4, rel=0)
    assert not list(ckpts.glob(".*.tmp")) and step_checkpoints(tmp_path) == [20, 24]


def test_cold_storage_receives_each_checkpoint_and_follows_the_local_directory(
    shards: list[tuple[str, str]], sync_run: PhaseResult, s3_bucket: str, tmp_path: Path
) -> None:
    cold = f"{s3_bucket}/cold/p1"
    result = run_phase(SPEC, SMOKE, shards, None, str(tmp_path / "out"), cold_url=cold)
    names = [url.rsplit("/", 1)[-1] for url in storage.list_files(f"{cold}/checkpoints")]
    assert names == [LAST, "step=0000020.ckpt", "step=0000024.ckpt"]  # steps 4–16 removed there as here
    local = tmp_path / "out" / "checkpoints"
    for name in names:
        storage.download_file(f"{cold}/checkpoints/{name}", str(tmp_path / "fetched" / name))
        fetched = tmp_path / "fetched" / name
        assert checkpoint_problem(fetched) is None
        assert fetched.read_bytes() == (local / name).read_bytes()
    assert load(tmp_path / "fetched" / LAST)["global_step"] == 24
    assert storage.read_json(f"{cold}/phase_spec.json") == storage.read_json(str(tmp_path / "out" / "phase_spec.json"))
    assert result.losses == sync_run.losses
    with pytest.raises(ValueError, match="cold_url"):
        run_phase(SPEC, SMOKE, shards, None, f"{s3_bucket}/remote", cold_url=cold)


def test_a_remote_phase_whose_newest_checkpoint_is_corrupt_resumes_from_the_previous_mirrored_one(
    shards: list[tuple[str, str]], sync_run: PhaseResult, s3_bucket: str, caplog: pytest.LogCaptureFixture,
    crash_at: Callable[[int], L.Callback],
) -> None:
    out = f"{s3_bucket}/phase"
    ckpts = f"{out}/checkpoints"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_phase(SPEC, SMOKE, shards, None, out, callbacks=[crash_at(10)])
    names = [url.rsplit("/", 1)[-1] for url in storage.list_files(ckpts)]
    assert names == [LAST, "step=0000004.ckpt", "step=0000008.ckpt"]
    newest = storage.read_bytes(f"{ckpts}/step=0000008.ckpt")
    for name in [LAST, "step=0000008.ckpt"]:  # the newest, and last.ckpt, its copy
        storage.write_bytes(f"{ckpts}/{name}", newest[: len(newest) // 2])

    caplog.set_level(logging.WARNING, logger="lmforge")
    result = run_phase(SPEC, SMOKE, shards, None, out)
    (warning,) = warnings_of(caplog)
    assert f"{ckpts}/{LAST} (" in warning and f"{ckpts}/step=0000008.ckpt (" in warning
    assert f"Resuming from {ckpts}/step=0000004.ckpt instead" in warning
    assert result.resumed_from_step == 4 and result.steps == SPEC.max_steps
    assert result.losses == pytest.approx(sync_run.losses, abs=1e-4, rel=0)
    names = [url.rsplit("/", 1)[-1] for url in storage.list_files(ckpts)]
    # The mirror kept following ModelCheckpoint across the resume: step 4 (resumed from) and 8 (re-saved) removed.
    assert names == [LAST, f"{LAST}.corrupt", "step=0000008.ckpt.corrupt", "step=0000020.ckpt", "step=0000024.ckpt"]
    assert len(storage.read_bytes(f"{ckpts}/step=0000008.ckpt.corrupt")) == len(newest) // 2

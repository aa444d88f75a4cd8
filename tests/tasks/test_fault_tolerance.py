"""Fault tolerance of a pretraining phase, shown by killing it: SIGKILL mid-run, truncated or corrupt checkpoints."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from infra import storage
from model.config import ModelConfig
from tasks.pretrain import STEP_CKPT, PhaseInterrupted, PhaseResult, PhaseSpec, checkpoint_problem, run_phase

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
SPEC = PhaseSpec(name="p1", seq_len=64, rope_theta=50_000.0, max_steps=24, batch_size=4, lr=1e-2, warmup_steps=2,
                 checkpoint_every=4, seed=7, precision="32-true")

# The phase in a child process, slowed by a sleep per step so the parent's poll sees checkpoints appear before the
# phase ends (a 24-step smoke phase otherwise finishes between two polls).
CHILD = """
import json, sys, time
import lightning as L
import torch
from model.config import ModelConfig
from tasks.pretrain import PhaseSpec, run_phase

class Throttle(L.Callback):
    def on_train_batch_end(self, *args):
        time.sleep(args_["delay"])

args_ = json.loads(sys.argv[1])
torch.set_num_threads(1)
run_phase(PhaseSpec.model_validate(args_["spec"]), ModelConfig.from_dict(args_["model_config"]), args_["shards"],
          None, args_["out"], callbacks=[Throttle()])
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """Documents that count upward from a random start (as in test_pretrain): the loss falls within a few steps."""
    rng = np.random.default_rng(0)
    docs = [[(int(s) + i) % 500 + 3 for i in range(int(n))]
            for s, n in zip(rng.integers(0, 500, 400), rng.integers(10, 90, 400), strict=True)]
    directory = tmp_path_factory.mktemp("shards")
    np.save(directory / "tokens.npy", np.concatenate(docs).astype(np.uint32))
    np.save(directory / "offsets.npy", np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64))
    return [(str(directory / "tokens.npy"), str(directory / "offsets.npy"))]


@pytest.fixture(scope="module")
def whole(shards: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> PhaseResult:
    """The same phase, never interrupted."""
    return run_phase(SPEC, SMOKE, shards, None, str(tmp_path_factory.mktemp("whole")))


class CrashAt(L.Callback):
    """Fails the run when a step would start after ``step`` optimizer steps, like a lost machine."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def step_checkpoints(out: Path) -> list[int]:
    return sorted(int(m[1]) for p in (out / "checkpoints").glob("step=*.ckpt") if (m := STEP_CKPT.fullmatch(p.name)))


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def truncate(path: Path) -> int:
    """Keep the first half of the file's bytes (through a link: the bytes it points at); returns the new size."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2


def kill_when_checkpointed(shards: list[tuple[str, str]], out: Path, at_least: int, log_file: Path) -> int:
    """Run the phase in a child, SIGKILL it once a step checkpoint >= ``at_least`` exists; the newest step seen."""
    args = {"spec": SPEC.model_dump(), "model_config": SMOKE.to_dict(), "shards": shards, "out": str(out),
            "delay": 0.15}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log_file.open("wb") as sink:
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, env=env,
                                 stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while not (seen := step_checkpoints(out)) or seen[-1] < at_least:
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                child.wait()
                pytest.fail(f"child ended (rc {child.returncode}) or stalled before step {at_least}:\n"
                            f"{log_file.read_text()[-3000:]}")
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    return seen[-1]


def test_a_killed_phase_resumes_from_its_last_checkpoint_and_matches_an_uninterrupted_run(
    shards: list[tuple[str, str]], whole: PhaseResult, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    seen = kill_when_checkpointed(shards, out, 2 * SPEC.checkpoint_every, tmp_path / "child.log")
    assert not (out / "final").exists()  # killed, not finished
    at_kill = ckpt_step(out / "checkpoints" / "last.ckpt")
    assert at_kill >= seen >= 2 * SPEC.checkpoint_every

    resumed = run_phase(SPEC, SMOKE, shards, None, str(out))
    assert resumed.resumed_from_step == at_kill  # lost at most the steps since that checkpoint
    assert resumed.steps == SPEC.max_steps and len(resumed.losses) == SPEC.max_steps
    assert resumed.tokens == whole.tokens
    assert abs(resumed.final_loss - whole.final_loss) <= 0.02 * whole.final_loss
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-4, rel=0)  # the data position was restored
    assert step_checkpoints(Path(whole.native_url).parent) == [20, 24]  # ModelCheckpoint keeps the newest two


@pytest.mark.parametrize(
    ("stop", "bad", "fallback"),
    [(CrashAt(10), "step=0000008.ckpt", 4), (StopAt(10), "last.ckpt", 8)],
    ids=["crashed: last links to step 8", "stopped: last is a file at step 10"],
)
def test_a_truncated_last_checkpoint_is_set_aside_and_the_previous_one_resumed(
    shards: list[tuple[str, str]], whole: PhaseResult, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    stop: L.Callback, bad: str, fallback: int,
) -> None:
    with pytest.raises((RuntimeError, PhaseInterrupted)):
        run_phase(SPEC, SMOKE, shards, None, str(tmp_path), callbacks=[stop])
    ckpts = tmp_path / "checkpoints"
    assert step_checkpoints(tmp_path) == [4, 8]
    size = truncate(ckpts / "last.ckpt")  # a link to step=0000008.ckpt after the crash, a file of its own after a stop

    caplog.set_level(logging.WARNING, logger="lmforge")
    result = run_phase(SPEC, SMOKE, shards, None, str(tmp_path))
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"{ckpts / 'last.ckpt'}" in warning and bad in warning
    assert f"Resuming from {ckpts / f'step={fallback:07d}.ckpt'} instead" in warning
    assert (ckpts / f"{bad}.corrupt").stat().st_size == size
    assert result.resumed_from_step == fallback and result.steps == SPEC.max_steps
    assert result.losses == pytest.approx(whole.losses, abs=1e-4, rel=0)


def test_with_every_checkpoint_corrupt_the_phase_warns_and_starts_over(
    shards: list[tuple[str, str]], whole: PhaseResult, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_phase(SPEC, SMOKE, shards, None, str(tmp_path), callbacks=[CrashAt(10)])
    ckpts = tmp_path / "checkpoints"
    truncate(ckpts / "step=0000004.ckpt")
    (ckpts / "step=0000008.ckpt").write_bytes(b"not a checkpoint")

    caplog.set_level(logging.WARNING, logger="lmforge")
    result = run_phase(SPEC, SMOKE, shards, None, str(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("No valid step=*.ckpt is left" in w and "starts over from its initial weights" in w for w in warnings)
    assert {p.name for p in ckpts.glob("*.corrupt")} == {"step=0000004.ckpt.corrupt", "step=0000008.ckpt.corrupt"}
    assert result.resumed_from_step == 0 and result.steps == SPEC.max_steps
    assert result.losses == pytest.approx(whole.losses, abs=1e-4, rel=0)  # the same seed, from scratch


def test_a_corrupt_remote_last_checkpoint_is_set_aside_and_the_phase_starts_over(
    shards: list[tuple[str, str]], s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    short = SPEC.model_copy(update={"max_steps": 4, "checkpoint_every": 2})
    out = f"{s3_bucket}/phase"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_phase(short, SMOKE, shards, None, out, callbacks=[CrashAt(2)])
    last = f"{out}/checkpoints/last.ckpt"
    data = storage.read_bytes(last)
    storage.write_bytes(last, data[: len(data) // 2])

    caplog.set_level(logging.WARNING, logger="lmforge")
    result = run_phase(short, SMOKE, shards, None, out)
    assert any(last in r.getMessage() and "starts over" in r.getMessage() for r in caplog.records)
    assert len(storage.read_bytes(f"{last}.corrupt")) == len(data) // 2
    assert result.resumed_from_step == 0 and result.steps == 4
    fresh = run_phase(short, SMOKE, shards, None, str(tmp_path))  # the same phase, local and never interrupted
    assert result.losses == pytest.approx(fresh.losses, abs=1e-4, rel=0)


def test_checkpoint_problem_names_what_a_resume_would_miss(tmp_path: Path) -> None:
    torch.save({"global_step": 3, "state_dict": {}}, tmp_path / "partial.ckpt")
    assert checkpoint_problem(tmp_path / "partial.ckpt") == "no optimizer_states in it"
    torch.save({"global_step": 3, "state_dict": {}, "optimizer_states": []}, tmp_path / "whole.ckpt")
    assert checkpoint_problem(tmp_path / "whole.ckpt") is None
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert "not a complete zip archive" in str(checkpoint_problem(tmp_path / "empty.ckpt"))

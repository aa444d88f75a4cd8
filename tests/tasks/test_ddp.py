"""Data parallelism on CPU: a phase on 2 DDP processes (gloo) trains what 1 process trains at the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_model
from model.config import ModelConfig
from model.data import ResumableSampler
from model.pretrain import RankBatches
from tasks.pretrain import PhaseResult, PhaseSpec, run_phase

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
# No dropout in the model; fp32 so the only differences left are the order of float additions.
SPEC = PhaseSpec(name="p1", seq_len=64, rope_theta=50_000.0, max_steps=10, batch_size=4, lr=1e-2, warmup_steps=2,
                 checkpoint_every=5, seed=7, precision="32-true")

# Lightning's "ddp" launcher starts rank 1 by re-running sys.argv, so the phase runs from a script file (not -c).
# Each rank writes its PhaseResult; both hold the same losses, the mean over ranks (PretrainModule._log_step).
CHILD = """
import json, os, sys
from pathlib import Path
import torch
from model.config import ModelConfig
from tasks.pretrain import PhaseSpec, run_phase

torch.set_num_threads(1)
args = json.loads(Path(sys.argv[1]).read_text())
result = run_phase(PhaseSpec.model_validate(args["spec"]), ModelConfig.from_dict(args["model_config"]),
                   args["shards"], None, args["out"])
Path(args["out"], f"rank{os.environ['LOCAL_RANK']}.json").write_text(result.model_dump_json())
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """Documents that count upward from a random start, all 64 tokens long, so every 64-token sample holds exactly
    one document boundary and so 63 targets: per-rank mean losses then weigh every sample as one global mean does."""
    rng = np.random.default_rng(0)
    docs = [[(int(s) + i) % 500 + 3 for i in range(64)] for s in rng.integers(0, 500, 200)]
    directory = tmp_path_factory.mktemp("shards")
    np.save(directory / "tokens.npy", np.concatenate(docs).astype(np.uint32))
    np.save(directory / "offsets.npy", np.arange(len(docs) + 1, dtype=np.int64) * 64)
    return [(str(directory / "tokens.npy"), str(directory / "offsets.npy"))]


@pytest.fixture(scope="module")
def single(shards: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> PhaseResult:
    return run_phase(SPEC, SMOKE, shards, None, str(tmp_path_factory.mktemp("single")))


@pytest.fixture(scope="module")
def accumulated(shards: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> PhaseResult:
    """One process taking each global batch as two micro-batches of 2: the halves the two DDP ranks take."""
    spec = SPEC.model_copy(update={"batch_size": 2, "accumulate": 2})
    return run_phase(spec, SMOKE, shards, None, str(tmp_path_factory.mktemp("accumulated")))


@pytest.fixture(scope="module")
def ddp(shards: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> list[PhaseResult]:
    """The phase with ``devices=2`` in a child process (and its rank-1 re-run); the results of ranks 0 and 1."""
    tmp = tmp_path_factory.mktemp("ddp")
    out, script, args, log = tmp / "out", tmp / "phase.py", tmp / "args.json", tmp / "child.log"
    script.write_text(CHILD)
    spec = SPEC.model_copy(update={"devices": 2})
    args.write_text(json.dumps({"spec": spec.model_dump(), "model_config": SMOKE.to_dict(), "shards": shards,
                                "out": str(out)}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with log.open("wb") as sink:
        done = subprocess.run([sys.executable, str(script), str(args)], cwd=ROOT, env=env, stdout=sink,
                              stderr=subprocess.STDOUT, timeout=240, check=False)
    if done.returncode != 0:
        pytest.fail(f"the 2-process phase failed (rc {done.returncode}):\n{log.read_text()[-4000:]}")
    return [PhaseResult.model_validate_json((out / f"rank{r}.json").read_text()) for r in (0, 1)]


# ---------------------------------------------------------------------------------------------------------------


def rank_batches(batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """One epoch of 102 samples (a fresh sampler each time: a ResumableSampler counts what it handed out)."""
    return list(RankBatches(ResumableSampler(102, seed=7, epochs=1), batch_size, rank=rank, world_size=world_size))


def test_rank_batches_split_each_global_batch_in_order() -> None:
    whole = rank_batches(4, 0, 1)
    halves = rank_batches(2, 0, 2), rank_batches(2, 1, 2)
    assert len(whole) == len(halves[0]) == len(halves[1]) == 25  # the short 26th global batch is dropped
    assert all(w == a + b for w, a, b in zip(whole, *halves, strict=True))  # rank r: the r-th half of each batch
    assert sum(whole, []) == ResumableSampler(102, seed=7).permutation(0)[:100].tolist()


def test_two_ddp_processes_follow_the_one_process_loss_trajectory(
    single: PhaseResult, ddp: list[PhaseResult]
) -> None:
    rank0, rank1 = ddp
    assert rank0.losses == rank1.losses  # every rank logs the mean over ranks, not its own micro-batch loss
    assert rank0.steps == single.steps == 10 and len(rank0.losses) == 10
    assert rank0.tokens == single.tokens == 10 * 4 * 64
    # Measured here: max |Δ| ≈ 1e-6 on losses of 6.3 … 5.2 (float order: gloo's all-reduce vs one batch).
    torch.testing.assert_close(torch.tensor(rank0.losses), torch.tensor(single.losses), rtol=1e-5, atol=1e-5)
    assert single.losses[-1] < single.losses[0] - 0.8  # a trajectory that goes somewhere, not two flat lines


def test_two_ddp_processes_end_with_the_one_process_weights(single: PhaseResult, ddp: list[PhaseResult]) -> None:
    one, two = load_model(single.native_url).state_dict(), load_model(ddp[0].native_url).state_dict()
    assert one.keys() == two.keys()
    # Measured here: ≤ 1.3e-5 relative (Frobenius) per tensor; elementwise ≤ 2e-6 except 22 of 188K entries (two
    # embedding/output rows) at ≤ 7e-5: coordinates whose gradient is mostly rounding, which AdamW normalises into
    # lr-sized steps.
    for name in one:
        relative = float((two[name] - one[name]).norm() / one[name].norm())
        assert relative < 1e-4, f"{name}: relative difference {relative:.1e}"
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=5e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_two_ddp_processes_compute_exactly_what_one_process_accumulating_the_same_halves_does(
    accumulated: PhaseResult, ddp: list[PhaseResult]
) -> None:
    # Bit for bit: each step's gradient is g0/2 + g1/2 either way (DDP divides by the world size before gloo sums;
    # Lightning halves each micro-batch loss, exactly, before backward), and a sum of two floats has no order. The same
    # holds with documents of any length, where the single batch of 4 above does not: a mean of two per-half token means
    # weighs tokens differently from one mean over the batch (measured on test_pretrain's 10-90-token documents: losses
    # apart by up to 0.018 within 10 steps, and 0.0 here).
    assert ddp[0].losses == accumulated.losses
    one, two = load_model(accumulated.native_url).state_dict(), load_model(ddp[0].native_url).state_dict()
    assert all(torch.equal(two[name], tensor) for name, tensor in one.items())


def test_the_device_count_is_not_part_of_a_phases_identity(
    ddp: list[PhaseResult], shards: list[tuple[str, str]]
) -> None:
    again = run_phase(SPEC, SMOKE, shards, None, str(Path(ddp[0].native_url).parent))  # devices=1 this time
    assert again.resumed_from_final and again.losses == ddp[0].losses


def test_a_batch_that_does_not_divide_over_the_devices_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"batch_size=3 does not divide over devices=2"):
        SPEC.model_validate({**SPEC.model_dump(), "batch_size": 3, "devices": 2})
    with pytest.raises(ValueError, match="devices"):
        SPEC.model_validate({**SPEC.model_dump(), "devices": 0})

"""Fault tolerance of training, shown by killing it: SIGKILL during each pretraining phase and during SFT (each run
the way the pipeline runs it: the smoke preset's schedule, its data mix, the previous stage's weights, an MLflow stage
run), truncated or corrupt checkpoints.

Run as a script (``python tests/tasks/test_fault_tolerance.py ARGS``) this module is the child that the kill tests
start and SIGKILL: it trains one stage exactly as the in-process runs do, through the same functions.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import Dataset

from infra import storage
from infra.tracking import CRASHED_TAG, RESUMED_BY_TAG, RESUMED_FROM_TAG, STAGE_TAG, RunRef, Tracker
from model.config import ModelConfig
from model.data import DocumentStore, long_short_token_share
from tasks.phases import doc_kinds, phase_documents
from tasks.presets import pipeline_preset
from tasks.pretrain import STEP_CKPT, PhaseInterrupted, PhaseResult, PhaseSpec, checkpoint_problem, run_phase
from tasks.reporting import stage_run
from tasks.tokenize import local_shards

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
SPEC = PhaseSpec(name="p1", seq_len=64, rope_theta=50_000.0, max_steps=24, batch_size=4, lr=1e-2, warmup_steps=2,
                 checkpoint_every=4, seed=7, precision="32-true")

PLAN = pipeline_preset("smoke")
STAGES = [*(p.spec["name"] for p in PLAN.phases), "sft"]
INIT_FROM = {"phase2_long": "phase1_short", "phase3_capability": "phase2_long", "sft": PLAN.sft_base}
CODE_MODULES = ("csv", "difflib", "shlex", "textwrap")  # standard-library sources: the corpus's code
LOG = logging.getLogger("lmforge.tests.fault_tolerance")


def step_checkpoints(out: Path) -> list[int]:
    return sorted(int(m[1]) for p in (out / "checkpoints").glob("step=*.ckpt") if (m := STEP_CKPT.fullmatch(p.name)))


# --------------------------------------------------------------------------------------- every stage, killed


@dataclass(frozen=True)
class World:
    """What the pipeline hands its training stages, built by the project's own functions at smoke size."""

    manifest: str  # token shards of a small clean corpus (text, long text, high-tier code): phases 1 and 2
    mix_manifest: str  # token shards of its capability mix: phase 3
    tokenizer: str
    sft_data: str  # train.jsonl / held_out.jsonl of generated conversations


def build_world(root: Path, prose: list[str]) -> World:
    from model.tokenizer import Tokenizer
    from tasks.mix import build_capability_mix
    from tasks.sft.generate import SFTDataConfig, generate_sft, write_sft
    from tasks.tokenize import token_manifest_url, tokenize_corpus

    write_clean_corpus(root / "clean", prose)
    build_capability_mix(str(root / "clean"), str(root / "mix"), PLAN.capability)
    records = generate_sft(SFTDataConfig(arithmetic=8, interpreter=2, plugin=6, python_function=1, multi_turn=4,
                                         refusal=3, long_context=0, workers=1))
    write_sft(records, str(root / "sft"))
    # The pipeline trains the tokenizer on the corpus alone; the chats go in too, as in tests/flows/test_sft.py.
    vocab = PLAN.model_config_for(0).vocab_size
    Tokenizer.train([*prose, *(json.dumps(r) for r in records)], vocab).save(root / "tokenizer.json")
    for corpus in ("clean", "mix"):
        tokenize_corpus(str(root / corpus), str(root / "tokenizer.json"), str(root / corpus), workers=1)
    return World(token_manifest_url(str(root / "clean")), token_manifest_url(str(root / "mix")),
                 str(root / "tokenizer.json"), str(root / "sft"))


def write_clean_corpus(root: Path, prose: list[str]) -> None:
    """A cleaned corpus as the data flows leave it: text with quality scores (some documents long enough for phase
    2), and high-tier repository documents of code (weight 2: read twice by a phase that reads everything)."""
    articles = ["\n\n".join(prose[i : i + 8]) for i in range(0, 96, 8)]  # >= 512 tokens: "long" in the smoke preset
    texts = [*prose, *articles]
    text = [{"id": f"t{i}", "text": t, "source": "stdlib", "meta": {"quality": round(1 - i / len(texts), 4)}}
            for i, t in enumerate(texts)]
    sources = {name: Path(str(importlib.util.find_spec(name).origin)).read_text()[:6000] for name in CODE_MODULES}
    code = [{"id": f"c{i}", "repo": f"cpython/{name}", "text": f"# Lib/{name}.py\n\n{source}",
             "meta": {"tier": "high", "weight": 2.0}} for i, (name, source) in enumerate(sources.items())]
    for kind, records in (("text", text), ("code", code)):
        storage.write_text(str(root / kind / "shard.jsonl"), "".join(json.dumps(r) + "\n" for r in records))


def stage_spec(stage: str) -> PhaseSpec:
    """The preset's schedule for ``stage`` (its own checkpoint interval), run for three checkpoint intervals."""
    spec = next((p.spec for p in PLAN.phases if p.spec["name"] == stage), PLAN.sft if stage == "sft" else None)
    assert spec is not None, stage
    return PhaseSpec(**{**spec, "max_steps": 3 * spec["checkpoint_every"]})


def stage_inputs(world: World, stage: str, init: str | None) -> dict[str, Any]:
    """``run_phase``'s arguments for ``stage`` as ``phase_task`` / ``sft_task`` build them (without the MLflow run)."""
    spec = stage_spec(stage)
    if stage == "sft":
        return {"spec": spec, "model_config": _base_config(init), "store_paths": [], "doc_ids": None,
                "init_weights": init, "dataset": sft_dataset(world, spec)}
    index = [p.spec["name"] for p in PLAN.phases].index(stage)
    manifest = world.mix_manifest if stage == "phase3_capability" else world.manifest  # the pipeline's phase_tokens
    shards = local_shards(manifest, Path(manifest).parent)
    doc_ids, _ = phase_documents(manifest, shards, spec, PLAN.phases[index].mix.model_dump())
    return {"spec": spec, "model_config": PLAN.model_config_for(index), "store_paths": shards, "doc_ids": doc_ids,
            "init_weights": init, "dataset": None}


def _base_config(init: str | None) -> ModelConfig:
    from model.checkpoint import load_model

    assert init is not None, "SFT starts from a base checkpoint"
    return load_model(init).config


def sft_dataset(world: World, spec: PhaseSpec) -> Dataset[Any]:
    """The packed ChatML windows of the SFT train split, as ``sft_task`` packs them."""
    from model.sft import PackedChatDataset
    from tasks.sft.train import conversations, plugin_table, read_chats
    from tasks.tokenize import load_tokenizer

    plugins = sorted(plugin_table([]))
    train, bad = read_chats(storage.join(world.sft_data, "train.jsonl"), plugins)
    assert train and not bad
    tokenizer, _ = load_tokenizer(world.tokenizer)
    return PackedChatDataset(conversations(train, tokenizer, plugins), spec.seq_len, seed=spec.seed,
                             pad_id=tokenizer.eos_id)


def run_stage(world: World, stage: str, out: str, init: str | None, parent: RunRef | None = None,
              callbacks: list[L.Callback] | None = None) -> PhaseResult:
    """One stage into ``out``; with ``parent``, inside an MLflow stage run that Lightning logs to, as the tasks do."""
    args = stage_inputs(world, stage, init)
    spec = args.pop("spec")
    if parent is None:
        return run_phase(spec, args.pop("model_config"), args.pop("store_paths"), args.pop("doc_ids"), out, **args,
                         callbacks=callbacks)
    with stage_run(parent, run_name(stage), {"phase": spec.model_dump()}, output=out) as (_, ref):
        return run_phase(spec, args.pop("model_config"), args.pop("store_paths"), args.pop("doc_ids"), out, **args,
                         mlflow=(ref.tracking_uri, ref.run_id), callbacks=callbacks)


def run_name(stage: str) -> str:
    """The stage's MLflow run name, as ``phase_task`` and ``sft_task`` name it."""
    return stage if stage == "sft" else f"pretrain/{stage}"


@pytest.fixture(scope="module")
def world(prose: list[str], tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("world"), prose)


@pytest.fixture(scope="module")
def uninterrupted(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhaseResult]:
    """Every stage run once without interruption, each from the previous one's final/ as the pipeline chains them."""
    root, results = tmp_path_factory.mktemp("uninterrupted"), {}
    for stage in STAGES:
        init = results[INIT_FROM[stage]].native_url if stage in INIT_FROM else None
        results[stage] = run_stage(world, stage, str(root / stage), init)
    return results


class HoldAt(L.Callback):
    """In the child: after ``step`` optimizer steps, report the step and hang there until killed."""

    def __init__(self, step: int, progress: str) -> None:
        self.step, self.progress = step, Path(progress)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step < self.step:
            return
        self.progress.with_suffix(".tmp").write_text(json.dumps({"step": trainer.global_step}))
        self.progress.with_suffix(".tmp").replace(self.progress)
        while True:  # mid-phase, between two checkpoints, with the MLflow run open: the moment the kill lands
            time.sleep(1)


def child_main(raw: str) -> None:
    args = json.loads(raw)
    torch.set_num_threads(1)
    run_stage(World(**args["world"]), args["stage"], args["out"], args["init"], RunRef(*args["parent"]),
              callbacks=[HoldAt(args["hold_at"], args["progress"])])


def kill_during(world: World, stage: str, out: Path, init: str | None, parent: RunRef, hold_at: int) -> int:
    """Run ``stage`` in a child process and SIGKILL it once it has trained ``hold_at`` steps; the step it died at."""
    progress, log_file = out.parent / f"{stage}.progress.json", out.parent / f"{stage}.child.log"
    args = {"world": asdict(world), "stage": stage, "out": str(out), "init": init, "hold_at": hold_at,
            "progress": str(progress), "parent": [parent.tracking_uri, parent.run_id]}
    with log_file.open("wb") as sink:
        child = subprocess.Popen([sys.executable, __file__, json.dumps(args)], cwd=ROOT, stdout=sink,
                                 stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not progress.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                child.wait()
                pytest.fail(f"child ended (rc {child.returncode}) or stalled before step {hold_at}:\n"
                            f"{log_file.read_text()[-3000:]}")
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    return int(json.loads(progress.read_text())["step"])


def kill_figures(stage: str, killed_at: int, every: int, whole: PhaseResult, resumed: PhaseResult) -> dict[str, Any]:
    """What the closing note reports for one killed stage."""
    return {"stage": stage, "checkpoint_every": every, "killed_at_step": killed_at,
            "resumed_from_step": resumed.resumed_from_step, "steps_lost": killed_at - resumed.resumed_from_step,
            "final_loss_uninterrupted": round(whole.final_loss, 6), "final_loss_resumed": round(resumed.final_loss, 6),
            "relative_diff": abs(resumed.final_loss - whole.final_loss) / whole.final_loss}


def test_the_stages_are_the_presets_and_chain_as_the_pipeline_chains_them(
    world: World, uninterrupted: dict[str, PhaseResult]
) -> None:
    from model.checkpoint import load_model

    assert STAGES == ["phase1_short", "phase2_long", "phase3_capability", "sft"]
    p1, p2 = stage_spec("phase1_short"), stage_spec("phase2_long")
    assert (p2.seq_len, p2.rope_theta, p1.rope_theta) == (8 * p1.seq_len, 1_000_000.0, 50_000.0)
    vocab = PLAN.model_config_for(0).vocab_size
    assert storage.read_json(world.manifest)["vocab_size"] == vocab  # phase_task refuses a mismatch
    ids = {stage: stage_inputs(world, stage, None)["doc_ids"] for stage in STAGES[:3]}
    kinds, lengths = doc_kinds(world.manifest), DocumentStore.from_shards(local_shards(world.manifest, ROOT)).lengths
    assert np.array_equal(ids["phase1_short"], np.repeat(np.arange(len(kinds)), np.where(kinds == "code", 2, 1)))
    long_share, _ = long_short_token_share(lengths, ids["phase2_long"], PLAN.phases[1].mix.long_threshold or 0)
    assert 0.4 < long_share < 0.6  # half the phase-2 tokens from long documents
    mix_kinds = doc_kinds(world.mix_manifest)
    assert set(mix_kinds[ids["phase3_capability"]]) == {"text", "code"}  # text, reasoning (as text) and code
    assert len(ids["phase3_capability"]) > len(np.unique(ids["phase3_capability"]))  # high-tier code read twice
    configs = {stage: load_model(result.native_url).config for stage, result in uninterrupted.items()}
    assert configs["phase2_long"].max_seq_len == p2.seq_len and configs["sft"] == configs["phase2_long"]
    assert all(r.steps == 12 and r.final_loss < r.first_loss for r in uninterrupted.values())


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_killed_mid_run_resumes_losing_at_most_one_checkpoint_interval_and_ends_where_it_would_have(
    stage: str, world: World, uninterrupted: dict[str, PhaseResult], tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker, every = Tracker(uri), stage_spec(stage).checkpoint_every
    parent = tracker.start_parent(f"fault-tolerance-{stage}", {})
    init = uninterrupted[INIT_FROM[stage]].native_url if stage in INIT_FROM else None
    out = tmp_path / stage
    killed_at = kill_during(world, stage, out, init, parent, hold_at=2 * every + every // 2)  # mid-interval
    assert not (out / "final").exists()  # killed, not finished
    client = MlflowClient(uri)
    (crashed,) = client.search_runs([tracker.experiment_id], f"tags.`{STAGE_TAG}` = '{run_name(stage)}'")
    assert crashed.info.status == "RUNNING"  # nothing ended the killed stage's run

    resumed = run_stage(world, stage, str(out), init, parent)
    whole = uninterrupted[stage]
    figures = kill_figures(stage, killed_at, every, whole, resumed)
    LOG.info("kill figures: %s", json.dumps(figures))
    assert killed_at == 2 * every + every // 2
    assert killed_at - every <= resumed.resumed_from_step < killed_at  # at most one checkpoint interval lost
    assert resumed.steps == whole.steps and resumed.tokens == whole.tokens
    assert figures["relative_diff"] <= 0.02
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-4, rel=0)  # exact resume: the same trajectory
    assert step_checkpoints(out) == [2 * every, 3 * every]  # ModelCheckpoint keeps the newest two

    old = client.get_run(crashed.info.run_id)
    new_id = old.data.tags[RESUMED_BY_TAG]
    assert old.info.status == "KILLED" and old.data.tags[CRASHED_TAG] == "true"
    assert client.get_run(new_id).info.status == "FINISHED"
    assert client.get_run(new_id).data.tags[RESUMED_FROM_TAG] == crashed.info.run_id
    history = client.get_metric_history(new_id, "train/loss")
    assert [m.step for m in history] == list(range(resumed.resumed_from_step, whole.steps))


# --------------------------------------------------------------------------------------- corrupt checkpoints


@pytest.fixture(scope="module")
def shards(counting_shards: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return counting_shards


@pytest.fixture(scope="module")
def whole(shards: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> PhaseResult:
    """The same phase, never interrupted."""
    return run_phase(SPEC, SMOKE, shards, None, str(tmp_path_factory.mktemp("whole")))


def truncate(path: Path) -> int:
    """Keep the first half of the file's bytes (through a link: the bytes it points at); returns the new size."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2


@pytest.mark.parametrize(
    ("how", "bad", "fallback"),
    [("crash_at", "step=0000008.ckpt", 4), ("stop_at", "last.ckpt", 8)],
    ids=["crashed: last links to step 8", "stopped: last is a file at step 10"],
)
def test_a_truncated_last_checkpoint_is_set_aside_and_the_previous_one_resumed(
    shards: list[tuple[str, str]], whole: PhaseResult, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest, how: str, bad: str, fallback: int,
) -> None:
    interrupt = request.getfixturevalue(how)  # conftest's CrashAt or StopAt
    with pytest.raises((RuntimeError, PhaseInterrupted)):
        run_phase(SPEC, SMOKE, shards, None, str(tmp_path), callbacks=[interrupt(10)])
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
    shards: list[tuple[str, str]], whole: PhaseResult, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    crash_at: Callable[[int], L.Callback],
) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_phase(SPEC, SMOKE, shards, None, str(tmp_path), callbacks=[crash_at(10)])
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


def test_a_corrupt_remote_last_checkpoint_is_set_aside_and_the_mirrored_step_checkpoint_resumed(
    shards: list[tuple[str, str]], s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    crash_at: Callable[[int], L.Callback],
) -> None:
    short = SPEC.model_copy(update={"max_steps": 4, "checkpoint_every": 2})
    out = f"{s3_bucket}/phase"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_phase(short, SMOKE, shards, None, out, callbacks=[crash_at(2)])
    last = f"{out}/checkpoints/last.ckpt"
    data = storage.read_bytes(last)
    storage.write_bytes(last, data[: len(data) // 2])

    caplog.set_level(logging.WARNING, logger="lmforge")
    result = run_phase(short, SMOKE, shards, None, out)
    fallback = f"{out}/checkpoints/step=0000002.ckpt"
    assert any(last in r.getMessage() and f"Resuming from {fallback} instead" in r.getMessage()
               for r in caplog.records)
    assert len(storage.read_bytes(f"{last}.corrupt")) == len(data) // 2
    assert result.resumed_from_step == 2 and result.steps == 4
    fresh = run_phase(short, SMOKE, shards, None, str(tmp_path))  # the same phase, local and never interrupted
    assert result.losses == pytest.approx(fresh.losses, abs=1e-4, rel=0)


def test_checkpoint_problem_names_what_a_resume_would_miss(tmp_path: Path) -> None:
    torch.save({"global_step": 3, "state_dict": {}}, tmp_path / "partial.ckpt")
    assert checkpoint_problem(tmp_path / "partial.ckpt") == "no optimizer_states in it"
    torch.save({"global_step": 3, "state_dict": {}, "optimizer_states": []}, tmp_path / "whole.ckpt")
    assert checkpoint_problem(tmp_path / "whole.ckpt") is None
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert "not a complete zip archive" in str(checkpoint_problem(tmp_path / "empty.ckpt"))


if __name__ == "__main__":
    child_main(sys.argv[1])

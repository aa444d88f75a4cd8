"""One pretraining phase as a plain function: resumable, idempotent, local paths or ``s3://`` alike.

Layout under a phase's ``out_url``::

    phase_spec.json           the spec and model config this directory belongs to (a different spec is refused)
    checkpoints/last.ckpt     the Lightning checkpoint to resume from (model, optimizer, scheduler, step, counters)
    checkpoints/step=NNNNNNN.ckpt  the two newest periodic checkpoints (last.ckpt links to the newer one)
    final/                    lmforge native checkpoint (model.checkpoint.save_native) + phase_result.json

A call with ``checkpoints/last.ckpt`` present resumes from it, data position included; a call with
``final/phase_result.json`` present returns that result without training. A ``last.ckpt`` that does not load (truncated,
torn), or that links to a step checkpoint never written (the run was killed while saving it), is set aside (renamed to
``*.corrupt``; a dangling link is removed) and the newest loadable ``step=*.ckpt`` is resumed from instead, with a
warning; with none left the phase starts over.

Checkpoints are saved from a background thread by default (``PhaseSpec.async_checkpoints``): training goes on while
one is written and uploaded; its tensors are copied first, so it holds the weights of the step it was taken at. A save
that fails fails the phase (at the next save, or when the phase waits for its saves before writing ``final/``).

Mirror: for an ``s3://`` (any non-local) ``out_url`` the checkpoints are written to a local staging directory and
mirrored to ``out_url/checkpoints/``; a local phase given ``cold_url`` mirrors them to ``cold_url/checkpoints/``
(plus ``cold_url/phase_spec.json``), so that ``cold_url`` can serve as the ``out_url`` of a rerun on another machine.
The mirror holds what the local directory holds: each ``step=NNNNNNN.ckpt`` uploaded (atomically, from the saving
thread) once it is written, removed when ModelCheckpoint drops it, and ``last.ckpt`` as a store-side copy of the
newest (or the ``last.ckpt`` file itself, written at the end of a phase). A remote phase resumes from the mirror:
``last.ckpt``, else the newest loadable ``step=*.ckpt``, setting unusable objects aside as ``*.corrupt`` just as a
local phase does. A local phase resumes from its own directory only, never from ``cold_url``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import Dataset

from infra import storage
from infra.runtime import detect_runtime
from infra.settings import get_logger
from model.checkpoint import load_model, save_native
from model.config import ModelConfig
from model.data import DocumentStore, PackedDataset
from model.model import Block
from model.pretrain import OptimConfig, PackedDataModule, PretrainModule, from_pretrained_weights
from model.probes import copy_probe

log = get_logger(__name__)

SPEC_FILE = "phase_spec.json"
RESULT_FILE = "phase_result.json"
LAST = "last.ckpt"
STEP_CKPT = re.compile(r"step=(\d+)\.ckpt")  # ModelCheckpoint's names, see _trainer
CORRUPT = ".corrupt"  # suffix of a checkpoint set aside because it does not load
UNFINISHED = ".*.ckpt.*.tmp"  # storage.atomic_write's temporary files: a save killed mid-write leaves one
RESUME_KEYS = ("state_dict", "optimizer_states", "global_step")
NOT_IDENTITY = {"devices", "async_checkpoints"}  # PhaseSpec fields that say how a phase runs, not what it trains


class PhaseSpec(BaseModel):
    """One phase's schedule. ``batch_size`` is sequences per micro-batch over all ``devices``; ``accumulate``
    micro-batches per step.

    ``devices``: data-parallel processes (GPUs, or CPU processes over gloo) that split each micro-batch, each taking
    ``batch_size / devices`` sequences, so a step trains on ``batch_size × accumulate`` sequences in the same order
    whatever ``devices`` is (the loss is a mean of per-device means, as with ``accumulate``). It says where the phase
    runs, not what it trains, so it is no part of the identity that ``check_phase_dir`` compares.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    seq_len: int = Field(ge=1)
    rope_theta: float = Field(gt=0)
    max_steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    accumulate: int = Field(1, ge=1)
    devices: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 1234
    precision: Literal["bf16-mixed", "32-true"] = "bf16-mixed"
    packing_masks: bool = True
    async_checkpoints: bool = True

    @model_validator(mode="after")
    def _check(self) -> PhaseSpec:
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"phase {self.name!r}: warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}"
            )
        if self.batch_size % self.devices:
            raise ValueError(
                f"phase {self.name!r}: batch_size={self.batch_size} does not divide over devices={self.devices}; "
                "batch_size is the micro-batch over all devices, so make it a multiple of devices"
            )
        return self


class PhaseResult(BaseModel):
    """What a finished phase reports; ``losses`` holds train/loss of every optimizer step of the phase."""

    name: str
    final_loss: float
    first_loss: float
    losses: list[float]
    steps: int
    tokens: int
    seconds: float  # training wall time of the call that finished the phase
    checkpoint_url: str  # the Lightning checkpoint at the last step
    native_url: str  # the lmforge directory (final/)
    resumed_from_step: int = 0  # > 0: the call that finished resumed from a checkpoint at this step
    resumed_from_final: bool = False  # True: returned from final/phase_result.json without training
    copy_probe: dict[str, float] = Field(default_factory=dict)  # model.probes.copy_probe of the final weights


class PhaseInterrupted(RuntimeError):
    """Training stopped before ``max_steps`` without an error (a callback asked it to); a re-run resumes."""


def run_phase(
    spec: PhaseSpec,
    model_config: ModelConfig,
    store_paths: Sequence[tuple[str | Path, str | Path]],
    doc_ids: np.ndarray | None,
    out_url: str,
    *,
    init_weights: str | None = None,
    mlflow: tuple[str, str] | None = None,
    callbacks: list[Callback] | None = None,
    dataset: Dataset[Any] | None = None,
    cold_url: str | None = None,
) -> PhaseResult:
    """Train one phase into ``out_url`` (resuming, or returning the stored result, as the layout above says).

    ``dataset``: samples to train on instead of packing ``store_paths`` (SFT passes its `PackedChatDataset`).

    The phase's model is ``model_config`` with ``rope_theta = spec.rope_theta`` and ``max_seq_len`` raised to
    ``spec.seq_len`` if shorter. ``init_weights``: a previous phase's native directory or ``.ckpt`` (local path or
    URL) to start from; ignored when resuming. ``mlflow``: ``(tracking_uri, run_id)`` of an existing run that receives
    params and per-step metrics (Lightning's MLFlowLogger marks it FINISHED, or FAILED, at the end). ``cold_url``: where
    a local phase mirrors its checkpoints (e.g. ``s3://bucket/prefix``; see the module docstring).
    """
    config = phase_model_config(spec, model_config)
    identity = {"spec": spec.model_dump(exclude=NOT_IDENTITY), "model_config": config.to_dict()}
    mirror_root = _mirror_root(spec, out_url, cold_url)
    roots = [out_url] if cold_url is None else [out_url, cold_url]  # both hold phase_spec.json
    for root in roots:
        check_phase_dir(root, identity, spec.name)
    stored = completed_result(out_url)
    if stored is not None:
        log.info("phase %s already finished at %s; returning the stored result", spec.name, out_url)
        return stored
    dataset = dataset if dataset is not None else build_dataset(spec, store_paths, doc_ids)
    if init_weights is not None and not storage.exists(init_weights):
        raise ValueError(f"phase {spec.name!r}: init_weights {init_weights!r} does not exist; expected a previous "
                         "phase's final/ directory or a Lightning .ckpt")
    for root in roots:
        storage.write_json(storage.join(root, SPEC_FILE), identity)
    mirror = storage.join(mirror_root, "checkpoints") if mirror_root else None
    with _checkpoint_dir(out_url) as ckpt_dir:
        return _train(spec, config, dataset, ckpt_dir, out_url, mirror, init_weights, mlflow, callbacks)


def _mirror_root(spec: PhaseSpec, out_url: str, cold_url: str | None) -> str | None:
    """Where the checkpoints are mirrored: a remote ``out_url`` itself, else ``cold_url`` (None: nowhere)."""
    remote = not storage.is_local(storage.fs_for(out_url)[0])
    if cold_url is None:
        return out_url if remote else None
    if remote:
        raise ValueError(f"phase {spec.name!r}: cold_url={cold_url!r} is for a local out_url; {out_url!r} is remote "
                         "and holds the mirrored checkpoints itself")
    if cold_url.rstrip("/") == out_url.rstrip("/"):
        raise ValueError(f"phase {spec.name!r}: cold_url={cold_url!r} is out_url itself; expected another location")
    return cold_url


def _train(
    spec: PhaseSpec, config: ModelConfig, dataset: Dataset[Any], ckpt_dir: Path, out_url: str, mirror: str | None,
    init_weights: str | None, mlflow: tuple[str, str] | None, callbacks: list[Callback] | None,
) -> PhaseResult:
    resume = _fetch_resume_checkpoint(out_url, mirror, ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)  # ModelCheckpoint links last.ckpt in it before a background save ran
    L.seed_everything(spec.seed, workers=True)
    optim = OptimConfig(lr=spec.lr, warmup_steps=spec.warmup_steps, total_steps=spec.max_steps)
    module = PretrainModule(config, optim, packing_masks=spec.packing_masks)
    if init_weights is not None and resume is None:
        _init_from(module, init_weights, spec)
    trainer = _trainer(spec, config, optim.grad_clip, ckpt_dir, mirror, mlflow, callbacks)
    data = PackedDataModule(dataset, spec.batch_size // spec.devices, spec.accumulate, seed=spec.seed)  # per rank
    start = time.perf_counter()
    with warnings.catch_warnings():
        # How a resume here is meant to look: the same directory again.
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    last = _final_checkpoint(trainer, spec, ckpt_dir)
    if trainer.global_step < spec.max_steps:
        raise PhaseInterrupted(f"phase {spec.name!r} stopped at step {trainer.global_step} of {spec.max_steps}; "
                               f"run it again to resume from {storage.join(out_url, 'checkpoints', LAST)}")
    return _finish(spec, module, out_url, last, seconds)


def phase_model_config(spec: PhaseSpec, model_config: ModelConfig) -> ModelConfig:
    """The phase's RoPE base; a context at least as long as the phase's samples (phase 2 raises it 8×)."""
    return model_config.replace(rope_theta=spec.rope_theta, max_seq_len=max(model_config.max_seq_len, spec.seq_len))


def check_phase_dir(out_url: str, identity: dict[str, Any], name: str) -> None:
    """Refuse an ``out_url`` whose checkpoints or result belong to a different spec or model config."""
    url = storage.join(out_url, SPEC_FILE)
    if not storage.exists(url) or not _has_progress(out_url):
        return  # nothing trained there yet: the new spec simply takes the directory over
    found, wanted = storage.read_json(url), json.loads(json.dumps(identity))  # tuples read back as lists
    diff = sorted(
        f"{part}.{key}" for part in wanted for key in set(wanted[part]) | set(found.get(part, {}))
        if wanted[part].get(key) != found.get(part, {}).get(key)
    )
    if diff:
        raise ValueError(
            f"phase {name!r}: {out_url} already holds training of a different spec or model config "
            f"(differs in {', '.join(diff)}); use a new out_url or remove the old one"
        )


def _has_progress(out_url: str) -> bool:
    marks = (storage.join(out_url, "checkpoints", LAST), storage.join(out_url, "final", RESULT_FILE))
    return any(storage.exists(url) for url in marks)


def completed_result(out_url: str) -> PhaseResult | None:
    url = storage.join(out_url, "final", RESULT_FILE)
    if not storage.exists(url):
        return None
    return PhaseResult.model_validate({**storage.read_json(url), "resumed_from_final": True})


def build_dataset(spec: PhaseSpec, store_paths: Sequence[tuple[str | Path, str | Path]], doc_ids: np.ndarray | None
                  ) -> PackedDataset:
    if not store_paths:
        raise ValueError(f"phase {spec.name!r}: no token shards given; expected (tokens.npy, offsets.npy) pairs")
    missing = [str(p) for pair in store_paths for p in pair if not Path(p).is_file()]
    if missing:
        raise ValueError(f"phase {spec.name!r}: token shard file(s) not found: {', '.join(missing[:3])}")
    store = DocumentStore.from_shards([(Path(t), Path(o)) for t, o in store_paths])
    try:
        return PackedDataset(store, spec.seq_len, seed=spec.seed, doc_ids=doc_ids)
    except ValueError as err:  # too few tokens for one sample, or doc ids outside the store: say which phase
        raise ValueError(f"phase {spec.name!r} (seq_len={spec.seq_len}): {err}") from err


@contextlib.contextmanager
def _checkpoint_dir(out_url: str) -> Iterator[Path]:
    """The local directory ModelCheckpoint writes to: ``out_url/checkpoints`` itself, or a staging copy for URLs."""
    fs, path = storage.fs_for(out_url)
    if storage.is_local(fs):
        yield Path(path) / "checkpoints"
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-phase-") as tmp:
        yield Path(tmp) / "checkpoints"


def _fetch_resume_checkpoint(out_url: str, mirror: str | None, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from: a local phase's own, or a remote phase's fetched from its mirror."""
    if mirror is None or storage.is_local(storage.fs_for(out_url)[0]):
        return _local_resume_checkpoint(ckpt_dir)
    return _remote_resume_checkpoint(mirror, ckpt_dir)


def _local_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """``last.ckpt`` if it loads; else the newest loadable ``step=*.ckpt`` (relinked as ``last.ckpt``); else None."""
    for unfinished in ckpt_dir.glob(UNFINISHED):
        unfinished.unlink(missing_ok=True)
        log.info("removed %s, left by a checkpoint save that did not finish", unfinished)
    last = ckpt_dir / LAST
    if last.is_symlink() and not last.exists():  # a background save linked it, then the run died before writing
        target = os.readlink(last)
        named, kept = f"{last} (-> {target})", "removed the link"
        problem = f"{target} was never written: the run stopped while saving it"
        last.unlink()
    elif last.exists():
        problem = checkpoint_problem(last)
        if problem is None:
            return last
        named = f"{last} (-> {last.resolve().name})" if last.is_symlink() else str(last)
        kept = f"kept as {_set_aside(last)}"
    else:
        return None
    fallback = _newest_valid_step_checkpoint(ckpt_dir)
    if fallback is None:
        log.warning("checkpoint %s is unusable (%s); %s. No valid step=*.ckpt is left in %s, so the phase starts over "
                    "from its initial weights", named, problem, kept, ckpt_dir)
        return None
    last.symlink_to(fallback.name)  # relative, as ModelCheckpoint links it: a crash before the next save resumes here
    log.warning("checkpoint %s is unusable (%s); %s. Resuming from %s instead", named, problem, kept, fallback)
    return last


def _remote_resume_checkpoint(mirror: str, ckpt_dir: Path) -> Path | None:
    """The mirror's ``last.ckpt`` if it loads, else its newest loadable ``step=*.ckpt``, fetched into the (empty)
    staging ``ckpt_dir`` so that it looks as a local one would; unusable objects are set aside as ``*.corrupt``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last_url = storage.join(mirror, LAST)
    mirrored = _newest_first(url.rsplit("/", 1)[-1] for url in storage.list_files(mirror, "step=*.ckpt"))
    names = ([LAST] if storage.exists(last_url) else []) + mirrored
    unusable = []
    for name in names:
        url, local = storage.join(mirror, name), ckpt_dir / name
        storage.download_file(url, str(local))  # into the private staging directory: nobody reads it half-written
        problem = checkpoint_problem(local)
        if problem is None:
            break
        local.unlink()  # only our staging copy of the object set aside next
        unusable.append(f"{url} ({problem}; kept as {_set_aside_remote(url)})")
    else:
        if unusable:
            log.warning("unusable checkpoint(s): %s. No valid checkpoint is left in %s, so the phase starts over "
                        "from its initial weights", "; ".join(unusable), mirror)
        return None
    if name != LAST:
        (ckpt_dir / LAST).symlink_to(name)
        storage.copy(url, last_url)  # the mirror's last.ckpt is a loadable checkpoint again
    if unusable:
        log.warning("unusable checkpoint(s): %s. Resuming from %s instead", "; ".join(unusable), url)
    return ckpt_dir / LAST


def _set_aside_remote(url: str) -> str:
    kept, n = url + CORRUPT, 0
    while storage.exists(kept):  # an earlier bad copy stays too
        n += 1
        kept = f"{url}{CORRUPT}.{n}"
    storage.move(url, kept)
    return kept


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None when it can.

    Checks the zip directory (at the end of the file, so any truncation fails there), then loads with ``mmap=True``:
    that reads the pickled structure and the keys a resume needs but maps the tensor bytes instead of reading them, so
    the check costs the same for a 7B model as for the smoke one. A plain ``torch.load`` would catch no more: torch
    verifies no checksum of tensor data, so a flipped bit inside a tensor passes either way.
    """
    if not zipfile.is_zipfile(path):
        return "not a complete zip archive: truncated, or not written by torch.save"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # RuntimeError from the zip reader, UnpicklingError, EOFError, ... for a torn file
        return f"{type(err).__name__}: {str(err).split('. ')[0]}"  # torch's messages run on for several sentences
    missing = [key for key in RESUME_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    return f"no {', '.join(missing)} in it" if missing else None


def _newest_valid_step_checkpoint(ckpt_dir: Path) -> Path | None:
    for candidate in _step_checkpoints(ckpt_dir):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        log.warning("checkpoint %s is unusable too (%s); kept as %s", candidate, problem, _set_aside(candidate))
    return None


def _step_checkpoints(ckpt_dir: Path) -> list[Path]:
    return [ckpt_dir / name for name in _newest_first(p.name for p in ckpt_dir.glob("step=*.ckpt"))]


def _newest_first(names: Iterable[str]) -> list[str]:
    """The ``step=NNNNNNN.ckpt`` names among ``names``, newest step first (by number, not by name or mtime)."""
    found = [(int(m[1]), name) for name in names if (m := STEP_CKPT.fullmatch(name))]
    return [name for _, name in sorted(found, reverse=True)]


def _set_aside(path: Path) -> Path:
    """Rename the bytes behind ``path`` (a link's target) to ``*.corrupt`` for inspection; drop a link to them."""
    target = path.resolve()
    kept = target.with_name(target.name + CORRUPT)
    n = 0
    while kept.exists():  # an earlier bad copy stays too
        n += 1
        kept = target.with_name(f"{target.name}{CORRUPT}.{n}")
    target.rename(kept)
    if path.is_symlink():
        path.unlink()  # it pointed at the bytes just renamed
    return kept


def _init_from(module: PretrainModule, init_weights: str, spec: PhaseSpec) -> None:
    """Load the starting weights from a native directory or ``.ckpt``, local or remote."""
    fs, path = storage.fs_for(init_weights)
    if storage.is_local(fs):
        source = load_model(path)
    else:
        with tempfile.TemporaryDirectory(prefix="lmforge-init-") as tmp:
            local = Path(tmp) / Path(path).name
            if fs.isdir(path):
                storage.download_dir(init_weights, str(local))
            else:
                storage.download_file(init_weights, str(local))
            source = load_model(local)
    from_pretrained_weights(module, source.state_dict(), source=init_weights)
    log.info("phase %s starts from %s (rope_theta %s)", spec.name, init_weights, module.model.config.rope_theta)


class MirroredCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint atomically (a crash mid-save never leaves a torn file) and, given ``mirror_url``, mirrors
    it there: uploads it under its own name once written (a ``step=*.ckpt`` also as the mirror's ``last.ckpt``, since
    ModelCheckpoint links ``last.ckpt`` to each one it saves) and removes the copy of a checkpoint it removes."""

    def __init__(self, mirror_url: str | None = None) -> None:
        super().__init__()
        self.mirror_url = mirror_url

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        log.debug("writing checkpoint %s", path)
        with storage.atomic_write(str(path)) as f:
            torch.save(checkpoint, f)
        if self.mirror_url is None:
            return
        url = storage.join(self.mirror_url, path.name)
        storage.upload_file(str(path), url)
        if STEP_CKPT.fullmatch(path.name):
            storage.copy(url, storage.join(self.mirror_url, LAST))  # within the store: no second upload
        log.info("checkpoint %s mirrored to %s", path, url)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if self.mirror_url is not None:
            storage.remove(storage.join(self.mirror_url, Path(path).name), missing_ok=True)


class OrderedAsyncCheckpointIO(AsyncCheckpointIO):
    """Lightning's AsyncCheckpointIO, with removals queued behind the saves.

    What it keeps (checked in Lightning 2.6): one worker thread, so saves run in order; the checkpoint's tensors are
    cloned on the calling thread before the hand-off (containers rebuilt around them), so later optimizer steps never
    change a save in flight; a save's error is raised at the next save or at ``teardown``, which waits for the queue.
    What it adds: Lightning removes on the calling thread, so when saves lag two intervals behind, ModelCheckpoint's
    removal of the oldest checkpoint could run before that checkpoint's own save, find nothing, and leave it behind.
    """

    def remove_checkpoint(self, path: Any) -> None:
        self._ensure_setup()
        inner, executor = self.checkpoint_io, self._executor
        assert inner is not None and executor is not None

        def remove() -> None:
            try:
                inner.remove_checkpoint(path)
            except BaseException as err:  # kept for the next save or teardown to raise, as a failed save is
                self._error = err

        executor.submit(remove)
        if self._error:
            raise self._error


class PhaseCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that follows its checkpoints into another directory. A remote phase resumes in a fresh staging
    directory each time; the stock callback would then forget which step checkpoints it keeps, and so never remove
    the mirrored ones it had saved before the resume."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved is not None and self.dirpath is not None and saved != self.dirpath:
            state_dict = _moved_to(state_dict, str(self.dirpath))
        super().load_state_dict(state_dict)


def _moved_to(state: dict[str, Any], dirpath: str) -> dict[str, Any]:
    """ModelCheckpoint's state with its checkpoint paths (all in its own directory) re-rooted at ``dirpath``."""
    def move(path: str) -> str:
        return os.path.join(dirpath, os.path.basename(path)) if path else path

    moved = {key: move(state[key]) for key in ("best_model_path", "kth_best_model_path", "last_model_path")
             if key in state}
    best_k = {move(path): score for path, score in state.get("best_k_models", {}).items()}
    return {**state, **moved, "best_k_models": best_k, "dirpath": dirpath}


def _trainer(
    spec: PhaseSpec, config: ModelConfig, grad_clip: float, ckpt_dir: Path, mirror: str | None,
    mlflow: tuple[str, str] | None, callbacks: list[Callback] | None,
) -> L.Trainer:
    runtime = detect_runtime(spec.precision, devices=spec.devices, model_params=config.num_params(),
                             wrap_modules=[Block])
    checkpoint = PhaseCheckpoint(
        # The two newest step checkpoints ("step" is always among ModelCheckpoint's monitor candidates): one to fall
        # back to when the newest turns out unreadable (see _local_resume_checkpoint).
        dirpath=ckpt_dir, filename="step={step:07d}", monitor="step", mode="max", save_top_k=2, save_last="link",
        every_n_train_steps=spec.checkpoint_every, enable_version_counter=False, auto_insert_metric_name=False,
    )
    io: CheckpointIO = MirroredCheckpointIO(mirror)
    return L.Trainer(
        **runtime.trainer_kwargs(),
        max_steps=spec.max_steps,
        accumulate_grad_batches=spec.accumulate,
        gradient_clip_val=grad_clip,  # 1.0, from the released configs (PretrainModule clips itself under bf16)
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,  # PackedDataModule slices global batches per rank itself
        logger=_mlflow_logger(mlflow),
        callbacks=[checkpoint, *_progress_bar(), *(callbacks or [])],
        plugins=[OrderedAsyncCheckpointIO(io) if spec.async_checkpoints else io],
        default_root_dir=str(ckpt_dir.parent),
        enable_progress_bar=True,
    )


def _mlflow_logger(mlflow: tuple[str, str] | None) -> Any:
    if mlflow is None:
        return False  # no CSV/TensorBoard files in the working directory
    from lightning.pytorch.loggers import MLFlowLogger

    tracking_uri, run_id = mlflow
    return MLFlowLogger(tracking_uri=tracking_uri, run_id=run_id)


def _progress_bar() -> list[Callback]:
    try:
        from lightning.pytorch.callbacks import RichProgressBar

        return [RichProgressBar()]
    except ModuleNotFoundError:  # RichProgressBar raises this without rich; Lightning's tqdm bar is the default
        return []


def _final_checkpoint(trainer: L.Trainer, spec: PhaseSpec, ckpt_dir: Path) -> Path:
    """``last.ckpt`` at the step training ended (ModelCheckpoint only wrote it at multiples of checkpoint_every), once
    every save is written and mirrored: a background save that failed raises here."""
    last = ckpt_dir / LAST
    trainer.strategy.checkpoint_io.teardown()  # the async IO waits for its queue here (a no-op for the plain one)
    missing = bool(trainer.global_step % spec.checkpoint_every) or not last.exists()
    # Rank 0's answer: only it writes checkpoints, and save_checkpoint holds a barrier that every rank must reach.
    if trainer.strategy.broadcast(missing):
        trainer.save_checkpoint(last)  # through MirroredCheckpointIO: replaces a symlink, mirrors for remote phases
        trainer.strategy.checkpoint_io.teardown()
    return last


def _finish(spec: PhaseSpec, module: PretrainModule, out_url: str, last: Path, seconds: float) -> PhaseResult:
    """Write final/ (native weights, then the result marker last, so a crash in between only re-exports)."""
    final_url = storage.join(out_url, "final")
    losses = list(module.loss_history)
    result = PhaseResult(
        name=spec.name, final_loss=losses[-1], first_loss=losses[0], losses=losses, steps=module.global_step,
        tokens=module.tokens_seen, seconds=seconds, native_url=final_url,
        checkpoint_url=storage.join(out_url, "checkpoints", LAST), resumed_from_step=module.start_step,
    )
    if not module.trainer.is_global_zero:
        return result
    model = load_model(last)  # from the checkpoint rather than the module: full weights whatever the sharding
    result = result.model_copy(update={"copy_probe": _copy_probe(model)})
    with tempfile.TemporaryDirectory(prefix="lmforge-final-") as tmp:
        native = save_native(model, Path(tmp) / "final")
        storage.upload_dir(str(native), final_url)
    storage.write_json(storage.join(final_url, RESULT_FILE), result.model_dump(exclude={"resumed_from_final"}))
    return result


def _copy_probe(model: torch.nn.Module) -> dict[str, float]:
    """In-context copying of the final weights (`model.probes.copy_probe`); on a GPU when there is one (a paper-shape
    model's forward pass is slow on CPU), the model back on CPU after."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return copy_probe(model.to(device), span=min(64, model.config.max_seq_len // 2)).as_dict()
    finally:
        model.to("cpu")


def load_for_inference(checkpoint_url: str, tokenizer_url: str) -> tuple[Any, Any]:
    """A checkpoint (any `load_model` form; a local path or a remote directory URL) in eval mode, and its tokenizer."""
    from model.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "ckpt"
        storage.download_dir(checkpoint_url, str(local))
        model = load_model(local).eval()
        tokenizer_file = Path(tmp) / "tokenizer.json"
        tokenizer_file.write_bytes(storage.read_bytes(tokenizer_url))
        return model, Tokenizer.from_file(tokenizer_file)

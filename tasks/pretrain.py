"""One pretraining phase as a plain function: resumable, idempotent, local paths or ``s3://`` alike.

Layout under a phase's ``out_url``::

    phase_spec.json           the spec and model config this directory belongs to (a different spec is refused)
    checkpoints/last.ckpt     the Lightning checkpoint to resume from (model, optimizer, scheduler, step, counters)
    checkpoints/step=NNNNNNN.ckpt  the two newest periodic checkpoints (last.ckpt links to the newer one)
    final/                    lmforge native checkpoint (model.checkpoint.save_native) + phase_result.json

A call with ``checkpoints/last.ckpt`` present resumes from it, data position included; a call with
``final/phase_result.json`` present returns that result without training. A ``last.ckpt`` that does not load (truncated,
torn) is renamed to ``*.corrupt`` and the newest loadable ``step=*.ckpt`` is resumed from instead, with a warning; with
none left the phase starts over. For an ``s3://`` URL the checkpoints are written to a local staging directory and
each one is mirrored to ``checkpoints/last.ckpt`` as it is saved (only that one: a remote phase has nothing to fall
back to).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
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

log = get_logger(__name__)

SPEC_FILE = "phase_spec.json"
RESULT_FILE = "phase_result.json"
LAST = "last.ckpt"
STEP_CKPT = re.compile(r"step=(\d+)\.ckpt")  # ModelCheckpoint's names, see _trainer
CORRUPT = ".corrupt"  # suffix of a checkpoint set aside because it does not load
RESUME_KEYS = ("state_dict", "optimizer_states", "global_step")


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
) -> PhaseResult:
    """Train one phase into ``out_url`` (resuming, or returning the stored result, as the layout above says).

    ``dataset``: samples to train on instead of packing ``store_paths`` (SFT passes its `PackedChatDataset`).

    The phase's model is ``model_config`` with ``rope_theta = spec.rope_theta`` and ``max_seq_len`` raised to
    ``spec.seq_len`` if shorter. ``init_weights``: a previous phase's native directory or ``.ckpt`` (local path or
    URL) to start from; ignored when resuming. ``mlflow``: ``(tracking_uri, run_id)`` of an existing run that receives
    params and per-step metrics (Lightning's MLFlowLogger marks it FINISHED, or FAILED, at the end).
    """
    config = phase_model_config(spec, model_config)
    identity = {"spec": spec.model_dump(exclude={"devices"}), "model_config": config.to_dict()}
    check_phase_dir(out_url, identity, spec.name)
    stored = completed_result(out_url)
    if stored is not None:
        log.info("phase %s already finished at %s; returning the stored result", spec.name, out_url)
        return stored
    dataset = dataset if dataset is not None else build_dataset(spec, store_paths, doc_ids)
    if init_weights is not None and not storage.exists(init_weights):
        raise ValueError(f"phase {spec.name!r}: init_weights {init_weights!r} does not exist; expected a previous "
                         "phase's final/ directory or a Lightning .ckpt")
    storage.write_json(storage.join(out_url, SPEC_FILE), identity)
    with _checkpoint_dir(out_url) as ckpt_dir:
        return _train(spec, config, dataset, ckpt_dir, out_url, init_weights, mlflow, callbacks)


def _train(
    spec: PhaseSpec, config: ModelConfig, dataset: Dataset[Any], ckpt_dir: Path, out_url: str,
    init_weights: str | None, mlflow: tuple[str, str] | None, callbacks: list[Callback] | None,
) -> PhaseResult:
    resume = _fetch_resume_checkpoint(out_url, ckpt_dir)
    L.seed_everything(spec.seed, workers=True)
    optim = OptimConfig(lr=spec.lr, warmup_steps=spec.warmup_steps, total_steps=spec.max_steps)
    module = PretrainModule(config, optim, packing_masks=spec.packing_masks)
    if init_weights is not None and resume is None:
        _init_from(module, init_weights, spec)
    trainer = _trainer(spec, config, optim.grad_clip, ckpt_dir, out_url, mlflow, callbacks)
    data = PackedDataModule(dataset, spec.batch_size // spec.devices, spec.accumulate, seed=spec.seed)  # per rank
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Both are how a resume here is meant to look: same directory again, or a fresh staging copy of it.
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        warnings.filterwarnings("ignore", message="The dirpath has changed from")
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


def _fetch_resume_checkpoint(out_url: str, ckpt_dir: Path) -> Path | None:
    if storage.is_local(storage.fs_for(out_url)[0]):
        return _local_resume_checkpoint(ckpt_dir)
    remote = storage.join(out_url, "checkpoints", LAST)
    if not storage.exists(remote):
        return None
    fs, path = storage.fs_for(remote)
    local = ckpt_dir / LAST
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fs.get_file(path, str(local))  # into the private staging directory: nobody reads it half-written
    problem = checkpoint_problem(local)
    if problem is None:
        return local
    fs.mv(path, path + CORRUPT)
    local.unlink()  # only our staging copy of the file just set aside
    log.warning("checkpoint %s is unusable (%s); kept as %s%s. A remote phase mirrors no older checkpoint, so it "
                "starts over from its initial weights", remote, problem, remote, CORRUPT)
    return None


def _local_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """``last.ckpt`` if it loads; else the newest loadable ``step=*.ckpt`` (relinked as ``last.ckpt``); else None."""
    last = ckpt_dir / LAST
    if last.is_symlink() and not last.exists():
        raise ValueError(f"{last} links to a missing checkpoint; restore it or remove the link to start over")
    if not last.exists():
        return None
    problem = checkpoint_problem(last)
    if problem is None:
        return last
    named = f"{last} (-> {last.resolve().name})" if last.is_symlink() else str(last)
    kept = _set_aside(last)
    fallback = _newest_valid_step_checkpoint(ckpt_dir)
    if fallback is None:
        log.warning("checkpoint %s is unusable (%s); kept as %s. No valid step=*.ckpt is left in %s, so the phase "
                    "starts over from its initial weights", named, problem, kept, ckpt_dir)
        return None
    last.symlink_to(fallback.name)  # relative, as ModelCheckpoint links it: a crash before the next save resumes here
    log.warning("checkpoint %s is unusable (%s); kept as %s. Resuming from %s instead", named, problem, kept, fallback)
    return last


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
    """The ``step=NNNNNNN.ckpt`` files, newest step first (by number, not by name or modification time)."""
    found = [(int(m[1]), p) for p in ckpt_dir.glob("step=*.ckpt") if (m := STEP_CKPT.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


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
                fs.get_file(path, str(local))
            source = load_model(local)
    from_pretrained_weights(module, source.state_dict(), source=init_weights)
    log.info("phase %s starts from %s (rope_theta %s)", spec.name, init_weights, module.model.config.rope_theta)


class MirroredCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint atomically (a crash mid-save never leaves a torn ``last.ckpt``) and, for remote
    phases, copies it to ``mirror_url`` so a run on another machine can resume."""

    def __init__(self, mirror_url: str | None = None) -> None:
        super().__init__()
        self.mirror_url = mirror_url

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with storage.atomic_write(str(path)) as f:
            torch.save(checkpoint, f)
        if self.mirror_url is not None:
            with open(path, "rb") as src, storage.atomic_write(self.mirror_url) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            log.info("checkpoint %s mirrored to %s", path, self.mirror_url)


def _trainer(
    spec: PhaseSpec, config: ModelConfig, grad_clip: float, ckpt_dir: Path, out_url: str,
    mlflow: tuple[str, str] | None, callbacks: list[Callback] | None,
) -> L.Trainer:
    runtime = detect_runtime(spec.precision, devices=spec.devices, model_params=config.num_params(),
                             wrap_modules=[Block])
    remote = not storage.is_local(storage.fs_for(out_url)[0])
    checkpoint = ModelCheckpoint(
        # The two newest step checkpoints ("step" is always among ModelCheckpoint's monitor candidates): one to fall
        # back to when the newest turns out unreadable (see _local_resume_checkpoint).
        dirpath=ckpt_dir, filename="step={step:07d}", monitor="step", mode="max", save_top_k=2, save_last="link",
        every_n_train_steps=spec.checkpoint_every, enable_version_counter=False, auto_insert_metric_name=False,
    )
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
        plugins=[MirroredCheckpointIO(storage.join(out_url, "checkpoints", LAST) if remote else None)],
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
    """``last.ckpt`` at the step training ended; ModelCheckpoint only wrote it at multiples of checkpoint_every."""
    last = ckpt_dir / LAST
    if trainer.global_step % spec.checkpoint_every or not last.exists():
        trainer.save_checkpoint(last)  # through MirroredCheckpointIO: replaces a symlink, mirrors for remote phases
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
    with tempfile.TemporaryDirectory(prefix="lmforge-final-") as tmp:
        # From the checkpoint rather than the module: that holds full weights whatever the strategy sharded.
        native = save_native(load_model(last), Path(tmp) / "final")
        storage.upload_dir(str(native), final_url)
    storage.write_json(storage.join(final_url, RESULT_FILE), result.model_dump(exclude={"resumed_from_final"}))
    return result


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

"""Pretraining as Lightning code: next-token loss on packed batches, AdamW with warmup and cosine decay.

What the InternLM2 report fixes and we follow: AdamW β (0.9, 0.95), ε 1e-8, weight decay 0.1, cosine decay to 10 % of
the peak LR (3e-4 for the paper's shapes), packed samples whose attention and positions restart at each document.
Where we depart or fill a gap:

- Warmup: the report states none. We warm up linearly over ``warmup_steps`` optimizer steps (step 0 already trains
  at ``lr / warmup_steps``), then follow a half cosine from the peak to ``min_lr_ratio`` × peak at ``total_steps``,
  and hold that floor if training runs on.
- Weight decay: the report does not say which tensors decay. Every matrix decays (embedding and output head
  included); norm weights and biases do not (the usual GPT/Llama split). The split goes by owning module, not by
  ``ndim``, because FSDP flattens sharded matrices to 1-D before the optimizer sees them.
- Gradient clipping at 1.0 comes from the released configs (the Trainer's ``gradient_clip_val``); ``train/grad_norm``
  is the norm before clipping.
- Gradient accumulation: Lightning divides each micro-batch's mean token loss by the number of micro-batches, so the
  step's gradient (and the logged ``train/loss``) is a mean of per-micro-batch means; InternEvo averages over every
  token of the step instead. They differ only when micro-batches hold different numbers of valid targets.
- Batch size: the report's 4M-token batches are ``batch_size × accumulate × seq_len × world_size`` here
  (``batch_size`` per data-parallel rank), set per phase.
- Data position on resume: the loader restarts at sample ``global_step × global batch`` (see :class:`PackedDataModule`);
  checkpoints are written at optimizer-step boundaries, so no sample is skipped or repeated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Sampler

from model.checkpoint import check_state_dict
from model.config import ModelConfig
from model.data import ResumableSampler
from model.model import InternLM2, RMSNorm

STATE_KEY = "lmforge_pretrain"  # our counters inside a Lightning checkpoint


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW and its schedule; defaults are the report's (peak LR 3e-4, cosine to 10 %)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))  # a list after a checkpoint or JSON round trip
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError(f"OptimConfig needs lr > 0, eps > 0, weight_decay >= 0, grad_clip > 0; got {self}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"OptimConfig needs total_steps >= 1 and 0 <= warmup_steps <= total_steps; "
                f"got warmup_steps={self.warmup_steps}, total_steps={self.total_steps}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0 or len(self.betas) != 2:
            raise ValueError(f"OptimConfig needs 0 <= min_lr_ratio <= 1 and two betas; got {self}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OptimConfig:
        return cls(**data)


def lr_factor(step: int, optim: OptimConfig) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then half cosine to ``min_lr_ratio``."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    span = max(optim.total_steps - optim.warmup_steps, 1)
    progress = min((step - optim.warmup_steps) / span, 1.0)
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _no_decay(module: nn.Module, name: str) -> bool:
    return isinstance(module, (RMSNorm, nn.LayerNorm)) or name == "bias"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: ``decay`` (matrices) and ``no_decay`` (norm weights, biases); empty groups are left out."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if _no_decay(module, name) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def adamw_schedule(model: torch.nn.Module, o: OptimConfig, device: torch.device) -> dict[str, Any]:
    """Lightning's optimizer dict: AdamW over `param_groups` (fused on CPU and CUDA) and the warmup-cosine LambdaLR,
    stepped per optimizer step (its checkpoint state is the step count: the partial's __dict__ is empty)."""
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                  fused=device.type in ("cpu", "cuda"))
    scheduler = LambdaLR(optimizer, functools.partial(lr_factor, optim=o))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


class PretrainModule(L.LightningModule):
    """Next-token pretraining of :class:`InternLM2` on batches of ``tokens``/``targets``/``segment_ids`` (B, T).

    ``packing_masks``: attention and positions restart at each document of a packed sample (InternEvo's default);
    off, a packed sample is one causal sequence (targets still skip document boundaries).
    """

    def __init__(
        self,
        model_config: ModelConfig | Mapping[str, Any],
        optim: OptimConfig | Mapping[str, Any],
        packing_masks: bool = True,
    ) -> None:
        super().__init__()
        config = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(dict(model_config))
        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig.from_dict(optim)
        # Plain dicts, so model.checkpoint.load_model reads the config from any .ckpt without importing this module.
        self.save_hyperparameters(
            {"model_config": config.to_dict(), "optim": self.optim.to_dict(), "packing_masks": packing_masks}
        )
        self.packing_masks = packing_masks
        self.model = InternLM2(config)
        self.tokens_seen = 0  # over the whole phase, restored from checkpoints
        self.loss_history: list[float] = []  # train/loss of every optimizer step so far, restored from checkpoints
        self._step_loss: Tensor | float = 0.0
        self._micro = 0
        self.start_step = 0  # the step this fit() began at: > 0 when it resumed from a checkpoint
        self._clock: tuple[float, int] = (time.perf_counter(), 0)  # (time, tokens_seen) at the last logged step

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        segment_ids = batch["segment_ids"] if self.packing_masks else None
        loss = self.model.loss(batch["tokens"], batch["targets"], segment_ids=segment_ids)
        self.tokens_seen += batch["tokens"].numel() * self.trainer.world_size
        self._step_loss = self._step_loss + loss.detach()  # summed over this optimizer step's micro-batches
        self._micro += 1
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Called once per optimizer step, after the last micro-batch's backward and before clipping: the one place
        # that knows a step is complete whatever the accumulation (or a short last window) did.
        self._log_step(torch.as_tensor(self._step_loss) / max(self._micro, 1))
        self._step_loss, self._micro = 0.0, 0
        self.log("train/grad_norm", self._grad_norm())

    def _log_step(self, loss: Tensor) -> None:
        loss = self.trainer.strategy.reduce(loss, reduce_op="mean")  # the mean over data-parallel ranks
        now = time.perf_counter()
        then, tokens_then = self._clock
        self._clock = (now, self.tokens_seen)
        self.loss_history.append(float(loss))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])  # the LR of the step about to be taken
        self.log("train/tokens", float(self.tokens_seen))
        self.log("train/tokens_per_s", (self.tokens_seen - tokens_then) / max(now - then, 1e-9), prog_bar=True)

    def on_train_start(self) -> None:
        self._clock = (time.perf_counter(), self.tokens_seen)

    def _grad_norm(self) -> Tensor:
        """Total L2 norm of the gradients before clipping, over all shards when parameters are sharded."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            norm = self.trainer.strategy.reduce(norm.float().pow(2), reduce_op="sum").sqrt()
        return norm

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            # Lightning 2.6 refuses to clip for any fused optimizer under AMP (issue #21435): with a GradScaler the
            # fused step would unscale after clipping. bf16 autocast has no scaler, so the gradients are true values.
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_schedule(self.model, self.optim, self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STATE_KEY] = {"tokens_seen": self.tokens_seen, "loss_history": list(self.loss_history)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.start_step = int(checkpoint.get("global_step", 0))
        state = checkpoint.get(STATE_KEY, {})
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.loss_history = [float(x) for x in state.get("loss_history", [])]


def from_pretrained_weights(module: PretrainModule, state_dict: Mapping[str, Tensor], source: str = "weights") -> None:
    """Start ``module`` from another run's weights (e.g. the previous phase's), keeping ``module``'s own config.

    A phase may change ``rope_theta`` or ``max_seq_len``, which own no tensors; anything that changes a shape raises
    :class:`model.checkpoint.CheckpointError` naming the tensor.
    """
    check_state_dict(dict(state_dict), module.model.config, source)
    with torch.no_grad():
        module.model.load_state_dict(state_dict, strict=True)


class RankBatches(Sampler[list[int]]):
    """Batch indices for one data-parallel rank: global batches of ``batch_size × world_size`` cut from one stream.

    Rank ``r`` takes the ``r``-th slice of every global batch, so the ranks together see exactly what a single
    process with the global batch size would, and a restart at global sample ``k`` (a multiple of the global batch)
    lines every rank up again. A short final global batch is dropped.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, *, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"RankBatches needs batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.sampler, self.batch_size, self.rank, self.world_size = sampler, batch_size, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        stream = iter(self.sampler)
        size = self.batch_size * self.world_size
        while len(chunk := list(islice(stream, size))) == size:
            yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


class PackedDataModule(L.LightningDataModule):
    """Serves a packed dataset from the sample where the (restored) global step left off.

    Lightning 2.6 calls ``train_dataloader()`` inside ``fit_loop.run()``, after ``trainer.fit(ckpt_path=...)`` has
    restored the loops, so ``trainer.global_step`` is the checkpoint's step here and the loader starts at sample
    ``global_step × batch_size × accumulate × world_size``.
    """

    def __init__(self, dataset: Dataset[Any], batch_size: int, accumulate: int, *, seed: int, num_workers: int = 0):
        super().__init__()
        if batch_size < 1 or accumulate < 1:
            raise ValueError(f"batch_size and accumulate must be >= 1, got {batch_size} and {accumulate}")
        self.dataset, self.batch_size, self.accumulate = dataset, batch_size, accumulate
        self.seed, self.num_workers = seed, num_workers
        self.start_sample = 0  # where the last train_dataloader() started, for logs and tests

    def train_dataloader(self) -> DataLoader[Any]:
        trainer = self.trainer
        step, rank, world = (trainer.global_step, trainer.global_rank, trainer.world_size) if trainer else (0, 0, 1)
        self.start_sample = step * self.batch_size * self.accumulate * world
        sampler = ResumableSampler(len(self.dataset), seed=self.seed, start=self.start_sample)  # type: ignore[arg-type]
        batches = RankBatches(sampler, self.batch_size, rank=rank, world_size=world)
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers)

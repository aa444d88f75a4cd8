"""Where training runs: accelerator, device count, distribution strategy and numeric precision.

The same LightningModules run on a laptop CPU and on a GPU cluster; only this record changes. bf16 autocast is chosen
wherever the hardware computes bf16 natively (CUDA with bf16 support; x86 CPUs with AVX512-BF16 or AMX, where it
roughly doubles throughput), fp32 elsewhere, because emulated bf16 is slower than fp32 and no more useful.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from infra.settings import get_logger

log = get_logger(__name__)

Precision = Literal["bf16-mixed", "32-true"]
PRECISIONS: tuple[str, ...] = ("bf16-mixed", "32-true")
# Above this many parameters a replica (weights + grads + AdamW state ≈ 16 bytes/param) crowds even an 80 GB GPU, so
# several GPUs shard with FSDP instead of replicating with DDP; the paper's 1.8B/7B/20B shapes all land here.
FSDP_MIN_PARAMS = 1_000_000_000


@dataclass(frozen=True)
class Runtime:
    """Trainer arguments for one machine: ``Trainer(**runtime.trainer_kwargs())``."""

    accelerator: str
    devices: int
    strategy: Any  # "auto", "ddp" or a configured lightning Strategy
    precision: Precision

    def trainer_kwargs(self) -> dict[str, Any]:
        return {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "strategy": self.strategy,
            "precision": self.precision,
        }


def cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def cpu_bf16() -> bool:
    """Native bf16 matmuls on this CPU (oneDNN's check: AVX512-BF16 or AMX on x86, BF16 extensions on Arm)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_precision(requested: str, accelerator: str) -> Precision:
    """``requested`` if the accelerator computes it natively, else fp32 (with a log line saying why)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not supported; expected one of {', '.join(PRECISIONS)}")
    if requested == "32-true":
        return "32-true"
    native = cuda_bf16() if accelerator == "cuda" else cpu_bf16() if accelerator == "cpu" else False
    if not native:
        log.info("bf16 is not native on this %s; training in fp32 instead", accelerator)
        return "32-true"
    return "bf16-mixed"


def detect_runtime(
    precision: str = "bf16-mixed",
    *,
    devices: int | None = 1,
    model_params: int = 0,
    wrap_modules: Iterable[type[nn.Module]] = (),
) -> Runtime:
    """The runtime for this machine.

    ``devices``: how many GPUs (None: all visible) or CPU processes (None: one) to use. ``model_params``
    decides between DDP and FSDP on several GPUs; FSDP shards (and checkpoints activations of) each ``wrap_modules``
    instance, e.g. the decoder block.
    """
    if devices is not None and devices < 1:
        raise ValueError(f"devices must be None (all GPUs) or >= 1, got {devices}")
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    count = (devices or 1) if accelerator == "cpu" else _gpu_count(devices)
    return Runtime(accelerator, count, _strategy(count, model_params, tuple(wrap_modules)),
                   resolve_precision(precision, accelerator))


def _gpu_count(devices: int | None) -> int:
    visible = torch.cuda.device_count()
    if devices is None:
        return visible
    if devices > visible:
        raise ValueError(f"devices={devices} requested, but {visible} GPU(s) are visible")
    return devices


def _strategy(devices: int, model_params: int, wrap: tuple[type[nn.Module], ...]) -> Any:
    if devices == 1:
        return "auto"
    if model_params < FSDP_MIN_PARAMS:
        return "ddp"
    from lightning.pytorch.strategies import FSDPStrategy

    policy = set(wrap) or None
    return FSDPStrategy(auto_wrap_policy=policy, activation_checkpointing_policy=policy, state_dict_type="full")

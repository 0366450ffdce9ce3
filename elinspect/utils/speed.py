"""Speed knobs that are not Trainer arguments, and loader settings sized to the machine.

``conf/trainer/*.yaml`` hold them under ``speed`` (see ``conf/trainer/default.yaml``);
:func:`~elinspect.build.build_trainer` takes that node out of the Trainer's arguments,
resolves ``precision: auto`` (:func:`resolve_precision`), sets the float32 matmul precision and
adds a :class:`SpeedCallback` that puts the model in channels-last memory format and compiles
its inference network with ``torch.compile``. The datamodules' ``num_workers: auto`` and
``pin_memory: auto`` are resolved by :func:`auto_num_workers` and :func:`auto_pin_memory`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch import nn
from torchmetrics import Metric, MetricCollection

from elinspect.utils.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"
# at most this many loader workers per process by default: enough to feed one GPU with the
# decoded, resized images of these datasets; more mostly costs memory (each worker holds a copy)
MAX_AUTO_WORKERS = 4
GPU_ACCELERATORS = ("gpu", "cuda", AUTO)
# LightningModule children that are never the inference network
NOT_INFERENCE = frozenset({"loss"})


# ----------------------------------------------------------------------------- precision
def on_gpu(accelerator: str | None) -> bool:
    """Whether the trainer's ``accelerator`` setting runs on a CUDA GPU here."""
    return str(accelerator or AUTO) in GPU_ACCELERATORS and torch.cuda.is_available()


def resolve_precision(precision: Any, accelerator: str | None) -> Any:
    """``auto`` → ``bf16-mixed`` on a CUDA GPU with bf16 (Ampere and newer), ``16-mixed`` on an
    older one, ``32-true`` on CPU (or when no GPU is visible); any other value is returned as is."""
    if precision != AUTO:
        return precision
    if not on_gpu(accelerator):
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def set_float32_matmul_precision(value: str | None) -> None:
    """``torch.set_float32_matmul_precision`` (``highest`` | ``high`` | ``medium``); None: unchanged."""
    if value is None:
        return
    if value not in ("highest", "high", "medium"):
        raise ValueError(
            f"trainer.speed.float32_matmul_precision must be highest, high or medium, got {value!r}"
        )
    torch.set_float32_matmul_precision(value)


# ------------------------------------------------------------------------------- loaders
def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and SLURM restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def auto_num_workers(value: int | str, processes_per_node: int = 1) -> int:
    """``auto`` → min(MAX_AUTO_WORKERS, CPUs per process − 1), at least 0 (one CPU per process
    is left to the training loop itself); an integer is returned as is."""
    if value == AUTO:
        per_process = usable_cpus() // max(1, processes_per_node)
        return max(0, min(MAX_AUTO_WORKERS, per_process - 1))
    workers = int(value)
    if workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 or auto, got {value}")
    return workers


def auto_pin_memory(value: bool | str, trainer: L.Trainer | None = None) -> bool:
    """``auto`` → True when batches go to a CUDA device (the trainer's accelerator, or, without a
    trainer, when CUDA is available): page-locked host memory makes the copy asynchronous."""
    if value == AUTO:
        if trainer is not None:
            return isinstance(trainer.accelerator, CUDAAccelerator)
        return torch.cuda.is_available()
    return bool(value)


# ------------------------------------------------------------------------ model knobs
def _holds_metrics(module: nn.Module) -> bool:
    return any(isinstance(m, Metric | MetricCollection) for m in module.modules())


def inference_modules(pl_module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The torch networks a LightningModule wraps: its direct children that hold parameters or
    buffers and are neither metrics nor the loss (``net`` of the classifier, ``model`` of the
    detectors, ``padim`` of PaDiM, ``padim`` and ``net`` of SeMaCNN, ``net`` of GAN-AE and
    the autoencoder)."""
    for name, child in pl_module.named_children():
        if name in NOT_INFERENCE or _holds_metrics(child):
            continue
        if next(child.parameters(), None) is None and next(child.buffers(), None) is None:
            continue
        yield name, child


class SpeedCallback(L.Callback):
    """Applies ``trainer.speed``'s model knobs at ``setup``: before Lightning moves the model to
    its device and wraps it (DDP), for fit, validate, test and predict alike.

    Args:
        channels_last: convert every 4-D parameter and buffer to channels-last memory format
            (the model's convolutions then run in NHWC; inputs need no change: a convolution
            with channels-last weights returns channels-last output).
        compile: compile each inference network (:func:`inference_modules`) in place with
            ``nn.Module.compile``, so state-dict keys (and checkpoints) stay the same.
        compile_mode, compile_backend: ``torch.compile``'s ``mode`` and ``backend``.
    """

    def __init__(
        self,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
    ) -> None:
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend
        self.compiled: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
            log.info("model in channels-last memory format")
        if self.compile:
            for name, module in inference_modules(pl_module):
                if name in self.compiled:
                    continue
                module.compile(mode=self.compile_mode, backend=self.compile_backend)
                self.compiled.append(name)
            log.info(
                "torch.compile (%s, mode %s): %s", self.compile_backend, self.compile_mode, self.compiled
            )


def speed_callback(speed: dict[str, Any] | None) -> SpeedCallback | None:
    """A :class:`SpeedCallback` for the ``trainer.speed`` node, or None when no knob is on."""
    speed = dict(speed or {})
    set_float32_matmul_precision(speed.pop("float32_matmul_precision", None))
    unknown = set(speed) - {"channels_last", "compile", "compile_mode", "compile_backend"}
    if unknown:
        raise ValueError(f"unknown trainer.speed keys {sorted(unknown)}")
    if not (speed.get("channels_last") or speed.get("compile")):
        return None
    return SpeedCallback(**speed)

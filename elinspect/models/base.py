"""What every elinspect LightningModule shares: its task, the monitored metric, the
optimiser/scheduler wiring, and the run's config stored in each checkpoint."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, MutableMapping
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from elinspect.utils.errors import ConfigError

CHECKPOINT_KEY = "elinspect"
SCHEDULER_INTERVALS = ("epoch", "step")


def rename_legacy_keys(
    module: ElinspectModule, state_dict: MutableMapping[str, Any], prefix: str, *args: Any
) -> None:
    """A ``load_state_dict`` pre-hook for checkpoints written before a part moved: their keys
    take the new names (``module.legacy_keys``: old name or prefix → new), and the buffers they
    predate (``module.added_keys``) keep the module's initial values, so old checkpoints still
    load and resume."""
    for old, new in module.legacy_keys.items():
        for key in [k for k in state_dict if k == prefix + old or k.startswith(prefix + old + ".")]:
            renamed = prefix + new + key[len(prefix + old) :]
            if renamed not in state_dict:
                state_dict[renamed] = state_dict.pop(key)
    if module.added_keys and not any(prefix + key in state_dict for key in module.added_keys):
        current = module.state_dict()
        for key in module.added_keys:
            state_dict[prefix + key] = current[key]


def twice_when_set(value: torch.Tensor) -> float | None:
    """``2 × value`` of a scalar buffer that is set (finite and positive), else ``None``."""
    number = float(value)
    return 2 * number if math.isfinite(number) and number > 0 else None


class ElinspectModule(L.LightningModule):
    """Base class. Subclasses set ``task`` (what kind of datamodule they need), ``model_attr``
    (the attribute holding the method's torch model, which owns inference: see
    :mod:`elinspect.models.results`) and, where it is not a classification loss on logits,
    ``loss_kind`` (what kind of ``loss`` they train with: ``"reconstruction"`` for GAN-AE and
    the autoencoder). ``legacy_keys`` renames the state-dict keys of older checkpoints."""

    task: ClassVar[str]
    model_attr: ClassVar[str]
    loss_kind: ClassVar[str] = "classification"
    legacy_keys: ClassVar[dict[str, str]] = {}
    added_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/loss",
        monitor_mode: str = "min",
        scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__()
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise ConfigError(
                f"scheduler_interval must be one of {SCHEDULER_INTERVALS}, got {scheduler_interval!r}"
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # "step": the scheduler steps after every optimiser step (iteration-based schedules,
        # e.g. the EBBA paper's decay at 15k and 30k iterations); "epoch": after every epoch
        self.scheduler_interval = scheduler_interval
        self.monitor = monitor
        self.monitor_mode = monitor_mode
        # the resolved model/data/loss config of the run; set by the train entry point
        self.run_config: dict[str, Any] | None = None
        if self.legacy_keys or self.added_keys:
            self.register_load_state_dict_pre_hook(rename_legacy_keys)

    @property
    def torch_model(self) -> nn.Module:
        """The method's torch model: one call on images gives its named result (prediction,
        export and the steps all call it)."""
        return getattr(self, self.model_attr)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer=optimizer, **self.schedule_length())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "monitor": self.monitor,
                "interval": self.scheduler_interval,
                "frequency": 1,
            },
        }

    def heatmap_top(self) -> float | None:
        """The anomaly-map value drawn at the top of the colour scale where the model gives its
        maps a unit (twice it, so that the decision level sits mid-scale); ``None``: no map, or
        maps without a unit (each is drawn on its own scale)."""
        return None

    def scores_monitor(self) -> bool:
        """Whether this epoch's ``monitor`` value scores the model; false where a model logs a
        placeholder (SeMaCNN's NaN in its PaDiM fit epoch), which early stopping then skips
        (:class:`elinspect.callbacks.early_stopping.EarlyStopping`)."""
        return True

    def stage_epochs(self) -> dict[str, int] | None:
        """The epochs each training stage takes, in order, when the model's stages fix the length
        of a fit (SeMaCNN's PaDiM fit and classifier, GAN-AE's generator, encoder and
        calibration); ``None``: ``trainer.max_epochs`` decides. The run builder sets
        ``trainer.max_epochs`` to their sum (:func:`elinspect.build.fit_epochs`)."""
        return None

    def schedule_length(self) -> dict[str, int]:
        """What a scheduler needs to know of the run's length, read off the trainer when training
        starts: ``steps_per_epoch`` for a scheduler that takes it unset with milestones in epochs
        (:func:`~elinspect.models.schedules.warmup_multistep_lr`)."""
        factory = self.scheduler_factory
        keywords = getattr(factory, "keywords", {})
        wants = (
            "steps_per_epoch" in inspect.signature(factory).parameters
            and keywords.get("steps_per_epoch") is None
            and keywords.get("milestone_unit", "epoch") == "epoch"
        )
        return {"steps_per_epoch": self.steps_per_epoch()} if wants else {}

    def steps_per_epoch(self) -> int:
        """Optimiser steps per training epoch, as Lightning counts them (limits and gradient
        accumulation included)."""
        trainer = self.trainer
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if math.isinf(batches):
            raise ConfigError("milestones in epochs need a training dataloader with a length")
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "model_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "task": self.task,
            "config": self.run_config,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a model built by a run keeps that run's config (a resumed fit's checkpoints must say
        # what it ran with); one built without a run takes the stored one
        if self.run_config is None:
            self.run_config = checkpoint.get(CHECKPOINT_KEY, {}).get("config")

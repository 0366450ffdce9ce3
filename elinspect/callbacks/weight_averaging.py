"""An exponential moving average of the weights that the run's own test uses.

Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` keeps the average beside
the model, validates with it, and writes it into each checkpoint's ``state_dict`` (the raw
weights go to ``current_model_state``, for resuming). But whenever it loads a checkpoint while
its average exists — which after ``fit`` includes ``trainer.test(ckpt_path="best")`` — it puts
the *raw* weights back into the model: the run would test the raw weights of the epoch that the
averaged ones were chosen by, and ``elinspect.eval`` of the same file (the averaged weights)
would report other numbers. :class:`EmaWeightAveraging` restores the raw weights only when
resuming a fit; testing, validating and predicting keep the averaged ``state_dict``.

Only the supervised classifier and the detectors may use it: the anomaly models' buffers hold
fitted statistics and calibrated thresholds (PaDiM's Gaussians, decision levels) that an
average over training steps would mix with their unset values.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from elinspect.utils.errors import ConfigError

AVERAGEABLE_TASKS = ("classification", "detection")


class EmaWeightAveraging(EMAWeightAveraging):
    """Lightning's EMA of the weights (``decay`` per training step, BatchNorm statistics
    averaged too), tested as it is checkpointed."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        task = getattr(pl_module, "task", None)
        if stage == "fit" and task not in AVERAGEABLE_TASKS:
            raise ConfigError(
                f"callbacks.ema averages weights trained by gradient steps; {type(pl_module).__name__} "
                f"(task {task!r}) fits statistics and thresholds an average would mix. "
                f"Use it with the classifier or a detector."
            )
        super().setup(trainer, pl_module, stage)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

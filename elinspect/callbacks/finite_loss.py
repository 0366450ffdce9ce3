"""Stopping — or skipping the step — when the training loss is NaN or infinite.

A NaN loss, left alone, turns every weight into NaN at the next optimiser step and the
run goes on reporting nonsense. :class:`FiniteLossGuard` looks at the loss each
``training_step`` returns, *before* backward:

* ``on_nonfinite: raise`` stops the run with a :class:`NonFiniteLossError` naming the
  global step, the epoch and batch, the loss and the loss terms the model logged for that
  step (e.g. a detector's ``train/loss_classifier``, ``train/loss_box_reg``, …);
* ``on_nonfinite: skip`` skips that batch's backward and optimiser step, logs a warning
  with the same details and counts it (``train/nonfinite_skipped``, and in checkpoints, so
  a resumed run goes on counting); more than ``max_skips`` skips stop the run all the same.

How a step is skipped: in Lightning's automatic optimisation a ``training_step`` that
returns ``None`` has no backward and no optimiser update — the parameters' gradients are
zeroed (set to ``None``) first, so the optimiser leaves every parameter, momentum and
weight-decay term untouched (the step counter and an ``interval: step`` scheduler still
advance). Zeroing gradients in ``on_before_optimizer_step`` would not do: momentum and Adam's
moments would still move the weights. The guard therefore wraps the module's
``training_step`` for the duration of ``fit`` and returns ``None`` for a non-finite loss.

Manually optimised models (GAN-AE, PaDiM) step inside ``training_step``, so nothing can be
skipped: ``skip`` is refused for them at the start of fit, and ``raise`` checks the loss
terms they log at the end of each training epoch. Lightning refuses a skipped step in
distributed training too, so ``skip`` needs a single training process.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from elinspect.utils.errors import ConfigError

log = logging.getLogger(__name__)

OnNonFinite = Literal["raise", "skip"]
SKIPPED_METRIC = "train/nonfinite_skipped"
HINT = (
    "Lower the learning rate, set trainer.gradient_clip_val, check the inputs of this batch, "
    "or set callbacks.finite_loss.on_nonfinite=skip to skip such steps."
)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def _loss_of(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    return None


def _is_finite(value: Any) -> bool:
    if isinstance(value, Tensor):
        return bool(torch.isfinite(value.detach()).all())
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def _number(value: Any) -> str:
    if isinstance(value, Tensor):
        value = value.detach()
        return f"{value.item():.6g}" if value.numel() == 1 else f"tensor of shape {tuple(value.shape)}"
    return f"{float(value):.6g}"


class FiniteLossGuard(L.Callback):
    """Raise on, or skip, training steps whose loss is NaN or infinite (module docstring).

    Args:
        on_nonfinite: ``raise`` (stop with a message naming the step and the loss terms) or
            ``skip`` (no backward, no optimiser update for that batch; counted).
        max_skips: under ``skip``, stop all the same after this many skipped steps in the
            run (``None``: never), so a run that has diverged for good does not skip forever.
    """

    def __init__(self, on_nonfinite: OnNonFinite = "raise", max_skips: int | None = None) -> None:
        if on_nonfinite not in ("raise", "skip"):
            raise ConfigError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if max_skips is not None and max_skips < 0:
            raise ConfigError(f"max_skips must be >= 0 or null, got {max_skips}")
        self.on_nonfinite: OnNonFinite = on_nonfinite
        self.max_skips = max_skips
        self.skipped = 0
        self._wrapped: L.LightningModule | None = None

    # ------------------------------------------------------------------ wrapping
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_nonfinite == "skip" and trainer.world_size > 1:
            raise ValueError(
                "Lightning cannot skip a training step in distributed training (a None from "
                "training_step is refused there): use callbacks.finite_loss.on_nonfinite=raise"
            )
        if not pl_module.automatic_optimization:
            if self.on_nonfinite == "skip":
                raise ValueError(
                    f"{type(pl_module).__name__} optimises manually (inside training_step), so a "
                    "non-finite step cannot be skipped: use callbacks.finite_loss.on_nonfinite=raise"
                )
            return
        original = pl_module.training_step

        @functools.wraps(original)
        def guarded_training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            loss = _loss_of(output)
            if loss is None or _is_finite(loss):
                return output
            return self._nonfinite(trainer, pl_module, loss, output)

        pl_module.training_step = guarded_training_step  # instance attribute, removed at fit end
        self._wrapped = pl_module

    def _unwrap(self) -> None:
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unwrap()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._unwrap()

    # ------------------------------------------------------------------ checking
    def describe(self, trainer: L.Trainer, loss: Tensor | None, output: Any) -> str:
        """``non-finite loss at global step …: loss = nan; terms: …`` for this batch."""
        loop = trainer.fit_loop.epoch_loop
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {loop.batch_idx})"
        terms: dict[str, str] = {}
        if isinstance(output, Mapping):
            terms.update({k: _number(v) for k, v in output.items() if k != "loss" and isinstance(v, Tensor)})
        for name, value in trainer.callback_metrics.items():
            if name.startswith("train/") and "loss" in name and not name.endswith("_epoch"):
                terms.setdefault(name, _number(value))
        loss_text = f"loss = {_number(loss)}; " if loss is not None else ""
        listed = ", ".join(f"{k}={v}" for k, v in sorted(terms.items())) or "none logged"
        return f"non-finite loss at {where}: {loss_text}terms: {listed}"

    def _nonfinite(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor, output: Any) -> None:
        message = self.describe(trainer, loss, output)
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(f"{message}. {HINT}")
        self.skipped += 1
        if self.max_skips is not None and self.skipped > self.max_skips:
            raise NonFiniteLossError(
                f"{message}; {self.skipped} steps with a non-finite loss skipped, more than "
                f"callbacks.finite_loss.max_skips={self.max_skips}. {HINT.split(', or set')[0]}."
            )
        log.warning("skipped (no backward, no optimiser step): %s [%d so far]", message, self.skipped)
        return None  # Lightning skips backward and the optimiser update for this batch

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.on_nonfinite == "skip":
            pl_module.log(SKIPPED_METRIC, float(self.skipped), on_step=False, on_epoch=True, reduce_fx="max")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Manual optimisation: the logged training losses of the epoch must be finite."""
        if pl_module.automatic_optimization:
            return
        bad = {
            k: v
            for k, v in trainer.callback_metrics.items()
            if k.startswith("train/") and "loss" in k and not _is_finite(v)
        }
        if bad:
            listed = ", ".join(f"{k}={_number(v)}" for k, v in sorted(bad.items()))
            raise NonFiniteLossError(
                f"non-finite training loss in epoch {trainer.current_epoch} (up to global step "
                f"{trainer.global_step}): {listed}. {HINT.split(', or set')[0]}."
            )

    # ------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


__all__ = ["FiniteLossGuard", "NonFiniteLossError"]

"""Progress that reads well in a terminal and in a log file.

At a terminal, Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar`. Without one
(a log file, CI, a cluster job), a bar redraws nothing useful, so :class:`LogProgress` writes
one line per epoch of each stage, and one every ``every_s`` seconds inside a long epoch:
the stage, epoch, step/total, images/s and the estimated time left — enough to see from a
log that a 10-minute job is moving and when it will end.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar

log = logging.getLogger(__name__)


def batch_images(batch: Any) -> int:
    """How many images a batch holds: ``{"image": N×…}`` dicts and ``(images, targets)`` pairs
    (the detection collate); 0 when it cannot tell."""
    if isinstance(batch, Mapping):
        images = batch.get("image")
        return len(images) if images is not None else 0
    if isinstance(batch, list | tuple) and batch and hasattr(batch[0], "__len__"):
        return len(batch[0])
    return 0


def clock(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``4m05s`` or ``12s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class _Stage:
    """Counters of the epoch of one stage (train, validate, test, predict) being run."""

    def __init__(self, name: str, total: float) -> None:
        self.name, self.total = name, total
        self.start = self.last_line = time.monotonic()
        self.steps = self.images = 0

    def advance(self, images: int) -> None:
        self.steps += 1
        self.images += images

    def line(self, epoch: str, eta_extra_epochs: int = 0) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        total = "?" if self.total == float("inf") else str(int(self.total))
        parts = [f"{self.name}{epoch}: step {self.steps}/{total}", clock(elapsed)]
        if self.images:
            parts.append(f"{self.images / elapsed:.1f} images/s")
        if self.total != float("inf") and self.steps:
            per_step = elapsed / self.steps
            left = (self.total - self.steps) + eta_extra_epochs * self.total
            if left > 0:
                parts.append(f"ETA {clock(left * per_step)}")
        return ", ".join(parts)


class LogProgress(ProgressBar):
    """One log line per epoch and stage, and one every ``every_s`` seconds within an epoch.

    Args:
        every_s: the longest silence inside an epoch, in seconds.
        metrics: after a training epoch, also print these logged values when present (and the
            module's ``monitor``, the metric that picks the best checkpoint).
    """

    def __init__(
        self, every_s: float = 30.0, metrics: Sequence[str] = ("train/loss_epoch", "train/loss", "val/loss")
    ) -> None:
        super().__init__()
        self.every_s = every_s
        self.metrics = tuple(metrics)
        self._enabled = True
        self._stage: _Stage | None = None
        self._train_stage: _Stage | None = None  # kept while a validation runs inside an epoch

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    # ------------------------------------------------------------------- helpers
    def _epoch(self, trainer: L.Trainer) -> str:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return ""
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        return f" epoch {trainer.current_epoch + 1}/{total}"

    def _start(self, name: str, total: float) -> None:
        self._stage = _Stage(name, total)

    def _advance(self, trainer: L.Trainer, batch: Any, epochs_after: int = 0) -> None:
        stage = self._stage
        if stage is None or not self._enabled:
            return
        stage.advance(batch_images(batch))
        now = time.monotonic()
        if now - stage.last_line >= self.every_s and stage.steps < stage.total:
            stage.last_line = now
            log.info(stage.line(self._epoch(trainer), epochs_after))

    def _finish(self, trainer: L.Trainer, extra: str = "") -> None:
        stage, self._stage = self._stage, None
        if stage is None or not self._enabled or not stage.steps:
            return
        log.info(stage.line(self._epoch(trainer)) + extra)

    def _epochs_after(self, trainer: L.Trainer) -> int:
        if not trainer.max_epochs or trainer.max_epochs < 0:
            return 0
        return max(trainer.max_epochs - trainer.current_epoch - 1, 0)

    # --------------------------------------------------------------------- train
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("train", self.total_train_batches)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._advance(trainer, batch, self._epochs_after(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = trainer.callback_metrics
        names = [*self.metrics, getattr(pl_module, "monitor", None)]
        shown = [f"{k} {float(values[k]):.4g}" for k in dict.fromkeys(names) if k in values]
        self._finish(trainer, ("; " + ", ".join(shown)) if shown else "")

    # ------------------------------------------------------------ validate, test
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_stage = self._stage  # a validation inside a training epoch
        name = "sanity check" if trainer.sanity_checking else "validate"
        self._start(
            name, sum(trainer.num_sanity_val_batches) if trainer.sanity_checking else self.total_val_batches
        )

    def _evaluation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._advance(trainer, batch)

    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _evaluation_batch_end

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(trainer)
        self._stage, self._train_stage = self._train_stage, None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("test", sum(trainer.num_test_batches))

    def _evaluation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer)

    on_test_epoch_end = on_predict_epoch_end = _evaluation_epoch_end

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("predict", sum(trainer.num_predict_batches))


def progress_bar(every_s: float = 30.0, terminal: bool | None = None) -> ProgressBar:
    """The progress callback for this process: a rich bar at a terminal (``terminal=None``:
    stdout is a TTY), else :class:`LogProgress` lines at most ``every_s`` seconds apart."""
    if terminal is None:
        terminal = sys.stdout.isatty()
    return RichProgressBar() if terminal else LogProgress(every_s=every_s)

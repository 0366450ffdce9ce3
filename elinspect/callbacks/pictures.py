"""Writing a callback's pictures: PNG files in the run directory, and W&B when it logs there."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchvision.io import write_png


def epoch_directory(trainer: L.Trainer, name: str = "visuals") -> Path:
    """``<run>/<name>/epoch_XXX`` for the trainer's current epoch."""
    return Path(trainer.default_root_dir) / name / f"epoch_{trainer.current_epoch:03d}"


def save_and_log_pictures(
    trainer: L.Trainer, key: str, pictures: Sequence[Tensor], paths: Sequence[Path], captions: Sequence[str]
) -> None:
    """Write each uint8 3×H×W picture to its PNG path, then log them all under ``key`` to
    every :class:`~lightning.pytorch.loggers.WandbLogger` of the trainer."""
    for picture, path in zip(pictures, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(picture, str(path))
    arrays = [picture.permute(1, 2, 0).numpy() for picture in pictures]
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=arrays, caption=list(captions), step=trainer.global_step)

"""Pictures of a detector's validation predictions next to the ground truth (issue 3 item 8).

At the end of every ``every_n_epochs``-th validation epoch the first ``num_images``
validation images are drawn with their ground-truth boxes (green; difficult ones yellow)
and the predicted boxes with ``score >= score_threshold`` (red, labelled
``<class> <score>``), saved as ``<trainer.default_root_dir>/visuals/epoch_XXX/NN.png`` and,
when a :class:`~lightning.pytorch.loggers.WandbLogger` is attached, logged to W&B under
``val/visuals``. The predictions are the ones ``validation_step`` returns (no extra
forward pass); a module whose ``validation_step`` returns nothing is run once more on
those images. The sanity-check validation is skipped.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from elinspect.callbacks.pictures import epoch_directory, save_and_log_pictures
from elinspect.drawing import draw_detections
from elinspect.utils.errors import ConfigError


class DetectionVisualsCallback(L.Callback):
    """Draw ground truth and predictions on a few validation images (see the module docstring)."""

    def __init__(self, num_images: int = 4, every_n_epochs: int = 1, score_threshold: float = 0.3) -> None:
        super().__init__()
        if num_images < 1 or every_n_epochs < 1:
            raise ConfigError("num_images and every_n_epochs must be >= 1")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.score_threshold = score_threshold
        self._samples: list[tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]] = []

    def _active(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._samples = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active(trainer) or len(self._samples) >= self.num_images:
            return
        images, targets = batch
        preds = outputs
        if not isinstance(preds, list | tuple) or len(preds) != len(images):
            with torch.no_grad():
                preds = pl_module(list(images))
        for image, target, pred in zip(images, targets, preds, strict=True):
            if len(self._samples) >= self.num_images:
                break
            self._samples.append(
                (
                    image.detach().cpu(),
                    {k: v.detach().cpu() for k, v in target.items() if torch.is_tensor(v)},
                    {k: v.detach().cpu() for k, v in pred.items()},
                )
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or not self._samples or not trainer.is_global_zero:
            self._samples = []
            return
        class_names = list(getattr(pl_module, "class_names", []) or [])
        directory = epoch_directory(trainer)
        pictures, captions = [], []
        for i, (image, target, pred) in enumerate(self._samples):
            pictures.append(draw_detections(image, target, pred, class_names, self.score_threshold))
            image_id = target.get("image_id")
            captions.append(f"image {int(image_id)}" if image_id is not None else f"image {i}")
        paths = [directory / f"{i:02d}.png" for i in range(len(pictures))]
        save_and_log_pictures(trainer, "val/visuals", pictures, paths, captions)
        self._samples = []

"""Anomaly heatmaps over a few validation images (issue 5 item 6).

At the end of every ``every_n_epochs``-th validation epoch the first ``num_images``
validation images are saved as ``<trainer.default_root_dir>/visuals/epoch_XXX/NN.png``:
the grey image on the left, the image blended with its anomaly map in a matplotlib colour
map (``jet``) on the right; with a :class:`~lightning.pytorch.loggers.WandbLogger`
attached they are also logged to W&B under ``val/heatmaps``, captioned with the label and the
image score the model decides by (the map's maximum where the validation step returns no
score: SeMaCNN, which decides by its classifier).
All maps of one epoch share one colour scale (0 … the largest value among them), so
brighter means more anomalous across the pictures too.

The maps are the ``"anomaly_maps"`` that ``validation_step`` returns (PaDiM, SeMaCNN); a
module returning nothing there (e.g. before PaDiM is fitted) is skipped. The sanity-check
validation is skipped.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import matplotlib
import torch
from torch import Tensor

from elinspect.callbacks.pictures import epoch_directory, save_and_log_pictures
from elinspect.drawing import heatmap_overlay
from elinspect.utils.errors import ConfigError


class AnomalyHeatmapCallback(L.Callback):
    """Save image + heatmap overlays of a few validation images (see the module docstring)."""

    def __init__(
        self, num_images: int = 4, every_n_epochs: int = 1, alpha: float = 0.5, cmap: str = "jet"
    ) -> None:
        super().__init__()
        if num_images < 1 or every_n_epochs < 1:
            raise ConfigError("num_images and every_n_epochs must be >= 1")
        if cmap not in matplotlib.colormaps:
            raise ConfigError(f"unknown matplotlib colour map {cmap!r}")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.alpha = alpha
        self.cmap = cmap
        self._samples: list[tuple[Tensor, Tensor, int, float]] = []

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
        if not isinstance(outputs, dict) or "anomaly_maps" not in outputs:
            return
        labels = batch.get("label", torch.full((len(batch["image"]),), -1))
        maps = outputs["anomaly_maps"]
        scores = outputs["scores"] if "scores" in outputs else maps.flatten(1).amax(dim=1)
        for image, heatmap, label, score in zip(batch["image"], maps, labels, scores, strict=True):
            if len(self._samples) >= self.num_images:
                break
            self._samples.append((image.detach().cpu(), heatmap.detach().cpu(), int(label), float(score)))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        samples, self._samples = self._samples, []
        if not self._active(trainer) or not samples or not trainer.is_global_zero:
            return
        vmax = max(float(heatmap.max()) for _, heatmap, _, _ in samples)
        directory = epoch_directory(trainer)
        class_names = list(getattr(pl_module, "class_names", []) or [])
        pictures, captions = [], []
        for image, heatmap, label, score in samples:
            pictures.append(heatmap_overlay(image, heatmap, vmax, self.alpha, self.cmap))
            name = class_names[label] if 0 <= label < len(class_names) else str(label)
            captions.append(f"{name}, score {score:.3g}")
        paths = [directory / f"{i:02d}.png" for i in range(len(pictures))]
        save_and_log_pictures(trainer, "val/heatmaps", pictures, paths, captions)

"""SeMaCNN's torch model (``semacnn.txt`` §2.2): PaDiM's anomaly heatmap, scaled to a fixed
unit, read by a CNN classifier.

``SemaCnn(images)`` → :class:`~elinspect.models.results.HeatmapClassification` (the map, the
classifier's logits and probabilities). The ``heatmap_scale`` buffer is the map's unit (set by
:class:`~elinspect.models.anomaly.semacnn.SemaCnnModule` after PaDiM's fit; NaN before), so the
model carries everything inference needs: export and prediction call it as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from elinspect.models.anomaly.padim import Padim
from elinspect.models.results import HeatmapClassification


class SemaCnn(nn.Module):
    """PaDiM maps → ``map / heatmap_scale`` (and the grey image with ``heatmap_with_image``),
    resized to ``heatmap_size`` → the classifier (an
    :class:`~elinspect.models.classification.ImageClassifier` with 1 or 2 input channels).
    PaDiM is frozen: only the classifier trains."""

    threshold_names: tuple[str, ...] = ("heatmap_scale",)

    def __init__(
        self, padim: Padim, net: nn.Module, heatmap_with_image: bool = False, heatmap_size: int | None = None
    ) -> None:
        super().__init__()
        self.padim = padim.requires_grad_(False)
        self.net = net
        self.heatmap_with_image = heatmap_with_image
        self.heatmap_size = heatmap_size
        self.register_buffer("heatmap_scale", torch.tensor(float("nan")))

    def anomaly_maps(self, images: Tensor) -> Tensor:
        """PaDiM's raw anomaly maps N×1×H×W (no gradient: PaDiM is frozen)."""
        with torch.no_grad():
            return self.padim.anomaly_maps(images)

    def classifier_input(self, maps: Tensor, images: Tensor) -> Tensor:
        """The classifier's input: the scaled heatmap, and the grey image when asked for, both
        resized (area averaging) to ``heatmap_size`` when it is set."""
        scaled = maps / self.heatmap_scale
        if self.heatmap_with_image:
            scaled = torch.cat([scaled, images.float().mean(dim=1, keepdim=True)], dim=1)
        if self.heatmap_size is not None and scaled.shape[-1] != self.heatmap_size:
            scaled = F.interpolate(scaled, size=(self.heatmap_size, self.heatmap_size), mode="area")
        return scaled

    def forward(self, images: Tensor) -> HeatmapClassification:
        """The anomaly maps of images in [0, 1] and the classes read off them (PaDiM fitted)."""
        maps = self.anomaly_maps(images)
        classes = self.net(self.classifier_input(maps, images))
        return HeatmapClassification(maps, classes.logits, classes.probabilities)

    def normalisation(self) -> dict[str, Any]:
        """How an input is normalised, for an exported model's sidecar: PaDiM's, inside the model."""
        return self.padim.normalisation()

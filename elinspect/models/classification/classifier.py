"""An image classifier from the backbone registry with any number of input channels (exportable)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from elinspect.models.backbones import build_classifier
from elinspect.models.results import Classification

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageClassifier(nn.Module):
    """A registry backbone (``arch``: ``resnet18`` … ``efficientnet_lite2``) on images in [0, 1];
    normalisation is part of the module, so an exported model takes the same input as the
    datamodule gives.

    ``weights``: ``null``, ``imagenet``, a torchvision weights name or a local file
    (:mod:`elinspect.models.backbones`). With ``in_channels`` other than 3 the stem takes
    that many channels; pretrained RGB filters are adapted (summed over RGB for one channel,
    the usual grey adaptation).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        arch: str = "resnet18",
        weights: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.net = build_classifier(arch, weights, num_classes, in_channels)
        mean = mean or (IMAGENET_MEAN if in_channels == 3 else (0.5,) * in_channels)
        std = std or (IMAGENET_STD if in_channels == 3 else (0.25,) * in_channels)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    threshold_names: tuple[str, ...] = ()  # the arg-max class decides

    def forward(self, images: torch.Tensor) -> Classification:
        """``images``: N×C×H×W in [0, 1] → class logits and probabilities, N×num_classes."""
        logits = self.net((images - self.mean) / self.std)
        return Classification(logits, logits.softmax(dim=1))

    def normalisation(self) -> dict[str, Any]:
        """How an input is normalised, for an exported model's sidecar: inside the model."""
        return {
            "inside_model": True,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }

"""An image classifier from the backbone registry with any number of input channels (exportable)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from elinspect.models.backbones import build_classifier, input_normalisation
from elinspect.models.results import Classification


class ImageClassifier(nn.Module):
    """A registry backbone (``arch``: ``resnet18`` … ``efficientnet_lite2``) on images in [0, 1];
    normalisation is part of the module, so an exported model takes the same input as the
    datamodule gives.

    ``weights``: ``null``, ``imagenet``, a torchvision weights name or a local file
    (:mod:`elinspect.models.backbones`). With ``in_channels`` other than 3 the stem takes
    that many channels; pretrained RGB filters are adapted (summed over RGB for one channel,
    the usual grey adaptation). ``mean`` / ``std`` default to the backbone weights' own
    (:func:`~elinspect.models.backbones.input_normalisation`: ImageNet's for ResNets, [-1, 1]
    for EfficientNet-Lite), averaged over RGB for each channel of another stem.
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
        if mean is None or std is None:
            default_mean, default_std = input_normalisation(arch)
            if in_channels != 3:  # the adapted stem reads each channel as the RGB channels' average
                default_mean = (sum(default_mean) / 3,) * in_channels
                default_std = (sum(default_std) / 3,) * in_channels
            mean, std = mean or default_mean, std or default_std
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

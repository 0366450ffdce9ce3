"""A torchvision ResNet classifier with configurable input channels (exportable)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from elinspect.utils.weights import load_weights

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageClassifier(nn.Module):
    """ResNet on images in [0, 1]; normalisation is part of the module, so an exported
    model takes the same input as the datamodule gives.

    With ``in_channels`` other than 3, the stem convolution is rebuilt; pretrained
    weights then load into everything but the stem (for 1 channel the stem's ImageNet
    filters are summed over RGB, the usual grey adaptation).
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
        if not arch.startswith("resnet"):
            raise ValueError(
                f"model.net.arch must be a torchvision ResNet (resnet18, resnet50, ...), got {arch!r}"
            )
        net = torchvision.models.get_model(arch, weights=None)
        missing = load_weights(net, weights, builder=arch)
        if weights is not None:
            log.info("loaded %s into %s (%d tensors left at init)", weights, arch, len(missing))
        if in_channels != 3:
            rgb_stem = net.conv1.weight.detach()
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            if weights is not None and in_channels == 1:
                net.conv1.weight.data.copy_(rgb_stem.sum(dim=1, keepdim=True))
        net.fc = nn.Linear(net.fc.in_features, num_classes)
        self.net = net
        mean = mean or (IMAGENET_MEAN if in_channels == 3 else (0.5,) * in_channels)
        std = std or (IMAGENET_STD if in_channels == 3 else (0.25,) * in_channels)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: N×C×H×W in [0, 1] → class logits N×num_classes."""
        return self.net((images - self.mean) / self.std)

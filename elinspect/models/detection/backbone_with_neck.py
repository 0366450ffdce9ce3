"""The ``backbone`` that :class:`torchvision.models.detection.FasterRCNN` takes: body then neck."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from elinspect.utils.errors import ConfigError


class BackboneWithNeck(nn.Module):
    """``neck(body(x))``: a feature body (C2..C5) followed by a neck from the neck registry.

    Like torchvision's ``BackboneWithFPN`` but with any neck that follows the contract of
    :mod:`elinspect.models.detection.necks`; ``out_channels`` is the neck's.
    """

    def __init__(self, body: nn.Module, neck: nn.Module) -> None:
        super().__init__()
        if not isinstance(getattr(neck, "out_channels", None), int):
            raise ConfigError(f"neck {type(neck).__name__} must expose an int attribute out_channels")
        self.body = body
        self.neck = neck
        self.out_channels: int = neck.out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.neck(self.body(x))

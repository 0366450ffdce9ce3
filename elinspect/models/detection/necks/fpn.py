"""``fpn``: Feature Pyramid Network (Lin et al. 2017, "Feature Pyramid Networks for Object Detection").

A thin subclass of :class:`torchvision.ops.FeaturePyramidNetwork` with the
:class:`~torchvision.ops.feature_pyramid_network.LastLevelMaxPool` extra level — the neck
of torchvision's ``fasterrcnn_resnet50_fpn`` — so its parameter names (``inner_blocks``,
``layer_blocks``) match torchvision's.
"""

from __future__ import annotations

from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from elinspect.models.detection.necks import register_neck


@register_neck("fpn")
class FPN(FeaturePyramidNetwork):
    """Top-down pathway with lateral 1×1 convs and 3×3 output convs, plus a "pool" level."""

    def __init__(self, in_channels_list: list[int], out_channels: int = 256) -> None:
        super().__init__(list(in_channels_list), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

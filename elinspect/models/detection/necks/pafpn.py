"""``pafpn``: PANet's neck (Liu et al. 2018, "Path Aggregation Network for Instance Segmentation").

FPN's top-down pathway (torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork`)
gives P2..P5; PANet §3.1 then adds a bottom-up path augmentation that shortens the path
from the fine levels to the coarse ones::

    N2 = P2
    N(i+1) = conv3x3(P(i+1) + conv3x3_stride2(Ni))      i = 2..4

and, as in the FPN neck, an extra ``"pool"`` level ``max_pool(N5, kernel 1, stride 2)``.
The paper follows each conv by a ReLU (``relu=True``); mmdetection's PAFPN uses plain
convs (``relu=False``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import Conv2dNormActivation

from elinspect.models.detection.necks import register_neck


@register_neck("pafpn")
class PAFPN(nn.Module):
    """FPN top-down pathway followed by PANet's bottom-up path augmentation."""

    def __init__(self, in_channels_list: list[int], out_channels: int = 256, relu: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.fpn = FeaturePyramidNetwork(list(in_channels_list), out_channels)
        activation = nn.ReLU if relu else None
        levels = len(in_channels_list) - 1

        def conv(stride: int) -> nn.Module:
            return Conv2dNormActivation(
                out_channels, out_channels, 3, stride=stride, norm_layer=None, activation_layer=activation
            )

        self.downsample = nn.ModuleList(conv(2) for _ in range(levels))
        self.fuse = nn.ModuleList(conv(1) for _ in range(levels))
        for m in [*self.downsample.modules(), *self.fuse.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)
        self.extra = LastLevelMaxPool()

    def forward(self, features: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        pyramid = self.fpn(features)
        names, p = list(pyramid.keys()), list(pyramid.values())
        n = [p[0]]
        for i, (down, fuse) in enumerate(zip(self.downsample, self.fuse, strict=True)):
            lower = down(n[-1])
            if lower.shape[-2:] != p[i + 1].shape[-2:]:  # inputs whose sizes do not halve exactly
                lower = F.interpolate(lower, size=p[i + 1].shape[-2:], mode="nearest")
            n.append(fuse(p[i + 1] + lower))
        n, names = self.extra(n, list(features.values()), names)
        return OrderedDict(zip(names, n, strict=True))

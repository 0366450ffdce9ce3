"""``ebfpn``: the EBBA-Detector's neck — EBFPN plus the Balanced-Attention module (EBBA §3.B, DESIGN §2).

EBFPN (§3.B.1) is FPN's top-down path with bilinear upsampling, followed by a bottom-up
path with max-pool downsampling and a cross-layer lateral skip from the backbone::

    L5 = conv1x1(C5),  Li = conv1x1(Ci) + up_bilinear(L(i+1)),  Pi = conv3x3(Li)
    B2 = P2,           Bi = conv3x3(Pi + lateral_i(Ci) + maxpool2(B(i-1)))     i = 3..5

``lateral_i(Ci)`` is the top-down path's own 1×1 lateral map by default (``lateral="shared"``,
no extra parameters, which reproduces the paper's parameter count) or a separate 1×1 conv
(``lateral="separate"``). ``cross_layer=False`` drops the term;
``bottom_up=False`` drops the whole bottom-up path (outputs P2..P5, i.e. FPN): with
``balanced_attention=True`` that is the EBBA paper's "B-A module only" ablation row
(Table 3), the B-A module on plain FPN levels. The paper's equations were lost: DESIGN §2
reconstructs ``lateral_i`` as a 1×1 conv; which weights it has is settled by the paper's
parameter count (``shared``). Every conv is a plain conv with bias and no activation, like
torchvision's / mmdetection's FPN (the paper used mmdetection).

``balanced_attention=True`` (§3.B.2) maps B2..B5 to H2..H5 with
:class:`~elinspect.models.detection.balanced_attention.BalancedAttention`; the extra
``"pool"`` level is ``H6 = max_pool(H5, kernel 1, stride 2)`` (B5's when the module is
off), as torchvision's ``LastLevelMaxPool``. Sizes are matched exactly (adaptive max
pooling / bilinear interpolation to the target size), so odd input sizes work.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from elinspect.models.detection.attention import Temperature
from elinspect.models.detection.balanced_attention import BalancedAttention, max_pool_to, upsample_to
from elinspect.models.detection.necks import register_neck
from elinspect.utils.errors import ConfigError


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.kaiming_uniform_(conv.weight, a=1)  # torchvision's FPN initialisation
    nn.init.zeros_(conv.bias)
    return conv


class TopDownPath(nn.Module):
    """FPN's top-down path with bilinear upsampling: C2..C5 → P2..P5."""

    def __init__(self, in_channels_list: list[int], out_channels: int) -> None:
        super().__init__()
        self.inner = nn.ModuleList(_conv(c, out_channels, 1) for c in in_channels_list)
        self.smooth = nn.ModuleList(_conv(out_channels, out_channels, 3) for _ in in_channels_list)

    def forward(self, c: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Returns P2..P5 and the 1×1 lateral maps ``conv1x1(Ci)`` (reused as skips)."""
        lateral = [conv(ci) for conv, ci in zip(self.inner, c, strict=True)]
        last = lateral[-1]
        p = [self.smooth[-1](last)]
        for i in range(len(c) - 2, -1, -1):
            last = lateral[i] + upsample_to(last, c[i].shape[-2:])
            p.insert(0, self.smooth[i](last))
        return p, lateral


class BottomUpPath(nn.Module):
    """EBFPN's bottom-up path: P2..P5 (and C3..C5 for the cross-layer skip) → B2..B5."""

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int,
        cross_layer: bool = True,
        lateral: str = "shared",
    ) -> None:
        super().__init__()
        if lateral not in ("shared", "separate"):
            raise ConfigError(f"lateral must be 'shared' or 'separate', got {lateral!r}")
        coarser = in_channels_list[1:]
        self.cross_layer = cross_layer
        separate = cross_layer and lateral == "separate"
        self.lateral = nn.ModuleList(_conv(c, out_channels, 1) for c in coarser) if separate else None
        self.fuse = nn.ModuleList(_conv(out_channels, out_channels, 3) for _ in coarser)

    def forward(self, p: list[Tensor], c: list[Tensor], shared: list[Tensor]) -> list[Tensor]:
        """``shared`` are the top-down path's ``conv1x1(Ci)``, the skip when ``lateral="shared"``."""
        b = [p[0]]
        for i in range(1, len(p)):
            x = p[i] + max_pool_to(b[-1], p[i].shape[-2:])
            if self.cross_layer:
                x = x + (self.lateral[i - 1](c[i]) if self.lateral is not None else shared[i])
            b.append(self.fuse[i - 1](x))
        return b


@register_neck("ebfpn")
class EBFPN(nn.Module):
    """EBFPN (top-down + bottom-up with cross-layer skips) and the optional B-A module.

    Args:
        in_channels_list: channels of C2..C5.
        out_channels: channels of every output level.
        cross_layer: add ``lateral_i(Ci)`` in the bottom-up path (EBFPN's cross-layer skip).
        lateral: ``shared`` (default): the skip is the top-down path's own ``conv1x1(Ci)`` (no
            extra parameters; this matches the paper's 62.74 M parameters to 0.01 M, where
            ``separate`` 1×1 convs add 0.92 M for ResNet-101: ``python -m elinspect.profile
            model=ebba``); ``separate``: each skip has its own 1×1 conv.
        bottom_up: keep EBFPN's bottom-up path (false: FPN levels P2..P5 go on directly).
        balanced_attention: apply the B-A module to B2..B5.
        heads, temperature, refine_level: options of
            :class:`~elinspect.models.detection.balanced_attention.BalancedAttention`
            (paper: 1 head, fixed τ = 1, fused at B3).
    """

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int = 256,
        cross_layer: bool = True,
        lateral: str = "shared",
        bottom_up: bool = True,
        balanced_attention: bool = True,
        heads: int = 1,
        temperature: Temperature = "fixed",
        refine_level: int = 1,
    ) -> None:
        super().__init__()
        in_channels_list = list(in_channels_list)
        self.out_channels = out_channels
        self.top_down = TopDownPath(in_channels_list, out_channels)
        self.bottom_up = (
            BottomUpPath(in_channels_list, out_channels, cross_layer=cross_layer, lateral=lateral)
            if bottom_up
            else None
        )
        self.balanced_attention = (
            BalancedAttention(
                out_channels,
                num_levels=len(in_channels_list),
                refine_level=refine_level,
                heads=heads,
                temperature=temperature,
            )
            if balanced_attention
            else None
        )
        self.extra = LastLevelMaxPool()

    def forward(self, features: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        names, c = list(features.keys()), list(features.values())
        out, lateral = self.top_down(c)
        if self.bottom_up is not None:
            out = self.bottom_up(out, c, lateral)
        if self.balanced_attention is not None:
            out = self.balanced_attention(out)
        out, names = self.extra(out, c, names)
        return OrderedDict(zip(names, out, strict=True))

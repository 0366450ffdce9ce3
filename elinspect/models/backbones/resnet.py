"""ResNet bodies: C2..C5 feature maps, frozen stages, optional deformable convs.

The body is torchvision's ResNet (He et al. 2016) cut after ``layer4`` by
:class:`torchvision.models._utils.IntermediateLayerGetter`, as in torchvision's own
``resnet_fpn_backbone``. Its forward returns an ``OrderedDict`` with keys ``"0"`` .. ``"3"``
(C2..C5, strides 4, 8, 16, 32) — the input of every neck in
:mod:`elinspect.models.detection.necks`.

Deformable convolution (Dai et al. 2017, "Deformable Convolutional Networks", DCNv1):
in the chosen stages every residual block's ``conv2`` (the 3×3 conv of a Bottleneck;
the second, stride-1, 3×3 conv of a BasicBlock) becomes a :class:`DeformableConv2d`, i.e.
an offset-predicting 3×3 conv initialised to zero followed by
:class:`torchvision.ops.DeformConv2d` holding the original conv's weights. With zero
offsets a deformable conv samples the regular grid, so the replaced network computes
exactly the original function at initialisation and pretrained weights stay meaningful.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from timm.models import adapt_input_conv
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import DeformConv2d, FrozenBatchNorm2d

from elinspect.utils.weights import load_weights

log = logging.getLogger(__name__)

RESNET_DEPTHS = (18, 34, 50, 101)
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
"""Stage order for ``frozen_stages``; stage ``i`` (2..5) of the DCN paper is ``layer{i-1}``."""
DEFORMABLE_STAGES = (3, 4, 5)
NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


class DeformableConv2d(nn.Module):
    """A DCNv1 convolution: ``conv(x, offset(x))`` with ``offset`` a plain conv initialised to zero.

    ``offset`` has the same kernel, stride, padding and dilation as ``conv`` so that it
    predicts one (dy, dx) pair per kernel tap and output position.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        offset_groups: int = 1,
    ) -> None:
        super().__init__()
        self.offset = nn.Conv2d(
            in_channels,
            2 * offset_groups * kernel_size * kernel_size,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=True,
        )
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.conv = DeformConv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups=groups, bias=bias
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, offset_groups: int = 1) -> DeformableConv2d:
        """A deformable conv with ``conv``'s geometry and a copy of its weights (zero offsets)."""
        kh, kw = conv.kernel_size
        if (
            kh != kw
            or len(set(conv.stride)) != 1
            or len(set(conv.padding)) != 1
            or len(set(conv.dilation)) != 1
        ):
            raise ValueError(f"only square, isotropic convs can be made deformable, got {conv}")
        module = cls(
            conv.in_channels,
            conv.out_channels,
            kh,
            stride=conv.stride[0],
            padding=conv.padding[0],
            dilation=conv.dilation[0],
            groups=conv.groups,
            bias=conv.bias is not None,
            offset_groups=offset_groups,
        )
        with torch.no_grad():
            module.conv.weight.copy_(conv.weight)
            if conv.bias is not None:
                module.conv.bias.copy_(conv.bias)
        return module.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x, self.offset(x))


class ResNetBody(IntermediateLayerGetter):
    """``IntermediateLayerGetter`` over a ResNet that keeps its frozen stages in eval mode.

    ``train()`` leaves the frozen stages (``frozen``: names from :data:`STAGES`) in eval
    mode, so that with ``norm_layer="bn"`` their BatchNorm statistics do not drift either.
    """

    def __init__(self, model: nn.Module, return_layers: dict[str, str], frozen: Sequence[str] = ()) -> None:
        super().__init__(model, return_layers)
        self.frozen = list(frozen)

    def frozen_modules(self) -> list[nn.Module]:
        names = [n for stage in self.frozen for n in (("conv1", "bn1") if stage == "stem" else (stage,))]
        return [self[n] for n in names]

    def train(self, mode: bool = True) -> ResNetBody:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self


def make_deformable(layer: nn.Sequential) -> int:
    """Replace ``conv2`` of every block of a ResNet stage by a :class:`DeformableConv2d`; return the count."""
    for block in layer:
        block.conv2 = DeformableConv2d.from_conv(block.conv2)
    return len(layer)


def build_resnet_body(
    depth: int,
    weights: str | None = None,
    frozen_stages: int = 0,
    deformable_stages: Sequence[int] = (),
    norm_layer: str = "frozen_bn",
    stages: Sequence[int] = (1, 2, 3, 4),
) -> tuple[nn.Module, list[int]]:
    """Build a ResNet body returning ``OrderedDict("0": C2, "1": C3, "2": C4, "3": C5)``.

    Args:
        depth: 18, 34, 50 or 101 (torchvision's ``resnet{depth}``).
        weights: ``None`` (random init), a torchvision weights name (``"DEFAULT"``,
            ``"ResNet50_Weights.IMAGENET1K_V2"``) or a local state-dict file; loaded into the
            plain torchvision ResNet *before* any conv is made deformable, so the deformable
            convs start from the pretrained 3×3 weights.
        frozen_stages: how many of (stem, layer1, layer2, layer3, layer4) get
            ``requires_grad=False`` (0..5), counted from the stem, as torchvision's
            ``trainable_layers = 5 - frozen_stages``.
        deformable_stages: subset of {3, 4, 5} (= layer2, layer3, layer4, producing C3..C5)
            whose blocks get a :class:`DeformableConv2d` (Dai et al. 2017).
        norm_layer: ``"frozen_bn"`` (:class:`torchvision.ops.FrozenBatchNorm2d`, the usual
            choice for detection with small batches) or ``"bn"`` (:class:`torch.nn.BatchNorm2d`,
            e.g. to train from scratch as the EBBA paper does).
        stages: which of C2..C5 (1..4: ``layer1``..``layer4``, strides 4..32) to return, under
            the keys ``str(stage - 1)``; the body stops after the last one.

    Returns:
        The body and its output channels, one per returned stage (``[C2, C3, C4, C5]``:
        64..512 for depth 18/34, 256..2048 for 50/101).
    """
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"ResNet depth must be one of {RESNET_DEPTHS}, got {depth}")
    if not 0 <= frozen_stages <= len(STAGES):
        raise ValueError(f"frozen_stages must be in 0..{len(STAGES)}, got {frozen_stages}")
    bad = sorted(set(deformable_stages) - set(DEFORMABLE_STAGES))
    if bad:
        raise ValueError(
            f"deformable_stages must be a subset of {DEFORMABLE_STAGES} (layer2..layer4), got {bad}"
        )
    if norm_layer not in NORM_LAYERS:
        raise ValueError(f"norm_layer must be one of {sorted(NORM_LAYERS)}, got {norm_layer!r}")

    builder = f"resnet{depth}"
    model: resnet.ResNet = getattr(resnet, builder)(weights=None, norm_layer=NORM_LAYERS[norm_layer])
    missing = load_weights(model, weights, builder=builder)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing:
        log.warning(
            "weights %s left %d body tensors at their initial values, e.g. %s",
            weights,
            len(missing),
            missing[:5],
        )

    for stage in sorted(set(deformable_stages)):
        make_deformable(getattr(model, f"layer{stage - 1}"))

    frozen = STAGES[:frozen_stages]
    return_layers = {f"layer{i}": str(i - 1) for i in sorted(set(stages))}
    body = ResNetBody(model, return_layers, frozen=frozen)
    for module in body.frozen_modules():
        module.requires_grad_(False)

    expansion = model.layer1[0].expansion
    channels = [64 * expansion * 2 ** (i - 1) for i in sorted(set(stages))]
    return body, channels


def resnet_classifier(arch: str, weights: str | None, num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet with ``weights`` loaded, a new ``num_classes`` head and, for
    ``in_channels`` other than 3, a new stem (pretrained: timm's ``adapt_input_conv`` of the
    RGB filters — summed for one channel)."""
    net = getattr(resnet, arch)(weights=None)
    missing = load_weights(net, weights, builder=arch)
    if weights is not None:
        log.info("loaded %s into %s (%d tensors left at init)", weights, arch, len(missing))
    if in_channels != 3:
        rgb_stem = net.conv1.weight.detach()
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if weights is not None:
            net.conv1.weight.data.copy_(adapt_input_conv(in_channels, rgb_stem))
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net

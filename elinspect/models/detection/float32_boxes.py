"""Box coordinates in float32 under mixed precision.

Under ``bf16-mixed`` (``trainer=gpu``; ``precision: auto`` on an Ampere or newer GPU) the RPN's
and the box heads' outputs are bfloat16, and torchvision decodes boxes in the regression's
dtype and makes anchors in the feature maps' dtype. bfloat16 holds 8 significant bits, so
every proposal and detection would land on a multiple of 2 px between 256 and 512 px, of 4 px
up to 1024 and of 8 px beyond (RDDN's 1333-px side): a 3-px-wide crack box becomes 0 or 4 px
wide, and mAP at IoU 0.5:0.95 falls with no error anywhere. Here anchors and box decoding run
in float32 whatever the heads' dtype (the regression itself stays bf16: its rounding moves a
box by a fraction of a pixel, not by whole pixels). In float32 and float64 nothing changes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList


def coordinate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype box coordinates are computed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


class Float32BoxCoder(BoxCoder):
    """torchvision's ``BoxCoder`` that decodes in float32 (see the module docstring)."""

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        dtype = coordinate_dtype(torch.promote_types(rel_codes.dtype, boxes.dtype))
        return super().decode_single(rel_codes.to(dtype), boxes.to(dtype))


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` that makes anchors in float32 whatever the feature maps'
    dtype (it reads only their sizes, dtype and device)."""

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        sizes_only = [
            torch.empty(f.shape[-2:], dtype=coordinate_dtype(f.dtype), device=f.device) for f in feature_maps
        ]
        return super().forward(image_list, sizes_only)


def decode_boxes_in_float32(model: nn.Module) -> None:
    """Give every torchvision ``BoxCoder`` of ``model`` (the RPN's, the ROI heads', each cascade
    stage's) float32 decoding, keeping its weights and clip."""
    for module in model.modules():
        coder = getattr(module, "box_coder", None)
        if type(coder) is BoxCoder:
            module.box_coder = Float32BoxCoder(coder.weights, coder.bbox_xform_clip)

"""Box geometry the metrics and the report's curves share."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area


def on_ignored_region(boxes: Tensor, regions: Tensor, threshold: float = 0.5) -> Tensor:
    """``(D,)`` whether each detection lies on an ignored (difficult) box as COCO judges a crowd
    region: the share of the detection's own area inside the region ``>= threshold``, whatever
    their IoU (the rule of the logged mAP, whose difficult boxes are ``iscrowd``)."""
    if not len(boxes) or not len(regions):
        return torch.zeros(len(boxes), dtype=torch.bool)
    corners_min = torch.maximum(boxes[:, None, :2], regions[None, :, :2])
    corners_max = torch.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    inside = (corners_max - corners_min).clamp(min=0).prod(dim=-1)
    share = inside / box_area(boxes)[:, None].clamp(min=torch.finfo(inside.dtype).tiny)
    return (share >= threshold).any(dim=1)

"""RDDN's context reference (CR): ROI features pooled together with a concentric, larger box.

RDDN (``rddn.txt`` §IV.C) fights *partial visual confusion* — a part of a defect looks like
the whole defect — by giving the box head what lies around each region proposal. For a
proposal ``r = (x, y, w, h)`` (centre and size) the context region is
``r_c = (x, y, k·w, k·h)``, clipped to the image, with ``k = 1.5`` the paper's best
(Table VI: k in 1.3..1.7). Both regions are pooled by the same RoIAlign; where the two
are joined is ``fuse_at``:

- ``fc`` (the default, the paper's): both pooled maps go through the *shared* two-fc box
  head, and its two outputs — "the output of the second fully-connected layers after
  activation", the paper's region features — are concatenated before the classifier and
  box regressor (:class:`SharedHeadContext`). The box head keeps its size (ResNet-50 FPN:
  13.9 M parameters); only the predictor's input doubles, so "CR will only slightly affect
  the R-CNN module".
- ``roi``: the two 7×7 maps are concatenated along the channel axis before fc6, which then
  reads ``2·C × 7 × 7`` (fc6 grows from 12.8 M to 25.7 M parameters).

Variants of Table VI, chosen by ``mode``:

- ``concat`` — ROI and context features, concatenated (the paper's CR);
- ``context_only`` — only the enlarged box's features (the paper's ``CR*``);
- ``global`` — the whole image as the context box, one box per image (the trick of the
  paper's reference [1]), concatenated to every ROI of that image. [1] *adds* the global
  feature; here it is concatenated like CR so that the two variants differ only in the
  context box (a choice of this code, the paper does not say how it re-implemented [1]).

The pooling itself is torchvision's :class:`~torchvision.ops.MultiScaleRoIAlign`: each box,
ROI or context, is mapped to its own FPN level by its own size (FPN eq. 1), as the paper
pools context boxes "following the above method" like region proposals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, clip_boxes_to_image

from elinspect.utils.errors import ConfigError

ContextMode = Literal["concat", "context_only", "global"]
CONTEXT_MODES: tuple[str, ...] = ("concat", "context_only", "global")
CONTEXT_KEYS = frozenset({"enabled", "k", "mode", "fuse_at"})
FUSE_AT: tuple[str, ...] = ("fc", "roi")


def context_boxes(boxes: Tensor, image_size: tuple[int, int], k: float) -> Tensor:
    """The context regions of ``boxes``: same centre, width and height × ``k``, clipped to the image.

    Args:
        boxes: ``(N, 4)`` boxes ``(x1, y1, x2, y2)`` in pixels of the (resized) image.
        image_size: ``(height, width)`` of that image.
        k: enlargement factor, ``k >= 1`` (RDDN §IV.C; 1.5 in the paper).

    Returns:
        ``(N, 4)`` boxes in the same format. A box with zero width or height keeps its
        centre and stays degenerate along that side (``k · 0 = 0``); clipping keeps every
        coordinate inside ``[0, width] × [0, height]``, so a context box at the border is
        smaller than ``k`` times its ROI there.
    """
    if k < 1:
        raise ValueError(f"the context factor k enlarges the box, so it must be >= 1, got {k}")
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    centred = box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")
    scale = centred.new_tensor([1.0, 1.0, k, k])
    enlarged = box_convert(centred * scale, in_fmt="cxcywh", out_fmt="xyxy")
    return clip_boxes_to_image(enlarged, image_size)


def image_boxes(image_shapes: list[tuple[int, int]], like: Tensor) -> list[Tensor]:
    """One ``(1, 4)`` box ``(0, 0, width, height)`` per image: the whole image as a ROI."""
    return [like.new_tensor([[0.0, 0.0, float(w), float(h)]]) for h, w in image_shapes]


class ContextRoIPool(nn.Module):
    """A ROI pooler that adds RDDN's context reference to every ROI's pooled features.

    Called like :class:`~torchvision.ops.MultiScaleRoIAlign`:
    ``pool(features, boxes, image_shapes) -> Tensor[sum N_i, channels_factor · C, S, S]``,
    rows in the order of ``boxes`` (image by image).

    Args:
        roi_pool: the detector's ROI pooler (``MultiScaleRoIAlign``); it pools both the ROI
            and its context box.
        k: context enlargement factor (``concat`` and ``context_only``).
        mode: ``concat``, ``context_only`` or ``global`` (see the module docstring).
    """

    def __init__(self, roi_pool: nn.Module, k: float = 1.5, mode: ContextMode = "concat") -> None:
        super().__init__()
        if mode not in CONTEXT_MODES:
            raise ConfigError(f"context mode must be one of {CONTEXT_MODES}, got {mode!r}")
        if k < 1:
            raise ConfigError(f"the context factor k enlarges the box, so it must be >= 1, got {k}")
        self.roi_pool = roi_pool
        self.k = float(k)
        self.mode = mode

    @property
    def channels_factor(self) -> int:
        """How many ``C``-channel feature maps are stacked per ROI: 2 (concat, global) or 1."""
        return 1 if self.mode == "context_only" else 2

    @property
    def output_size(self) -> tuple[int, int]:
        """The wrapped pooler's ``(S, S)``."""
        return tuple(self.roi_pool.output_size)

    def forward(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        if self.mode == "global":
            roi = self.roi_pool(features, boxes, image_shapes)
            whole = self.roi_pool(features, image_boxes(image_shapes, boxes[0]), image_shapes)
            counts = torch.tensor([len(b) for b in boxes], device=whole.device)
            return torch.cat([roi, whole.repeat_interleave(counts, dim=0)], dim=1)
        context = [context_boxes(b, shape, self.k) for b, shape in zip(boxes, image_shapes, strict=True)]
        context_features = self.roi_pool(features, context, image_shapes)
        if self.mode == "context_only":
            return context_features
        return torch.cat([self.roi_pool(features, boxes, image_shapes), context_features], dim=1)

    def extra_repr(self) -> str:
        return f"k={self.k}, mode={self.mode!r}"


class SharedHeadContext(nn.Module):
    """The context reference fused after the box head (``fuse_at: fc``, RDDN §IV.C).

    Takes the context pooler's ``N × (parts·C) × S × S`` maps, runs every ``C``-channel part
    (ROI, context) through the one shared ``head`` — a single batched call — and concatenates
    the region features: ``N × parts·R``.
    """

    def __init__(self, head: nn.Module, parts: int = 2) -> None:
        super().__init__()
        self.head = head
        self.parts = int(parts)

    def forward(self, pooled: Tensor) -> Tensor:
        n, channels, height, width = pooled.shape
        parts = pooled.reshape(n, self.parts, channels // self.parts, height, width).transpose(0, 1)
        region = self.head(parts.reshape(self.parts * n, channels // self.parts, height, width))
        # explicit sizes: with no RoI (n = 0) a -1 would be ambiguous
        return (
            region.reshape(self.parts, n, region.shape[-1])
            .transpose(0, 1)
            .reshape(n, self.parts * region.shape[-1])
        )

    def extra_repr(self) -> str:
        return f"parts={self.parts}"


def parse_context(context: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``context`` config (``enabled``, ``k``, ``mode``, ``fuse_at``) as options, or ``None``
    when disabled. ``enabled`` defaults to true when the mapping is given, ``fuse_at`` to fc."""
    if context is None:
        return None
    unknown = sorted(set(context) - CONTEXT_KEYS)
    if unknown:
        raise ValueError(f"unknown context options {unknown}; allowed: {sorted(CONTEXT_KEYS)}")
    if not context.get("enabled", True):
        return None
    options = {
        "k": float(context.get("k", 1.5)),
        "mode": context.get("mode", "concat"),
        "fuse_at": context.get("fuse_at", "fc"),
    }
    if options["mode"] not in CONTEXT_MODES:
        raise ValueError(f"context mode must be one of {CONTEXT_MODES}, got {options['mode']!r}")
    if options["fuse_at"] not in FUSE_AT:
        raise ValueError(f"context fuse_at must be one of {FUSE_AT}, got {options['fuse_at']!r}")
    return options

"""Box heads of a Faster R-CNN: standard, with RDDN's context reference, or a Cascade R-CNN.

:func:`build_box_heads` takes the :class:`~elinspect.models.detection.roi_heads.LossRoIHeads`
a Faster R-CNN was built with (:func:`~elinspect.models.detection.builder.build_faster_rcnn`)
and returns the ROI heads RDDN (``rddn.txt``) asks for:

- ``head="standard"`` without context: the heads unchanged, so a plain Faster R-CNN stays
  exactly what it was;
- ``head="standard"`` with context: one ``LossRoIHeads`` whose pooler is a
  :class:`~elinspect.models.detection.context.ContextRoIPool`; the shared two-MLP head's
  outputs of ROI and context are concatenated (``fuse_at: fc``, RDDN §IV.C) or the head
  takes the wider pooled maps (``fuse_at: roi``);
- ``head="cascade"``: a :class:`~elinspect.models.detection.cascade.CascadeRoIHeads` with one
  stage per IoU threshold (RDDN §III.C.3: 0.4, 0.5, 0.6), each with its own ``TwoMLPHead`` +
  ``FastRCNNPredictor`` (RDDN §III.B.4: two 1024-d FC layers, class-specific regression),
  the context reference in every stage when enabled.

The sampling (ROIs per image, positive fraction), the inference settings (score threshold,
NMS, detections per image), the RoIAlign pooler and the ROI classification loss (the
``loss`` config group) are taken from the given heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads

from elinspect.models.detection.cascade import CascadeRoIHeads
from elinspect.models.detection.context import ContextRoIPool, SharedHeadContext, parse_context
from elinspect.models.detection.roi_heads import LossRoIHeads

HEADS = ("standard", "cascade")
CASCADE_BBOX_REG_WEIGHTS: tuple[tuple[float, float, float, float], ...] = (
    (10.0, 10.0, 5.0, 5.0),
    (20.0, 20.0, 10.0, 10.0),
    (30.0, 30.0, 15.0, 15.0),
)
"""Cascade R-CNN's box-coder weights of stages 1..3 (tighter deltas as the boxes get better)."""


def pooled_roi_size(roi_heads: RoIHeads) -> int:
    """``C · S · S``: the number of values the heads' pooler yields per ROI *without* context.

    Read from the input width of the box head's first ``nn.Linear`` (torchvision's
    ``TwoMLPHead.fc6``), divided by the context factor if the pooler already adds context.
    """
    first = next((m for m in roi_heads.box_head.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ValueError(
            f"cannot read the pooled ROI size from box head {type(roi_heads.box_head).__name__}: "
            "it has no nn.Linear layer (expected torchvision's TwoMLPHead)"
        )
    fused_at_roi = isinstance(roi_heads.box_roi_pool, ContextRoIPool) and not isinstance(
        roi_heads.box_head, SharedHeadContext
    )
    return first.in_features // (roi_heads.box_roi_pool.channels_factor if fused_at_roi else 1)


def number_of_classes(roi_heads: RoIHeads) -> int:
    """Classes including background, from the predictor's ``cls_score`` layer."""
    cls_score = getattr(roi_heads.box_predictor, "cls_score", None)
    if not isinstance(cls_score, nn.Linear):
        raise ValueError(
            f"box predictor {type(roi_heads.box_predictor).__name__} has no nn.Linear cls_score "
            "(expected torchvision's FastRCNNPredictor)"
        )
    return cls_score.out_features


def loss_heads_like(
    roi_heads: RoIHeads,
    box_roi_pool: nn.Module,
    box_head: nn.Module,
    box_predictor: nn.Module,
    iou: float | None = None,
    bbox_reg_weights: Sequence[float] | None = None,
) -> LossRoIHeads:
    """A ``LossRoIHeads`` with new box modules and ``roi_heads``' sampling, inference and loss.

    ``iou`` sets both matcher thresholds (a cascade stage: positive at IoU >= ``iou``,
    negative below); ``None`` keeps ``roi_heads``' thresholds. ``bbox_reg_weights=None``
    keeps its box-coder weights.
    """
    matcher = roi_heads.proposal_matcher
    return LossRoIHeads(
        box_roi_pool,
        box_head,
        box_predictor,
        fg_iou_thresh=matcher.high_threshold if iou is None else iou,
        bg_iou_thresh=matcher.low_threshold if iou is None else iou,
        batch_size_per_image=roi_heads.fg_bg_sampler.batch_size_per_image,
        positive_fraction=roi_heads.fg_bg_sampler.positive_fraction,
        bbox_reg_weights=tuple(roi_heads.box_coder.weights if bbox_reg_weights is None else bbox_reg_weights),
        score_thresh=roi_heads.score_thresh,
        nms_thresh=roi_heads.nms_thresh,
        detections_per_img=roi_heads.detections_per_img,
        classification_loss=getattr(roi_heads, "classification_loss", None),
    )


def build_box_heads(
    roi_heads: RoIHeads,
    head: Literal["standard", "cascade"] = "standard",
    cascade_iou: Sequence[float] = (0.4, 0.5, 0.6),
    cascade_stage_weights: Sequence[float] = (1.0, 0.5, 0.25),
    cascade_bbox_reg_weights: Sequence[Sequence[float]] | None = None,
    context: Mapping[str, Any] | None = None,
    representation_size: int = 1024,
) -> RoIHeads | CascadeRoIHeads:
    """The ROI heads of RDDN's variants, built from a Faster R-CNN's ``roi_heads``.

    Args:
        roi_heads: the heads the detector was built with (``LossRoIHeads``; a plain
            torchvision ``RoIHeads`` means cross-entropy).
        head: ``"standard"`` (one head) or ``"cascade"`` (Cascade R-CNN).
        cascade_iou: the positive IoU threshold of each cascade stage (RDDN: 0.4, 0.5, 0.6).
        cascade_stage_weights: the loss weight of each stage (Cascade R-CNN: 1, 0.5, 0.25).
        cascade_bbox_reg_weights: the box-coder weights of each stage; ``None`` is Cascade
            R-CNN's ``(10, 10, 5, 5)``, ``(20, 20, 10, 10)``, ``(30, 30, 15, 15)`` (the first
            ones for fewer stages; give them explicitly for more than three).
        context: ``{"enabled", "k", "mode"}`` of RDDN's context reference
            (:func:`~elinspect.models.detection.context.parse_context`); ``None`` or
            ``enabled: false`` is no context.
        representation_size: width of the two FC layers of every new box head (RDDN: 1024).

    Returns:
        ``roi_heads`` itself for a standard head without context, else new heads (the new
        box heads and predictors are freshly initialised).
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if isinstance(roi_heads, CascadeRoIHeads):
        raise ValueError(
            "roi_heads is already a Cascade R-CNN: build the box heads from the detector's own heads"
        )
    context_options = parse_context(context)
    if head == "standard" and context_options is None:
        return roi_heads

    base_pool = roi_heads.box_roi_pool
    if isinstance(base_pool, ContextRoIPool):
        base_pool = base_pool.roi_pool
    fuse_at = context_options.pop("fuse_at") if context_options is not None else "fc"
    pool = ContextRoIPool(base_pool, **context_options) if context_options is not None else base_pool
    parts = pool.channels_factor if isinstance(pool, ContextRoIPool) else 1
    roi_size = pooled_roi_size(roi_heads)
    num_classes = number_of_classes(roi_heads)

    def new_box_modules() -> tuple[nn.Module, FastRCNNPredictor]:
        if parts > 1 and fuse_at == "fc":  # region features of ROI and context, concatenated
            head = SharedHeadContext(TwoMLPHead(roi_size, representation_size), parts)
            return head, FastRCNNPredictor(parts * representation_size, num_classes)
        head = TwoMLPHead(roi_size * parts, representation_size)
        return head, FastRCNNPredictor(representation_size, num_classes)

    if head == "standard":
        return loss_heads_like(roi_heads, pool, *new_box_modules())

    ious = [float(x) for x in cascade_iou]
    if not ious or not all(0.0 < x < 1.0 for x in ious):
        raise ValueError(f"cascade_iou must be one or more IoU thresholds in (0, 1), got {list(cascade_iou)}")
    if len(cascade_stage_weights) != len(ious):
        raise ValueError(
            f"cascade_iou has {len(ious)} stages but cascade_stage_weights has {len(cascade_stage_weights)} "
            "weights: give one loss weight per stage"
        )
    if cascade_bbox_reg_weights is None:
        if len(ious) > len(CASCADE_BBOX_REG_WEIGHTS):
            raise ValueError(
                f"{len(ious)} cascade stages need explicit cascade_bbox_reg_weights "
                f"(defaults exist for at most {len(CASCADE_BBOX_REG_WEIGHTS)})"
            )
        cascade_bbox_reg_weights = CASCADE_BBOX_REG_WEIGHTS[: len(ious)]
    reg_weights = [tuple(float(v) for v in w) for w in cascade_bbox_reg_weights]
    if len(reg_weights) != len(ious) or any(len(w) != 4 for w in reg_weights):
        raise ValueError(
            f"cascade_bbox_reg_weights must hold one (wx, wy, ww, wh) per stage ({len(ious)}), "
            f"got {list(cascade_bbox_reg_weights)}"
        )
    stages = [
        loss_heads_like(roi_heads, pool, *new_box_modules(), iou=iou, bbox_reg_weights=w)
        for iou, w in zip(ious, reg_weights, strict=True)
    ]
    return CascadeRoIHeads(stages, cascade_stage_weights)

"""Assemble a torchvision Faster R-CNN (Ren et al. 2015) from a registry body, a registered neck and a loss.

Everything detection-specific — RPN, anchors, RoIAlign, NMS, box coding, the resize /
normalise transform — is torchvision's; this module only wires the parts together:
:func:`~elinspect.models.backbones.build_body` (any registry backbone) →
:func:`~elinspect.models.detection.necks.build_neck` →
:class:`~elinspect.models.detection.backbone_with_neck.BackboneWithNeck` →
:class:`torchvision.models.detection.FasterRCNN` with a
:class:`~elinspect.models.detection.roi_heads.LossRoIHeads`.

Images enter the model as float tensors in [0, 1] (grey EL images repeated to three
channels) and are normalised exactly once, by torchvision's ``GeneralizedRCNNTransform``
with ``image_mean`` / ``image_std`` — by default the backbone weights' own
(:func:`~elinspect.models.backbones.input_normalisation`: ImageNet's for ResNets, [-1, 1]
for EfficientNet-Lite).

The box head is torchvision's two-MLP head unless ``head`` / ``context`` ask for RDDN's
variants (``rddn.txt`` §III.B.4, §IV.C): :func:`~elinspect.models.detection.heads.build_box_heads`
then replaces the ROI heads by a Cascade R-CNN and / or adds the context reference. With the
defaults (``head="standard"``, no context) it is not called at all, so a plain Faster R-CNN
is built exactly as before (same modules, same random initialisation).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import MultiScaleRoIAlign

from elinspect.models.backbones import build_body, input_normalisation
from elinspect.models.detection.backbone_with_neck import BackboneWithNeck
from elinspect.models.detection.float32_boxes import Float32AnchorGenerator, decode_boxes_in_float32
from elinspect.models.detection.heads import build_box_heads
from elinspect.models.detection.necks import build_neck
from elinspect.models.detection.roi_heads import LossRoIHeads

FASTER_RCNN_KWARGS = frozenset(
    {
        "rpn_pre_nms_top_n_train",
        "rpn_pre_nms_top_n_test",
        "rpn_post_nms_top_n_train",
        "rpn_post_nms_top_n_test",
        "rpn_nms_thresh",
        "rpn_fg_iou_thresh",
        "rpn_bg_iou_thresh",
        "rpn_batch_size_per_image",
        "rpn_positive_fraction",
        "rpn_score_thresh",
        "box_score_thresh",
        "box_nms_thresh",
        "box_detections_per_img",
        "box_fg_iou_thresh",
        "box_bg_iou_thresh",
        "box_batch_size_per_image",
        "box_positive_fraction",
        "bbox_reg_weights",
    }
)
"""Keyword arguments passed through to :class:`~torchvision.models.detection.FasterRCNN` unchanged."""


def neck_output_names(neck: nn.Module, in_channels_list: Sequence[int]) -> list[str]:
    """The output keys of ``neck``, found by running it once on tiny zero C2..C5 maps (no state change)."""
    n = len(in_channels_list)
    features = OrderedDict(
        (str(i), torch.zeros(1, c, 4 * 2 ** (n - 1 - i), 4 * 2 ** (n - 1 - i)))
        for i, c in enumerate(in_channels_list)
    )
    modes = {m: m.training for m in neck.modules()}
    neck.eval()
    try:
        with torch.no_grad():
            return list(neck(features).keys())
    finally:
        for m, mode in modes.items():
            m.training = mode


def make_anchor_generator(
    anchor_sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[float] | Sequence[Sequence[float]]
) -> Float32AnchorGenerator:
    """torchvision's ``AnchorGenerator`` (making anchors in float32 under mixed precision,
    :mod:`~elinspect.models.detection.float32_boxes`); flat ``aspect_ratios`` are used for every level."""
    sizes = tuple(tuple(int(s) for s in level) for level in anchor_sizes)
    if all(isinstance(r, int | float) for r in aspect_ratios):
        ratios = (tuple(float(r) for r in aspect_ratios),) * len(sizes)
    else:
        ratios = tuple(tuple(float(r) for r in level) for level in aspect_ratios)
    if len(ratios) != len(sizes):
        raise ValueError(f"got {len(sizes)} anchor size tuples but {len(ratios)} aspect-ratio tuples")
    per_location = {len(s) * len(r) for s, r in zip(sizes, ratios, strict=True)}
    if len(per_location) != 1:
        raise ValueError("every level needs the same number of anchors per location (one RPN head is shared)")
    return Float32AnchorGenerator(sizes, ratios)


def build_faster_rcnn(
    num_classes: int,
    backbone: Mapping[str, Any],
    neck: Mapping[str, Any],
    classification_loss: nn.Module | None = None,
    anchor_sizes: Sequence[Sequence[int]] = ((32,), (64,), (128,), (256,), (512,)),
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0),
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    fixed_size: Sequence[int] | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    head: str = "standard",
    cascade_iou: Sequence[float] = (0.4, 0.5, 0.6),
    cascade_stage_weights: Sequence[float] = (1.0, 0.5, 0.25),
    context: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> FasterRCNN:
    """Build a Faster R-CNN from a registry body, a registered neck and a ROI classification loss.

    Args:
        num_classes: number of classes *including* background (label 0).
        backbone: keyword arguments of :func:`~elinspect.models.backbones.build_body` —
            ``name`` (or ``depth`` for a ResNet), ``weights``, ``frozen_stages``,
            ``deformable_stages``, ``norm_layer`` (``auto``: frozen with pretrained weights).
        neck: ``name`` of a registered neck, ``out_channels`` (default 256) and the neck's
            own keyword arguments.
        classification_loss: ROI classification loss ``loss(logits[N, C + 1], labels[N])``;
            ``None`` is cross-entropy (torchvision's default).
        anchor_sizes: one tuple of anchor sizes per neck output level (5 for the built-in
            necks); a mismatch raises ``ValueError``.
        aspect_ratios: anchor aspect ratios, the same for every level, or one tuple per level.
        min_size, max_size: torchvision's resize (shorter side to ``min_size``, a tuple of
            sizes picks one at random per training image, longer side at most ``max_size``).
        fixed_size: ``(height, width)`` to resize every image to, ignoring ``min_size`` /
            ``max_size`` (the EBBA paper uses ``(600, 600)``). Note that torchvision's own
            ``fixed_size`` argument is ``(width, height)``; the swap is done here.
        image_mean, image_std: normalisation applied by torchvision's transform; ``None``:
            the backbone weights' own (:func:`~elinspect.models.backbones.input_normalisation`).
        head: ``"standard"`` (Faster R-CNN's one box head) or ``"cascade"`` (Cascade R-CNN,
            one stage per ``cascade_iou`` threshold; RDDN §III.C.3: 0.4, 0.5, 0.6).
        cascade_iou, cascade_stage_weights: positive IoU and loss weight of each cascade stage.
        context: RDDN's context reference ``{"enabled", "k", "mode"}`` (§IV.C); ``None`` or
            ``enabled: false`` is none.
        **kwargs: the ``rpn_*`` / ``box_*`` / ``bbox_reg_weights`` arguments of
            :class:`~torchvision.models.detection.FasterRCNN` (see :data:`FASTER_RCNN_KWARGS`).
    """
    unknown = sorted(set(kwargs) - FASTER_RCNN_KWARGS)
    if unknown:
        raise TypeError(f"unexpected arguments {unknown}; allowed: {sorted(FASTER_RCNN_KWARGS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background, so it must be >= 2, got {num_classes}")

    body, in_channels = build_body(**backbone)
    if image_mean is None or image_std is None:
        name = backbone.get("name") or f"resnet{backbone['depth']}"  # build_body has checked one is given
        own_mean, own_std = input_normalisation(name)
        image_mean, image_std = image_mean or own_mean, image_std or own_std
    neck_kwargs = dict(neck)
    neck_name = neck_kwargs.pop("name")
    neck_module = build_neck(neck_name, in_channels, **neck_kwargs)
    levels = neck_output_names(neck_module, in_channels)
    if len(anchor_sizes) != len(levels):
        raise ValueError(
            f"anchor_sizes has {len(anchor_sizes)} levels but neck {neck_name!r} returns {len(levels)} "
            f"feature maps {levels}: give one tuple of anchor sizes per neck output"
        )

    transform_kwargs: dict[str, Any] = {}
    if fixed_size is not None:
        height, width = (int(s) for s in fixed_size)
        transform_kwargs["fixed_size"] = (width, height)

    model = FasterRCNN(
        BackboneWithNeck(body, neck_module),
        num_classes=num_classes,
        min_size=tuple(min_size) if isinstance(min_size, Sequence) else min_size,
        max_size=max_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        rpn_anchor_generator=make_anchor_generator(anchor_sizes, aspect_ratios),
        box_roi_pool=MultiScaleRoIAlign([k for k in levels if k != "pool"], output_size=7, sampling_ratio=2),
        **kwargs,
        **transform_kwargs,
    )
    model.roi_heads = LossRoIHeads.from_roi_heads(model.roi_heads, classification_loss)
    if head != "standard" or (context is not None and context.get("enabled", True)):
        model.roi_heads = build_box_heads(
            model.roi_heads,
            head=head,
            cascade_iou=tuple(cascade_iou),
            cascade_stage_weights=tuple(cascade_stage_weights),
            context=None if context is None else dict(context),
        )
    decode_boxes_in_float32(model)  # bf16 would round boxes to whole pixels (or 2, 4, 8)
    return model

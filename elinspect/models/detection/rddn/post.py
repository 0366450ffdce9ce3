"""RDDN's template reference post-processing, TR-Post (``rddn.txt`` §IV.A.3, Fig. 5, eqs. 10–11).

The template rescales the detector's scores; nothing is trained for it, so it plugs into
*any* trained two-stage detector (the paper's point: "TR-Post does not need to train
another detector"). Image ``I`` and template ``T`` go through the backbone; the RPN runs
on the image only; for each box, region features ``F^I`` and ``F^T`` are pooled at the same
box from both feature maps, and the score becomes

    P^I · (1 − cos⟨F^I, F^T⟩)

— a box that looks like the template is not a defect. ``F`` is the box head's
fully-connected region feature (after ReLU, so the cosine lies in [0, 1]): the detector's
own ``box_head(box_roi_pool(·))`` — with a context-reference pooler its ROI + context
feature, with a Cascade R-CNN the last stage's. ``features="roi_align"`` uses the flattened
RoIAlign output instead; its cosine can be negative and is clipped at 0, so the factor
stays in [0, 1].

Where: ``stage="proposals"`` (the default) follows Fig. 5 ("the cosine distance … will be
combined with the classification score to perform NMS"): every proposal's class
probabilities are rescaled *before* torchvision's ``postprocess_detections`` (score
threshold, per-class NMS, top-k) — for a Cascade R-CNN the stage-averaged probabilities of
the last stage's boxes, compared at the last stage's region features. ``stage="detections"``
rescores the final detections instead (after the score threshold, NMS and the cap): a box
that NMS suppressed in favour of one the template then demotes is lost, so it can only
reorder what the plain detector returned.

Use on a checkpoint trained without templates (a ``DetectionModule``, ``model=faster_rcnn``):
``TemplatePostScorer(module.model)(images, templates)``, or load its ``state_dict`` into a
``model=rddn model.template=post`` module of the same architecture (the parameter
names match) and evaluate that with a template-carrying dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads

from elinspect.models.detection.cascade import CascadeRoIHeads
from elinspect.models.detection.rddn.template_reference import check_references
from elinspect.utils.errors import ConfigError

PostStage = Literal["detections", "proposals"]
PostFeatures = Literal["box_head", "roi_align"]
POST_STAGES: tuple[str, ...] = ("detections", "proposals")
POST_FEATURES: tuple[str, ...] = ("box_head", "roi_align")


def template_post_factor(image_features: Tensor, template_features: Tensor) -> Tensor:
    """``1 − cos⟨F^I, F^T⟩`` per row (RDDN eqs. 10–11), the cosine clipped to [0, 1].

    Args:
        image_features, template_features: ``(N, D)`` region features of the same N boxes.
    """
    if image_features.shape != template_features.shape:
        raise ValueError(
            f"image and template region features differ in shape: "
            f"{tuple(image_features.shape)} vs {tuple(template_features.shape)}"
        )
    cosine = F.cosine_similarity(image_features.flatten(1), template_features.flatten(1), dim=1)
    return 1.0 - cosine.clamp(0.0, 1.0)


def feature_heads(roi_heads: nn.Module) -> nn.Module:
    """The heads whose ``box_roi_pool`` / ``box_head`` give the region features: the last
    stage of a Cascade R-CNN (``roi_heads.stages``), else ``roi_heads`` itself."""
    stages = getattr(roi_heads, "stages", None)
    heads = stages[-1] if isinstance(stages, nn.ModuleList) and len(stages) else roi_heads
    if not hasattr(heads, "box_roi_pool"):
        raise ValueError(f"ROI heads {type(roi_heads).__name__} have no box_roi_pool to pool region features")
    return heads


def region_features(
    roi_heads: nn.Module,
    features: dict[str, Tensor],
    boxes: list[Tensor],
    image_shapes: list[tuple[int, int]],
    kind: PostFeatures = "box_head",
) -> Tensor:
    """``(sum N_i, D)`` region features at ``boxes`` (resized-image pixels) — see the module docstring."""
    if kind not in POST_FEATURES:
        raise ValueError(f"TR-Post features must be one of {POST_FEATURES}, got {kind!r}")
    heads = feature_heads(roi_heads)
    pooled = heads.box_roi_pool(features, boxes, image_shapes)
    if kind == "roi_align":
        return pooled.flatten(1)
    return heads.box_head(pooled)


def rescore_detections(
    roi_heads: nn.Module,
    image_features: dict[str, Tensor],
    template_features: dict[str, Tensor],
    detections: list[dict[str, Tensor]],
    image_shapes: list[tuple[int, int]],
    kind: PostFeatures = "box_head",
) -> list[dict[str, Tensor]]:
    """TR-Post on final detections (boxes in resized-image pixels): scores × factor, re-sorted."""
    boxes = [d["boxes"] for d in detections]
    if sum(len(b) for b in boxes) == 0:
        return detections
    factor = template_post_factor(
        region_features(roi_heads, image_features, boxes, image_shapes, kind),
        region_features(roi_heads, template_features, boxes, image_shapes, kind),
    )
    out = []
    for det, f in zip(detections, factor.split([len(b) for b in boxes]), strict=True):
        scores = det["scores"] * f
        order = scores.argsort(descending=True)
        out.append({**{k: v[order] for k, v in det.items() if k != "scores"}, "scores": scores[order]})
    return out


def rescaled_logits(class_logits: Tensor, factor: Tensor) -> Tensor:
    """Logits whose softmax is ``p`` with every foreground probability multiplied by ``factor``.

    Background takes the removed mass: ``p'_0 = 1 − f·Σ_{c≥1} p_c``, ``p'_c = f·p_c``, which
    is a distribution for ``f`` in [0, 1]; returned as ``log p'``, since
    ``softmax(log p') = p'``. This lets torchvision's ``postprocess_detections`` (which
    applies the softmax) threshold and NMS the rescored probabilities unchanged.
    """
    probs = F.softmax(class_logits, dim=-1)
    foreground = probs[:, 1:] * factor[:, None]
    background = (1.0 - foreground.sum(dim=1, keepdim=True)).clamp_min(0.0)
    tiny = torch.finfo(probs.dtype).tiny
    return torch.cat([background, foreground], dim=1).clamp_min(tiny).log()


def rescore_proposals(
    roi_heads: RoIHeads,
    image_features: dict[str, Tensor],
    template_features: dict[str, Tensor],
    proposals: list[Tensor],
    image_shapes: list[tuple[int, int]],
    kind: PostFeatures = "box_head",
) -> list[dict[str, Tensor]]:
    """TR-Post before NMS (Fig. 5): the box heads' inference with rescaled class scores (a
    standard head's, or a Cascade R-CNN's stage-averaged scores of its last stage's boxes)."""
    if isinstance(roi_heads, CascadeRoIHeads):
        class_logits, box_regression, boxes = roi_heads.scores(image_features, proposals, image_shapes)
        final = roi_heads.stages[-1]
    elif isinstance(roi_heads, RoIHeads):
        final, boxes = roi_heads, proposals
        pooled = roi_heads.box_roi_pool(image_features, boxes, image_shapes)
        class_logits, box_regression = roi_heads.box_predictor(roi_heads.box_head(pooled))
    else:
        raise ValueError(
            f"TR-Post stage 'proposals' needs torchvision-style RoIHeads or a Cascade R-CNN, got "
            f"{type(roi_heads).__name__}: use stage 'detections'"
        )
    factor = template_post_factor(
        region_features(roi_heads, image_features, boxes, image_shapes, kind),
        region_features(roi_heads, template_features, boxes, image_shapes, kind),
    )
    boxes, scores, labels = final.postprocess_detections(
        rescaled_logits(class_logits, factor), box_regression, boxes, image_shapes
    )
    return [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels, strict=True)]


def template_post_rescore(
    detector: GeneralizedRCNN,
    images: Sequence[Tensor],
    templates: Sequence[Tensor],
    stage: PostStage = "proposals",
    features: PostFeatures = "box_head",
) -> list[dict[str, Tensor]]:
    """Detections of a trained torchvision-style two-stage ``detector`` (eval mode), rescored by TR-Post.

    Works for torchvision's ``FasterRCNN``, the detectors of ``model=faster_rcnn / baf / ebba``
    and RDDN's (without TR-Pre / TR-Inter, whose inputs differ). Boxes come back in the input
    images' pixels, as the detector's own output.
    """
    if stage not in POST_STAGES:
        raise ValueError(f"TR-Post stage must be one of {POST_STAGES}, got {stage!r}")
    if detector.training:
        raise ValueError("TR-Post rescoring is an inference step: call detector.eval() first")
    mode = getattr(detector, "template", "none")
    if mode not in ("none", "post"):
        raise ValueError(
            f"TR-Post rescoring runs the detector's backbone on the plain image and template, which an "
            f"RDDN detector with template={mode!r} does not take: use one trained with template none or post"
        )
    images = list(images)
    check_references(images, templates)
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    image_list, _ = detector.transform(images)
    template_list, _ = detector.transform(list(templates))
    if image_list.tensors.shape != template_list.tensors.shape:
        raise ValueError("the transform resized images and templates differently")
    image_features = detector.backbone(image_list.tensors)
    template_features = detector.backbone(template_list.tensors)
    proposals, _ = detector.rpn(image_list, image_features)
    if stage == "proposals":
        detections = rescore_proposals(
            detector.roi_heads, image_features, template_features, proposals, image_list.image_sizes, features
        )
    else:
        detections, _ = detector.roi_heads(image_features, proposals, image_list.image_sizes)
        detections = rescore_detections(
            detector.roi_heads,
            image_features,
            template_features,
            detections,
            image_list.image_sizes,
            features,
        )
    return detector.transform.postprocess(detections, image_list.image_sizes, original_sizes)


class TemplatePostScorer(nn.Module):
    """Wraps a trained detector: ``scorer(images, templates)`` is TR-Post, ``scorer(images)`` the
    detector's plain output (the paper: without templates the module is simply skipped)."""

    def __init__(
        self, detector: GeneralizedRCNN, stage: PostStage = "proposals", features: PostFeatures = "box_head"
    ) -> None:
        super().__init__()
        if stage not in POST_STAGES:
            raise ConfigError(f"TR-Post stage must be one of {POST_STAGES}, got {stage!r}")
        if features not in POST_FEATURES:
            raise ConfigError(f"TR-Post features must be one of {POST_FEATURES}, got {features!r}")
        self.detector = detector
        self.stage = stage
        self.features = features

    def forward(
        self, images: Sequence[Tensor], templates: Sequence[Tensor] | None = None
    ) -> list[dict[str, Tensor]]:
        if templates is None:
            return self.detector(list(images))
        return template_post_rescore(self.detector, images, templates, self.stage, self.features)

"""Cascade R-CNN box heads (Cai & Vasconcelos 2018) built from torchvision's ``RoIHeads`` parts.

RDDN's strongest variant (``rddn.txt`` §III.B.4, §III.C.3, Tables III, V, VII) replaces the
single ROI head of Faster R-CNN by three heads "with the same setting" that refine the
region proposals one after the other, in training and in testing, with IoU thresholds
0.4, 0.5 and 0.6 (lowered from Cascade R-CNN's 0.5 / 0.6 / 0.7 "to involve more positive
proposals"); ground-truth boxes are added to the proposals of every stage.

Each stage is a :class:`~elinspect.models.detection.roi_heads.LossRoIHeads`, so every step is
torchvision's: the stage's ``Matcher`` (positive at IoU >= its threshold, negative below),
``BalancedPositiveNegativeSampler``, ``BoxCoder`` (with the stage's regression weights),
RoIAlign pooler, ``TwoMLPHead`` / ``FastRCNNPredictor`` and, at the end,
``postprocess_detections`` (score threshold, per-class NMS, detections per image). This
module only chains them:

- **training** — stage ``t`` matches and samples its input boxes at its IoU, computes its
  losses, and decodes its class-specific regression (the assigned class for positive ROIs,
  the best foreground class otherwise, as mmdetection's ``refine_bboxes``) into the
  *detached* input boxes of stage ``t + 1``. The returned losses are
  ``loss_classifier = Σ_t w_t · L_cls,t`` and ``loss_box_reg = Σ_t w_t · L_reg,t`` with the
  stage weights ``w`` (Cascade R-CNN's 1, 0.5, 0.25), i.e. torchvision's keys, whose sum is
  the loss to minimise. The unweighted per-stage values are kept, detached, in
  :attr:`CascadeRoIHeads.stage_losses` (``loss_classifier_s0``, ``loss_box_reg_s0``, …) for
  logging: they are not in the returned dict, where they would be counted twice by
  ``sum(losses.values())``.
- **inference** — each stage scores its own input boxes; the class probabilities are the mean
  over stages (Cascade R-CNN's ensemble), the boxes the last stage's regression of the last
  stage's inputs.
- **ground truth between stages** — torchvision's sampling adds every ground-truth box to a
  stage's proposals; the sampled ground-truth boxes are dropped before the refined boxes go
  to the next stage, which adds the ground truth itself again (mmdetection's cascade drops
  them too, by its ``pos_is_gt`` flags). A sampled box is a ground-truth one when it equals a
  ground-truth box of its image exactly.

With a single stage this is exactly the standard head (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from elinspect.models.detection.roi_heads import LossRoIHeads
from elinspect.utils.errors import ConfigError


class CascadeRoIHeads(nn.Module):
    """A cascade of box heads, called like torchvision's ``RoIHeads``.

    ``forward(features, proposals, image_shapes, targets=None) -> (detections, losses)``.

    Args:
        stages: one :class:`LossRoIHeads` per stage, in order; each brings its own matcher
            IoU, box coder weights, box head and predictor (the pooler and the
            classification loss may be shared). The last stage's ``score_thresh``,
            ``nms_thresh`` and ``detections_per_img`` govern inference.
        stage_weights: the loss weight of each stage.
    """

    def __init__(self, stages: Sequence[LossRoIHeads], stage_weights: Sequence[float]) -> None:
        super().__init__()
        if len(stages) == 0:
            raise ConfigError("a cascade needs at least one stage")
        if len(stage_weights) != len(stages):
            raise ConfigError(f"got {len(stages)} cascade stages but {len(stage_weights)} stage loss weights")
        if any(w < 0 for w in stage_weights):
            raise ConfigError(f"cascade stage loss weights must be >= 0, got {list(stage_weights)}")
        self.stages = nn.ModuleList(stages)
        self.stage_weights = tuple(float(w) for w in stage_weights)
        self.stage_losses: dict[str, Tensor] = {}

    # torchvision-compatible views of the inference settings and the shared loss
    @property
    def score_thresh(self) -> float:
        return self.stages[-1].score_thresh

    @property
    def nms_thresh(self) -> float:
        return self.stages[-1].nms_thresh

    @property
    def detections_per_img(self) -> int:
        return self.stages[-1].detections_per_img

    @property
    def classification_loss(self) -> nn.Module:
        return self.stages[0].classification_loss

    @property
    def iou_thresholds(self) -> tuple[float, ...]:
        """The positive IoU threshold of each stage."""
        return tuple(float(s.proposal_matcher.high_threshold) for s in self.stages)

    def has_mask(self) -> bool:
        return False

    def has_keypoint(self) -> bool:
        return False

    @staticmethod
    def stage_outputs(
        stage: LossRoIHeads,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[Tensor, Tensor]:
        """``(class_logits, box_regression)`` of one stage for ``boxes``."""
        return stage.box_predictor(stage.box_head(stage.box_roi_pool(features, boxes, image_shapes)))

    @staticmethod
    def refine(
        stage: LossRoIHeads,
        box_regression: Tensor,
        boxes: list[Tensor],
        labels: Tensor,
        image_shapes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """The next stage's input: ``boxes`` moved by the regression of class ``labels``, clipped, detached."""
        decoded = stage.box_coder.decode_single(box_regression.detach(), torch.cat(boxes))
        decoded = decoded.reshape(len(labels), box_regression.shape[1] // 4, 4)
        picked = decoded[torch.arange(len(labels), device=labels.device), labels]
        per_image = picked.split([len(b) for b in boxes])
        return [clip_boxes_to_image(b, shape) for b, shape in zip(per_image, image_shapes, strict=True)]

    @staticmethod
    def best_foreground(class_logits: Tensor) -> Tensor:
        """The most likely non-background class of each ROI (labels 1..C)."""
        return class_logits[:, 1:].argmax(dim=1) + 1

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            return [], self.training_losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    def training_losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None,
    ) -> dict[str, Tensor]:
        """Weighted sums of the stages' losses; also fills :attr:`stage_losses`."""
        if targets is None:
            raise ValueError("CascadeRoIHeads needs targets in training mode")
        totals: dict[str, Tensor] = {}
        per_stage: dict[str, Tensor] = {}
        last = len(self.stages) - 1
        for t, (stage, weight) in enumerate(zip(self.stages, self.stage_weights, strict=True)):
            boxes, _, labels, regression_targets = stage.select_training_samples(proposals, targets)
            class_logits, box_regression = self.stage_outputs(stage, features, boxes, image_shapes)
            losses = stage.box_losses(class_logits, box_regression, labels, regression_targets)
            for key, value in losses.items():
                totals[key] = totals[key] + weight * value if key in totals else weight * value
                per_stage[f"{key}_s{t}"] = value.detach()
            if t < last:
                assigned = torch.cat(labels)
                refine_as = torch.where(assigned > 0, assigned, self.best_foreground(class_logits.detach()))
                refined = self.refine(stage, box_regression, boxes, refine_as, image_shapes)
                proposals = [
                    r[~is_ground_truth(b, target["boxes"])]
                    for r, b, target in zip(refined, boxes, targets, strict=True)
                ]
        self.stage_losses = per_stage
        return totals

    def detect(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Detections with stage-averaged class probabilities and the last stage's boxes."""
        class_input, box_regression, boxes = self.scores(features, proposals, image_shapes)
        det_boxes, det_scores, det_labels = self.stages[-1].postprocess_detections(
            class_input, box_regression, boxes, image_shapes
        )
        return [
            {"boxes": b, "labels": lab, "scores": s}
            for b, s, lab in zip(det_boxes, det_scores, det_labels, strict=True)
        ]

    def scores(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """What the last stage's ``postprocess_detections`` takes: class logits (the log of the
        stage-averaged probabilities), the last stage's box regression and its input boxes."""
        stage_logits = []
        boxes = proposals
        box_regression = None
        last = len(self.stages) - 1
        for t, stage in enumerate(self.stages):
            class_logits, box_regression = self.stage_outputs(stage, features, boxes, image_shapes)
            stage_logits.append(class_logits)
            if t < last:
                boxes = self.refine(
                    stage, box_regression, boxes, self.best_foreground(class_logits), image_shapes
                )
        if len(stage_logits) == 1:
            class_input = stage_logits[0]
        else:
            # postprocess_detections applies softmax; softmax(log p) = p for probabilities p
            mean_probs = torch.stack([F.softmax(x, dim=-1) for x in stage_logits]).mean(dim=0)
            class_input = mean_probs.clamp_min(torch.finfo(mean_probs.dtype).tiny).log()
        return class_input, box_regression, boxes


def is_ground_truth(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """A mask over ``boxes``: those equal to one of ``gt_boxes`` (the ones sampling added)."""
    if not len(gt_boxes) or not len(boxes):
        return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    return (boxes[:, None, :] == gt_boxes[None, :, :].to(boxes)).all(dim=-1).any(dim=1)

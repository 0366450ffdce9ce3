"""ROI heads with a pluggable classification loss, and training losses of a model in eval mode.

Faster R-CNN (Ren et al. 2015, "Faster R-CNN: Towards Real-Time Object Detection with
Region Proposal Networks") trains its box classifier with cross-entropy over the sampled
ROIs. The EBBA detector replaces it by a (scaled dynamic) focal loss (Lin et al. 2017),
so the ROI classification loss here is any ``nn.Module`` called as
``loss(class_logits[N, C + 1], labels[N]) -> scalar`` with label 0 = background.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.transform import GeneralizedRCNNTransform

LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
"""The training losses a torchvision Faster R-CNN returns."""


class LossRoIHeads(RoIHeads):
    """torchvision's :class:`RoIHeads` whose ROI classification loss is ``classification_loss``.

    Only the training branch of :meth:`forward` is overridden, because torchvision calls its
    module-level ``fastrcnn_loss`` (hard-coded cross-entropy) from inside ``forward``. The
    override reuses every torchvision step — ``select_training_samples`` (matching,
    fg/bg sampling, box encoding), ``box_roi_pool``, ``box_head``, ``box_predictor`` — and
    takes the box regression loss from torchvision's ``fastrcnn_loss`` unchanged (smooth L1,
    beta 1/9, on the true class's deltas of positive ROIs, summed and divided by the number
    of sampled ROIs); only the classification term is replaced. Inference is torchvision's
    ``forward``. Mask and keypoint heads are not supported in training.

    ``classification_loss=None`` means :class:`torch.nn.CrossEntropyLoss`, i.e. torchvision's
    behaviour.
    """

    def __init__(self, *args, classification_loss: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.classification_loss = (
            classification_loss if classification_loss is not None else nn.CrossEntropyLoss()
        )

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads, classification_loss: nn.Module | None = None) -> LossRoIHeads:
        """A ``LossRoIHeads`` sharing ``heads``' modules and copying its sampling / inference parameters."""
        return cls(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            fg_iou_thresh=heads.proposal_matcher.high_threshold,
            bg_iou_thresh=heads.proposal_matcher.low_threshold,
            batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
            positive_fraction=heads.fg_bg_sampler.positive_fraction,
            bbox_reg_weights=heads.box_coder.weights,
            score_thresh=heads.score_thresh,
            nms_thresh=heads.nms_thresh,
            detections_per_img=heads.detections_per_img,
            classification_loss=classification_loss,
        )

    def box_losses(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
    ) -> dict[str, Tensor]:
        """``loss_classifier`` from ``classification_loss``, ``loss_box_reg`` from torchvision."""
        _, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        loss_classifier = self.classification_loss(class_logits, torch.cat(labels, dim=0))
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if self.has_mask() or self.has_keypoint():
            raise NotImplementedError("LossRoIHeads trains box heads only (no mask / keypoint head)")
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        return [], self.box_losses(class_logits, box_regression, labels, regression_targets)


_EVAL_IN_LOSS_MODE = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, GeneralizedRCNNTransform)


@contextmanager
def loss_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in training mode except normalisation, dropout and the input transform; restore after.

    BatchNorm (and any layer with running statistics) stays in eval mode so that computing
    a validation loss neither uses batch statistics nor updates the running ones; dropout
    stays off; torchvision's ``GeneralizedRCNNTransform`` resizes to the test size instead
    of a random training scale. Every module's own ``training`` flag is restored on exit.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        model.train()
        for m in model.modules():
            if isinstance(m, _EVAL_IN_LOSS_MODE):
                m.eval()
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def detection_losses(
    model: FasterRCNN, images: list[Tensor], targets: list[dict[str, Tensor]]
) -> dict[str, Tensor]:
    """The training losses (:data:`LOSS_KEYS`) of a batch, computed without touching the model's state.

    The optional validation loss: runs ``model`` in training mode under
    :func:`torch.no_grad` (see :func:`loss_mode` for what stays in eval mode) and restores
    every module's mode afterwards. Cost: one extra forward pass per batch on top of the
    eval forward that produces the detections (no backward, no stored activations), i.e.
    roughly double the validation time. The RPN and ROI sampling are random (as in
    training), so the value varies from call to call unless the RNG is seeded; the RPN
    keeps its *training* numbers of proposals (``rpn_*_nms_top_n_train``).
    """
    with torch.no_grad(), loss_mode(model):
        losses = model(images, targets)
    return losses

"""LightningModule of RDDN (``rddn.txt``): :class:`DetectionModule` whose batches also carry references.

Same metrics, logging and confusion matrix as every detector; the detector is
:func:`~elinspect.models.detection.rddn.detector.build_rddn`'s and gets, besides images and
boxes, the references its template mode needs from the targets (the detection datamodules
add them when the run asks — ``datamodule.request_inputs(model.extra_inputs)``):

- ``target["template"]``: the image's aligned template (``pre``, ``inter``: every split;
  ``post``: validation, test, and predict when present);
- ``target["normal"]``: a defect-free training image (``ptg``: training only).

A batch without a needed reference is refused with :class:`MissingReferenceError` naming the
key, the template mode and the datasets that provide it. PTG's reconstruction loss is part
of the training total and logged as ``train/loss_ptg``; validation batches carry no normal
sample, so PTG's ``val/loss`` (``model.val_loss``) is the detector's terms alone.

The step schedule of the paper (warm-up, decay at epochs 16 and 22) is
:func:`~elinspect.models.schedules.warmup_multistep_lr`, given the number of optimiser steps
per epoch by :class:`~elinspect.models.base.ElinspectModule` when training starts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from elinspect.data.info import DatasetInfo
from elinspect.models.detection.module import Batch, DetectionModule, model_targets
from elinspect.models.detection.rddn.detector import RddnFasterRCNN, extra_inputs_of
from elinspect.models.detection.roi_heads import loss_mode
from elinspect.utils.errors import UserError

REFERENCE_HINTS = {
    "template": (
        "Aligned templates come with data=fabric (every Tianchi fabric image has one); a run "
        "asks the datamodule for them with datamodule.request_inputs(model.extra_inputs). "
        "Datasets without templates (data=aluminum, pvel, voc, coco) fit model.template=ptg "
        "(pseudo templates learnt from normal samples) or none."
    ),
    "normal": (
        "Normal samples are defect-free training images, drawn by a detection datamodule after "
        "datamodule.request_inputs(model.extra_inputs) (data=aluminum, fabric: any dataset with "
        "defect-free training images); without them choose model.template=none."
    ),
}


class MissingReferenceError(UserError, ValueError):
    """A batch lacks the template or normal sample the model's template mode needs."""


class RddnModule(DetectionModule):
    """Trains and evaluates RDDN: ``detector`` (a ``_partial_`` of :func:`build_rddn`) called with
    the number of classes, the ROI loss and the paper's axes given here.

    Args:
        template: ``none | pre | inter | post | ptg`` — the template reference (§IV.A–B).
        head: ``standard`` (Faster R-CNN) or ``cascade`` (Cascade R-CNN, §III.B.4).
        cascade_iou, cascade_stage_weights: per cascade stage (§III.C.3: IoU 0.4, 0.5, 0.6).
        context: the context reference ``{enabled, k, mode}`` (§IV.C; ``None``: none).
        The other arguments are :class:`DetectionModule`'s.
    """

    def __init__(
        self,
        detector: Callable[..., nn.Module],
        dataset: DatasetInfo | dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        loss: nn.Module | None = None,
        template: str = "none",
        head: str = "standard",
        cascade_iou: Sequence[float] = (0.4, 0.5, 0.6),
        cascade_stage_weights: Sequence[float] = (1.0, 0.5, 0.25),
        context: Mapping[str, Any] | None = None,
        val_loss: bool = False,
        confusion_score_threshold: float = 0.5,
        monitor: str = "val/map_50",
        monitor_mode: str = "max",
    ) -> None:
        extra_inputs_of(template)  # a clear error for an unknown mode before anything is built
        factory = functools.partial(
            detector,
            template=template,
            head=head,
            cascade_iou=tuple(cascade_iou),
            cascade_stage_weights=tuple(cascade_stage_weights),
            context=None if context is None else dict(context),
        )
        super().__init__(
            factory,
            dataset,
            optimizer,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            loss=loss,
            val_loss=val_loss,
            confusion_score_threshold=confusion_score_threshold,
            monitor=monitor,
            monitor_mode=monitor_mode,
        )
        if not isinstance(self.model, RddnFasterRCNN):
            raise TypeError(
                f"RddnModule needs an RddnFasterRCNN detector (build_rddn), got {type(self.model).__name__}"
            )
        self.hparams.update(
            {
                "template": template,
                "head": head,
                "cascade_iou": list(cascade_iou),
                "cascade_stage_weights": list(cascade_stage_weights),
                "context": None if context is None else dict(context),
            }
        )

    @property
    def template(self) -> str:
        return self.model.template

    @property
    def extra_inputs(self) -> set[str]:
        """Batch keys the datamodule must add to the targets: ``{"template"}`` (pre, inter,
        post), ``{"normal"}`` (ptg) or none."""
        return set(self.model.extra_inputs)

    def references(
        self, targets: Sequence[dict[str, Tensor]], key: str, split: str, required: bool = True
    ) -> list[Tensor] | None:
        """``target[key]`` of every image; a :class:`MissingReferenceError` if any lacks it
        (``required``), else ``None`` when all lack it."""
        missing = [i for i, t in enumerate(targets) if key not in t]
        if not missing:
            return [t[key] for t in targets]
        if not required and len(missing) == len(targets):
            return None
        ids = [int(targets[i]["image_id"]) for i in missing if "image_id" in targets[i]]
        where = f" (image_id {ids})" if ids else ""
        raise MissingReferenceError(
            f"model.template={self.template} needs target[{key!r}] for every {split} image, but "
            f"{len(missing)} of {len(targets)} images of this batch have none{where}. {REFERENCE_HINTS[key]}"
        )

    def reference_inputs(self, targets: Sequence[dict[str, Tensor]], split: str) -> dict[str, Any]:
        """The ``templates`` / ``normals`` keyword arguments of the detector for ``split``."""
        mode = self.template
        inputs: dict[str, Any] = {}
        if mode in ("pre", "inter") or (mode == "post" and split in ("val", "test")):
            inputs["templates"] = self.references(targets, "template", split)
        elif mode == "post" and split == "predict":
            inputs["templates"] = self.references(targets, "template", split, required=False)
        if mode == "ptg" and split == "train":
            inputs["normals"] = self.references(targets, "normal", split)
        return inputs

    def forward(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]] | None = None,
        templates: Sequence[Tensor] | None = None,
        normals: Sequence[Tensor] | None = None,
    ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        """Detections (eval mode) or the loss dict (training mode, with ``targets``)."""
        return self.model(
            list(images),
            None if targets is None else model_targets(targets),
            templates=templates,
            normals=normals,
        )

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.model(list(images), model_targets(targets), **self.reference_inputs(targets, "train"))
        return self.log_training_losses(losses, len(images))

    def _eval_step(self, batch: Batch, split: str) -> list[dict[str, Tensor]]:
        images, targets = batch
        references = self.reference_inputs(targets, split)
        preds = self.model(list(images), **references)
        getattr(self, f"{split}_metrics").update(preds, targets)
        if split == "test":
            self.test_confusion.update(preds, targets)
        if split == "val" and self.val_loss:
            # the training losses without touching the model's state (detection_losses, with references)
            with torch.no_grad(), loss_mode(self.model):
                losses = self.model(
                    list(images), model_targets(targets), templates=references.get("templates")
                )
            self.log_validation_losses(losses, len(images))
        return preds

    def predict_step(self, batch: Batch | Sequence[Tensor], batch_idx: int) -> list[dict[str, Tensor]]:
        """Detections for ``(images, targets)`` batches (references from the targets) or plain
        lists of images (template modes ``none``, ``ptg`` and ``post`` without rescoring)."""
        if torch.is_tensor(batch[0]):
            return self.model(list(batch))
        images, targets = batch
        return self.model(list(images), **self.reference_inputs(targets, "predict"))

"""LightningModule for supervised defect detection with a torchvision Faster R-CNN (DESIGN §1, §2).

The detector comes from a ``detector`` factory — a ``_partial_`` of
:func:`~elinspect.models.detection.builder.build_faster_rcnn` in ``conf/model/faster_rcnn.yaml``
— called with the number of classes (the datamodule's ``class_names`` plus background) and
the ``loss`` config group's module as the ROI classification loss, so ``loss=focal`` or
``loss=sdfl`` changes the detector's classifier (the EBBA paper's SDFL, DESIGN §2).

Batches are ``(images, targets)``: ``images`` a list of float 3×H×W tensors in [0, 1]
(normalised once, by torchvision's transform), ``targets`` a list of dicts with ``boxes``
(N, 4) xyxy pixels, ``labels`` (N,) 1-based, ``image_id`` and ``difficult`` (N,) bool.

Logged: ``train/loss`` and each torchvision loss term (``train/loss_classifier``,
``train/loss_box_reg``, ``train/loss_objectness``, ``train/loss_rpn_box_reg``);
``{val,test}/map_50`` (the EBBA paper's headline mAP@0.5), ``map`` (0.5:0.95), ``mar_100``,
``ap_50/<class>``, ``recall/<class>``, ``ap/<class>`` (see :mod:`elinspect.metrics.detection`);
``val/loss*`` when ``val_loss`` is true. The test also writes the confusion matrix at IoU 0.5
(the EBBA paper's Fig. 12) to ``<trainer.default_root_dir>/test/confusion_matrix.{csv,png}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from elinspect.data.info import DatasetInfo
from elinspect.metrics.detection import DetectionConfusionMatrix, DetectionMetrics, save_confusion_matrix
from elinspect.models.backbones import IMAGENET_NORMALISATION
from elinspect.models.base import CHECKPOINT_KEY, ElinspectModule
from elinspect.models.detection.roi_heads import detection_losses

Batch = tuple[Sequence[Tensor], Sequence[dict[str, Tensor]]]

log = logging.getLogger(__name__)


def model_targets(targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The ``boxes`` and ``labels`` torchvision's detector trains on (difficult boxes included, as
    Detectron2 does for VOC; the metrics ignore them)."""
    return [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]


class DetectionModule(ElinspectModule):
    """Trains and evaluates ``detector(num_classes=len(class_names) + 1, classification_loss=loss)``.

    Args:
        detector: factory of the torchvision detector (``_partial_`` of ``build_faster_rcnn``).
        dataset: the datamodule's :class:`DatasetInfo` (``class_names`` without background).
        optimizer, scheduler: ``_partial_`` factories (see :class:`ElinspectModule`).
        scheduler_interval: ``"step"`` for iteration-based schedules (the EBBA paper decays
            at 15k and 30k iterations), ``"epoch"`` otherwise.
        loss: ROI classification loss ``loss(logits[N, C + 1], labels[N])``; ``None`` is
            cross-entropy.
        val_loss: also compute the training losses on validation batches
            (:func:`~elinspect.models.detection.roi_heads.detection_losses`, one extra forward
            pass per batch), logged as ``val/loss`` and ``val/loss_*``.
        confusion_score_threshold: minimum score of a detection counted in the test
            confusion matrix (mAP uses every detection the model returns).
    """

    task: ClassVar[str] = "detection"
    model_attr: ClassVar[str] = "model"  # the torchvision detector: detections per image in eval mode

    def __init__(
        self,
        detector: Callable[..., nn.Module],
        dataset: DatasetInfo | dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        loss: nn.Module | None = None,
        val_loss: bool = False,
        confusion_score_threshold: float = 0.5,
        monitor: str = "val/map_50",
        monitor_mode: str = "max",
    ) -> None:
        super().__init__(optimizer, scheduler, monitor, monitor_mode, scheduler_interval)
        info = DatasetInfo.from_dict(dataset)
        self.save_hyperparameters(
            {
                "dataset": info.to_dict(),
                "scheduler_interval": scheduler_interval,
                "val_loss": val_loss,
                "confusion_score_threshold": confusion_score_threshold,
                "monitor": monitor,
                "monitor_mode": monitor_mode,
            }
        )
        self.class_names = list(info.class_names)
        self.model = detector(num_classes=len(self.class_names) + 1, classification_loss=loss)
        self.val_loss = val_loss
        self.val_metrics = DetectionMetrics(self.class_names)
        self.test_metrics = DetectionMetrics(self.class_names)
        self.test_confusion = DetectionConfusionMatrix(
            len(self.class_names), iou_threshold=0.5, score_threshold=confusion_score_threshold
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The run's config, and the input normalisation the detector was trained with."""
        super().on_save_checkpoint(checkpoint)
        transform = self.model.transform
        checkpoint[CHECKPOINT_KEY]["image_normalisation"] = {
            "mean": [float(v) for v in transform.image_mean],
            "std": [float(v) for v in transform.image_std],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the normalisation the detector was trained with. A checkpoint written before
        commit 30037b0 names none: unless its config set ``image_mean`` / ``image_std``, it was
        trained on ImageNet-normalised inputs and keeps them. (One saved at 30037b0 itself,
        trained under the Lite's own normalisation that was not saved yet, is read the same way.)"""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(CHECKPOINT_KEY, {}).get("image_normalisation")
        if saved is None:
            detector = ((self.run_config or {}).get("model") or {}).get("detector") or {}
            if detector.get("image_mean") is not None or detector.get("image_std") is not None:
                return
            mean, std = IMAGENET_NORMALISATION
            saved = {"mean": mean, "std": std}
            log.warning(
                "this detector was saved without its input normalisation (before elinspect's "
                "normalisation fix, commit 30037b0): it keeps ImageNet's mean and std, which it was trained with"
            )
        self.model.transform.image_mean = [float(v) for v in saved["mean"]]
        self.model.transform.image_std = [float(v) for v in saved["std"]]

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        """Detections (eval mode) or the loss dict (training mode, with ``targets``)."""
        return self.model(list(images), None if targets is None else model_targets(targets))

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.model(list(images), model_targets(targets))
        return self.log_training_losses(losses, len(images))

    def log_training_losses(self, losses: dict[str, Tensor], size: int) -> Tensor:
        """Log ``train/loss`` (the sum), each loss term, and a cascade's per-stage losses; return the sum."""
        loss = sum(losses.values())
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True, batch_size=size
        )
        stage_losses = getattr(self.model.roi_heads, "stage_losses", None)  # Cascade R-CNN, per stage
        if stage_losses:
            self.log_dict(
                {f"train/{k}": v for k, v in stage_losses.items()},
                on_step=True,
                on_epoch=True,
                batch_size=size,
            )
        return loss

    def _eval_step(self, batch: Batch, split: str) -> list[dict[str, Tensor]]:
        images, targets = batch
        preds = self.model(list(images))
        getattr(self, f"{split}_metrics").update(preds, targets)
        if split == "test":
            self.test_confusion.update(preds, targets)
        if split == "val" and self.val_loss:
            self.log_validation_losses(
                detection_losses(self.model, list(images), model_targets(targets)), len(images)
            )
        return preds

    def log_validation_losses(self, losses: dict[str, Tensor], size: int) -> None:
        """``val/loss`` (their sum) and each ``val/<loss>``, epoch means over every rank."""
        self.log(
            "val/loss", sum(losses.values()), on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True
        )
        self.log_dict(
            {f"val/{k}": v for k, v in losses.items()}, on_epoch=True, batch_size=size, sync_dist=True
        )

    def validation_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Tensor]]:
        """Returns the detections, for callbacks (:class:`~elinspect.callbacks.DetectionVisualsCallback`)."""
        return self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Tensor]]:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Batch | Sequence[Tensor], batch_idx: int) -> list[dict[str, Tensor]]:
        """Detections for ``(images, targets)`` batches or plain lists of images."""
        images = batch if torch.is_tensor(batch[0]) else batch[0]
        return self.model(list(images))

    def _log_metrics(self, split: str) -> None:
        metrics: DetectionMetrics = getattr(self, f"{split}_metrics")
        if not metrics.updated:
            return
        values = metrics.compute()
        metrics.reset()
        # already reduced over processes by torchmetrics
        self.log(f"{split}/map_50", values.pop("map_50"), prog_bar=True, batch_size=1)
        self.log_dict({f"{split}/{k}": v for k, v in values.items()}, batch_size=1)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        matrix = self.test_confusion.compute()
        self.test_confusion.reset()
        if self.trainer.is_global_zero:
            save_confusion_matrix(
                matrix,
                self.class_names,
                self.confusion_matrix_dir,
                title=f"confusion matrix (IoU 0.5, score >= {self.test_confusion.score_threshold:g})",
            )

    @property
    def confusion_matrix_dir(self) -> Path:
        """``<trainer.default_root_dir>/test``: the run's output directory (``paths.output_dir``)."""
        return Path(self.trainer.default_root_dir) / "test"

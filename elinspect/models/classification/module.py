"""LightningModule for supervised image classification (ELPV cells and the like)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from elinspect.data.info import DatasetInfo
from elinspect.models.base import ElinspectModule
from elinspect.models.results import Classification, HeatmapClassification


def classification_metrics(num_classes: int) -> MetricCollection:
    """acc, f1, precision, recall, auroc: of the defective class when binary; for more classes
    acc is the share of samples classified right (micro) and the others are macro averages (the
    mean over classes, each class counting alike whatever its size)."""
    if num_classes == 2:
        return MetricCollection(
            {
                "acc": BinaryAccuracy(),
                "f1": BinaryF1Score(),
                "precision": BinaryPrecision(),
                "recall": BinaryRecall(),
                "auroc": BinaryAUROC(),
            }
        )
    kw = {"num_classes": num_classes, "average": "macro"}
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "f1": MulticlassF1Score(**kw),
            "precision": MulticlassPrecision(**kw),
            "recall": MulticlassRecall(**kw),
            "auroc": MulticlassAUROC(**kw),
        }
    )


def score_and_log(
    module: ElinspectModule, result: Classification | HeatmapClassification, labels: torch.Tensor, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and class probabilities of a classification step from the torch model's result;
    updates ``module``'s ``{split}_metrics`` and logs them and the loss (shared by the classifier
    and SeMaCNN)."""
    loss = module.loss(result.logits, labels)
    probs = result.probabilities
    metrics = getattr(module, f"{split}_metrics")
    metrics.update(probs[:, 1] if probs.shape[1] == 2 else probs, labels)
    on_step = split == "train"
    # val/test losses: epoch means over all ranks; the training loss (per step and its epoch
    # mean) is this rank's, so no collective runs at each training step
    module.log(
        f"{split}/loss",
        loss,
        on_step=on_step,
        on_epoch=True,
        prog_bar=True,
        batch_size=len(labels),
        sync_dist=not on_step,
    )
    module.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=not on_step, batch_size=len(labels))
    return loss, probs


def class_outputs(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a classification test or predict step returns: probabilities and the argmax class."""
    return {"probs": probs, "pred": probs.argmax(dim=1)}


class ClassifierModule(ElinspectModule):
    """Trains ``net`` with ``loss`` on ``{"image", "label"}`` batches.

    Logs ``{train,val,test}/{loss,acc,f1,precision,recall,auroc}``.
    """

    task: ClassVar[str] = "classification"
    model_attr: ClassVar[str] = "net"

    def __init__(
        self,
        net: Callable[..., nn.Module],
        dataset: DatasetInfo | dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        loss: nn.Module | None = None,
        monitor: str = "val/f1",
        monitor_mode: str = "max",
    ) -> None:
        super().__init__(optimizer, scheduler, monitor, monitor_mode)
        info = DatasetInfo.from_dict(dataset)
        self.save_hyperparameters(
            {"dataset": info.to_dict(), "monitor": monitor, "monitor_mode": monitor_mode}
        )
        self.class_names = info.class_names
        self.net = net(num_classes=info.num_classes, in_channels=info.in_channels)
        self.loss = loss if loss is not None else nn.CrossEntropyLoss()
        metrics = classification_metrics(info.num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.binary = info.num_classes == 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits N×K of images in [0, 1] (what Grad-CAM explains)."""
        return self.net(images).logits

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return score_and_log(self, self.net(batch["image"]), batch["label"], split)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return class_outputs(self._step(batch, "test")[1])  # kept by the test-predictions callback

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return class_outputs(self.net(batch["image"]).probabilities)

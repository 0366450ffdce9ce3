"""Every test prediction on disk, for reports and plots drawn offline (issue 8 item 1).

At the end of the test epoch, :class:`TestPredictionsCallback` writes under
``<trainer.default_root_dir>/test/`` (the run directory, where the detector also writes its
confusion matrix):

* ``predictions.csv`` for image-level models (classifiers, SeMaCNN, PaDiM, GAN-AE, the
  autoencoder): one row per test image — ``index`` (the dataset's sample index when batches
  carry one, else the running number), ``target`` (the label; −1 when the batch has none),
  ``score`` (the defect score: P(class 1) of a binary classifier, 1 − P(class 0) of a
  multi-class one, the anomaly score of an anomaly model), ``predicted`` (the predicted class:
  the classifier's argmax, or ``score ≥ threshold`` of an anomaly model), ``prob_<class>``
  columns for a multi-class classifier, and ``path`` when batches carry one;
* ``detections.jsonl`` for detectors: one JSON object per test image — ``image_id``, ``gt``
  (``boxes`` xyxy, 1-based ``labels``, ``difficult``) and ``detections`` (``boxes``,
  ``labels``, ``scores``), all in the coordinates of the image the model was given;
* ``classes.json``: the class names (``class_names[i]`` names label ``i``, for detectors
  label ``i + 1``), the model's task and its decision threshold if it has one.

The values are the outputs ``test_step`` returns (a detector's detections, an anomaly
model's ``scores``, a classifier's or SeMaCNN's ``probs``). A module whose ``test_step``
returns none of these is asked for its ``predict_step`` on the same batch: one more forward
pass per test batch.
Under DDP every rank's rows are gathered and rank zero writes the files.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor

PREDICTIONS_FILE = "predictions.csv"
DETECTIONS_FILE = "detections.jsonl"
CLASSES_FILE = "classes.json"

log = logging.getLogger(__name__)


def _list(values: Tensor, digits: int) -> list:
    return [round(float(v), digits) for v in values.detach().cpu().reshape(-1).tolist()]


def _boxes(boxes: Tensor) -> list[list[float]]:
    return [[round(float(v), 2) for v in box] for box in boxes.detach().cpu().reshape(-1, 4).tolist()]


def detection_records(
    targets: Sequence[Mapping[str, Tensor]], preds: Sequence[Mapping[str, Tensor]], first_index: int
) -> list[dict[str, Any]]:
    """One JSON-able record per image of a detection batch (see the module docstring)."""
    records = []
    for n, (target, pred) in enumerate(zip(targets, preds, strict=True)):
        difficult = target.get("difficult")
        labels = target["labels"].detach().cpu().reshape(-1)
        image_id = target.get("image_id")
        records.append(
            {
                "image_id": int(image_id) if image_id is not None else first_index + n,
                "gt": {
                    "boxes": _boxes(target["boxes"]),
                    "labels": [int(v) for v in labels.tolist()],
                    "difficult": [bool(v) for v in difficult.reshape(-1).tolist()]
                    if difficult is not None
                    else [False] * len(labels),
                },
                "detections": {
                    "boxes": _boxes(pred["boxes"]),
                    "labels": [int(v) for v in pred["labels"].detach().cpu().reshape(-1).tolist()],
                    "scores": _list(pred["scores"], 5),
                },
            }
        )
    return records


def image_rows(
    batch: Mapping[str, Any],
    outputs: Mapping[str, Tensor],
    first_index: int,
    threshold: float | None,
    class_names: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per image of a ``{"image", "label", ...}`` batch from a step's outputs holding
    ``probs`` (class probabilities) or ``scores`` (anomaly scores), optionally ``pred``."""
    size = len(batch["image"])
    labels = batch.get("label")
    labels = labels.detach().cpu().reshape(-1).tolist() if torch.is_tensor(labels) else [-1] * size
    indices = batch.get("index")
    if torch.is_tensor(indices):
        indices = indices.detach().cpu().reshape(-1).tolist()
    if indices is None or len(indices) != size:
        indices = list(range(first_index, first_index + size))
    paths = batch.get("path")
    probs = outputs.get("probs")
    pred = outputs.get("pred")
    extra: dict[str, list] = {}
    if probs is not None:
        probs = probs.detach().cpu().float()
        score = probs[:, 1] if probs.shape[1] == 2 else 1 - probs[:, 0]
        predicted = pred.detach().cpu() if pred is not None else probs.argmax(dim=1)
        if probs.shape[1] > 2:
            names = list(class_names) if len(class_names) == probs.shape[1] else range(probs.shape[1])
            extra = {f"prob_{name}": _list(probs[:, k], 6) for k, name in enumerate(names)}
    elif outputs.get("scores") is not None:
        score = outputs["scores"].detach().cpu().double().reshape(-1)
        if pred is not None:
            predicted = pred.detach().cpu()
        elif threshold is not None:
            predicted = (score >= threshold).long()
        else:
            predicted = torch.full((size,), -1)
    else:
        raise ValueError(f"test outputs hold neither 'probs' nor 'scores' (keys: {sorted(outputs)})")
    rows = []
    for i in range(size):
        row: dict[str, Any] = {
            "index": int(indices[i]),
            "target": int(labels[i]),
            "score": float(score[i]),
            "predicted": int(predicted.reshape(-1)[i]),
        }
        row.update({k: v[i] for k, v in extra.items()})
        if isinstance(paths, Sequence) and not isinstance(paths, str) and len(paths) == size:
            row["path"] = str(paths[i])
        rows.append(row)
    return rows


def is_detection_batch(batch: Any) -> bool:
    return (
        isinstance(batch, list | tuple)
        and len(batch) == 2
        and isinstance(batch[1], list | tuple)
        and all(isinstance(t, Mapping) and "boxes" in t for t in batch[1])
    )


class TestPredictionsCallback(L.Callback):
    """Write the test predictions to ``<run>/test/`` (see the module docstring)."""

    __test__ = False  # not a pytest test class

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled
        self._rows: list[dict[str, Any]] = []
        self._records: list[dict[str, Any]] = []
        self._seen = 0
        self._indexed = True  # every batch carried the dataset's sample indices / image ids
        self._failed = False  # a batch could not be read: nothing is written this epoch

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._records, self._seen, self._indexed, self._failed = [], [], 0, True, False

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.enabled or self._failed:
            return
        try:
            self._collect(pl_module, outputs, batch, batch_idx)
        except Exception as err:  # writing predictions must never fail the test itself
            self._failed = True
            log.warning(
                "test predictions of %s are not written: %s: %s",
                type(pl_module).__name__,
                type(err).__name__,
                err,
            )

    def _collect(self, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if is_detection_batch(batch):
            images, targets = batch
            preds = outputs
            if not isinstance(preds, list | tuple) or len(preds) != len(images):
                with torch.no_grad():
                    preds = pl_module.predict_step(batch, batch_idx)
            self._indexed &= all(t.get("image_id") is not None for t in targets)
            self._records += detection_records(targets, preds, self._seen)
            self._seen += len(images)
            return
        if not isinstance(batch, Mapping) or "image" not in batch:
            return
        if not isinstance(outputs, Mapping) or not ({"probs", "scores"} & set(outputs)):
            with torch.no_grad():
                outputs = pl_module.predict_step(batch, batch_idx)
        self._indexed &= batch.get("index") is not None
        self._rows += image_rows(
            batch, outputs, self._seen, self._threshold(pl_module), self._names(pl_module)
        )
        self._seen += len(batch["image"])

    @staticmethod
    def _threshold(pl_module: L.LightningModule) -> float | None:
        threshold = getattr(pl_module, "threshold", None)
        return float(threshold) if torch.is_tensor(threshold) and threshold.numel() == 1 else None

    @staticmethod
    def _names(pl_module: L.LightningModule) -> list[str]:
        return [str(n) for n in getattr(pl_module, "class_names", None) or []]

    @staticmethod
    def _gather(trainer: L.Trainer, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return items
        gathered: list[list[dict[str, Any]] | None] = [None] * trainer.world_size
        dist.all_gather_object(gathered, items)
        return [item for part in gathered for item in part or []]

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        flags = self._gather(trainer, [{"indexed": self._indexed, "failed": self._failed}])
        if any(part["failed"] for part in flags):  # a rank could not read its batches: no partial files
            self._rows, self._records = [], []
            return
        indexed = all(part["indexed"] for part in flags)
        rows, records = self._gather(trainer, self._rows), self._gather(trainer, self._records)
        self._rows, self._records = [], []
        if not trainer.is_global_zero or not (rows or records):
            return
        directory = Path(trainer.default_root_dir) / "test"
        directory.mkdir(parents=True, exist_ok=True)
        threshold = self._threshold(pl_module)
        classes = {
            "class_names": self._names(pl_module),
            "task": getattr(pl_module, "task", None),
            "threshold": threshold if threshold is not None and math.isfinite(threshold) else None,
        }
        (directory / CLASSES_FILE).write_text(json.dumps(classes, indent=2) + "\n")
        if rows:
            frame = pd.DataFrame(rows)
            if indexed:  # DDP samplers pad the last batch with repeated samples: keep each once
                frame = frame.drop_duplicates(subset="index").sort_values("index", kind="stable")
            else:  # running numbers of several ranks: number the rows afresh
                frame["index"] = range(len(frame))
            frame.to_csv(directory / PREDICTIONS_FILE, index=False)
        if records:
            if indexed:
                records = sorted({r["image_id"]: r for r in records}.values(), key=lambda r: r["image_id"])
            with (directory / DETECTIONS_FILE).open("w") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")

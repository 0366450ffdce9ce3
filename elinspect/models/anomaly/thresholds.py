"""Decision thresholds for anomaly scores — a percentile of normal scores, Otsu's method, the
F1-optimal threshold on labelled scores — and the metrics of a thresholded score.

Every threshold ``t`` is used as "defective if score ≥ t" (as :func:`threshold_metrics`
applies it).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_f1_score,
    binary_precision,
    binary_recall,
)

__all__ = [
    "best_f1_threshold",
    "otsu_threshold",
    "percentile_threshold",
    "threshold_metrics",
    "to_unit_interval",
]

log = logging.getLogger(__name__)

OTSU_LEVELS = 256


def percentile_threshold(normal_scores: Tensor, percentile: float) -> float:
    """The ``percentile`` (0–100, linear interpolation) of the scores of normal images:
    100 is their maximum, 95 lets 5 % of them fall above the threshold."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
    if normal_scores.numel() == 0:
        raise ValueError("no normal scores to take a percentile of")
    return float(torch.quantile(normal_scores.detach().double().flatten().cpu(), percentile / 100))


def otsu_threshold(values: Tensor | np.ndarray) -> float:
    """Otsu's threshold (Otsu 1979) of a set of values, by OpenCV (``cv2.threshold`` with
    ``THRESH_OTSU``) on their histogram in 256 levels between their minimum and maximum.

    OpenCV returns the last level ``k`` of the lower class (values ≤ k are class 0); the
    threshold returned here lies halfway between level k and k + 1, mapped back to the
    values' units, so "≥ threshold" is exactly OpenCV's upper class. Constant values give
    their value (nothing lies above it).
    """
    array = np.asarray(values.detach().cpu().double() if isinstance(values, Tensor) else values, np.float64)
    array = array[np.isfinite(array)].ravel()
    if array.size == 0:
        raise ValueError("no finite values to threshold")
    low, high = float(array.min()), float(array.max())
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return high
    step = (high - low) / (OTSU_LEVELS - 1)
    levels = np.clip(np.rint((array - low) / step), 0, OTSU_LEVELS - 1).astype(np.uint8)
    k, _ = cv2.threshold(levels.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return low + (float(k) + 0.5) * step


def best_f1_threshold(scores: Tensor, labels: Tensor) -> float:
    """The score ``t`` for which "defective if score ≥ t" has the highest F1 on (scores, labels).

    A sweep over the sorted scores (cut only between distinct values); ties in F1 go to the
    highest threshold. Without positives every F1 is 0 and the top score is returned.
    """
    order = scores.argsort(descending=True)
    ranked = scores[order].double()
    positive = (labels[order] > 0).double()
    tp = positive.cumsum(0)
    fp = (1 - positive).cumsum(0)
    f1 = 2 * tp / (tp + fp + positive.sum())  # 2tp / (2tp + fp + fn), fn = P - tp
    group_end = torch.ones_like(ranked, dtype=torch.bool)
    group_end[:-1] = ranked[:-1] != ranked[1:]
    f1 = torch.where(group_end, f1, torch.full_like(f1, -1.0))
    return float(ranked[int(f1.argmax())])


def to_unit_interval(scores: Tensor) -> Tensor:
    """Scores min-max scaled to [0, 1] (order kept): torchmetrics would squash scores outside
    [0, 1] with a sigmoid, which saturates (ties) for distances of a few tens."""
    low, high = scores.min(), scores.max()
    return (scores - low) / (high - low).clamp_min(1e-12)


def threshold_metrics(scores: Tensor, labels: Tensor, threshold: float, prefix: str) -> dict[str, Tensor]:
    """``{prefix}{auroc,acc,f1,precision,recall}`` of "defective if score ≥ threshold".

    AUROC is undefined where the labels hold one class (a split of normal images only, say):
    it is left out with a warning, not reported as torchmetrics' 0.0."""
    target = (labels > 0).long()
    preds = (scores >= threshold).long()
    metrics = {
        f"{prefix}acc": binary_accuracy(preds, target),
        f"{prefix}f1": binary_f1_score(preds, target),
        f"{prefix}precision": binary_precision(preds, target),
        f"{prefix}recall": binary_recall(preds, target),
    }
    defects = int(target.sum())
    if 0 < defects < len(target):
        metrics[f"{prefix}auroc"] = binary_auroc(to_unit_interval(scores), target)
    else:
        kind = "defective" if defects else "normal"
        log.warning("%sauroc is undefined: all %d images are %s; not reported", prefix, len(target), kind)
    return metrics

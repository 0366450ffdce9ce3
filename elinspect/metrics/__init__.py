"""Evaluation metrics shared by the LightningModules."""

from elinspect.metrics.detection import (
    DetectionConfusionMatrix,
    DetectionMetrics,
    confusion_counts,
    save_confusion_matrix,
)
from elinspect.metrics.pixel import PixelAuroc, exact_auroc, pixel_auroc_value

__all__ = [
    "DetectionConfusionMatrix",
    "DetectionMetrics",
    "PixelAuroc",
    "confusion_counts",
    "exact_auroc",
    "pixel_auroc_value",
    "save_confusion_matrix",
]

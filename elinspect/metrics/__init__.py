"""Evaluation metrics shared by the LightningModules."""

from elinspect.metrics.detection import (
    DetectionConfusionMatrix,
    DetectionMetrics,
    confusion_counts,
    save_confusion_matrix,
)

__all__ = ["DetectionConfusionMatrix", "DetectionMetrics", "confusion_counts", "save_confusion_matrix"]

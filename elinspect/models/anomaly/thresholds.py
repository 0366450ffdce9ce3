"""Decision thresholds for anomaly scores: a percentile of normal scores, Otsu's method, and
(re-exported) the F1-optimal threshold on labelled scores.

Every threshold ``t`` is used as "defective if score ≥ t" (as
:func:`~elinspect.models.anomaly.padim_module.threshold_metrics` applies it).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

from elinspect.models.anomaly.padim_module import best_f1_threshold

__all__ = ["best_f1_threshold", "otsu_threshold", "percentile_threshold"]

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

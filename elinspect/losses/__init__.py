"""Classification losses shared by the detectors' ROI heads and the image classifiers.

Every loss is an ``nn.Module`` called as ``loss(logits[N, C], target[N]) -> Tensor``.
"""

from elinspect.losses.focal import FocalLoss
from elinspect.losses.sdfl import ScaledDynamicFocalLoss, alpha_from_counts

__all__ = ["FocalLoss", "ScaledDynamicFocalLoss", "alpha_from_counts"]

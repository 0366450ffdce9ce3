"""Classification losses shared by the detectors' ROI heads and the image classifiers.

Every loss is an ``nn.Module`` called as ``loss(logits[N, C], target[N]) -> Tensor``.
"""

from elinspect.losses.focal import FocalLoss

__all__ = ["FocalLoss"]

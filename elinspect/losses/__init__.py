"""Losses, by the kind of model output they train (``loss_kind``).

* Classification losses, shared by the detectors' ROI heads and the image classifiers:
  ``loss(logits[N, C], target[N]) -> Tensor`` (``torch.nn.CrossEntropyLoss``,
  :class:`FocalLoss`, :class:`ScaledDynamicFocalLoss`).
* Reconstruction losses (GAN-AE's encoder, the autoencoder):
  ``loss(x, x_hat, feat_x=None, feat_x_hat=None) -> Tensor`` (:class:`SsimFeatureLoss`,
  :class:`MseFeatureLoss`), subclasses of :class:`ReconstructionLoss`.
"""

from elinspect.losses.focal import FocalLoss
from elinspect.losses.reconstruction import (
    MseFeatureLoss,
    ReconstructionLoss,
    SsimFeatureLoss,
    ssim_per_image,
)
from elinspect.losses.sdfl import ScaledDynamicFocalLoss, alpha_from_counts

__all__ = [
    "FocalLoss",
    "MseFeatureLoss",
    "ReconstructionLoss",
    "ScaledDynamicFocalLoss",
    "SsimFeatureLoss",
    "alpha_from_counts",
    "ssim_per_image",
]

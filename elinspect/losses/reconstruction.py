"""Reconstruction losses: the GAN-AE encoder's objective (``gan-ae.txt`` §II.B, eq. 3 and 5).

Called as ``loss(x, x_hat, feat_x=None, feat_x_hat=None) -> Tensor`` with images in [0, 1]
(N×C×H×W) and, optionally, the critic's penultimate features f of both (N×n_f):

* :class:`SsimFeatureLoss` (``loss=ssim_feat``, eq. 3): −k1·SSIM(x, x̂) + k2/n_f·‖f(x) − f(x̂)‖²
* :class:`MseFeatureLoss` (``loss=mse_feat``, the paper's "MSE" training variant of
  Tables I–II): k1/n_i·‖x − x̂‖² + k2/n_f·‖f(x) − f(x̂)‖²

Eq. 3 prints the SSIM term as −k1/n_i·SSIM: SSIM is the mean of the local SSIM map over
the n_i pixels, so the 1/n_i is the mean already taken (DESIGN.md §2 writes −k1·SSIM); the
loss of two identical images is −k1. Both terms are per image, the loss is their batch mean.

Without features (a model with no critic, e.g. ``model=autoencoder``) the feature term is
absent: ``mse_feat`` is then the plain pixel MSE, ``ssim_feat`` −k1·SSIM.

These losses declare ``loss_kind = "reconstruction"``; a model that trains with class
logits (``loss_kind = "classification"``) refuses them before anything runs, and vice versa
(:func:`elinspect.utils.compat.check_compatible`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from elinspect.utils.errors import ConfigError


def gaussian_window_size(sigma: float) -> int:
    """The width of torchmetrics' Gaussian SSIM window for σ: 2·int(3.5σ + 0.5) + 1 (11 for 1.5)."""
    return int(3.5 * sigma + 0.5) * 2 + 1


def check_ssim_window(kernel_size: int, sigma: float) -> None:
    """Refuse a window size that σ does not give: torchmetrics' Gaussian SSIM sizes its window
    from σ alone and would ignore it."""
    width = gaussian_window_size(sigma)
    if int(kernel_size) != width:
        raise ConfigError(
            f"ssim_kernel {kernel_size} with ssim_sigma {sigma:g}: the Gaussian SSIM window is "
            f"{width} pixels wide, set by sigma alone (2·int(3.5σ + 0.5) + 1); set ssim_kernel={width}, "
            "or the sigma whose window you want"
        )


def ssim_per_image(
    x: Tensor, y: Tensor, kernel_size: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> Tensor:
    """Mean SSIM (Wang et al. 2004; the paper's eq. 4) of each image pair: N values, from
    torchmetrics' Gaussian-window SSIM (11×11, σ = 1.5 by default, Wang et al.'s values).
    Always in float32, autocast or not: its local variances E[x²] − μ² lose almost every digit
    in bf16 (a mixed-precision run would score SSIM ≈ 0.35 for a pair at 0.91)."""
    with torch.autocast(x.device.type, enabled=False):
        return structural_similarity_index_measure(
            x.float(),
            y.float(),
            gaussian_kernel=True,
            kernel_size=kernel_size,
            sigma=sigma,
            data_range=data_range,
            reduction="none",
        )


class ReconstructionLoss(nn.Module):
    """Base class: an image term (per image) plus k2/n_f·‖f(x) − f(x̂)‖² when features are given.

    Args:
        k1: weight of the image term (§III.A: k1 = 1).
        k2: weight of the feature term (§III.A: k2 = 1).
        ssim_kernel, ssim_sigma: SSIM's Gaussian window (used by :class:`SsimFeatureLoss`); the
            width must be the one σ gives (:func:`check_ssim_window`).
    """

    loss_kind: ClassVar[str] = "reconstruction"

    def __init__(
        self, k1: float = 1.0, k2: float = 1.0, ssim_kernel: int = 11, ssim_sigma: float = 1.5
    ) -> None:
        super().__init__()
        check_ssim_window(ssim_kernel, ssim_sigma)
        self.k1, self.k2 = float(k1), float(k2)
        self.ssim_kernel, self.ssim_sigma = int(ssim_kernel), float(ssim_sigma)

    def image_term(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """Per-image term, N values."""
        raise NotImplementedError

    def forward(
        self, x: Tensor, x_hat: Tensor, feat_x: Tensor | None = None, feat_x_hat: Tensor | None = None
    ) -> Tensor:
        per_image = self.image_term(x, x_hat)
        if feat_x is not None and feat_x_hat is not None:
            per_image = per_image + self.k2 * (feat_x - feat_x_hat).pow(2).flatten(1).mean(dim=1)
        return per_image.mean()


class SsimFeatureLoss(ReconstructionLoss):
    """Eq. 3: −k1·SSIM(x, x̂) + k2/n_f·‖f(x) − f(x̂)‖² (``loss=ssim_feat``)."""

    def image_term(self, x: Tensor, x_hat: Tensor) -> Tensor:
        return -self.k1 * ssim_per_image(x, x_hat, self.ssim_kernel, self.ssim_sigma)


class MseFeatureLoss(ReconstructionLoss):
    """k1/n_i·‖x − x̂‖² + k2/n_f·‖f(x) − f(x̂)‖² (``loss=mse_feat``; the paper's MSE variant)."""

    def image_term(self, x: Tensor, x_hat: Tensor) -> Tensor:
        return self.k1 * (x - x_hat).pow(2).flatten(1).mean(dim=1)

"""The convolutional autoencoder baseline (``semacnn.txt`` §2.3, Table 1 row 4).

What the paper says: "One of the more basic ones is the traditional Fully Convolutional
Autoencoder as presented elsewhere [23, 24]. After creating an anomaly heatmap, an
amplitude binary and/or Otsu thresholds [25] have been used." Table 1 reports accuracy
0.693 and no F1 for it. Nothing more (no architecture, loss, or how a heatmap becomes an
image label). The reading implemented here:

* **Network** — :class:`ConvAutoencoder`, fully convolutional (no dense bottleneck):
  ``depth`` stride-2 3×3 convolutions (BN, ReLU; widths c, 2c, 4c…), a 1×1 convolution to
  ``latent_channels``, mirrored 4×4 stride-2 transposed convolutions, a sigmoid output in
  [0, 1]. Trained on normal images to reconstruct them (the loss group: ``loss=mse_feat``,
  the default, is the plain pixel MSE here — no critic, no feature term; ``loss=ssim_feat``
  is −SSIM).
* **Anomaly heatmap** — the residual |x − x̂| (channel mean), Gaussian-blurred with
  ``blur_sigma`` (0: none).
* **"Amplitude"** — the image score is the heatmap's maximum (``score=max``; ``mean`` is the
  alternative), the amplitude an "amplitude binary threshold" cuts.
* **Otsu** — the image threshold is Otsu's (:func:`~elinspect.models.anomaly.thresholds.otsu_threshold`,
  ``cv2.threshold`` with ``THRESH_OTSU``) on the histogram of the validation images' scores:
  unsupervised (labels unused), it splits the scores into two classes, which presumes the
  validation split holds defective images (ELPV's does, 43 % at p > 0). A second Otsu
  threshold on the validation heatmaps' pixels segments the defect in each map (the
  ``masks`` of ``predict_step``).

:class:`AutoencoderDetector` bundles network and scoring (``forward(images)`` →
``(scores, maps)``) for export, like :class:`~elinspect.models.anomaly.ganae.GanAe`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.transforms.functional import gaussian_blur

from elinspect.models.anomaly.ganae import fit_images
from elinspect.models.results import AnomalyResult
from elinspect.utils.errors import ConfigError

ImageScore = Literal["max", "mean"]
IMAGE_SCORES: tuple[str, ...] = ("max", "mean")


class ConvAutoencoder(nn.Module):
    """Fully convolutional autoencoder: images N×C×S×S in [0, 1] → reconstructions in [0, 1].

    ``image_size`` must be divisible by 2**depth (64 with depth 4: a 4×4×latent code).
    """

    def __init__(
        self,
        channels: int = 1,
        image_size: int = 64,
        base_channels: int = 32,
        latent_channels: int = 64,
        depth: int = 4,
    ) -> None:
        super().__init__()
        if depth < 1 or image_size % 2**depth:
            raise ConfigError(f"image_size {image_size} must be divisible by 2**depth = {2**depth}")
        self.channels, self.image_size = channels, image_size
        widths = [base_channels * 2**i for i in range(depth)]
        down: list[nn.Module] = []
        previous = channels
        for w in widths:
            down += [nn.Conv2d(previous, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            previous = w
        down += [nn.Conv2d(previous, latent_channels, 1)]
        self.encoder = nn.Sequential(*down)
        up: list[nn.Module] = [nn.Conv2d(latent_channels, previous, 1), nn.ReLU(inplace=True)]
        for w in reversed([channels, *widths[:-1]]):
            up += [nn.ConvTranspose2d(previous, max(w, base_channels), 4, stride=2, padding=1)]
            up += [nn.BatchNorm2d(max(w, base_channels)), nn.ReLU(inplace=True)]
            previous = max(w, base_channels)
        up += [nn.Conv2d(previous, channels, 3, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*up)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def residual_heatmap(x: Tensor, x_hat: Tensor, blur_sigma: float = 0.0) -> Tensor:
    """|x − x̂| (channel mean) N×1×H×W, Gaussian-blurred when ``blur_sigma`` > 0."""
    maps = (x - x_hat).abs().mean(dim=1, keepdim=True)
    if blur_sigma > 0:
        radius = max(1, int(round(3 * blur_sigma)))
        maps = gaussian_blur(maps, kernel_size=[2 * radius + 1] * 2, sigma=[blur_sigma] * 2)
    return maps


class AutoencoderDetector(nn.Module):
    """The autoencoder with its heatmap and image score (see the module docstring):
    ``detector(images)`` → :class:`~elinspect.models.results.AnomalyResult`. The ``threshold``
    (image score) and ``pixel_threshold`` (heatmap) buffers hold the decision thresholds once
    chosen (NaN before)."""

    threshold_names: tuple[str, ...] = ("threshold", "pixel_threshold")

    def __init__(
        self, autoencoder: ConvAutoencoder, score: ImageScore = "max", blur_sigma: float = 2.0
    ) -> None:
        super().__init__()
        if score not in IMAGE_SCORES:
            raise ConfigError(f"score must be one of {IMAGE_SCORES}, got {score!r}")
        self.autoencoder = autoencoder
        self.score_kind = score
        self.blur_sigma = float(blur_sigma)
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))

    def normalisation(self) -> dict[str, Any]:
        """What the network is fed, for an exported model's sidecar: prepared inside the model."""
        ae = self.autoencoder
        return {
            "inside_model": True,
            "network_input": f"{ae.channels} channel(s) at {ae.image_size} px (grey = channel mean; "
            "bilinear resize, antialiased when shrinking), in [0, 1]",
        }

    def prepare(self, images: Tensor) -> Tensor:
        """Data images → the network's channels and size, [0, 1]."""
        return fit_images(images, self.autoencoder.channels, self.autoencoder.image_size)

    def heatmap(self, x: Tensor, x_hat: Tensor) -> Tensor:
        return residual_heatmap(x, x_hat, self.blur_sigma)

    def image_score(self, maps: Tensor) -> Tensor:
        flat = maps.flatten(1)
        return flat.amax(dim=1) if self.score_kind == "max" else flat.mean(dim=1)

    def forward(self, images: Tensor) -> AnomalyResult:
        """Image scores (N) and heatmaps (N×1×H×W at the input's H×W)."""
        x = self.prepare(images)
        maps = self.heatmap(x, self.autoencoder(x))
        scores = self.image_score(maps)
        if maps.shape[-2:] != images.shape[-2:]:
            maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return AnomalyResult(scores, maps)


def segment(maps: Tensor, pixel_threshold: Tensor | float) -> Tensor:
    """Binary defect masks (N×1×H×W, bool): heatmap ≥ the pixel threshold."""
    return maps >= torch.as_tensor(pixel_threshold, device=maps.device)

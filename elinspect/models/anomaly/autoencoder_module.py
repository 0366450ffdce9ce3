"""The convolutional autoencoder baseline as a LightningModule (``semacnn.txt`` §2.3, Table 1
row 4; the reading of the paper is in :mod:`elinspect.models.anomaly.autoencoder`).

* **Training** (automatic optimisation, ``trainer.max_epochs`` epochs): the normal (label 0)
  images of each batch are reconstructed and ``loss`` (``loss=mse_feat``: pixel MSE, the
  default; ``loss=ssim_feat``: −SSIM; no feature term, the autoencoder has no critic) is
  minimised. Batches without normal images are skipped.
* **Thresholds** — after every validation epoch (not the sanity check) the persistent
  buffers are set: ``threshold`` = Otsu's threshold of the validation image scores
  (``threshold=otsu``, unsupervised) or the F1-optimal one (``threshold=f1``, labels used),
  and ``pixel_threshold`` = Otsu's threshold of the validation heatmaps' pixels. The
  checkpoint saved after that validation holds both; test and predict use them.
* Metrics: ``{val,test}/{auroc,acc,f1,precision,recall}`` (labels > 0 are defective),
  ``val/loss`` on the validation normals, ``val/threshold``. No model selection
  (``monitor`` null): the last checkpoint is the one tested.
* ``validation_step``/``predict_step`` return ``anomaly_maps`` at the data's resolution
  (``callbacks=anomaly`` draws them; batches with ground-truth ``mask``s, ``data=folder``, also
  give ``{val,test}/pixel_auroc``); ``predict_step`` also ``masks`` (heatmap ≥ pixel threshold).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.aggregation import CatMetric

from elinspect.data.info import DatasetInfo
from elinspect.data.normals import defect_free, normal_images
from elinspect.losses.reconstruction import MseFeatureLoss, ReconstructionLoss
from elinspect.models.anomaly.autoencoder import AutoencoderDetector, ConvAutoencoder, ImageScore, segment
from elinspect.models.anomaly.base import AnomalyModule
from elinspect.models.anomaly.thresholds import best_f1_threshold, otsu_threshold
from elinspect.models.base import twice_when_set
from elinspect.models.results import AnomalyResult
from elinspect.utils.errors import ConfigError

log = logging.getLogger(__name__)

THRESHOLDS = ("otsu", "f1")
MAX_PIXELS = 4_000_000  # validation heatmap pixels kept for the pixel threshold


class AutoencoderModule(AnomalyModule):
    """Autoencoder + residual heatmap + Otsu thresholds (see the module docstring).

    Args:
        dataset: the datamodule's :class:`DatasetInfo`.
        optimizer, scheduler: partials for the autoencoder's optimiser and schedule.
        loss: a :class:`ReconstructionLoss` (``loss=mse_feat`` | ``ssim_feat``).
        image_size, channels: the network's input (``channels`` null: the data's).
        base_channels, latent_channels, depth: network shape.
        score: image score from the heatmap, ``max`` (amplitude) | ``mean``.
        blur_sigma: Gaussian blur of the heatmap in pixels (0: none).
        threshold: ``otsu`` (validation scores, unsupervised) | ``f1`` (validation, labelled).
    """

    loss_kind: ClassVar[str] = "reconstruction"
    model_attr: ClassVar[str] = "net"
    # before the thresholds moved into the torch model
    legacy_keys: ClassVar[dict[str, str]] = {
        "threshold": "net.threshold",
        "pixel_threshold": "net.pixel_threshold",
    }

    def __init__(
        self,
        dataset: DatasetInfo | dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        loss: nn.Module | None = None,
        image_size: int = 64,
        channels: int | None = 1,
        base_channels: int = 32,
        latent_channels: int = 64,
        depth: int = 4,
        score: ImageScore = "max",
        blur_sigma: float = 2.0,
        threshold: str = "otsu",
        monitor: str | None = None,
        monitor_mode: str = "max",
    ) -> None:
        super().__init__(optimizer, scheduler, monitor, monitor_mode)  # type: ignore[arg-type]
        info = DatasetInfo.from_dict(dataset)
        if threshold not in THRESHOLDS:
            raise ConfigError(f"model.threshold must be one of {THRESHOLDS}, got {threshold!r}")
        if loss is not None and not isinstance(loss, ReconstructionLoss):
            raise TypeError(
                f"the autoencoder trains with a reconstruction loss (loss=mse_feat | ssim_feat), got {type(loss).__name__}"
            )
        channels = int(channels or info.in_channels)
        self.save_hyperparameters(
            {
                "dataset": info.to_dict(),
                "image_size": image_size,
                "channels": channels,
                "base_channels": base_channels,
                "latent_channels": latent_channels,
                "depth": depth,
                "score": score,
                "blur_sigma": blur_sigma,
                "threshold": threshold,
            }
        )
        self.class_names = info.class_names
        self.net = AutoencoderDetector(
            ConvAutoencoder(channels, image_size, base_channels, latent_channels, depth), score, blur_sigma
        )
        self.loss = loss if loss is not None else MseFeatureLoss()
        self.threshold_mode = threshold
        self.init_scoring()
        self.val_pixels = CatMetric()
        self._val_pixel_count = 0

    @property
    def pixel_threshold(self) -> Tensor:
        """The heatmap threshold of :func:`segment` (NaN: not chosen yet), the torch model's buffer."""
        return self.net.pixel_threshold

    def heatmap_top(self) -> float | None:
        """Twice the pixel threshold (the map's unit: residual above it is defect)."""
        return twice_when_set(self.pixel_threshold)

    def forward(self, images: Tensor) -> AnomalyResult:
        """Image scores (N) and heatmaps (N×1×H×W) of images in [0, 1]."""
        return self.net(images)

    # ------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        images = normal_images(batch)
        if not len(images):
            return None
        x = self.net.prepare(images)
        loss = self.loss(x, self.net.autoencoder(x))
        self.log(
            "train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True
        )
        return loss

    # ---------------------------------------------------------------------- evaluation
    def score_batch(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor]:
        """Scores and heatmaps; in validation also ``val/loss`` on the normals and the heatmap
        pixels that set the pixel threshold."""
        images = batch["image"]
        x = self.net.prepare(images)
        x_hat = self.net.autoencoder(x)
        maps = self.net.heatmap(x, x_hat)
        scores = self.net.image_score(maps)
        normal = defect_free(batch)
        if split == "val":
            if normal.any():
                loss = self.loss(x[normal], x_hat[normal])
                self.log(
                    "val/loss",
                    loss,
                    on_step=False,
                    on_epoch=True,
                    batch_size=int(normal.sum()),
                    sync_dist=True,
                )
            if self._val_pixel_count < MAX_PIXELS:
                self.val_pixels.update(maps.flatten())
                self._val_pixel_count += maps.numel()
        if maps.shape[-2:] != images.shape[-2:]:
            maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return {"anomaly_maps": maps, "scores": scores}

    def choose_threshold(self, scores: Tensor, labels: Tensor) -> float:
        """Otsu's threshold of the validation scores, or the F1-optimal one; the pixel threshold
        (Otsu's of the validation heatmaps' pixels) is set beside it."""
        pixels = self.val_pixels.compute() if self.val_pixels.update_called else None
        if pixels is not None and pixels.numel():
            self.pixel_threshold.fill_(otsu_threshold(pixels))
        return otsu_threshold(scores) if self.threshold_mode == "otsu" else best_f1_threshold(scores, labels)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.val_pixels.reset()
        self._val_pixel_count = 0

    def predict_batch(self, images: Tensor) -> dict[str, Tensor]:
        result = self.net(images)
        return {
            "anomaly_maps": result.anomaly_map,
            "scores": result.score,
            "masks": segment(result.anomaly_map, self.pixel_threshold),
        }

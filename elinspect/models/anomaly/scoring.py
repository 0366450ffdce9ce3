"""What every thresholded anomaly model (PaDiM, GAN-AE, the autoencoder) evaluates alike.

Image scores and labels of a split are collected over the epoch (``CatMetric``, gathered
over DDP ranks); at the end the decision threshold — a persistent ``threshold`` buffer the
model sets its own way — turns them into ``{split}/{acc,f1,precision,recall}`` and the scores
into ``{split}/auroc`` (:func:`~elinspect.models.anomaly.thresholds.threshold_metrics`);
with ground-truth masks in the batches, ``{split}/pixel_auroc`` as well
(:class:`~elinspect.metrics.pixel.PixelAuroc`).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import CatMetric

from elinspect.metrics.pixel import PixelAuroc, pixel_auroc_value
from elinspect.models.anomaly.thresholds import threshold_metrics

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


class NonFiniteScoreError(RuntimeError):
    """An anomaly score is NaN or infinite: every metric and threshold built on it would be wrong."""


def check_finite_scores(
    scores: Tensor, batch: dict[str, Tensor], what: str, selected: Tensor | None = None
) -> None:
    """Raise :class:`NonFiniteScoreError` naming the batch's images whose ``scores`` are not finite.

    ``selected``: a boolean mask over the batch when ``scores`` belong to those items only.

    A NaN dropped silently (``CatMetric``'s default) would leave its label behind and shift
    every later pair; a NaN skipped by a percentile would set a threshold on fewer images.
    """
    bad = ~torch.isfinite(scores.detach())
    if not bool(bad.any()):
        return
    values = [float(v) for v in scores.detach()[bad][:5]]
    items = torch.arange(len(batch["image"])) if selected is None else selected.cpu().nonzero().flatten()
    rows = items[bad.cpu()].tolist()
    if "path" in batch:
        names = [str(batch["path"][i]) for i in rows]
    elif "index" in batch:
        names = [f"dataset row {int(batch['index'][i])}" for i in rows]
    else:
        names = [f"batch item {i}" for i in rows]
    raise NonFiniteScoreError(
        f"{what}: non-finite anomaly score ({', '.join(map(str, values))}) for "
        f"{len(rows)} image(s): {', '.join(names[:10])}{' …' if len(names) > 10 else ''}. Check these "
        "images (constant or corrupt ones can give a zero SSIM or variance) and the model's losses"
    )


class ThresholdedScoring:
    """Mixin for a LightningModule with a ``threshold`` buffer; call :meth:`init_scoring`
    in ``__init__`` and :meth:`update_scoring` from the val/test steps."""

    threshold: Tensor

    def init_scoring(self) -> None:
        self.scores = nn.ModuleDict({s: CatMetric(nan_strategy="error") for s in SPLITS})
        self.labels = nn.ModuleDict({s: CatMetric(nan_strategy="error") for s in SPLITS})
        self.pixel_auroc = nn.ModuleDict({s: PixelAuroc() for s in SPLITS})

    def update_scoring(self, split: str, scores: Tensor, batch: dict[str, Tensor], maps: Tensor) -> None:
        check_finite_scores(scores, batch, f"{type(self).__name__} {split}")
        self.scores[split].update(scores)
        self.labels[split].update(batch["label"].float())
        if "mask" in batch:
            self.pixel_auroc[split].update(maps, batch["mask"])

    def _collected(self, split: str) -> tuple[Tensor, Tensor] | None:
        """The epoch's (scores, labels > 0 as long) of ``split``, then reset; None if empty."""
        scores, labels = self.scores[split], self.labels[split]
        if not scores.update_called:
            return None
        out = scores.compute(), labels.compute().long()
        scores.reset()
        labels.reset()
        return out if out[0].numel() else None

    def _log_pixel_auroc(self, split: str) -> None:
        value = pixel_auroc_value(self.pixel_auroc[split], split)
        if value is not None:
            self.log(f"{split}/pixel_auroc", value)

    def on_test_epoch_end(self) -> None:
        self._log_pixel_auroc("test")
        collected = self._collected("test")
        if collected is None:
            return
        if not torch.isfinite(self.threshold):
            log.warning(
                "%s has no decision threshold (validate first): every test image counts as normal",
                type(self).__name__,
            )
        # the scores are gathered from every rank (torchmetrics): the values are the same on each
        self.log_dict(threshold_metrics(*collected, float(self.threshold), "test/"), sync_dist=True)

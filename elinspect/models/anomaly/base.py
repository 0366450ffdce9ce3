"""The base of every thresholded anomaly model (PaDiM, the autoencoder, GAN-AE) and the fit-once helpers.

:class:`AnomalyModule` owns what they do alike: the validation, test and predict steps, the
decision threshold (the torch model's persistent ``threshold`` buffer, saved in checkpoints and
exports) and the epoch-end metrics. A subclass says how it fits (its ``training_step``) and, where it differs from the
defaults, how it scores:

- :meth:`AnomalyModule.predict_batch` — by default the torch model's own call (its named result,
  :mod:`elinspect.models.results`) as ``{"scores", "anomaly_maps"[, "reconstructions"]}``; a
  subclass adds extra outputs (segmentation masks); ``pred`` (score ≥ threshold) is added here;
- :meth:`AnomalyModule.score_batch` — image scores and anomaly maps (at the images' size) of a
  val/test batch: by default :meth:`predict_batch`'s; a subclass may log what only it knows (a
  validation loss);
- :meth:`AnomalyModule.choose_threshold` — the threshold after a validation epoch from the
  epoch's scores and labels: by default the F1-optimal one; Otsu's, or None to keep the current
  one (GAN-AE sets its percentile threshold while fitting);
- :meth:`AnomalyModule.ready` — False while there is nothing to score with (PaDiM before its fit).

Image scores and labels of a split are collected over the epoch (``CatMetric``, gathered over
DDP ranks; an image the distributed sampler serves twice counts once where batches carry the
dataset's ``index``); at the end the threshold turns them into ``{split}/{acc,f1,precision,recall}`` and
the scores into ``{split}/auroc`` (:func:`~elinspect.models.anomaly.thresholds.threshold_metrics`);
without a threshold yet, ``val/auroc`` alone. With ground-truth masks in the batches,
``{split}/pixel_auroc`` as well (:class:`~elinspect.metrics.pixel.PixelAuroc`). Labels > 0 count
as defective.

Fit-once models (PaDiM's Gaussian, GAN-AE's calibration epoch) take no optimiser step in those
epochs: :func:`count_step_without_optimizer` keeps ``trainer.global_step`` moving so checkpoints
are saved, and :func:`fit_epoch_done` says when the epoch's batches are all seen.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.aggregation import CatMetric
from torchmetrics.functional.classification import binary_auroc

from elinspect.data.resumable import ResumableDataLoader
from elinspect.metrics.pixel import PixelAuroc, pixel_auroc_value
from elinspect.metrics.repeats import first_occurrences
from elinspect.models.anomaly.scoring import check_finite_scores
from elinspect.models.anomaly.thresholds import best_f1_threshold, threshold_metrics, to_unit_interval
from elinspect.models.base import ElinspectModule
from elinspect.models.results import AnomalyResult, Reconstruction
from elinspect.utils.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


def fit_epoch_done(trainer: L.Trainer) -> bool:
    """True in the validation that follows the last training batch of an epoch (not in the
    sanity check, nor in a mid-epoch validation of ``val_check_interval`` < 1)."""
    if trainer.state.fn != "fit" or trainer.sanity_checking:
        return False
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed >= trainer.num_training_batches


def resumes_mid_epoch(trainer: L.Trainer) -> bool:
    """Whether the running epoch's training loader resumed mid-epoch, serving only the batches
    a checkpoint had not seen (read once its first batch is out)."""
    loader = trainer.train_dataloader
    return isinstance(loader, ResumableDataLoader) and loader.sampler.skipped > 0


def count_step_without_optimizer(trainer: L.Trainer) -> None:
    """Count a batch that took no optimiser step as a step: with manual optimisation and no
    optimiser step ``trainer.global_step`` would stay put, and ModelCheckpoint never saves a run
    whose global step has not moved (anomalib's ModelCheckpoint subclass works around the same)."""
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


def log_pixel_auroc(module: L.LightningModule, metric: PixelAuroc, split: str) -> None:
    """Log ``{split}/pixel_auroc`` when the epoch's batches carried ground-truth masks."""
    value = pixel_auroc_value(metric, split)
    if value is not None:
        module.log(f"{split}/pixel_auroc", value)


# the predict step's name of each field of a torch model's result
PREDICT_KEYS = {"score": "scores", "anomaly_map": "anomaly_maps", "reconstruction": "reconstructions"}


def predict_outputs(result: AnomalyResult | Reconstruction) -> dict[str, Tensor]:
    """A torch model's named result under the predict step's names (``scores``, ``anomaly_maps``,
    ``reconstructions``)."""
    return {PREDICT_KEYS[name]: value for name, value in result._asdict().items()}


class AnomalyModule(ElinspectModule):
    """A LightningModule that scores images for anomalies and thresholds the scores (see the
    module docstring). Subclasses call :meth:`init_scoring` in ``__init__``."""

    task: ClassVar[str] = "anomaly"

    @property
    def threshold(self) -> Tensor:
        """The decision threshold on the image score (NaN: not chosen yet): a buffer of the
        torch model, so it travels with it into checkpoints and exports."""
        return self.torch_model.threshold

    def init_scoring(self) -> None:
        """The epoch collectors; refuses data of more than two classes (``self.class_names``, set
        before): the scores rank normal against defective (labels ``> 0``), and a prediction names
        its label 1 by the data's second class."""
        if len(self.class_names) != 2:
            raise ConfigError(
                f"{type(self).__name__} scores images as normal or defective, but the data gives "
                f"{len(self.class_names)} classes {list(self.class_names)}: use two classes "
                "(ELPV: data.target=binary)"
            )
        self.scores = nn.ModuleDict({s: CatMetric(nan_strategy="error") for s in SPLITS})
        self.labels = nn.ModuleDict({s: CatMetric(nan_strategy="error") for s in SPLITS})
        self.indices = nn.ModuleDict({s: CatMetric(nan_strategy="error") for s in SPLITS})
        self.pixel_auroc = nn.ModuleDict({s: PixelAuroc() for s in SPLITS})

    # ------------------------------------------------------------ what a subclass says
    def ready(self) -> bool:
        """Whether there is anything to score with yet."""
        return True

    def score_batch(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor]:
        """``{"scores": N, "anomaly_maps": N×1×H×W}`` of a val/test batch, maps at the images' size."""
        return self.predict_batch(batch["image"])

    def predict_batch(self, images: Tensor) -> dict[str, Tensor]:
        """``scores`` and ``anomaly_maps`` of images in [0, 1], and any extra outputs: the
        torch model's result."""
        return predict_outputs(self.torch_model(images))

    def choose_threshold(self, scores: Tensor, labels: Tensor) -> float | None:
        """The threshold after a validation epoch (not the sanity check): the F1-optimal one on
        the epoch's scores; None keeps the current one."""
        return best_f1_threshold(scores, labels)

    # --------------------------------------------------------------------------- steps
    def update_scoring(self, split: str, scores: Tensor, batch: dict[str, Tensor], maps: Tensor) -> None:
        check_finite_scores(scores, batch, f"{type(self).__name__} {split}")
        self.scores[split].update(scores)
        self.labels[split].update(batch["label"].float())
        if "index" in batch:  # the dataset's sample index: repeats are counted once (see _collected)
            self.indices[split].update(torch.as_tensor(batch["index"], device=scores.device).double())
        if "mask" in batch:
            self.pixel_auroc[split].update(maps, batch["mask"])

    def evaluate(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor] | None:
        if not self.ready():  # e.g. the sanity check before PaDiM's fit
            return None
        out = self.score_batch(batch, split)
        self.update_scoring(split, out["scores"], batch, out["anomaly_maps"])
        return {"anomaly_maps": out["anomaly_maps"], "scores": out["scores"]}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor] | None:
        return self.evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor] | None:
        return self.evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        out = self.predict_batch(batch["image"])
        return {**out, "pred": (out["scores"] >= self.threshold).long()}

    # ----------------------------------------------------------------------- epoch ends
    def _collected(self, split: str) -> tuple[Tensor, Tensor] | None:
        """The epoch's (scores, labels > 0 as long) of ``split``, each image once, then reset;
        None if empty. Under DDP the distributed sampler pads the last batches with samples
        already served; where every batch carried the dataset's ``index``, a repeated index
        counts once (its first score)."""
        scores, labels, indices = self.scores[split], self.labels[split], self.indices[split]
        if not scores.update_called:
            return None
        out = scores.compute(), labels.compute().long()
        if indices.update_called:
            index = indices.compute()
            if len(index) == len(out[0]):
                keep = first_occurrences(index)
                out = out[0][keep], out[1][keep]
        for metric in (scores, labels, indices):
            metric.reset()
        return out if out[0].numel() else None

    def _log_pixel_auroc(self, split: str) -> None:
        log_pixel_auroc(self, self.pixel_auroc[split], split)

    def on_validation_epoch_end(self) -> None:
        self._log_pixel_auroc("val")
        collected = self._collected("val")
        if collected is None:
            return
        scores, labels = collected
        if not self.trainer.sanity_checking:
            chosen = self.choose_threshold(scores, labels)
            if chosen is not None:
                self.threshold.fill_(chosen)
        # the scores are gathered from every rank (torchmetrics): the values are the same on each
        if torch.isfinite(self.threshold):
            metrics = threshold_metrics(scores, labels, float(self.threshold), "val/")
            # undefined on a split of one class; a monitor must still be logged: NaN ranks lowest
            metrics.setdefault("val/auroc", torch.tensor(float("nan"), device=scores.device))
            self.log_dict(metrics, prog_bar=True, sync_dist=True)
            self.log("val/threshold", self.threshold)
            return
        target = (labels > 0).long()
        if 0 < int(target.sum()) < len(target):
            self.log(
                "val/auroc", binary_auroc(to_unit_interval(scores), target), prog_bar=True, sync_dist=True
            )

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
        self.log_dict(threshold_metrics(*collected, float(self.threshold), "test/"), sync_dist=True)

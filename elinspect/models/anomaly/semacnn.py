"""SeMaCNN (``semacnn.txt`` §2.2): PaDiM anomaly heatmaps classified by a ResNet-18.

"The unsupervised anomaly detection algorithm based on PaDiM produces an anomaly heatmap
[…] passed to the defects classifier. The classifier consists of a neural network trained
via supervised learning on manually annotated subset of images that separates generated
heatmaps into classes" (§2.2; PaDiM: Defard et al. 2021; embedding: §2.2.2). Two stages
in one Lightning run:

* **Stage 1** (epoch 0 of a fresh run): PaDiM's Gaussians are fitted on the *normal*
  (label 0) training images, exactly as :class:`~elinspect.models.anomaly.padim_module.PadimModule`
  does (streaming sums, reduced over DDP ranks, finalised before the epoch's validation);
  no optimiser step is taken (``training_step`` returns None).
* **Stage 2** (epochs 1…N): the frozen PaDiM turns every labelled training image (all
  labels) into a heatmap; the classifier (:class:`ImageClassifier`, 1 input channel — or 2,
  heatmap and grey image, with ``heatmap_with_image``) is trained on it with ``loss``.
  The optimiser sees only the classifier's parameters (PaDiM's backbone is frozen).

:attr:`SemaCnnModule.stage` is derived from the persistent buffers (PaDiM's ``fitted`` and
``heatmap_scale``), so a run resumed from a checkpoint saved after stage 1 continues with
stage 2 and never refits; the run builder sets ``trainer.max_epochs`` to 1 + ``classifier_epochs``
(:meth:`SemaCnnModule.stage_epochs`).

**Heatmap scale.** The classifier sees ``map / heatmap_scale``, where ``heatmap_scale`` (a
persistent buffer) is the ``scale_quantile`` (0.99) quantile of the anomaly-map pixels of
the first ``scale_images`` normal training images of stage 1, computed right after the fit
(the mean over DDP ranks). Those images are in the fit, so their distances are slightly
smaller than an unseen normal image's; the point is only a fixed, data-derived unit that
puts normal maps near [0, 1] (the paper does not say how heatmaps are normalised).

**Heatmap size.** The anomaly map is computed on PaDiM's ``feature_size`` grid (64×64, the
paper's) and upsampled to the input for display and pixel metrics; ``heatmap_size`` (64 in
``conf/model/semacnn.yaml``) resizes it back for the classifier, which then costs a fraction
of a classifier on the full-size map (about 7× less at 224 px input) and sees the same
information. The paper does not state the classifier's input size.

Validation/test log ``{val,test}/{loss,acc,f1,precision,recall,auroc}`` as the classifier
does. The validation of epoch 0 (the fit epoch) comes before any classifier step: it only
makes heatmaps (for the visuals and pixel AUROC) and logs the monitored metric as NaN, so
that checkpointing never keeps the untrained classifier as the best; and
``{val,test}/pixel_auroc`` of PaDiM's maps when batches carry ground-truth ``mask``s
(``data=folder`` with a mask directory; see :mod:`elinspect.metrics.pixel`). Stage 2 needs
defective training images: with ``data.train_normal_only=true`` a warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from elinspect.data.info import DatasetInfo
from elinspect.data.normals import unaugmented_normal_images
from elinspect.metrics.pixel import PixelAuroc
from elinspect.models.anomaly.base import fit_epoch_done, log_pixel_auroc
from elinspect.models.anomaly.heatmap_classifier import SemaCnn
from elinspect.models.anomaly.padim import Padim
from elinspect.models.anomaly.padim_module import PadimFitMixin
from elinspect.models.base import ElinspectModule, twice_when_set
from elinspect.models.classification.module import class_outputs, classification_metrics, score_and_log
from elinspect.utils.errors import ConfigError

log = logging.getLogger(__name__)


class SemaCnnModule(PadimFitMixin, ElinspectModule):
    """PaDiM heatmaps → ResNet classifier, in two stages (see the module docstring).

    Args:
        padim: the torch :class:`Padim` (``model.padim``).
        net: a partial of the classifier taking ``num_classes`` and ``in_channels``
            (``elinspect.models.classification.ImageClassifier``).
        dataset: the datamodule's :class:`DatasetInfo` (classes).
        optimizer, scheduler: partials for the classifier's optimiser and its schedule.
        loss: the classification loss (cross-entropy when None).
        eps: ε of PaDiM's covariance regulariser.
        heatmap_with_image: feed the grey image as a second channel beside the heatmap.
        scale_quantile: the quantile of normal-map pixels that becomes the heatmap unit.
        scale_images: how many normal training images of stage 1 the scale is taken from.
        heatmap_size: the side the classifier reads the heatmap at (``None``: the input
            image's size). The map's information lives on PaDiM's ``feature_size`` grid, so
            reading it there costs far less than at the input size (see the module docstring).
        classifier_epochs: stage 2's epochs; when set, the run builder makes
            ``trainer.max_epochs`` ``1 + classifier_epochs`` (``None``: the trainer's).
    """

    task: ClassVar[str] = "anomaly"
    model_attr: ClassVar[str] = "model"
    padim_key: ClassVar[str] = "model.padim"
    # checkpoints from before the parts moved into the torch model (SemaCnn), and PaDiM's own
    # threshold (unused here) that they predate
    legacy_keys: ClassVar[dict[str, str]] = {
        "padim": "model.padim",
        "net": "model.net",
        "heatmap_scale": "model.heatmap_scale",
    }
    added_keys: ClassVar[tuple[str, ...]] = ("model.padim.threshold",)
    # the heatmap scale is a statistic of training images applied to unaugmented test maps
    extra_inputs: ClassVar[frozenset[str]] = frozenset({"unaugmented"})

    def __init__(
        self,
        padim: Padim,
        net: Callable[..., nn.Module],
        dataset: DatasetInfo | dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        loss: nn.Module | None = None,
        eps: float = 0.01,
        heatmap_with_image: bool = False,
        scale_quantile: float = 0.99,
        scale_images: int = 32,
        heatmap_size: int | None = None,
        classifier_epochs: int | None = None,
        monitor: str = "val/f1",
        monitor_mode: str = "max",
    ) -> None:
        super().__init__(optimizer, scheduler, monitor, monitor_mode)
        info = DatasetInfo.from_dict(dataset)
        self.save_hyperparameters(
            {
                "dataset": info.to_dict(),
                "eps": eps,
                "heatmap_with_image": heatmap_with_image,
                "scale_quantile": scale_quantile,
                "scale_images": scale_images,
                "heatmap_size": heatmap_size,
                "classifier_epochs": classifier_epochs,
                "monitor": monitor,
                "monitor_mode": monitor_mode,
            }
        )
        self.class_names = info.class_names
        self.eps = float(eps)
        self.scale_quantile = float(scale_quantile)
        self.scale_images = int(scale_images)
        if classifier_epochs is not None and classifier_epochs < 1:
            raise ConfigError(f"model.classifier_epochs must be null or >= 1, got {classifier_epochs}")
        self.classifier_epochs = classifier_epochs
        classifier = net(num_classes=info.num_classes, in_channels=2 if heatmap_with_image else 1)
        self.model = SemaCnn(padim, classifier, heatmap_with_image, heatmap_size)
        self.loss = loss if loss is not None else nn.CrossEntropyLoss()
        self.binary = info.num_classes == 2
        metrics = classification_metrics(info.num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.pixel_auroc = nn.ModuleDict({s: PixelAuroc() for s in ("val", "test")})
        if len(info.class_counts) > 1 and sum(info.class_counts[1:]) == 0:
            log.warning(
                "the training split has no defective image (data.train_normal_only=true?): "
                "the stage-2 heatmap classifier will learn a single class"
            )
        self._scale_batch: list[Tensor] = []  # normal images of stage 1 kept for the scale
        self._classifier_untrained = False  # set for the validation of the fit epoch
        self._unscored_epoch: int | None = None  # the epoch whose monitor is a NaN placeholder
        self._fit_epoch: int | None = None  # the epoch that fitted PaDiM (None after a resume)

    # ------------------------------------------------------------- the torch model's parts
    @property
    def padim(self) -> Padim:
        return self.model.padim

    @property
    def net(self) -> nn.Module:
        """The heatmap classifier."""
        return self.model.net

    @property
    def heatmap_scale(self) -> Tensor:
        """The heatmap unit (NaN until stage 1 sets it), the torch model's buffer."""
        return self.model.heatmap_scale

    @property
    def heatmap_with_image(self) -> bool:
        return self.model.heatmap_with_image

    @property
    def heatmap_size(self) -> int | None:
        return self.model.heatmap_size

    # ---------------------------------------------------------------------------- stages
    @property
    def stage(self) -> int:
        """1 while PaDiM is not fitted (epoch 0 of a fresh run), else 2 (classifier training).

        Read off the persistent buffers, so a checkpoint saved after stage 1 resumes at 2.
        """
        fitted = bool(self.padim.fitted) and bool(torch.isfinite(self.heatmap_scale))
        return 2 if fitted else 1

    def anomaly_maps(self, images: Tensor) -> Tensor:
        """Raw anomaly maps N×1×H×W (what the heatmap visuals draw)."""
        return self.model.anomaly_maps(images)

    def classifier_input(self, maps: Tensor, images: Tensor) -> Tensor:
        """The classifier's input (:meth:`SemaCnn.classifier_input`)."""
        return self.model.classifier_input(maps, images)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits N×num_classes of images in [0, 1] (PaDiM fitted; what Grad-CAM explains)."""
        return self.model(images).logits

    def heatmap_top(self) -> float | None:
        """Twice the heatmap unit (the 0.99 quantile of normal training maps)."""
        return twice_when_set(self.heatmap_scale)

    def stage_epochs(self) -> dict[str, int] | None:
        if self.classifier_epochs is None:
            return None
        return {"PaDiM fit": 1, "classifier": self.classifier_epochs}

    # ------------------------------------------------------------------ stage 1: the fit
    def _keep_for_scale(self, batch: dict[str, Tensor]) -> None:
        kept = sum(len(t) for t in self._scale_batch)
        if kept < self.scale_images:
            normal = unaugmented_normal_images(batch, once=True)[: self.scale_images - kept]
            if len(normal):
                self._scale_batch.append(normal.detach())

    def _finish_stage_one(self) -> None:
        """Fit PaDiM (if pending), then set ``heatmap_scale`` from the kept normal images."""
        if self.stage == 2:
            return
        self.finish_padim_fit()
        with torch.no_grad():
            pixels = [self.padim.anomaly_maps(images).flatten().double() for images in self._scale_batch]
        self._scale_batch = []
        # per rank: the quantile and 1, or 0 and 0 for a rank without normal images; then the mean
        total = torch.zeros(2, dtype=torch.float64, device=self.heatmap_scale.device)
        if pixels:
            total[0] = torch.quantile(torch.cat(pixels)[:16_000_000], self.scale_quantile)
            total[1] = 1
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        if total[1] < 1:
            raise RuntimeError("SeMaCNN stage 1 kept no normal image to scale the heatmaps by")
        self.heatmap_scale.fill_(float((total[0] / total[1]).clamp_min(1e-6)))
        log.info("SeMaCNN stage 1 done: heatmap scale %.4g", float(self.heatmap_scale))

    def on_validation_epoch_start(self) -> None:
        if fit_epoch_done(self.trainer) and self.stage == 1:
            self._finish_stage_one()
            # this validation comes before any classifier step; under fast_dev_run (no
            # checkpointing, one batch of everything) the classifier is scored all the same
            self._classifier_untrained = not self.trainer.fast_dev_run

    def on_train_epoch_end(self) -> None:
        self._finish_stage_one()

    # ---------------------------------------------------------- stage 2 and evaluation
    def _step(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, anomaly maps and class probabilities; metrics updated and logged."""
        result = self.model(batch["image"])
        loss, probs = score_and_log(self, result, batch["label"], split)
        if split != "train" and "mask" in batch:
            self.pixel_auroc[split].update(result.anomaly_map, batch["mask"])
        return loss, result.anomaly_map, probs

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.stage == 1:
            self._fit_epoch = self.current_epoch
            if not self.padim.is_fitted:
                self.padim_update(batch)
            self._keep_for_scale(batch)
            # A zero that reaches every trainable parameter: DistributedDataParallel expects a
            # backward through all of them at each step, and Lightning refuses a None loss in
            # distributed training. optimizer_step below skips the update itself.
            return (
                sum(
                    (p.sum() for p in self.parameters() if p.requires_grad),
                    torch.zeros((), device=self.device),
                )
                * 0.0
            )
        return self._step(batch, "train")[0]

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Stage 1 runs the step's closure (forward, the zero backward) and no update, so the
        classifier (and the optimiser's state: momentum, weight decay) starts stage 2 untouched."""
        if self.stage == 1:
            optimizer_closure()
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    def lr_scheduler_step(self, scheduler: Any, metric: Any | None) -> None:
        """The schedule belongs to stage 2: it does not step after the fit epoch, which took no
        optimiser step (torch warns about that order, and the classifier's first epoch would
        start part-way down the schedule); ``T_max`` counts classifier epochs only."""
        if self.current_epoch == self._fit_epoch:
            return
        super().lr_scheduler_step(scheduler, metric)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor] | None:
        if self.stage == 1:  # the sanity check before the fit
            return None
        if self._classifier_untrained:  # the fit epoch: heatmaps for the visuals, no metrics
            maps = self.anomaly_maps(batch["image"])
            if "mask" in batch:
                self.pixel_auroc["val"].update(maps, batch["mask"])
            return {"anomaly_maps": maps}
        return {"anomaly_maps": self._step(batch, "val")[1]}

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        if self.stage == 1:
            raise RuntimeError("SeMaCNN is not fitted: train it (stage 1 fits PaDiM) before testing")
        _, maps, probs = self._step(batch, "test")
        return {"anomaly_maps": maps, **class_outputs(probs)}  # kept by the test-predictions callback

    def _log_pixel_auroc(self, split: str) -> None:
        log_pixel_auroc(self, self.pixel_auroc[split], split)

    def on_validation_epoch_end(self) -> None:
        self._log_pixel_auroc("val")
        if self._classifier_untrained:
            # The classifier has not been trained yet: its scores would be those of a random
            # network (an all-"defective" guess scores a fine F1), and model checkpointing would
            # keep that epoch as the best. NaN ranks last for ModelCheckpoint in either mode.
            self._classifier_untrained = False
            if not self.trainer.sanity_checking:
                self.log(self.monitor, float("nan"))
                self._unscored_epoch = self.current_epoch

    def scores_monitor(self) -> bool:
        """False in the PaDiM fit epoch, whose monitor is the NaN placeholder."""
        return self.current_epoch != self._unscored_epoch

    def on_test_epoch_end(self) -> None:
        self._log_pixel_auroc("test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        result = self.model(batch["image"])
        return {"anomaly_maps": result.anomaly_map, **class_outputs(result.probabilities)}

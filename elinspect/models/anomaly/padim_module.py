"""LightningModule that fits PaDiM (Defard et al. 2021) and evaluates it as an image classifier.

The first half of SeMaCNN (``semacnn.txt`` §2.2.2): "a set of images without defects has
been selected as a training subset. Training procedure consisted of creating a normal
distribution of a dataset". Here:

* **Training is fitting.** Every training batch's *normal* images (label 0) go to
  :meth:`Padim.update` (streaming Σx, Σxxᵀ, n); the others are ignored, so ``data=elpv``
  works with or without ``data.train_normal_only``. They are the training split's images as
  the datamodule serves them, augmented where its ``augment`` is on (ELPV's flips and
  rotation): SeMaCNN §2.2.2 fits "after applying augmentation"; Defard et al.'s PaDiM does not
  augment (``data.augment=null`` for that). There is no optimiser (manual
  optimisation, ``configure_optimizers`` returns None) and no gradient; each fitted batch
  counts as a step of ``trainer.global_step`` (so checkpoints are saved).
* **One epoch fits; the fit is done once.** At the start of the first validation after the
  training batches (or at the end of the epoch when no validation runs) the sums are summed
  over ranks (DDP) and :meth:`Padim.finalize` turns them into the Gaussians. The module then
  asks the trainer to stop (``trainer.should_stop``, honoured after ``trainer.min_epochs``);
  any further epoch only re-validates — the Gaussians are never refitted, so the result does
  not depend on ``trainer.max_epochs``. A checkpoint saved inside the fitting epoch holds the
  running sums too, so a run resumed from it (its loader serving the rest of the epoch) fits
  on every image, as an uninterrupted one does.
* **Threshold.** Image score = maximum of the anomaly map. After every validation epoch the
  threshold that maximises F1 on the validation scores is stored in the persistent buffer
  ``threshold`` (so it is saved in checkpoints); ``val/{acc,f1,precision,recall}`` are
  reported at it and ``val/auroc`` on the scores. Test uses the stored threshold.
  Labels > 0 count as defective (ELPV's four-class targets too).
* **Pixel AUROC.** When batches carry ground-truth ``mask``s (``data=folder`` with a mask
  directory), the anomaly maps and masks of every val/test pixel are collected and
  ``{val,test}/pixel_auroc`` is logged (exact, see :mod:`elinspect.metrics.pixel` for memory).
* The ``loss`` argument (every model config has a ``default_loss``) is kept as a submodule
  for uniformity but is **unused**: PaDiM has no supervised objective.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from elinspect.data.info import DatasetInfo
from elinspect.data.normals import normal_images
from elinspect.models.anomaly.base import (
    AnomalyModule,
    count_step_without_optimizer,
    fit_epoch_done,
    resumes_mid_epoch,
)
from elinspect.models.anomaly.padim import Padim
from elinspect.models.base import twice_when_set
from elinspect.models.results import AnomalyResult

log = logging.getLogger(__name__)

# By design, not a problem: the fit epoch returns no loss (no optimiser step), and PaDiM's
# frozen backbone stays in eval mode while the rest trains. Lightning warns of both.
warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


FIT_SUMS_KEY = "padim_fit_sums"  # the checkpoint entry of a fit saved mid-epoch


class PadimFitMixin:
    """Fits ``self.padim`` on the normal images of the first training epoch (shared by PaDiM
    and SeMaCNN). The host sets ``self.padim`` and ``self.eps``, and ``padim_key`` where PaDiM
    sits deeper than ``self.padim`` in its state dict."""

    padim: Padim
    eps: float
    padim_key: ClassVar[str] = "padim"

    def setup(self, stage: str) -> None:
        """Keep PaDiM's state out of DistributedDataParallel's buffer broadcast.

        DDP copies rank 0's buffers to every rank before each forward (``broadcast_buffers``),
        re-reading the module's buffers each time: the running sums, allocated as buffers by
        the first :meth:`Padim.update`, would be overwritten by rank 0's before every batch, and
        the reduction at the end of the fit would add up copies of rank 0's sums. The fitted
        Gaussian (mean, L⁻¹: 165 MB at P = 4096, k = 100) would be sent again at every step.
        PaDiM's state is either per rank by design (the sums, reduced explicitly) or the same on
        every rank (the rest), so none of it is DDP's to synchronise. (SeMaCNN's classifier
        trains, so Lightning wraps the module in DDP; PaDiM alone is not wrapped.)
        """
        super().setup(stage)  # type: ignore[misc]
        names = [name for name, _ in self.padim.named_parameters()]
        names += [name for name, _ in self.padim.named_buffers()]
        names += list(self.padim.running_sum_names)  # allocated later, by the first update()
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, sorted({f"{self.padim_key}.{name}" for name in names})
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved in the middle of the fitting epoch also holds the running sums
        (not buffers of the state dict: 168 MB at P = 4096, k = 100, needed only then)."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if not self.padim.is_fitted and self.padim.sum_x is not None:
            names = ("sum_x", "sum_xx", "count")
            checkpoint[FIT_SUMS_KEY] = {
                n: t.detach().cpu().clone() for n, t in zip(names, self.padim.sums(), strict=True)
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        self._resumed_sums = checkpoint.get(FIT_SUMS_KEY)

    def _restore_resumed_sums(self) -> None:
        """At the first batch after a mid-fit resume: the saved sums join the fit when the loader
        serves the rest of the epoch (:class:`ResumableDataLoader`); a loader that starts the
        epoch again refits from its first batch, so they are dropped."""
        sums, self._resumed_sums = self._resumed_sums, None
        if resumes_mid_epoch(self.trainer):  # type: ignore[attr-defined]
            self.padim.load_sums(sums["sum_x"], sums["sum_xx"], sums["count"])
            log.info("PaDiM's fit goes on from the checkpoint's sums of %d normal images", int(sums["count"]))
        else:
            log.warning(
                "the checkpoint holds PaDiM's sums of %d normal images from the middle of its fitting "
                "epoch, but the training loader starts the epoch again: the fit starts again too",
                int(sums["count"]),
            )

    def padim_update(self, batch: dict[str, Tensor]) -> int:
        """Add the batch's defect-free images to the running sums, each image once (not the
        repeats a DDP training loader pads with); returns how many."""
        if getattr(self, "_resumed_sums", None) is not None:  # the first batch after a mid-fit resume
            self._restore_resumed_sums()
        normal = normal_images(batch, once=True)  # DDP's padding repeats are left out
        if len(normal):
            self.padim.update(normal)
        return len(normal)

    def finish_padim_fit(self) -> bool:
        """Reduce the sums over ranks and finalize, if a fit is pending; True if it fitted now."""
        if self.padim.is_fitted:
            return False
        trainer = self.trainer  # type: ignore[attr-defined]
        sum_x, sum_xx, count = self.padim.sums()  # every rank allocates, so the reduction matches
        if trainer.world_size > 1:
            reduce = trainer.strategy.reduce
            sum_x, sum_xx, count = (reduce(t, reduce_op="sum") for t in (sum_x, sum_xx, count))
            self.padim.load_sums(sum_x, sum_xx, count)
        if float(count) < 2:
            raise RuntimeError(
                f"PaDiM saw {int(count)} normal (label 0) training image(s) in its fitting epoch and needs "
                "at least 2: train on more batches, or use data.train_normal_only=true"
            )
        log.info("fitting PaDiM on %d normal images", int(count))
        self.padim.finalize(self.eps)
        self.padim.reset()
        return True


class PadimModule(PadimFitMixin, AnomalyModule):
    """PaDiM as a LightningModule (see the module docstring); the torch :class:`Padim` owns
    inference and the threshold.

    Args:
        padim: the torch :class:`Padim` (``model.padim`` in ``conf/model/padim.yaml``).
        dataset: the datamodule's :class:`DatasetInfo` (for the class names).
        loss: unused (kept for the ``loss`` axis of the configs).
        eps: ε of the covariance regulariser Σ + ε·I (PaDiM: 0.01).
        optimizer, scheduler: unused; PaDiM has nothing to train.
    """

    model_attr: ClassVar[str] = "padim"
    legacy_keys: ClassVar[dict[str, str]] = {"threshold": "padim.threshold"}  # before the threshold moved

    def __init__(
        self,
        padim: Padim,
        dataset: DatasetInfo | dict[str, Any],
        loss: nn.Module | None = None,
        eps: float = 0.01,
        optimizer: Any = None,
        scheduler: Any = None,
        monitor: str = "val/auroc",
        monitor_mode: str = "max",
    ) -> None:
        super().__init__(optimizer, None, monitor, monitor_mode)
        info = DatasetInfo.from_dict(dataset)
        self.save_hyperparameters(
            {"dataset": info.to_dict(), "eps": eps, "monitor": monitor, "monitor_mode": monitor_mode}
        )
        self.automatic_optimization = False
        self.class_names = info.class_names
        self.padim = padim
        self.eps = float(eps)
        self.loss = loss  # unused: PaDiM has no supervised objective
        self.init_scoring()

    def configure_optimizers(self) -> None:
        return None

    def forward(self, images: Tensor) -> AnomalyResult:
        """Image scores N and anomaly maps N×1×H×W."""
        return self.padim(images)

    def anomaly_maps(self, images: Tensor) -> Tensor:
        """Anomaly maps N×1×H×W (what the heatmap visuals draw)."""
        return self.padim.anomaly_maps(images)

    def heatmap_top(self) -> float | None:
        """Twice the image threshold: the image score is the map's maximum, so the threshold is
        the map's unit too."""
        return twice_when_set(self.threshold)

    # ------------------------------------------------------------------------------ fit
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.padim.is_fitted:
            return
        seen = self.padim_update(batch)
        # summed over the epoch's batches and (sync_dist) over DDP ranks: the images the fit saw
        self.log(
            "train/normal_images", float(seen), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True
        )
        count_step_without_optimizer(self.trainer)

    def on_validation_epoch_start(self) -> None:
        if fit_epoch_done(self.trainer) and self.finish_padim_fit():
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        if self.finish_padim_fit():
            self.trainer.should_stop = True

    # ------------------------------------------------------------------------- evaluate
    def ready(self) -> bool:
        return self.padim.is_fitted  # the sanity check before the fit has nothing to score with

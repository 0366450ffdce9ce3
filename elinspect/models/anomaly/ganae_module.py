"""GAN-AE as a LightningModule (``gan-ae.txt`` §II; DESIGN.md §2): WGAN-GP, then an encoder,
then the anomaly score's threshold, in one run with manual optimisation.

The schedule is read off the epoch (like :class:`~elinspect.models.anomaly.semacnn.SemaCnnModule`
derives its stage), so a checkpoint saved anywhere in the run resumes in the right stage:

* **Stage 1, ``generator``** (epochs ``0 … generator_epochs − 1``, §II.A): WGAN-GP on the
  normal (label 0) images of each batch — every batch is one critic step
  (eq. 2: E[D(G(z))] − E[D(x)] + λ·E[(‖∇D(x̃)‖₂ − K)²], λ = 10, K = 1), every ``n_critic``-th
  critic step is followed by one generator step (eq. 1: −E[D(G(z))]); Adam for both
  (Gulrajani et al. 2017, Alg. 1: lr 1e-4, β = (0, 0.9), n_critic = 5 — the paper says only
  "Adam"). The encoder is not touched.
* **Stage 2, ``encoder``** (the next ``encoder_epochs``, §II.B): generator and critic frozen
  (``requires_grad`` off, eval mode: the generator's batch-norm statistics do not move
  either); the encoder is trained on the normal images through x̂ = G(E(x)) with ``loss``
  (``loss=ssim_feat``, eq. 3, the default; or ``loss=mse_feat``), f = the critic's
  penultimate features.
* **Calibration** (one more epoch, with ``threshold=percentile``, §II.C: "We obtain a
  threshold for anomaly scores based on the whole normal images used for training"): every
  network frozen, the final model scores the training split's normal images; the threshold
  is the ``threshold_percentile`` of those scores (default 95: the paper does not say which
  statistic; the maximum (100) would hang on the single most unusual training cell, and ELPV's
  p = 0 cells include some a second rater might call defective). It is set before that
  epoch's validation, so the checkpoint saved after it holds it; a checkpoint saved inside the
  epoch holds the scores so far, so a resumed calibration still takes every normal's. With ``threshold=f1`` there
  is no calibration epoch: after every validation of stage 2 the threshold is the F1-optimal
  one on the validation scores (labels used; as PaDiM/SeMaCNN here).

The run builder replaces ``trainer.max_epochs`` by ``generator_epochs + encoder_epochs (+ 1)``
(:meth:`GanAeModule.stage_epochs`; logged); set the stage lengths with ``model.generator_epochs`` / ``model.encoder_epochs``.
Under ``trainer.fast_dev_run`` the one training batch runs every stage once (a critic, a
generator and an encoder step, then calibration), so a smoke test reaches test metrics.

**Stages by config.** ``stages=both`` (default) runs the schedule above; ``stages=generator``
only stage 1 (a stage-1 checkpoint); ``stages=encoder`` only stage 2 (+ calibration) starting
from the generator and critic of ``generator_ckpt`` (any checkpoint of this module whose
generator was trained), loaded when the fit starts unless the run resumes a checkpoint that
already has them. Resuming a ``stages=generator`` checkpoint with ``stages=both`` and
``ckpt_path=…`` continues at stage 2 as well (the epoch says where it is).

**Scores** (eq. 6 ``score=mse_feat``, eq. 7 ``score=mse_ssim_feat``, sign corrected):
:class:`~elinspect.models.anomaly.ganae.GanAe`. The threshold is the persistent buffer
``threshold`` (saved in checkpoints; test and predict use it, never refit it). Labels > 0
count as defective. ``validation_step``/``predict_step`` return ``anomaly_maps`` = |x − x̂|
at the data's resolution (drawn by ``callbacks=anomaly``; with ground-truth ``mask``s in the
batches, ``data=folder``, ``{val,test}/pixel_auroc`` is logged on them); sample grids and reconstructions
are saved every ``samples_every_n_epochs`` by :class:`~elinspect.callbacks.ganae_samples.GanAeSamplesCallback`
(added by :meth:`configure_callbacks`). There is no model selection (the paper trains fixed
epochs): ``monitor`` is null, so the checkpoint tested is the last one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.aggregation import CatMetric

from elinspect.callbacks.ganae_samples import GanAeSamplesCallback
from elinspect.data.info import DatasetInfo
from elinspect.data.normals import defect_free, normal_images, unaugmented_normal_images
from elinspect.losses.reconstruction import ReconstructionLoss, SsimFeatureLoss
from elinspect.models.anomaly.base import (
    AnomalyModule,
    count_step_without_optimizer,
    fit_epoch_done,
    resumes_mid_epoch,
)
from elinspect.models.anomaly.ganae import GanAe, Norm, ScoreKind, critic_loss, generator_loss
from elinspect.models.anomaly.scoring import check_finite_scores
from elinspect.models.anomaly.thresholds import (
    best_f1_threshold,
    percentile_threshold,
)
from elinspect.models.results import Reconstruction
from elinspect.utils.errors import ConfigError

log = logging.getLogger(__name__)

Stage = Literal["generator", "encoder", "calibrate", "done"]
STAGE_CHOICES = {"both": ("generator", "encoder"), "generator": ("generator",), "encoder": ("encoder",)}
THRESHOLDS = ("percentile", "f1")
CALIBRATION_SCORES_KEY = "ganae_calibration_scores"  # the checkpoint entry of a calibration saved mid-epoch


@dataclass(frozen=True)
class Schedule:
    """Which epochs belong to which stage."""

    generator_epochs: int
    encoder_epochs: int
    calibrate: bool

    @property
    def total(self) -> int:
        return self.generator_epochs + self.encoder_epochs + int(self.calibrate)

    @property
    def stages(self) -> tuple[Stage, ...]:
        out: list[Stage] = []
        if self.generator_epochs:
            out.append("generator")
        if self.encoder_epochs:
            out.append("encoder")
        if self.calibrate:
            out.append("calibrate")
        return tuple(out)

    def stage_at(self, epoch: int) -> Stage:
        if epoch < self.generator_epochs:
            return "generator"
        if epoch < self.generator_epochs + self.encoder_epochs:
            return "encoder"
        if self.calibrate and epoch == self.generator_epochs + self.encoder_epochs:
            return "calibrate"
        return "done"


class GanAeModule(AnomalyModule):
    """GAN-AE in stages (see the module docstring).

    Args:
        dataset: the datamodule's :class:`DatasetInfo` (channels, class names).
        loss: the encoder's :class:`ReconstructionLoss` (``loss=ssim_feat`` | ``mse_feat``).
        image_size, channels: the networks' input (a multiple of 16; ``channels`` 1 = grey,
            3 = RGB, null = the data's); data images are converted on the way in.
        latent_dim, base_channels, generator_norm, encoder_norm: network shape.
        stages: ``both`` | ``generator`` | ``encoder``; ``generator_epochs``, ``encoder_epochs``.
        generator_ckpt: with ``stages=encoder``, the checkpoint to take G and D from.
        gp_lambda, gp_k, n_critic: WGAN-GP's λ, K and critic steps per generator step.
        critic_optimizer, generator_optimizer, encoder_optimizer: partials taking ``params``.
        score, score_k1, score_k2, ssim_floor, ssim_kernel, ssim_sigma: the anomaly score.
        threshold: ``percentile`` (of the training normals' scores) | ``f1`` (on validation).
        samples_every_n_epochs, num_samples: sample/reconstruction grids (0: none).
    """

    loss_kind: ClassVar[str] = "reconstruction"
    # each stage trains one part (critic and generator, then the encoder): under DDP the other
    # parts' parameters get no gradient in a step (see utils.ddp.DDPStrategy)
    ddp_find_unused_parameters: ClassVar[bool] = True
    model_attr: ClassVar[str] = "net"
    legacy_keys: ClassVar[dict[str, str]] = {"threshold": "net.threshold"}  # before the threshold moved

    def __init__(
        self,
        dataset: DatasetInfo | dict[str, Any],
        critic_optimizer: Callable[..., torch.optim.Optimizer],
        generator_optimizer: Callable[..., torch.optim.Optimizer],
        encoder_optimizer: Callable[..., torch.optim.Optimizer],
        loss: nn.Module | None = None,
        image_size: int = 64,
        channels: int | None = 1,
        latent_dim: int = 128,
        base_channels: int = 16,
        generator_norm: Norm = "batch",
        encoder_norm: Norm = "none",
        stages: str = "both",
        generator_epochs: int = 12,
        encoder_epochs: int = 6,
        generator_ckpt: str | None = None,
        gp_lambda: float = 10.0,
        gp_k: float = 1.0,
        n_critic: int = 5,
        score: ScoreKind = "mse_ssim_feat",
        score_k1: float = 1.0,
        score_k2: float = 1.0,
        ssim_floor: float = 0.01,
        ssim_kernel: int = 11,
        ssim_sigma: float = 1.5,
        threshold: str = "percentile",
        threshold_percentile: float = 95.0,
        samples_every_n_epochs: int = 5,
        num_samples: int = 16,
        optimizer: Any = None,
        scheduler: Any = None,
        monitor: str | None = None,
        monitor_mode: str = "max",
    ) -> None:
        super().__init__(optimizer, None, monitor, monitor_mode)  # type: ignore[arg-type]
        info = DatasetInfo.from_dict(dataset)
        if stages not in STAGE_CHOICES:
            raise ConfigError(f"model.stages must be one of {sorted(STAGE_CHOICES)}, got {stages!r}")
        if threshold not in THRESHOLDS:
            raise ConfigError(f"model.threshold must be one of {THRESHOLDS}, got {threshold!r}")
        if not 0 <= threshold_percentile <= 100:
            raise ConfigError(f"model.threshold_percentile must lie in [0, 100], got {threshold_percentile}")
        if n_critic < 1 or generator_epochs < 0 or encoder_epochs < 0:
            raise ConfigError("model.n_critic must be >= 1 and the stage epochs >= 0")
        if loss is not None and not isinstance(loss, ReconstructionLoss):
            raise TypeError(
                f"GAN-AE's encoder trains with a reconstruction loss (loss=ssim_feat | mse_feat), "
                f"got {type(loss).__name__}"
            )
        channels = int(channels or info.in_channels)
        self.save_hyperparameters(
            {
                "dataset": info.to_dict(),
                "image_size": image_size,
                "channels": channels,
                "latent_dim": latent_dim,
                "base_channels": base_channels,
                "stages": stages,
                "generator_epochs": generator_epochs,
                "encoder_epochs": encoder_epochs,
                "gp_lambda": gp_lambda,
                "gp_k": gp_k,
                "n_critic": n_critic,
                "score": score,
                "threshold": threshold,
                "threshold_percentile": threshold_percentile,
            }
        )
        self.automatic_optimization = False
        self.class_names = info.class_names
        self.net = GanAe.build(
            channels=channels,
            image_size=image_size,
            latent_dim=latent_dim,
            base_channels=base_channels,
            generator_norm=generator_norm,
            encoder_norm=encoder_norm,
            score=score,
            k1=score_k1,
            k2=score_k2,
            ssim_floor=ssim_floor,
            ssim_kernel=ssim_kernel,
            ssim_sigma=ssim_sigma,
        )
        self.loss = loss if loss is not None else SsimFeatureLoss()
        chosen = STAGE_CHOICES[stages]
        self.schedule = Schedule(
            generator_epochs=generator_epochs if "generator" in chosen else 0,
            encoder_epochs=encoder_epochs if "encoder" in chosen else 0,
            calibrate="encoder" in chosen and encoder_epochs > 0 and threshold == "percentile",
        )
        self.stages = stages
        # the calibration epoch scores the training normals as the test sees them (no augmentation)
        self.extra_inputs = frozenset({"unaugmented"}) if self.schedule.calibrate else frozenset()
        self.generator_ckpt = generator_ckpt
        self.gp_lambda, self.gp_k, self.n_critic = float(gp_lambda), float(gp_k), int(n_critic)
        self.critic_optimizer_factory = critic_optimizer
        self.generator_optimizer_factory = generator_optimizer
        self.encoder_optimizer_factory = encoder_optimizer
        self.threshold_mode = threshold
        self.threshold_percentile = float(threshold_percentile)
        self.samples_every_n_epochs = int(samples_every_n_epochs)
        self.num_samples = int(num_samples)
        # persistent state (in every checkpoint): the threshold (the net's), the stage-1 flags
        self.init_scoring()
        self.register_buffer("generator_trained", torch.tensor(False))
        self.register_buffer("critic_steps", torch.tensor(0, dtype=torch.long))
        # the calibration epoch's scores of the training normals
        self.train_scores = CatMetric(nan_strategy="error")
        self._calibration_seen = 0
        self._resumed_scores: Tensor | None = None  # a mid-calibration checkpoint's, until used
        self._warned_untrained = False

    # ------------------------------------------------------------------------ stages
    @property
    def stage(self) -> Stage:
        """The stage of the current epoch; under ``fast_dev_run`` (one batch runs them all)
        the last one; ``done`` outside a fit."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return "done"
        if trainer.fast_dev_run:
            return self.schedule.stages[-1] if self.schedule.stages else "done"
        return self.schedule.stage_at(trainer.current_epoch)

    def _training_stages(self) -> tuple[Stage, ...]:
        if self.trainer.fast_dev_run:
            return self.schedule.stages
        stage = self.stage
        return (stage,) if stage != "done" else ()

    def _enter(self, stage: Stage) -> None:
        """Trainable and frozen parts of ``stage``: frozen networks get no gradient and stay
        in eval mode (batch-norm statistics fixed)."""
        gan, enc = stage == "generator", stage == "encoder"
        for net, trainable in ((self.net.generator, gan), (self.net.critic, gan), (self.net.encoder, enc)):
            net.requires_grad_(trainable)
            net.train(trainable)

    def stage_epochs(self) -> dict[str, int]:
        schedule = self.schedule
        return {
            "generator": schedule.generator_epochs,
            "encoder": schedule.encoder_epochs,
            "calibration": int(schedule.calibrate),
        }

    def on_fit_start(self) -> None:
        if self.stages == "encoder" and not bool(self.generator_trained):
            self.load_generator(self.generator_ckpt)

    def load_generator(self, path: str | Path | None) -> None:
        """Take the generator and critic (and nothing else) from a checkpoint of this module."""
        if not path:
            raise ValueError(
                "model.stages=encoder trains only the encoder and needs a trained generator: set "
                "model.generator_ckpt=<a checkpoint of a model=ganae run with model.stages=generator or both>"
            )
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.generator_ckpt {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        if not bool(state.get("generator_trained", torch.tensor(False))):
            raise ValueError(f"{path} holds no trained generator (generator_trained is false)")
        for part in ("generator", "critic"):
            prefix = f"net.{part}."
            weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                getattr(self.net, part).load_state_dict(weights)
            except RuntimeError as err:
                raise ValueError(
                    f"the {part} in {path} does not fit this model (image_size, channels, latent_dim and "
                    f"base_channels must match the stage-1 run's): {err}"
                ) from err
        self.generator_trained.fill_(True)
        log.info("GAN-AE stage 2 starts from the generator and critic of %s", path)

    # --------------------------------------------------------------------- optimisers
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Critic, generator and encoder optimisers (always all three, so any checkpoint resumes)."""
        return [
            self.critic_optimizer_factory(params=list(self.net.critic.parameters())),
            self.generator_optimizer_factory(params=list(self.net.generator.parameters())),
            self.encoder_optimizer_factory(params=list(self.net.encoder.parameters())),
        ]

    def configure_callbacks(self) -> list[L.Callback]:
        if self.samples_every_n_epochs < 1:
            return []
        return [GanAeSamplesCallback(every_n_epochs=self.samples_every_n_epochs, num_images=self.num_samples)]

    # ------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = normal_images(batch)
        self.log(
            "train/normal_images",
            float(len(images)),
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            sync_dist=True,
        )
        if not len(images):
            return
        x = self.net.prepare(images)
        for stage in self._training_stages():
            self._enter(stage)
            if stage == "generator":
                self._gan_step(x, force_generator=bool(self.trainer.fast_dev_run))
            elif stage == "encoder":
                self._encoder_step(x)
            elif stage == "calibrate":  # the threshold's statistic: images as the test sees them
                self._calibration_step(batch)
        self._enter("done")

    def _gan_step(self, x: Tensor, force_generator: bool = False) -> None:
        """One critic step (eq. 2), and a generator step (eq. 1) after every n_critic-th."""
        opt_c, opt_g, _ = self.optimizers()
        generator, critic = self.net.generator, self.net.critic
        real = self.net.to_net(x)
        n = len(real)
        with torch.no_grad():
            fake = generator(generator.sample_latent(n))
        self.toggle_optimizer(opt_c)
        loss_c, parts = critic_loss(critic, real, fake, self.gp_lambda, self.gp_k)
        opt_c.zero_grad()
        self.manual_backward(loss_c)
        opt_c.step()
        self.untoggle_optimizer(opt_c)
        self.critic_steps += 1
        self.log_dict(
            {
                "train/critic_loss": loss_c.detach(),
                "train/wasserstein": parts["wasserstein"],
                "train/gradient_penalty": parts["gradient_penalty"],
            },
            on_step=False,
            on_epoch=True,
            batch_size=n,
        )
        if force_generator or int(self.critic_steps) % self.n_critic == 0:
            self.toggle_optimizer(opt_g)
            loss_g = generator_loss(critic, generator(generator.sample_latent(n)))
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()
            self.untoggle_optimizer(opt_g)
            self.generator_trained.fill_(True)
            self.log(
                "train/generator_loss",
                loss_g.detach(),
                on_step=False,
                on_epoch=True,
                batch_size=n,
                sync_dist=True,
            )

    def _encoder_step(self, x: Tensor) -> None:
        """One encoder step on ``loss(x, G(E(x)), f(x), f(G(E(x))))`` (eq. 3), G and D frozen."""
        if not bool(self.generator_trained) and not self._warned_untrained:
            log.warning(
                "GAN-AE stage 2 starts with an untrained generator: stage 1 took %d critic step(s) and no "
                "generator step (one per model.n_critic=%d critic steps); raise model.generator_epochs",
                int(self.critic_steps),
                self.n_critic,
            )
            self._warned_untrained = True
        _, _, opt_e = self.optimizers()
        x_hat = self.net.reconstruct(x)
        with torch.no_grad():
            feat_x = self.net.features(x)
        loss = self.loss(x, x_hat, feat_x, self.net.features(x_hat))
        opt_e.zero_grad()
        self.manual_backward(loss)
        opt_e.step()
        self.log(
            "train/loss",
            loss.detach(),
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(x),
            sync_dist=True,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved inside the calibration epoch also holds the scores so far."""
        super().on_save_checkpoint(checkpoint)
        if self._calibration_seen:
            checkpoint[CALIBRATION_SCORES_KEY] = torch.cat(self.train_scores.value).detach().cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._resumed_scores = checkpoint.get(CALIBRATION_SCORES_KEY)

    def _restore_resumed_scores(self) -> None:
        """At the first calibration batch after a resume: the saved scores join this epoch's when
        the loader serves the rest of the epoch; a loader that starts it again scores every
        normal again, so they are dropped."""
        scores, self._resumed_scores = self._resumed_scores, None
        if scores is None:
            return
        if resumes_mid_epoch(self.trainer):
            self.train_scores.update(scores.to(self.device))
            self._calibration_seen += len(scores)
        else:
            log.warning(
                "the checkpoint holds %d calibration scores from the middle of the calibration epoch, "
                "but the training loader starts the epoch again: calibration starts again too",
                len(scores),
            )

    def _calibration_step(self, batch: dict[str, Tensor]) -> None:
        """Score the batch's training normals, unaugmented, with the final model (no optimiser step)."""
        self._restore_resumed_scores()
        normal = defect_free(batch, once=True)  # each image once: not DDP's padding repeats
        if normal.any():
            x = self.net.prepare(unaugmented_normal_images(batch, once=True))
            with torch.no_grad():
                scores = self.net.combine(self.net.analyse(x))
            check_finite_scores(scores, batch, "GAN-AE calibration", selected=normal)
            self.train_scores.update(scores)
            self._calibration_seen += len(x)
        if not self.trainer.fast_dev_run:
            count_step_without_optimizer(self.trainer)

    def _finish_calibration(self) -> None:
        """Set the percentile threshold from the scores of this epoch's calibration, if any."""
        if not self._calibration_seen:
            return
        scores = self.train_scores.compute()
        self.train_scores.reset()
        self._calibration_seen = 0
        self.threshold.fill_(percentile_threshold(scores, self.threshold_percentile))
        log.info(
            "GAN-AE threshold: percentile %g of %d training normals' scores = %.6g",
            self.threshold_percentile,
            scores.numel(),
            float(self.threshold),
        )

    def on_validation_epoch_start(self) -> None:
        if fit_epoch_done(self.trainer):
            self._finish_calibration()

    def on_train_epoch_end(self) -> None:
        self._finish_calibration()

    # ---------------------------------------------------------------------- evaluation
    def score_batch(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor]:
        """Scores and maps; in validation also ``val/loss`` (the training loss) on the normals."""
        out, scores, maps = self._analyse(batch["image"])
        normal = defect_free(batch)
        if split == "val" and normal.any():
            loss = self.loss(
                out["x"][normal], out["x_hat"][normal], out["feat_x"][normal], out["feat_x_hat"][normal]
            )
            self.log(
                "val/loss", loss, on_step=False, on_epoch=True, batch_size=int(normal.sum()), sync_dist=True
            )
        return {"anomaly_maps": maps, "scores": scores}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor] | None:
        if self.stage == "generator":  # no encoder yet: the critic's Wasserstein estimate on normals
            real = normal_images(batch)
            if len(real):
                with torch.no_grad():
                    x = self.net.to_net(self.net.prepare(real))
                    fake = self.net.generator(self.net.generator.sample_latent(len(x)))
                    distance = self.net.critic(x).mean() - self.net.critic(fake).mean()
                self.log(
                    "val/wasserstein",
                    distance,
                    on_step=False,
                    on_epoch=True,
                    batch_size=len(x),
                    sync_dist=True,
                )
            return None
        return super().validation_step(batch, batch_idx)

    def choose_threshold(self, scores: Tensor, labels: Tensor) -> float | None:
        """F1-optimal on validation with ``threshold=f1``; the percentile threshold is set by the
        calibration epoch instead."""
        return best_f1_threshold(scores, labels) if self.threshold_mode == "f1" else None

    @torch.no_grad()
    def _analyse(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The network's analysis of images in [0, 1], their scores and their maps at the images' size."""
        out = self.net.analyse(images)
        return out, self.net.combine(out), self.net.localise(out["x"], out["x_hat"], images.shape[-2:])

    def forward(self, images: Tensor) -> Reconstruction:
        """Anomaly scores (N), maps (N×1×H×W) and reconstructions of images in [0, 1]."""
        return self.net(images)

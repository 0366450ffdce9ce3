"""GAN-AE (gan-ae.txt §II): networks, the gradient penalty, the encoder losses, the scores,
the staged LightningModule (frozen networks, resume, threshold buffer), on tiny 32-px toys:
smooth grey textures (normal) vs the same with a bright scratch (defective)."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader

from elinspect.build import fit_epochs
from elinspect.data.resumable import ResumableDataLoader
from elinspect.losses import MseFeatureLoss, ReconstructionLoss, SsimFeatureLoss
from elinspect.losses.reconstruction import ssim_per_image
from elinspect.models.anomaly.ganae import (
    Encoder,
    GanAe,
    ResidualCritic,
    ResidualGenerator,
    critic_loss,
    fit_images,
    gradient_penalty,
)
from elinspect.models.anomaly.ganae_module import GanAeModule, Schedule
from elinspect.models.anomaly.thresholds import percentile_threshold
from elinspect.utils.compat import IncompatibleConfigError, check_compatible
from elinspect.utils.errors import ConfigError
from tests.conftest import CONFIG_DIR, f1_at, f1_threshold_by_hand
from tests.test_padim import smooth_textures

INFO = {"task": "classification", "class_names": ["normal", "defective"], "in_channels": 1}
SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: these 32-px networks gain nothing from two, and two threads on a
    core another process keeps busy make small convolutions tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def add_bright_scratch(images: Tensor, seed: int = 1) -> Tensor:
    """The same images with a bright straight scratch (2 px wide, value 1) across each."""
    g = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = images.clone()
    for i in range(len(images)):
        angle = float(torch.rand((), generator=g)) * math.pi
        cy, cx = (size / 2 + (torch.rand(2, generator=g) - 0.5) * size / 3).tolist()
        distance = ((xx - cx) * math.sin(angle) - (yy - cy) * math.cos(angle)).abs()
        along = ((xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)).abs()
        out[i, 0][(distance < 1.0) & (along < size / 3)] = 1.0
    return out


def toy_loader(
    n_normal: int, n_defect: int, seed: int, batch_size: int = 8, shuffle: bool = False
) -> DataLoader:
    """``{"image", "label"}`` batches of 32-px normal textures and scratched ones."""
    images = smooth_textures(n_normal, SIZE, seed)
    if n_defect:
        defective = add_bright_scratch(smooth_textures(n_defect, SIZE, seed + 1000), seed=seed + 1)
        images = torch.cat([images, defective])
    labels = torch.cat([torch.zeros(n_normal), torch.ones(n_defect)]).long()
    items = [{"image": image, "label": label} for image, label in zip(images, labels, strict=True)]
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle)


def ganae(**kw: Any) -> GanAeModule:
    args: dict[str, Any] = {
        "dataset": INFO,
        "critic_optimizer": functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.0, 0.9)),
        "generator_optimizer": functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.0, 0.9)),
        "encoder_optimizer": functools.partial(torch.optim.Adam, lr=3e-3),
        "image_size": SIZE,
        "channels": 1,
        "latent_dim": 16,
        "base_channels": 8,
        "generator_epochs": 1,
        "encoder_epochs": 1,
        "n_critic": 2,
        "samples_every_n_epochs": 0,
    }
    args.update(kw)
    return GanAeModule(**args)


def trainer(tmp_path: Path, fits: GanAeModule | None = None, **kw: Any) -> L.Trainer:
    """A CPU trainer; given the module it ``fits``, ``max_epochs`` is set as the run builder
    sets it (the sum of the module's stage epochs)."""
    if fits is not None:
        kw["max_epochs"] = fit_epochs(fits, kw.get("max_epochs", 1), kw.get("fast_dev_run", False))
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **{"enable_checkpointing": False, "max_epochs": 1, **kw},
    )


def state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def changed(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


# ------------------------------------------------------------------------------ networks
@pytest.mark.parametrize(("size", "channels"), [(32, 1), (64, 3), (128, 1)])
def test_networks_have_four_residual_blocks_and_any_size(size: int, channels: int) -> None:
    g = ResidualGenerator(latent_dim=8, channels=channels, image_size=size, base_channels=4)
    d = ResidualCritic(channels=channels, image_size=size, base_channels=4)
    e = Encoder(latent_dim=8, channels=channels, image_size=size, base_channels=4)
    assert len(g.blocks) == len(d.trunk.blocks) == len(e.trunk.blocks) == 4
    convs = [m for m in g.blocks.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs and all(c.stride == (1, 1) for c in convs)  # §III.A: 3×3, stride 1
    z = g.sample_latent(2)
    images = g(z)
    assert images.shape == (2, channels, size, size) and images.abs().max() <= 1
    assert d(images).shape == (2,) and d.features(images).shape == (2, d.feature_dim) == (2, 32)
    assert e(images).shape == (2, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        ResidualGenerator(image_size=40)


def test_fit_images_converts_channels_and_size() -> None:
    rgb = torch.rand(2, 3, 48, 48)
    grey = fit_images(rgb, 1, 32)
    assert grey.shape == (2, 1, 32, 32)
    torch.testing.assert_close(fit_images(rgb, 1, 48), rgb.mean(dim=1, keepdim=True))
    assert fit_images(grey, 3, 32).shape == (2, 3, 32, 32)


# ------------------------------------------------------------------------ WGAN-GP losses
class Quadratic(nn.Module):
    """D(x) = a · Σ x²: ∇D(x) = 2a·x, so the penalty has a closed form."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x: Tensor) -> Tensor:
        return self.a * x.pow(2).flatten(1).sum(dim=1)


def test_gradient_penalty_equals_a_hand_computation() -> None:
    torch.manual_seed(0)
    real, fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    eps = torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1, 1)
    critic = Quadratic(0.3)
    got = gradient_penalty(critic, real, fake, k=1.0, eps=eps)
    mixed = eps * real + (1 - eps) * fake
    norms = 2 * 0.3 * mixed.flatten(1).norm(dim=1)  # ‖∇D(x̃)‖ = 2a‖x̃‖
    expected = ((norms - 1.0) ** 2).mean()
    torch.testing.assert_close(got, expected)
    # differentiable: d/da of mean((2a‖x̃‖ − 1)²) = mean(2(2a‖x̃‖ − 1)·2‖x̃‖)
    got.backward()
    r = mixed.flatten(1).norm(dim=1)
    torch.testing.assert_close(critic.a.grad, (2 * (2 * 0.3 * r - 1) * 2 * r).mean())
    # K moves the target norm
    torch.testing.assert_close(
        gradient_penalty(critic, real, fake, k=2.0, eps=eps), ((norms - 2.0) ** 2).mean()
    )


def test_critic_loss_is_eq_2() -> None:
    torch.manual_seed(0)
    real, fake = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    critic = Quadratic(0.1)
    torch.manual_seed(5)
    loss, parts = critic_loss(critic, real, fake, gp_lambda=10.0, k=1.0)
    torch.manual_seed(5)
    penalty = gradient_penalty(critic, real, fake, k=1.0)
    expected = critic(fake).mean() - critic(real).mean() + 10.0 * penalty
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["wasserstein"], (critic(real).mean() - critic(fake).mean()).detach())


# ----------------------------------------------------------------------- encoder losses
def test_ssim_loss_of_identical_images_is_minus_k1() -> None:
    x = smooth_textures(3, SIZE, seed=0)
    feats = torch.randn(3, 10)
    assert float(SsimFeatureLoss(k1=0.7, k2=2.0)(x, x, feats, feats)) == pytest.approx(-0.7, abs=1e-5)
    assert float(SsimFeatureLoss(k1=1.0)(x, x)) == pytest.approx(-1.0, abs=1e-5)
    # a worse reconstruction has a higher (less negative) loss
    assert float(SsimFeatureLoss()(x, x.flip(-1))) > -0.99


def test_an_ssim_window_its_sigma_does_not_give_is_refused() -> None:
    """torchmetrics' Gaussian SSIM sizes its window from σ alone (2·int(3.5σ + 0.5) + 1: 11 for
    σ = 1.5) and ignores ``kernel_size``; a kernel that disagrees would change nothing, silently.
    Where they agree the loss and the score are built as before."""
    with pytest.raises(ConfigError, match=r"ssim_kernel 7 with ssim_sigma 1.5: .* 11 pixels wide"):
        SsimFeatureLoss(ssim_kernel=7)
    with pytest.raises(ConfigError, match=r"ssim_kernel 11 with ssim_sigma 1: .* 9 pixels wide"):
        GanAe.build(image_size=SIZE, ssim_sigma=1.0)
    SsimFeatureLoss(ssim_kernel=9, ssim_sigma=1.0)
    GanAe.build(image_size=SIZE, ssim_kernel=9, ssim_sigma=1.0)


def test_mse_feature_loss_is_k1_over_ni_mse_plus_k2_over_nf_feature_distance() -> None:
    x, x_hat = torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.5)
    f, f_hat = torch.zeros(2, 4), torch.full((2, 4), 2.0)
    loss = MseFeatureLoss(k1=3.0, k2=0.5)
    assert float(loss(x, x_hat)) == pytest.approx(3.0 * 0.25)  # k1/n_i‖x − x̂‖²
    assert float(loss(x, x_hat, f, f_hat)) == pytest.approx(3.0 * 0.25 + 0.5 * 4.0)  # + k2/n_f‖f − f̂‖²
    assert isinstance(loss, ReconstructionLoss) and loss.loss_kind == "reconstruction"


# -------------------------------------------------------------------------------- scores
def test_scores_are_eq_6_and_eq_7_with_the_sign_corrected() -> None:
    net = GanAe.build(
        channels=1, image_size=SIZE, latent_dim=8, base_channels=4, k1=2.0, k2=3.0, ssim_floor=0.05
    )
    terms = {
        "mse": torch.tensor([0.1, 0.1]),
        "ssim": torch.tensor([0.5, -0.2]),
        "feat": torch.tensor([1.0, 1.0]),
    }
    torch.testing.assert_close(net.combine(terms, "mse_feat"), torch.tensor([2 * 0.1 + 3.0, 2 * 0.1 + 3.0]))
    torch.testing.assert_close(
        net.combine(terms, "mse_ssim_feat"), torch.tensor([2 * 0.1 / 0.5 + 3.0, 2 * 0.1 / 0.05 + 3.0])
    )
    images = torch.rand(2, 1, 48, 48)
    scores, maps = net.eval()(images)[:2]
    assert scores.shape == (2,) and maps.shape == (2, 1, 48, 48) and (maps >= 0).all()
    with pytest.raises(ValueError, match="score must be one of"):
        GanAe.build(image_size=SIZE, score="ssim")


def test_percentile_threshold() -> None:
    scores = torch.arange(1, 101).float()
    assert percentile_threshold(scores, 100) == 100
    assert percentile_threshold(scores, 95) == pytest.approx(95.05)
    with pytest.raises(ValueError):
        percentile_threshold(scores, 101)


def test_schedule_maps_epochs_to_stages() -> None:
    s = Schedule(generator_epochs=2, encoder_epochs=3, calibrate=True)
    assert s.total == 6
    assert [s.stage_at(e) for e in range(7)] == ["generator"] * 2 + ["encoder"] * 3 + ["calibrate", "done"]
    assert ganae(stages="encoder").schedule.stages == ("encoder", "calibrate")
    assert ganae(stages="generator").schedule.stages == ("generator",)
    assert ganae(threshold="f1").schedule.stages == ("generator", "encoder")


# ------------------------------------------------------------------------ the module
class Snapshots(L.Callback):
    """State of generator, critic and encoder at the start of every training epoch."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, dict[str, Tensor]]] = {}
        self.stage: dict[int, str] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: GanAeModule) -> None:
        net = pl_module.net
        self.at[trainer.current_epoch] = {
            p: state(getattr(net, p)) for p in ("generator", "critic", "encoder")
        }
        self.stage[trainer.current_epoch] = pl_module.stage


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A complete run: 3 WGAN-GP epochs, 3 encoder epochs, calibration; checkpoints every epoch."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("ganae")
    module = ganae(generator_epochs=3, encoder_epochs=3)
    snapshots = Snapshots()
    checkpoints = ModelCheckpoint(tmp / "ckpt", filename="{epoch}", save_top_k=-1, monitor=None)
    fit = trainer(tmp, module, enable_checkpointing=True, callbacks=[snapshots, checkpoints], max_epochs=1)
    fit.fit(module, toy_loader(24, 0, seed=0, shuffle=True), toy_loader(8, 8, seed=50))
    final = {p: state(getattr(module.net, p)) for p in ("generator", "critic", "encoder")}
    return {"module": module, "trainer": fit, "snapshots": snapshots, "final": final, "dir": tmp / "ckpt"}


def test_the_schedule_replaces_max_epochs_and_runs_every_stage(trained) -> None:
    fit, snapshots = trained["trainer"], trained["snapshots"]
    assert fit.current_epoch == 7 and fit.max_epochs == 7  # max_epochs=1 was replaced: 3 + 3 + 1
    assert [snapshots.stage[e] for e in range(7)] == ["generator"] * 3 + ["encoder"] * 3 + ["calibrate"]
    module = trained["module"]
    assert bool(module.generator_trained)
    assert int(module.critic_steps) == 9  # 24 normals in batches of 8, 3 epochs; one critic step each
    assert sorted(p.name for p in trained["dir"].glob("*.ckpt")) == [f"epoch={e}.ckpt" for e in range(7)]


def test_frozen_networks_do_not_change_during_stage_two(trained) -> None:
    at, final = trained["snapshots"].at, trained["final"]
    for part in ("generator", "critic"):  # epoch 3 starts stage 2: nothing moves after it, BN stats included
        assert changed(at[0][part], at[3][part]), f"{part} did not train in stage 1"
        assert_same(at[3][part], final[part])
    assert not changed(at[0]["encoder"], at[3]["encoder"])  # untouched in stage 1
    assert changed(at[3]["encoder"], at[6]["encoder"])  # trained in stage 2
    assert_same(at[6]["encoder"], final["encoder"])  # calibration trains nothing


def test_threshold_is_a_percentile_of_training_normals_and_a_persistent_buffer(trained) -> None:
    module = trained["module"]
    threshold = float(module.threshold)
    assert math.isfinite(threshold)
    images = torch.cat([b["image"] for b in toy_loader(24, 0, seed=0)])
    with torch.no_grad():
        scores, _ = module.eval().net(images)[:2]
    assert threshold == pytest.approx(percentile_threshold(scores, 95), rel=1e-4)
    saved = torch.load(trained["dir"] / "epoch=6.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert float(saved["net.threshold"]) == pytest.approx(threshold)
    assert bool(saved["generator_trained"]) and int(saved["critic_steps"]) == 9
    before = torch.load(trained["dir"] / "epoch=5.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert math.isnan(float(before["net.threshold"]))  # set in the calibration epoch, not before


def test_defective_images_score_higher_on_average(trained, tmp_path: Path) -> None:
    module = trained["module"]
    loader = toy_loader(16, 16, seed=200)
    metrics = trainer(tmp_path).test(module, loader, verbose=False)[0]
    assert {"test/acc", "test/f1", "test/precision", "test/recall", "test/auroc"} <= metrics.keys()
    images = torch.cat([b["image"] for b in loader])
    with torch.no_grad():
        scores, maps = module.eval().net(images)[:2]
    assert scores[16:].mean() > scores[:16].mean()
    assert metrics["test/auroc"] > 0.7
    # the localisation map is brightest on the scratch
    scratch = add_bright_scratch(smooth_textures(16, SIZE, 1200), seed=201) != smooth_textures(16, SIZE, 1200)
    assert maps[16:][scratch].mean() > maps[16:][~scratch].mean()


def test_resuming_a_stage_one_checkpoint_continues_at_stage_two(trained, tmp_path: Path) -> None:
    at = trained["snapshots"].at
    torch.manual_seed(1)
    resumed = ganae(generator_epochs=3, encoder_epochs=3)
    snapshots = Snapshots()
    trainer(tmp_path, resumed, callbacks=[snapshots]).fit(
        resumed,
        toy_loader(24, 0, seed=0, shuffle=True),
        toy_loader(8, 8, seed=50),
        ckpt_path=str(trained["dir"] / "epoch=2.ckpt"),  # saved at the end of stage 1
    )
    assert [snapshots.stage[e] for e in sorted(snapshots.stage)] == ["encoder"] * 3 + ["calibrate"]
    for part in ("generator", "critic"):
        assert_same(at[3][part], state(getattr(resumed.net, part)))
    assert changed(at[3]["encoder"], state(resumed.net.encoder))
    assert math.isfinite(float(resumed.threshold))
    assert int(resumed.critic_steps) == 9  # restored, not restarted


class SaveThenCrashInCalibration(L.Callback):
    """Save a checkpoint after the second batch of the calibration epoch, then fail."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.stage == "calibrate" and batch_idx == 1:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("simulated crash")


def test_a_calibration_resumed_mid_epoch_takes_the_percentile_of_every_training_normal(
    trained, tmp_path: Path
) -> None:
    """The calibration epoch's scores live in memory; a checkpoint saved inside it must carry
    them, or the resumed loader serves the rest of the epoch and the threshold is the
    percentile of that rest alone."""
    items = list(toy_loader(24, 0, seed=0).dataset)

    def calibrate(ckpt: Path, *callbacks: L.Callback) -> GanAeModule:
        module = ganae(generator_epochs=3, encoder_epochs=3)
        try:
            trainer(tmp_path, module, callbacks=list(callbacks)).fit(
                module, ResumableDataLoader(items, seed=3, batch_size=4), ckpt_path=str(ckpt)
            )
        except RuntimeError as error:
            assert "simulated crash" in str(error)
        return module

    after_stage_two = trained["dir"] / "epoch=5.ckpt"
    reference = calibrate(after_stage_two)
    calibrate(after_stage_two, SaveThenCrashInCalibration(tmp_path / "mid.ckpt"))
    resumed = calibrate(tmp_path / "mid.ckpt")
    assert math.isfinite(float(reference.threshold))
    assert float(resumed.threshold) == pytest.approx(float(reference.threshold), rel=1e-6)


def test_stage_two_alone_starts_from_a_stage_one_checkpoint(trained, tmp_path: Path) -> None:
    at = trained["snapshots"].at
    encoder_only = ganae(
        stages="encoder", generator_ckpt=str(trained["dir"] / "epoch=2.ckpt"), encoder_epochs=1
    )
    assert not bool(encoder_only.generator_trained)
    snapshots = Snapshots()
    fit = trainer(tmp_path, encoder_only, callbacks=[snapshots])
    fit.fit(encoder_only, toy_loader(16, 0, seed=0), toy_loader(8, 8, seed=50))
    assert [snapshots.stage[e] for e in sorted(snapshots.stage)] == ["encoder", "calibrate"]
    for part in ("generator", "critic"):
        assert_same(at[3][part], state(getattr(encoder_only.net, part)))
    assert bool(encoder_only.generator_trained) and math.isfinite(float(encoder_only.threshold))
    with pytest.raises(ValueError, match="model.generator_ckpt"):
        trainer(tmp_path).fit(ganae(stages="encoder"), toy_loader(8, 0, seed=0))


def test_fast_dev_run_runs_every_stage_on_its_one_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ganae(generator_epochs=5, encoder_epochs=5, samples_every_n_epochs=1, num_samples=4)
    before = {p: state(getattr(module.net, p)) for p in ("generator", "critic", "encoder")}
    fit = trainer(tmp_path, fast_dev_run=True)
    fit.fit(module, toy_loader(8, 0, seed=0), toy_loader(4, 4, seed=50))
    assert int(module.critic_steps) == 1 and bool(module.generator_trained)
    for part in ("generator", "critic", "encoder"):
        assert changed(before[part], state(getattr(module.net, part))), part
    assert math.isfinite(float(module.threshold))
    assert {"val/auroc", "val/f1"} <= fit.callback_metrics.keys()
    samples = tmp_path / "samples"
    assert (samples / "epoch_000_generated.png").is_file() and (
        samples / "epoch_000_reconstructed.png"
    ).is_file()


def test_f1_threshold_is_chosen_on_validation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ganae(threshold="f1")
    fit = trainer(tmp_path, module)
    fit.fit(module, toy_loader(16, 0, seed=0), toy_loader(8, 8, seed=50))
    assert fit.current_epoch == 2  # no calibration epoch
    assert float(fit.callback_metrics["val/threshold"]) == pytest.approx(float(module.threshold))
    val = list(toy_loader(8, 8, seed=50))
    with torch.no_grad():
        scores, _ = module.eval().net(torch.cat([b["image"] for b in val]))[:2]
    labels = torch.cat([b["label"] for b in val])
    assert float(module.threshold) == pytest.approx(f1_threshold_by_hand(scores, labels), rel=1e-5)
    test_loader = toy_loader(8, 8, seed=90)
    metrics = trainer(tmp_path).test(module, test_loader, verbose=False)[0]
    with torch.no_grad():
        test_scores, _ = module.eval().net(torch.cat([b["image"] for b in test_loader]))[:2]
    test_labels = torch.cat([b["label"] for b in test_loader])
    assert metrics["test/f1"] == pytest.approx(
        f1_at(test_scores, test_labels, float(module.threshold)), abs=1e-6
    )


def test_validation_returns_anomaly_maps_at_the_data_resolution(trained) -> None:
    module = copy.deepcopy(trained["module"]).eval()
    batch = {"image": torch.rand(2, 3, 48, 48), "label": torch.tensor([0, 1])}
    out = module.predict_step(batch, 0)
    assert out["anomaly_maps"].shape == (2, 1, 48, 48)
    assert out["reconstructions"].shape == (2, 1, SIZE, SIZE)
    assert out["pred"].dtype == torch.long


# ----------------------------------------------------------------- model × loss check
def test_reconstruction_and_classification_losses_are_not_mixed(make_cfg) -> None:
    cfg = make_cfg("train.yaml", ["model=ganae", "loss=ce"])
    with pytest.raises(
        IncompatibleConfigError, match=r"Losses that fit model=ganae: auto, mse_feat, ssim_feat"
    ):
        check_compatible(cfg, CONFIG_DIR, {"model": "ganae", "loss": "ce"})
    cfg = make_cfg("train.yaml", ["model=classifier", "loss=ssim_feat"])
    with pytest.raises(IncompatibleConfigError, match=r"'classification' loss, but loss=ssim_feat"):
        check_compatible(cfg, CONFIG_DIR, {"model": "classifier", "loss": "ssim_feat"})
    for model, loss in (
        ("ganae", "auto"),
        ("ganae", "mse_feat"),
        ("autoencoder", "ssim_feat"),
        ("padim", "ce"),
    ):
        check_compatible(make_cfg("train.yaml", [f"model={model}", f"loss={loss}"]), CONFIG_DIR)


def test_samples_callback_saves_pngs_and_logs_them_to_wandb(trained, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger

    from elinspect.callbacks.ganae_samples import GanAeSamplesCallback

    class Recorder(WandbLogger):
        def __init__(self) -> None:  # no W&B run: only records what would be logged
            self.logged: list[tuple[str, tuple[int, ...]]] = []

        def log_image(self, key: str, images: list, step: int | None = None, **kw: Any) -> None:
            self.logged += [(key, image.shape) for image in images]

    module = copy.deepcopy(trained["module"])
    module.net.train()
    recorder = Recorder()
    fake = SimpleNamespace(
        loggers=[recorder], current_epoch=4, max_epochs=20, fast_dev_run=False, is_global_zero=True,
        sanity_checking=False, default_root_dir=tmp_path, global_step=7,
    )  # fmt: skip
    callback = GanAeSamplesCallback(every_n_epochs=5, num_images=4)
    callback.on_train_epoch_start(fake, module)
    callback.on_validation_batch_end(fake, module, None, next(iter(toy_loader(2, 2, seed=9))), 0)
    callback.on_train_epoch_end(fake, module)  # epoch 4 is the 5th: due; the module is past stage 1
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "epoch_004_generated.png",
        "epoch_004_reconstructed.png",
    ]
    assert [key for key, _ in recorder.logged] == ["ganae/generated", "ganae/reconstructed"]
    assert recorder.logged[1][1] == (3 * SIZE + 4 * 2, 4 * SIZE + 5 * 2, 3)  # x, x̂, |x − x̂| rows of 4
    assert all(m.training for m in module.net.modules())  # modes restored
    fake.current_epoch = 5
    callback.on_train_epoch_end(fake, module)  # not due
    assert len(recorder.logged) == 2


def test_the_threshold_is_calibrated_on_unaugmented_training_normals(tmp_path: Path) -> None:
    """The calibration epoch scores the training normals as the test sees them: a batch's
    ``image_unaugmented`` (the datamodule's evaluation transform), never its augmented
    ``image``; the threshold is the percentile of those scores, recomputed here."""
    torch.manual_seed(0)
    plain = torch.cat([b["image"] for b in toy_loader(24, 0, seed=0)])
    augmented = plain.flip(-1).roll(5, dims=-2) * 0.5  # what a train-time transform might give
    items = [
        {"image": a, "image_unaugmented": p, "label": torch.tensor(0)}
        for a, p in zip(augmented, plain, strict=True)
    ]
    module = ganae(generator_epochs=1, encoder_epochs=1)
    assert module.extra_inputs == {"unaugmented"}  # the run builder asks the datamodule for them
    fit = trainer(tmp_path, module)
    fit.fit(module, DataLoader(items, batch_size=8), toy_loader(8, 8, seed=50))
    with torch.no_grad():
        plain_scores, _ = module.eval().net(plain)[:2]
        augmented_scores, _ = module.net(augmented)[:2]
    assert float(module.threshold) == pytest.approx(percentile_threshold(plain_scores, 95), rel=1e-4)
    assert float(module.threshold) != pytest.approx(percentile_threshold(augmented_scores, 95), rel=1e-3)


def test_the_threshold_counts_each_training_normal_once_when_a_ddp_loader_pads(tmp_path: Path) -> None:
    """Under DDP the training loader pads a rank with images already served (flagged
    ``repeat``, elinspect.data.sharding): the percentile is taken over each normal once."""
    torch.manual_seed(0)
    plain = torch.cat([b["image"] for b in toy_loader(24, 0, seed=0)])
    items = [{"image": p, "label": torch.tensor(0), "repeat": torch.tensor(False)} for p in plain]
    items += [{**item, "repeat": torch.tensor(True)} for item in items[:8]]  # served again
    module = ganae(generator_epochs=1, encoder_epochs=1)
    fit = trainer(tmp_path, module)
    fit.fit(module, DataLoader(items, batch_size=8), toy_loader(8, 8, seed=50))
    with torch.no_grad():
        scores, _ = module.eval().net(plain)[:2]
    assert float(module.threshold) == pytest.approx(percentile_threshold(scores, 95), rel=1e-4)
    padded = torch.cat([scores, scores[:8]])
    assert float(module.threshold) != pytest.approx(percentile_threshold(padded, 95), rel=1e-3)


def test_without_calibration_nothing_extra_is_asked_of_the_data() -> None:
    assert ganae(threshold="f1").extra_inputs == frozenset()


def test_a_non_finite_calibration_score_is_an_error_not_a_skipped_image(tmp_path: Path) -> None:
    from elinspect.models.anomaly.scoring import NonFiniteScoreError

    module = ganae(generator_epochs=1, encoder_epochs=1)
    module.net.combine = lambda out: torch.full((len(out["x"]),), float("nan"))  # a broken score
    items = [
        {"image": b, "label": torch.tensor(0), "index": torch.tensor(i)}
        for i, b in enumerate(torch.cat([b["image"] for b in toy_loader(8, 0, seed=0)]))
    ]
    with pytest.raises(NonFiniteScoreError, match=r"GAN-AE calibration.*dataset row 0"):
        trainer(tmp_path, module).fit(module, DataLoader(items, batch_size=8))


def test_ssim_stays_float32_under_bf16_autocast() -> None:
    """Under ``precision=bf16-mixed`` (``trainer=gpu``) the steps run in autocast; SSIM's local
    variances (E[x²] − μ², from convolutions) lose almost every digit in bf16, which would
    change eq. 7's score and the encoder's SSIM loss: SSIM is computed in float32 regardless."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 1, 8, 8, generator=g), size=64, mode="bilinear")
    noisy = (smooth + 0.01 * torch.randn(smooth.shape, generator=g)).clamp(0, 1)
    exact = ssim_per_image(smooth, noisy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ssim_per_image(smooth, noisy)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-5, atol=1e-5)

"""PadimModule and SemaCnnModule (semacnn.txt §2.2) under a real Lightning Trainer, on a toy set:
smooth grey textures (normal) vs. the same kind of textures with a dark blob (defective), 64 px,
random-init ResNet-18, a 16×16 feature grid and k = 20."""

from __future__ import annotations

import copy
import functools
import math
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from torchvision.io import read_image

from elinspect.callbacks.anomaly_visuals import AnomalyHeatmapCallback
from elinspect.data.info import DatasetInfo
from elinspect.data.resumable import ResumableDataLoader
from elinspect.drawing import heatmap_overlay
from elinspect.models.anomaly.padim import Padim
from elinspect.models.anomaly.padim_module import PadimModule
from elinspect.models.anomaly.semacnn import SemaCnnModule
from elinspect.models.anomaly.thresholds import best_f1_threshold, threshold_metrics
from elinspect.models.build import build_model, effective_loss_config
from elinspect.models.classification import ImageClassifier
from elinspect.utils.errors import ConfigError, find_user_error
from tests.conftest import f1_at, f1_threshold_by_hand, fast_model_overrides
from tests.test_padim import add_dark_blob, smooth_textures
from tests.test_resume import Crash

INFO = {"task": "classification", "class_names": ["normal", "defective"], "in_channels": 1}
SMALL = {"feature_size": 16, "k": 20}


def toy_loader(n: int, seed: int, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    """n normal and n defective 64×64 images as ``{"image", "label"}`` batches."""
    normal = smooth_textures(n, 64, seed)
    defective, _ = add_dark_blob(smooth_textures(n, 64, seed + 1000), seed=seed + 1, margin=16)
    images = torch.cat([normal, defective])
    labels = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    items = [{"image": image, "label": label} for image, label in zip(images, labels, strict=True)]
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle)


def trainer(max_epochs: int, **kw: Any) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"enable_checkpointing": False, **kw},
    )


def semacnn(**kw: Any) -> SemaCnnModule:
    return SemaCnnModule(
        Padim(**SMALL),
        functools.partial(ImageClassifier),
        INFO,
        functools.partial(torch.optim.AdamW, lr=1e-3),
        **kw,
    )


class EpochLosses(L.Callback):
    """Records ``train/loss_epoch`` after every training epoch that logged it."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "train/loss_epoch" in trainer.callback_metrics:
            self.losses.append(float(trainer.callback_metrics["train/loss_epoch"]))


def test_best_f1_threshold_cuts_between_distinct_scores() -> None:
    scores = torch.tensor([0.1, 0.2, 0.8, 0.9, 0.5])
    labels = torch.tensor([0, 0, 1, 1, 0])
    assert best_f1_threshold(scores, labels) == pytest.approx(0.8)
    # a tie straddling the classes cannot be split: 0.5 takes both tied scores
    tied = best_f1_threshold(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([1, 1, 0, 0]))
    assert tied == pytest.approx(0.5)


# --------------------------------------------------------------------------------- PaDiM
@pytest.fixture(scope="module")
def fitted_padim(tmp_path_factory: pytest.TempPathFactory) -> tuple[PadimModule, L.Trainer, Path]:
    torch.manual_seed(0)
    module = PadimModule(Padim(**SMALL), INFO)
    checkpoints = ModelCheckpoint(tmp_path_factory.mktemp("padim"), monitor="val/auroc", mode="max")
    # the fit takes one epoch; the module stops the trainer after it
    fit = trainer(max_epochs=3, enable_checkpointing=True, callbacks=[checkpoints])
    fit.fit(module, toy_loader(12, seed=0, shuffle=True), toy_loader(12, seed=50))
    return module, fit, Path(checkpoints.best_model_path)


@pytest.mark.parametrize("label", [0, 1])
def test_auroc_of_a_split_with_one_class_is_left_out_not_zero(label: int, caplog) -> None:
    """AUROC is undefined on a split of normal images only (a user's check of false alarms) or
    of defects only: it is not reported (torchmetrics would give 0.0), with a warning; the
    thresholded metrics stay."""
    scores = torch.tensor([0.1, 0.4, 0.8, 0.9])
    labels = torch.full((4,), label)
    with caplog.at_level("WARNING"):
        metrics = threshold_metrics(scores, labels, 0.5, "test/")
    assert "test/auroc" not in metrics
    assert "test/auroc is undefined" in caplog.text
    assert float(metrics["test/acc"]) == 0.5
    both = threshold_metrics(scores, torch.tensor([0, 0, 1, 1]), 0.5, "test/")
    assert float(both["test/auroc"]) == 1.0 and float(both["test/acc"]) == 1.0


def test_padim_fits_and_checkpoints_with_a_validation_split_of_normal_images_only(tmp_path: Path) -> None:
    """A validation split without defects (``data.held_out_val_fraction=0`` with normal-only
    training data) has no AUROC: ``val/auroc``, PaDiM's monitor, is logged as NaN (ranked below
    any score), so the checkpoint callback still saves the fit instead of stopping the run."""
    torch.manual_seed(0)
    module = PadimModule(Padim(**SMALL), INFO)
    checkpoints = ModelCheckpoint(tmp_path, monitor="val/auroc", mode="max")
    normal_only = DataLoader(
        [b for b in toy_loader(8, seed=50).dataset if int(b["label"]) == 0], batch_size=8
    )
    fit = trainer(max_epochs=1, enable_checkpointing=True, callbacks=[checkpoints])
    fit.fit(module, toy_loader(8, seed=0), normal_only)
    assert math.isnan(float(fit.callback_metrics["val/auroc"]))
    assert Path(checkpoints.best_model_path).is_file()
    assert math.isfinite(float(module.threshold))


def test_padim_fits_on_the_normal_images_in_one_epoch(fitted_padim) -> None:
    module, fit, _ = fitted_padim
    assert bool(module.padim.fitted)
    assert fit.current_epoch == 1  # stopped after the fitting epoch, not at max_epochs=3
    assert float(fit.callback_metrics["train/normal_images"]) == 12  # the 12 defective ones are skipped
    assert module.padim.sum_x is None  # the sums are freed after finalize


def test_the_fit_is_checkpointed_by_model_checkpoint(fitted_padim) -> None:
    """No optimiser, yet every fitted batch counts as a step, so ModelCheckpoint saves."""
    _, fit, path = fitted_padim
    assert fit.global_step == 3  # 24 images in batches of 8
    assert path.is_file() and path.name.endswith(".ckpt")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert bool(state["padim.fitted"]) and "padim.threshold" in state


def scores_and_labels(module: PadimModule, loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    with torch.no_grad():
        scores = torch.cat([module.eval()(b["image"]).score for b in batches])
    return scores, torch.cat([b["label"] for b in batches])


def test_validation_sets_the_f1_optimal_threshold_and_test_uses_it(fitted_padim) -> None:
    module, fit, _ = fitted_padim
    threshold = float(module.threshold)
    val_scores, val_labels = scores_and_labels(module, toy_loader(12, seed=50))
    assert threshold == pytest.approx(f1_threshold_by_hand(val_scores, val_labels), rel=1e-6)
    assert float(fit.callback_metrics["val/threshold"]) == pytest.approx(threshold)
    assert float(fit.callback_metrics["val/auroc"]) > 0.7
    test_loader = toy_loader(12, seed=80)
    metrics = fit.test(module, test_loader, verbose=False)[0]
    assert metrics["test/auroc"] > 0.7
    assert float(module.threshold) == threshold  # test uses the stored threshold, never refits it
    test_scores, test_labels = scores_and_labels(module, test_loader)
    assert metrics["test/f1"] == pytest.approx(f1_at(test_scores, test_labels, threshold), abs=1e-6)


def test_threshold_and_gaussians_are_restored_from_the_checkpoint(fitted_padim) -> None:
    module, _, path = fitted_padim
    fresh = PadimModule(Padim(**SMALL), INFO)
    assert not bool(fresh.padim.fitted) and math.isnan(float(fresh.threshold))
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    assert float(fresh.threshold) == float(module.threshold)
    images = next(iter(toy_loader(4, seed=90)))["image"]
    torch.testing.assert_close(fresh.eval()(images), module.eval()(images))
    # and through Trainer.test(ckpt_path=...) on an untouched module
    other = PadimModule(Padim(**SMALL), INFO)
    expected = trainer(1).test(module, toy_loader(8, seed=70), verbose=False)[0]
    got = trainer(1).test(other, toy_loader(8, seed=70), ckpt_path=str(path), verbose=False)[0]
    assert got == pytest.approx(expected)


def test_test_metrics_count_each_image_once_when_a_ddp_sampler_repeats_some(fitted_padim) -> None:
    """Under DDP the distributed sampler pads the last batches with samples already served, and
    the gathered scores would count those twice. Batches that carry the dataset's ``index`` are
    counted once per index: here the misclassified images come a second and third time, as
    padding would repeat them, and the metrics are those of the set without repeats."""
    module, _, _ = fitted_padim
    loader = toy_loader(12, seed=80)
    items = [{**item, "index": i} for i, item in enumerate(loader.dataset)]
    scores, labels = scores_and_labels(module, loader)
    wrong = [
        i for i, (s, y) in enumerate(zip(scores, labels, strict=True)) if (s >= module.threshold) != bool(y)
    ]
    assert wrong, "the toy test set needs a misclassified image to repeat"
    padded = items + [items[i] for i in wrong] * 2
    once = trainer(1).test(module, DataLoader(items, batch_size=8), verbose=False)[0]
    repeated = trainer(1).test(module, DataLoader(padded, batch_size=8), verbose=False)[0]
    assert repeated == pytest.approx(once)


def fit_padim_resumably(directory: Path, crash: int | None = None, ckpt: str | None = None) -> PadimModule:
    """PaDiM fitted in one epoch of 6 batches from a :class:`ResumableDataLoader`, a checkpoint
    every 2 batches; ``crash``: stop with an error before that step."""
    items = list(toy_loader(12, seed=0).dataset)
    torch.manual_seed(0)
    module = PadimModule(Padim(**SMALL), INFO)
    saves = ModelCheckpoint(directory, save_last=True, every_n_train_steps=2, save_top_k=0)
    callbacks = [saves] + ([Crash(crash)] if crash is not None else [])
    fit = trainer(max_epochs=1, enable_checkpointing=True, callbacks=callbacks)
    try:
        fit.fit(module, ResumableDataLoader(items, seed=3, batch_size=4), ckpt_path=ckpt)
    except RuntimeError as error:
        assert "simulated crash" in str(error)
    return module


def test_a_padim_fit_resumed_mid_epoch_equals_the_uninterrupted_fit(tmp_path: Path) -> None:
    """The fit's running sums live in memory; a checkpoint saved in the middle of the fitting
    epoch (``every_n_train_steps``, ``val_check_interval`` < 1, a preempted job) must carry
    them, or the resumed loader serves the rest of the epoch and the Gaussians are fitted on
    that rest alone."""
    reference = fit_padim_resumably(tmp_path / "reference")
    fit_padim_resumably(tmp_path / "crashed", crash=3)  # after the checkpoint at step 2
    saved = torch.load(tmp_path / "crashed" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and not bool(saved["state_dict"]["padim.fitted"])
    resumed = fit_padim_resumably(tmp_path / "crashed", ckpt=str(tmp_path / "crashed" / "last.ckpt"))
    assert bool(resumed.padim.fitted)
    torch.testing.assert_close(resumed.padim.mean, reference.padim.mean)
    torch.testing.assert_close(resumed.padim.inv_cholesky, reference.padim.inv_cholesky)


# ------------------------------------------------------------------------------- SeMaCNN
@pytest.fixture(scope="module")
def semacnn_stage_one(tmp_path_factory: pytest.TempPathFactory) -> tuple[SemaCnnModule, dict, Path]:
    torch.manual_seed(0)
    module = semacnn()
    before = copy.deepcopy(module.net.state_dict())
    fit = trainer(max_epochs=1)
    fit.fit(module, toy_loader(8, seed=0, shuffle=True), toy_loader(4, seed=50))
    path = tmp_path_factory.mktemp("semacnn") / "stage1.ckpt"
    fit.save_checkpoint(path)
    return module, before, path


def test_stage_one_fits_padim_and_the_heatmap_scale_only(semacnn_stage_one) -> None:
    module, before, _ = semacnn_stage_one
    assert module.stage == 2
    assert bool(module.padim.fitted)
    assert math.isfinite(float(module.heatmap_scale)) and float(module.heatmap_scale) > 0
    for name, value in module.net.state_dict().items():  # no optimiser step in stage 1
        torch.testing.assert_close(value, before[name], msg=name)
    assert not any(p.requires_grad for p in module.padim.parameters())


def test_each_model_says_where_its_maps_colour_scale_tops(fitted_padim, semacnn_stage_one) -> None:
    """Predict overlays draw a map against ``heatmap_top()``: twice the unit the model gives its
    maps, so that the decision level sits mid-scale; no unit, no fixed scale."""
    from tests.test_autoencoder import autoencoder
    from tests.test_ganae import ganae

    padim, _, _ = fitted_padim
    assert padim.heatmap_top() == pytest.approx(2 * float(padim.threshold))  # score = the map's max
    sema, _, _ = semacnn_stage_one
    assert sema.heatmap_top() == pytest.approx(2 * float(sema.heatmap_scale))
    ae = autoencoder()
    assert ae.heatmap_top() is None  # not fitted: no pixel threshold yet
    ae.pixel_threshold.fill_(0.25)
    ae.threshold.fill_(7.0)
    assert ae.heatmap_top() == 0.5  # the pixel threshold, not the image one
    gan = ganae()
    gan.threshold.fill_(3.0)
    assert gan.heatmap_top() is None  # its threshold is on a combined score, not on the map


def test_the_heatmap_scale_comes_from_unaugmented_training_normals() -> None:
    """The scale is a statistic of training maps applied to unaugmented test maps: it is taken
    from ``image_unaugmented`` (the evaluation transform), not from the augmented image."""
    torch.manual_seed(0)
    plain = next(iter(toy_loader(8, seed=0)))["image"]
    module = semacnn(scale_images=8)
    module.padim.update(plain)
    module.padim.finalize(module.eps)
    batch = {"image": plain.flip(-1) * 0.3, "image_unaugmented": plain, "label": torch.zeros(8).long()}
    module._keep_for_scale(batch)
    assert torch.equal(torch.cat(module._scale_batch), plain)
    assert module.extra_inputs == {"unaugmented"}


def padded_batch(images: torch.Tensor, repeat: list[bool]) -> dict[str, torch.Tensor]:
    """A training batch of normal images as a DDP training loader serves it: ``repeat`` marks
    the images it serves again only to pad its rank (elinspect.data.sharding)."""
    labels = torch.zeros(len(images)).long()
    return {"image": images, "label": labels, "repeat": torch.tensor(repeat)}


def test_padim_fits_each_image_once_when_a_ddp_loader_pads_with_repeats() -> None:
    """The Gaussian and the logged image count leave out the padding: a batch of 8 whose last
    3 are repeats fits as the 5 images alone."""
    torch.manual_seed(0)
    images = next(iter(toy_loader(8, seed=0)))["image"]
    module = PadimModule(Padim(**SMALL), INFO)
    alone = copy.deepcopy(module.padim)  # the same (random) backbone
    assert module.padim_update(padded_batch(images, [False] * 5 + [True] * 3)) == 5
    alone.update(images[:5])
    for got, expected in zip(module.padim.sums(), alone.sums(), strict=True):
        torch.testing.assert_close(got, expected)


def test_the_heatmap_scale_leaves_out_the_padding_of_a_ddp_loader() -> None:
    torch.manual_seed(0)
    plain = next(iter(toy_loader(8, seed=0)))["image"]
    module = semacnn(scale_images=8)
    module._keep_for_scale(padded_batch(plain, [True] + [False] * 7))
    assert torch.equal(torch.cat(module._scale_batch), plain[1:])


def test_a_checkpoint_between_the_stages_loads_at_stage_two(semacnn_stage_one) -> None:
    module, _, path = semacnn_stage_one
    fresh = semacnn()
    assert fresh.stage == 1
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    assert fresh.stage == 2
    torch.testing.assert_close(fresh.padim.mean, module.padim.mean)
    torch.testing.assert_close(fresh.padim.inv_cholesky, module.padim.inv_cholesky)
    assert float(fresh.heatmap_scale) == float(module.heatmap_scale)


def test_resumed_run_trains_the_classifier_without_refitting(semacnn_stage_one) -> None:
    module, _, path = semacnn_stage_one
    torch.manual_seed(1)
    resumed = semacnn()
    losses = EpochLosses()
    # other training images than stage 1 saw: a refit would move the Gaussians
    trainer(max_epochs=3, callbacks=[losses]).fit(
        resumed, toy_loader(8, seed=300, shuffle=True), toy_loader(4, seed=50), ckpt_path=str(path)
    )
    torch.testing.assert_close(resumed.padim.mean, module.padim.mean)
    assert float(resumed.heatmap_scale) == float(module.heatmap_scale)
    optimised = {id(p) for group in resumed.optimizers().optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in resumed.net.parameters()}
    assert len(losses.losses) == 2  # epochs 1 and 2: stage 2
    assert losses.losses[-1] < losses.losses[0]


class LearningRates(L.Callback):
    """Records the classifier's learning rate at the start of every training epoch."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_the_schedule_starts_with_the_classifier_not_the_fit_epoch() -> None:
    """The fit epoch takes no optimiser step, so the schedule must not step after it either:
    torch warns ("lr_scheduler.step() before optimizer.step()") and the classifier's first
    epoch would start part-way down the schedule. Epochs 1..N run the full T_max = N cosine."""
    torch.manual_seed(0)
    module = semacnn(
        scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=2),
        classifier_epochs=2,
    )
    rates = LearningRates()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=3, callbacks=[rates]).fit(module, toy_loader(4, seed=0), toy_loader(2, seed=50))
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert rates.rates == pytest.approx([1e-3, 1e-3, 0.5e-3])


def test_heatmap_with_image_feeds_two_channels(semacnn_stage_one) -> None:
    module, _, _ = semacnn_stage_one
    two = semacnn(heatmap_with_image=True)
    assert two.net.net.conv1.in_channels == 2
    two.padim.load_state_dict(module.padim.state_dict())
    two.heatmap_scale.copy_(module.heatmap_scale)
    images = next(iter(toy_loader(2, seed=90)))["image"]
    inputs = two.classifier_input(two.anomaly_maps(images), images)
    assert inputs.shape == (4, 2, 64, 64)
    torch.testing.assert_close(inputs[:, 1:], images)
    assert two.eval()(images).shape == (4, 2)


# ------------------------------------------------------------------------------- visuals
def test_heatmap_overlay_colours_the_hot_spot_red_and_the_rest_blue() -> None:
    image = torch.full((1, 8, 8), 0.5)
    heatmap = torch.zeros(1, 8, 8)
    heatmap[0, 2, 3] = 5.0
    picture = heatmap_overlay(image, heatmap, vmax=5.0)
    assert picture.dtype == torch.uint8 and picture.shape == (3, 8, 16)
    assert (picture[:, :, :8] == 128).all()  # the left half is the plain image
    hot, cold = picture[:, 2, 8 + 3].int(), picture[:, 0, 8].int()
    assert hot[0] > hot[2] and cold[2] > cold[0]


def test_heatmap_callback_saves_overlays_of_validation_images(fitted_padim, tmp_path: Path) -> None:
    module = copy.deepcopy(fitted_padim[0])
    callback = AnomalyHeatmapCallback(num_images=3)
    trainer(1, callbacks=[callback], default_root_dir=tmp_path).validate(
        module, toy_loader(4, seed=50, batch_size=2), verbose=False
    )
    pictures = sorted((tmp_path / "visuals" / "epoch_000").glob("*.png"))
    assert [p.name for p in pictures] == ["00.png", "01.png", "02.png"]
    picture = read_image(str(pictures[0]))
    assert picture.shape == (3, 64, 128)
    assert not torch.equal(picture[:, :, :64], picture[:, :, 64:])  # the heatmap is drawn over the image


def test_heatmap_captions_give_the_images_score_not_the_maps_maximum(
    fitted_padim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caption's score is the image score the model decides by (GAN-AE's eq. 7, the
    autoencoder's pooled map), not the maximum of the drawn map; here the scores are shifted
    by 100 so that the two differ."""
    module = copy.deepcopy(fitted_padim[0])
    scored = module.score_batch
    shifted: list[float] = []

    def shifted_scores(batch, split):
        out = scored(batch, split)
        shifted.extend((out["scores"] + 100.0).tolist())
        return {**out, "scores": out["scores"] + 100.0}

    monkeypatch.setattr(module, "score_batch", shifted_scores)
    captions: list[str] = []
    monkeypatch.setattr(
        "elinspect.callbacks.anomaly_visuals.save_and_log_pictures",
        lambda trainer, key, pictures, paths, caption_list: captions.extend(caption_list),
    )
    trainer(1, callbacks=[AnomalyHeatmapCallback(num_images=3)], default_root_dir=tmp_path).validate(
        module, toy_loader(4, seed=50, batch_size=2), verbose=False
    )
    assert captions == [f"normal, score {score:.3g}" for score in shifted[:3]]


def test_a_non_finite_score_stops_the_epoch_naming_the_images(fitted_padim) -> None:
    """A NaN score would be dropped by the score collector while its label stays (every later
    pair shifted); it raises instead, naming the batch's images."""
    from elinspect.models.anomaly.scoring import NonFiniteScoreError

    module, _, _ = fitted_padim
    batch = {
        "image": torch.zeros(3, 1, 8, 8),
        "label": torch.tensor([0, 1, 0]),
        "path": ["a.png", "b.png", "c.png"],
    }
    with pytest.raises(NonFiniteScoreError, match=r"nan.*1 image\(s\): b\.png"):
        module.update_scoring("val", torch.tensor([0.1, float("nan"), 0.3]), batch, torch.zeros(3, 1, 8, 8))
    with pytest.raises(NonFiniteScoreError, match=r"inf.*dataset row 12"):
        module.update_scoring(
            "test",
            torch.tensor([float("inf")]),
            {"image": torch.zeros(1, 1, 8, 8), "index": torch.tensor([12])},
            torch.zeros(1, 1, 8, 8),
        )
    assert not module.scores["val"].update_called  # nothing half-collected: no score without its label


@pytest.mark.parametrize("model", ["padim", "ganae", "autoencoder"])
def test_an_anomaly_model_refuses_more_than_two_classes(make_cfg, model: str) -> None:
    """An anomaly model scores normal against defective: its labels are ``label > 0``, and its
    predictions name label 1 by the data's second class. On ELPV's four levels
    (``data.target=four_class``) that would call every anomalous cell "p=1/3", so the model is
    refused where it is built, naming the classes and the binary target."""
    cfg = make_cfg("train.yaml", [f"model={model}", *fast_model_overrides(model)])
    four = DatasetInfo("classification", ("p=0", "p=1/3", "p=2/3", "p=1"), 1, (4, 3, 2, 1))
    with pytest.raises(Exception) as raised:  # Hydra's InstantiationException wraps it
        build_model(cfg.model, effective_loss_config(cfg), four)
    refused = find_user_error(raised.value)
    assert isinstance(refused, ConfigError)
    assert re.search(r"normal or defective.*'p=1/3'.*data.target=binary", str(refused))
    two = DatasetInfo("classification", ("normal", "defective"), 1, (4, 3))
    assert build_model(cfg.model, effective_loss_config(cfg), two).class_names == two.class_names

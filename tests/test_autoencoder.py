"""The convolutional autoencoder baseline (semacnn.txt §2.3, Table 1 row 4): Otsu thresholds on
known bimodal values and residual maps, and a short training on the 32-px toys of test_ganae."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from elinspect.losses import MseFeatureLoss, SsimFeatureLoss
from elinspect.models.anomaly.autoencoder import (
    AutoencoderDetector,
    ConvAutoencoder,
    residual_heatmap,
    segment,
)
from elinspect.models.anomaly.autoencoder_module import AutoencoderModule
from elinspect.models.anomaly.thresholds import otsu_threshold
from tests.conftest import f1_at, f1_threshold_by_hand
from tests.test_ganae import INFO, SIZE, toy_loader, trainer


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: these 32-px networks gain nothing from two, and two threads on a
    core another process keeps busy make small convolutions tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def brute_force_otsu(levels: np.ndarray) -> int:
    """The level k maximising the between-class variance of {≤ k} and {> k} (Otsu 1979)."""
    hist = np.bincount(levels, minlength=256).astype(np.float64)
    p, best, best_k = hist / hist.sum(), -1.0, 0
    for k in range(255):
        w0, w1 = p[: k + 1].sum(), p[k + 1 :].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0 = (np.arange(k + 1) * p[: k + 1]).sum() / w0
        m1 = (np.arange(k + 1, 256) * p[k + 1 :]).sum() / w1
        between = w0 * w1 * (m0 - m1) ** 2
        if between > best:
            best, best_k = between, k
    return best_k


def test_otsu_threshold_separates_a_known_bimodal_set() -> None:
    g = torch.Generator().manual_seed(0)
    low = 0.1 + 0.02 * torch.randn(600, generator=g)
    high = 0.8 + 0.03 * torch.randn(150, generator=g)
    values = torch.cat([low, high])
    t = otsu_threshold(values)
    assert low.max() < t < high.min()
    # OpenCV's Otsu is the textbook one on the same 256-level histogram
    lo, hi = float(values.min()), float(values.max())
    levels = np.rint((values.double().numpy() - lo) / (hi - lo) * 255).astype(np.uint8)
    k, _ = cv2.threshold(levels.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert int(k) == brute_force_otsu(levels)
    assert t == pytest.approx(lo + (k + 0.5) * (hi - lo) / 255)
    assert otsu_threshold(torch.full((5,), 0.3)) == pytest.approx(0.3)  # constant: nothing above it


def test_otsu_segments_the_bright_region_of_a_bimodal_residual() -> None:
    x = torch.full((1, 1, 32, 32), 0.5)
    x_hat = x + 0.02 * torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    x[..., 10:18, 5:25] = 1.0  # a defect the reconstruction does not have
    maps = residual_heatmap(x, x_hat)
    masks = segment(maps, otsu_threshold(maps.flatten()))
    expected = torch.zeros_like(masks)
    expected[..., 10:18, 5:25] = True
    assert torch.equal(masks, expected)


def test_autoencoder_shapes_and_scores() -> None:
    ae = ConvAutoencoder(channels=1, image_size=SIZE, base_channels=8, latent_channels=8, depth=3)
    x = torch.rand(2, 1, SIZE, SIZE)
    out = ae(x)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    detector = AutoencoderDetector(ae, score="max", blur_sigma=0).eval()
    scores, maps = detector(torch.rand(2, 3, 48, 48))
    assert scores.shape == (2,) and maps.shape == (2, 1, 48, 48)
    with pytest.raises(ValueError, match="divisible"):
        ConvAutoencoder(image_size=36, depth=3)


def autoencoder(**kw) -> AutoencoderModule:
    args = {
        "dataset": INFO,
        "optimizer": functools.partial(torch.optim.Adam, lr=3e-3),
        "image_size": SIZE,
        "base_channels": 8,
        "latent_channels": 8,
        "depth": 3,
        **kw,
    }
    return AutoencoderModule(**args)


def test_training_sets_otsu_thresholds_saved_in_the_state_dict_and_defects_score_higher(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    module = autoencoder()
    assert isinstance(module.loss, MseFeatureLoss)  # pixel MSE: no critic, no feature term
    assert math.isnan(float(module.threshold)) and "net.threshold" in module.state_dict()
    fit = trainer(tmp_path, max_epochs=4)
    fit.fit(module, toy_loader(32, 8, seed=0, shuffle=True), toy_loader(12, 12, seed=50))
    threshold, pixel = float(module.threshold), float(module.pixel_threshold)
    assert math.isfinite(threshold) and math.isfinite(pixel)
    assert float(fit.callback_metrics["val/threshold"]) == pytest.approx(threshold)
    saved = module.state_dict()
    assert float(saved["net.threshold"]) == threshold and float(saved["net.pixel_threshold"]) == pixel
    loader = toy_loader(16, 16, seed=200)
    metrics = trainer(tmp_path).test(module, loader, verbose=False)[0]
    assert metrics["test/auroc"] > 0.7
    images = torch.cat([b["image"] for b in loader])
    with torch.no_grad():
        scores, _ = module.eval()(images)
    assert scores[16:].mean() > scores[:16].mean()
    out = module.predict_step({"image": images[:4], "label": torch.zeros(4)}, 0)
    assert out["masks"].dtype == torch.bool and out["masks"].shape == (4, 1, SIZE, SIZE)


def test_the_f1_threshold_is_the_f1_optimal_one_on_validation_and_test_uses_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = autoencoder(threshold="f1")
    fit = trainer(tmp_path, max_epochs=2)
    val_loader = toy_loader(12, 12, seed=50)
    fit.fit(module, toy_loader(32, 8, seed=0, shuffle=True), val_loader)
    images = torch.cat([b["image"] for b in val_loader])
    with torch.no_grad():
        scores, _ = module.eval()(images)
    labels = torch.cat([b["label"] for b in val_loader])
    assert float(module.threshold) == pytest.approx(f1_threshold_by_hand(scores, labels), rel=1e-5)
    test_loader = toy_loader(16, 16, seed=200)
    metrics = trainer(tmp_path).test(module, test_loader, verbose=False)[0]
    with torch.no_grad():
        test_scores, _ = module.eval()(torch.cat([b["image"] for b in test_loader]))
    test_labels = torch.cat([b["label"] for b in test_loader])
    assert metrics["test/f1"] == pytest.approx(
        f1_at(test_scores, test_labels, float(module.threshold)), abs=1e-6
    )


def test_ssim_loss_trains_the_autoencoder_too(tmp_path: Path) -> None:
    module = autoencoder(loss=SsimFeatureLoss(), threshold="f1")
    fit = trainer(tmp_path, max_epochs=1)
    fit.fit(module, toy_loader(16, 0, seed=0), toy_loader(4, 4, seed=50))
    assert math.isfinite(float(fit.callback_metrics["train/loss"]))
    assert float(fit.callback_metrics["train/loss"]) < 0  # −SSIM
    with pytest.raises(TypeError, match="reconstruction loss"):
        autoencoder(loss=torch.nn.CrossEntropyLoss())

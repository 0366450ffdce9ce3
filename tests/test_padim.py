"""PaDiM / SeMaCNN anomaly maps: embeddings, the streaming Gaussian fit, Mahalanobis scoring,
and that a fitted model finds a dark blob on smooth textures. Random-init ResNet-18, small sizes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F
from torchvision.transforms.functional import gaussian_blur

from elinspect.models.anomaly.padim import (
    Padim,
    gaussian_from_sums,
    random_channels,
    semi_orthogonal_matrix,
    unpack_lower,
    unpack_symmetric,
)
from elinspect.models.anomaly.scoring import gaussian_blur_separable

SMALL = {"feature_size": 16, "k": 20}


def smooth_textures(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Grey N×1×size×size images in [0, 1]: two random low-frequency, low-contrast gratings on mid-grey."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for _ in range(n):
        image = torch.full((size, size), 0.55)
        for _ in range(2):
            angle, phase = torch.rand(2, generator=g) * 2 * math.pi
            freq = 0.04 + 0.04 * torch.rand((), generator=g)
            image += 0.06 * torch.sin(2 * math.pi * freq * (xx * angle.cos() + yy * angle.sin()) + phase)
        images.append(image)
    return torch.stack(images)[:, None].clamp(0, 1)


def add_dark_blob(
    images: torch.Tensor, seed: int = 1, margin: int = 20
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The same images with a dark Gaussian blob (σ 4 px) at least ``margin`` px inside; returns
    the centres (y, x)."""
    g = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out, centres = images.clone(), []
    for i in range(len(images)):
        cy, cx = torch.randint(margin, size - margin, (2,), generator=g).tolist()
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0**2))
        out[i, 0] *= 1 - 0.9 * blob
        centres.append((cy, cx))
    return out, centres


@pytest.fixture(scope="module")
def fitted() -> Padim:
    """Fitted on 32 normal 128×128 textures. (On 64×64 images the stride-16 layer3 of a random
    ResNet-18 sees the whole image and a blob lights up the border cells, whose features
    padding makes nearly constant; 128×128 leaves room. Checked for backbone seeds 0–4.)"""
    torch.manual_seed(0)
    model = Padim(**SMALL)
    for batch in smooth_textures(32, size=128, seed=3).split(16):
        model.update(batch)
    model.finalize()
    return model


# ------------------------------------------------------------------------------ embeddings
def test_semi_orthogonal_matrix_has_orthonormal_columns_and_is_seeded() -> None:
    w = semi_orthogonal_matrix(448, 100, seed=7)
    assert w.shape == (448, 100)
    torch.testing.assert_close(w.T @ w, torch.eye(100), atol=1e-5, rtol=0)
    assert torch.equal(w, semi_orthogonal_matrix(448, 100, seed=7))
    assert not torch.allclose(w, semi_orthogonal_matrix(448, 100, seed=8))
    with pytest.raises(ValueError, match="1..448"):
        semi_orthogonal_matrix(448, 449)


def test_semi_orthogonal_embedding_projects_the_features() -> None:
    model = Padim(**SMALL, seed=5)
    images = torch.rand(2, 3, 64, 64)
    features = model.features(images).flatten(2).transpose(1, 2)
    assert features.shape == (2, 256, model.feature_dims)
    torch.testing.assert_close(
        model.embed(images), features @ semi_orthogonal_matrix(model.feature_dims, 20, 5)
    )


def test_random_select_picks_k_distinct_channels_seeded() -> None:
    index = random_channels(448, 100, seed=3)
    assert index.shape == (100,) and len(set(index.tolist())) == 100
    assert int(index.min()) >= 0 and int(index.max()) < 448
    assert torch.equal(index, random_channels(448, 100, seed=3))
    assert not torch.equal(index, random_channels(448, 100, seed=4))
    model = Padim(**SMALL, embedding="random_select", seed=3)
    images = torch.rand(2, 3, 64, 64)
    features = model.features(images).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.embed(images), features[..., random_channels(model.feature_dims, 20, 3)])


def test_no_embedding_keeps_all_channels() -> None:
    model = Padim(feature_size=8, embedding="none")
    assert model.k == model.feature_dims == 64 + 128 + 256
    assert model.embed(torch.rand(1, 3, 64, 64)).shape == (1, 64, 448)


# ---------------------------------------------------------------------------- streaming fit
@pytest.mark.parametrize("splits", [[6], [2, 1, 3]])
def test_streaming_fit_equals_a_batch_fit(splits: list[int]) -> None:
    images = torch.rand(6, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    model = Padim(**SMALL)
    for chunk in images.split(splits):
        model.update(chunk)
    mean, cov = gaussian_from_sums(*model.sums())
    assert float(model.count) == 6

    # Reference: torch.cov of all embeddings stacked. They are computed with the same batch
    # split, because a float32 convolution rounds differently for another batch size (~1e-7).
    stacked = torch.cat([model.embed(chunk) for chunk in images.split(splits)]).double()  # N×P×k
    ref_mean = stacked.mean(dim=0)
    ref_cov = torch.stack([torch.cov(stacked[:, p].T) for p in range(stacked.shape[1])])
    torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cov, ref_cov, atol=1e-6, rtol=1e-6)

    model.finalize(eps=0.01)
    precision = torch.linalg.inv(ref_cov + 0.01 * torch.eye(model.k, dtype=torch.float64))
    inv_chol = model.inverse_cholesky().double()
    # Σ comes from float32 batch products (relative error ~1e-7), and (Σ + εI)⁻¹ multiplies
    # that by its condition number (~10⁴ here: 6 images, k = 20): relative to its largest entry
    torch.testing.assert_close(
        inv_chol.transpose(1, 2) @ inv_chol, precision, rtol=1e-4, atol=1e-5 * float(precision.abs().max())
    )
    torch.testing.assert_close(model.mean.double(), ref_mean, rtol=1e-6, atol=1e-6)


def test_one_batch_and_three_batches_give_the_same_gaussian() -> None:
    images = torch.rand(6, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    one = Padim(**SMALL)
    three = copy.deepcopy(one)  # the same random backbone
    one.update(images)
    for chunk in images.split([2, 1, 3]):
        three.update(chunk)
    (mean1, cov1), (mean3, cov3) = gaussian_from_sums(*one.sums()), gaussian_from_sums(*three.sums())
    # equal up to the float32 rounding of the backbone (relative 1e-5 of the largest entry)
    torch.testing.assert_close(mean3, mean1, atol=1e-5 * mean1.abs().max(), rtol=0)
    torch.testing.assert_close(cov3, cov1, atol=1e-5 * cov1.abs().max(), rtol=0)


def test_sum_memory_does_not_grow_with_the_number_of_images() -> None:
    def sum_bytes(model: Padim) -> list[int]:
        return [t.numel() * t.element_size() for t in model.sums()]

    images = torch.rand(40, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    few = Padim(feature_size=8, k=10)
    many = copy.deepcopy(few)
    few.update(images[:4])
    for batch in images.split(8):
        many.update(batch)
    assert float(few.count) == 4 and float(many.count) == 40
    assert sum_bytes(few) == sum_bytes(many) == [64 * 10 * 8, 64 * 55 * 8, 8]  # Σxxᵀ: packed triangle
    assert not torch.equal(few.sums()[1], many.sums()[1])


def test_sums_reduced_over_ranks_give_the_single_process_fit() -> None:
    images = torch.rand(6, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    single = Padim(**SMALL)
    rank0, rank1, reduced = (copy.deepcopy(single) for _ in range(3))  # one backbone, as under DDP
    single.update(images)
    rank0.update(images[:4])
    rank1.update(images[4:])
    reduced.load_sums(*(a + b for a, b in zip(rank0.sums(), rank1.sums(), strict=True)))
    single.finalize()
    reduced.finalize()
    assert float(reduced.count) == 6
    torch.testing.assert_close(reduced.mean, single.mean)
    torch.testing.assert_close(reduced.inverse_cholesky(), single.inverse_cholesky(), rtol=1e-4, atol=1e-4)


def fit_on_embeddings(model: Padim, batches: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    """``update`` with these N×P×k embeddings in place of the backbone's."""
    given = iter(batches)
    monkeypatch.setattr(model, "embed", lambda images: next(given))
    for _ in batches:
        model.update(torch.zeros(1, 3, 8, 8))
    monkeypatch.undo()


def reference_covariances(batches: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.cat(batches).double()  # N×P×k
    return torch.stack([torch.cov(stacked[:, p].T) for p in range(stacked.shape[1])])


def test_the_fit_keeps_its_accuracy_for_features_far_from_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch products run in float32: on features of mean 100 and spread 0.01 the plain
    products Σxxᵀ (≈ 10⁴ per image) would lose the covariance (≈ 10⁻⁴) to rounding; about the
    first batch's mean they keep it to float32's relative precision."""
    gen = torch.Generator().manual_seed(0)
    batches = [100 + 0.01 * torch.randn(8, 16, 5, generator=gen) for _ in range(3)]
    model = Padim(feature_size=4, k=5)
    fit_on_embeddings(model, batches, monkeypatch)
    mean, cov = gaussian_from_sums(*model.sums())
    ref_cov = reference_covariances(batches)
    torch.testing.assert_close(mean, torch.cat(batches).double().mean(dim=0), rtol=1e-12, atol=0)
    torch.testing.assert_close(cov, ref_cov, rtol=0, atol=1e-5 * float(ref_cov.abs().max()))


def test_sums_handed_out_mid_fit_go_on_to_the_same_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sums()`` (a checkpoint, a reduction) turns the shifted sums into plain ones; the fit
    then goes on about a new shift and ends where an uninterrupted one does."""
    gen = torch.Generator().manual_seed(1)
    batches = [3 + torch.randn(4, 16, 5, generator=gen) for _ in range(4)]
    straight, handed = Padim(feature_size=4, k=5), Padim(feature_size=4, k=5)
    fit_on_embeddings(straight, batches, monkeypatch)
    fit_on_embeddings(handed, batches[:2], monkeypatch)
    halfway = [t.clone() for t in handed.sums()]
    fit_on_embeddings(handed, batches[2:], monkeypatch)
    _, half_cov = gaussian_from_sums(*halfway)
    torch.testing.assert_close(half_cov, reference_covariances(batches[:2]), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(handed.sums(), straight.sums(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(
        gaussian_from_sums(*handed.sums())[1], reference_covariances(batches), rtol=1e-5, atol=1e-5
    )


def test_the_gpus_gathered_triangle_and_the_cpus_rows_give_the_same_sums(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``update`` adds a batch's packed triangle row by row on a CPU and by one gather on a GPU;
    both must give the same sums (the gather path run here on the CPU)."""
    import elinspect.models.anomaly.padim as padim_code

    gen = torch.Generator().manual_seed(3)
    batches = [2 + torch.randn(4, 16, 5, generator=gen) for _ in range(3)]
    rows, gathered = Padim(feature_size=4, k=5), Padim(feature_size=4, k=5)
    fit_on_embeddings(rows, batches, monkeypatch)
    monkeypatch.setattr(padim_code, "gathers_packed", lambda device: True)
    fit_on_embeddings(gathered, batches, monkeypatch)
    for ours, theirs in zip(gathered.sums(), rows.sums(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_finalize_needs_two_images() -> None:
    model = Padim(**SMALL)
    with pytest.raises(RuntimeError, match="at least 2 images, got 0"):
        model.finalize()
    model.update(torch.rand(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="at least 2 images, got 1"):
        model.finalize()


# ---------------------------------------------------------------------------------- scoring
def test_mahalanobis_is_zero_at_the_mean_and_grows_with_distance(fitted: Padim) -> None:
    mean = fitted.mean.unsqueeze(0)  # 1×P×k
    assert fitted.mahalanobis(mean).abs().max() < 1e-3

    direction = torch.randn(1, *fitted.mean.shape, generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0])
    dists = torch.cat([fitted.mahalanobis(mean + t * direction) for t in steps])  # 5×P
    assert torch.all(dists[1:] > dists[:-1])
    torch.testing.assert_close(
        dists / dists[2], (steps / steps[2])[:, None].expand_as(dists), rtol=1e-3, atol=0
    )

    # the same as sqrt(δᵀ (Σ + εI)⁻¹ δ) with the covariance from the sums, in float64
    _, cov = gaussian_from_sums(*fitted.sums())
    delta = direction[0].double()
    precision = torch.linalg.inv(cov + 0.01 * torch.eye(fitted.k, dtype=torch.float64))
    ref = torch.einsum("pk,pkl,pl->p", delta, precision, delta).sqrt()
    torch.testing.assert_close(dists[2].double(), ref, rtol=1e-3, atol=1e-3)


def test_dark_blob_scores_higher_and_the_map_peaks_at_it(fitted: Padim) -> None:
    normal = smooth_textures(8, size=128, seed=11)
    defective, centres = add_dark_blob(normal, seed=12)
    with torch.no_grad():
        normal_maps, defect_maps = fitted(normal).anomaly_map, fitted(defective).anomaly_map
    normal_scores, defect_scores = Padim.image_score(normal_maps), Padim.image_score(defect_maps)
    assert defect_scores.mean() > 1.2 * normal_scores.mean()
    assert (defect_scores > normal_scores).all()  # each image against its own blob-free twin
    for one_map, (cy, cx) in zip(defect_maps[:, 0], centres, strict=True):
        py, px = divmod(int(one_map.argmax()), one_map.shape[-1])
        assert math.hypot(py - cy, px - cx) <= 16, ((py, px), (cy, cx))  # blob radius 2σ = 8 px


def test_output_is_one_map_per_image_at_input_size_for_non_square_input(fitted: Padim) -> None:
    grey = torch.rand(2, 1, 48, 80)
    maps = fitted(grey).anomaly_map
    assert maps.shape == (2, 1, 48, 80)
    torch.testing.assert_close(
        maps, fitted(grey.expand(-1, 3, -1, -1)).anomaly_map
    )  # grey is repeated to RGB
    assert Padim.image_score(maps).shape == (2,)


def test_map_is_the_upsampled_distance_blurred_with_sigma_4(fitted: Padim) -> None:
    images = smooth_textures(2, seed=4)
    grid = fitted.mahalanobis(fitted.embed(images)).view(2, 1, 16, 16)
    upsampled = F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)
    expected = gaussian_blur(upsampled, kernel_size=[33, 33], sigma=[4.0, 4.0])  # PaDiM: σ 4 input pixels
    assert not torch.allclose(expected, upsampled, atol=1e-2)
    # separable passes sum in another order than torchvision's 2-d kernel: float32 rounding
    torch.testing.assert_close(fitted(images).anomaly_map, expected, rtol=1e-5, atol=1e-5)

    fitted.blur_at = "grid"  # the cheaper variant: blur the feature grid, then upsample
    try:
        on_grid = fitted(images).anomaly_map
    finally:
        fitted.blur_at = "input"
    blurred_grid = gaussian_blur(
        grid, kernel_size=[31, 31], sigma=[4.0, 4.0]
    )  # kernel capped by the 16 cells
    torch.testing.assert_close(
        on_grid,
        F.interpolate(blurred_grid, size=(64, 64), mode="bilinear", align_corners=False),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(("kernel", "sigma"), [(33, 4.0), (7, 1.5), (1, 0.5)])
def test_the_separable_blur_is_torchvisions_gaussian_blur(kernel: int, sigma: float) -> None:
    maps = torch.rand(2, 3, 40, 57, dtype=torch.float64)
    expected = gaussian_blur(maps, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    torch.testing.assert_close(gaussian_blur_separable(maps, kernel, sigma), expected, rtol=1e-12, atol=1e-12)


def test_distances_blur_and_fit_stay_float32_under_bf16_autocast(fitted: Padim, monkeypatch) -> None:
    """Under ``precision=bf16-mixed`` (``trainer=gpu``) Lightning runs every step in autocast;
    the Mahalanobis distances, the blurred maps and the fit's Σxxᵀ must not be rounded to bf16
    (8 bits of mantissa: distances near 10 move by ~0.05, and scores tie)."""
    g = torch.Generator().manual_seed(0)
    embeddings = fitted.mean + torch.randn(4, *fitted.mean.shape, generator=g)
    maps = torch.rand(2, 1, 40, 40, generator=g) * 30
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fitted.mahalanobis(embeddings), fitted._blur(maps)
    exact = fitted.mahalanobis(embeddings), fitted._blur(maps)
    for got, want in zip(mixed, exact, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    batches = [torch.randn(6, 16 * 16, SMALL["k"], generator=g) + 5 for _ in range(2)]
    plain, mixed_fit = Padim(**SMALL), Padim(**SMALL)
    fit_on_embeddings(plain, batches, monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fit_on_embeddings(mixed_fit, batches, monkeypatch)
    torch.testing.assert_close(mixed_fit.sum_xx, plain.sum_xx, rtol=1e-6, atol=1e-4)


def test_forward_before_fit_raises() -> None:
    with pytest.raises(RuntimeError, match="fit first"):
        Padim(**SMALL)(torch.rand(1, 3, 64, 64))


def test_fitted_gaussian_round_trips_through_state_dict(fitted: Padim) -> None:
    state = fitted.state_dict()
    assert {"mean", "inv_cholesky", "fitted", "projection"} <= set(state)
    assert not {"sum_x", "sum_xx", "count"} & set(state)  # the running sums stay out of checkpoints
    fresh = Padim(**SMALL)
    assert not fresh.is_fitted and fitted.is_fitted
    fresh.load_state_dict(state)
    assert fresh.is_fitted  # a loaded Gaussian scores at once
    images = smooth_textures(2, seed=9)
    torch.testing.assert_close(tuple(fresh(images)), tuple(fitted(images)))


def test_backbone_stays_in_eval_mode() -> None:
    model = Padim(**SMALL).train()
    assert model.training and not model.extractor.training
    assert not any(p.requires_grad for p in model.parameters())
    images = torch.rand(2, 3, 64, 64)
    twin = copy.deepcopy(model)  # torchvision's DualGraphModule comes back from deepcopy in train mode
    torch.testing.assert_close(twin.embed(images), model.embed(images))
    torch.testing.assert_close(twin.embed(images[:1]), model.embed(images)[:1], rtol=1e-4, atol=1e-4)
    # folded: no batch norm is left whose statistics could move
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in twin.extractor.modules())


def test_fitted_model_exports_with_torch_export(fitted: Padim) -> None:
    images = smooth_textures(2, seed=5)
    exported = torch.export.export(fitted, (images,))
    torch.testing.assert_close(tuple(exported.module()(images)), tuple(fitted(images)))


def test_packed_sums_unpack_to_the_full_symmetric_matrices() -> None:
    x = torch.randn(5, 3, 4, dtype=torch.float64)  # 5 positions, 3 samples, k = 4
    full = x.transpose(1, 2) @ x
    rows, cols = torch.triu_indices(4, 4)
    torch.testing.assert_close(unpack_symmetric(full[:, rows, cols], 4), full)
    lower = torch.linalg.cholesky(full + torch.eye(4, dtype=torch.float64))
    rows, cols = torch.tril_indices(4, 4)
    torch.testing.assert_close(unpack_lower(lower[:, rows, cols], 4), lower)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("embedding", ["semi_orthogonal", "random_select"])
def test_embedding_layer_by_layer_equals_the_embedding_of_the_concatenated_features(
    embedding: str, interpolation: str
) -> None:
    """embed() resizes each layer after embedding it (fewer channels to resize); resizing is
    linear, so this must equal embedding the resized, concatenated features of features()."""
    model = Padim(feature_size=16, k=100, embedding=embedding, interpolation=interpolation)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    features = model.features(images).flatten(2).transpose(1, 2)  # N×P×D
    if embedding == "semi_orthogonal":
        expected = features @ model.projection
    else:
        expected = features.index_select(-1, model.channel_index)
    torch.testing.assert_close(model.embed(images), expected, rtol=1e-4, atol=1e-5)

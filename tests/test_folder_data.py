"""``data=folder``: listing, mask matching and binarisation, splits, augmentation that keeps
masks aligned, errors that name the file, and pixel-level AUROC of PaDiM and SeMaCNN."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from elinspect.data.errors import DatasetError
from elinspect.data.folder import FolderDataModule, collect_samples, read_mask
from elinspect.data.synthetic.folder import write_folder_dataset
from elinspect.metrics.pixel import PixelAuroc, exact_auroc
from elinspect.train import train
from tests.conftest import FAST_DATA_OVERRIDES, fast_model_overrides


def write(path: Path, image: np.ndarray, *params: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image, list(params))
    return path


def texture(seed: int, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(60, 100, (size, size), dtype=np.uint8)


def with_blob(image: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with a bright rectangle (x0, y0, x1, y1 exclusive) and its 0/255 mask."""
    x0, y0, x1, y1 = box
    image, mask = image.copy(), np.zeros(image.shape[:2], np.uint8)
    image[y0:y1, x0:x1] = 250
    mask[y0:y1, x0:x1] = 255
    return image, mask


def datamodule(root: Path, **kw) -> FolderDataModule:
    dm = FolderDataModule(root=str(root), image_size=kw.pop("image_size", 40), num_workers=0, **kw)
    dm.setup()
    return dm


def items(dm: FolderDataModule, split: str) -> list[dict]:
    dataset = dm.dataset(split)
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 normal and 16 defect images (bright and dark spots) of 64 px, masks named *_mask.png."""
    return write_folder_dataset(tmp_path_factory.mktemp("folder"), 40, 16, seed=0, image_size=64)["root"]


# --------------------------------------------------------------------------------- splits
def test_splits_labels_and_counts(synthetic: Path) -> None:
    dm = datamodule(synthetic, mask_dir="masks", image_size=64)
    labels = {s: [dm.samples[i].label for i in dm.split_indices[s]] for s in ("train", "val", "test")}
    # normal_dir: 20 % test, 20 % val, rest train; defects (held out) half val, half test per type
    assert [labels["train"].count(k) for k in (0, 1)] == [24, 0]
    assert [labels["val"].count(k) for k in (0, 1)] == [8, 8]
    assert [labels["test"].count(k) for k in (0, 1)] == [8, 8]
    everything = np.concatenate(list(dm.split_indices.values()))
    assert sorted(everything.tolist()) == list(range(56))
    assert dm.info.class_counts == (24, 0) and dm.info.task == "anomaly" and dm.info.in_channels == 3
    groups = {s.group for s in dm.split_samples("test") if s.label}
    assert groups == {"defect/bright_spot", "defect/dark_spot"}  # stratified by defect type
    assert all(s.mask.name == f"{s.path.stem}_mask.png" for s in dm.samples if s.label)
    assert all(s.mask.parent.name == s.path.parent.name for s in dm.samples if s.label)

    same = datamodule(synthetic, mask_dir="masks")
    other = datamodule(synthetic, mask_dir="masks", split_seed=7)
    assert all((same.split_indices[s] == dm.split_indices[s]).all() for s in dm.split_indices)
    assert not np.array_equal(other.split_indices["test"], dm.split_indices["test"])

    both = datamodule(synthetic, train_normal_only=False)
    train = [both.samples[i].label for i in both.split_indices["train"]]
    assert train.count(0) == 24 and train.count(1) == 8  # 8 defects per type: 2 test, 2 val, 4 train
    batch = next(iter(both.train_dataloader()))
    assert "mask" not in batch  # no mask_dir, no masks
    assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 40, 40)
    assert batch["label"].dtype == torch.int64
    assert all(
        Path(p) == both.samples[int(i)].path for p, i in zip(batch["path"], batch["index"], strict=True)
    )


def test_mvtec_layout_with_held_out_normals(tmp_path: Path) -> None:
    """MVTec-AD as it ships: train/good; test/{good,<type>}; ground_truth/<type>/NNN_mask.png with
    the same stems in every type — each defect must get the mask of its own type."""
    for i in range(6):
        write(tmp_path / "train" / "good" / f"{i:03d}.png", texture(i))
    for i in range(2):
        write(tmp_path / "test" / "good" / f"{i:03d}.png", texture(10 + i))
    boxes = {"crack": (2, 2, 12, 12), "hole": (25, 25, 38, 38)}
    for kind, box in boxes.items():
        for i in range(2):
            image, mask = with_blob(texture(20 + i), box)
            write(tmp_path / "test" / kind / f"{i:03d}.png", image)
            write(tmp_path / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    dm = datamodule(
        tmp_path,
        normal_dir="train/good",
        normal_test_dir="test/good",
        defect_dir="test",
        mask_dir="ground_truth",
        val_fraction=0,
        test_fraction=0,
    )
    assert len(dm.samples) == 12
    assert [dm.samples[i].source for i in dm.split_indices["train"]] == ["normal"] * 6
    held = [dm.samples[i] for s in ("val", "test") for i in dm.split_indices[s]]
    assert sorted(s.source for s in held) == ["defect"] * 4 + ["normal_test"] * 2  # test/good never a defect
    for s in dm.samples:
        if s.label:
            assert s.mask.parent.name == s.path.parent.name and s.mask.stem == f"{s.path.stem}_mask"
    for item in items(dm, "val") + items(dm, "test"):
        mask = item["mask"][0].numpy()
        sample = dm.samples[item["index"]]
        if sample.label:
            x0, y0, x1, y1 = boxes[sample.path.parent.name]
            assert mask[y0:y1, x0:x1].all() and mask.sum() == (x1 - x0) * (y1 - y0)
        else:
            assert not mask.any()


# ----------------------------------------------------------------------------------- masks
def test_masks_are_binarised_resized_nearest_and_aligned(tmp_path: Path) -> None:
    for i in range(5):
        write(tmp_path / "good" / f"{i}.png", texture(i))
    image, mask = with_blob(texture(9), (8, 4, 24, 20))
    write(tmp_path / "defect" / "a.png", image)
    write(tmp_path / "masks" / "a_mask.png", mask)  # 0 / 255
    write(tmp_path / "defect" / "b.png", image)
    write(tmp_path / "masks" / "b.png", (mask > 0).astype(np.uint8))  # label mask 0 / 1, no suffix
    write(tmp_path / "defect" / "c.png", image)
    write(tmp_path / "masks" / "c.png", (mask > 0).astype(np.uint16) * 1)  # 16-bit label mask
    write(tmp_path / "defect" / "d.png", image)
    write(tmp_path / "masks" / "d.jpg", mask, cv2.IMWRITE_JPEG_QUALITY, 50)  # lossy: noisy edges

    jpeg = cv2.imread(str(tmp_path / "masks" / "d.jpg"), cv2.IMREAD_UNCHANGED)
    assert ((jpeg > 0) != (mask > 0)).sum() > 0  # "> 0" would be wrong for the JPEG mask
    assert (read_mask(tmp_path / "masks" / "d.jpg") != (mask > 0)).sum() <= 4
    assert (read_mask(tmp_path / "masks" / "d.jpg", threshold=0.0) != (mask > 0)).sum() > 4

    dm = datamodule(tmp_path, mask_dir="masks", image_size=20, val_fraction=0.2, test_fraction=0.2)
    expected = np.zeros((20, 20), np.uint8)
    expected[2:10, 4:12] = 1  # the rectangle at half size
    defects = [it for s in ("val", "test") for it in items(dm, s) if it["label"] == 1]
    assert len(defects) == 4
    for item in defects:
        mask = item["mask"]
        assert mask.dtype == torch.uint8 and mask.shape == (1, 20, 20)
        assert set(mask.unique().tolist()) == {0, 1}
        assert (mask[0].numpy() != expected).sum() <= 2, Path(item["path"]).name
        bright = item["image"].mean(0)
        assert bright[mask[0] == 1].min() > 0.9 > 0.45 > bright[mask[0] == 0].max()


def test_augmentation_moves_the_mask_with_the_image(tmp_path: Path) -> None:
    for i in range(3):
        write(tmp_path / "good" / f"{i}.png", texture(i))
    image, mask = with_blob(texture(5), (2, 5, 14, 15))  # off-centre, so a flip moves it
    write(tmp_path / "defect" / "x.png", image)
    write(tmp_path / "masks" / "x.png", mask)
    kw = {"mask_dir": "masks", "train_normal_only": False, "val_fraction": 0, "test_fraction": 0}
    plain = items(datamodule(tmp_path, **kw), "train")[-1]
    flip = {"hflip": 1.0, "vflip": 0.0, "rotate_limit": 0}
    flipped = items(datamodule(tmp_path, augment=flip, **kw), "train")[-1]
    assert plain["label"] == 1 and plain["mask"].sum() > 0
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    rotate = {"hflip": 0.0, "vflip": 0.0, "rotate_limit": 90, "rotate_p": 1.0}
    torch.manual_seed(0)
    for item in items(datamodule(tmp_path, augment=rotate, **kw), "train")[-1:] * 3:
        grey, inside = item["image"].mean(0), item["mask"][0] == 1
        assert inside.sum() > 50 and grey[inside].mean() > 0.9 and grey[~inside].mean() < 0.5


def test_any_common_format_depth_and_channel_count(tmp_path: Path) -> None:
    grey = texture(0)
    write(tmp_path / "good" / "grey.png", grey)
    write(tmp_path / "good" / "rgb.jpg", cv2.merge([grey, grey // 2, grey]))
    write(tmp_path / "good" / "deep.png", grey.astype(np.uint16) * 257)  # 16-bit
    write(tmp_path / "good" / "old.BMP", grey)
    write(tmp_path / "good" / "scan.tif", grey)
    write(tmp_path / "good" / ".hidden.png", grey)  # ignored
    write(tmp_path / "defect" / "wide.png", np.zeros((30, 50), np.uint8))
    for channels in (1, 3):
        dm = datamodule(tmp_path, channels=channels, image_size=16, val_fraction=0, test_fraction=0)
        assert len(dm.samples) == 6
        for item in items(dm, "train") + items(dm, "test") + items(dm, "val"):
            assert item["image"].shape == (channels, 16, 16)
            if "deep" in item["path"]:  # the 16-bit image scaled to 8 bits, not clipped
                assert 0.2 < float(item["image"].mean()) < 0.4


# ---------------------------------------------------------------------------------- errors
def test_errors_name_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(DatasetError, match="dataset root does not exist"):
        collect_samples(tmp_path / "nowhere", "good", "defect")
    for i in range(4):
        write(tmp_path / "good" / f"{i}.png", texture(i))
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'defect'}: defect_dir directory does not exist"):
        collect_samples(tmp_path, "good", "defect")
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'ok'}: normal_dir directory does not exist"):
        collect_samples(tmp_path, "ok", None)

    image, mask = with_blob(texture(7), (1, 1, 5, 5))
    write(tmp_path / "defect" / "fine.png", image)
    write(tmp_path / "masks" / "fine.png", mask)
    write(tmp_path / "defect" / "bigmask.png", image)
    write(tmp_path / "masks" / "bigmask.png", np.zeros((41, 40), np.uint8))
    write(tmp_path / "defect" / "nomask.png", image)
    write(tmp_path / "masks" / "orphan_mask.png", mask)
    (tmp_path / "good" / "broken.png").write_text("not an image")
    (tmp_path / "good" / "empty.png").write_bytes(b"")

    with pytest.raises(
        DatasetError, match=rf"{tmp_path / 'good' / 'broken.png'}: cannot read the image header"
    ):
        collect_samples(tmp_path, "good", "defect", "masks")
    (tmp_path / "good" / "broken.png").unlink()
    (tmp_path / "good" / "empty.png").unlink()
    with pytest.raises(
        DatasetError, match=r"bigmask.png: mask is 40×41 but its image .*bigmask.png is 40×40"
    ):
        collect_samples(tmp_path, "good", "defect", "masks")
    (tmp_path / "masks" / "bigmask.png").unlink()
    (tmp_path / "defect" / "bigmask.png").unlink()
    with pytest.raises(DatasetError, match=r"nomask.png: defect image has no mask: no 'nomask_mask.\*' or"):
        collect_samples(tmp_path, "good", "defect", "masks")

    write(tmp_path / "defect" / "bigmask.png", image)
    write(tmp_path / "masks" / "bigmask.png", np.zeros((41, 40), np.uint8))
    (tmp_path / "good" / "broken.png").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="elinspect.data.folder"):
        samples = collect_samples(tmp_path, "good", "defect", "masks", on_error="skip")
    assert sorted(s.path.name for s in samples) == ["0.png", "1.png", "2.png", "3.png", "fine.png"]
    assert "1 × unreadable image" in caplog.text and "1 × mask size differs from image" in caplog.text
    assert "1 × missing, ambiguous or unreadable mask" in caplog.text
    assert "1 mask file(s) match no defect image, e.g. masks/orphan_mask.png" in caplog.text


def test_ambiguous_and_shared_masks_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "good" / "0.png", texture(0))
    image, mask = with_blob(texture(1), (1, 1, 5, 5))
    write(tmp_path / "defect" / "x.png", image)
    write(tmp_path / "masks" / "x.png", mask)
    write(tmp_path / "masks" / "x_mask.png", mask)
    with pytest.raises(DatasetError, match="several masks fit the defect image equally well"):
        collect_samples(tmp_path, "good", "defect", "masks")
    (tmp_path / "masks" / "x_mask.png").unlink()
    write(tmp_path / "defect" / "sub" / "x.png", image)  # a second x.png, one flat mask
    with pytest.raises(DatasetError, match=r"its mask .*x.png is already the mask of"):
        collect_samples(tmp_path, "good", "defect", "masks")


# ---------------------------------------------------------------------------- pixel AUROC
def test_pixel_auroc_is_exact_with_ties_and_any_score_range() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 50, (6, 1, 20, 20), generator=g).float() * 100  # ties, far outside [0, 1]
    masks = (torch.rand(6, 1, 20, 20, generator=g) < 0.1 + maps / 10_000).to(torch.uint8)
    metric = PixelAuroc()
    for m, t in zip(maps.split(4), masks.split(4), strict=True):
        metric.update(m, t)
    expected = binary_auroc(maps.flatten() / 5000, masks.flatten())
    assert float(metric.compute()) == pytest.approx(float(expected), abs=1e-6)
    assert float(exact_auroc(maps.flatten() * 1e6, masks.flatten() > 0)) == pytest.approx(
        float(expected), abs=1e-6
    )
    small = PixelAuroc(max_size=10)
    small.update(maps, masks)
    assert small.scores[0].numel() == 6 * 10 * 10
    only_normal = PixelAuroc()
    only_normal.update(maps, torch.zeros_like(masks))
    assert torch.isnan(only_normal.compute())
    with pytest.raises(ValueError, match="same size"):
        PixelAuroc().update(maps, masks[..., :10])


@pytest.mark.parametrize("model", ["padim", "semacnn"])
def test_training_on_folder_logs_a_pixel_auroc_that_follows_the_masks(
    make_cfg, synthetic: Path, model: str
) -> None:
    """Random-init ResNet-18 features find the spots: pixel AUROC > 0.9 with the true masks.
    Within the defect images alone the maps must still pick the spot's pixels, while against
    the masks shifted by half the image (cyclically, so no spot meets itself) they score below
    chance: maps misaligned with their masks would show."""
    overrides = [
        f"model={model}",
        "data=folder",
        f"data.root='{synthetic}'",
        *FAST_DATA_OVERRIDES["folder"],
        *fast_model_overrides(model),
        "trainer.max_epochs=1",
        "logger=csv",
        "callbacks=none",
    ]
    metrics, objects = train(make_cfg("train.yaml", overrides))
    assert metrics["test/pixel_auroc"] > 0.9 and metrics["val/pixel_auroc"] > 0.9
    if model != "padim":
        return
    lightning_module, dm = objects["model"], objects["datamodule"]
    everything, aligned, shifted = PixelAuroc(), PixelAuroc(), PixelAuroc()
    with torch.no_grad():
        for batch in dm.test_dataloader():
            maps = lightning_module.anomaly_maps(batch["image"])
            everything.update(maps, batch["mask"])
            defective = batch["label"] == 1
            aligned.update(maps[defective], batch["mask"][defective])
            shifted.update(maps[defective], batch["mask"][defective].roll((32, 32), dims=(-2, -1)))
    assert float(everything.compute()) == pytest.approx(metrics["test/pixel_auroc"], abs=1e-5)
    assert float(aligned.compute()) > 0.85 and float(shifted.compute()) < 0.5


def test_training_items_carry_their_unaugmented_image_on_request(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_folder_dataset(root, num_normal=12, num_defect=6, seed=0)
    kwargs = {"root": str(root), "image_size": 32, "batch_size": 4, "num_workers": 0}
    dm = FolderDataModule(**kwargs, augment={"hflip": 1.0, "vflip": 1.0, "rotate_limit": 0})
    dm.request_inputs({"unaugmented"})
    dm.setup()
    plain = FolderDataModule(**kwargs, augment=None)
    plain.setup()
    item, reference = dm.dataset("train")[0], plain.dataset("train")[0]
    assert torch.equal(item["image_unaugmented"], reference["image"])
    assert not torch.equal(item["image"], reference["image"])
    assert "image_unaugmented" not in dm.dataset("val")[0]

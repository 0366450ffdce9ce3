"""ELPV reading, targets and splits, on the real data from the elpv-dataset package."""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from elinspect.data.elpv import ElpvDataModule, make_targets, package_root, read_labels
from elinspect.data.errors import DatasetError


@cache
def table():
    return read_labels(package_root())


def datamodule(**kwargs) -> ElpvDataModule:
    dm = ElpvDataModule(image_size=32, batch_size=8, num_workers=0, **kwargs)
    dm.setup()
    return dm


def test_real_dataset_counts() -> None:
    t = table()
    assert len(t) == 2624
    levels = np.rint(t.probability * 3).astype(int)
    assert np.bincount(levels).tolist() == [1508, 295, 106, 715]
    assert (t.module_type == "mono").sum() == 1074
    assert (t.module_type == "poly").sum() == 1550


@pytest.mark.parametrize(
    ("threshold", "rule", "defective"),
    [
        (0.0, "gt", 295 + 106 + 715),  # the SeMaCNN paper's "zero threshold"
        (0.33, "gt", 106 + 715),  # its "threshold at 0.33": p in {2/3, 1}
        (0.33, "ge", 295 + 106 + 715),  # 1/3 >= 0.33
        (0.5, "ge", 106 + 715),
        (1.0, "ge", 715),
    ],
)
def test_binary_threshold_semantics(threshold: float, rule: str, defective: int) -> None:
    assert make_targets(table().probability, "binary", threshold, rule).sum() == defective


def test_four_class_targets() -> None:
    targets = make_targets(table().probability, "four_class", 0.0, "gt")
    assert np.bincount(targets).tolist() == [1508, 295, 106, 715]


def test_default_split_is_stratified_disjoint_and_complete() -> None:
    dm = datamodule()
    train, val, test = (dm.split_rows[s] for s in ("train", "val", "test"))
    assert len(set(train) | set(val) | set(test)) == len(train) + len(val) + len(test) == 2624
    assert abs(len(test) / 2624 - 0.25) < 0.01
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.01
    levels = np.rint(dm.table.probability * 3).astype(int)
    for rows in (train, val, test):
        share = np.bincount(levels[rows], minlength=4) / len(rows)
        assert np.allclose(share, np.bincount(levels) / 2624, atol=0.02)
        mono = (dm.table.module_type[rows] == "mono").mean()
        assert abs(mono - 1074 / 2624) < 0.02


def test_split_depends_on_seed_only() -> None:
    a, b, c = datamodule(split_seed=1), datamodule(split_seed=1), datamodule(split_seed=2)
    assert np.array_equal(a.split_rows["test"], b.split_rows["test"])
    assert not np.array_equal(np.sort(a.split_rows["test"]), np.sort(c.split_rows["test"]))


def test_k_folds_are_disjoint_and_cover_everything() -> None:
    tests = [datamodule(num_folds=4, fold=i).split_rows["test"] for i in range(4)]
    union = np.concatenate(tests)
    assert len(union) == len(set(union)) == 2624
    assert max(len(t) for t in tests) - min(len(t) for t in tests) <= 1
    dm = datamodule(num_folds=4, fold=2)
    assert not set(dm.split_rows["train"]) & set(dm.split_rows["test"])


def test_fold_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="fold must lie in 0..3"):
        ElpvDataModule(num_folds=4, fold=4)


def test_module_type_filter_and_normal_only_training() -> None:
    dm = datamodule(module_type="mono", train_normal_only=True)
    for rows in dm.split_rows.values():
        assert set(dm.table.module_type[rows]) == {"mono"}
    assert (dm.table.probability[dm.split_rows["train"]] == 0).all()
    # validation and test keep the defective cells, to choose and measure thresholds
    assert (dm.table.probability[dm.split_rows["test"]] > 0).any()
    assert sum(len(r) for r in dm.split_rows.values()) < 1074


def test_items_and_info() -> None:
    dm = datamodule(channels=1, target="four_class")
    item = dm.dataset("test")[0]
    assert item["image"].shape == (1, 32, 32)
    assert item["image"].dtype == torch.float32
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    assert item["label"] == int(round(dm.table.probability[item["index"]] * 3))
    info = dm.info
    assert info.num_classes == 4 and info.in_channels == 1
    assert sum(info.class_counts) == len(dm.split_rows["train"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 1, 32, 32)


def test_augmentation_only_on_train_and_seeded_by_torch() -> None:
    dm = datamodule(augment={"hflip": 1.0, "vflip": 0.0, "rotate_limit": 0})
    test_item = dm.dataset("test")[0]["image"]
    train = dm.dataset("train")
    flipped = train[0]["image"]
    plain = ElpvDataModule(image_size=32, augment=None)
    plain.setup()
    assert torch.equal(test_item, plain.dataset("test")[0]["image"])  # the test split is not augmented
    original = plain.dataset("train")[0]["image"]
    assert torch.allclose(flipped, original.flip(-1), atol=1e-6)
    rotating = datamodule(augment={"hflip": 0.0, "vflip": 0.0, "rotate_limit": 90, "rotate_p": 1.0}).dataset(
        "train"
    )
    torch.manual_seed(0)
    first = rotating[0]["image"]
    torch.manual_seed(0)
    assert torch.equal(first, rotating[0]["image"])


def test_offline_expansion_adds_fixed_variants() -> None:
    dm = datamodule(expand=3)
    train = dm.dataset("train")
    assert len(train) == 4 * len(dm.split_rows["train"])
    assert len(dm.dataset("val")) == len(dm.split_rows["val"])
    variants = [train[i]["image"] for i in range(4)]
    assert torch.equal(variants[2], train[2]["image"])  # fixed, not redrawn
    assert len({v.numpy().tobytes() for v in variants}) > 1
    assert {int(train[i]["index"]) for i in range(4)} == {int(dm.split_rows["train"][0])}


def repository_copy(tmp_path: Path, n: int = 24) -> Path:
    """A directory in the ELPV repository's layout with the first ``n`` cells."""
    (tmp_path / "images").mkdir()
    lines = (package_root() / "labels.csv").read_text().splitlines()[:n]
    for line in lines:
        rel = line.split()[0]
        shutil.copy(package_root() / rel, tmp_path / rel)
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_reads_a_directory_in_the_repository_layout(tmp_path: Path) -> None:
    root = repository_copy(tmp_path)
    dm = ElpvDataModule(root=str(root), image_size=32, test_fraction=0.25, val_fraction=0.0)
    dm.setup()
    assert len(dm.table) == 24
    assert sum(len(r) for r in dm.split_rows.values()) == 24


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("images/cell0001.png  0.5  mono", "not one of 0, 1/3, 2/3, 1"),
        ("images/cell0001.png  abc  mono", "not a number"),
        ("images/cell0001.png  1.0  thin-film", "not mono or poly"),
        ("images/cell0001.png  1.0", "expected 'path probability type'"),
        ("images/missing.png  1.0  mono", "does not exist"),
        ("../../etc/passwd  1.0  mono", "outside the dataset root"),
    ],
)
def test_bad_label_rows_name_the_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    root = repository_copy(tmp_path, n=4)
    labels = root / "labels.csv"
    labels.write_text(labels.read_text() + bad_line + "\n")
    with pytest.raises(DatasetError, match=message) as err:
        read_labels(root)
    assert "labels.csv" in str(err.value) or "missing.png" in str(err.value)
    skipped = read_labels(root, on_error="skip")
    assert len(skipped) == 4


@pytest.mark.parametrize(
    ("written", "level"), [("0.333", 1 / 3), ("0.3333", 1 / 3), ("0.667", 2 / 3), ("0.6666", 2 / 3)]
)
def test_a_probability_written_rounded_counts_as_its_level(
    tmp_path: Path, written: str, level: float
) -> None:
    """A labels.csv with probabilities rounded to 3-4 decimals (a re-saved export) labels each
    cell by the level it stands for, under every threshold and rule, as the full-precision file."""
    root = repository_copy(tmp_path, n=4)
    labels = root / "labels.csv"
    rows = [line.split() for line in labels.read_text().splitlines()]
    rows[0][1] = written
    labels.write_text("".join(f"{path}  {prob}  {kind}\n" for path, prob, kind in rows))
    probability = read_labels(root).probability
    assert probability[0] == level
    for threshold in (0.0, 0.33, 1 / 3, 0.66, 2 / 3):
        for rule in ("gt", "ge"):
            exact = make_targets(np.array([level]), "binary", threshold, rule)
            assert make_targets(probability[:1], "binary", threshold, rule).tolist() == exact.tolist()


def test_missing_labels_file_explains_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="labels.csv"):
        read_labels(tmp_path)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = repository_copy(tmp_path, n=4)
    first = root / (root / "labels.csv").read_text().split()[0]
    first.write_bytes(first.read_bytes()[:100])  # the header is intact, the pixels are cut off
    dm = ElpvDataModule(root=str(root), image_size=32, test_fraction=0.0, val_fraction=0.0, augment=None)
    dm.setup()
    dataset = dm.dataset("train")
    position = int(np.flatnonzero(dm.split_rows["train"] == 0)[0])
    with pytest.raises(DatasetError, match="cell0001.png.*cannot decode"):
        dataset[position]


def test_anomaly_models_fit_on_defect_free_cells_only_at_the_033_threshold() -> None:
    """SeMaCNN's "set of images without defects" (§2.2.2): at threshold 0.33, p = 1/3 cells are
    label 0 but not defect-free; PaDiM's fit, SeMaCNN's heatmap scale and the reconstruction
    models' training normals take p = 0 only, as padim_elpv (train_normal_only) does."""
    from types import SimpleNamespace

    from elinspect.data.normals import normal_images
    from elinspect.models.anomaly.padim import Padim
    from elinspect.models.anomaly.padim_module import PadimFitMixin

    dm = ElpvDataModule(image_size=32, batch_size=256, num_workers=0, threshold=0.33, augment=None)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    p0 = int((batch["probability"] == 0).sum())
    assert int((batch["label"] == 0).sum()) > p0 > 0  # the batch holds p = 1/3 cells in class 0
    assert len(normal_images(batch)) == p0
    holder = SimpleNamespace(padim=Padim(feature_size=4, k=8, blur_sigma=0))
    assert PadimFitMixin.padim_update(holder, batch) == p0
    assert int(holder.padim.count) == p0
    # the same cells as a normal-only training split
    normal_only = datamodule(train_normal_only=True, threshold=0.33)
    rows = dm.split_rows["train"][dm.table.probability[dm.split_rows["train"]] == 0]
    assert np.array_equal(np.sort(rows), np.sort(normal_only.split_rows["train"]))


def test_training_items_carry_their_unaugmented_image_on_request() -> None:
    """``request_inputs({"unaugmented"})``: training items also hold the image through the
    evaluation transform (what calibration statistics are computed on); val/test unchanged."""
    dm = datamodule(augment={"hflip": 1.0, "vflip": 1.0, "rotate_limit": 0})
    dm.request_inputs({"unaugmented"})
    plain = datamodule(augment=None)
    item, reference = dm.dataset("train")[3], plain.dataset("train")[3]
    assert torch.equal(item["image_unaugmented"], reference["image"])
    assert not torch.equal(item["image"], reference["image"])  # the training image itself is augmented
    assert "image_unaugmented" not in dm.dataset("test")[0]
    assert "image_unaugmented" not in plain.dataset("train")[0]  # only on request
    with pytest.raises(ValueError, match="unknown extra inputs.*unaugmented"):
        dm.request_inputs({"template"})

"""Detection datamodules (``data=pvel``, ``voc``, ``coco``) on a small synthetic PVEL-AD:
splits, class subsets and counts, the batch contract, box-aware resize and flips,
malformed files under raise and skip, agreement between formats, configs."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import cv2
import defusedxml.ElementTree as SafeET
import hydra
import numpy as np
import pytest
import torch

from elinspect.data.box_transforms import detection_augmentation
from elinspect.data.coco import CocoDataModule
from elinspect.data.detection_dataset import DetectionDataset, detection_collate
from elinspect.data.errors import DatasetError
from elinspect.data.pvel import PVEL_CLASSES, PvelAdDataModule
from elinspect.data.readers.voc import CONTROL_CHARS, IGNORED_CLASS, MISSING_IMAGE, NO_NAME
from elinspect.data.records import DetectionRecord
from elinspect.data.splits import ratio_split
from elinspect.data.voc import VocDataModule

EBBA5 = ["crack", "finger", "black_core", "thick_line", "star_crack"]
BAF3 = ["crack", "finger", "black_core"]
CLASS_SETS = {"all": list(PVEL_CLASSES), "ebba5": EBBA5, "baf3": BAF3}
NO_AUGMENT = {"augment": None, "image_size": 64}


def pvel(root: Path, **kwargs) -> PvelAdDataModule:
    kwargs = {"class_sets": CLASS_SETS, "num_workers": 0, **NO_AUGMENT, **kwargs}
    dm = PvelAdDataModule(root=str(root), **kwargs)
    dm.setup()
    return dm


def stems(records: list[DetectionRecord]) -> list[str]:
    return [r.image_path.stem for r in records]


def split_file(data, name: str) -> list[str]:
    return (data.summary["image_sets"] / f"{name}.txt").read_text().split()


def xml_objects(data, image_id: str) -> list[tuple[str, bool]]:
    """(name, difficult) of every object in ``image_id``'s XML (none without an XML)."""
    path = data.summary["annotations"] / f"{image_id}.xml"
    if not path.is_file():
        return []
    root = SafeET.parse(path).getroot()
    return [(o.findtext("name"), o.findtext("difficult") == "1") for o in root.iter("object")]


# ----------------------------------------------------------------------------- splits


def test_official_split_is_trainval_test_with_a_seeded_val(detection_data) -> None:
    dm = pvel(detection_data.pvel_root, split="official", val_fraction=0.2, split_seed=3)
    train, val, test = (set(stems(dm.records[s])) for s in ("train", "val", "test"))
    trainval = split_file(detection_data, "trainval")
    assert train | val == set(trainval) and not train & val
    assert test == set(split_file(detection_data, "test")) and not test & (train | val)
    assert len(val) == round(0.2 * len(trainval))
    assert stems(pvel(detection_data.pvel_root, split_seed=3).records["val"]) == sorted(val)
    assert set(stems(pvel(detection_data.pvel_root, split_seed=4).records["val"])) != val
    assert "official" in dm.protocol and "seed 3" in dm.protocol


def test_ratio_split_is_6_2_2_over_all_images_and_seeded(detection_data) -> None:
    dm = pvel(detection_data.pvel_root, split="ratio", split_seed=0)
    parts = [set(stems(dm.records[s])) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [14, 5, 5]  # 24 images at the EBBA paper's 6:2:2
    assert set().union(*parts) == {f"img{i:06d}" for i in range(1, 25)}
    assert sum(len(p) for p in parts) == 24
    again = pvel(detection_data.pvel_root, split="ratio", split_seed=0)
    assert [set(stems(again.records[s])) for s in ("train", "val", "test")] == parts
    other = pvel(detection_data.pvel_root, split="ratio", split_seed=1)
    assert set(stems(other.records["test"])) != parts[2]
    assert "60/20/20" in dm.protocol


def test_ratio_split_rounds_cumulative_shares() -> None:
    parts = ratio_split(10, [3, 1, 1], seed=0)
    assert [len(p) for p in parts] == [6, 2, 2]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))


# ----------------------------------------------------------------------------- classes


@pytest.mark.parametrize(
    ("classes", "names"), [("ebba5", EBBA5), ("baf3", BAF3), (["finger", "corner"], ["finger", "corner"])]
)
def test_class_subsets_drop_other_classes_and_count_training_boxes(detection_data, classes, names) -> None:
    dm = pvel(detection_data.pvel_root, classes=classes)
    info = dm.info
    assert info.task == "detection" and info.in_channels == 3
    assert list(info.class_names) == names
    expected = Counter(
        n for stem in stems(dm.records["train"]) for n, _ in xml_objects(detection_data, stem) if n in names
    )
    assert info.class_counts == tuple(expected[n] for n in names)
    assert sum(info.class_counts) > 0
    dropped = sum(
        n not in names
        for s in ("train", "val", "test")
        for stem in stems(dm.records[s])
        for n, _ in xml_objects(detection_data, stem)
    )
    assert dropped > 0 and dm.tally.counts[IGNORED_CLASS] == dropped
    for record in dm.records["train"] + dm.records["val"] + dm.records["test"]:
        assert ((record.labels >= 1) & (record.labels <= len(names))).all()


def test_class_names_outside_pvel_ad_are_refused(detection_data) -> None:
    with pytest.raises(ValueError, match="not PVEL-AD classes"):
        pvel(detection_data.pvel_root, classes=["crack", "bubble"])
    with pytest.raises(ValueError, match="not a class set"):
        pvel(detection_data.pvel_root, classes="ebba6")


def test_keep_difficult_and_drop_empty_train(detection_data) -> None:
    """``keep_difficult=false`` keeps difficult boxes out of training only: validation and test
    keep them flagged, so that the mAP ignores them (the VOC protocol) instead of counting a
    detection of one as a false positive."""
    kept = pvel(detection_data.pvel_root, split="ratio")
    difficult = {split: sum(int(r.difficult.sum()) for r in recs) for split, recs in kept.records.items()}
    empty_train = sum(not r.num_boxes for r in kept.records["train"])
    assert difficult["train"] > 0 and empty_train > 0  # so that the checks below mean something
    dropped = pvel(detection_data.pvel_root, split="ratio", keep_difficult=False, drop_empty_train=True)
    assert not any(r.difficult.any() for r in dropped.records["train"])
    assert sum(r.num_boxes for r in kept.records["train"]) - difficult["train"] == sum(
        r.num_boxes for r in dropped.records["train"]
    )
    assert all(r.num_boxes for r in dropped.records["train"])
    assert len(dropped.records["train"]) == sum((~r.difficult).any() for r in kept.records["train"])
    assert any(not r.num_boxes for r in dropped.records["test"] + dropped.records["val"])  # only train
    # another split seed puts the difficult box into the test split: it stays there, flagged
    kept = pvel(detection_data.pvel_root, split="ratio", split_seed=0)
    assert sum(int(r.difficult.sum()) for r in kept.records["test"]) > 0
    dropped = pvel(detection_data.pvel_root, split="ratio", split_seed=0, keep_difficult=False)
    for split in ("val", "test"):
        for a, b in zip(kept.records[split], dropped.records[split], strict=True):
            assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.difficult, b.difficult)


# ------------------------------------------------------------------------ batch contract


def test_batches_follow_the_contract(detection_data) -> None:
    augment = {"hflip": 0.5, "vflip": 0.5}
    dm = pvel(detection_data.pvel_root, augment=augment, image_size=64, resize="longer", batch_size=2)
    torch.manual_seed(0)
    seen_boxes = 0
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        for images, targets in loader:
            assert isinstance(images, list) and isinstance(targets, list)
            assert 1 <= len(images) == len(targets) <= 2
            for image, target in zip(images, targets, strict=True):
                assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
                assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() > 0.2  # not normalised
                height, width = image.shape[1:]
                if split == "val":
                    assert (height, width) == (64, 64)
                assert set(target) == {"boxes", "labels", "image_id", "difficult"}
                boxes, labels = target["boxes"], target["labels"]
                n = len(labels)
                assert boxes.dtype == torch.float32 and boxes.shape == (n, 4)
                assert labels.dtype == torch.int64 and ((labels >= 1) & (labels <= 12)).all()
                assert target["difficult"].dtype == torch.bool and target["difficult"].shape == (n,)
                assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
                assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
                assert (boxes[:, :2] >= 0).all()
                assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
                seen_boxes += n
    assert seen_boxes > 0


def test_resize_scales_boxes_with_the_image(detection_data) -> None:
    dm = pvel(detection_data.pvel_root, image_size=64, resize="square")
    dataset = dm.dataset("test")
    index = next(i for i, r in enumerate(dataset.records) if r.num_boxes)
    image, target = dataset[index]
    assert image.shape == (3, 64, 64)
    assert target["image_id"].item() == index
    np.testing.assert_allclose(target["boxes"].numpy(), dataset.records[index].boxes * 0.5, atol=1e-4)
    native = DetectionDataset(dataset.records, image_size=None)
    assert native[index][0].shape == (3, 128, 128)


def test_flips_map_boxes_and_pixels_on_a_hand_made_image(tmp_path: Path) -> None:
    image = np.full((20, 40), 255, np.uint8)  # H 20, W 40, grey
    image[5:10, 4:12] = 0  # dark block: columns 4..11, rows 5..9
    path = tmp_path / "cell.png"
    cv2.imwrite(str(path), image)
    box = np.array([[4, 5, 12, 10]], np.float32)  # 0-based continuous xyxy
    record = DetectionRecord(path, box, np.array([2]), np.array([True]), 40, 20)

    hflip = DetectionDataset([record], augment=detection_augmentation(hflip=1.0, vflip=0.0))
    out, target = hflip[0]
    assert out.shape == (3, 20, 40)
    np.testing.assert_allclose(target["boxes"].numpy(), [[28, 5, 36, 10]], atol=1e-4)  # x -> W - x
    assert target["labels"].tolist() == [2] and target["difficult"].tolist() == [True]
    assert out[:, 5:10, 28:36].max() < 0.1 and out[:, 5:10, 4:12].min() > 0.9

    vflip = DetectionDataset([record], augment=detection_augmentation(hflip=0.0, vflip=1.0))
    out, target = vflip[0]
    np.testing.assert_allclose(target["boxes"].numpy(), [[4, 10, 12, 15]], atol=1e-4)  # y -> H - y
    assert out[:, 10:15, 4:12].max() < 0.1


def test_augmentation_is_seeded_from_torch(detection_data) -> None:
    augment = {"hflip": 0.5, "vflip": 0.5}
    dataset = pvel(detection_data.pvel_root, augment=augment).dataset("train")
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append([dataset[i] for i in range(min(len(dataset), 12))])
    for (a, ta), (b, tb) in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    assert any(
        a.shape != b.shape or not torch.equal(a, b) for (a, _), (b, _) in zip(runs[0], runs[2], strict=True)
    )


def test_empty_images_give_0x4_boxes(detection_data) -> None:
    dm = pvel(detection_data.pvel_root, augment={"hflip": 1.0, "vflip": 1.0})
    for split in ("train", "test"):
        dataset = dm.dataset(split)
        index = next(i for i, r in enumerate(dataset.records) if not r.num_boxes)
        assert not (
            detection_data.summary["annotations"] / f"{dataset.records[index].image_path.stem}.xml"
        ).exists()
        _, target = dataset[index]
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
        assert target["difficult"].shape == (0,)
    images, targets = detection_collate([dataset[index], dataset[0]])
    assert len(images) == len(targets) == 2


# --------------------------------------------------------------------- malformed files


def _copy(data, tmp_path: Path) -> Path:
    root = tmp_path / "PVEL-AD"
    shutil.copytree(data.pvel_root, root)
    return root


def _first_annotated_train_id(data) -> str:
    return next(
        i for i in split_file(data, "trainval") if (data.summary["annotations"] / f"{i}.xml").exists()
    )


def test_control_characters_in_xml_are_stripped(detection_data, tmp_path: Path) -> None:
    root = _copy(detection_data, tmp_path)
    image_id = _first_annotated_train_id(detection_data)
    xml = root / "VOCdevkit/VOC2007/Annotations" / f"{image_id}.xml"
    text = xml.read_text()
    xml.write_text(text.replace("<name>", "<name>\x01\x0b", 1).replace("<folder>", "<folder>\x1f"))
    clean, dirty = pvel(detection_data.pvel_root), pvel(root)
    by_stem = {r.image_path.stem: r for s in dirty.records.values() for r in s}
    before = {r.image_path.stem: r for s in clean.records.values() for r in s}[image_id]
    np.testing.assert_array_equal(by_stem[image_id].boxes, before.boxes)
    np.testing.assert_array_equal(by_stem[image_id].labels, before.labels)
    assert dirty.tally.counts[CONTROL_CHARS] == 3


@pytest.mark.parametrize("fault", ["no_name", "no_image"])
def test_malformed_files_raise_naming_the_file_or_are_skipped(detection_data, tmp_path: Path, fault) -> None:
    root = _copy(detection_data, tmp_path)
    voc = root / "VOCdevkit" / "VOC2007"
    image_id = _first_annotated_train_id(detection_data)
    if fault == "no_name":
        xml = voc / "Annotations" / f"{image_id}.xml"
        text = xml.read_text()
        start, end = text.index("<name>"), text.index("</name>") + len("</name>")
        xml.write_text(text[:start] + text[end:])
        named, reason = str(xml), NO_NAME
    else:
        (voc / "JPEGImages" / f"{image_id}.jpg").unlink()
        named, reason = image_id, MISSING_IMAGE

    with pytest.raises(DatasetError) as error:
        pvel(root, on_error="raise")
    assert named in str(error.value)

    skipped = pvel(root, on_error="skip")
    clean = pvel(detection_data.pvel_root)
    assert skipped.tally.counts[reason] == 1
    all_stems = {s for split in skipped.records.values() for s in stems(split)}
    total = lambda dm: sum(r.num_boxes for s in dm.records.values() for r in s)  # noqa: E731
    if fault == "no_name":
        assert image_id in all_stems and total(skipped) == total(clean) - 1
    else:
        assert image_id not in all_stems and len(all_stems) == 23


def test_unknown_class_in_an_xml_raises_naming_the_file(detection_data, tmp_path: Path) -> None:
    root = _copy(detection_data, tmp_path)
    image_id = _first_annotated_train_id(detection_data)
    xml = root / "VOCdevkit/VOC2007/Annotations" / f"{image_id}.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>bubble_", 1))
    with pytest.raises(DatasetError, match=f"{xml}.*unknown class 'bubble_"):
        pvel(root)


# ------------------------------------------------------------------ formats and roots


def test_voc_and_coco_give_the_same_boxes_for_the_same_image(detection_data) -> None:
    voc = VocDataModule(root=str(detection_data.pvel_root), classes=list(PVEL_CLASSES), **NO_AUGMENT)
    coco = CocoDataModule(
        root=str(detection_data.coco_root),
        train_json="annotations/train.json",
        test_json="annotations/test.json",
        image_root=str(detection_data.image_root),
        **NO_AUGMENT,
    )
    assert voc.info == coco.info
    for split in ("train", "val", "test"):
        voc_set, coco_set = voc.dataset(split), coco.dataset(split)
        by_path = {r.image_path: i for i, r in enumerate(coco_set.records)}
        assert set(by_path) == {r.image_path for r in voc_set.records}
        for i, record in enumerate(voc_set.records):
            _, a = voc_set[i]
            _, b = coco_set[by_path[record.image_path]]
            torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-4, rtol=0)
            assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["difficult"], b["difficult"])


def test_voc_without_split_files_falls_back_to_a_seeded_ratio_split(detection_data, tmp_path: Path) -> None:
    root = _copy(detection_data, tmp_path)
    shutil.rmtree(root / "VOCdevkit/VOC2007/ImageSets")
    dm = VocDataModule(root=str(root), **NO_AUGMENT)
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [14, 5, 5]
    assert "60/20/20" in dm.protocol
    assert list(dm.info.class_names) == sorted({n for n in detection_data.summary["boxes"]})


def test_missing_root_shows_the_layout_and_the_generator_command(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as error:
        pvel(root)
    message = str(error.value)
    assert f"{root}/VOCdevkit/VOC2007/{{Annotations,JPEGImages,ImageSets/Main}}" in message
    assert f"python -m elinspect.data.synthetic pvel --out {root} --num-images 200 --seed 0" in message
    with pytest.raises(DatasetError, match="Expected layout"):
        VocDataModule(root=str(root)).setup()
    with pytest.raises(DatasetError, match="train.json"):
        CocoDataModule(root=str(root), train_json="train.json").setup()


@pytest.mark.parametrize("data", ["pvel", "voc", "coco"])
def test_configs_build_the_datamodules(make_cfg, fast_data_overrides, data: str) -> None:
    extra = ["data.classes=baf3"] if data == "pvel" else []
    cfg = make_cfg("train.yaml", [f"data={data}", *fast_data_overrides(data), *extra])
    assert cfg.data.on_error == "raise"
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    assert dm.tasks == frozenset({"detection"})
    info = dm.info
    assert info.image_size == (64, 64) and sum(info.class_counts) > 0
    if data == "pvel":
        assert list(info.class_names) == BAF3
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == len(targets) == 2


def test_a_detection_training_loader_under_ddp_serves_images_and_targets(detection_data) -> None:
    """Under DDP the training shard is read through elinspect.data.sharding's flagging wrapper,
    which marks only dict samples: a detection batch stays (images, targets), and over two
    ranks every training image is served (one padded repeat where the count is odd)."""
    from types import SimpleNamespace

    dm = pvel(detection_data.pvel_root, batch_size=2)
    size = len(dm.dataset("train"))
    ids = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, num_devices=2, overfit_batches=0)
        for images, targets in dm.train_dataloader():
            assert all(isinstance(image, torch.Tensor) and image.ndim == 3 for image in images)
            assert all("boxes" in target and "repeat" not in target for target in targets)
            ids += [int(target["image_id"]) for target in targets]
    assert len(ids) == size + size % 2 and len(set(ids)) == size

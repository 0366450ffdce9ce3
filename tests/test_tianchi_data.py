"""Aluminum (labelme) and Fabric (Tianchi JSON + templates) datamodules on synthetic data in
the publishers' layouts: readers, class maps, the seeded 500-test protocol, templates and
normal samples in the batch, the pixel-gap shift, malformed files, the real annotation file,
the generators, and a training run of each through the real entry point."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from elinspect.data.aluminum import UNANNOTATED_DEFECT, AluminumDataModule
from elinspect.data.box_transforms import detection_augmentation, shift_image
from elinspect.data.detection import NO_TEMPLATE
from elinspect.data.detection_dataset import DetectionDataset
from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.data.fabric import UNANNOTATED_DEFECT as UNANNOTATED_FABRIC
from elinspect.data.fabric import FabricDataModule
from elinspect.data.readers.boxes import (
    CLIPPED,
    DUPLICATE,
    NON_FINITE,
    NON_POSITIVE,
    OUTSIDE_ROOT,
    sanitize_boxes,
)
from elinspect.data.readers.labelme import UNPARSABLE
from elinspect.data.readers.tianchi_fabric import read_fabric_annotations
from elinspect.data.readers.voc import IGNORED_CLASS, MISSING_IMAGE, UNKNOWN_CLASS
from elinspect.data.records import DetectionRecord
from elinspect.data.splits import fixed_size_split
from elinspect.data.synthetic.__main__ import main as synthetic_main
from elinspect.data.synthetic.aluminum import write_aluminum_dataset
from elinspect.data.synthetic.fabric import ANNOTATION_FILE, write_fabric_dataset
from tests.conftest import FAST_DETECTOR_OVERRIDES, SHARED, data_config

FABRIC_CFG = data_config("fabric")
ALUMINUM_CFG = data_config("aluminum")
FIXTURE = SHARED / "fixtures" / "tianchi-fabric-round2-anno_train_20190925.json"
N = 24
TEST = 5  # the test_size override for the small synthetic sets (the paper's is 500)
# Written out here rather than read from the config, so a typo in either is caught.
FABRIC_MAP = {
    "沾污": "stained", "错花": "broken_pattern", "水印": "water_mark", "花毛": "knots", "缝头": "seam_allowance",
    "缝头印": "seam_stencil_mark", "虫粘": "insect", "破洞": "broken_hole", "褶子": "pleats",
    "织疵": "weaving_flaw", "漏印": "misprint", "蜡斑": "wax_spot", "色差": "color_shade", "网折": "crease_mark",
    "其他": "others",
}  # fmt: skip
ALUMINUM_MAP = {
    "不导电": "non_conductive", "擦花": "scratch", "角位漏底": "corner_leak", "桔皮": "orange_peel",
    "漏底": "leak_bottom", "喷流": "jet_flow", "漆泡": "paint_bubble", "起坑": "pitting", "杂色": "mottling",
    "脏点": "dirty_spot",
}  # fmt: skip


def config(cfg: dict, root: Path, **kwargs) -> dict:
    keep = {k: v for k, v in cfg.items() if k != "_target_"}
    return {**keep, "root": str(root), "test_size": TEST, "image_size": None, "augment": None,
            "num_workers": 0, **kwargs}  # fmt: skip


def fabric(root: Path, **kwargs) -> FabricDataModule:
    dm = FabricDataModule(**config(FABRIC_CFG, root, **kwargs))
    dm.setup()
    return dm


def aluminum(root: Path, **kwargs) -> AluminumDataModule:
    dm = AluminumDataModule(**config(ALUMINUM_CFG, root, **kwargs))
    dm.setup()
    return dm


def all_records(dm) -> list[DetectionRecord]:
    return [r for split in ("train", "val", "test") for r in dm.records[split]]


@pytest.fixture(scope="module")
def fabric_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fabric") / "Fabric"
    return write_fabric_dataset(out, num_images=N, seed=0, width=128, height=53, normal_fraction=0.25)


@pytest.fixture(scope="module")
def aluminum_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("aluminum") / "Aluminum"
    return write_aluminum_dataset(out, num_images=N, seed=0, width=96, height=72, normal_fraction=0.25)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- readers


def test_fabric_reads_every_folder_with_mapped_classes_and_templates(fabric_data: dict) -> None:
    dm = fabric(fabric_data["root"])
    records = all_records(dm)
    assert len(records) == N and dm.tally.total == 0
    assert list(dm.info.class_names) == list(FABRIC_MAP.values())
    entries = json.loads(fabric_data["annotations"].read_text(encoding="utf-8"))
    by_name: dict[str, list[dict]] = {}
    for entry in entries:
        by_name.setdefault(entry["name"], []).append(entry)
    names = list(FABRIC_MAP.values())
    for record in records:
        expected = by_name.get(record.image_path.name, [])
        np.testing.assert_allclose(record.boxes, [e["bbox"] for e in expected] or np.zeros((0, 4)))
        assert [names[i - 1] for i in record.labels] == [FABRIC_MAP[e["defect_name"]] for e in expected]
        assert record.image_path.parent.name == record.image_path.stem
        assert record.template_path.parent == record.image_path.parent
        assert record.template_path.name.startswith("template_")
        assert (record.image_path.parents[1].name == "normal") == (not record.num_boxes)
    assert sum(not r.num_boxes for r in records) == fabric_data["num_normal"] == 6
    assert sum(r.num_boxes for r in records) == len(entries) == fabric_data["num_boxes"]
    assert len({FABRIC_MAP[e["defect_name"]] for e in entries}) >= 4


def test_aluminum_boxes_are_min_max_of_labelme_points(aluminum_data: dict) -> None:
    dm = aluminum(aluminum_data["root"].parent)
    records = all_records(dm)
    assert len(records) == N and dm.tally.total == 0
    assert list(dm.info.class_names) == list(ALUMINUM_MAP.values())
    names = list(ALUMINUM_MAP.values())
    kinds: Counter[str] = Counter()
    for record in records:
        json_path = record.image_path.with_suffix(".json")
        if not json_path.exists():
            assert record.num_boxes == 0 and record.image_path.parent.name == "无瑕疵样本"
            continue
        shapes = json.loads(json_path.read_text(encoding="utf-8"))["shapes"]
        kinds.update(s.get("shape_type", "4-corner rectangle") for s in shapes)
        boxes = [[*np.min(s["points"], axis=0), *np.max(s["points"], axis=0)] for s in shapes]
        np.testing.assert_allclose(record.boxes, boxes)
        assert [names[i - 1] for i in record.labels] == [ALUMINUM_MAP[s["label"]] for s in shapes]
        assert (record.width, record.height) == (96, 72)
    assert sum(not r.num_boxes for r in records) == aluminum_data["num_normal"] == 6
    assert kinds["polygon"] and kinds["rectangle"]  # both kinds of shape were read
    assert dm.info.class_counts == tuple(
        Counter(names[i - 1] for r in dm.records["train"] for i in r.labels)[n] for n in names
    )


def test_class_subset_drops_and_counts_other_classes(aluminum_data: dict) -> None:
    dm = aluminum(aluminum_data["root"].parent, classes=["dirty_spot", "scratch"])
    assert list(dm.info.class_names) == ["dirty_spot", "scratch"]
    counts = aluminum_data["boxes"]
    kept = sum(r.num_boxes for r in all_records(dm))
    assert kept == counts.get("脏点", 0) + counts.get("擦花", 0)
    assert dm.tally.counts[IGNORED_CLASS] == aluminum_data["num_boxes"] - kept > 0


def test_a_fabric_class_subset_keeps_images_of_other_classes_as_annotated_without_boxes(
    fabric_data: dict,
) -> None:
    """A defect image whose boxes are all of classes outside the subset is a hard negative for
    the chosen classes (as PVEL, Aluminum and COCO keep it): it stays in its split with no boxes,
    annotated (not a normal sample); only its boxes are dropped and counted."""
    full = fabric(fabric_data["root"])
    subset = fabric(fabric_data["root"], classes=["stained"])
    for split in ("train", "val", "test"):
        assert [r.image_path for r in subset.records[split]] == [r.image_path for r in full.records[split]]
    records = all_records(subset)
    assert any(r.annotated and not r.num_boxes for r in records)  # the synthetic set has such images
    assert all(r.annotated == f.annotated for r, f in zip(records, all_records(full), strict=True))
    assert UNANNOTATED_FABRIC not in subset.tally.counts
    assert subset.tally.counts[IGNORED_CLASS] == fabric_data["num_boxes"] - sum(r.num_boxes for r in records)


@pytest.mark.parametrize("make", [fabric, aluminum])
def test_seeded_500_style_test_split_then_val(fabric_data, aluminum_data, make) -> None:
    root = fabric_data["root"] if make is fabric else aluminum_data["root"].parent
    dm = make(root, split_seed=3)
    parts = {s: {r.image_path for r in dm.records[s]} for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [17, 2, TEST]  # val = round(0.1 * 19)
    assert not (parts["train"] & parts["val"]) and not (parts["test"] & (parts["train"] | parts["val"]))
    assert {r.image_path for r in make(root, split_seed=3).records["test"]} == parts["test"]
    assert {r.image_path for r in make(root, split_seed=4).records["test"]} != parts["test"]
    assert f"seeded {TEST}-image test split" in dm.protocol and "seed 3" in dm.protocol
    with pytest.raises(ValueError, match=r"24 images cannot give a 500-image test split.*data.test_size"):
        make(root, test_size=500)


def test_fixed_size_split_sizes() -> None:
    parts = fixed_size_split(4356, 500, 0.1, seed=0)  # the paper's Aluminum: 4356 images
    assert [len(parts[s]) for s in ("train", "val", "test")] == [3470, 386, 500]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(4356))


# ------------------------------------------------------------------ the real annotation file


def test_the_real_fabric_annotation_file_parses_with_its_exact_counts() -> None:
    tally = ErrorTally("raise")
    labels = {cn: i for i, cn in enumerate(FABRIC_MAP, start=1)}
    annotations = read_fabric_annotations(FIXTURE, labels, tally)
    assert annotations.num_entries == 16457
    assert len(annotations.boxes) == 3107
    assert len(annotations.defect_names) == 15 and annotations.defect_names == set(FABRIC_MAP)
    assert annotations.num_boxes == 16457 and tally.total == 0
    per_class = Counter(b.label for boxes in annotations.boxes.values() for b in boxes)
    assert (per_class[labels["沾污"]], per_class[labels["色差"]]) == (5077, 118)
    kept = 0  # the file repeats one entry exactly: dropped (and counted) when its boxes are sanitised
    for boxes in annotations.boxes.values():
        n = len(boxes)
        kept += len(
            sanitize_boxes(
                [b.box for b in boxes], [b.label for b in boxes], [False] * n, None, None, FIXTURE, tally
            )[0]
        )
    assert kept == 16456 and tally.counts[DUPLICATE] == 1


# ----------------------------------------------------------------- templates in the batch


def _textured(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (size[1] // 2, size[0] // 2, 3), dtype=np.uint8), size)
    cv2.imwrite(str(path), image)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def test_template_gets_exactly_the_image_geometry(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    _textured(image, 0)
    record = DetectionRecord(image, np.array([[4, 5, 20, 15]], np.float32), np.array([1]), np.array([False]))
    same = DetectionRecord(image, record.boxes, record.labels, record.difficult, template_path=image)
    augment = detection_augmentation(hflip=0.5, vflip=0.5, with_template=True)
    dataset = DetectionDataset([same], image_size=32, augment=augment, template=True)
    outputs = []
    for seed in range(6):  # flips vary; the template always stays the image
        torch.manual_seed(seed)
        out, target = dataset[0]
        assert torch.equal(target["template"], out)
        outputs.append(out)
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])

    other = tmp_path / "t.png"
    _textured(other, 1)
    paired = DetectionRecord(image, record.boxes, record.labels, record.difficult, template_path=other)
    plain = DetectionDataset([paired], template=True)[0][1]["template"]
    flip = detection_augmentation(hflip=1.0, vflip=0.0, with_template=True)
    flipped = DetectionDataset([paired], augment=flip, template=True)[0][1]["template"]
    assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)


def test_fabric_templates_follow_the_flip_and_the_resize(fabric_data: dict) -> None:
    still = fabric(fabric_data["root"], image_size=64)
    flipped = fabric(fabric_data["root"], image_size=64, augment={"hflip": 1.0, "vflip": 0.0})
    for dm in (still, flipped):
        dm.request_inputs({"template"})
    plain, mirror = still.dataset("train"), flipped.dataset("train")
    for i in range(3):
        image, target = plain[i]
        assert image.shape == target["template"].shape == (3, 26, 64)  # 128x53 -> longer side 64
        template = cv2.cvtColor(cv2.imread(str(plain.records[i].template_path)), cv2.COLOR_BGR2RGB)
        expected = cv2.resize(template, (64, 26), interpolation=cv2.INTER_AREA)
        assert torch.equal(target["template"], torch.from_numpy(expected).permute(2, 0, 1).float() / 255)
        assert torch.equal(mirror[i][1]["template"], target["template"].flip(-1))
        assert (image - target["template"]).abs().mean() < 0.1  # aligned: nearly the image


def test_without_a_request_the_batch_is_unchanged(fabric_data: dict) -> None:
    dm = fabric(fabric_data["root"], image_size=64, batch_size=2)
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and len(images) == len(targets) == 2
    assert all(set(t) == {"boxes", "labels", "image_id", "difficult"} for t in targets)


def _shift_of(template: np.ndarray, image: np.ndarray, reach: int) -> tuple[int, int]:
    """The (dx, dy) that maps ``image`` onto ``template`` exactly (interior pixels)."""
    found = [
        (dx, dy)
        for dx in range(-reach, reach + 1)
        for dy in range(-reach, reach + 1)
        if np.array_equal(
            shift_image(image, dx, dy)[reach:-reach, reach:-reach], template[reach:-reach, reach:-reach]
        )
    ]
    assert len(found) == 1, found
    return found[0]


def test_template_shift_moves_by_an_amount_in_range_fixed_per_image(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    pixels = _textured(image, 2, (48, 36))
    records = [DetectionRecord(image, template_path=image) for _ in range(8)]
    dataset = DetectionDataset(records, template=True, template_shift=(2, 4), shift_seed=(42, 0))
    shifts = []
    for i in range(8):
        template = (dataset[i][1]["template"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        dx, dy = _shift_of(template, pixels, 5)
        assert 2 <= abs(dx) <= 4 and 2 <= abs(dy) <= 4
        padded = np.pad(pixels, ((4, 4), (4, 4), (0, 0)), mode="edge")  # borders replicated
        assert np.array_equal(template, padded[4 - dy : 4 - dy + 36, 4 - dx : 4 - dx + 48])
        shifts.append((dx, dy))
    assert len({np.sign(s).tobytes() for s in shifts}) > 1  # both signs occur
    again = DetectionDataset(records, template=True, template_shift=(2, 4), shift_seed=(42, 0))
    assert all(torch.equal(dataset[i][1]["template"], again[i][1]["template"]) for i in range(8))
    with pytest.raises(ValueError, match="template_shift"):
        DetectionDataset(records, template=True, template_shift=(3, 1))


def test_fabric_template_shift_applies_to_train_and_test(fabric_data: dict) -> None:
    aligned = fabric(fabric_data["root"])
    shifted = fabric(fabric_data["root"], template_shift=[5, 10])
    for dm in (aligned, shifted):
        dm.request_inputs({"template"})
    for split in ("train", "test"):
        a, s = aligned.dataset(split)[0][1]["template"], shifted.dataset(split)[0][1]["template"]
        assert a.shape == s.shape and not torch.equal(a, s)
    assert "templates shifted 5-10 px" in shifted.protocol


# ------------------------------------------------------------------ request_inputs errors


def test_a_dataset_without_templates_refuses_the_template_request(aluminum_data: dict) -> None:
    dm = aluminum(aluminum_data["root"].parent)
    assert not AluminumDataModule.provides_templates and FabricDataModule.provides_templates
    with pytest.raises(ValueError, match=r"ships no aligned templates.*model.template=ptg.*data=fabric"):
        dm.request_inputs({"template"})
    with pytest.raises(ValueError, match="unknown extra inputs"):
        dm.request_inputs({"depth"})


@pytest.mark.parametrize("templates", [0, 2])
def test_a_fabric_folder_without_one_template_is_an_error_naming_the_image(
    fabric_data: dict, tmp_path: Path, templates: int
) -> None:
    root = copy_tree(fabric_data["root"], tmp_path / "Fabric")
    dm = fabric(root)
    record = dm.records["train"][0]
    folder = record.image_path.parent
    if templates == 0:
        record.template_path.unlink()
    else:
        shutil.copy(record.template_path, folder / "template_extra.jpg")
    with pytest.raises(DatasetError) as error:
        fabric(root).request_inputs({"template"})
    assert str(record.image_path) in str(error.value) and str(folder) in str(error.value)
    assert ("found none" if templates == 0 else "template_extra.jpg") in str(error.value)

    skipped = fabric(root, on_error="skip")
    skipped.request_inputs({"template"})
    assert skipped.tally.counts[NO_TEMPLATE] == 1
    assert record.image_path not in {r.image_path for r in all_records(skipped)}


def test_a_record_whose_template_vanished_is_an_error_naming_the_image(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    _textured(image, 0)
    with pytest.raises(DatasetError, match=f"no aligned template for {image}"):
        DetectionDataset([DetectionRecord(image)], template=True)[0]


def test_normal_samples_join_training_targets_only_and_repeat_with_the_seed(aluminum_data: dict) -> None:
    dm = aluminum(aluminum_data["root"].parent, image_size=48)
    dm.request_inputs({"normal"})
    train = dm.dataset("train")
    normals = [r.image_path for r in dm.records["train"] if not r.num_boxes]
    assert normals and {r.image_path for r in dm.normal_records} == set(normals)
    references = [
        DetectionDataset([DetectionRecord(p)], image_size=48)[0][0] for p in normals
    ]  # every normal here is 96x72 like the images, so "resized to the sample" is this size
    torch.manual_seed(0)
    first = [train[i][1]["normal"] for i in range(6)]
    for image_normal, (image, _) in zip(first, (train[i] for i in range(6)), strict=True):
        assert image_normal.shape == image.shape
        assert any(torch.equal(image_normal, ref) for ref in references)
    torch.manual_seed(0)
    assert all(torch.equal(a, train[i][1]["normal"]) for i, a in enumerate(first))
    assert "normal" not in dm.dataset("val")[0][1] and "normal" not in dm.dataset("test")[0][1]


def test_normal_samples_are_images_without_any_annotation(aluminum_data: dict) -> None:
    """PTG's normal samples are images the dataset annotates nothing on (no labelme JSON): an
    image whose only defects belong to classes left out of data.classes has no boxes, but it
    still shows defects and is never taken as a normal sample."""
    root = aluminum_data["root"].parent
    full = aluminum(root)
    first_class = full.class_names[0]
    dm = aluminum(root, classes=[first_class])
    unannotated = {
        r.image_path for r in dm.records["train"] if not r.image_path.with_suffix(".json").is_file()
    }
    filtered_out = [r for r in dm.records["train"] if not r.num_boxes and r.image_path not in unannotated]
    assert filtered_out, "the fixture must hold annotated images without a box of the kept class"
    assert unannotated and {r.image_path for r in dm.normal_records} == unannotated
    assert all(r.annotated for r in filtered_out)


def test_normal_request_without_defect_free_training_images_is_refused(tmp_path: Path) -> None:
    summary = write_aluminum_dataset(
        tmp_path / "A", num_images=8, seed=1, width=64, height=48, normal_fraction=0
    )
    dm = aluminum(summary["root"].parent, test_size=2)
    with pytest.raises(ValueError, match="needs defect-free training images"):
        dm.request_inputs({"normal"})


# --------------------------------------------------------------------- malformed files


def _first_json(root: Path) -> Path:
    return sorted(root.rglob("*.json"))[0]


@pytest.mark.parametrize(
    ("fault", "reason", "message"),
    [
        ("truncated", UNPARSABLE, "not valid JSON"),
        ("no_shapes", UNPARSABLE, "'shapes' list"),
        ("unknown_label", UNKNOWN_CLASS, "unknown label '划痕'"),
        ("outside_root", OUTSIDE_ROOT, "outside the dataset root"),
    ],
)
def test_bad_labelme_files_raise_naming_the_file_or_are_counted_skips(
    aluminum_data: dict, tmp_path: Path, fault: str, reason: str, message: str
) -> None:
    root = copy_tree(aluminum_data["root"].parent, tmp_path / "Aluminum")
    path = _first_json(root)
    data = json.loads(path.read_text(encoding="utf-8"))
    if fault == "truncated":
        path.write_text(path.read_text(encoding="utf-8")[:50], encoding="utf-8")
    elif fault == "no_shapes":
        path.write_text(json.dumps({"imagePath": "x.jpg"}), encoding="utf-8")
    elif fault == "unknown_label":
        data["shapes"][0]["label"] = "划痕"
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    else:
        data["imagePath"] = "../../../../x.jpg"
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DatasetError) as error:
        aluminum(root)
    assert str(path) in str(error.value) and message in str(error.value)

    skipped = aluminum(root, on_error="skip")
    assert skipped.tally.counts[reason] == 1
    image = path.with_suffix(".jpg")
    kept = {r.image_path: r for r in all_records(skipped)}
    if fault == "unknown_label":
        assert kept[image].num_boxes == len(data["shapes"]) - 1
    else:
        assert image not in kept and len(kept) == N - 1


def test_a_labelme_file_without_its_image_is_a_missing_image(aluminum_data: dict, tmp_path: Path) -> None:
    root = copy_tree(aluminum_data["root"].parent, tmp_path / "Aluminum")
    path = _first_json(root)
    path.with_suffix(".jpg").unlink()
    for debris in ("__MACOSX/._a.jpg", "无瑕疵样本/._b.jpg"):  # zip debris, not images: never read
        debris_path = root / "guangdong_round2_train_20181011" / debris
        debris_path.parent.mkdir(exist_ok=True)
        debris_path.write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(DatasetError, match="no image beside this annotation"):
        aluminum(root)
    skipped = aluminum(root, on_error="skip")
    assert skipped.tally.counts == {MISSING_IMAGE: 1} and len(all_records(skipped)) == N - 1


def test_a_defect_image_without_its_labelme_file_is_an_error_not_a_normal_sample(
    aluminum_data: dict, tmp_path: Path
) -> None:
    """An image under the release's defect folders (单瑕疵图片, 多瑕疵图片) whose JSON is missing
    would otherwise pass for defect-free: a background image for training, a normal sample
    for RDDN's templates. It is an error naming the image, or a counted skip."""
    root = copy_tree(aluminum_data["root"].parent, tmp_path / "Aluminum")
    json_path = next(p for p in sorted(root.rglob("*.json")) if "单瑕疵图片" in p.parts)
    image = json_path.with_suffix(".jpg")
    json_path.unlink()
    with pytest.raises(DatasetError, match=r"单瑕疵图片.*defect image without its labelme JSON"):
        aluminum(root)
    skipped = aluminum(root, on_error="skip")
    assert skipped.tally.counts == {UNANNOTATED_DEFECT: 1}
    kept = [r.image_path for r in all_records(skipped)]
    assert image not in kept and len(kept) == N - 1


def _edit_fabric(root: Path, edit) -> Path:
    path = root / ANNOTATION_FILE
    entries = json.loads(path.read_text(encoding="utf-8"))
    edit(entries)
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return path


def test_malformed_fabric_json_raises_naming_the_file_even_under_skip(
    fabric_data: dict, tmp_path: Path
) -> None:
    root = copy_tree(fabric_data["root"], tmp_path / "Fabric")
    path = root / ANNOTATION_FILE
    path.write_text(path.read_text(encoding="utf-8")[:-20], encoding="utf-8")
    for on_error in ("raise", "skip"):
        with pytest.raises(DatasetError, match=f"{path}: not valid JSON"):
            fabric(root, on_error=on_error)
    path.write_text('{"name": "x.jpg"}', encoding="utf-8")
    with pytest.raises(DatasetError, match="not a list"):
        fabric(root, on_error="skip")


@pytest.mark.parametrize(
    ("entry", "reason", "message"),
    [
        ({"defect_name": "褶皱"}, UNKNOWN_CLASS, "unknown defect_name '褶皱'"),
        ({"name": "../../x.jpg"}, OUTSIDE_ROOT, "outside the dataset root"),
        ({"name": "absent.jpg"}, MISSING_IMAGE, "absent.jpg, which is in no image folder"),
        ({"bbox": [5, 5, 5, 9]}, NON_POSITIVE, "zero or negative area"),
        ({"bbox": [30, 30, 2, 2]}, NON_POSITIVE, "zero or negative area"),  # swapped corners
        ({"bbox": [math.nan, 1, 9, 9]}, NON_FINITE, "non-finite"),
        ({"bbox": [1, 2, 3]}, "malformed annotation entry", "needs 'bbox'"),
    ],
)
def test_bad_fabric_entries_raise_naming_the_file_or_are_counted_skips(
    fabric_data: dict, tmp_path: Path, entry: dict, reason: str, message: str
) -> None:
    root = copy_tree(fabric_data["root"], tmp_path / "Fabric")
    path = _edit_fabric(root, lambda entries: entries.append({**entries[0], **entry}))
    with pytest.raises(DatasetError) as error:
        fabric(root)
    assert str(path) in str(error.value) and message in str(error.value)
    skipped = fabric(root, on_error="skip")
    assert skipped.tally.counts[reason] == 1
    assert sum(r.num_boxes for r in all_records(skipped)) == fabric_data["num_boxes"]


def test_duplicate_entries_are_dropped_and_boxes_outside_clipped(fabric_data: dict, tmp_path: Path) -> None:
    root = copy_tree(fabric_data["root"], tmp_path / "Fabric")

    def edit(entries: list[dict]) -> None:
        entries.append(dict(entries[0]))  # an exact repeat
        entries.append({**entries[0], "bbox": [-5.0, -3.0, 500.0, 10.0]})  # partly outside 128x53

    _edit_fabric(root, edit)
    dm = fabric(root)  # neither is fatal
    assert dm.tally.counts[DUPLICATE] == 1 and dm.tally.counts[CLIPPED] == 1
    assert sum(r.num_boxes for r in all_records(dm)) == fabric_data["num_boxes"] + 1
    boxes = np.concatenate([r.boxes for r in all_records(dm)])
    assert [0, 0, 128, 10] in boxes.tolist()


def test_annotation_file_is_found_where_the_release_or_a_user_puts_it(
    fabric_data: dict, tmp_path: Path
) -> None:
    root = copy_tree(fabric_data["root"], tmp_path / "Fabric")
    renamed = root / "anno_train_20190925.json"
    shutil.copy(root / ANNOTATION_FILE, renamed)
    with pytest.raises(DatasetError, match="2 annotation files found.*data.anno_file"):
        fabric(root)
    assert len(all_records(fabric(root, anno_file="anno_train_20190925.json"))) == N
    (root / ANNOTATION_FILE).unlink()
    assert sum(r.num_boxes for r in all_records(fabric(root))) == fabric_data["num_boxes"]
    renamed.unlink()
    with pytest.raises(DatasetError, match="no annotation file found"):
        fabric(root)


@pytest.mark.parametrize(("make", "command"), [(fabric, "fabric"), (aluminum, "aluminum")])
def test_missing_root_shows_the_layout_and_the_generator_command(tmp_path: Path, make, command: str) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as error:
        make(root)
    message = str(error.value)
    assert "Expected layout" in message
    assert f"python -m elinspect.data.synthetic {command} --out {root} --num-images 200 --seed 0" in message


# ------------------------------------------------------------------------- generators


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("generator", ["fabric", "aluminum"])
def test_generators_are_byte_identical_per_seed(tmp_path: Path, capsys, generator: str) -> None:
    size = ["--width", "64", "--height", "48"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        args = [generator, "--out", str(tmp_path / name), "--num-images", "6", "--seed", str(seed), *size]
        assert synthetic_main(args) == 0
    assert f"{generator}: 6 images" in capsys.readouterr().out
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b and len(a) >= 8
    assert a != c
    assert synthetic_main([generator, "--out", str(tmp_path / "a"), "--num-images", "6", "--seed", "0"]) == 2


def test_generated_layouts_are_the_releases(fabric_data: dict, aluminum_data: dict) -> None:
    root = fabric_data["root"]
    assert (root / "guangdong1_round2_train_part1_20190924" / "Annotations" / "anno_train.json").is_file()
    entries = json.loads((root / ANNOTATION_FILE).read_text(encoding="utf-8"))
    assert set(entries[0]) == {"name", "defect_name", "bbox"} and entries[0]["defect_name"] in FABRIC_MAP
    assert "\\u" in (root / ANNOTATION_FILE).read_text(encoding="utf-8")  # escaped as the release is
    for folder in (p for p in root.glob("*/*/*") if p.is_dir()):
        assert folder.parent.name in ("defect", "normal")
        assert (folder / f"{folder.name}.jpg").is_file() and len(list(folder.glob("template_*.jpg"))) == 1
        assert cv2.imread(str(folder / f"{folder.name}.jpg")).shape == (53, 128, 3)
    release = aluminum_data["root"]
    assert release.name == "guangdong_round2_train_20181011"
    assert {p.name for p in release.iterdir()} <= {"单瑕疵图片", "多瑕疵图片", "无瑕疵样本"}
    assert not list((release / "无瑕疵样本").glob("*.json"))
    for single in (release / "单瑕疵图片").iterdir():
        for path in single.glob("*.json"):
            assert {s["label"] for s in json.loads(path.read_text(encoding="utf-8"))["shapes"]} == {
                single.name
            }


# ------------------------------------------------------------------ through the entry point


@pytest.mark.parametrize("data", ["fabric", "aluminum"])
def test_faster_rcnn_trains_on_the_tianchi_datasets(make_cfg, fabric_data, aluminum_data, data: str) -> None:
    from elinspect.train import train

    root = fabric_data["root"] if data == "fabric" else aluminum_data["root"].parent
    overrides = [
        "model=faster_rcnn",
        f"data={data}",
        f"data.root='{root}'",
        "data.test_size=4",
        "data.image_size=64",
        "data.batch_size=2",
        "data.num_workers=0",
        "trainer.fast_dev_run=true",
        "logger=csv",
        "callbacks=none",
        *FAST_DETECTOR_OVERRIDES,
    ]
    metrics, objects = train(make_cfg("train.yaml", overrides))
    assert objects["trainer"].state.finished
    assert "test/map_50" in metrics and all(math.isfinite(v) for v in metrics.values())
    assert objects["datamodule"].name == data.capitalize()

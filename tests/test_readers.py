"""Detection annotation readers: VOC XML (PVEL-AD quirks included), COCO JSON, box sanitising."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.data.readers import coco as coco_mod
from elinspect.data.readers import (
    list_all_ids,
    parse_voc_xml,
    read_coco,
    read_voc_ids,
    read_voc_split,
    records_to_coco,
    sanitize_boxes,
    write_coco,
)
from elinspect.data.readers import voc as voc_mod
from elinspect.data.records import DetectionRecord

CLASSES = {"crack": 1, "finger": 2}


# ---------------------------------------------------------------------------- helpers


def _image(path: Path, width: int = 64, height: int = 48) -> Path:
    """A tiny 3-channel image (PIL for JPEG, cv2 for the other formats)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((height, width, 3), 128, np.uint8)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(pixels).save(path)
    else:
        assert cv2.imwrite(str(path), pixels)
    return path


def _obj(name: str | None = "crack", box=(11, 21, 50, 40), difficult: int = 0, bndbox: bool = True) -> str:
    name_xml = f"<name>{name}</name>" if name is not None else ""
    box_xml = ""
    if bndbox:
        x1, y1, x2, y2 = box
        box_xml = f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"
    return f"<object>{name_xml}<pose>Unspecified</pose><difficult>{difficult}</difficult>{box_xml}</object>"


def _voc(*objects: str, size: tuple[int, int] | None = (64, 48)) -> str:
    """A PVEL-AD-like annotation: Windows <path>, a <filename> that is wrong, depth 1."""
    size_xml = (
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>1</depth></size>" if size else ""
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<annotation><folder>VOC2007</folder>'
        "<filename>not_this_one.jpg</filename><path>C:\\Users\\lab\\Desktop\\pvel\\img (3).jpg</path>"
        f"{size_xml}<segmented>0</segmented>{''.join(objects)}</annotation>"
    )


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


@pytest.fixture
def img(tmp_path: Path) -> Path:
    return _image(tmp_path / "img.jpg")


def _parse(tmp_path: Path, xml: str | bytes, img: Path, on_error: str = "raise", **kwargs):
    tally = ErrorTally(on_error)
    xml_path = _write(tmp_path / "a.xml", xml)
    return parse_voc_xml(xml_path, CLASSES, img, tally, **kwargs), tally, xml_path


# ---------------------------------------------------------------------------- VOC XML


def test_voc_boxes_are_zero_based_and_quirky_fields_ignored(tmp_path: Path, img: Path) -> None:
    xml = _voc(_obj("crack", (11, 21, 50, 40)), _obj("finger", (1, 1, 64, 48)))
    record, tally, _ = _parse(tmp_path, xml, img)
    assert record.image_path == img  # not <filename> nor the Windows <path>
    np.testing.assert_array_equal(record.boxes, [[10, 20, 50, 40], [0, 0, 64, 48]])
    assert record.boxes.dtype == np.float32 and record.labels.dtype == np.int64
    np.testing.assert_array_equal(record.labels, [1, 2])
    np.testing.assert_array_equal(record.difficult, [False, False])
    assert (record.width, record.height) == (64, 48)
    assert not tally.counts  # a full-image box is not "clipped"


def test_control_characters_are_stripped_and_counted(tmp_path: Path, img: Path) -> None:
    xml = _voc(_obj("cr\x01ack"), _obj("finger")).replace("<folder>", "\x0b<folder>\x1f")
    xml = xml.replace("</annotation>", "\x00</annotation>")
    record, tally, _ = _parse(tmp_path, xml, img)
    np.testing.assert_array_equal(record.labels, [1, 2])
    assert tally.counts[voc_mod.CONTROL_CHARS] == 4


@pytest.mark.parametrize(
    ("bad_object", "reason", "message"),
    [
        (_obj(name=None), voc_mod.NO_NAME, "has no <name>"),
        (_obj(bndbox=False), voc_mod.NO_BNDBOX, "has no <bndbox>"),
        (_obj(box=(1, "ten", 5, 5)), voc_mod.BAD_COORDS, "non-numeric"),
        (
            "<object><name>crack</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox></object>",
            voc_mod.BAD_COORDS,
            "non-numeric",
        ),
        (_obj(name="rust"), voc_mod.UNKNOWN_CLASS, "unknown class 'rust' (known classes: crack, finger)"),
    ],
)
def test_bad_object_raises_or_is_dropped(
    tmp_path: Path, img: Path, bad_object: str, reason: str, message: str
) -> None:
    xml = _voc(_obj("finger"), bad_object)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        _parse(tmp_path, xml, img)
    assert info.value.path == tmp_path / "a.xml"

    record, tally, _ = _parse(tmp_path, xml, img, on_error="skip")
    np.testing.assert_array_equal(record.labels, [2])  # the good object survives
    assert tally.counts == {reason: 1}


XXE = '<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY secret SYSTEM "file://{secret}">]><annotation><object><name>&secret;</name></object></annotation>'
LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY lol "lol">'
    + "".join(
        f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">'
        for i in range(1, 10)
    )
    + "]><annotation><folder>&lol9;</folder></annotation>"
)


@pytest.mark.parametrize(
    "content",
    [
        "<annotation><object></annotation>",
        "",
        b"\xff\xd8\xff\xe0 a JPEG, not XML",
        "<html><body/></html>",
        XXE,
        LAUGHS,
        '<?xml version="1.0" encoding="no-such-codec"?><annotation/>',
    ],
    ids=["unclosed", "empty", "binary", "wrong-root", "external-entity", "billion-laughs", "bad-encoding"],
)
def test_unparsable_xml_raises_or_drops_the_image(tmp_path: Path, img: Path, content: str | bytes) -> None:
    secret = _write(tmp_path / "secret.txt", "TOP-SECRET")
    if isinstance(content, str):
        content = content.replace("{secret}", str(secret))
    with pytest.raises(DatasetError) as info:
        _parse(tmp_path, content, img)
    assert info.value.path == tmp_path / "a.xml"
    assert "TOP-SECRET" not in str(info.value)

    record, tally, _ = _parse(tmp_path, content, img, on_error="skip")
    assert record is None
    assert tally.counts[voc_mod.UNPARSABLE] == 1


def test_entities_are_refused_not_expanded(tmp_path: Path, img: Path) -> None:
    with pytest.raises(DatasetError, match="EntitiesForbidden"):
        _parse(tmp_path, LAUGHS, img)


def test_difficult_kept_or_dropped(tmp_path: Path, img: Path) -> None:
    xml = _voc(_obj("crack", difficult=1), _obj("finger"))
    record, _, _ = _parse(tmp_path, xml, img)
    np.testing.assert_array_equal(record.difficult, [True, False])

    record, tally, _ = _parse(tmp_path, xml, img, keep_difficult=False)
    np.testing.assert_array_equal(record.labels, [2])
    assert tally.counts[voc_mod.DIFFICULT_DROPPED] == 1


def test_ignored_classes_are_dropped_and_counted_even_under_raise(tmp_path: Path, img: Path) -> None:
    xml = _voc(_obj("scratch"), _obj("crack"), _obj("scratch", bndbox=False))
    record, tally, _ = _parse(tmp_path, xml, img, ignore_classes={"scratch"})
    np.testing.assert_array_equal(record.labels, [1])
    assert tally.counts == {voc_mod.IGNORED_CLASS: 2}


def test_missing_size_is_read_from_the_image_header(tmp_path: Path) -> None:
    wide = _image(tmp_path / "wide.png", width=30, height=20)
    record, tally, _ = _parse(tmp_path, _voc(_obj(box=(1, 1, 100, 100)), size=None), wide)
    assert (record.width, record.height) == (30, 20)
    np.testing.assert_array_equal(record.boxes, [[0, 0, 30, 20]])  # clipped to the header's size
    assert tally.counts["box clipped to image"] == 1

    with pytest.raises(DatasetError, match="cannot read the image header"):
        _parse(tmp_path, _voc(_obj(), size=None), tmp_path / "absent.jpg")


def test_voc_boxes_go_through_sanitize(tmp_path: Path, img: Path) -> None:
    # xmin == xmax is a one-pixel VOC box; xmax = xmin - 1 has zero width.
    xml = _voc(_obj(box=(10, 10, 9, 20)), _obj(box=("nan", 1, 5, 5)), _obj(box=(200, 200, 300, 300)), _obj())
    with pytest.raises(DatasetError, match=r"box #0 .* zero or negative area"):
        _parse(tmp_path, xml, img)
    record, tally, _ = _parse(tmp_path, xml, img, on_error="skip")
    np.testing.assert_array_equal(record.boxes, [[10, 20, 50, 40]])
    assert tally.counts == {"box with zero or negative area": 2, "box with non-finite coordinates": 1}


# ---------------------------------------------------------------------------- sanitize_boxes


def test_sanitize_clips_and_counts() -> None:
    tally = ErrorTally()
    boxes, labels, difficult = sanitize_boxes(
        [[-5, -5, 10, 10], [5, 5, 20, 20], [90, 40, 120, 60]],
        [1, 2, 3],
        [False, True, False],
        100,
        50,
        "f",
        tally,
    )
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 10], [5, 5, 20, 20], [90, 40, 100, 50]])
    np.testing.assert_array_equal(labels, [1, 2, 3])
    np.testing.assert_array_equal(difficult, [False, True, False])
    assert tally.counts == {"box clipped to image": 2}


@pytest.mark.parametrize(
    ("box", "message", "reason"),
    [
        ([np.nan, 0, 5, 5], "non-finite coordinates", "box with non-finite coordinates"),
        ([0, 0, np.inf, 5], "non-finite coordinates", "box with non-finite coordinates"),
        ([3, 3, 3, 9], "zero or negative area", "box with zero or negative area"),
        ([9, 9, 2, 2], "zero or negative area", "box with zero or negative area"),  # swapped corners
        ([120, 10, 130, 20], "zero or negative area after clipping", "box with zero or negative area"),
    ],
)
def test_sanitize_bad_box_raises_or_drops(box: list[float], message: str, reason: str) -> None:
    boxes = [[1, 1, 4, 4], box]
    with pytest.raises(DatasetError, match=message) as info:
        sanitize_boxes(boxes, [1, 2], [False, False], 100, 50, "ann.xml", ErrorTally())
    assert info.value.path == Path("ann.xml") and "box #1" in str(info.value)

    tally = ErrorTally("skip")
    kept, labels, _ = sanitize_boxes(boxes, [1, 2], [False, False], 100, 50, "ann.xml", tally)
    np.testing.assert_array_equal(kept, [[1, 1, 4, 4]])
    np.testing.assert_array_equal(labels, [1])
    assert tally.counts == {reason: 1}


def test_sanitize_empty_input() -> None:
    boxes, labels, difficult = sanitize_boxes([], [], [], 10, 10, None, ErrorTally())
    assert boxes.shape == (0, 4) and labels.shape == (0,) and difficult.shape == (0,)


# ---------------------------------------------------------------------------- VOC tree


def _voc_tree(base: Path) -> Path:
    """``base/VOCdevkit/VOC2007`` with: 001 (crack+finger), 002 (no XML), 003 (scratch only),
    004 (.png image, difficult crack), 005 (no image)."""
    voc = base / "VOCdevkit" / "VOC2007"
    _image(voc / "JPEGImages" / "001.jpg")
    _image(voc / "JPEGImages" / "002.jpg", 40, 30)
    _image(voc / "JPEGImages" / "003.jpg")
    _image(voc / "JPEGImages" / "004.png")
    _write(voc / "Annotations" / "001.xml", _voc(_obj("crack"), _obj("finger", (2, 3, 10, 12))))
    _write(voc / "Annotations" / "003.xml", _voc(_obj("scratch")))
    _write(voc / "Annotations" / "004.xml", _voc(_obj("crack", difficult=1)))
    _write(voc / "Annotations" / "005.xml", _voc(_obj("finger")))
    _write(voc / "ImageSets" / "Main" / "trainval.txt", "001\n002\n003\n004\n")
    _write(voc / "ImageSets" / "Main" / "test.txt", "005\n\n")
    return voc


def test_voc_split_discovers_classes_and_reads_defect_free_images(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path)
    records, names = read_voc_split(tmp_path, "trainval", None, None, ErrorTally())
    assert names == ["crack", "finger", "scratch"]
    by_id = {r.image_path.stem: r for r in records}
    assert list(by_id) == ["001", "002", "003", "004"]
    assert by_id["001"].image_path == voc / "JPEGImages" / "001.jpg"
    np.testing.assert_array_equal(by_id["001"].labels, [1, 2])
    np.testing.assert_array_equal(by_id["001"].boxes[1], [1, 2, 10, 12])
    assert by_id["002"].num_boxes == 0 and (by_id["002"].width, by_id["002"].height) == (40, 30)
    np.testing.assert_array_equal(by_id["003"].labels, [3])
    assert by_id["004"].image_path.suffix == ".png" and by_id["004"].difficult.tolist() == [True]


def test_voc_split_subset_of_known_classes(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path)
    known = ["crack", "finger", "scratch"]
    tally = ErrorTally()
    records, names = read_voc_split(voc, "trainval", ["finger", "crack"], known, tally, keep_difficult=False)
    assert names == ["finger", "crack"]
    by_id = {r.image_path.stem: r for r in records}
    np.testing.assert_array_equal(by_id["001"].labels, [2, 1])
    assert by_id["003"].num_boxes == 0 and by_id["004"].num_boxes == 0
    assert tally.counts == {voc_mod.IGNORED_CLASS: 1, voc_mod.DIFFICULT_DROPPED: 1}

    # "scratch" is neither selected nor known: an unknown-class error.
    with pytest.raises(DatasetError, match="unknown class 'scratch'") as info:
        read_voc_split(voc, "trainval", ["finger", "crack"], ["finger", "crack"], ErrorTally())
    assert info.value.path == voc / "Annotations" / "003.xml"

    with pytest.raises(ValueError, match="not among the known classes"):
        read_voc_split(voc, "trainval", ["rust"], known, ErrorTally())


def test_voc_split_known_classes_give_the_order_when_no_subset(tmp_path: Path) -> None:
    _voc_tree(tmp_path)
    _, names = read_voc_split(tmp_path, "trainval", None, ["scratch", "finger", "crack"], ErrorTally())
    assert names == ["scratch", "finger", "crack"]


def test_voc_missing_image(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path)
    with pytest.raises(DatasetError, match=r"no image for id '005' in .*JPEGImages") as info:
        read_voc_split(tmp_path, "test", None, None, ErrorTally())
    assert info.value.path == voc / "JPEGImages"

    tally = ErrorTally("skip")
    records, _ = read_voc_split(tmp_path, "test", None, None, tally)
    assert records == [] and tally.counts == {voc_mod.MISSING_IMAGE: 1}


def test_voc_id_escaping_the_root_is_refused(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path / "data")
    _image(tmp_path / "data" / "outside.jpg")
    _write(voc / "ImageSets" / "Main" / "evil.txt", "../../../outside\n001\n../Annotations/001\n")
    with pytest.raises(DatasetError, match="outside the dataset root"):
        read_voc_split(voc, "evil", None, None, ErrorTally())
    tally = ErrorTally("skip")
    records, _ = read_voc_split(voc, "evil", None, None, tally)
    assert [r.image_path.stem for r in records] == ["001"]
    assert tally.counts == {"path outside the dataset root": 2}  # an id may not leave JPEGImages either
    with pytest.raises(DatasetError, match="outside the dataset root"):
        read_voc_ids(voc, "../../../../etc/passwd")


def test_voc_ids_and_all_ids(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path)
    _write(voc / "ImageSets" / "Main" / "dup.txt", "002 1\n001\n002\n")
    assert read_voc_ids(tmp_path, "dup") == ["002", "001"]
    _write(voc / "JPEGImages" / "notes.txt", "not an image")
    assert list_all_ids(voc) == ["001", "002", "003", "004"]
    with pytest.raises(DatasetError, match="cannot read the split file"):
        read_voc_ids(voc, "val")
    with pytest.raises(DatasetError, match="not a Pascal VOC tree"):
        read_voc_ids(tmp_path / "nowhere", "trainval")


def test_discovery_skips_bad_files_under_skip_without_counting(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path)
    _write(voc / "Annotations" / "999.xml", "<annotation><object>")
    with pytest.raises(DatasetError, match="999.xml"):
        read_voc_split(voc, "trainval", None, None, ErrorTally())
    tally = ErrorTally("skip")
    _, names = read_voc_split(voc, "trainval", None, None, tally)
    assert names == ["crack", "finger", "scratch"] and not tally.counts


# ---------------------------------------------------------------------------- COCO


def test_voc_and_coco_readers_agree(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path)
    voc_records, names = read_voc_split(voc, "trainval", None, None, ErrorTally())
    coco_path = write_coco(voc_records, names, voc / "JPEGImages", tmp_path / "coco" / "instances.json")
    coco_records, coco_names = read_coco(coco_path, voc / "JPEGImages", names, ErrorTally())
    assert coco_names == names
    assert [r.image_path for r in coco_records] == [r.image_path for r in voc_records]
    for ours, theirs in zip(voc_records, coco_records, strict=True):
        np.testing.assert_array_equal(theirs.boxes, ours.boxes)
        np.testing.assert_array_equal(theirs.labels, ours.labels)
        np.testing.assert_array_equal(theirs.difficult, ours.difficult)
        assert (theirs.width, theirs.height) == (ours.width, ours.height)
    # Without class_names the order comes from the category ids, which records_to_coco numbers 1..K.
    assert read_coco(coco_path, voc / "JPEGImages", None, ErrorTally())[1] == names


def _coco_file(tmp_path: Path, data: dict | str) -> Path:
    return _write(tmp_path / "ann.json", data if isinstance(data, str) else json.dumps(data))


def _coco_data(**overrides) -> dict:
    data = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 8, "file_name": "sub/b.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 10, "bbox": [10, 20, 30, 10], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 9, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        ],
        "categories": [{"id": 10, "name": "finger"}, {"id": 9, "name": "crack"}],  # 9 < 10, "10" < "9"
    }
    data.update(overrides)
    return data


def test_coco_reads_boxes_crowd_and_empty_images(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "sub" / "b.jpg", 20, 10)
    records, names = read_coco(_coco_file(tmp_path, _coco_data()), tmp_path, None, ErrorTally())
    assert names == ["crack", "finger"]  # sorted by category id
    a, b = records
    assert a.image_path == tmp_path / "a.jpg"
    np.testing.assert_array_equal(a.boxes, [[10, 20, 40, 30], [0, 0, 5, 5]])
    np.testing.assert_array_equal(a.labels, [2, 1])
    np.testing.assert_array_equal(a.difficult, [False, True])
    assert b.num_boxes == 0 and (b.width, b.height) == (20, 10)  # size from the header

    records, names = read_coco(tmp_path / "ann.json", tmp_path, ["finger", "crack"], ErrorTally())
    np.testing.assert_array_equal(records[0].labels, [1, 2])


def test_coco_unknown_category(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "sub" / "b.jpg")
    path = _coco_file(tmp_path, _coco_data())
    with pytest.raises(DatasetError, match="unknown category 'crack' \\(id 9\\)") as info:
        read_coco(path, tmp_path, ["finger"], ErrorTally())
    assert info.value.path == path
    tally = ErrorTally("skip")
    records, _ = read_coco(path, tmp_path, ["finger"], tally)
    np.testing.assert_array_equal(records[0].labels, [1])
    assert tally.counts == {coco_mod.UNKNOWN_CATEGORY: 1, coco_mod.UNKNOWN_CATEGORY_BOX: 1}


def test_coco_path_escaping_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _image(root / "a.jpg")
    _image(tmp_path / "secret.jpg")
    images = [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "../secret.jpg"}]
    path = _coco_file(tmp_path, _coco_data(images=images))
    with pytest.raises(DatasetError, match="outside the dataset root") as info:
        read_coco(path, root, None, ErrorTally())
    assert info.value.path == path
    tally = ErrorTally("skip")
    records, _ = read_coco(path, root, None, tally)
    assert [r.image_path for r in records] == [root / "a.jpg"]
    assert tally.counts == {"path outside the dataset root": 1}

    absolute = _coco_file(tmp_path, _coco_data(images=[{"id": 7, "file_name": str(tmp_path / "secret.jpg")}]))
    with pytest.raises(DatasetError, match="outside the dataset root"):
        read_coco(absolute, root, None, ErrorTally())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"images": [], "categories": []}), "missing key 'annotations'"),
        (json.dumps({"images": {}, "annotations": [], "categories": []}), "'images' is not a list"),
        (json.dumps(_coco_data(categories=[{"id": 1}])), "category #0 needs"),
        (
            json.dumps(_coco_data(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])),
            "appears twice",
        ),
    ],
)
def test_coco_malformed_file_raises_even_under_skip(tmp_path: Path, content: str, message: str) -> None:
    path = _coco_file(tmp_path, content)
    for on_error in ("raise", "skip"):
        with pytest.raises(DatasetError, match=message) as info:
            read_coco(path, tmp_path, None, ErrorTally(on_error))
        assert info.value.path == path


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"image_id": 99, "category_id": 9, "bbox": [0, 0, 1, 1]}, "unknown image_id 99"),
        ({"image_id": 7, "category_id": 42, "bbox": [0, 0, 1, 1]}, "undefined category_id 42"),
        ({"image_id": 7, "category_id": 9, "bbox": [0, 0, 1]}, "'bbox' must be"),
        ({"image_id": 7, "category_id": 9, "bbox": [0, "a", 1, 1]}, "'bbox' must be"),
        ({"image_id": 7, "category_id": 9}, "'bbox' must be"),
    ],
)
def test_coco_malformed_annotation_raises_or_is_dropped(
    tmp_path: Path, annotation: dict, message: str
) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "sub" / "b.jpg")
    data = _coco_data()
    data["annotations"].append(annotation)
    path = _coco_file(tmp_path, data)
    with pytest.raises(DatasetError, match=f"annotation #2: .*{message}"):
        read_coco(path, tmp_path, None, ErrorTally())
    tally = ErrorTally("skip")
    records, _ = read_coco(path, tmp_path, None, tally)
    assert records[0].num_boxes == 2 and tally.counts == {coco_mod.MALFORMED_ANNOTATION: 1}


def test_coco_missing_image(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    path = _coco_file(tmp_path, _coco_data())
    with pytest.raises(DatasetError, match=r"image 8: .*b.jpg does not exist"):
        read_coco(path, tmp_path, None, ErrorTally())
    tally = ErrorTally("skip")
    records, _ = read_coco(path, tmp_path, None, tally)
    assert [r.image_path.name for r in records] == ["a.jpg"] and tally.counts == {coco_mod.MISSING_IMAGE: 1}


def test_records_to_coco_refuses_images_outside_root_and_bad_labels(tmp_path: Path) -> None:
    record = DetectionRecord(
        tmp_path / "x.jpg", np.array([[0, 0, 2, 3]], np.float32), np.array([3]), np.array([False]), 8, 8
    )
    with pytest.raises(ValueError, match="label 3 outside 1..2"):
        records_to_coco([record], ["a", "b"], tmp_path)
    with pytest.raises(ValueError):
        records_to_coco([record], ["a", "b", "c"], tmp_path / "elsewhere")
    coco = records_to_coco([record], ["a", "b", "c"], tmp_path)
    assert coco["annotations"][0]["bbox"] == [0.0, 0.0, 2.0, 3.0] and coco["annotations"][0]["area"] == 6.0
    assert coco["images"][0]["file_name"] == "x.jpg"


# ---------------------------------------------------------------------------- fuzzing

_FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_numbers = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.sampled_from(["", "x", "1e999", "-0", "10**3"]),
)
_voc_like = st.builds(
    lambda name, coords, size, junk: _voc(
        f"<object><name>{name}</name><bndbox>"
        + "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), coords, strict=True))
        + f"</bndbox></object>{junk}",
        size=size,
    ),
    st.sampled_from(["crack", "finger", "rust", "", "<", "&amp;"]),
    st.tuples(*[st.one_of(st.integers(0, 80), _numbers)] * 4),
    st.one_of(st.none(), st.tuples(st.integers(-5, 5000), st.integers(-5, 5000))),
    st.text(max_size=20),
)


@_FUZZ
@given(
    content=st.one_of(
        st.binary(max_size=300), st.text(max_size=300).map(str.encode), _voc_like.map(str.encode)
    ),
    on_error=st.sampled_from(["raise", "skip"]),
)
def test_parse_voc_xml_fuzz_raises_only_dataset_errors(
    tmp_path_factory: pytest.TempPathFactory, content: bytes, on_error: str
) -> None:
    base = tmp_path_factory.getbasetemp() / "fuzz_voc"
    image = base / "img.jpg"
    if not image.exists():
        _image(image)
    xml_path = _write(base / "a.xml", content)
    try:
        record = parse_voc_xml(xml_path, CLASSES, image, ErrorTally(on_error))
    except DatasetError as error:
        assert error.path is not None
        return
    if record is not None:
        assert record.boxes.dtype == np.float32 and np.isfinite(record.boxes).all()
        assert ((record.boxes[:, 2:] > record.boxes[:, :2]).all()) if record.num_boxes else True


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_small_ids = st.one_of(st.integers(1, 2), _json_values)
_coords = st.one_of(st.integers(0, 80), _numbers)
_coco_like = st.fixed_dictionaries(
    {
        "images": st.lists(
            st.fixed_dictionaries(
                {
                    "id": _small_ids,
                    "file_name": st.sampled_from(["a.jpg", "a.jpg", "../a.jpg", "/etc/x", "", 3]),
                }
            ),
            max_size=3,
        ),
        "annotations": st.lists(
            st.fixed_dictionaries(
                {
                    "image_id": _small_ids,
                    "category_id": _small_ids,
                    "bbox": st.lists(_coords, min_size=3, max_size=5),
                }
            ),
            max_size=3,
        ),
        "categories": st.lists(
            st.fixed_dictionaries({"id": _small_ids, "name": st.sampled_from(["crack", "finger", 1])}),
            max_size=3,
        ),
    }
)

_coco_near_valid = st.builds(
    lambda anns, width: {
        "images": [{"id": 1, "file_name": "a.jpg", "width": width, "height": 48}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "crack"}],
    },
    st.lists(
        st.fixed_dictionaries(
            {
                "image_id": st.sampled_from([1, 1, 2]),
                "category_id": st.sampled_from([1, 1, "1"]),
                "bbox": st.lists(_coords, min_size=3, max_size=5),
                "iscrowd": st.sampled_from([0, 1, None]),
            }
        ),
        max_size=4,
    ),
    st.one_of(st.just(64), _json_values),
)


@_FUZZ
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        _json_values.map(lambda v: json.dumps(v).encode()),
        _coco_like.map(lambda v: json.dumps(v).encode()),
        _coco_near_valid.map(lambda v: json.dumps(v).encode()),
    ),
    on_error=st.sampled_from(["raise", "skip"]),
)
def test_read_coco_fuzz_raises_only_dataset_errors(
    tmp_path_factory: pytest.TempPathFactory, content: bytes, on_error: str
) -> None:
    base = tmp_path_factory.getbasetemp() / "fuzz_coco"
    if not (base / "a.jpg").exists():
        _image(base / "a.jpg")
    path = _write(base / "ann.json", content)
    try:
        records, _ = read_coco(path, base, None, ErrorTally(on_error))
    except DatasetError as error:
        assert error.path is not None
        return
    assert all(np.isfinite(r.boxes).all() for r in records)

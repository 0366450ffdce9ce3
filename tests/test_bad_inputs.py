"""A corpus of bad input for every reader, each case with its documented outcome.

Every case is written into a small, otherwise valid dataset of each layout (PVEL-AD and
VOC trees, COCO JSON, the ELPV directory form, a folder dataset), which is then set up and
every item loaded, under ``on_error=raise`` and ``on_error=skip``. :data:`OUTCOMES` is the
table the module docstrings of the readers state: an error naming the file and the
problem (at setup, or when the item is loaded), a count in the tally under skip, or a
successful read whose values are checked.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from elinspect.data import images as images_mod
from elinspect.data.coco import CocoDataModule
from elinspect.data.elpv import ElpvDataModule
from elinspect.data.errors import DatasetError
from elinspect.data.folder import FolderDataModule
from elinspect.data.images import jpeg_is_complete, read_header, read_image
from elinspect.data.pvel import PvelAdDataModule
from elinspect.data.voc import VocDataModule

W, H = 64, 48  # every image of the corpus datasets
BGR16 = (0x1111, 0x8080, 0xF0F0)  # the 16-bit image's channels, as OpenCV writes them (B, G, R)
BGR8 = (50, 100, 200)  # the RGBA image's colour (B, G, R); its alpha varies


# ----------------------------------------------------------------------------- image files


def jpeg(path: Path, value: int = 128, size: tuple[int, int] = (W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(value).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width × height`` grey pixels (its data is one row)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A valid 16×16 JPEG whose frame header (SOF0) is patched to declare ``width × height``."""
    out = io.BytesIO()
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(out, "JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def write_image_case(case: str, stem: Path) -> Path:
    """Write the corpus image ``case`` at ``stem`` (extension chosen by the case); its path."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    if case == "zero_byte":
        path = stem.with_suffix(".jpg")
        path.write_bytes(b"")
    elif case == "truncated_jpeg":
        path = jpeg(stem.with_suffix(".jpg"))
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    elif case == "non_image":
        path = stem.with_suffix(".jpg")
        path.write_text("name,value\nthis is a CSV file, not a JPEG\n")
    elif case == "png16":
        path = stem.with_suffix(".png")
        assert cv2.imwrite(str(path), np.zeros((H, W, 3), np.uint16) + np.array(BGR16, np.uint16))
    elif case == "rgba":
        path = stem.with_suffix(".png")
        alpha = np.random.default_rng(0).integers(0, 256, (H, W, 1), dtype=np.uint8)
        pixels = np.concatenate([np.zeros((H, W, 3), np.uint8) + np.array(BGR8, np.uint8), alpha], axis=2)
        assert cv2.imwrite(str(path), pixels)
    elif case == "bomb_png":  # 10^10 pixels: over twice Pillow's limit, Pillow itself refuses
        path = stem.with_suffix(".png")
        path.write_bytes(png_declaring(100_000, 100_000))
    elif case == "bomb_jpeg":  # 10^8 pixels: Pillow would only warn, our limit refuses
        path = stem.with_suffix(".jpg")
        path.write_bytes(jpeg_declaring(10_000, 10_000))
    else:
        path = jpeg(stem.with_suffix(".jpg"), value=7)
    return path


IMAGE_CASES = ("zero_byte", "truncated_jpeg", "non_image", "png16", "rgba", "bomb_png", "bomb_jpeg")


def expected_colour(case: str, grey: bool) -> np.ndarray | None:
    """The uniform [0, 1] value per channel a loaded png16 / rgba image must have."""
    if case == "png16":
        bgr = np.array([[[v >> 8 for v in BGR16]]], np.uint8)
    elif case == "rgba":
        bgr = np.array([[BGR8]], np.uint8)
    else:
        return None
    if grey:
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).reshape(1).astype(np.float32) / 255
    return bgr[0, 0, ::-1].astype(np.float32) / 255


# ------------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Expect:
    """``stage``: ``setup`` / ``load`` → a DatasetError matching ``match`` (which names the file)
    at that stage; ``ok`` → setup and loading succeed and ``count`` (a tally reason) is counted."""

    stage: str
    match: str = ""
    count: str | None = None


def error(match: str) -> Expect:
    return Expect("setup", match)


def at_load(match: str) -> Expect:
    return Expect("load", match)


def ok(count: str | None = None) -> Expect:
    return Expect("ok", count=count)


UNREADABLE = "unreadable image"


def image_outcomes(name: str, png: str = "png") -> dict[str, tuple[Expect, Expect]]:
    """The image cases, the same for every reader (``name``: the file's stem; ``png``: the
    extension a PNG gets, ``jpg`` where a layout names every image ``.jpg``)."""
    header = rf"{name}\.jpg: cannot read the image header"
    return {
        "zero_byte": (error(rf"{header}: the file is empty"), ok(UNREADABLE)),
        "non_image": (error(header), ok(UNREADABLE)),
        "bomb_png": (
            error(rf"{name}\.{png}: refused as a decompression bomb before decoding"),
            ok(UNREADABLE),
        ),
        "bomb_jpeg": (
            error(rf"{name}\.jpg: declares 10000×10000 = 100000000 pixels, more than the limit"),
            ok(UNREADABLE),
        ),
        "truncated_jpeg": (
            at_load(rf"{name}\.jpg: truncated JPEG"),
            at_load(rf"{name}\.jpg: truncated JPEG"),
        ),
        "png16": (ok(), ok()),
        "rgba": (ok(), ok()),
    }


XML_CASES = {
    "xxe": '<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    "<annotation><object><name>&x;</name></object></annotation>",
    "billion_laughs": '<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY a "aaaaaaaaaa">'
    + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8))
    + "]><annotation><folder>&i;</folder></annotation>",
    "malformed_xml": "<annotation><object><name>crack</name></annotation>",
}
BOXES = {  # VOC (1-based xmin, ymin, xmax, ymax) for a 64×48 image
    "box_negative": (-9, -9, 20, 20),
    "box_outside": (100, 100, 120, 120),
    "box_zero_area": (10, 10, 9, 20),
    "box_nan": ("nan", 1, 5, 5),
    "box_swapped": (30, 30, 10, 10),
}

VOC_OUTCOMES: dict[str, tuple[Expect, Expect]] = {
    **image_outcomes("bad"),
    **{
        case: (error(r"bad\.xml: not parsable as XML"), ok("unparsable annotation XML")) for case in XML_CASES
    },
    "box_negative": (ok("box clipped to image"), ok("box clipped to image")),
    "box_outside": (
        error(r"bad\.xml: box #0 .* zero or negative area after clipping"),
        ok("box with zero or negative area"),
    ),
    "box_zero_area": (
        error(r"bad\.xml: box #0 .* zero or negative area"),
        ok("box with zero or negative area"),
    ),
    "box_swapped": (
        error(r"bad\.xml: box #0 .* zero or negative area"),
        ok("box with zero or negative area"),
    ),
    "box_nan": (error(r"bad\.xml: box #0 .* non-finite"), ok("box with non-finite coordinates")),
    "unknown_class": (error(r"bad\.xml: object #0 has unknown class 'rust'"), ok("box of unknown class")),
    "path_outside": (
        error(r"Annotations: path '\.\./\.\./\.\./outside\.xml' resolves to .*outside the dataset root"),
        ok("path outside the dataset root"),
    ),
    "duplicate_box": (ok("identical duplicate box dropped"), ok("identical duplicate box dropped")),
    "missing_image": (error(r"JPEGImages: no image for id 'bad'"), ok("missing image")),
}

COCO_BOXES = {  # COCO (x, y, w, h)
    "box_negative": [-10, -10, 30, 30],
    "box_outside": [100, 100, 10, 10],
    "box_zero_area": [10, 10, 0, 5],
    "box_nan": [float("nan"), 1, 5, 5],
    "box_swapped": [30, 30, -20, -20],
}
COCO_OUTCOMES: dict[str, tuple[Expect, Expect]] = {
    **image_outcomes("bad"),
    "malformed_json": (error(r"train\.json: not valid JSON"), error(r"train\.json: not valid JSON")),
    "box_negative": (ok("box clipped to image"), ok("box clipped to image")),
    "box_outside": (
        error(r"train\.json: box #\d+ .* zero or negative area after clipping"),
        ok("box with zero or negative area"),
    ),
    "box_zero_area": (
        error(r"train\.json: box #\d+ .* zero or negative area"),
        ok("box with zero or negative area"),
    ),
    "box_swapped": (
        error(r"train\.json: box #\d+ .* zero or negative area"),
        ok("box with zero or negative area"),
    ),
    "box_nan": (error(r"train\.json: box #\d+ .* non-finite"), ok("box with non-finite coordinates")),
    "unknown_class": (error(r"train\.json: unknown category 'rust'"), ok("unknown category")),
    "path_outside": (
        error(r"train\.json: image 4: path '\.\./\.\./outside\.jpg' .*outside the dataset root"),
        ok("path outside the dataset root"),
    ),
    "duplicate_box": (ok("identical duplicate box dropped"), ok("identical duplicate box dropped")),
    "duplicate_image_id": (
        error(r"train\.json: image id 4 appears twice"),
        error(r"train\.json: image id 4 appears twice"),
    ),
    "duplicate_file": (
        error(r"train\.json: image 5: .*g0\.jpg is already image 1"),
        ok("duplicate image entry"),
    ),
    "missing_image": (error(r"train\.json: image 4: .*bad\.jpg does not exist"), ok("missing image")),
}

ELPV_OUTCOMES: dict[str, tuple[Expect, Expect]] = {
    **image_outcomes("bad"),
    "malformed_row": (error(r"labels\.csv:5: expected 'path probability type'"), ok("malformed row")),
    "bad_probability": (error(r"labels\.csv:5: probability 0\.5 is not one of"), ok("bad probability")),
    "unknown_class": (error(r"labels\.csv:5: module type 'thin-film' is not mono or poly"), ok("bad type")),
    "path_outside": (
        error(r"labels\.csv:5: image path '\.\./\.\./outside\.jpg' .*outside the dataset root"),
        ok("outside root"),
    ),
    "duplicate_row": (
        error(r"labels\.csv:5: image 'images/g0\.jpg' is already listed on line 1"),
        ok("duplicate row"),
    ),
    "missing_image": (
        error(r"bad\.jpg: image listed in .*labels\.csv:5 does not exist"),
        ok("missing image"),
    ),
}

FOLDER_OUTCOMES: dict[str, tuple[Expect, Expect]] = {
    **image_outcomes("bad"),
    "missing_mask": (
        error(r"bad\.jpg: defect image has no mask"),
        ok("missing, ambiguous or unreadable mask"),
    ),
}

ALUMINUM_OUTCOMES: dict[str, tuple[Expect, Expect]] = {
    **image_outcomes("bad"),
    "malformed_json": (error(r"bad\.json: not valid JSON"), ok("unparsable labelme JSON")),
    "box_negative": (ok("box clipped to image"), ok("box clipped to image")),
    "box_outside": (
        error(r"bad\.json: box #0 .* zero or negative area after clipping"),
        ok("box with zero or negative area"),
    ),
    "box_zero_area": (
        error(r"bad\.json: box #0 .* zero or negative area"),
        ok("box with zero or negative area"),
    ),
    "box_swapped": (ok(), ok()),  # a labelme box is the min/max of its points: corners in any order
    "box_nan": (error(r"bad\.json: box #0 .* non-finite"), ok("box with non-finite coordinates")),
    "unknown_class": (error(r"bad\.json: shape #0 has unknown label '铁锈'"), ok("box of unknown class")),
    "path_outside": (
        error(
            r"bad\.json: imagePath '\.\./\.\./\.\./\.\./outside\.jpg' names an image outside the dataset root"
        ),
        ok("path outside the dataset root"),
    ),
    "duplicate_box": (ok("identical duplicate box dropped"), ok("identical duplicate box dropped")),
    "missing_image": (error(r"bad\.json: no image beside this annotation"), ok("missing image")),
}

FABRIC_OUTCOMES: dict[str, tuple[Expect, Expect]] = {
    **image_outcomes("bad", png="jpg"),
    "malformed_json": (
        error(r"anno_train\.json: not valid JSON"),
        error(r"anno_train\.json: not valid JSON"),
    ),
    "box_negative": (ok("box clipped to image"), ok("box clipped to image")),
    "box_outside": (
        error(r"anno_train\.json: box #4 .* zero or negative area after clipping"),
        ok("box with zero or negative area"),
    ),
    "box_zero_area": (
        error(r"anno_train\.json: box #4 .* zero or negative area"),
        ok("box with zero or negative area"),
    ),
    "box_swapped": (
        error(r"anno_train\.json: box #4 .* zero or negative area"),
        ok("box with zero or negative area"),
    ),
    "box_nan": (error(r"anno_train\.json: box #4 .* non-finite"), ok("box with non-finite coordinates")),
    "unknown_class": (
        error(r"anno_train\.json: entry #4 \(bad\.jpg\) has unknown defect_name '铁锈'"),
        ok("box of unknown class"),
    ),
    "path_outside": (
        error(r"anno_train\.json: entry #4 names '\.\./\.\./outside\.jpg', a path outside the dataset root"),
        ok("path outside the dataset root"),
    ),
    "duplicate_box": (ok("identical duplicate box dropped"), ok("identical duplicate box dropped")),
    "missing_image": (
        error(r"anno_train\.json: entries #4 name bad\.jpg, which is in no image folder"),
        ok("missing image"),
    ),
}

# The table: reader → case → (outcome under raise, outcome under skip). Cases a format
# cannot express are absent (ELPV and folder have no boxes nor XML; a folder dataset names
# no file, so nothing can lie outside its root or be missing).
OUTCOMES: dict[str, dict[str, tuple[Expect, Expect]]] = {
    "pvel": VOC_OUTCOMES,
    "voc": VOC_OUTCOMES,
    "coco": COCO_OUTCOMES,
    "elpv": ELPV_OUTCOMES,
    "folder": FOLDER_OUTCOMES,
    "aluminum": ALUMINUM_OUTCOMES,
    "fabric": FABRIC_OUTCOMES,
}


# ---------------------------------------------------------------------------- datasets


def voc_object(name: str = "crack", box: tuple = (11, 21, 50, 40)) -> str:
    x1, y1, x2, y2 = box
    return (
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    )


def voc_xml(*objects: str) -> str:
    return (
        f"<annotation><size><width>{W}</width><height>{H}</height><depth>3</depth></size>"
        f"{''.join(objects)}</annotation>"
    )


def build_voc(root: Path, case: str, on_error: str, pvel: bool = False):
    voc = root / "VOCdevkit" / "VOC2007"
    for i, stem in enumerate(("g0", "g1", "g2", "t0")):
        jpeg(voc / "JPEGImages" / f"{stem}.jpg", value=i)
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "Annotations" / f"{stem}.xml").write_text(voc_xml(voc_object("finger")))
    if case != "missing_image":
        write_image_case(case, voc / "JPEGImages" / "bad")
    xml = voc_xml(voc_object())
    if case in XML_CASES:
        xml = XML_CASES[case]
    elif case in BOXES:
        xml = voc_xml(voc_object(box=BOXES[case]))
    elif case == "unknown_class":
        xml = voc_xml(voc_object("rust"))
    elif case == "duplicate_box":
        xml = voc_xml(voc_object(), voc_object(), voc_object("finger"))
    (voc / "Annotations" / "bad.xml").write_text(xml)
    bad_id = "bad"
    if case == "path_outside":
        jpeg(root.parent / "outside.jpg")
        bad_id = "../../../outside"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text(f"g0\ng1\ng2\n{bad_id}\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("t0\n")
    common = dict(
        root=str(root), classes=["crack", "finger"], split="official", val_fraction=0.0, image_size=32
    )
    module = PvelAdDataModule if pvel else VocDataModule
    return module(**common, augment=None, batch_size=2, num_workers=0, on_error=on_error)


def build_coco(root: Path, case: str, on_error: str) -> CocoDataModule:
    images = root / "images"
    entries = [{"id": i + 1, "file_name": f"g{i}.jpg", "width": W, "height": H} for i in range(3)]
    for i in range(3):
        jpeg(images / f"g{i}.jpg", value=i)
    bad_name = "bad.jpg"
    if case in IMAGE_CASES:
        bad_name = write_image_case(case, images / "bad").name
    elif case != "missing_image":
        jpeg(images / "bad.jpg")
    if case == "path_outside":
        jpeg(root.parent / "outside.jpg")
        bad_name = "../../outside.jpg"
    entries.append({"id": 4, "file_name": bad_name, "width": W, "height": H})
    categories = [{"id": 1, "name": "crack"}, {"id": 2, "name": "finger"}]
    annotations = [
        {"id": i + 1, "image_id": i + 1, "category_id": 2, "bbox": [5, 5, 10, 10]} for i in range(3)
    ]
    bad_box = {"id": 10, "image_id": 4, "category_id": 1, "bbox": COCO_BOXES.get(case, [10, 20, 30, 20])}
    annotations.append(bad_box)
    if case == "unknown_class":
        categories.append({"id": 3, "name": "rust"})
        annotations.append({"id": 11, "image_id": 4, "category_id": 3, "bbox": [1, 1, 5, 5]})
    elif case == "duplicate_box":
        annotations.append({**bad_box, "id": 11})
    elif case == "duplicate_image_id":
        entries.append({"id": 4, "file_name": "g1.jpg"})
    elif case == "duplicate_file":
        entries.append({"id": 5, "file_name": "g0.jpg"})
        annotations.append({"id": 12, "image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5]})
    text = json.dumps({"images": entries, "annotations": annotations, "categories": categories})
    if case == "malformed_json":
        text = text[: len(text) // 2]
    (root / "train.json").write_text(text)
    return CocoDataModule(
        root=str(root),
        train_json="train.json",
        image_root="images",
        classes=["crack", "finger"],
        val_fraction=0.0,
        image_size=32,
        augment=None,
        batch_size=2,
        num_workers=0,
        on_error=on_error,
    )


def build_elpv(root: Path, case: str, on_error: str) -> ElpvDataModule:
    rows = []
    for i, (prob, kind) in enumerate([(0.0, "mono"), (1.0, "mono"), (0.0, "poly"), (1.0, "poly")]):
        jpeg(root / "images" / f"g{i}.jpg", value=i)
        rows.append(f"images/g{i}.jpg  {prob}  {kind}")
    bad = "images/bad.jpg"
    if case in IMAGE_CASES:
        bad = "images/" + write_image_case(case, root / "images" / "bad").name
    elif case != "missing_image":
        jpeg(root / "images" / "bad.jpg")
    row = {
        "malformed_row": f"{bad}  1.0",
        "bad_probability": f"{bad}  0.5  mono",
        "unknown_class": f"{bad}  1.0  thin-film",
        "path_outside": "../../outside.jpg  1.0  mono",
        "duplicate_row": "images/g0.jpg  0.0  mono",
    }.get(case, f"{bad}  0.6666666666666666  mono")
    if case == "path_outside":
        jpeg(root.parent / "outside.jpg")
    (root / "labels.csv").write_text("\n".join([*rows, row]) + "\n")
    return ElpvDataModule(
        root=str(root),
        image_size=32,
        channels=3,
        test_fraction=0.0,
        val_fraction=0.0,
        augment=None,
        batch_size=2,
        num_workers=0,
        on_error=on_error,
    )


def build_folder(root: Path, case: str, on_error: str) -> FolderDataModule:
    for i in range(4):
        jpeg(root / "good" / f"g{i}.jpg", value=i)
    mask = np.zeros((H, W), np.uint8)
    mask[5:15, 5:15] = 255
    (root / "masks").mkdir(parents=True)
    assert cv2.imwrite(str(root / "masks" / "d0_mask.png"), mask)
    jpeg(root / "defect" / "d0.jpg", value=9)
    if case in IMAGE_CASES:
        write_image_case(case, root / "good" / "bad")
    elif case == "missing_mask":
        jpeg(root / "defect" / "bad.jpg")
    return FolderDataModule(
        root=str(root),
        normal_dir="good",
        defect_dir="defect",
        mask_dir="masks",
        image_size=32,
        channels=3,
        val_fraction=0.0,
        test_fraction=0.0,
        held_out_val_fraction=0.0,
        augment=None,
        batch_size=2,
        num_workers=0,
        on_error=on_error,
    )


DATA_CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def class_config(name: str) -> dict:
    """``classes`` and ``name_map`` of ``conf/data/<name>.yaml`` (the Chinese labels)."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(DATA_CONF / f"{name}.yaml")
    return {"classes": list(node.classes), "name_map": dict(node.name_map)}


LABELME_POINTS = {  # labelme rectangle corners for a 64×48 image
    "box_negative": [[-9, -9], [20, 20]],
    "box_outside": [[100, 100], [120, 120]],
    "box_zero_area": [[10, 10], [10, 20]],
    "box_nan": [[float("nan"), 1], [5, 5]],
    "box_swapped": [[30, 30], [10, 10]],
}


def labelme(label: str = "擦花", points=((10, 10), (30, 30)), image: str = "bad.jpg", copies: int = 1) -> str:
    shape = {"label": label, "points": [list(p) for p in points], "shape_type": "rectangle"}
    return json.dumps(
        {"shapes": [shape] * copies, "imagePath": image, "imageWidth": W, "imageHeight": H},
        ensure_ascii=False,
    )


def build_aluminum(root: Path, case: str, on_error: str):
    from elinspect.data.aluminum import RELEASE_DIR, AluminumDataModule

    folder = root / RELEASE_DIR / "单瑕疵图片" / "擦花"
    for i in range(4):
        jpeg(folder / f"g{i}.jpg", value=i)
        (folder / f"g{i}.json").write_text(labelme(image=f"g{i}.jpg"), encoding="utf-8")
    image = "bad.jpg"
    if case in IMAGE_CASES:
        image = write_image_case(case, folder / "bad").name
    elif case != "missing_image":
        jpeg(folder / "bad.jpg")
    text = labelme(image=image)
    if case in LABELME_POINTS:
        text = labelme(points=LABELME_POINTS[case], image=image)
    elif case == "unknown_class":
        text = labelme(label="铁锈", image=image)
    elif case == "path_outside":
        text = labelme(image="../../../../outside.jpg")
    elif case == "duplicate_box":
        text = labelme(image=image, copies=2)
    elif case == "malformed_json":
        text = text[: len(text) // 2]
    (folder / "bad.json").write_text(text, encoding="utf-8")
    return AluminumDataModule(
        root=str(root),
        **class_config("aluminum"),
        test_size=1,
        val_fraction=0.0,
        image_size=32,
        augment=None,
        batch_size=2,
        num_workers=0,
        on_error=on_error,
    )


FABRIC_BOXES = {  # Fabric [x1, y1, x2, y2]
    "box_negative": [-9, -9, 20, 20],
    "box_outside": [100, 100, 120, 120],
    "box_zero_area": [10, 10, 10, 20],
    "box_nan": [float("nan"), 1, 5, 5],
    "box_swapped": [30, 30, 10, 10],
}


def build_fabric(root: Path, case: str, on_error: str):
    from elinspect.data.fabric import FabricDataModule

    part = root / "guangdong1_round2_train_part1_20190924"
    entries = []
    for i in range(4):
        folder = part / "defect" / f"g{i}"
        jpeg(folder / f"g{i}.jpg", value=i)
        jpeg(folder / "template_g.jpg", value=20 + i)
        entries.append({"name": f"g{i}.jpg", "defect_name": "沾污", "bbox": [5, 5, 20, 20]})
    folder = part / "defect" / "bad"
    if case in IMAGE_CASES:  # the release's images are all <stem>.jpg, whatever is inside
        written = write_image_case(case, folder / "bad")
        written.rename(folder / "bad.jpg")
    elif case != "missing_image":
        jpeg(folder / "bad.jpg")
    if folder.is_dir():
        jpeg(folder / "template_b.jpg")
    bad = {"name": "bad.jpg", "defect_name": "沾污", "bbox": FABRIC_BOXES.get(case, [10, 10, 30, 30])}
    entries.append(bad)
    if case == "unknown_class":
        bad["defect_name"] = "铁锈"
    elif case == "path_outside":
        bad["name"] = "../../outside.jpg"
    elif case == "duplicate_box":
        entries.append(dict(bad))
    text = json.dumps(entries, ensure_ascii=False)
    if case == "malformed_json":
        text = text[: len(text) // 2]
    (part / "Annotations").mkdir(parents=True, exist_ok=True)
    (part / "Annotations" / "anno_train.json").write_text(text, encoding="utf-8")
    return FabricDataModule(
        root=str(root),
        parts=[part.name],
        **class_config("fabric"),
        test_size=1,
        val_fraction=0.0,
        image_size=32,
        augment=None,
        batch_size=2,
        num_workers=0,
        on_error=on_error,
    )


BUILDERS: dict[str, Callable] = {
    "pvel": lambda root, case, on_error: build_voc(root, case, on_error, pvel=True),
    "voc": build_voc,
    "coco": build_coco,
    "elpv": build_elpv,
    "folder": build_folder,
    "aluminum": build_aluminum,
    "fabric": build_fabric,
}


def loaded_images(dm, reader: str) -> Iterator[tuple[Path, torch.Tensor]]:
    """``(image path, image tensor)`` of every item of every split (loading each one)."""
    for split in ("train", "val", "test"):
        dataset = dm.dataset(split)
        for i in range(len(dataset)):
            item = dataset[i]
            if reader in ("pvel", "voc", "coco", "aluminum", "fabric"):
                yield dataset.records[i].image_path, item[0]
            elif reader == "elpv":
                yield dm.table.paths[int(dataset.rows[i])], item["image"]
            else:
                yield Path(item["path"]), item["image"]


def tally_counts(dm) -> dict[str, int]:
    return dict(dm.tally.counts)


TABLE = [
    pytest.param(reader, case, on_error)
    for reader, cases in OUTCOMES.items()
    for case in cases
    for on_error in ("raise", "skip")
]


@pytest.mark.parametrize(("reader", "case", "on_error"), TABLE)
def test_bad_input_has_its_documented_outcome(tmp_path: Path, reader: str, case: str, on_error: str) -> None:
    expect = OUTCOMES[reader][case][on_error == "skip"]
    root = tmp_path / "data"
    root.mkdir()
    dm = BUILDERS[reader](root, case, on_error)

    if expect.stage == "setup":
        with pytest.raises(DatasetError, match=expect.match):
            dm.setup()
        return
    dm.setup()
    if expect.stage == "load":
        with pytest.raises(DatasetError, match=expect.match):
            list(loaded_images(dm, reader))
        return

    counts = tally_counts(dm)
    if expect.count is not None:
        assert counts.get(expect.count, 0) >= 1, counts
    if on_error == "raise":
        # nothing fatal was skipped silently: only never-fatal fixes are counted
        assert set(counts) <= {"box clipped to image", "identical duplicate box dropped"}, counts
    seen = dict(loaded_images(dm, reader))
    colour = expected_colour(case, grey=reader == "elpv")
    if colour is not None:  # 16-bit scaled to 8 bits, alpha dropped
        image = next(t for p, t in seen.items() if p.stem == "bad")
        for channel in range(image.shape[0]):
            expected = colour[min(channel, len(colour) - 1)]
            torch.testing.assert_close(image[channel], torch.full_like(image[channel], float(expected)))
    if expect.count == UNREADABLE:
        assert not any(p.stem == "bad" for p in seen)  # the bad image was dropped


def test_voc_box_cases_keep_the_image_and_fix_or_drop_the_box(tmp_path: Path) -> None:
    """Clipping, de-duplication and dropping act on the box, never on the image's other boxes."""
    results = {}
    for case in ("box_negative", "duplicate_box", "box_nan"):
        dm = build_voc(tmp_path / case, case, "skip")
        dm.setup()
        results[case] = next(r for r in dm.records["train"] if r.image_path.stem == "bad")
    np.testing.assert_array_equal(results["box_negative"].boxes, [[0, 0, 20, 20]])
    # two identical crack boxes and a finger box on the same spot: the second crack goes
    np.testing.assert_array_equal(results["duplicate_box"].boxes, [[10, 20, 50, 40], [10, 20, 50, 40]])
    np.testing.assert_array_equal(results["duplicate_box"].labels, [1, 2])
    assert results["box_nan"].num_boxes == 0


# -------------------------------------------------------------------- image reading details


def test_a_bomb_is_refused_before_any_pixel_is_decoded(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "bomb.jpg"
    path.write_bytes(jpeg_declaring(10_000, 10_000))

    def no_decoding(*args, **kwargs):
        raise AssertionError("the bomb reached the decoder")

    monkeypatch.setattr(images_mod.cv2, "imdecode", no_decoding)
    with pytest.raises(
        DatasetError, match=r"bomb\.jpg: declares 10000×10000 .* refused as a decompression bomb"
    ):
        read_image(path)
    with pytest.raises(DatasetError, match="bomb.jpg: cannot read the image header|bomb.jpg: declares"):
        read_header(path)
    # the limit is Pillow's MAX_IMAGE_PIXELS unless given; a genuine big image passes when raised
    assert read_header(path, max_pixels=10**8) == (10_000, 10_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**9)
    assert read_header(path) == (10_000, 10_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DatasetError, match="small.jpg: refused as a decompression bomb"):
        read_header(jpeg(tmp_path / "small.jpg"))


def test_truncation_is_found_at_every_cut_and_complete_files_pass(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    encoded = {}
    for name, options in {"baseline": {}, "progressive": {"progressive": True}}.items():
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", **options)
        encoded[name] = out.getvalue()
    _, restart = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])
    encoded["restart_markers"] = restart.tobytes()
    for name, data in encoded.items():
        assert jpeg_is_complete(data), name
        assert jpeg_is_complete(data + b"\x00" * 100 + b"trailing video"), name  # data after the end
        cuts = range(4, len(data) - 1, max(1, len(data) // 200))
        assert not any(jpeg_is_complete(data[:cut]) for cut in cuts), name
    path = tmp_path / "cut.jpg"
    path.write_bytes(encoded["progressive"][: len(encoded["progressive"]) // 2])
    with pytest.raises(DatasetError, match="cut.jpg: truncated JPEG"):
        read_image(path)


@pytest.mark.parametrize("grey", [True, False])
def test_sixteen_bit_and_alpha_images_read_as_eight_bit(tmp_path: Path, grey: bool) -> None:
    for case in ("png16", "rgba"):
        image = read_image(write_image_case(case, tmp_path / case), grey=grey)
        assert image.dtype == np.uint8 and image.shape == ((H, W) if grey else (H, W, 3))
        np.testing.assert_allclose(
            image.reshape(-1, 1 if grey else 3)[0] / 255, expected_colour(case, grey), atol=1e-6
        )


def test_a_sixteen_bit_image_of_fewer_bits_is_refused_or_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 bits become 8 by the high byte. A camera's 12-bit values in a 16-bit file (0..4095)
    would come out as 0..15, nearly black: that is logged, naming the file. Values that all lie
    below 256 would come out black: an error naming the file. Full-range files say nothing."""
    monkeypatch.setattr(images_mod, "_few_bits_reported", False)  # once per process
    ramp = np.tile(np.linspace(0, 1, W), (H, 1))
    paths = {}
    for name, top in (("twelve", 4095), ("byte", 200), ("full", 65535)):
        paths[name] = tmp_path / f"{name}.png"
        assert cv2.imwrite(str(paths[name]), np.round(ramp * top).astype(np.uint16))
    with caplog.at_level("WARNING", logger="elinspect.data.images"):
        assert read_image(paths["full"]).max() == 255
        assert not caplog.records
        assert read_image(paths["twelve"]).max() == 15
    assert "twelve.png: a 16-bit image whose values all lie below 4096" in caplog.text
    with pytest.raises(DatasetError, match=r"byte.png: a 16-bit image whose values all lie below 256"):
        read_image(paths["byte"])

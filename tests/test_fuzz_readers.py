"""Hypothesis fuzzing of every parser of files on disk: nothing but a DatasetError escapes.

Inputs are mutated valid files (bytes inserted, deleted, replaced; a JSON node swapped for
an arbitrary value) and generated ones (label rows from a grammar of awkward tokens, folder
trees of good and broken files). Under both ``on_error`` policies a parser either returns
well-formed records or raises :class:`~elinspect.data.errors.DatasetError` naming a file.
Example counts are modest; ``-m slow`` runs each target with ten times as many.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from elinspect.data.elpv import read_labels
from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.data.folder import FolderDataModule
from elinspect.data.images import read_header, read_image
from elinspect.data.readers import parse_voc_xml, read_coco

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
HEAVY = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None)
W, H = 40, 30

VALID_XML = (
    b'<?xml version="1.0" encoding="utf-8"?>\n<annotation><folder>VOC2007</folder>'
    b"<filename>a.jpg</filename><size><width>40</width><height>30</height><depth>1</depth></size>"
    b"<object><name>crack</name><difficult>0</difficult><bndbox><xmin>3</xmin><ymin>4</ymin>"
    b"<xmax>20</xmax><ymax>25</ymax></bndbox></object>"
    b"<object><name>finger</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>40</xmax><ymax>30</ymax>"
    b"</bndbox></object></annotation>"
)
VALID_COCO: dict[str, Any] = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "width": W, "height": H},
        {"id": 2, "file_name": "b.jpg"},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [3, 4, 10, 10], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]},
    ],
    "categories": [{"id": 1, "name": "crack"}, {"id": 2, "name": "finger"}],
}
MARKUP = [
    b"<",
    b">",
    b"</",
    b"&",
    b"&amp;",
    b"<!ENTITY x 'y'>",
    b"<!DOCTYPE a>",
    b'"',
    b"\x00",
    b"\xff",
    b"]]>",
]


def mutated(valid: bytes, extra: list[bytes]) -> st.SearchStrategy[bytes]:
    """``valid`` with up to 4 edits: a span deleted, replaced or duplicated, or a token inserted."""
    edit = st.tuples(
        st.sampled_from(["delete", "replace", "insert", "duplicate"]),
        st.integers(0, len(valid)),
        st.integers(0, 40),
        st.one_of(st.binary(max_size=12), st.sampled_from(extra)),
    )

    def apply(edits: list[tuple[str, int, int, bytes]]) -> bytes:
        data = valid
        for kind, at, length, token in edits:
            at = min(at, len(data))
            if kind == "delete":
                data = data[:at] + data[at + length :]
            elif kind == "replace":
                data = data[:at] + token + data[at + len(token) :]
            elif kind == "insert":
                data = data[:at] + token + data[at:]
            else:
                data = data[:at] + data[at : at + length] * 2 + data[at + length :]
        return data

    return st.lists(edit, min_size=1, max_size=4).map(apply)


def image_bytes(ext: str, size: tuple[int, int] = (W, H), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(out, "JPEG" if ext == ".jpg" else "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fuzz")
    (base / "a.jpg").write_bytes(image_bytes(".jpg"))
    (base / "b.jpg").write_bytes(image_bytes(".jpg", (20, 10)))
    return base


def check_record(record) -> None:
    """What a record that came back must satisfy."""
    if record is None:
        return
    assert record.boxes.dtype == np.float32 and record.boxes.shape == (record.num_boxes, 4)
    assert np.isfinite(record.boxes).all()
    assert (record.boxes[:, 2:] > record.boxes[:, :2]).all()
    assert (record.labels >= 1).all()


# ------------------------------------------------------------------------------ VOC XML


def fuzz_voc(workdir: Path, content: bytes, on_error: str) -> None:
    xml = workdir / "a.xml"
    xml.write_bytes(content)
    try:
        record = parse_voc_xml(xml, {"crack": 1, "finger": 2}, workdir / "a.jpg", ErrorTally(on_error))
    except DatasetError as error:
        assert error.path is not None
        return
    check_record(record)


_voc_inputs = st.one_of(mutated(VALID_XML, MARKUP), st.binary(max_size=200))


@FAST
@given(content=_voc_inputs, on_error=st.sampled_from(["raise", "skip"]))
def test_voc_xml_parser_raises_only_dataset_errors(workdir: Path, content: bytes, on_error: str) -> None:
    fuzz_voc(workdir, content, on_error)


@pytest.mark.slow
@HEAVY
@given(content=_voc_inputs, on_error=st.sampled_from(["raise", "skip"]))
def test_voc_xml_parser_heavy(workdir: Path, content: bytes, on_error: str) -> None:
    fuzz_voc(workdir, content, on_error)


# ------------------------------------------------------------------------------ COCO JSON

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["a.jpg", "../a.jpg", "/etc/passwd", "a.jpg\x00", "b.jpg"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def paths_of(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indices) into a JSON value."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths_of(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += paths_of(value, (*prefix, index))
    return out


ALL_PATHS = paths_of(VALID_COCO)


def replaced(edits: list[tuple[tuple, Any]]) -> dict[str, Any]:
    data = json.loads(json.dumps(VALID_COCO))
    for path, value in edits:
        if not path:
            return value
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    return data


_coco_inputs = st.one_of(
    st.lists(st.tuples(st.sampled_from(ALL_PATHS), _json), min_size=1, max_size=3).map(
        lambda edits: json.dumps(replaced(edits)).encode()
    ),
    mutated(
        json.dumps(VALID_COCO).encode(), [b"{", b"}", b"[", b"]", b",", b":", b'"', b"NaN", b"1e999", b"-"]
    ),
)


def fuzz_coco(workdir: Path, content: bytes, on_error: str) -> None:
    path = workdir / "ann.json"
    path.write_bytes(content)
    try:
        records, names = read_coco(path, workdir, None, ErrorTally(on_error))
    except DatasetError as error:
        assert error.path is not None
        return
    assert all(isinstance(n, str) for n in names)
    for record in records:
        check_record(record)
        assert record.image_path.parent == workdir


@FAST
@given(content=_coco_inputs, on_error=st.sampled_from(["raise", "skip"]))
def test_coco_json_parser_raises_only_dataset_errors(workdir: Path, content: bytes, on_error: str) -> None:
    fuzz_coco(workdir, content, on_error)


@pytest.mark.slow
@HEAVY
@given(content=_coco_inputs, on_error=st.sampled_from(["raise", "skip"]))
def test_coco_json_parser_heavy(workdir: Path, content: bytes, on_error: str) -> None:
    fuzz_coco(workdir, content, on_error)


# ----------------------------------------------------------------------- ELPV labels.csv

_token = st.one_of(
    st.sampled_from(
        [
            "images/a.png",
            "images/b.png",
            "images/missing.png",
            "../a.png",
            "/etc/passwd",
            "images/../images/a.png",
            "images/a.png\x00",
            "images/\u00e4.png",
            "0",
            "1.0",
            "0.3333333333333333",
            "0.6666666666666666",
            "nan",
            "inf",
            "-0",
            "1e999",
            "mono",
            "poly",
            "MONO",
        ]
    ),
    st.text(min_size=1, max_size=6).filter(lambda t: not any(c.isspace() for c in t)),
)
_row = st.lists(_token, min_size=0, max_size=4).map("  ".join)
_labels_inputs = st.one_of(
    st.lists(_row, max_size=6).map(lambda rows: "\n".join(rows).encode("utf-8", "surrogatepass")),
    st.binary(max_size=100),
)


def elpv_root(base: Path) -> Path:
    root = base / "elpv"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images" / "a.png").write_bytes(image_bytes(".png", mode="L"))
    (root / "images" / "b.png").write_bytes(b"not a png")
    return root


def fuzz_elpv(root: Path, content: bytes, on_error: str) -> None:
    (root / "labels.csv").write_bytes(content)
    try:
        table = read_labels(root, on_error)
    except DatasetError as error:
        assert error.path is not None
        return
    assert len(table) == len(set(table.paths)) >= 1
    assert all(p.is_relative_to(root) and p.is_file() for p in table.paths)
    assert np.isin(np.rint(table.probability * 3), [0, 1, 2, 3]).all()


@FAST
@given(content=_labels_inputs, on_error=st.sampled_from(["raise", "skip"]))
def test_elpv_labels_parser_raises_only_dataset_errors(workdir: Path, content: bytes, on_error: str) -> None:
    fuzz_elpv(elpv_root(workdir), content, on_error)


@pytest.mark.slow
@HEAVY
@given(content=_labels_inputs, on_error=st.sampled_from(["raise", "skip"]))
def test_elpv_labels_parser_heavy(workdir: Path, content: bytes, on_error: str) -> None:
    fuzz_elpv(elpv_root(workdir), content, on_error)


# ------------------------------------------------------------------- folder mask matching

GOOD_PNG = image_bytes(".png")
OTHER_SIZE_PNG = image_bytes(".png", (W + 1, H))
MASK_PNG = image_bytes(".png", mode="L")
CONTENTS = {
    "image": GOOD_PNG,
    "other_size": OTHER_SIZE_PNG,
    "mask": MASK_PNG,
    "empty": b"",
    "junk": b"junk",
    "truncated": GOOD_PNG[: len(GOOD_PNG) // 2],
}
_file = st.tuples(
    st.sampled_from(["good", "defect", "defect/crack", "masks", "masks/crack", "good/.hidden"]),
    st.sampled_from(["0", "1", "x", "x_mask", "0_mask", ".dot"]),
    st.sampled_from([".png", ".PNG", ".jpg", ".txt"]),
    st.sampled_from(sorted(CONTENTS)),
)
_trees = st.lists(_file, max_size=10)


def fuzz_folder(files: list[tuple[str, str, str, str]], on_error: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for directory in ("good", "defect", "masks"):
            (root / directory).mkdir()
        for directory, stem, ext, content in files:
            (root / directory).mkdir(parents=True, exist_ok=True)
            (root / directory / f"{stem}{ext}").write_bytes(CONTENTS[content])
        dm = FolderDataModule(
            root=str(root),
            mask_dir="masks",
            image_size=16,
            num_workers=0,
            on_error=on_error,
            val_fraction=0.2,
        )
        try:
            dm.setup()
            for split in ("train", "val", "test"):
                dataset = dm.dataset(split)
                for i in range(len(dataset)):
                    item = dataset[i]
                    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
        except DatasetError as error:
            assert error.path is not None


@FAST
@given(files=_trees, on_error=st.sampled_from(["raise", "skip"]))
def test_folder_listing_and_mask_matching_raise_only_dataset_errors(files, on_error: str) -> None:
    fuzz_folder(files, on_error)


@pytest.mark.slow
@HEAVY
@given(files=_trees, on_error=st.sampled_from(["raise", "skip"]))
def test_folder_listing_and_mask_matching_heavy(files, on_error: str) -> None:
    fuzz_folder(files, on_error)


# -------------------------------------------------------------------------- image bytes

IMAGES = [
    image_bytes(".jpg"),
    image_bytes(".png"),
    image_bytes(".png", mode="RGBA"),
    image_bytes(".png", mode="L"),
    cv2.imencode(".png", np.full((H, W), 40000, np.uint16))[1].tobytes(),
    cv2.imencode(".bmp", np.zeros((H, W, 3), np.uint8))[1].tobytes(),
]
_image_inputs = st.sampled_from(IMAGES).flatmap(
    lambda valid: mutated(
        valid, [b"\xff\xd9", b"\xff\xda", b"\xff\xd8", b"\xff", b"\x00" * 8, b"IEND", b"IHDR"]
    )
)


def fuzz_image(workdir: Path, content: bytes, grey: bool) -> None:
    path = workdir / "fuzzed.img"
    path.write_bytes(content)
    try:
        width, height = read_header(path)
        image = read_image(path, grey=grey)
    except DatasetError as error:
        assert error.path == path
        return
    assert image.dtype == np.uint8
    assert image.shape == ((height, width) if grey else (height, width, 3))


@FAST
@given(content=_image_inputs, grey=st.booleans())
def test_image_reading_raises_only_dataset_errors(workdir: Path, content: bytes, grey: bool) -> None:
    fuzz_image(workdir, content, grey)


@pytest.mark.slow
@HEAVY
@given(content=_image_inputs, grey=st.booleans())
def test_image_reading_heavy(workdir: Path, content: bytes, grey: bool) -> None:
    fuzz_image(workdir, content, grey)

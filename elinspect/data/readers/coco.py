"""COCO "instances" JSON for detection: reading into records, and writing records back.

Read: ``images`` (``id``, ``file_name`` relative to the image root, ``width``, ``height``),
``annotations`` (``image_id``, ``category_id``, ``bbox = [x, y, w, h]`` in 0-based pixel
coordinates, ``iscrowd``) and ``categories`` (``id``, ``name``). Boxes become
``x1, y1, x2, y2 = x, y, x + w, y + h``; ``iscrowd = 1`` marks a box ``difficult`` (both mean
"do not penalise a miss"). Images without annotations are defect-free records.

Errors: a file that cannot be read, is not JSON or lacks the ``images`` / ``annotations`` /
``categories`` lists, has malformed or duplicate categories, or lists an image id twice,
raises :class:`DatasetError` whatever ``on_error`` says (nothing of the dataset would be
left to skip to, or which boxes belong to which entry is ambiguous). Problems with one
image or one annotation go through ``tally.report`` and drop that item under skip:

====================================  =====================================  ==========================================
input                                 raise                                  skip (tally reason)
====================================  =====================================  ==========================================
not JSON, not an object, missing      error naming the JSON                  the same error (fatal)
lists, bad/duplicate categories,
an image id listed twice
the same file under two image ids     error naming the JSON and the file     later entry dropped ("duplicate image
                                                                             entry"), its boxes with it
image entry without id / file_name    error naming the JSON                  entry dropped ("malformed image entry")
file_name leaving the image root      error naming the JSON                  image dropped ("path outside the dataset
(``../../x.jpg``, absolute)                                                  root")
file_name without a file              error naming the JSON and the path     image dropped ("missing image")
image empty, not an image, or a       error naming the image, at setup       image dropped ("unreadable image")
decompression bomb (header checked)
image truncated / corrupt past its    error naming the image when loaded     same (a loaded batch cannot drop an item)
header
annotation: unknown image_id,         error naming the JSON and the          annotation dropped ("malformed
undefined category_id, bad bbox       annotation number                      annotation")
category outside data.classes         error naming the JSON and the class    its boxes dropped ("unknown category",
                                                                             "box of unknown category")
box partly outside the image          clipped, counted, never an error       "box clipped to image"
NaN / infinite coordinates            error naming the JSON and the box      box dropped ("box with non-finite ...")
zero or negative width/height,        error naming the JSON and the box      box dropped ("box with zero or negative
wholly outside the image                                                     area")
identical duplicate annotation        dropped, counted, never an error       "identical duplicate box dropped"
width/height disagreeing with the     the image's size is used, counted      "declared image size differs ..."
image
====================================  =====================================  ==========================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.data.readers.boxes import (
    OUTSIDE_ROOT,
    SIZE_MISMATCH,
    image_size,
    is_json_number,
    path_inside,
    sanitize_boxes,
)
from elinspect.data.records import DetectionRecord

log = logging.getLogger(__name__)

MALFORMED_IMAGE = "malformed image entry"
DUPLICATE_IMAGE = "duplicate image entry"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
MALFORMED_ANNOTATION = "malformed annotation"
UNKNOWN_CATEGORY = "unknown category"
UNKNOWN_CATEGORY_BOX = "box of unknown category"


@dataclass
class _Image:
    path: Path
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    crowd: list[bool] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    annotated: bool = False  # any annotation names this image, kept or not


def read_coco(
    annotation_json: str | Path,
    image_root: str | Path,
    class_names: Sequence[str] | None,
    tally: ErrorTally,
) -> tuple[list[DetectionRecord], list[str]]:
    """Read a COCO instances file; returns ``(records in file order, class_names)``.

    Class order (label = position + 1) is ``class_names`` when given, categories being
    matched by name (a category not in it is an "unknown category" error; under skip its
    boxes are dropped and counted), else the categories' names sorted by category id.
    ``file_name`` must stay inside ``image_root`` and name an existing image; a missing
    ``width``/``height`` is read from the image header. Boxes go through
    :func:`sanitize_boxes`.
    """
    path = Path(annotation_json)
    data = _load_json(path)
    images, annotations, categories = (
        _require_list(data, key, path) for key in ("images", "annotations", "categories")
    )
    names, labels, unknown = _category_labels(categories, class_names, path, tally)
    entries, dropped = _read_images(images, Path(image_root), path, tally)

    for number, ann in enumerate(annotations):
        _add_annotation(ann, number, entries, dropped, labels, unknown, path, tally)

    records = []
    for entry in entries.values():
        boxes, box_labels, difficult = sanitize_boxes(
            entry.boxes,
            entry.labels,
            entry.crowd,
            entry.width,
            entry.height,
            path,
            tally,
            numbers=entry.numbers,
        )
        records.append(
            DetectionRecord(
                entry.path, boxes, box_labels, difficult, entry.width, entry.height, annotated=entry.annotated
            )
        )
    return records, names


def records_to_coco(
    records: Sequence[DetectionRecord], class_names: Sequence[str], image_root: str | Path
) -> dict[str, Any]:
    """The COCO instances dict for ``records`` (the inverse of :func:`read_coco`).

    Image ids and annotation ids count from 1 in order; ``file_name`` is the image path
    relative to ``image_root`` (POSIX separators; ``ValueError`` if an image lies outside
    it); ``difficult`` becomes ``iscrowd = 1``. A record without width/height gets them from
    the image header.
    """
    root = Path(image_root).absolute()
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        relative = Path(record.image_path).absolute().relative_to(root)
        width, height = record.width, record.height
        if width is None or height is None:
            width, height = image_size(record.image_path)
        images.append({"id": image_id, "file_name": relative.as_posix(), "width": width, "height": height})
        for box, label, difficult in zip(record.boxes, record.labels, record.difficult, strict=True):
            if not 1 <= label <= len(class_names):
                raise ValueError(f"{record.image_path}: label {label} outside 1..{len(class_names)}")
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(difficult),
                }
            )
    categories = [{"id": i, "name": name, "supercategory": "defect"} for i, name in enumerate(class_names, 1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(
    records: Sequence[DetectionRecord],
    class_names: Sequence[str],
    image_root: str | Path,
    path: str | Path,
) -> Path:
    """Write :func:`records_to_coco` to ``path`` as UTF-8 JSON (class names kept unescaped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    coco = records_to_coco(records, class_names, image_root)
    path.write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    return path


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except OSError as error:
        raise DatasetError(path, f"cannot read the annotation file ({error})") from error
    except (ValueError, RecursionError) as error:
        raise DatasetError(path, f"not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise DatasetError(path, f"a COCO file holds a JSON object, not {type(data).__name__}")
    return data


def _require_list(data: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        problem = f"missing key {key!r}" if key not in data else f"{key!r} is not a list"
        raise DatasetError(
            path, f"{problem} (a COCO instances file has 'images', 'annotations', 'categories')"
        )
    return value


def _is_id(value: Any) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def _category_labels(
    categories: list[Any], class_names: Sequence[str] | None, path: Path, tally: ErrorTally
) -> tuple[list[str], dict[int | str, int], set[int | str]]:
    """``(class names, category id → label, ids of categories outside class_names)``."""
    by_id: dict[int | str, str] = {}
    for number, cat in enumerate(categories):
        if not (isinstance(cat, dict) and _is_id(cat.get("id")) and isinstance(cat.get("name"), str)):
            raise DatasetError(
                path,
                f"category #{number} needs an 'id' (integer or string) and a string 'name': {cat!r:.200}",
            )
        if cat["id"] in by_id:
            raise DatasetError(path, f"category id {cat['id']!r} appears twice")
        by_id[cat["id"]] = cat["name"]
    if len(set(by_id.values())) != len(by_id):
        raise DatasetError(path, f"category names repeat: {sorted(by_id.values())}")

    if class_names is None:
        names = [by_id[i] for i in sorted(by_id, key=lambda i: (isinstance(i, str), i))]
    else:
        names = list(class_names)
        if len(set(names)) != len(names):
            raise ValueError(f"class names repeat a name: {names}")
    index = {name: label for label, name in enumerate(names, start=1)}
    labels, unknown = {}, set()
    for cat_id, name in by_id.items():
        if name in index:
            labels[cat_id] = index[name]
        else:
            problem = f"unknown category {name!r} (id {cat_id!r}); known classes: {', '.join(names)}"
            tally.report(DatasetError(path, problem), reason=UNKNOWN_CATEGORY)
            unknown.add(cat_id)
    return names, labels, unknown


def _read_images(
    images: list[Any], image_root: Path, path: Path, tally: ErrorTally
) -> tuple[dict[int | str, _Image], set[int | str]]:
    """``(image id → entry, ids of images dropped under skip)``."""
    entries: dict[int | str, _Image] = {}
    dropped: set[int | str] = set()
    seen: set[int | str] = set()
    files: dict[Path, int | str] = {}
    for number, image in enumerate(images):
        if not (
            isinstance(image, dict) and _is_id(image.get("id")) and isinstance(image.get("file_name"), str)
        ):
            problem = f"image #{number} needs an 'id' and a string 'file_name': {image!r:.200}"
            tally.report(DatasetError(path, problem), reason=MALFORMED_IMAGE)
            continue
        image_id = image["id"]
        if image_id in seen:
            # fatal whatever on_error says: annotations name images by id, so which entry
            # their boxes belong to is ambiguous
            raise DatasetError(path, f"image id {image_id!r} appears twice in 'images'")
        seen.add(image_id)
        entry = _image_entry(image, image_root, path, tally)
        if entry is not None and entry.path in files:
            problem = f"image {image_id!r}: {entry.path} is already image {files[entry.path]!r}"
            tally.report(DatasetError(path, problem), reason=DUPLICATE_IMAGE)
            entry = None
        if entry is None:
            dropped.add(image_id)
        else:
            entries[image_id] = entry
            files[entry.path] = image_id
    return entries, dropped


def _image_entry(image: dict[str, Any], image_root: Path, path: Path, tally: ErrorTally) -> _Image | None:
    try:
        image_path = path_inside(image_root, image["file_name"])
    except DatasetError as error:
        tally.report(DatasetError(path, f"image {image['id']!r}: {error.problem}"), reason=OUTSIDE_ROOT)
        return None
    if not image_path.is_file():
        problem = f"image {image['id']!r}: {image_path} does not exist"
        tally.report(DatasetError(path, problem), reason=MISSING_IMAGE)
        return None
    try:  # every image's header, so that an empty, non-image or bomb file is caught here
        width, height = image_size(image_path)
    except DatasetError as error:
        tally.report(error, reason=UNREADABLE_IMAGE)
        return None
    declared = image.get("width"), image.get("height")
    if all(_is_positive_int(v) for v in declared) and declared != (width, height):
        tally.count(SIZE_MISMATCH)
        log.warning(
            "%s: image %r declares %s×%s, but %s is %d×%d",
            path,
            image["id"],
            *declared,
            image_path,
            width,
            height,
        )
    return _Image(image_path, width, height)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31


def _add_annotation(
    ann: Any,
    number: int,
    entries: dict[int | str, _Image],
    dropped: set[int | str],
    labels: dict[int | str, int],
    unknown: set[int | str],
    path: Path,
    tally: ErrorTally,
) -> None:
    """Append one annotation's box to its image entry, or report/count why it is dropped."""
    problem = _annotation_problem(ann, entries, dropped, labels, unknown)
    if problem is not None:
        tally.report(DatasetError(path, f"annotation #{number}: {problem}"), reason=MALFORMED_ANNOTATION)
        return
    if ann["image_id"] in dropped:
        return
    entries[ann["image_id"]].annotated = True
    if ann["category_id"] in unknown:
        tally.count(UNKNOWN_CATEGORY_BOX)
        return
    entry = entries[ann["image_id"]]
    x, y, w, h = (float(v) for v in ann["bbox"])
    entry.boxes.append([x, y, x + w, y + h])
    entry.labels.append(labels[ann["category_id"]])
    entry.crowd.append(ann.get("iscrowd", 0) == 1)
    entry.numbers.append(number)


def _annotation_problem(
    ann: Any,
    entries: dict[int | str, _Image],
    dropped: set[int | str],
    labels: dict[int | str, int],
    unknown: set[int | str],
) -> str | None:
    """What makes ``ann`` unusable, or ``None``."""
    if not isinstance(ann, dict):
        return f"not an object: {ann!r:.200}"
    image_id, category_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
    if not _is_id(image_id) or (image_id not in entries and image_id not in dropped):
        return f"refers to unknown image_id {image_id!r:.100}"
    if not _is_id(category_id) or (category_id not in labels and category_id not in unknown):
        return f"refers to undefined category_id {category_id!r:.100}"
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_json_number(v) for v in bbox)):
        return f"'bbox' must be [x, y, width, height] numbers, got {bbox!r:.200}"
    return None


__all__ = ["read_coco", "records_to_coco", "write_coco"]

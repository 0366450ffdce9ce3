"""Labelme JSON annotations: one file beside each annotated image (Aluminum, DESIGN.md §3).

Fields read (labelme 3.x and later): ``shapes`` (a list of ``{"label", "points",
"shape_type"}``), ``imagePath``, ``imageWidth``, ``imageHeight``; the rest (``imageData``,
colours, ``flags``, ``version``) is ignored. A shape's box is the min/max of its points, which
is exact for polygons and for rectangles written either as 2 corners (labelme ≥ 3.5) or as 4
corners (older files, and shapes without ``shape_type``); a ``circle`` (centre, point on the
rim) becomes the circle's bounding square. Labels are mapped to classes through a lookup
built from the config (:func:`elinspect.data.detection.class_lookup`), so other defect names
need no code.

The image is the one beside the JSON (same stem), found by the caller; ``imagePath`` is only
checked: a relative path that leaves the dataset root when taken from the JSON's folder (e.g.
``../../x.jpg``) or an absolute POSIX path is refused. A Windows drive path (``C:\\...``, the
labelling machine's) names nothing here and is ignored, as VOC's ``<path>`` is.

Errors go through the :class:`~elinspect.data.errors.ErrorTally`: a file that cannot be read,
is not JSON or has no ``shapes`` list, or names an image outside the root, drops the image; a
malformed shape or one of an unknown label drops that shape. Boxes go through
:func:`~elinspect.data.readers.boxes.sanitize_boxes`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
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
from elinspect.data.readers.voc import IGNORED_CLASS, MISSING_IMAGE, UNKNOWN_CLASS, UNREADABLE_IMAGE
from elinspect.data.records import DetectionRecord

UNPARSABLE = "unparsable labelme JSON"
MALFORMED_SHAPE = "malformed labelme shape"

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")

__all__ = [
    "IGNORED_CLASS",
    "MALFORMED_SHAPE",
    "MISSING_IMAGE",
    "UNKNOWN_CLASS",
    "UNPARSABLE",
    "load_json_file",
    "read_labelme",
]


def read_labelme(
    json_path: str | Path,
    image_path: str | Path,
    root: str | Path,
    labels: Mapping[str, int | None],
    tally: ErrorTally,
    header_size: tuple[int, int] | None = None,
) -> DetectionRecord | None:
    """The record of ``image_path`` from its labelme file, or ``None`` when it was skipped.

    ``header_size`` is the image's ``(width, height)`` when the caller has read its header;
    it wins over ``imageWidth``/``imageHeight`` (a difference is counted). Without it the
    declared size is used, or the header is read when none is declared.

    ``labels`` maps a shape label (stripped of surrounding white space) to a 1-based class
    label, or to ``None`` for a known class outside the chosen subset (dropped and counted);
    a label not in it is an unknown-class error naming the file. ``root`` is the dataset root
    that ``imagePath`` must not leave.
    """
    json_path, image_path = Path(json_path), Path(image_path)
    data = load_json_file(json_path, tally, UNPARSABLE)
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        problem = "not a labelme annotation (a JSON object with a 'shapes' list expected)"
        tally.report(DatasetError(json_path, problem), reason=UNPARSABLE)
        return None
    try:
        _check_image_path(data.get("imagePath"), json_path, Path(root))
    except DatasetError as error:
        tally.report(error, reason=OUTSIDE_ROOT)
        return None
    size = _declared_size(data)
    if header_size is not None:
        if size is not None and tuple(size) != tuple(header_size):
            tally.count(SIZE_MISMATCH)
        size = header_size
    if size is None:
        try:
            size = image_size(image_path)
        except DatasetError as error:
            tally.report(error, reason=UNREADABLE_IMAGE)
            return None
    width, height = size

    boxes, box_labels, numbers = [], [], []
    for number, shape in enumerate(data["shapes"]):
        parsed = _parse_shape(shape, number, json_path, labels, tally)
        if parsed is not None:
            boxes.append(parsed[0])
            box_labels.append(parsed[1])
            numbers.append(number)
    boxes_arr, labels_arr, difficult = sanitize_boxes(
        boxes, box_labels, [False] * len(boxes), width, height, json_path, tally, numbers=numbers
    )
    return DetectionRecord(image_path, boxes_arr, labels_arr, difficult, width, height, annotated=True)


def load_json_file(path: Path, tally: ErrorTally, reason: str) -> Any | None:
    """The parsed JSON of ``path`` (UTF-8, with or without BOM, or GB18030 as Chinese Windows
    tools write it), or ``None`` after reporting why it cannot be read."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        tally.report(DatasetError(path, f"cannot read the annotation file ({error})"), reason=reason)
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("gb18030")
        except UnicodeDecodeError as error:
            tally.report(DatasetError(path, f"neither UTF-8 nor GB18030 text ({error})"), reason=reason)
            return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        tally.report(DatasetError(path, f"not valid JSON ({error})"), reason=reason)
        return None


def _check_image_path(value: Any, json_path: Path, root: Path) -> None:
    """Refuse an ``imagePath`` that leaves ``root`` (see the module docstring)."""
    if value is None or value == "":
        return
    if not isinstance(value, str):
        raise DatasetError(json_path, f"imagePath is not a string: {value!r:.100}")
    if _WINDOWS_DRIVE.match(value):
        return
    posix = value.replace("\\", "/")
    if PurePosixPath(posix).is_absolute():
        raise DatasetError(json_path, f"imagePath {value!r} is an absolute path, outside the dataset root")
    try:
        folder = json_path.parent.absolute().relative_to(root.absolute())
    except ValueError:
        raise DatasetError(json_path, f"annotation file outside the dataset root {root}") from None
    try:
        path_inside(root, str(folder / posix))
    except DatasetError:
        raise DatasetError(
            json_path, f"imagePath {value!r} names an image outside the dataset root {root}"
        ) from None


def _declared_size(data: dict[str, Any]) -> tuple[int, int] | None:
    width, height = data.get("imageWidth"), data.get("imageHeight")
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        return width, height
    return None


def _parse_shape(
    shape: Any, number: int, json_path: Path, labels: Mapping[str, int | None], tally: ErrorTally
) -> tuple[list[float], int] | None:
    """``(x1, y1, x2, y2 box, label)`` of one shape, or ``None`` when it is dropped."""
    if not isinstance(shape, dict):
        tally.report(DatasetError(json_path, f"shape #{number} is not an object"), reason=MALFORMED_SHAPE)
        return None
    name = shape.get("label")
    if not isinstance(name, str) or not name.strip():
        problem = f"shape #{number} has no label (a non-empty string): {name!r:.100}"
        tally.report(DatasetError(json_path, problem), reason=MALFORMED_SHAPE)
        return None
    name = name.strip()
    points = shape.get("points")
    valid = (
        isinstance(points, list)
        and len(points) > 0
        and all(isinstance(p, list) and len(p) == 2 and all(is_json_number(v) for v in p) for p in points)
    )
    if not valid:
        problem = f"shape #{number} ({name}) needs 'points' as a list of [x, y] numbers: {points!r:.200}"
        tally.report(DatasetError(json_path, problem), reason=MALFORMED_SHAPE)
        return None
    if name not in labels:
        known = ", ".join(labels)
        problem = f"shape #{number} has unknown label {name!r} (known labels: {known})"
        tally.report(DatasetError(json_path, problem), reason=UNKNOWN_CLASS)
        return None
    label = labels[name]
    if label is None:
        tally.count(IGNORED_CLASS)
        return None
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    if shape.get("shape_type") == "circle" and len(points) == 2:
        radius = math.hypot(xs[1] - xs[0], ys[1] - ys[0])
        return [xs[0] - radius, ys[0] - radius, xs[0] + radius, ys[0] + radius], label
    return [min(xs), min(ys), max(xs), max(ys)], label
